-- KEYS[1] stream key
-- ARGV[1] group, ARGV[2] consumer (the caller), ARGV[3] min idle time in ms,
-- ARGV[4] cursor (start id, "0-0" for a new pass), ARGV[5] COUNT
-- One XAUTOCLAIM page: entries pending longer than ARGV[3] ms (for any consumer) move to
-- ARGV[2]; their delivery count grows by one. XAUTOCLAIM scans at most 10 x COUNT PEL entries,
-- so an empty page does not end the pass: only a returned cursor of "0-0" does.
-- returns {cursor, {{id, {field, value, ...}, deliveries}, ...}, {deleted id, ...}}
local stream, group = KEYS[1], ARGV[1]
local reply = redis.call('XAUTOCLAIM', stream, group, ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5])
local claimed = {}
for i = 1, #reply[2] do
  local item = reply[2][i]
  if item and item[2] then
    local row = redis.call('XPENDING', stream, group, item[1], item[1], 1)[1]
    local count = 1
    if row then
      count = tonumber(row[4])
    end
    claimed[#claimed + 1] = {item[1], item[2], count}
  end
end
return {reply[1], claimed, reply[3] or {}}
