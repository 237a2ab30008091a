-- KEYS[1] lease key
-- KEYS[2] waiter count
-- KEYS[3] wake-up list
-- ARGV[1] lease token
-- ARGV[2] ms: "0" release the lease and wake every waiter (so one of them can take
--         over); > 0 keep the lease for this many ms (extend while computing, or hold
--         it as a back-off after a failed refresh)
-- returns 1 if the token held the lease, else 0
-- @include wake
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local ms = tonumber(ARGV[2])
if ms > 0 then
  redis.call('PEXPIRE', KEYS[1], ms)
  if redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('PEXPIRE', KEYS[2], ms + 5000)
  end
  return 1
end
redis.call('DEL', KEYS[1])
local waiting = tonumber(redis.call('GET', KEYS[2]) or '0')
if waiting > 0 then
  redis.call('DEL', KEYS[2], KEYS[3])
  wake(KEYS[3], math.min(waiting, 10000), 5000)
end
return 1
