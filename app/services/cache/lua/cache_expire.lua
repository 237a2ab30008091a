-- KEYS[1] value key
-- KEYS[2..] tag sets of the value (as the caller believes them to be)
-- ARGV[1] new fresh lifetime in ms ("0": persist)
-- ARGV[2] the tag field the caller expects in the entry's header ("" for none)
-- ARGV[3] invalidation channel ("": do not publish)
-- ARGV[4] invalidation message
-- ARGV[5] tag member: the value key's suffix after "<shard root>:"
-- returns {0} the value is missing
--         {1} done
--         {2, tags} the entry's tags differ from ARGV[2]: call again with these
--
-- The entry's physical lifetime becomes ARGV[1] plus its stale window (from the
-- header), and every tag set of the entry lives at least as long, so changing a
-- TTL can never orphan a key from its tags.
local entry = redis.call('GET', KEYS[1])
if not entry then
  return {0}
end
local stale, tags = 0, ''
if string.byte(entry, 1) == 2 then
  local s, _, t = string.match(entry, '^\2(%d+)|(%d+)|([^|]*)|')
  if s then
    stale, tags = tonumber(s), t
  end
end
if tags ~= ARGV[2] then
  return {2, tags}
end
local fresh = tonumber(ARGV[1])
if fresh == 0 then
  redis.call('PERSIST', KEYS[1])
else
  redis.call('PEXPIRE', KEYS[1], fresh + stale)
end
for i = 2, #KEYS do
  local existed = redis.call('EXISTS', KEYS[i]) == 1
  redis.call('SADD', KEYS[i], ARGV[5])
  local left = existed and redis.call('PTTL', KEYS[i]) or 0
  if fresh == 0 then
    if left ~= -1 then redis.call('PERSIST', KEYS[i]) end
  elseif left ~= -1 and left < fresh + stale then
    redis.call('PEXPIRE', KEYS[i], fresh + stale)
  end
end
if ARGV[3] ~= '' then
  redis.call('PUBLISH', ARGV[3], ARGV[4])
end
return {1}
