-- wrk script for bench/upstream_run: POST one KServe v2 infer request body, optionally with a
-- Prefer header, and count the answers by status.
--
--   WRK_BODY_FILE=row.json [WRK_PREFER='respond-async, wait=30'] wrk -t2 -c64 -d10s \
--       -s bench/upstream.lua URL
--
-- Every row of the upstream benchmark uses this script (the same client for each), so the
-- per-response hook costs all of them alike. done() prints one machine-readable line:
--
--   WRK_RESULT requests_per_s=R p50_ms=A p99_ms=B requests=N non2xx=M socket_errors=E
--              s200=X s202=Y sother=Z last_other=S
--
-- non2xx: wrk's errors.status (statuses >= 400); s200/s202/sother: every parsed answer by
-- status (sother: anything but 200 and 202, last_other: the last such status, 0 if none).

local path = os.getenv("WRK_BODY_FILE")
if not path then
   error("upstream.lua: set WRK_BODY_FILE")
end
local f = io.open(path, "rb")
if not f then
   error("upstream.lua: cannot open body file " .. path)
end
local body = f:read("*a")
f:close()

wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"
local prefer = os.getenv("WRK_PREFER")
if prefer and prefer ~= "" then
   wrk.headers["Prefer"] = prefer
end

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   s200, s202, sother, last_other = 0, 0, 0, 0
end

function response(status, headers, resp_body)
   if status == 200 then
      s200 = s200 + 1
   elseif status == 202 then
      s202 = s202 + 1
   else
      sother = sother + 1
      last_other = status
   end
end

function done(summary, latency, requests)
   local secs = summary.duration / 1e6
   local e = summary.errors
   local a, b, c, last = 0, 0, 0, 0
   for _, t in ipairs(threads) do
      a = a + t:get("s200")
      b = b + t:get("s202")
      c = c + t:get("sother")
      if t:get("last_other") ~= 0 then
         last = t:get("last_other")
      end
   end
   io.write(string.format(
      "WRK_RESULT requests_per_s=%.1f p50_ms=%.3f p99_ms=%.3f requests=%d non2xx=%d " ..
      "socket_errors=%d s200=%d s202=%d sother=%d last_other=%d\n",
      summary.requests / secs,
      latency:percentile(50) / 1000.0,
      latency:percentile(99) / 1000.0,
      summary.requests,
      e.status,
      e.connect + e.read + e.write + e.timeout,
      a, b, c, last))
end
