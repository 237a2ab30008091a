-- KEYS[1] holders (zset: permit token -> lease deadline, server milliseconds)
-- ARGV[1] permit token to look up ("" for none)
-- returns {live, left_ms}: live = permits whose lease has not run out;
--         left_ms = remaining lease of ARGV[1]'s permit, or -1 when it is gone or expired
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live = redis.call('ZCOUNT', KEYS[1], '(' .. string.format('%d', now_ms), '+inf')
local left = -1
if ARGV[1] ~= '' then
  local deadline = redis.call('ZSCORE', KEYS[1], ARGV[1])
  if deadline and tonumber(deadline) > now_ms then left = tonumber(deadline) - now_ms end
end
return {live, left}
