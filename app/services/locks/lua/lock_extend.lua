-- KEYS[1] lock key
-- ARGV[1] owner token
-- ARGV[2] milliseconds to add (or the new lease when ARGV[3] is "1")
-- ARGV[3] "1": replace the remaining lease with ARGV[2]; "0": add ARGV[2] to it
-- returns the new remaining lease in milliseconds, or -1 when the lock is not held with this token
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return -1
end
local ms = tonumber(ARGV[2])
if ARGV[3] ~= '1' then
  local pttl = redis.call('PTTL', KEYS[1])
  if pttl > 0 then ms = ms + pttl end
end
redis.call('PEXPIRE', KEYS[1], string.format('%d', ms))
return ms
