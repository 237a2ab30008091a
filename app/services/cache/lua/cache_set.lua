-- KEYS[1] value key
-- KEYS[2] lease key of the value (value key .. "|lock")
-- KEYS[3] waiter count of the value (value key .. "|wait")
-- KEYS[4] wake-up list of the value (value key .. "|wake")
-- KEYS[5..] tag sets of the value (all keys share the value's hash tag)
-- ARGV[1] stored entry
-- ARGV[2] lifetime in ms ("0": no expiry)
-- ARGV[3] lease token ("": plain write; else drop the lease if this token holds it)
-- ARGV[4] tag member: the value key's suffix after "<shard root>:"
-- ARGV[5] shard root (a tag member m lives at ARGV[5] .. ":" .. m)
-- ARGV[6] invalidation channel ("": do not publish)
-- ARGV[7] invalidation message
-- returns the number of waiters woken
--
-- Writes the value, its tag memberships and the invalidation message in one
-- atomic step. A tag set never expires before a member it holds: its TTL is
-- raised to the member's lifetime (or made persistent for a persistent member).
-- Each write also checks 3 random members of each tag set and drops those whose
-- value is gone, which keeps a set within about twice its live members.
-- @include wake
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
for i = 5, #KEYS do
  local tagset = KEYS[i]
  local existed = redis.call('EXISTS', tagset) == 1
  local left = redis.call('PTTL', tagset)
  redis.call('SADD', tagset, ARGV[4])
  if ttl == 0 then
    if existed and left ~= -1 then redis.call('PERSIST', tagset) end
  elseif not existed then
    redis.call('PEXPIRE', tagset, ttl)
  elseif left ~= -1 and left < ttl then
    redis.call('PEXPIRE', tagset, ttl)
  end
  local sample = redis.call('SRANDMEMBER', tagset, 3)
  for _, member in ipairs(sample) do
    if member ~= ARGV[4] and redis.call('EXISTS', ARGV[5] .. ':' .. member) == 0 then
      redis.call('SREM', tagset, member)
    end
  end
end
if ARGV[3] ~= '' and redis.call('GET', KEYS[2]) == ARGV[3] then
  redis.call('DEL', KEYS[2])
end
local woken = 0
local waiting = tonumber(redis.call('GET', KEYS[3]) or '0')
if waiting > 0 then
  redis.call('DEL', KEYS[3], KEYS[4])
  woken = math.min(waiting, 10000)
  wake(KEYS[4], woken, 5000)
end
if ARGV[6] ~= '' then
  redis.call('PUBLISH', ARGV[6], ARGV[7])
end
return woken
