-- KEYS[1] holders (zset: permit token -> lease deadline, server milliseconds)
-- KEYS[2] FIFO wait queue (zset: waiter token -> arrival, server microseconds)
-- KEYS[3] waiter heartbeats (zset: waiter token -> deadline, server milliseconds)
-- ARGV[1] permit token (random, one per permit)
-- ARGV[2] limit (permits in total)
-- ARGV[3] lease, milliseconds
-- ARGV[4] "1": fair (FIFO among fair waiters), "0": whoever asks first
-- ARGV[5] waiter heartbeat TTL, milliseconds (fair only)
-- returns {1, holders}         acquired (holders counts this permit; also for a retried call);
--         {0, wait_ms, head}   no permit free: wait_ms = ms until the next lease ends,
--                              head = 1 when this fair waiter is first in the queue
-- @include fair_queue
local token = ARGV[1]
local limit = tonumber(ARGV[2])
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- permits whose lease ran out (crashed or stalled holders) are free again
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
if redis.call('ZSCORE', KEYS[1], token) then
  return {1, redis.call('ZCARD', KEYS[1])}
end

local fair = ARGV[4] == '1'
if fair then prune_queue(KEYS[2], KEYS[3], now_ms) end

local holders = redis.call('ZCARD', KEYS[1])
local free = limit - holders
if free > 0 then
  local may_take = true
  if fair then
    -- queued fair waiters go first: take a permit only if fewer of them are ahead than are free
    local rank = redis.call('ZRANK', KEYS[2], token)
    if not rank then rank = redis.call('ZCARD', KEYS[2]) end
    may_take = rank < free
  end
  if may_take then
    local lease = tonumber(ARGV[3])
    redis.call('ZADD', KEYS[1], now_ms + lease, token)
    if redis.call('PTTL', KEYS[1]) < lease then
      redis.call('PEXPIRE', KEYS[1], ARGV[3])
    end
    if fair then
      redis.call('ZREM', KEYS[2], token)
      redis.call('ZREM', KEYS[3], token)
    end
    return {1, holders + 1}
  end
end

local wait_ms = 0
if free <= 0 then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if first[2] then wait_ms = math.max(0, tonumber(first[2]) - now_ms) end
end
local head = 0
if fair then head = join_queue(KEYS[2], KEYS[3], token, t, now_ms, ARGV[5]) end
return {0, wait_ms, head}
