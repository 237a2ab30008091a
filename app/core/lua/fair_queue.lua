-- Fragment fair_queue: the FIFO queue of fair lock and semaphore waiters, and their wake-ups.
-- expects: nothing
-- defines: local function join_queue(queue, beats, token, t, now_ms, ttl_ms): puts token in
--          queue (zset scored by arrival in server microseconds from the TIME reply t; an
--          earlier arrival is kept) and its heartbeat deadline now_ms + ttl_ms in beats (zset),
--          both keys expiring in ttl_ms; returns 1 when token is first in the queue, else 0.
--          local function prune_queue(queue, beats, now_ms): removes from both zsets up to 100
--          waiters whose heartbeat deadline passed (crashed, or cancelled without clean-up).
--          local function signal_next(list, queue, ttl_ms): leaves one wake token on list and
--          one on the wake list of the queue's head (list .. ':' .. head: the same hash tag,
--          so the same Cluster slot), each list expiring in ttl_ms.
local function join_queue(queue, beats, token, t, now_ms, ttl_ms)
  redis.call('ZADD', queue, 'NX', t[1] .. string.format('%06d', tonumber(t[2])), token)
  redis.call('ZADD', beats, now_ms + tonumber(ttl_ms), token)
  redis.call('PEXPIRE', queue, ttl_ms)
  redis.call('PEXPIRE', beats, ttl_ms)
  if redis.call('ZRANK', queue, token) == 0 then return 1 end
  return 0
end
local function prune_queue(queue, beats, now_ms)
  local dead = redis.call('ZRANGEBYSCORE', beats, '-inf', now_ms, 'LIMIT', 0, 100)
  if #dead > 0 then
    redis.call('ZREM', queue, unpack(dead))
    redis.call('ZREM', beats, unpack(dead))
  end
end
local function signal_one(list, ttl_ms)
  redis.call('LPUSH', list, '1')
  redis.call('LTRIM', list, 0, 0)
  redis.call('PEXPIRE', list, ttl_ms)
end
local function signal_next(list, queue, ttl_ms)
  signal_one(list, ttl_ms)
  local head = redis.call('ZRANGE', queue, 0, 0)[1]
  if head then signal_one(list .. ':' .. head, ttl_ms) end
end
