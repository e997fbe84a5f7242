// @ds3/server throughput on the CPU backend (a benchmark that reports; nothing is asserted).
//   node bench/server.mjs [--model DIR|builtin] [--concurrency 1,16,64] [--max-tokens 32] [--prompt 32] [--requests N] [--threads N]
// A real server on 127.0.0.1 (ephemeral port); C streaming clients (keep-alive) each send
// /v1/completions requests back to back (token-id prompts, ignore_eos, fixed max_tokens) until
// the round's request count is reached. Reports requests/s, generated tokens/s (counted from
// the streams' usage), and time to first token / end-to-end latency percentiles.
import { request, Agent } from "node:http";
import { availableParallelism, cpus } from "node:os";
import { parseArgs } from "node:util";
import { fileURLToPath } from "node:url";
import { cpu } from "@ds3/backend-cpu";
import { DS3 } from "@ds3/core";
import { createServer } from "@ds3/server";

const { values } = parseArgs({
  options: {
    model: { type: "string" },
    concurrency: { type: "string", default: "1,16,64" },
    "max-tokens": { type: "string", default: "32" },
    prompt: { type: "string", default: "32" },
    requests: { type: "string" },
    threads: { type: "string" },
  },
});
const model = values.model === "builtin" ? undefined : (values.model ?? fileURLToPath(new URL("../test/fixtures/tiny-v3", import.meta.url)));
const levels = values.concurrency.split(",").map(Number);
const maxTokens = Number(values["max-tokens"]);
const promptLen = Number(values.prompt);
const threads = values.threads ? Number(values.threads) : undefined;

const ds3 = await DS3.load({ model, backend: cpu, ...(threads && { backendOptions: { threads } }), cacheBlocks: 512 });
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
  model: ds3.modelName,
  backend: "cpu",
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

await srv.close();
await ds3.close();
console.log(JSON.stringify(results, null, 2));
