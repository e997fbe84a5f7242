// The event loop stays free while the model runs (issue 10): at tp 1, DS3.load runs the model in
// a worker thread by default, so a real server on 127.0.0.1 answers GET /health while a step is
// blocked. The backend here (helpers/slow-backend.mjs) is the CPU backend with one op that blocks
// its thread synchronously for 1.5 s in steps that contain a marker token: in the calling thread
// (executor "thread") that stalls /health until the step ends; in the worker it must not.
// And the engine's own host work after a step (sampling, logits processors) is cut into slices
// between which the event loop runs, however much of it a big batch brings.
import { DS3, Engine, LocalExecutor, RankExecutor } from "@ds3/core";
import { createServer, type Ds3Server } from "@ds3/server";
import { request } from "node:http";
import { fileURLToPath } from "node:url";
import { afterEach, describe, expect, it } from "vitest";
// @ts-expect-error plain ESM helper without types (worker ranks import it by path)
import { BLOCK_CHANNEL, BLOCK_MS, SLOW_TOKEN, slowCpu } from "./helpers/slow-backend.mjs";

const DIR = fileURLToPath(new URL("./fixtures/tiny-v3/", import.meta.url));

function http(port: number, method: string, path: string, body?: unknown): Promise<{ status: number; body: string; at: number }> {
  return new Promise((resolve, reject) => {
    const data = body === undefined ? undefined : JSON.stringify(body);
    const req = request({ host: "127.0.0.1", port, path, method, agent: false, headers: data ? { "Content-Type": "application/json" } : {} }, (res) => {
      let s = "";
      res.setEncoding("utf8");
      res.on("data", (c: string) => (s += c));
      res.on("end", () => resolve({ status: res.statusCode!, body: s, at: performance.now() }));
      res.on("error", reject);
    });
    req.on("error", reject);
    req.end(data);
  });
}

let ds3: DS3 | null = null;
let srv: Ds3Server | null = null;
afterEach(async () => {
  await srv?.close();
  await ds3?.close();
  srv = ds3 = null;
});

/** Start a completion whose prefill step blocks, probe /health while it runs. */
async function probeDuringBlockedStep(executor?: "worker" | "thread") {
  ds3 = await DS3.load({ model: DIR, backend: slowCpu, ...(executor && { executor }), cacheBlocks: 16 });
  srv = createServer({ ds3, apiKeys: [] });
  const { port } = await srv.listen(0, "127.0.0.1");
  // the server answers before any step runs
  expect((await http(port, "GET", "/health")).status).toBe(200);
  // what happened in which order: the blocking op's "start"/"end" (as this thread receives them)
  // and the /health answer
  const order: string[] = [];
  const ch = new BroadcastChannel(BLOCK_CHANNEL);
  ch.onmessage = (e) => order.push(`block ${(e as MessageEvent).data}`);
  const started = new Promise<void>((r) => ch.addEventListener("message", (e) => (e as MessageEvent).data === "start" && r()));
  try {
    const t0 = performance.now();
    const completion = http(port, "POST", "/v1/completions", { prompt: [5, SLOW_TOKEN, 9], max_tokens: 1, temperature: 0 });
    // the step is blocked by now; a blocked loop also delays this timer: latency counts from when it was due
    await new Promise((r) => setTimeout(r, 300));
    const health = await http(port, "GET", "/health");
    order.push("health");
    const done = await completion;
    await started;
    // the "end" message is posted right after the block; let it arrive
    for (let i = 0; i < 100 && !order.includes("block end"); i++) await new Promise((r) => setTimeout(r, 10));
    return { executor: ds3.executor, health, healthMs: health.at - (t0 + 300), done, completionMs: done.at - t0, order };
  } finally {
    ch.close();
  }
}

describe("the HTTP event loop while a step runs", () => {
  it("answers /health during a blocked step when the model runs in its worker (the default at tp 1)", async () => {
    const r = await probeDuringBlockedStep();
    expect(r.done.status).toBe(200);
    expect(JSON.parse(r.done.body).usage.completion_tokens).toBe(1);
    // the step really blocked for BLOCK_MS ...
    expect(r.completionMs).toBeGreaterThanOrEqual(BLOCK_MS - 50);
    // ... and /health answered while it did: after the op began blocking, before it ended
    expect(r.health.status).toBe(200);
    expect(r.order).toEqual(["block start", "health", "block end"]);
    expect(r.health.at).toBeLessThan(r.done.at);
    expect(r.executor).toBeInstanceOf(RankExecutor);
  });

  it('with executor "thread" the same step holds /health until it ends (what the worker avoids)', async () => {
    const r = await probeDuringBlockedStep("thread");
    expect(r.executor).toBeInstanceOf(LocalExecutor);
    expect(r.done.status).toBe(200);
    expect(r.health.status).toBe(200);
    expect(r.healthMs).toBeGreaterThan(BLOCK_MS - 300 - 200);
  });
});

describe("the engine's host work after a step", () => {
  it("lets the event loop run between sequences: 10 logits processors of 50 ms each never hold it for the whole 500 ms", async () => {
    const ex = await RankExecutor.create(DIR, { backendPackage: "@ds3/backend-cpu", cache: { numBlocks: 16, blockSize: 64, dtype: "f32" }, worldSize: 1 });
    try {
      const engine = new Engine({ executor: ex, eosIds: [], prefixCaching: false });
      const prompts = Array.from({ length: 10 }, (_, i) => [3 + i, 40 + i, 90 + i]);
      const run = (busyMs: number) =>
        Promise.all(
          prompts.map(async (promptIds) => {
            const ids: number[] = [];
            const logitsProcessor = () => {
              const t = performance.now();
              while (performance.now() - t < busyMs); // a slow constraint (e.g. a big grammar)
              untilTick++;
              worst = Math.max(worst, untilTick);
            };
            for await (const ev of engine.generate({ promptIds, sampling: { maxTokens: 3, temperature: 0, ignoreEos: true }, logitsProcessor })) ids.push(...ev.ids);
            return ids;
          }),
        );
      let untilTick = 0; // processor calls since the event loop last ran a timer
      let worst = 0;
      const plain = await run(0);
      // while the slow run goes: the most processor calls in a row with no timer tick between them
      const tick = setInterval(() => (untilTick = 0), 1);
      untilTick = worst = 0;
      const slow = await run(50);
      clearInterval(tick);
      expect(slow).toEqual(plain); // same tokens, the processors only took time
      expect(engine.stats().steps).toBeGreaterThanOrEqual(6); // 3 steps per run, all 10 sequences in each
      // every step held 10 x 50 ms of host work; the loop ran timers after each sequence's (one
      // more allowed where a step's first processor follows a worker reply within the timer's 1 ms)
      expect(worst).toBeLessThanOrEqual(2);
    } finally {
      await ex.close();
    }
  });
});
