-- KEYS[1] value key
-- KEYS[2] lease key (value key .. "|lock")
-- KEYS[3] waiter count (value key .. "|wait")
-- KEYS[4] wake-up list (value key .. "|wake")
-- ARGV[1] lease token
-- ARGV[2] lease in ms
-- ARGV[3] "1": a miss (return the value if it landed meanwhile; register as a
--         waiter when someone else holds the lease); "0": a refresh (only try the lease)
-- ARGV[4] mode "0" only, optional: the value's PTTL (ms) when the refresher read it stale.
--         A PTTL above it now means the value was written since (another refresh
--         finished in between): there is nothing left to refresh.
-- returns {0, entry, pttl} the value exists (mode "1" only)
--         {1}              the lease is ours: compute, then write with cache_set
--         {2, lease pttl}  someone else computes (mode "1": we are counted as a waiter,
--                          cache_set or cache_release will push a token on KEYS[4])
--         {3}              mode "0": the value was rewritten since it was read
--
-- Checking the value, taking the lease and registering as a waiter happen in
-- one atomic step, so a waiter can never miss the wake-up of the write it waits for.
if ARGV[3] == '1' then
  local entry = redis.call('GET', KEYS[1])
  if entry then
    return {0, entry, redis.call('PTTL', KEYS[1])}
  end
end
if ARGV[3] == '0' and ARGV[4] and ARGV[4] ~= '' then
  if redis.call('PTTL', KEYS[1]) > tonumber(ARGV[4]) then
    return {3}
  end
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if ARGV[3] == '1' then
    redis.call('DEL', KEYS[4])
  end
  return {1}
end
if ARGV[3] == '1' then
  redis.call('INCR', KEYS[3])
  local left = redis.call('PTTL', KEYS[2])
  redis.call('PEXPIRE', KEYS[3], math.max(left, 1) + 5000)
end
return {2, redis.call('PTTL', KEYS[2])}
