-- wrk script for the benchmark: POST one KServe v2 infer request body.
--
--   WRK_BODY_FILE=build/bench/gen/row.json wrk -t2 -c64 -d10s -s bench/post.lua URL
--
-- The body is read once per thread at load time, so the request stays static
-- (wrk's fast path). done() prints one machine-readable line:
--
--   WRK_RESULT requests_per_s=R p50_ms=A p99_ms=B requests=N non2xx=M socket_errors=E
--
-- non2xx counts HTTP statuses >= 400 (wrk's errors.status).

local path = os.getenv("WRK_BODY_FILE") or "build/bench/gen/row.json"
local f = io.open(path, "rb")
if not f then
   error("post.lua: cannot open body file " .. path .. " (set WRK_BODY_FILE)")
end
local body = f:read("*a")
f:close()

wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"

function done(summary, latency, requests)
   local secs = summary.duration / 1e6
   local e = summary.errors
   io.write(string.format(
      "WRK_RESULT requests_per_s=%.1f p50_ms=%.3f p99_ms=%.3f requests=%d non2xx=%d socket_errors=%d\n",
      summary.requests / secs,
      latency:percentile(50) / 1000.0,
      latency:percentile(99) / 1000.0,
      summary.requests,
      e.status,
      e.connect + e.read + e.write + e.timeout))
end
