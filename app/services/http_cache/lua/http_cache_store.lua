-- KEYS[1] URL meta hash (fields: see http_cache_lookup.lua)
-- KEYS[2] entry hash of the variant (fields: see http_cache_lookup.lua)
-- KEYS[3] refresh lease of the variant (released)
-- ARGV[1] Vary spec of the response
-- ARGV[2] generation the caller saw at lookup ("" when the URL had no meta)
-- ARGV[3] new random generation, used when the URL has no meta
-- ARGV[4] response blob
-- ARGV[5] ETag
-- ARGV[6] Last-Modified from the origin (s); 0 for none; -1 to synthesize one: kept from the
--         entry when the ETag is unchanged, else this second if no other version of the URL
--         got this second already (else none, so If-Modified-Since can never match the
--         wrong version)
-- ARGV[7] fresh window (ms)
-- ARGV[8] stale-while-revalidate window (ms)
-- ARGV[9] stale-if-error window (ms)
-- ARGV[10] minimum lifetime of the meta hash (ms)
-- returns {1, stored_at_ms, last_modified_s} when stored,
--         {0, 0, 0} when the URL was invalidated since the caller's lookup (nothing written)
local gen = redis.call('HGET', KEYS[1], 'g')
if gen then
  if gen ~= ARGV[2] then
    return {0, 0, 0}
  end
else
  gen = ARGV[3]
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lm = tonumber(ARGV[6])
if lm < 0 then
  local old = redis.call('HMGET', KEYS[2], 'e', 'm', 'g')
  if old[1] == ARGV[5] and old[3] == gen and tonumber(old[2] or '0') > 0 then
    lm = tonumber(old[2])
  else
    local sec = tonumber(t[1])
    if sec > tonumber(redis.call('HGET', KEYS[1], 'l') or '0') then
      lm = sec
      redis.call('HSET', KEYS[1], 'l', string.format('%d', sec))
    else
      lm = 0
    end
  end
end
local ttl = tonumber(ARGV[7]) + math.max(tonumber(ARGV[8]), tonumber(ARGV[9]))
redis.call('HSET', KEYS[2], 'd', ARGV[4], 'e', ARGV[5], 'm', string.format('%d', lm),
  's', string.format('%d', now), 'g', gen, 'f', ARGV[7], 'w', ARGV[8], 'x', ARGV[9])
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'g', gen)
local keep = math.max(ttl, tonumber(ARGV[10]))
if redis.call('PTTL', KEYS[1]) < keep then
  redis.call('PEXPIRE', KEYS[1], keep)
end
redis.call('DEL', KEYS[3])
return {1, now, lm}
