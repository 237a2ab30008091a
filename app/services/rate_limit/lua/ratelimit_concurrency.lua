-- Concurrency limit over N policies, all-or-nothing: each admitted unit holds a lease until it is
-- released or expires (so a crashed worker's leases free themselves).
-- KEYS[i]    sorted set of policy i: member "<lease>#<unit>", score = lease expiry (us);
--            expires with its longest lease; all KEYS share one hash tag
-- ARGV[1]    cost: units asked for (integer >= 0)
-- ARGV[2]    1 to acquire, 0 to only look (peek), -1 to release the lease
-- ARGV[3]    lease id (random, chosen by the caller)
-- ARGV[4]    lease duration in microseconds
-- ARGV[4+i]  policy i: limit
-- returns, to acquire or peek: {allowed, then for each policy: fits, remaining, 0, 0}
--   allowed    1 when every policy admits the cost (all leases were taken), else 0 (none was)
--   fits       1 when this policy alone would admit the cost
--   remaining  free slots after this call
-- returns, to release: {units released over all policies}
-- Clock: Redis TIME only.
-- @include now_us
-- @include limit_reply
local cost = tonumber(ARGV[1])
local mode = ARGV[2]
local lease = ARGV[3]
local n = #KEYS

if mode == '-1' then
  local released = 0
  for i = 1, n do
    for j = 1, cost do
      released = released + redis.call('ZREM', KEYS[i], lease .. '#' .. j)
    end
  end
  return {released}
end

local counts, allowed = {}, 1
for i = 1, n do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', string.format('%d', now))
  counts[i] = redis.call('ZCARD', KEYS[i])
  if counts[i] + cost > tonumber(ARGV[4 + i]) then allowed = 0 end
end

local duration = tonumber(ARGV[4])
local expiry = string.format('%d', now + duration)
local ttl_ms = math.ceil(duration / 1000)
local out = {allowed}
for i = 1, n do
  local limit = tonumber(ARGV[4 + i])
  local count = counts[i]
  local fits = 1
  if count + cost > limit then fits = 0 end
  if allowed == 1 and mode == '1' and cost > 0 then
    for j = 1, cost do
      redis.call('ZADD', KEYS[i], expiry, lease .. '#' .. j)
    end
    if redis.call('PTTL', KEYS[i]) < ttl_ms then
      redis.call('PEXPIRE', KEYS[i], string.format('%d', ttl_ms))
    end
    count = count + cost
  end
  add_policy(out, fits, limit - count, 0, 0)
end
return out
