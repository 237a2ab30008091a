-- KEYS[1] value key
-- returns {stored entry or nil, PTTL of the value in ms (-2 missing, -1 no expiry)}
--
-- One round trip for readers that need the remaining lifetime (stale-while-
-- revalidate, early refresh, the local tier). Freshness is judged from Redis'
-- own clock: an entry is fresh while its PTTL exceeds its stale window.
return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}
