-- KEYS[1] stream key
-- ARGV[1] MAXLEN ("" for none), ARGV[2] MINID ("" for none), ARGV[3] "1" to keep entries some
-- consumer group has not acknowledged (pending) or not yet read, ARGV[4] "1" for approximate (~)
-- With ARGV[3] = "1" the trim never goes past the safe floor: the lowest id that is pending in
-- any group, or that follows a group's last-delivered id. MAXLEN then trims exactly to the
-- length asked only if every entry it would drop is below the floor; otherwise it trims up
-- to the floor (the stream stays longer than MAXLEN until the groups catch up).
-- returns the number of entries removed
local stream, maxlen, minid, keep, approx = KEYS[1], ARGV[1], ARGV[2], ARGV[3] == '1', ARGV[4] == '1'
if redis.call('EXISTS', stream) == 0 then
  return 0
end

-- @include field_map

local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end

local function lower(a, b)
  if a == nil then return b end
  if b == nil then return a end
  local ams, aseq = parse(a)
  local bms, bseq = parse(b)
  if ams < bms or (ams == bms and aseq < bseq) then return a end
  return b
end

local function trim(kind, value)
  if approx then
    return redis.call('XTRIM', stream, kind, '~', value)
  end
  return redis.call('XTRIM', stream, kind, value)
end

if not keep then
  if minid ~= '' then return trim('MINID', minid) end
  if maxlen ~= '' then return trim('MAXLEN', maxlen) end
  return 0
end

-- The floor: entries with an id below it are acknowledged by every group.
local floor = nil
local groups = redis.call('XINFO', 'GROUPS', stream)
for i = 1, #groups do
  local info = field_map(groups[i])
  local pending = tonumber(info['pending'])
  local candidate
  if pending and pending > 0 then
    candidate = redis.call('XPENDING', stream, info['name'])[2]
  else
    local ms, seq = parse(info['last-delivered-id'])
    candidate = string.format('%d-%d', ms, seq + 1)
  end
  floor = lower(floor, candidate)
end
if floor == nil then
  -- no group: nothing is unacknowledged
  if minid ~= '' then return trim('MINID', minid) end
  if maxlen ~= '' then return trim('MAXLEN', maxlen) end
  return 0
end

if minid ~= '' then
  return trim('MINID', lower(minid, floor))
end
if maxlen == '' then
  return 0
end
local excess = redis.call('XLEN', stream) - tonumber(maxlen)
if excess <= 0 then
  return 0
end
-- Count (in pages) how many of the entries MAXLEN would drop lie below the floor.
local below, start = 0, '-'
while below < excess do
  local page = redis.call('XRANGE', stream, start, '(' .. floor, 'COUNT', math.min(1000, excess - below))
  if #page == 0 then break end
  below = below + #page
  start = '(' .. page[#page][1]
end
if below >= excess then
  return trim('MAXLEN', maxlen)
end
return trim('MINID', floor)
