// Closed-loop load on Restate's ingress: `concurrency` callers, each invoking the handler and
// waiting for its result before the next, for a warm-up and then a measured window. Prints one
// JSON object with runs/s and client-observed latencies at concurrency 1 and 64.
//
//   node load.mjs URL SECONDS [key=value ...]   (extra key=values are copied into the output)

const [url, secondsArg, ...extra] = process.argv.slice(2);
const seconds = Number(secondsArg ?? 20);

async function invoke() {
  const response = await fetch(url, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: "{}",
  });
  const body = await response.text();
  if (!response.ok) throw new Error(`${response.status}: ${body}`);
}

function percentile(sorted, q) {
  if (sorted.length === 0) return 0;
  const rank = Math.min(sorted.length, Math.max(1, Math.ceil(q * sorted.length)));
  return sorted[rank - 1];
}

async function measure(concurrency) {
  const warmup = (seconds * 1000) / 5;
  const start = performance.now() + warmup;
  const end = start + seconds * 1000;
  const latencies = [];
  let done = 0;
  let failed = 0;
  const worker = async () => {
    while (performance.now() < end) {
      const t = performance.now();
      try {
        await invoke();
      } catch (e) {
        failed += 1;
        if (failed < 3) console.error(`invocation failed: ${e}`);
        continue;
      }
      const now = performance.now();
      if (now > start && now <= end) done += 1;
      if (t >= start && t < end) latencies.push(now - t);
    }
  };
  await Promise.all(Array.from({ length: concurrency }, worker));
  latencies.sort((a, b) => a - b);
  return {
    runs_per_s: done / seconds,
    p50_ms: percentile(latencies, 0.5),
    p99_ms: percentile(latencies, 0.99),
    failed,
  };
}

const c1 = await measure(1);
const c64 = await measure(64);
const out = {
  seconds,
  runs_per_s_c1: c1.runs_per_s,
  p50_ms_c1: c1.p50_ms,
  p99_ms_c1: c1.p99_ms,
  runs_per_s_c64: c64.runs_per_s,
  p50_ms_c64: c64.p50_ms,
  p99_ms_c64: c64.p99_ms,
  failed: c1.failed + c64.failed,
};
for (const kv of extra) {
  const i = kv.indexOf("=");
  out[kv.slice(0, i)] = kv.slice(i + 1);
}
console.log(JSON.stringify(out));
