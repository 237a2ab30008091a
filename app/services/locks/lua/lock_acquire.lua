-- KEYS[1] lock key (string: the owner's token; PX lease)
-- KEYS[2] fence counter (integer; TTL ARGV[3], refreshed by every acquire)
-- KEYS[3] FIFO wait queue (zset: waiter token -> arrival, server microseconds)
-- KEYS[4] waiter heartbeats (zset: waiter token -> deadline, server milliseconds)
-- ARGV[1] owner token (random, one per acquisition)
-- ARGV[2] lease, milliseconds
-- ARGV[3] fence counter TTL, milliseconds
-- ARGV[4] "1": fair (FIFO among fair waiters), "0": whoever asks first after a release
-- ARGV[5] waiter heartbeat TTL, milliseconds (fair only)
-- returns {1, fence}          acquired (or already held with this token: a retried call);
--         {0, wait_ms, head}  held by another owner: wait_ms = ms until its lease ends,
--                             head = 1 when this fair waiter is first in the queue
-- @include fair_queue
local token = ARGV[1]
local holder = redis.call('GET', KEYS[1])
if holder == token then
  return {1, tonumber(redis.call('GET', KEYS[2]) or '0')}
end
local fair = ARGV[4] == '1'
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

if fair then prune_queue(KEYS[3], KEYS[4], now_ms) end

if not holder then
  local may_take = true
  if fair then
    local head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
    may_take = (not head) or head == token
  end
  if may_take then
    redis.call('SET', KEYS[1], token, 'PX', ARGV[2])
    local fence = redis.call('INCR', KEYS[2])
    if fence == 1 then
      -- first acquisition, or the counter expired while the lock was idle: start above every
      -- token issued before by seeding from the server clock in microseconds
      local seed = t[1] .. string.format('%06d', tonumber(t[2]))
      redis.call('SET', KEYS[2], seed)
      fence = tonumber(seed)
    end
    redis.call('PEXPIRE', KEYS[2], ARGV[3])
    if fair then
      redis.call('ZREM', KEYS[3], token)
      redis.call('ZREM', KEYS[4], token)
    end
    return {1, fence}
  end
end

local wait_ms = 0
if holder then
  wait_ms = redis.call('PTTL', KEYS[1])
  if wait_ms < 0 then wait_ms = 0 end
end
local head = 0
if fair then head = join_queue(KEYS[3], KEYS[4], token, t, now_ms, ARGV[5]) end
return {0, wait_ms, head}
