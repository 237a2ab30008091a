-- KEYS[1] stream key, KEYS[2] dead-letter stream key (same hash tag as KEYS[1])
-- ARGV[1] group, ARGV[2] consumer (the caller), ARGV[3] entry id, ARGV[4] error text,
-- ARGV[5] delivery count, ARGV[6] dead-letter MAXLEN (approximate; "0": unbounded),
-- ARGV[7] stream name as users know it
-- Atomically copies the entry to the dead-letter stream (metadata fields "dlq-*" first, then
-- the original fields verbatim) and XACKs it, but only while the entry is still pending for
-- ARGV[2]: a consumer that lost its claim never dead-letters another consumer's entry.
-- returns {"moved", dead-letter id} | {"deleted", ""} (entry gone from the stream: acked only)
--   | {"lost", ""} (not pending for ARGV[2]: nothing done)
local stream, dlq, group, me, id = KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3]
local row = redis.call('XPENDING', stream, group, id, id, 1)[1]
if not row or row[2] ~= me then
  return {'lost', ''}
end
local entry = redis.call('XRANGE', stream, id, id)[1]
if not entry then
  redis.call('XACK', stream, group, id)
  return {'deleted', ''}
end
-- @include now_ms
local at_ms = tostring(now)
local args = {'XADD', dlq}
if tonumber(ARGV[6]) > 0 then
  args[#args + 1] = 'MAXLEN'
  args[#args + 1] = '~'
  args[#args + 1] = ARGV[6]
end
local meta = {
  '*',
  'dlq-id', id,
  'dlq-stream', ARGV[7],
  'dlq-group', group,
  'dlq-consumer', me,
  'dlq-error', ARGV[4],
  'dlq-deliveries', ARGV[5],
  'dlq-at-ms', at_ms,
}
for i = 1, #meta do
  args[#args + 1] = meta[i]
end
local fields = entry[2]
for i = 1, #fields do
  args[#args + 1] = fields[i]
end
local dead_id = redis.call(unpack(args))
redis.call('XACK', stream, group, id)
return {'moved', dead_id}
