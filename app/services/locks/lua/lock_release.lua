-- KEYS[1] lock key
-- KEYS[2] wake list (one marker wakes one blocked waiter; fair waiters block on KEYS[2]:<token>)
-- KEYS[3] FIFO wait queue (zset)
-- KEYS[4] waiter heartbeats (zset)
-- KEYS[5] release receipt (optional): the token of the last release, kept ARGV[3] ms
-- KEYS[6] waiter flag (optional, set by lock_acquire_fast.lua while non-fair acquirers wait):
--         when given, a release that finds neither it nor a fair queue (KEYS[3]) stops after
--         the compare-and-delete: nobody waits, so there is nobody to wake or dequeue
-- ARGV[1] owner token
-- ARGV[2] wake marker TTL, milliseconds
-- ARGV[3] release receipt TTL, milliseconds (with KEYS[5])
-- returns 1 if the lock was held with this token and is now deleted (or this token's release
-- already ran: the client library retried the call after its reply was lost), else 0
-- (a fair waiter with this token leaves the queue either way: release doubles as "give up")
-- @include fair_queue
local released = 0
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  released = 1
  if KEYS[5] then
    redis.call('SET', KEYS[5], ARGV[1], 'PX', ARGV[3])
  end
elseif KEYS[5] and redis.call('GET', KEYS[5]) == ARGV[1] then
  return 1
end
if KEYS[6] and redis.call('EXISTS', KEYS[6], KEYS[3]) == 0 then
  return released
end
local left = redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
if released == 1 or (left == 1 and redis.call('EXISTS', KEYS[1]) == 0) then
  signal_next(KEYS[2], KEYS[3], ARGV[2])
end
return released
