-- wrk script: GET a rotating list of paths, optionally with an Authorization header.
--   wrk ... -s wrk_paths.lua URL -- PATHS_FILE [AUTHORIZATION_VALUE]
-- PATHS_FILE holds one request path per line. Each wrk thread starts at a
-- different point of the list so threads do not march in lockstep.
-- done() prints one line "BENCH_JSON {...}" with exact figures (latencies in
-- microseconds) so the runner does not parse wrk's human-readable report.

local requests = {}
local position = 0
local thread_count = 0

function setup(thread)
  thread:set("thread_index", thread_count)
  thread_count = thread_count + 1
end

function init(args)
  local headers = {}
  if args[2] and args[2] ~= "" then
    headers["Authorization"] = args[2]
  end
  for line in io.lines(args[1]) do
    if line ~= "" then
      requests[#requests + 1] = wrk.format("GET", line, headers)
    end
  end
  if #requests == 0 then
    error("no paths in " .. args[1])
  end
  position = ((thread_index or 0) * 7919) % #requests
end

function request()
  position = position % #requests + 1
  return requests[position]
end

function done(summary, latency, _)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"p50_us": %d, "p99_us": %d, "mean_us": %.1f, "max_us": %d, ' ..
    '"errors_status": %d, "errors_connect": %d, "errors_read": %d, ' ..
    '"errors_write": %d, "errors_timeout": %d}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(99), latency.mean, latency.max,
    e.status, e.connect, e.read, e.write, e.timeout))
end
