-- Sliding-window log over N policies, all-or-nothing: one sorted-set member per admitted unit,
-- so memory and trimming cost are O(limit) per key (prefer GCRA or the sliding counter for big limits).
-- KEYS[i]    sorted set of policy i: member "<time>:<seq>", score = admission time (us);
--            expires one window after its newest entry; all KEYS share one hash tag
-- ARGV[1]    cost: units asked for (integer >= 0)
-- ARGV[2]    1 to charge, 0 to only look (peek), 2 to charge and reply with `allowed` alone
-- ARGV[1+2i] policy i: limit
-- ARGV[2+2i] policy i: window in microseconds
-- returns {allowed, then for each policy: fits, remaining, reset_us, retry_us}; `allowed` alone
--   (an integer, not a list) when ARGV[2] is 2
--   allowed    1 when every policy admits the cost (all were charged), else 0 (none was)
--   fits       1 when this policy alone would admit the cost
--   remaining  units left after this call
--   reset_us   microseconds until the oldest entry leaves the window (0 when the log is empty)
--   retry_us   microseconds until this policy would admit the cost (0 when it fits)
-- Clock: Redis TIME only.
-- @include now_us
-- @include limit_reply
local cost = tonumber(ARGV[1])
local charge = ARGV[2] ~= '0'
local brief = ARGV[2] == '2' -- is_allowed: the one integer is the whole reply
local n = #KEYS

local counts, allowed = {}, 1
for i = 1, n do
  local limit = tonumber(ARGV[2 * i + 1])
  local window = tonumber(ARGV[2 * i + 2])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', string.format('%d', now - window))
  counts[i] = redis.call('ZCARD', KEYS[i])
  if counts[i] + cost > limit then allowed = 0 end
end

-- microseconds until the entry at 0-based `rank` (oldest first) leaves the window
local function expiry_of(key, rank, window)
  local entry = redis.call('ZRANGE', key, rank, rank, 'WITHSCORES')
  if entry[2] == nil then return 0 end
  local wait = tonumber(entry[2]) + window - now
  if wait < 0 then return 0 end
  return wait
end

local stamp = string.format('%d', now)
local out = {allowed}
for i = 1, n do
  local limit = tonumber(ARGV[2 * i + 1])
  local window = tonumber(ARGV[2 * i + 2])
  local count = counts[i]
  local fits, retry = 1, 0
  if count + cost > limit then
    fits = 0
    if not brief then retry = expiry_of(KEYS[i], count + cost - limit - 1, window) end
  end
  if allowed == 1 and charge and cost > 0 then
    local args = {}
    for j = 1, cost do
      args[#args + 1] = stamp
      args[#args + 1] = stamp .. ':' .. (count + j) -- unique: same time implies a larger count
    end
    redis.call('ZADD', KEYS[i], unpack(args))
    redis.call('PEXPIRE', KEYS[i], string.format('%d', math.ceil(window / 1000)))
    count = count + cost
  end
  local reset = 0
  if count > 0 and not brief then reset = expiry_of(KEYS[i], 0, window) end
  add_policy(out, fits, limit - count, reset, retry)
end
if brief then return allowed end
return out
