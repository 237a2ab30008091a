-- Fragment now_ms: the server clock (Redis TIME, never the client's) in milliseconds.
-- expects: nothing
-- defines: local now, integer milliseconds since the Unix epoch (microseconds rounded down)
local now
do
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
