-- KEYS[1] session record (hash)
-- returns the ms the session now has left (min of idle timeout and absolute deadline),
--         or 0 when it is unknown, expired or deleted
local rec = KEYS[1]
local meta = redis.call('HMGET', rec, 'expires_at', 'idle_ms')
if not meta[1] then
  return 0
end
-- @include now_ms
local left = tonumber(meta[1]) - now
if left <= 0 then
  redis.call('DEL', rec)
  return 0
end
local ttl = math.min(tonumber(meta[2]), left)
redis.call('PEXPIRE', rec, ttl)
return ttl
