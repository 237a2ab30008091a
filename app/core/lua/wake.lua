-- Fragment wake: wakes waiters that block (BLPOP) on a list, one token per waiter.
-- expects: nothing
-- defines: local function wake(list, n, ttl_ms): RPUSHes n tokens '1' onto the key list (in
--          batches of 500, so unpack stays far below Lua's stack limit) and sets the list to
--          expire in ttl_ms; does nothing when n <= 0. The caller caps n.
local function wake(list, n, ttl_ms)
  if n <= 0 then return end
  local batch = {}
  for _ = 1, n do
    batch[#batch + 1] = '1'
    if #batch == 500 then
      redis.call('RPUSH', list, unpack(batch))
      batch = {}
    end
  end
  if #batch > 0 then redis.call('RPUSH', list, unpack(batch)) end
  redis.call('PEXPIRE', list, ttl_ms)
end
