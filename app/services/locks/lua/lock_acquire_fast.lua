-- RedisLock.acquire for a non-fair acquirer: SET NX PX plus the fencing token; no queue, no wake list.
-- KEYS[1] lock key (string: the owner's token; PX lease)
-- KEYS[2] fence counter (integer; TTL ARGV[3], refreshed by every acquire)
-- KEYS[3] waiter flag (set while acquirers wait, so that a release knows to wake them)
-- ARGV[1] owner token (random, one per acquisition)
-- ARGV[2] lease, milliseconds
-- ARGV[3] fence counter TTL, milliseconds
-- ARGV[4] waiter flag TTL, milliseconds (longer than a waiter's longest pause between attempts)
-- returns {1, fence}          acquired (or already held with this token: a retried call)
--         {0, wait_ms, 0}     held by another owner: wait_ms = ms until its lease ends; the
--                             waiter flag is set, so the holder's release wakes a waiter
-- Fair acquirers use lock_acquire.lua (same keys 1-2, same replies); releases of both see
-- either the waiter flag or the fair queue and wake accordingly.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local fence = redis.call('INCR', KEYS[2])
  if fence == 1 then
    -- first acquisition, or the counter expired while the lock was idle: start above every
    -- token issued before by seeding from the server clock in microseconds
    local t = redis.call('TIME')
    local seed = t[1] .. string.format('%06d', tonumber(t[2]))
    redis.call('SET', KEYS[2], seed)
    fence = tonumber(seed)
  end
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  return {1, fence}
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return {1, tonumber(redis.call('GET', KEYS[2]) or '0')}
end
redis.call('SET', KEYS[3], '1', 'PX', ARGV[4])
local wait_ms = redis.call('PTTL', KEYS[1])
if wait_ms < 0 then wait_ms = 0 end
return {0, wait_ms, 0}
