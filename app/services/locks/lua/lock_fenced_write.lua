-- KEYS[1] protected resource (hash: "value" -> payload, "fence" -> highest fence accepted)
-- ARGV[1] the writer's fencing token (from RedisLock.fence)
-- ARGV[2] payload
-- ARGV[3] TTL, milliseconds ("0": keep the key's current TTL, or none)
-- returns 1 if written; 0 if a holder with a higher token wrote first (this writer is stale)
local last = tonumber(redis.call('HGET', KEYS[1], 'fence') or '0')
local fence = tonumber(ARGV[1])
if fence < last then
  return 0
end
redis.call('HSET', KEYS[1], 'value', ARGV[2], 'fence', ARGV[1])
if ARGV[3] ~= '0' then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return 1
