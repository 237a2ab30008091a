-- KEYS[1] record hash (see idempotency_claim.lua)
-- ARGV[1] owner token
-- ARGV[2] new in-flight lease, ms from now
-- returns 1 if the lease was renewed, 0 if the claim is not ours any more
local rec = redis.call('HMGET', KEYS[1], 's', 't')
if rec[1] ~= 'p' or rec[2] ~= ARGV[1] then
  return 0
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
