-- wrk script: POST /convo_turn, a new conversation per request (no sessionId).
-- The bearer token comes from the environment (BENCH_TOKEN), set by run.py.
-- With BENCH_GET set it sends plain GETs instead (the ceiling run: GET /system_health).
if os.getenv("BENCH_GET") then
  wrk.method = "GET"
else
  wrk.method = "POST"
  wrk.body = '{"animalId":"cougar","message":"What do cougars eat?"}'
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer " .. (os.getenv("BENCH_TOKEN") or "")
end

-- One machine-readable line after wrk's own report (latency in microseconds).
done = function(summary, latency, requests)
  io.write(string.format(
    "WRKJSON {\"requests\":%d,\"duration_us\":%d,\"bytes\":%d,\"connect\":%d,\"read\":%d,\"write\":%d,\"status\":%d,\"timeout\":%d,\"p50\":%d,\"p90\":%d,\"p99\":%d,\"p999\":%d,\"mean\":%.1f,\"max\":%d}\n",
    summary.requests, summary.duration, summary.bytes,
    summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.status, summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.mean, latency.max))
end
