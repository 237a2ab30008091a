-- KEYS[1] session record (hash)
-- KEYS[2] record to write to: KEYS[1] again, or the new id's record when regenerating
-- KEYS[3] moved marker of the current id (written when regenerating; read: tells "moved")
-- KEYS[4] tombstone of the current id (read only: tells "deleted" from "expired")
-- ARGV[1] mode: 'merge' (per-key check against the version read), 'replace' (data replaced
--         wholesale) or 'keep' (data untouched); both checked against the whole record's version
-- ARGV[2] base version: the version the caller read (merge) or expects; 0 = no check
-- ARGV[3] locked: '' keep, '0' or '1'
-- ARGV[4] subject: '' keep, 's' set to ARGV[5] ('' = no subject)
-- ARGV[5] new subject
-- ARGV[6] regenerating: the subject the caller indexed the new id under ('' = none)
-- ARGV[7] regenerating: moved-marker TTL, ms (0 = no marker)
-- ARGV[8] regenerating: new unique_key
-- ARGV[9] regenerating: new token (unused here: KEYS[2] is its record)
-- ARGV[10] '1' to return the whole record after the write
-- ARGV[11] n = number of data keys set
-- ARGV[12] write nonce: random per write call, the same when the client retries the call
-- ARGV[13 .. 12+2n] name, encoded value pairs to set; the rest: names to delete
-- returns {1, version, modified_at_ms, previous subject[, {field, value, ...}]} when written
--             (or when nothing changed);
--         {0, version, name, ...} on conflict: the names another writer changed since the
--             base version (merge), or {'*'} (replace, keep); nothing written;
--         {-1} when the record is unknown or expired, {-2} when it was deleted,
--         {-5} when the id was regenerated away (a moved id writes nothing, regenerates nothing);
--         {-3, subject} when regenerating and the new id is not indexed under the subject;
--         {-4} when the new id is taken
--
-- Data key <name> lives in field 'd:<name>'; field 'm:<name>' holds the version that last
-- changed it (kept after a delete), which is what the merge check compares with.
--
-- Lost replies: a write that changed the record stores 'w:<nonce>' = '<version>:<modified_at>:
-- <previous subject>' (the last RING writes are kept, listed in 'w_ring'; the fields move with
-- the record on regeneration). A re-run of the same call (the client retrying after the
-- connection broke before the reply arrived) finds its nonce and answers what the first run
-- answered, instead of seeing its own change as someone else's (a false conflict) or its own
-- regeneration as a moved id.
local rec = KEYS[1]
local target = KEYS[2]
local regenerating = target ~= rec
local nonce_field = 'w:' .. ARGV[12]
local RING = 4

-- The answer of a first run of this call, if it already changed the record at *key*.
local function replay(key)
  local done = redis.call('HGET', key, nonce_field)
  if not done then
    return nil
  end
  local v, at, subject = string.match(done, '^(%d+):(%d+):(.*)$')
  if ARGV[10] == '1' then
    return {1, tonumber(v), tonumber(at), subject, redis.call('HGETALL', key)}
  end
  return {1, tonumber(v), tonumber(at), subject}
end

local meta = redis.call('HMGET', rec, 'version', 'expires_at', 'idle_ms', 'subject', 'locked')
if not meta[1] then
  if regenerating then
    local again = replay(target)
    if again then
      return again
    end
  end
  if redis.call('EXISTS', KEYS[4]) == 1 then
    return {-2}
  end
  if redis.call('EXISTS', KEYS[3]) == 1 then
    return {-5}
  end
  return {-1}
end
-- @include now_ms
local left = tonumber(meta[2]) - now
if left <= 0 then
  redis.call('DEL', rec)
  return {-1}
end

local again = replay(rec)
if again then
  return again
end

local version = tonumber(meta[1])
local base = tonumber(ARGV[2])
local n = tonumber(ARGV[11])
local first_del = 13 + 2 * n
local replace = ARGV[1] == 'replace'
local whole = ARGV[1] ~= 'merge'

-- Preconditions first: a script's writes are not rolled back when it returns early.
if base > 0 and version ~= base then
  local bad = {}
  if whole then
    bad[1] = '*'
  else
    for i = 13, first_del - 1, 2 do
      local name = ARGV[i]
      local changed_at = tonumber(redis.call('HGET', rec, 'm:' .. name) or '0')
      if changed_at > base then
        bad[#bad + 1] = name
      end
    end
    for i = first_del, #ARGV do
      local name = ARGV[i]
      local changed_at = tonumber(redis.call('HGET', rec, 'm:' .. name) or '0')
      -- deleting a key someone else already deleted is the same outcome: no conflict
      if changed_at > base and redis.call('HEXISTS', rec, 'd:' .. name) == 1 then
        bad[#bad + 1] = name
      end
    end
  end
  if #bad > 0 then
    table.insert(bad, 1, version)
    table.insert(bad, 1, 0)
    return bad
  end
end

local old_subject = meta[4]
local new_subject = old_subject
if ARGV[4] == 's' then
  new_subject = ARGV[5]
end
if regenerating then
  if new_subject ~= '' and new_subject ~= ARGV[6] then
    return {-3, new_subject}
  end
  if redis.call('EXISTS', target) == 1 then
    return {-4}
  end
end

local next_version = version + 1
local changed = regenerating
local keep = {}
for i = 13, first_del - 1, 2 do
  local field = 'd:' .. ARGV[i]
  keep[field] = true
  if redis.call('HGET', rec, field) ~= ARGV[i + 1] then
    redis.call('HSET', rec, field, ARGV[i + 1], 'm:' .. ARGV[i], next_version)
    changed = true
  end
end
for i = first_del, #ARGV do
  if redis.call('HDEL', rec, 'd:' .. ARGV[i]) == 1 then
    redis.call('HSET', rec, 'm:' .. ARGV[i], next_version)
    changed = true
  end
end
if replace then
  local fields = redis.call('HKEYS', rec)
  for _, field in ipairs(fields) do
    if string.sub(field, 1, 2) == 'd:' and not keep[field] then
      redis.call('HDEL', rec, field)
      redis.call('HSET', rec, 'm:' .. string.sub(field, 3), next_version)
      changed = true
    end
  end
end
if ARGV[3] ~= '' and ARGV[3] ~= meta[5] then
  redis.call('HSET', rec, 'locked', ARGV[3])
  changed = true
end
if new_subject ~= old_subject then
  redis.call('HSET', rec, 'subject', new_subject)
  changed = true
end

local modified_at
if changed then
  redis.call('HSET', rec, 'version', next_version, 'modified_at', now,
    nonce_field, next_version .. ':' .. now .. ':' .. (old_subject or ''))
  local ring = {}
  for seen in string.gmatch(redis.call('HGET', rec, 'w_ring') or '', '%S+') do
    ring[#ring + 1] = seen
  end
  ring[#ring + 1] = ARGV[12]
  while #ring > RING do
    redis.call('HDEL', rec, 'w:' .. table.remove(ring, 1))
  end
  redis.call('HSET', rec, 'w_ring', table.concat(ring, ' '))
  version = next_version
  modified_at = now
else
  modified_at = tonumber(redis.call('HGET', rec, 'modified_at'))
end

if regenerating then
  redis.call('RENAME', rec, target)
  redis.call('HSET', target, 'unique_key', ARGV[8])
  local grace = tonumber(ARGV[7])
  if grace > 0 then
    redis.call('SET', KEYS[3], '1', 'PX', grace)
  end
end
redis.call('PEXPIRE', target, math.min(tonumber(meta[3]), left))
if ARGV[10] == '1' then
  return {1, version, modified_at, old_subject, redis.call('HGETALL', target)}
end
return {1, version, modified_at, old_subject}
