// Parallel ranks (issue 4): RankExecutor runs N ranks of tiny-v3 in worker threads, each with
// its slice of the weights and the shared-memory collective; the results must match one rank
// (LocalExecutor) and the golden reference, and a failing rank must fail the step cleanly.
import { cpu } from "@ds3/backend-cpu";
import { type CacheSpec, Checkpoint, type CollectiveBuffers, DS3, Engine, type Executor, LocalExecutor, RankError, RankExecutor, type SamplingParams, SharedCollective, type StepInput } from "@ds3/core";
import { cpSync, mkdtempSync, readFileSync, rmSync, statSync, truncateSync } from "node:fs";
import { tmpdir } from "node:os";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { BroadcastChannel, Worker } from "node:worker_threads";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
// @ts-expect-error plain ESM helper without types (worker ranks import it by path)
import { SAMPLE_CHANNEL } from "./helpers/sampling-backend.mjs";

const DIR = fileURLToPath(new URL("./fixtures/tiny-v3/", import.meta.url));
const BACKEND = "@ds3/backend-cpu";
const CACHE: CacheSpec = { numBlocks: 16, blockSize: 64, dtype: "f32" };
const MAX_BLOCKS = 8;

interface Prompt {
  ids: number[];
  logits: Float32Array;
  greedy: number[];
  mtp: Float32Array | null;
}
interface RawPrompt {
  ids: number[];
  logits_offset: number;
  logits_shape: [number, number];
  greedy: number[];
  mtp_logits_offset?: number;
  mtp_logits_shape?: [number, number];
}

function loadGolden(): { vocab: number; prompts: Prompt[] } {
  const g = JSON.parse(readFileSync(join(DIR, "golden.json"), "utf8")) as { prompts: RawPrompt[] };
  const buf = readFileSync(join(DIR, "golden.f32"));
  const f32 = new Float32Array(buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength));
  // logits_offset is a BYTE offset into golden.f32
  const view = (off: number, [r, c]: [number, number]) => f32.slice(off / 4, off / 4 + r * c);
  const prompts = g.prompts.map((p) => ({
    ids: p.ids,
    logits: view(p.logits_offset, p.logits_shape),
    greedy: p.greedy,
    mtp: p.mtp_logits_offset !== undefined && p.mtp_logits_shape ? view(p.mtp_logits_offset, p.mtp_logits_shape) : null,
  }));
  return { vocab: g.prompts[0]!.logits_shape[1], prompts };
}

const range = (n: number, from = 0) => Int32Array.from({ length: n }, (_, i) => from + i);

/** One sequence of tokens at positions start.., blocks 0..MAX_BLOCKS-1, logits for `rows` (default: all). */
function seqStep(ids: number[], start = 0, rows?: number[]): StepInput {
  const L = ids.length;
  return {
    ids: Int32Array.from(ids),
    positions: range(L, start),
    seqIdx: new Int32Array(L),
    blockTables: range(MAX_BLOCKS),
    maxBlocks: MAX_BLOCKS,
    logitRows: rows ? Int32Array.from(rows) : range(L),
  };
}

function maxAbsDiff(a: Float32Array, b: Float32Array): number {
  expect(a.length).toBe(b.length);
  let d = 0;
  for (let i = 0; i < a.length; i++) d = Math.max(d, Math.abs(a[i]! - b[i]!));
  return d;
}

function argmax(x: Float32Array): number {
  let best = 0;
  for (let i = 1; i < x.length; i++) if (x[i]! > x[best]!) best = i;
  return best;
}

interface Exec {
  step(s: StepInput): Promise<Float32Array>;
}

/** Prefill, then decode token by token through step(): the greedy continuation. */
async function greedy(ex: Exec, prompt: number[], n: number): Promise<number[]> {
  const L = prompt.length;
  let logits = await ex.step(seqStep(prompt, 0, [L - 1]));
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    out.push(argmax(logits));
    if (i + 1 < n) logits = await ex.step(seqStep([out[i]!], L + i, [0]));
  }
  return out;
}

function rankExecutor(worldSize: number, extra: Partial<Parameters<typeof RankExecutor.create>[1]> = {}) {
  return RankExecutor.create(DIR, { backendPackage: BACKEND, cache: CACHE, mtp: true, worldSize, threadsPerRank: 1, ...extra });
}

const g = loadGolden();

describe("RankExecutor on tiny-v3 (CPU backend, shared-memory collective)", () => {
  let local: LocalExecutor;
  let ws2: RankExecutor;
  let ws4: RankExecutor;
  beforeAll(async () => {
    local = new LocalExecutor(DIR, { backend: cpu, backendOptions: { threads: 1 }, cache: CACHE, mtp: true });
    // ws 2 with a small collective chunk, so all-reduce and all-gather go through in many chunks
    ws2 = await rankExecutor(2, { collectiveChunk: 1000 });
    ws4 = await rankExecutor(4);
  });
  afterAll(async () => {
    await ws2?.close();
    await ws4?.close();
    await local?.close();
  });

  it("describes itself like an executor", () => {
    for (const [ex, ws] of [[ws2, 2], [ws4, 4]] as const) {
      expect(ex.worldSize).toBe(ws);
      expect(ex.backendName).toBe("cpu");
      expect(ex.hasMtp).toBe(true);
      expect(ex.vocabSize).toBe(g.vocab);
      expect(ex.config.nHeads).toBe(4);
      expect(ex.cache).toEqual(CACHE);
    }
  });

  it("world size 2 and 4 give the logits of world size 1 (1e-4) and of the golden reference (1e-3) at every position", async () => {
    expect(g.prompts.map((p) => p.ids.length)).toEqual([1, 7, 40, 300]);
    for (const p of g.prompts) {
      const ref = await local.step(seqStep(p.ids));
      expect(ref.length).toBe(p.ids.length * g.vocab);
      expect(maxAbsDiff(ref, p.logits)).toBeLessThan(1e-3);
      for (const ex of [ws2, ws4]) {
        const got = await ex.step(seqStep(p.ids));
        expect(got.length).toBe(ref.length);
        expect(maxAbsDiff(got, ref), `ws ${ex.worldSize}, ${p.ids.length} tokens`).toBeLessThan(1e-4);
        expect(maxAbsDiff(got, p.logits), `ws ${ex.worldSize}, ${p.ids.length} tokens vs golden`).toBeLessThan(1e-3);
      }
    }
  });

  it("only the rows asked for come back, and the latent cache (rank 0) matches world size 1", async () => {
    const p = g.prompts[2]!; // 40 tokens
    const rows = [39, 0, 17];
    const ref = await local.step(seqStep(p.ids, 0, rows));
    const got = await ws4.step(seqStep(p.ids, 0, rows));
    expect(got.length).toBe(rows.length * g.vocab);
    expect(maxAbsDiff(got, ref)).toBeLessThan(1e-4);
    const none = await ws2.step(seqStep(p.ids, 0, []));
    expect(none.length).toBe(0);
    for (const layer of [0, 3]) {
      const a = await local.readCache(layer, 0, 40);
      const b = await ws2.readCache(layer, 0, 40);
      expect(b.length).toBe(a.length);
      expect(a.length).toBeGreaterThan(0);
      expect(maxAbsDiff(b, a)).toBeLessThan(1e-4);
    }
  });

  it("greedy decoding (prefill, then token by token through step()) gives the same ids at world size 1, 2 and 4", async () => {
    for (const p of g.prompts.slice(0, 3)) {
      const n = 12;
      const a = await greedy(local, p.ids, n);
      const b = await greedy(ws2, p.ids, n);
      const c = await greedy(ws4, p.ids, n);
      expect(b).toEqual(a);
      expect(c).toEqual(a);
      expect(a).toEqual(p.greedy.slice(0, n));
    }
  });

  it("MTP logits at world size 2 match world size 1 (1e-4) and the golden reference (1e-3)", async () => {
    for (const p of g.prompts.filter((q) => q.mtp && q.ids.length <= 40)) {
      const L = p.ids.length;
      const n = L - 1;
      const mtpIn = {
        rows: range(n),
        nextIds: Int32Array.from(p.ids.slice(1)),
        positions: range(n),
        seqIdx: new Int32Array(n),
        blockTables: range(MAX_BLOCKS),
        maxBlocks: MAX_BLOCKS,
        logitRows: range(n),
      };
      await local.step(seqStep(p.ids));
      const ref = await local.mtp(mtpIn);
      await ws2.step(seqStep(p.ids));
      const got = await ws2.mtp(mtpIn);
      expect(got.length).toBe(n * g.vocab);
      expect(maxAbsDiff(got, ref)).toBeLessThan(1e-4);
      expect(maxAbsDiff(got, p.mtp!)).toBeLessThan(1e-3);
    }
  });
});

// World size 1 in a worker is what DS3.load runs at tp 1 (issue 10): it must be the in-thread
// executor in every respect, including device sampling for backends that have it. The sampling
// backend (helpers/sampling-backend.mjs) is the CPU backend plus a `sample` op computed with
// core's Sampler on the downloaded logits, so the host sampler is the independent reference.
const SAMPLING_BACKEND = fileURLToPath(new URL("./helpers/sampling-backend.mjs", import.meta.url));

async function runAll(ex: Executor, reqs: Array<{ ids: number[]; sampling: SamplingParams }>, deviceSampling = true) {
  const e = new Engine({ executor: ex, eosIds: [], prefixCaching: false, deviceSampling });
  const outs = await Promise.all(
    reqs.map(async (r) => {
      const ids: number[] = [];
      const logprobs: number[] = [];
      for await (const ev of e.generate({ promptIds: r.ids, sampling: r.sampling })) {
        ids.push(...ev.ids);
        logprobs.push(...ev.samples.map((s) => s.logprob));
      }
      return { ids, logprobs };
    }),
  );
  return { outs, stats: e.stats() };
}

describe("RankExecutor at world size 1 (what DS3.load runs at tp 1), and device sampling through the workers", () => {
  let local: LocalExecutor;
  beforeAll(() => {
    local = new LocalExecutor(DIR, { backend: cpu, backendOptions: { threads: 1 }, cache: CACHE, mtp: true });
  });
  afterAll(async () => {
    await local?.close();
  });

  it("one rank in a worker gives the in-thread logits bit for bit, its MTP logits and cache too", async () => {
    const ws1 = await rankExecutor(1);
    try {
      expect(ws1.worldSize).toBe(1);
      expect(ws1.backendSamples).toBe(false); // the CPU backend has no `sample`
      for (const p of g.prompts) {
        const ref = await local.step(seqStep(p.ids));
        const got = await ws1.step(seqStep(p.ids));
        expect(maxAbsDiff(got, ref), `${p.ids.length} tokens`).toBe(0);
        expect(maxAbsDiff(got, p.logits)).toBeLessThan(1e-3);
      }
      const p = g.prompts[2]!;
      const n = p.ids.length - 1;
      const mtpIn = { ...seqStep(p.ids.slice(0, n)), rows: range(n), nextIds: Int32Array.from(p.ids.slice(1)) };
      await local.step(seqStep(p.ids));
      await ws1.step(seqStep(p.ids));
      expect(maxAbsDiff(await ws1.mtp(mtpIn), await local.mtp(mtpIn))).toBe(0);
      expect(maxAbsDiff(await ws1.readCache(2, 0, 40), await local.readCache(2, 0, 40))).toBe(0);
      expect(await greedy(ws1, p.ids, 8)).toEqual(p.greedy.slice(0, 8));
    } finally {
      await ws1.close();
    }
  });

  it("stepSampled at world size 1 and 2, with the backend's `sample` and without: the workers sample what host sampling gives", async () => {
    const reqs = [
      { ids: g.prompts[1]!.ids, sampling: { maxTokens: 10, temperature: 0, ignoreEos: true } },
      { ids: g.prompts[2]!.ids, sampling: { maxTokens: 10, temperature: 0.9, seed: 7, ignoreEos: true } },
      { ids: g.prompts[0]!.ids, sampling: { maxTokens: 10, temperature: 1.2, topK: 40, topP: 0.9, seed: 11, ignoreEos: true } },
      { ids: g.prompts[1]!.ids.slice(0, 4), sampling: { maxTokens: 10, temperature: 0.7, minP: 0.05, seed: 3, ignoreEos: true } },
    ];
    const ref = await runAll(local, reqs, false);
    expect(ref.stats.deviceSampledSteps).toBe(0);
    // an independent check of the reference: the greedy row is the golden continuation
    expect(ref.outs[0]!.ids).toEqual(g.prompts[1]!.greedy.slice(0, 10));
    // calls of the test backend's `sample` op, from any thread
    let deviceRows = 0;
    const channel = new BroadcastChannel(SAMPLE_CHANNEL);
    channel.onmessage = (m: unknown) => (deviceRows += (m as { data: number }).data);
    try {
      for (const [backendPackage, device] of [[SAMPLING_BACKEND, true], [BACKEND, false]] as const)
        for (const ws of [1, 2]) {
          const ex = await rankExecutor(ws, { backendPackage, mtp: false });
          const what = `${device ? "sample op" : "rank 0's RowSampler"}, ws ${ws}`;
          try {
            expect(ex.canSampleOnDevice).toBe(true);
            expect(ex.backendSamples).toBe(device);
            deviceRows = 0;
            const got = await runAll(ex, reqs);
            // every step was sampled in the workers: only ids and logprobs crossed back
            expect(got.stats.deviceSampledSteps, what).toBe(got.stats.steps);
            expect(got.stats.steps).toBeGreaterThanOrEqual(10);
            for (const [i, o] of got.outs.entries()) {
              expect(o.ids, `${what}, request ${i}`).toEqual(ref.outs[i]!.ids);
              expect(o.logprobs.length).toBe(10);
              for (const [j, lp] of o.logprobs.entries()) expect(Math.abs(lp - ref.outs[i]!.logprobs[j]!)).toBeLessThan(1e-4);
            }
            await new Promise((r) => setTimeout(r, 50)); // let the last announcements arrive
            // the device op ran (on every rank alike) exactly when the backend has one
            if (device) expect(deviceRows, what).toBe(ws * 40);
            else expect(deviceRows, what).toBe(0);
          } finally {
            await ex.close();
          }
        }
    } finally {
      channel.close();
    }
  });

  it("DS3.load at tp 1 runs the model in a worker by default, reports weight progress from it, and keeps the in-thread option", async () => {
    const ck = Checkpoint.open(DIR);
    const total = ck.names().reduce((a, n) => a + ck.info(n).nbytes, 0);
    ck.close();
    const finals: Array<[number, number]> = [];
    for (const executor of [undefined, "thread"] as const) {
      const calls: Array<[number, number]> = [];
      const ds3 = await DS3.load({ model: DIR, backend: cpu, ...(executor && { executor }), cacheBlocks: 16, onWeights: (d, t) => calls.push([d, t]) });
      try {
        expect(ds3.executor).toBeInstanceOf(executor ? LocalExecutor : RankExecutor);
        expect(calls.length).toBeGreaterThan(0);
        // the MTP block is not loaded (no speculative decoding): every tensor but its own is read
        expect(calls.at(-1)![1]).toBe(total);
        expect(calls.at(-1)![0]).toBeGreaterThan(total / 2);
        finals.push(calls.at(-1)!);
        for (let i = 1; i < calls.length; i++) expect(calls[i]![0]).toBeGreaterThanOrEqual(calls[i - 1]![0]);
        let text = "";
        for await (const c of ds3.complete({ prompt: g.prompts[1]!.ids, sampling: { maxTokens: 4, temperature: 0, ignoreEos: true } })) text += c.ids.join(",") + ",";
        expect(text).toBe(g.prompts[1]!.greedy.slice(0, 4).join(",") + ",");
      } finally {
        await ds3.close();
      }
    }
    expect(finals[0]).toEqual(finals[1]); // the worker read exactly what the thread reads
    await expect(DS3.load({ model: DIR, backend: cpu, tp: 2, executor: "thread" })).rejects.toThrow('executor "thread" runs one rank; tp 2 needs worker ranks');
    const noEntry = { name: "no-entry", apiVersion: cpu.apiVersion, available: cpu.available, devices: cpu.devices, supports: cpu.supports, create: cpu.create };
    await expect(DS3.load({ model: DIR, backend: noEntry, executor: "worker" })).rejects.toThrow(/backend no-entry cannot run in a worker thread/);
    // @ts-expect-error a bad value is named
    await expect(DS3.load({ model: DIR, backend: cpu, executor: "gpu" })).rejects.toThrow('executor must be "worker" or "thread", got "gpu"');
  });
});

describe("DS3.load at tp 1, model in its worker: load errors", () => {
  it("a truncated shard fails with the loader's own error (file and tensor), word for word as in this thread", async () => {
    const dir = mkdtempSync(join(tmpdir(), "ds3-ranks-"));
    try {
      cpSync(DIR, dir, { recursive: true });
      const shard = join(dir, "model-00001-of-00002.safetensors");
      truncateSync(shard, statSync(shard).size - 1000);
      const errorOf = (executor: "worker" | "thread") =>
        DS3.load({ model: dir, backend: cpu, executor, cacheBlocks: 16, onWarning: () => {} }).then(
          () => null,
          (e: Error) => e,
        );
      const inThread = await errorOf("thread");
      const inWorker = await errorOf("worker");
      expect(inThread?.message).toMatch(/model-00001-of-00002\.safetensors, tensor "[^"]+": truncated/);
      expect(inWorker?.message).toBe(inThread!.message);
      expect(inWorker).toBeInstanceOf(RankError);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe("RankExecutor: parallel sizes and failures", () => {
  it("world size 3 fails with the error naming what does not divide, before any worker starts", async () => {
    // a backend package that does not exist: the check must come first, so this error never shows
    await expect(RankExecutor.create(DIR, { backendPackage: "@ds3/no-such-backend", cache: CACHE, worldSize: 3 })).rejects.toThrow(
      "tensor/expert parallel size 3 does not divide num_attention_heads (4)",
    );
    await expect(rankExecutor(8)).rejects.toThrow("tensor/expert parallel size 8 does not divide num_attention_heads (4)");
    await expect(rankExecutor(0)).rejects.toThrow(/worldSize must be a positive integer/);
  });

  it("a backend package that cannot be found fails clearly", async () => {
    await expect(RankExecutor.create(DIR, { backendPackage: "@ds3/no-such-backend", cache: CACHE, worldSize: 2 })).rejects.toThrow(
      /backend package "@ds3\/no-such-backend" not found/,
    );
  });

  const cases = [
    { kind: "throw", ws: 1, rank: 0, cause: /^RankExecutor: rank 0 failed at step 1: injected fault at step 1$/ },
    { kind: "exit", ws: 1, rank: 0, cause: /^RankExecutor: rank 0 exited at step 1: worker exited with code: 7$/ },
    { kind: "hang", ws: 1, rank: 0, cause: /^RankExecutor: rank 0 did not answer within 1500 ms \(step 1\)$/ },
    { kind: "throw", ws: 2, rank: 1, cause: /^RankExecutor: rank 1 failed at step 1: injected fault at step 1$/ },
    { kind: "exit", ws: 2, rank: 1, cause: /^RankExecutor: rank 1 exited at step 1: worker exited with code: 7$/ },
    { kind: "hang", ws: 2, rank: 1, cause: /^RankExecutor: rank 1 did not answer within 1500 ms \(step 1\); rank 0 waiting for it in a collective$/ },
    { kind: "throw", ws: 4, rank: 0, cause: /^RankExecutor: rank 0 failed at step 1: injected fault at step 1$/ },
    { kind: "hang", ws: 4, rank: 2, cause: /^RankExecutor: rank 2 did not answer within 1500 ms \(step 1\); rank 0, 1, 3 waiting for it in a collective$/ },
  ] as const;
  for (const c of cases)
    it(`a rank that ${c.kind}s (rank ${c.rank} of ${c.ws}): step() rejects naming it, the executor stays broken, close() returns`, async () => {
      const ex = await rankExecutor(c.ws, { stepTimeoutMs: 1500, faultInjection: { rank: c.rank, kind: c.kind, atStep: 1 } });
      const p = g.prompts[1]!; // 7 tokens
      const ok = await ex.step(seqStep(p.ids));
      expect(maxAbsDiff(ok, p.logits)).toBeLessThan(1e-3);
      expect(ex.failed).toBeNull();

      const err = await ex.step(seqStep(p.ids)).then(
        () => null,
        (e: Error & { rank?: number }) => e,
      );
      expect(err).toBeInstanceOf(Error);
      expect(err!.message).toMatch(c.cause);
      expect(err!.rank).toBe(c.rank);
      expect(ex.failed).toBe(err);

      // broken: further steps (and MTP steps) reject with the very same error object (no new work is sent)
      await expect(ex.step(seqStep(p.ids))).rejects.toBe(err);
      await expect(ex.mtp({ ...seqStep(p.ids.slice(1)), rows: range(6), nextIds: Int32Array.from(p.ids.slice(1)) })).rejects.toBe(err);

      await ex.close();
      await ex.close(); // idempotent
      await expect(ex.step(seqStep(p.ids))).rejects.toThrow(/closed/);
    }, 30_000);

  it("the process stays up: after the failures a fresh executor works", async () => {
    expect(process.exitCode ?? 0).toBe(0);
    const ex = await rankExecutor(2);
    try {
      const p = g.prompts[1]!;
      expect(maxAbsDiff(await ex.step(seqStep(p.ids)), p.logits)).toBeLessThan(1e-3);
    } finally {
      await ex.close();
    }
  });
});

// The collective on its own, across real worker threads: bit-identical, ordered sums; column
// gathers; chunking; and an abort that wakes a rank blocked in a barrier.
describe("SharedCollective", () => {
  const coreUrl = pathToFileURL(join(dirname(createRequire(import.meta.url).resolve("@ds3/core/package.json")), "dist/index.js")).href;
  const workerCode = `
    const { workerData, parentPort } = require("node:worker_threads");
    import(workerData.coreUrl).then(({ SharedCollective }) => {
      const { bufs, rank, mode, inputs, rows } = workerData;
      const c = new SharedCollective(bufs, rank, 20000);
      try {
        if (mode === "block") { parentPort.postMessage({ started: true }); c.allReduceSum(new Float32Array(10)); parentPort.postMessage({ done: true }); return; }
        const sums = inputs.map((x) => c.allReduceSum(x));
        const gathered = c.allGatherCols(inputs[0], rows);
        parentPort.postMessage({ sums, gathered });
      } catch (e) { parentPort.postMessage({ error: e.message, name: e.name }); }
    });`;

  function runRank(bufs: CollectiveBuffers, rank: number, data: Record<string, unknown>): { worker: Worker; messages: Promise<Array<Record<string, unknown>>> } {
    const worker = new Worker(workerCode, { eval: true, workerData: { coreUrl, bufs, rank, ...data } });
    const got: Array<Record<string, unknown>> = [];
    const messages = new Promise<Array<Record<string, unknown>>>((resolve, reject) => {
      worker.on("message", (m) => got.push(m));
      worker.on("error", reject);
      worker.on("exit", () => resolve(got));
    });
    return { worker, messages };
  }

  it("all-reduce sums ranks 0..N-1 in order, bit-identical on every rank, in chunks; empty messages work", async () => {
    const N = 3;
    const rows = 5;
    const sizes = [0, 1, 7, 2500, rows * 700];
    // values whose float32 sum depends on the order, so a different order would show
    const inputs = Array.from({ length: N }, (_, r) => sizes.map((n) => Float32Array.from({ length: n }, (_, i) => Math.fround(Math.sin(i * 7.1 + r * 1.3) * 10 ** ((i + r) % 9 - 4)))));
    const bufs = SharedCollective.allocate(N, 1000);
    const ranks = inputs.map((inp, r) => runRank(bufs, r, { inputs: inp, rows }));
    const out = (await Promise.all(ranks.map((x) => x.messages))).map((m) => m[0] as { sums: Float32Array[]; gathered: Float32Array; error?: string });
    for (const o of out) expect(o.error).toBeUndefined();
    sizes.forEach((n, k) => {
      const want = new Float32Array(n);
      want.set(inputs[0]![k]!);
      for (let r = 1; r < N; r++) for (let i = 0; i < n; i++) want[i]! += inputs[r]![k]![i]!;
      for (let r = 0; r < N; r++) expect(Buffer.from(out[r]!.sums[k]!.buffer).equals(Buffer.from(want.buffer))).toBe(true);
    });
    // the gather here was of the empty first message: nothing in, nothing out
    for (let r = 0; r < N; r++) expect(out[r]!.gathered.length).toBe(0);
  });

  it("all-gather of [rows, c] blocks gives [rows, N*c], chunked", async () => {
    const N = 2;
    const rows = 6;
    const c = 450; // 2700 values per rank, chunk 1000: chunks cut rows in the middle
    const inputs = Array.from({ length: N }, (_, r) => [Float32Array.from({ length: rows * c }, (_, i) => r * 1e6 + i)]);
    const bufs = SharedCollective.allocate(N, 1000);
    const ranks = inputs.map((inp, r) => runRank(bufs, r, { inputs: inp, rows }));
    const out = (await Promise.all(ranks.map((x) => x.messages))).map((m) => m[0] as { gathered: Float32Array; error?: string });
    for (let r = 0; r < N; r++) {
      expect(out[r]!.error).toBeUndefined();
      const gth = out[r]!.gathered;
      expect(gth.length).toBe(rows * N * c);
      for (let row = 0; row < rows; row++)
        for (let q = 0; q < N; q++) for (const j of [0, 1, c - 1]) expect(gth[row * N * c + q * c + j]).toBe(q * 1e6 + row * c + j);
    }
  });

  it("a rank blocked in a barrier wakes up and throws when the group is aborted", async () => {
    const bufs = SharedCollective.allocate(2, 64);
    const r0 = runRank(bufs, 0, { mode: "block" }); // rank 1 never comes
    await new Promise<void>((resolve) => r0.worker.on("message", (m) => m.started && resolve()));
    await new Promise((r) => setTimeout(r, 100));
    expect(SharedCollective.waiting(bufs)).toEqual([0]);
    SharedCollective.abort(bufs);
    const msgs = await r0.messages;
    expect(msgs).toContainEqual({ error: "rank 0: allReduceSum aborted (the driver gave up on the step)", name: "CollectiveAbortedError" });
    expect(msgs.some((m) => m.done)).toBe(false);
  });
});
