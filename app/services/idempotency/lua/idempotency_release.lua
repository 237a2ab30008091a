-- KEYS[1] record hash (see idempotency_claim.lua)
-- KEYS[2] notify list
-- ARGV[1] owner token
-- ARGV[2] time to keep the notify list, ms
-- returns 1 if the in-flight claim was removed (the key is free again), 0 if it is not ours
-- @include wake
local rec = redis.call('HMGET', KEYS[1], 's', 't', 'w')
if rec[1] ~= 'p' or rec[2] ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
wake(KEYS[2], math.min(tonumber(rec[3] or '0'), 1000), ARGV[2])
return 1
