-- wrk script: POST /idem with an Idempotency-Key header.
-- wrk ... -s idempotency.lua URL -- fresh <prefix>   a new key per request (claim, run, store)
-- wrk ... -s idempotency.lua URL -- same <key>       one key, stored before the run (replays)
local mode, prefix, counter = "fresh", "k", 0

function init(args)
  mode = args[1] or "fresh"
  prefix = args[2] or tostring(os.time())
end

function request()
  counter = counter + 1
  local key = prefix
  if mode == "fresh" then
    key = prefix .. "-" .. counter
  end
  return wrk.format("POST", nil, {
    ["Content-Type"] = "application/json",
    ["Idempotency-Key"] = key,
  }, '{"amount": 1}')
end
