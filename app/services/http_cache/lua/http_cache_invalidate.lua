-- KEYS[1] URL meta hash (fields: see http_cache_lookup.lua)
-- ARGV[1] new random generation: every stored variant of the URL stops matching at once
-- ARGV[2] minimum lifetime of the meta hash (ms): a response computed before this call
--         (whose lookup saw the old generation) is refused by the store script meanwhile
-- returns 1 if a response was stored for the URL since its last invalidation, else 0
local had = redis.call('HDEL', KEYS[1], 'v')
redis.call('HSET', KEYS[1], 'g', ARGV[1])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return had
