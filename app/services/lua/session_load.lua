-- KEYS[1] session record (hash)
-- KEYS[2] moved marker of this id (string: the token the id was regenerated to)
-- ARGV[1] '1' to restart the idle timeout (bounded by the absolute deadline), '0' to only read
-- returns {1, {field, value, ...}} with the whole record;
--         {2, token} when the id was regenerated less than the grace window ago;
--         {0} when the id is unknown, expired or deleted
local rec = KEYS[1]
local meta = redis.call('HMGET', rec, 'expires_at', 'idle_ms')
if not meta[1] then
  local moved = redis.call('GET', KEYS[2])
  if moved then
    return {2, moved}
  end
  return {0}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local left = tonumber(meta[1]) - now
if left <= 0 then
  redis.call('DEL', rec)
  return {0}
end
if ARGV[1] == '1' then
  redis.call('PEXPIRE', rec, math.min(tonumber(meta[2]), left))
end
return {1, redis.call('HGETALL', rec)}
