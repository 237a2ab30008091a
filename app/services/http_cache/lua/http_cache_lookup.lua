-- KEYS[1] URL meta hash: v = Vary spec of the stored variants, g = generation,
--         l = newest synthesized Last-Modified issued for the URL (s)
-- KEYS[2] entry hash of the variant the caller computed for ARGV[1]: d = response blob,
--         e = ETag, m = Last-Modified (s, 0 = none), s = stored at (ms, server clock),
--         g = generation it was stored under, f / w / x = fresh / stale-while-revalidate /
--         stale-if-error windows (ms)
-- KEYS[3] refresh lease of that variant
-- ARGV[1] the Vary spec the caller assumed when it computed KEYS[2]
-- ARGV[2] refresh lease in ms (0: never take it)
-- returns {now_ms}                      nothing is stored for the URL
--         {now_ms, spec, generation}    no usable entry (when spec ~= ARGV[1], the caller
--                                       recomputes the variant for spec and asks again)
--         {now_ms, spec, generation, d, e, m, s, f, w, x, leased}
--                                       the entry; leased = 1 when it is stale within its
--                                       stale-while-revalidate window and this caller took
--                                       the lease to refresh it
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local meta = redis.call('HMGET', KEYS[1], 'v', 'g')
if not meta[2] then
  return {now}
end
local spec = meta[1] or ''
if spec ~= ARGV[1] then
  return {now, spec, meta[2]}
end
local e = redis.call('HMGET', KEYS[2], 'g', 'd', 'e', 'm', 's', 'f', 'w', 'x')
if e[1] ~= meta[2] then
  return {now, spec, meta[2]}
end
local leased = 0
local age = now - tonumber(e[5])
local fresh = tonumber(e[6])
if tonumber(ARGV[2]) > 0 and age > fresh and age <= fresh + tonumber(e[7]) then
  if redis.call('SET', KEYS[3], '1', 'NX', 'PX', ARGV[2]) then
    leased = 1
  end
end
return {now, spec, meta[2], e[2], e[3], e[4], e[5], e[6], e[7], e[8], leased}
