-- KEYS[1] value key
-- returns {PTTL of the value in ms (-2 missing, -1 no expiry), stale window of the entry in ms (0: none)}
--
-- The stale window is read from the entry's header ("\2<stale ms>|...") here,
-- so no payload bytes travel (and none can be cut mid-character for clients
-- that decode replies).
local pttl = redis.call('PTTL', KEYS[1])
local stale = 0
if pttl ~= -2 then
  local found = string.match(redis.call('GETRANGE', KEYS[1], 0, 24), '^\2(%d+)|')
  if found then
    stale = tonumber(found)
  end
end
return {pttl, stale}
