-- KEYS[1] session record (hash)
-- (no ARGV) reads the record and restarts its idle timeout, bounded by the absolute deadline
-- returns the whole record as a flat {field, value, ...} list, or an empty list when the id
--         is unknown, expired, deleted or was regenerated away (the record moved to another
--         id: the old one never reads the data of the session that replaced it)
--
-- One HGETALL serves both the deadline check and the reply: the record's own fields
-- expires_at and idle_ms are found in it, near the front (the create script writes them
-- first), instead of being read by a second command.
local rec = KEYS[1]
local all = redis.call('HGETALL', rec)
local n = #all
if n == 0 then
  return all
end
local expires, idle
for i = 1, n, 2 do
  local field = all[i]
  if field == 'expires_at' then
    expires = all[i + 1]
  elseif field == 'idle_ms' then
    idle = all[i + 1]
  end
  if expires and idle then
    break
  end
end
if not (expires and idle) then
  return {}  -- not a record this store wrote
end
-- @include now_ms
local left = tonumber(expires) - now
if left <= 0 then
  redis.call('DEL', rec)
  return {}
end
redis.call('PEXPIRE', rec, math.min(tonumber(idle), left))
return all
