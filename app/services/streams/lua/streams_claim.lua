-- KEYS[1] stream key
-- ARGV[1] group, ARGV[2] consumer (the caller), ARGV[3] mode: "take" or "renew", ARGV[4..] entry ids
-- Claims each id for ARGV[2] only while it is still pending for ARGV[2]: an entry another
-- consumer has claimed in the meantime is never taken back.
--   "take":  XCLAIM (the delivery count grows by one; the entry is returned)
--   "renew": XCLAIM ... JUSTID (the delivery count is unchanged; only the idle time resets)
-- returns {claimed, deleted, foreign}: claimed is {{id, {field, value, ...}, deliveries}, ...}
--   for "take" and {id, ...} for "renew"; deleted lists ids that were ours but whose entry is
--   gone from the stream (trimmed or XDELed; XCLAIM drops them from the PEL); foreign lists
--   ids now pending for another consumer. Ids no longer pending at all (acked) are in none.
local stream, group, me, mode = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local mine, counts, foreign = {}, {}, {}
for i = 4, #ARGV do
  local row = redis.call('XPENDING', stream, group, ARGV[i], ARGV[i], 1)[1]
  if row and row[2] == me then
    mine[#mine + 1] = ARGV[i]
    counts[ARGV[i]] = tonumber(row[4])
  elseif row then
    foreign[#foreign + 1] = ARGV[i]
  end
end
if #mine == 0 then
  return {{}, {}, foreign}
end
local args = {'XCLAIM', stream, group, me, 0}
for i = 1, #mine do
  args[#args + 1] = mine[i]
end
if mode == 'renew' then
  args[#args + 1] = 'JUSTID'
end
local reply = redis.call(unpack(args))
local claimed, seen = {}, {}
for i = 1, #reply do
  local item = reply[i]
  if mode == 'renew' then
    if item then
      claimed[#claimed + 1] = item
      seen[item] = true
    end
  elseif item and item[2] then
    claimed[#claimed + 1] = {item[1], item[2], counts[item[1]] + 1}
    seen[item[1]] = true
  end
end
local deleted = {}
for i = 1, #mine do
  if not seen[mine[i]] then
    deleted[#deleted + 1] = mine[i]
  end
end
return {claimed, deleted, foreign}
