-- KEYS[1] stream key, KEYS[2] its dead-letter stream (same hash tag: one Cluster slot)
-- ARGV[1] dead-letter entry id
-- Atomically appends the dead letter's original fields (every field not named "dlq-*") to the
-- stream as a new entry and deletes the dead letter, so a replay is never lost nor doubled.
-- returns {1, new entry id} | {0, ""} (no such dead letter, replayed or deleted already, or it
--   has no original fields)
local entry = redis.call('XRANGE', KEYS[2], ARGV[1], ARGV[1])[1]
if not entry then
  return {0, ''}
end
local args = {'XADD', KEYS[1], '*'}
local fields = entry[2]
for i = 1, #fields, 2 do
  if string.sub(fields[i], 1, 4) ~= 'dlq-' then
    args[#args + 1] = fields[i]
    args[#args + 1] = fields[i + 1]
  end
end
if #args == 3 then
  return {0, ''}  -- nothing to replay (not a dead letter this toolkit wrote)
end
local id = redis.call(unpack(args))
redis.call('XDEL', KEYS[2], ARGV[1])
return {1, id}
