-- KEYS[1] holders (zset: permit token -> lease deadline, ms)
-- KEYS[2] wake list (one marker wakes one blocked waiter; fair waiters block on KEYS[2]:<token>)
-- KEYS[3] FIFO wait queue (zset)
-- KEYS[4] waiter heartbeats (zset)
-- KEYS[5] release receipts (optional; zset: released permit token -> receipt deadline, ms)
-- ARGV[1] permit token
-- ARGV[2] wake marker TTL, milliseconds
-- ARGV[3] limit
-- ARGV[4] release receipt TTL, milliseconds (with KEYS[5])
-- returns 1 if the permit was held and its lease had not run out (or this permit's release
-- already ran: the client library retried the call after its reply was lost), else 0
-- (a fair waiter with this token leaves the queue either way: release doubles as "give up")
-- @include fair_queue
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local released = 0
local deadline = redis.call('ZSCORE', KEYS[1], ARGV[1])
if deadline then
  redis.call('ZREM', KEYS[1], ARGV[1])
  if tonumber(deadline) > now_ms then
    released = 1
    if KEYS[5] then
      local ttl = tonumber(ARGV[4])
      redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now_ms)
      redis.call('ZADD', KEYS[5], now_ms + ttl, ARGV[1])
      redis.call('PEXPIRE', KEYS[5], ttl)
    end
  end
elseif KEYS[5] then
  local receipt = redis.call('ZSCORE', KEYS[5], ARGV[1])
  if receipt and tonumber(receipt) > now_ms then
    return 1
  end
end
local left = redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
if deadline or (left == 1 and redis.call('ZCOUNT', KEYS[1], now_ms, '+inf') < tonumber(ARGV[3])) then
  signal_next(KEYS[2], KEYS[3], ARGV[2])
end
return released
