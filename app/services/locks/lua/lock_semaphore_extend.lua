-- KEYS[1] holders (zset: permit token -> lease deadline, server milliseconds)
-- ARGV[1] permit token
-- ARGV[2] milliseconds to add (or the new lease when ARGV[3] is "1")
-- ARGV[3] "1": replace the remaining lease with ARGV[2]; "0": add ARGV[2] to it
-- returns the new remaining lease in milliseconds, or -1 when the permit is gone or expired
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local deadline = redis.call('ZSCORE', KEYS[1], ARGV[1])
if (not deadline) or tonumber(deadline) <= now_ms then
  return -1
end
local ms = tonumber(ARGV[2])
if ARGV[3] ~= '1' then ms = ms + (tonumber(deadline) - now_ms) end
redis.call('ZADD', KEYS[1], 'XX', now_ms + ms, ARGV[1])
if redis.call('PTTL', KEYS[1]) < ms then
  redis.call('PEXPIRE', KEYS[1], string.format('%d', ms))
end
return ms
