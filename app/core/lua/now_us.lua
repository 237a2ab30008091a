-- Fragment now_us: the server clock (Redis TIME, never the client's) in microseconds.
-- expects: nothing
-- defines: local now, integer microseconds since the Unix epoch
local now
do
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
