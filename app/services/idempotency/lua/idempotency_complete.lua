-- KEYS[1] record hash (see idempotency_claim.lua)
-- KEYS[2] notify list
-- ARGV[1] owner token; "" stores unconditionally (store_request without a claim)
-- ARGV[2] result to store
-- ARGV[3] time to keep the completed record, ms
-- ARGV[4] time to keep the notify list, ms
-- returns 1 if stored, 0 if the claim is not ours any more (lease expired, released or
--         completed by its owner, or taken by a newer claim)
-- @include wake
local rec = redis.call('HMGET', KEYS[1], 's', 't', 'w')
if ARGV[1] ~= '' then
  if rec[1] ~= 'p' or rec[2] ~= ARGV[1] then
    return 0
  end
else
  -- A record stored without a claim (store_request) gets the empty fingerprint
  -- is_duplicate uses; a claimed record already has its own.
  redis.call('HSETNX', KEYS[1], 'f', '')
end
redis.call('HSET', KEYS[1], 's', 'c', 'r', ARGV[2])
-- The token and the waiter count belong to the in-flight state only.
if rec[3] then
  redis.call('HDEL', KEYS[1], 't', 'w')
elseif rec[2] then
  redis.call('HDEL', KEYS[1], 't')
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if rec[3] then
  wake(KEYS[2], math.min(tonumber(rec[3]), 1000), ARGV[4])
end
return 1
