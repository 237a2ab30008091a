-- KEYS[1] stream key
-- ARGV[1] group, ARGV[2] minimum idle time in ms, ARGV[3] consumer never to remove (the caller)
-- Deletes the group's consumers that have no pending entries and have been idle at least
-- ARGV[2] ms. Atomic: a consumer that has just been handed entries is never deleted, so
-- XGROUP DELCONSUMER cannot drop entries from the PEL.
-- returns the names of the consumers deleted
local stream, group, min_idle, keep = KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[3]
if redis.call('EXISTS', stream) == 0 then
  return {}
end
-- @include field_map
local removed = {}
local consumers = redis.call('XINFO', 'CONSUMERS', stream, group)
for i = 1, #consumers do
  local info = field_map(consumers[i])
  local name, pending, idle = info['name'], tonumber(info['pending']), tonumber(info['idle'])
  if name and name ~= keep and pending == 0 and idle and idle >= min_idle then
    redis.call('XGROUP', 'DELCONSUMER', stream, group, name)
    removed[#removed + 1] = name
  end
end
return removed
