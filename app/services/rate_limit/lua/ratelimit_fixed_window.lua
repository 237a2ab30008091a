-- Fixed window over N policies, all-or-nothing. A window opens at the first hit and lasts its length.
-- KEYS[i]    counter of policy i (expires when its window closes); all KEYS share one hash tag
-- ARGV[1]    cost: units asked for (integer >= 0)
-- ARGV[2]    1 to charge, 0 to only look (peek), 2 to charge and reply with `allowed` alone
-- ARGV[1+2i] policy i: limit
-- ARGV[2+2i] policy i: window in milliseconds
-- returns {allowed, then for each policy: fits, remaining, reset_us, retry_us}; `allowed` alone
--   (an integer, not a list) when ARGV[2] is 2
--   allowed    1 when every policy admits the cost (all were charged), else 0 (none was)
--   fits       1 when this policy alone would admit the cost
--   remaining  units left in the current window after this call
--   reset_us   microseconds until the window closes (0 when no window is open)
--   retry_us   microseconds until this policy would admit the cost (0 when it fits)
-- Clock: the server's key expiry (PTTL), never the client's.
-- @include limit_reply
local cost = tonumber(ARGV[1])
local charge = ARGV[2] ~= '0'
local brief = ARGV[2] == '2' -- is_allowed: the one integer is the whole reply
local n = #KEYS

local counts, ttls, allowed = {}, {}, 1
for i = 1, n do
  local limit = tonumber(ARGV[2 * i + 1])
  local count = tonumber(redis.call('GET', KEYS[i]) or 0)
  local ttl = 0
  if count > 0 then
    ttl = redis.call('PTTL', KEYS[i])
    if ttl < 0 then -- a counter without expiry (written by someone else): give it one window
      ttl = tonumber(ARGV[2 * i + 2])
      redis.call('PEXPIRE', KEYS[i], ARGV[2 * i + 2])
    end
  end
  counts[i] = count
  ttls[i] = ttl
  if count + cost > limit then allowed = 0 end
end

local out = {allowed}
for i = 1, n do
  local limit = tonumber(ARGV[2 * i + 1])
  local count, ttl = counts[i], ttls[i]
  local fits, retry = 1, 0
  if count + cost > limit then
    fits = 0
    retry = ttl * 1000
  end
  if allowed == 1 and charge and cost > 0 then
    if count == 0 then
      ttl = tonumber(ARGV[2 * i + 2])
      redis.call('SET', KEYS[i], cost, 'PX', ARGV[2 * i + 2])
    else
      redis.call('INCRBY', KEYS[i], cost)
    end
    count = count + cost
  end
  add_policy(out, fits, limit - count, ttl * 1000, retry)
end
if brief then return allowed end
return out
