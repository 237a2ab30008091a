-- KEYS[1] session record (hash)
-- KEYS[2] tombstone of the id
-- KEYS[3] moved marker of the id (removed: a deleted id is no longer reported as regenerated)
-- ARGV[1] tombstone TTL, ms
-- ARGV[2] expected subject: '' deletes whatever the subject, else only a record with this subject
-- returns {1, subject} when deleted, {0} when there was no record,
--         {-1, subject} when the record belongs to another subject (kept)
local rec = KEYS[1]
redis.call('DEL', KEYS[3])
local subject = redis.call('HGET', rec, 'subject')
if not subject then
  return {0}
end
if ARGV[2] ~= '' and subject ~= ARGV[2] then
  return {-1, subject}
end
redis.call('DEL', rec)
redis.call('SET', KEYS[2], '1', 'PX', ARGV[1])
return {1, subject}
