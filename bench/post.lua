-- wrk script for bench/run.py: a ~300-byte JSON POST (a LiteLLM re-rank call), and one machine-readable line.
-- BENCH_KEY in the environment adds `Authorization: Bearer <key>` (the `auth: true` route).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json"
wrk.body = '{"model":"rerank-english-v3.0","query":"What is the capital of the United States?","top_n":3,'
  .. '"documents":["Carson City is the capital city of the American state of Nevada.",'
  .. '"Washington, D.C. is the capital of the United States.","Capital punishment has existed in the US."],"return_documents":false}'

local key = os.getenv("BENCH_KEY")
if key ~= nil and key ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. key
end

-- One JSON line bench/load.py parses instead of wrk's human summary; latencies in microseconds.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,"status":%d,'
      .. '"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
