-- KEYS[1..n] value keys (all with the same hash tag)
-- ARGV[1] invalidation channel ("": do not publish)
-- ARGV[2] invalidation message
-- returns the number of keys removed
--
-- Tag memberships of removed keys are left to the tag sets' pruning (and an
-- invalidation of such a tag only removes keys that are already gone).
local removed = redis.call('UNLINK', unpack(KEYS))
if ARGV[1] ~= '' then
  redis.call('PUBLISH', ARGV[1], ARGV[2])
end
return removed
