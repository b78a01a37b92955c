-- wrk script for deploy/loadtest.sh: POST /v1/batch with BATCH ids (ID_PREFIX<n>), counting every
-- status code, and a one-line summary at the end.
local batch = tonumber(os.getenv("BATCH") or "10")
local prefix = os.getenv("ID_PREFIX") or "item-"
local timeout_ms = os.getenv("TIMEOUT_MS")
if timeout_ms == "" then timeout_ms = nil end
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  codes = {}
  counter = 0
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  counter = counter + 1
  local ids = {}
  for i = 1, batch do
    ids[i] = string.format('"%s%d"', prefix, (counter * batch + i) % 100000)
  end
  local body = '{"ids":[' .. table.concat(ids, ",") .. ']'
  if timeout_ms then body = body .. ',"timeout_ms":' .. timeout_ms end
  return wrk.format(nil, nil, nil, body .. '}')
end

function response(status, headers, body)
  codes[status] = (codes[status] or 0) + 1
end

function done(summary, latency, requests)
  local all = {}
  for _, t in ipairs(threads) do
    local c = t:get("codes")
    for k, v in pairs(c) do all[k] = (all[k] or 0) + v end
  end
  local ok = 0
  for k, v in pairs(all) do
    io.write(string.format("status %d: %d\n", k, v))
    if k >= 200 and k < 300 then ok = ok + v end
  end
  local secs = summary.duration / 1e6
  io.write(string.format(
    "LOADTEST batch=%d ok_rps=%.0f fetches_per_s=%.0f p50_ms=%.2f p90_ms=%.2f p99_ms=%.2f errors=%d\n",
    batch, ok / secs, ok * batch / secs, latency:percentile(50) / 1000,
    latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
