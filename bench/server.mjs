// @ds3/server throughput on the CPU backend (a benchmark that reports; nothing is asserted).
//   node bench/server.mjs [--model DIR|builtin] [--concurrency 1,16,64] [--max-tokens 32] [--prompt 32] [--requests N] [--threads N]
//                         [--health-streams 500] [--health-interval 50] [--executor worker|thread]
// A real server on 127.0.0.1 (ephemeral port); C streaming clients (keep-alive) each send
// /v1/completions requests back to back (token-id prompts, ignore_eos, fixed max_tokens) until
// the round's request count is reached. Reports requests/s, generated tokens/s (counted from
// the streams' usage), and time to first token / end-to-end latency percentiles.
// Then the liveness round: --health-streams streaming requests at once (one each) while a probe
// sends GET /health on a fresh connection every --health-interval ms (each probe waits for the
// previous one), as a Kubernetes liveness probe would; reports /health latency p50/p99/max. Its
// clients run in a worker thread, as they would in other processes, so the server's event loop
// carries only the server. It ends when the streams do (or after 10 minutes).
// --executor picks DS3.load's executor ("worker", the default, or "thread").
import { request, Agent } from "node:http";
import { availableParallelism, cpus, loadavg } from "node:os";
import { monitorEventLoopDelay } from "node:perf_hooks";
import { parseArgs } from "node:util";
import { fileURLToPath } from "node:url";
import { Worker, isMainThread, parentPort, workerData } from "node:worker_threads";

if (!isMainThread) {
  // the liveness round's clients (see the end of this file)
  parentPort.postMessage(await livenessClients(workerData));
  process.exit(0);
}

const { cpu } = await import("@ds3/backend-cpu");
const { DS3 } = await import("@ds3/core");
const { createServer } = await import("@ds3/server");

const { values } = parseArgs({
  options: {
    model: { type: "string" },
    concurrency: { type: "string", default: "1,16,64" },
    "max-tokens": { type: "string", default: "32" },
    prompt: { type: "string", default: "32" },
    requests: { type: "string" },
    threads: { type: "string" },
    "health-streams": { type: "string", default: "500" },
    "health-interval": { type: "string", default: "50" },
    executor: { type: "string" },
  },
});
const model = values.model === "builtin" ? undefined : (values.model ?? fileURLToPath(new URL("../test/fixtures/tiny-v3", import.meta.url)));
const levels = values.concurrency.split(",").map(Number);
const maxTokens = Number(values["max-tokens"]);
const promptLen = Number(values.prompt);
const threads = values.threads ? Number(values.threads) : undefined;
const healthStreams = Number(values["health-streams"]);
const healthInterval = Number(values["health-interval"]);
if (values.executor !== undefined && values.executor !== "worker" && values.executor !== "thread") throw new Error(`--executor must be worker or thread, got ${values.executor}`);

const ds3 = await DS3.load({
  model,
  backend: cpu,
  ...(threads && { backendOptions: { threads } }),
  ...(values.executor && { executor: values.executor }),
  cacheBlocks: Math.max(512, Math.ceil((healthStreams * (promptLen + maxTokens)) / 64) + 16),
});
const V = ds3.engine.executor.vocabSize;
const srv = createServer({ ds3, apiKeys: [], maxQueue: 4096 });
const { port } = await srv.listen(0, "127.0.0.1");

function pct(xs, p) {
  if (!xs.length) return null;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))];
}

/** One streaming request; resolves with its token count, TTFT and latency (ms). */
function streamOnce(agent, i) {
  return streamRequest({ port, V, promptLen, maxTokens }, agent, i);
}

function streamRequest({ port, V, promptLen, maxTokens }, agent, i) {
  const prompt = Array.from({ length: promptLen }, (_, k) => (i * 7919 + k * 104729) % V);
  const body = JSON.stringify({ prompt, max_tokens: maxTokens, ignore_eos: true, temperature: 0, stream: true, stream_options: { include_usage: true } });
  const t0 = performance.now();
  return new Promise((resolve, reject) => {
    const req = request({ host: "127.0.0.1", port, path: "/v1/completions", method: "POST", agent, headers: { "Content-Type": "application/json" } }, (res) => {
      if (res.statusCode !== 200) return reject(new Error(`HTTP ${res.statusCode}`));
      let buf = "";
      let ttft = null;
      let tokens = 0;
      res.setEncoding("utf8");
      res.on("data", (c) => {
        if (ttft === null) ttft = performance.now() - t0;
        buf += c;
        let k;
        while ((k = buf.indexOf("\n\n")) >= 0) {
          const ev = buf.slice(6, k);
          buf = buf.slice(k + 2);
          if (ev === "[DONE]") continue;
          const j = JSON.parse(ev);
          if (j.usage) tokens = j.usage.completion_tokens;
        }
      });
      res.on("end", () => resolve({ tokens, ttft, e2e: performance.now() - t0 }));
      res.on("error", reject);
    });
    req.on("error", reject);
    req.end(body);
  });
}

const results = {
  machine: `${cpus()[0]?.model} x${availableParallelism()}`,
  // other work on the machine when the bench started (1-minute load average)
  load_average: +loadavg()[0].toFixed(2),
  model: ds3.modelName,
  backend: "cpu",
  executor: values.executor ?? "default (worker at tp 1)",
  prompt_tokens: promptLen,
  max_tokens: maxTokens,
  rounds: [],
};

// warm-up
{
  const agent = new Agent({ keepAlive: true });
  await Promise.all([0, 1, 2, 3].map((i) => streamOnce(agent, i)));
  agent.destroy();
}

for (const C of levels) {
  const total = values.requests ? Number(values.requests) : Math.max(8, C * 3);
  const agent = new Agent({ keepAlive: true, maxSockets: C });
  let next = 0;
  const stats = [];
  const t0 = performance.now();
  await Promise.all(
    Array.from({ length: C }, async () => {
      while (next < total) {
        const i = next++;
        stats.push(await streamOnce(agent, 1000 + i));
      }
    }),
  );
  const sec = (performance.now() - t0) / 1000;
  agent.destroy();
  const tokens = stats.reduce((a, s) => a + s.tokens, 0);
  const round = {
    concurrency: C,
    requests: stats.length,
    seconds: +sec.toFixed(3),
    requests_per_s: +(stats.length / sec).toFixed(2),
    gen_tokens_per_s: +(tokens / sec).toFixed(1),
    ttft_ms_p50: +pct(stats.map((s) => s.ttft), 50).toFixed(1),
    ttft_ms_p95: +pct(stats.map((s) => s.ttft), 95).toFixed(1),
    e2e_ms_p50: +pct(stats.map((s) => s.e2e), 50).toFixed(1),
  };
  results.rounds.push(round);
  console.error(`c=${C}: ${round.requests_per_s} req/s, ${round.gen_tokens_per_s} tok/s, ttft p50 ${round.ttft_ms_p50} ms`);
}

if (healthStreams > 0) {
  // the server's own event-loop delay over the round (what stalls every connection of it)
  const eld = monitorEventLoopDelay({ resolution: 10 });
  eld.enable();
  const w = new Worker(new URL(import.meta.url), { workerData: { port, V, promptLen, maxTokens, streams: healthStreams, interval: healthInterval } });
  const r = await new Promise((resolve, reject) => {
    w.once("message", resolve);
    w.once("error", reject);
    w.once("exit", (code) => reject(new Error(`liveness clients exited (${code})`)));
  });
  eld.disable();
  const { stats, lat, sec } = r;
  const tokens = stats.reduce((a, s) => a + s.tokens, 0);
  const f = (x) => +x.toFixed(1);
  const round = {
    concurrency: healthStreams,
    requests: stats.length,
    seconds: +sec.toFixed(3),
    gen_tokens_per_s: +(tokens / sec).toFixed(1),
    ttft_ms_p50: f(pct(stats.map((s) => s.ttft), 50)),
    e2e_ms_p50: f(pct(stats.map((s) => s.e2e), 50)),
    health_probes: lat.length,
    health_interval_ms: healthInterval,
    health_ms_p50: f(pct(lat, 50)),
    health_ms_p99: f(pct(lat, 99)),
    health_ms_max: f(Math.max(...lat)),
    server_loop_delay_ms_p99: f(eld.percentile(99) / 1e6),
    server_loop_delay_ms_max: f(eld.max / 1e6),
  };
  results.liveness = round;
  console.error(
    `liveness, ${healthStreams} streams: ${round.gen_tokens_per_s} tok/s; /health p50 ${round.health_ms_p50} ms, p99 ${round.health_ms_p99} ms, max ${round.health_ms_max} ms (${lat.length} probes); server loop delay p99 ${round.server_loop_delay_ms_p99} ms, max ${round.server_loop_delay_ms_max} ms`,
  );
}

await srv.close();
await ds3.close();
console.log(JSON.stringify(results, null, 2));

/** One GET /health on a fresh connection; resolves with its latency (ms) or rejects. */
function healthOnce(port) {
  const t0 = performance.now();
  return new Promise((resolve, reject) => {
    const req = request({ host: "127.0.0.1", port, path: "/health", agent: false, timeout: 60_000 }, (res) => {
      res.resume();
      res.on("end", () => (res.statusCode === 200 ? resolve(performance.now() - t0) : reject(new Error(`/health: HTTP ${res.statusCode}`))));
      res.on("error", reject);
    });
    req.on("timeout", () => req.destroy(new Error("/health: no answer in 60 s")));
    req.on("error", reject);
    req.end();
  });
}

/** The liveness round's clients (in a worker thread): `streams` streams at once, /health every `interval` ms. */
async function livenessClients(o) {
  const agent = new Agent({ keepAlive: true, maxSockets: o.streams });
  const lat = [];
  let streaming = true;
  const deadline = performance.now() + 600_000;
  const probe = (async () => {
    while (streaming && performance.now() < deadline) {
      const t = performance.now();
      lat.push(await healthOnce(o.port));
      const wait = o.interval - (performance.now() - t);
      if (wait > 0) await new Promise((r) => setTimeout(r, wait));
    }
  })();
  const t0 = performance.now();
  let timer;
  const stats = await Promise.race([
    Promise.all(Array.from({ length: o.streams }, (_, i) => streamRequest(o, agent, 5000 + i))),
    new Promise((_, rej) => (timer = setTimeout(() => rej(new Error("liveness round: streams did not finish in 10 minutes")), 600_000))),
  ]).finally(() => {
    clearTimeout(timer);
    streaming = false;
  });
  await probe;
  const sec = (performance.now() - t0) / 1000;
  agent.destroy();
  return { stats, lat, sec };
}
