-- Sliding-window counter over N policies, all-or-nothing.
-- The estimate is previous_count * (unelapsed share of the current window) + current_count,
-- with windows aligned to multiples of their length on the server clock.
-- KEYS[i]    hash of policy i: s = current window start (us), c = current count, p = previous count
--            (expires when its current count stops mattering); all KEYS share one hash tag
-- ARGV[1]    cost: units asked for (integer >= 0)
-- ARGV[2]    1 to charge, 0 to only look (peek), 2 to charge and reply with `allowed` alone
-- ARGV[1+2i] policy i: limit
-- ARGV[2+2i] policy i: window in microseconds
-- returns {allowed, then for each policy: fits, remaining, reset_us, retry_us}; `allowed` alone
--   (an integer, not a list) when ARGV[2] is 2
--   allowed    1 when every policy admits the cost (all were charged), else 0 (none was)
--   fits       1 when this policy alone would admit the cost
--   remaining  whole units left after this call
--   reset_us   microseconds until one more unit is available (0 when the quota is full)
--   retry_us   microseconds until this policy would admit the cost (0 when it fits)
-- Clock: Redis TIME only.
-- @include now_us
-- @include limit_reply
local cost = tonumber(ARGV[1])
local charge = ARGV[2] ~= '0'
local brief = ARGV[2] == '2' -- is_allowed: the one integer is the whole reply
local n = #KEYS
local eps = 1e-9

-- microseconds until the estimate falls to `target` or below
local function wait_until(target, est, prev, cur, elapsed, window)
  if est <= target + eps then return 0 end
  local need = est - target
  local left = window - elapsed
  local decay = est - cur -- what the previous window still contributes; it fades over `left`
  if prev > 0 and need <= decay + eps then
    return math.ceil(need * window / prev)
  end
  need = need - decay
  if cur > 0 and need <= cur + eps then
    return math.ceil(left + need * window / cur)
  end
  return math.ceil(left + window)
end

local st, allowed = {}, 1
for i = 1, n do
  local limit = tonumber(ARGV[2 * i + 1])
  local window = tonumber(ARGV[2 * i + 2])
  local start = math.floor(now / window) * window
  local h = redis.call('HMGET', KEYS[i], 's', 'c', 'p')
  local s, cur, prev = tonumber(h[1]), tonumber(h[2]) or 0, tonumber(h[3]) or 0
  if s == nil or s < start - window then
    cur, prev = 0, 0
  elseif s < start then
    prev, cur = cur, 0
  end
  local elapsed = now - start
  local est = prev * (window - elapsed) / window + cur
  st[i] = {limit, window, start, cur, prev, elapsed, est}
  if est + cost > limit + eps then allowed = 0 end
end

local out = {allowed}
for i = 1, n do
  local limit, window, start, cur, prev, elapsed, est = unpack(st[i])
  local fits, retry = 1, 0
  if est + cost > limit + eps then
    fits = 0
    if not brief then retry = wait_until(limit - cost, est, prev, cur, elapsed, window) end
  end
  if allowed == 1 and charge and cost > 0 then
    cur = cur + cost
    est = est + cost
    redis.call('HSET', KEYS[i], 's', string.format('%d', start), 'c', cur, 'p', prev)
    redis.call('PEXPIRE', KEYS[i], string.format('%d', math.ceil((start + 2 * window - now) / 1000)))
  end
  local remaining = math.max(0, math.floor(limit - est + eps))
  local reset = 0
  if remaining < limit and not brief then
    reset = wait_until(limit - remaining - 1, est, prev, cur, elapsed, window)
  end
  add_policy(out, fits, remaining, reset, retry)
end
if brief then return allowed end
return out
