-- Fragment limit_reply: one policy's part of a rate limiter's reply
-- ({allowed, then for each policy: fits, remaining, reset_us, retry_us}).
-- expects: nothing
-- defines: local function add_policy(out, fits, remaining, reset_us, retry_us): appends the four
--          integers to the list out; a remaining below 0 is reported as 0
local function add_policy(out, fits, remaining, reset_us, retry_us)
  if remaining < 0 then remaining = 0 end
  out[#out + 1] = fits
  out[#out + 1] = remaining
  out[#out + 1] = reset_us
  out[#out + 1] = retry_us
end
