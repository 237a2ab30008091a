-- KEYS[1] history stream of the channel (same hash tag as the channel name)
-- ARGV[1] channel name as published on Redis
-- ARGV[2] encoded payload (codec envelope)
-- ARGV[3] approximate history length (XADD MAXLEN ~)
-- ARGV[4] history TTL in milliseconds (refreshed on every publish)
-- ARGV[5] "1" to publish with SPUBLISH (sharded pub/sub on a Cluster), else PUBLISH
-- returns {entry id, number of receivers}; the published frame is "\2" .. id .. "\0" .. payload
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'd', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
local command = 'PUBLISH'
if ARGV[5] == '1' then
  command = 'SPUBLISH'
end
local receivers = redis.call(command, ARGV[1], '\2' .. id .. '\0' .. ARGV[2])
return {id, receivers}
