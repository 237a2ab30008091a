-- GCRA (generic cell rate algorithm) over N policies, all-or-nothing.
-- KEYS[i]      theoretical arrival time (TAT) of policy i, microseconds; all KEYS share one hash tag
-- ARGV[1]      cost: units asked for (integer >= 0)
-- ARGV[2]      1 to charge, 0 to only look (peek), 2 to charge and reply with `allowed` alone
-- ARGV[1+2i]   policy i: emission interval in whole microseconds (window / limit, at least 1)
-- ARGV[2+2i]   policy i: burst tolerance in microseconds (interval * burst)
-- returns {allowed, then for each policy: fits, remaining, reset_us, retry_us}; `allowed` alone
--   (an integer, not a list) when ARGV[2] is 2
--   allowed    1 when every policy admits the cost (all were charged), else 0 (none was)
--   fits       1 when this policy alone would admit the cost
--   remaining  whole units left after this call
--   reset_us   microseconds until one more unit is available (0 when the quota is full)
--   retry_us   microseconds until this policy would admit the cost (0 when it fits)
-- Clock: Redis TIME only. All arithmetic is on whole microseconds (exact in doubles).
-- Each written key expires when its TAT is reached, i.e. when the quota is full again.
-- @include now_us
-- @include limit_reply
local cost = tonumber(ARGV[1])
local charge = ARGV[2] ~= '0'
local brief = ARGV[2] == '2' -- is_allowed: the one integer is the whole reply
local n = #KEYS

local stored = redis.call('MGET', unpack(KEYS))
local tats, news, allowed = {}, {}, 1
for i = 1, n do
  local interval = tonumber(ARGV[2 * i + 1])
  local tolerance = tonumber(ARGV[2 * i + 2])
  local tat = tonumber(stored[i] or now)
  if tat < now then tat = now end
  tats[i] = tat
  news[i] = tat + cost * interval
  if news[i] - now > tolerance then allowed = 0 end
end

local charged = allowed == 1 and charge and cost > 0
if charged then
  for i = 1, n do
    redis.call('SET', KEYS[i], string.format('%d', news[i]),
      'PX', string.format('%d', math.ceil((news[i] - now) / 1000)))
  end
end
if brief then return allowed end

local out = {allowed}
for i = 1, n do
  local interval = tonumber(ARGV[2 * i + 1])
  local tolerance = tonumber(ARGV[2 * i + 2])
  local fits, retry = 1, 0
  if news[i] - now > tolerance then
    fits = 0
    retry = news[i] - tolerance - now
  end
  local stand = tats[i]
  if charged then stand = news[i] end
  local free = tolerance - (stand - now)
  local remaining = math.max(0, math.floor(free / interval))
  local reset = 0
  if stand > now then reset = (remaining + 1) * interval - free end
  add_policy(out, fits, remaining, reset, retry)
end
return out
