-- KEYS[1] session record (hash)
-- ARGV[1] idle timeout, ms
-- ARGV[2] absolute lifetime, ms
-- ARGV[3] unique_key
-- ARGV[4] client_ip ('' for none)
-- ARGV[5] locked: '0' or '1'
-- ARGV[6] subject ('' for none)
-- ARGV[7..] data: name, encoded value, name, encoded value, ...
-- returns {1, created_at_ms, expires_at_ms}, or {0} when the id is already taken (nothing written)
--
-- Every timestamp comes from the server clock (TIME). The record expires after
-- min(idle, absolute) ms; later writes and touches recompute that bound.
local rec = KEYS[1]
if redis.call('EXISTS', rec) == 1 then
  return {0}
end
-- @include now_ms
local idle = tonumber(ARGV[1])
local absolute = tonumber(ARGV[2])
local expires = now + absolute
redis.call('HSET', rec,
  'version', 1, 'unique_key', ARGV[3], 'client_ip', ARGV[4], 'locked', ARGV[5],
  'created_at', now, 'modified_at', now, 'expires_at', expires, 'idle_ms', idle,
  'subject', ARGV[6])
for i = 7, #ARGV, 2 do
  redis.call('HSET', rec, 'd:' .. ARGV[i], ARGV[i + 1])
end
redis.call('PEXPIRE', rec, math.min(idle, absolute))
return {1, now, expires}
