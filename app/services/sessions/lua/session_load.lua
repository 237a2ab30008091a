-- KEYS[1] session record (hash)
-- KEYS[2] moved marker of this id (set by a regeneration; it never names the new id)
-- ARGV[1] '1' to restart the idle timeout (bounded by the absolute deadline), '0' to only read
-- returns {1, {field, value, ...}} with the whole record;
--         {2} when the id was regenerated away (recently): no data, the id is dead;
--         {0} when the id is unknown, expired or deleted
--
-- A regenerated-away id resolves to nothing: a request that arrives with it after the
-- regeneration (a planted, fixated id) reads nothing of the session that replaced it.
local rec = KEYS[1]
local meta = redis.call('HMGET', rec, 'expires_at', 'idle_ms')
if not meta[1] then
  if redis.call('EXISTS', KEYS[2]) == 1 then
    return {2}
  end
  return {0}
end
-- @include now_ms
local left = tonumber(meta[1]) - now
if left <= 0 then
  redis.call('DEL', rec)
  return {0}
end
if ARGV[1] == '1' then
  redis.call('PEXPIRE', rec, math.min(tonumber(meta[2]), left))
end
return {1, redis.call('HGETALL', rec)}
