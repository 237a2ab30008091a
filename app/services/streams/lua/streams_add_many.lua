-- KEYS[1] stream key
-- ARGV[1] MAXLEN ("" for none), ARGV[2] "1" for an approximate trim (MAXLEN ~)
-- ARGV[3] the payload field name
-- ARGV[4] the number k of extra field/value arguments that follow (0 or an even number;
--         the trace context), ARGV[5 .. 4+k] those arguments
-- ARGV[5+k ..] the payloads, one entry each
-- Appends one entry per payload, in order, exactly as XADD <key> [MAXLEN [~] n] * <field>
-- <payload> <extra fields> would: the trim applies on every append, as with add(). Atomic:
-- either every entry is appended or (the key holds something else than a stream) none is.
-- returns the new entry ids, in order
local stream, maxlen, approx = KEYS[1], ARGV[1], ARGV[2] == '1'
local extra = tonumber(ARGV[4])
local head = {}
if maxlen ~= '' then
  head[#head + 1] = 'MAXLEN'
  if approx then head[#head + 1] = '~' end
  head[#head + 1] = maxlen
end
head[#head + 1] = '*'
head[#head + 1] = ARGV[3]
local payload_at = #head + 1
head[payload_at] = false
for i = 1, extra do
  head[payload_at + i] = ARGV[4 + i]
end
local ids = {}
for i = 5 + extra, #ARGV do
  head[payload_at] = ARGV[i]
  ids[#ids + 1] = redis.call('XADD', stream, unpack(head))
end
return ids
