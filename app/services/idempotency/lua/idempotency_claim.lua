-- KEYS[1] record hash: s (p = in flight, c = completed), f (fingerprint), t (owner token),
--         r (stored result), w (waiters to wake when the claim ends)
-- KEYS[2] notify list: one element per waiter is pushed when the claim completes or is released
-- ARGV[1] request fingerprint ("" when the caller does not compare payloads)
-- ARGV[2] owner token for a new claim (random, chosen by the caller)
-- ARGV[3] in-flight lease in ms (the record expires then unless renewed or completed)
-- ARGV[4] "1" to register as a waiter when the key is in flight, else "0" (absent: "0")
-- ARGV[5] "1" to look only: an absent record stays absent (answer {4, ""}); used for the
--         records of a caller under fallback keys during a secret rotation (absent: "0")
-- returns {0, token}  new: the caller owns the claim
--         {1, pttl}   in flight with the same fingerprint (pttl: ms left on the lease)
--         {2, result} completed: the stored result
--         {3, ""}     the key is known with another fingerprint
--         {4, ""}     absent, and ARGV[5] == "1" (nothing written)
-- A re-run with the same token (the client retried after losing the reply) is the same
-- claim: it answers {0, token} again instead of "in flight".
local rec = redis.call('HMGET', KEYS[1], 's', 'f', 'r', 't')
local state = rec[1]
if not state then
  if ARGV[5] == '1' then
    return {4, ''}
  end
  -- Wake-ups left over from an earlier claim of this key must not wake our waiters.
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 's', 'p', 'f', ARGV[1], 't', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {0, ARGV[2]}
end
if rec[2] ~= ARGV[1] then
  return {3, ''}
end
if state == 'c' then
  return {2, rec[3]}
end
if rec[4] == ARGV[2] then
  return {0, ARGV[2]}
end
if ARGV[4] == '1' then
  redis.call('HINCRBY', KEYS[1], 'w', 1)
end
return {1, redis.call('PTTL', KEYS[1])}
