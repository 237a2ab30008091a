-- KEYS[1] lease key
-- KEYS[2] waiter count
-- KEYS[3] wake-up list
-- ARGV[1] lease token
-- ARGV[2] ms: "0" release the lease and wake every waiter (so one of them can take
--         over); > 0 keep the lease for this many ms (extend while computing, or hold
--         it as a back-off after a failed refresh)
-- returns 1 if the token held the lease, else 0
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
  local batch = {}
  for _ = 1, math.min(waiting, 10000) do
    batch[#batch + 1] = '1'
    if #batch == 500 then
      redis.call('RPUSH', KEYS[3], unpack(batch))
      batch = {}
    end
  end
  if #batch > 0 then redis.call('RPUSH', KEYS[3], unpack(batch)) end
  redis.call('PEXPIRE', KEYS[3], 5000)
end
return 1
