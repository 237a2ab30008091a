-- KEYS[1..n] tag sets to drain (standalone: every shard of the tags; Cluster: one shard)
-- ARGV[1] budget: the most members to remove in this call
-- ARGV[2..n+1] shard root of each tag set (a member m is the value at root .. ":" .. m)
-- returns {values removed, members left in the sets (non-zero: call again)}
--
-- Atomic for up to ARGV[1] members: no reader sees some values of a tag gone and
-- others still there, and a write that lands after the call is not affected.
-- Beyond the budget the caller drains in further calls, so Redis is never blocked
-- for long by a huge tag. An emptied set disappears (Redis drops empty sets).
local budget = tonumber(ARGV[1])
local removed = 0
for i, tagset in ipairs(KEYS) do
  local root = ARGV[i + 1]
  while budget > 0 do
    local members = redis.call('SPOP', tagset, math.min(budget, 500))
    if #members == 0 then break end
    local keys = {}
    for j, member in ipairs(members) do
      keys[j] = root .. ':' .. member
    end
    removed = removed + redis.call('UNLINK', unpack(keys))
    budget = budget - #members
  end
end
local left = 0
for _, tagset in ipairs(KEYS) do
  left = left + redis.call('SCARD', tagset)
end
return {removed, left}
