// The engine on the CPU backend and tiny-v3: continuous batching, prefix caching, preemption,
// abort, capacity errors, and speculative decoding (MTP and injected drafters).
import { cpu } from "@ds3/backend-cpu";
import { type Drafter, Engine, type EngineOptions, LocalExecutor, RankExecutor, Rng, type SamplingParams } from "@ds3/core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { loadGolden } from "./helpers/golden.js";

const g = loadGolden("tiny-v3");
const V = g.vocab;

function makeExecutor(numBlocks = 96, mtp = true) {
  return new LocalExecutor(g.dir, { backend: cpu, cache: { numBlocks, blockSize: 64, dtype: "f32" }, mtp });
}

async function run(engine: Engine, promptIds: number[], sampling: SamplingParams, signal?: AbortSignal) {
  const ids: number[] = [];
  let finish = "";
  for await (const ev of engine.generate({ promptIds, sampling, signal })) {
    ids.push(...ev.ids);
    if (ev.finishReason) finish = ev.finishReason;
  }
  return { ids, finish };
}

function randomPrompts(n: number, seed: number, minLen: number, maxLen: number): number[][] {
  const rng = new Rng(seed);
  return Array.from({ length: n }, () => {
    const L = minLen + Math.floor(rng.next() * (maxLen - minLen + 1));
    return Array.from({ length: L }, () => Math.floor(rng.next() * V));
  });
}

describe("engine: continuous batching on tiny-v3", () => {
  let ex: LocalExecutor;
  const alone = new Map<string, number[]>();
  const prompts = randomPrompts(64, 7, 1, 150);
  const maxTok = (i: number) => 2 + ((i * 7) % 15);

  beforeAll(async () => {
    ex = makeExecutor(128);
    const e = new Engine({ executor: ex, eosIds: [], prefixCaching: false });
    for (let i = 0; i < prompts.length; i++) alone.set(String(i), (await run(e, prompts[i]!, { temperature: 0, maxTokens: maxTok(i) })).ids);
    await new Promise((r) => setTimeout(r, 0));
  });
  afterAll(() => ex.close());

  const engineOn = (o: Partial<EngineOptions> = {}) => new Engine({ executor: ex, eosIds: [], ...o });

  it("greedy golden continuations through the engine", async () => {
    const e = engineOn();
    const outs = await Promise.all(g.prompts.map((p) => run(e, p.ids, { temperature: 0, maxTokens: 24 })));
    // margins of these prompts are all above 1e-3, so all 24 steps are comparable
    outs.forEach((o, i) => expect(o.ids).toEqual(g.prompts[i]!.greedy));
  });

  it("64 concurrent requests of mixed prompt and output lengths give exactly the greedy outputs each gives alone", async () => {
    const e = engineOn({ maxBatchTokens: 512, prefillChunk: 48 });
    const outs = await Promise.all(prompts.map((p, i) => run(e, p, { temperature: 0, maxTokens: maxTok(i) })));
    outs.forEach((o, i) => {
      expect(o.ids).toEqual(alone.get(String(i)));
      expect(o.finish).toBe("length");
      expect(o.ids.length).toBe(maxTok(i));
    });
    const s = e.stats();
    expect(s.steps).toBeLessThan(prompts.reduce((a, _p, i) => a + maxTok(i), 0)); // really batched
    expect(s.cacheBlocksUsed).toBe(0);
  });

  it("shared prefixes: identical outputs with and without prefix caching; hit rate as expected", async () => {
    const rng = new Rng(11);
    const prefix = Array.from({ length: 130 }, () => Math.floor(rng.next() * V)); // 2 full blocks + 2 tokens
    const reqs = Array.from({ length: 6 }, (_, i) => [...prefix, ...Array.from({ length: 5 + i }, () => Math.floor(rng.next() * V))]);
    const off = engineOn({ prefixCaching: false });
    const expected = [];
    for (const r of reqs) expected.push((await run(off, r, { temperature: 0, maxTokens: 6 })).ids);
    const on = engineOn({ prefixCaching: true });
    // the first request fills the cache; the other five then share its two full blocks
    const first = await run(on, reqs[0]!, { temperature: 0, maxTokens: 6 });
    const rest = await Promise.all(reqs.slice(1).map((r) => run(on, r, { temperature: 0, maxTokens: 6 })));
    expect([first.ids, ...rest.map((o) => o.ids)]).toEqual(expected);
    const s = on.stats();
    // each request asks for its full blocks below the last token (2 each); the later five hit both
    expect(s.prefixQueriedTokens).toBe(6 * 128);
    expect(s.prefixHitTokens).toBe(5 * 128);
    expect(s.prefixHitRate).toBeCloseTo(5 / 6, 10);
    expect(off.stats().prefixHitTokens).toBe(0);
  });

  it("a cache too small for every request at once: all complete, outputs unchanged, preemption exercised", async () => {
    const small = makeExecutor(12, false);
    try {
      const e = new Engine({ executor: small, eosIds: [], prefixCaching: false, maxModelLen: 256 });
      const idx = [0, 3, 5, 8, 13, 21, 34, 55];
      const outs = await Promise.all(idx.map((i) => run(e, prompts[i]!.slice(0, 120), { temperature: 0, maxTokens: 12 })));
      const ref = new Engine({ executor: ex, eosIds: [], prefixCaching: false });
      for (let j = 0; j < idx.length; j++) expect(outs[j]!.ids).toEqual((await run(ref, prompts[idx[j]!]!.slice(0, 120), { temperature: 0, maxTokens: 12 })).ids);
      expect(e.stats().preemptions).toBeGreaterThan(0);
      expect(e.stats().cacheBlocksUsed).toBe(0);
    } finally {
      await small.close();
    }
  });

  it("aborting half the requests mid-flight: the rest finish unchanged and the cache returns to fully free", async () => {
    const e = engineOn({ maxBatchTokens: 512 });
    const ctrls = prompts.slice(0, 16).map(() => new AbortController());
    const runs = prompts.slice(0, 16).map((p, i) => run(e, p, { temperature: 0, maxTokens: 16 }, ctrls[i]!.signal));
    // abort the odd ones after a few steps: some queued, some prefilling, some decoding
    await new Promise((r) => setTimeout(r, 30));
    ctrls.forEach((c, i) => i % 2 && c.abort());
    const outs = await Promise.all(runs);
    const ref = engineOn({ prefixCaching: false });
    for (let i = 0; i < 16; i += 2) {
      expect(outs[i]!.finish).toBe("length");
      expect(outs[i]!.ids).toEqual((await run(ref, prompts[i]!, { temperature: 0, maxTokens: 16 })).ids);
    }
    for (let i = 1; i < 16; i += 2) expect(outs[i]!.finish).toBe("abort");
    expect(e.stats().cacheBlocksUsed).toBe(0);
    expect(e.stats().running + e.stats().waiting).toBe(0);
  });

  it("a seeded sampled request gives the same output alone and in a batch of 32", async () => {
    const sp = { temperature: 0.9, topP: 0.95, topK: 50, seed: 1234, maxTokens: 12 };
    const e = engineOn();
    const solo = await run(e, prompts[3]!, sp);
    const batch = await Promise.all(prompts.slice(0, 32).map((p, i) => run(e, i === 7 ? prompts[3]! : p, i === 7 ? sp : { ...sp, seed: i })));
    expect(batch[7]!.ids).toEqual(solo.ids);
    expect(new Set(batch.map((b) => b.ids.join(","))).size).toBeGreaterThan(16); // really sampled
  });

  it("requests that can never fit are rejected at once with a clear error", () => {
    const e = engineOn({ maxModelLen: 200 });
    expect(() => e.generate({ promptIds: new Array(201).fill(5), sampling: { maxTokens: 1 } })).toThrow(/prompt has 201 tokens, the maximum context length is 200/);
    expect(() => e.generate({ promptIds: new Array(150).fill(5), sampling: { maxTokens: 60 } })).toThrow(/150 tokens\) \+ max_tokens \(60\) = 210 exceeds the maximum context length 200/);
    expect(() => new Engine({ executor: ex, maxModelLen: 128 * 64 + 1 })).toThrow(/exceeds what the cache holds \(128 blocks x 64 = 8192 tokens\)/);
    expect(() => e.generate({ promptIds: [1, 2, V] })).toThrow(/token id 1024 at index 2 is outside the vocabulary/);
    expect(() => e.generate({ promptIds: [] })).toThrow(/at least one token/);
    expect(e.stats().cacheBlocksUsed).toBe(0);
  });
});

describe("engine: speculative decoding", () => {
  let ex: LocalExecutor;
  const prompts = randomPrompts(8, 21, 3, 90);
  const N = 20;
  let plain: number[][];
  beforeAll(async () => {
    ex = makeExecutor(96, true);
    const e = new Engine({ executor: ex, eosIds: [] });
    plain = await Promise.all(prompts.map(async (p) => (await run(e, p, { temperature: 0, maxTokens: N })).ids));
  });
  afterAll(() => ex.close());

  it("MTP drafts: greedy output identical to plain decoding; acceptance reported", async () => {
    const e = new Engine({ executor: ex, eosIds: [], speculative: { drafter: "mtp", k: 1 } });
    const outs = await Promise.all(prompts.map((p) => run(e, p, { temperature: 0, maxTokens: N })));
    outs.forEach((o, i) => expect(o.ids).toEqual(plain[i]));
    const s = e.stats();
    expect(s.specProposed).toBeGreaterThan(0);
    expect(s.specAccepted).toBeLessThanOrEqual(s.specProposed);
    // the counters against the executor's own calls, one request at a time: each verify step yields
    // one token plus its accepted draft, so target steps = prefill + (N - 1) - accepted
    for (const p of prompts.slice(0, 3)) {
      let calls = 0;
      const counted = new Proxy(ex, {
        get(t, k) {
          const v = Reflect.get(t, k, t) as unknown;
          if (typeof v !== "function") return v;
          if (k === "step" || k === "stepSampled") return (...a: unknown[]) => (calls++, (v as (...x: unknown[]) => unknown).apply(t, a));
          return (v as (...x: unknown[]) => unknown).bind(t);
        },
      });
      const one = new Engine({ executor: counted, eosIds: [], speculative: { drafter: "mtp", k: 1 }, prefixCaching: false });
      const o = await run(one, p, { temperature: 0, maxTokens: N });
      expect(o.ids).toHaveLength(N);
      const st = one.stats();
      // one draft per decode step (k = 1) but the last, where one token is left and nothing is drafted
      expect(st.specProposed).toBe(calls - Math.ceil(p.length / 512) - 1);
      expect(calls).toBe(Math.ceil(p.length / 512) + (N - 1) - st.specAccepted);
    }
    console.log(`MTP acceptance on random tiny-v3: ${(100 * s.specAcceptance).toFixed(1)}% of ${s.specProposed} drafts`);
  });

  it("an oracle drafter (the true next tokens): 100% acceptance, about tokens/(k+1) target steps, identical outputs and cache contents", async () => {
    const k = 3;
    const truth = new Map(prompts.map((p, i) => [p.join(","), plain[i]!]));
    const oracle: Drafter = {
      name: "oracle",
      propose(seq, kk) {
        const want = truth.get(seq.tokens.slice(0, seq.promptLength).join(","))!;
        const done = seq.tokens.length - seq.promptLength;
        return want.slice(done, done + kk);
      },
    };
    const p = prompts[2]!;
    const e = new Engine({ executor: ex, eosIds: [], speculative: { drafter: oracle, k }, prefixCaching: false });
    const o = await run(e, p, { temperature: 0, maxTokens: N });
    expect(o.ids).toEqual(plain[2]);
    const s = e.stats();
    expect(s.specAcceptance).toBe(1);
    // prefill 1 step + ceil((N-1)/(k+1)) verify steps
    expect(s.steps).toBe(Math.ceil(p.length / 512) + Math.ceil((N - 1) / (k + 1)));
    // cache contents equal those of plain decoding for every computed position
    const lat = await ex.readCache(0, 0, p.length + N - 1);
    const e2 = new Engine({ executor: ex, eosIds: [], prefixCaching: false });
    await run(e2, p, { temperature: 0, maxTokens: N });
    const lat2 = await ex.readCache(0, 0, p.length + N - 1);
    expect(Buffer.compare(Buffer.from(lat.buffer), Buffer.from(lat2.buffer))).toBe(0);
  });

  it("an always-wrong drafter: 0% acceptance and identical outputs", async () => {
    const wrong: Drafter = { name: "wrong", propose: (seq, kk) => Array.from({ length: kk }, (_, i) => (seq.tokens.length * 31 + i * 17 + 5) % V) };
    const e = new Engine({ executor: ex, eosIds: [], speculative: { drafter: wrong, k: 2 } });
    const outs = await Promise.all(prompts.map((p) => run(e, p, { temperature: 0, maxTokens: N })));
    const s = e.stats();
    // a wrong guess can coincide with the true token by chance; exclude none, but it must be rare
    outs.forEach((o, i) => expect(o.ids).toEqual(plain[i]));
    expect(s.specAccepted).toBeLessThanOrEqual(2);
    expect(s.specProposed).toBeGreaterThan(50);
  });

  it("with sampling, verification keeps the target distribution (chi-square over many seeded draws)", async () => {
    // prompt p, temperature 1, top-k 4, three tokens: the first is sampled at prefill, the second
    // is verified against a draft. Conditioned on the first token being a = argmax, the second
    // must follow softmax(top-4 of the logits after p + [a]), whatever the drafter proposes.
    const p = prompts[0]!;
    const step = async (ids: number[]) =>
      ex.step({
        ids: Int32Array.from(ids),
        positions: Int32Array.from(ids.map((_, i) => i)),
        seqIdx: new Int32Array(ids.length),
        blockTables: Int32Array.from({ length: 4 }, (_, i) => i),
        maxBlocks: 4,
        logitRows: Int32Array.of(ids.length - 1),
      });
    const topOf = (l: Float32Array) => [...l.keys()].sort((x, y) => l[y]! - l[x]!).slice(0, 4);
    const a = topOf(await step(p))[0]!;
    const l2 = await step([...p, a]);
    const top = topOf(l2);
    const w = top.map((t) => Math.exp(l2[t]! - l2[top[0]!]!));
    const Z = w.reduce((x, y) => x + y, 0);
    const probs = w.map((x) => x / Z);
    const fixed: Drafter = { name: "fixed", propose: () => [top[1]!] }; // the 2nd most likely token
    const draws = 1200;
    const sample = async (spec?: EngineOptions["speculative"]) => {
      const e = new Engine({ executor: ex, eosIds: [], speculative: spec });
      const outs = await Promise.all(Array.from({ length: draws }, (_, i) => run(e, p, { temperature: 1, topK: 4, seed: 100000 + i, maxTokens: 3 })));
      return { outs: outs.map((o) => o.ids), stats: e.stats() };
    };
    const base = await sample();
    const spec = await sample({ drafter: fixed, k: 1 });
    expect(spec.stats.specProposed).toBe(draws);
    expect(spec.stats.specAccepted).toBeGreaterThan(0);
    expect(spec.stats.specAccepted).toBe(spec.outs.filter((o) => o[1] === top[1]).length);
    const second = spec.outs.filter((o) => o[0] === a).map((o) => o[1]!);
    expect(second.length).toBeGreaterThan(200);
    let chi = 0;
    top.forEach((t, i) => {
      const e = second.length * probs[i]!;
      chi += (second.filter((x) => x === t).length - e) ** 2 / e;
    });
    expect(second.every((t) => top.includes(t))).toBe(true);
    expect(chi).toBeLessThan(16.27); // 3 degrees of freedom, p = 0.001
    // and with the same seeds the drafter changes nothing at all
    expect(spec.outs).toEqual(base.outs);
  });
});

describe("engine over parallel ranks", () => {
  it("a seeded sampled request gives the same output at --tp 2 as at --tp 1, and so does greedy", async () => {
    const prompts = randomPrompts(4, 5, 5, 70);
    const sp = { temperature: 0.8, topP: 0.9, seed: 77, maxTokens: 10 };
    const one = makeExecutor(32, false);
    const e1 = new Engine({ executor: one, eosIds: [] });
    const ref = await Promise.all(prompts.map((p, i) => run(e1, p, i % 2 ? { ...sp, seed: i } : { temperature: 0, maxTokens: 10 })));
    await e1.close();
    const two = await RankExecutor.create(g.dir, { backendPackage: cpu.entry!, cache: { numBlocks: 32, blockSize: 64, dtype: "f32" }, worldSize: 2, mtp: false });
    const e2 = new Engine({ executor: two, eosIds: [] });
    try {
      const outs = await Promise.all(prompts.map((p, i) => run(e2, p, i % 2 ? { ...sp, seed: i } : { temperature: 0, maxTokens: 10 })));
      expect(outs.map((o) => o.ids)).toEqual(ref.map((o) => o.ids));
    } finally {
      await e2.close();
    }
  });
});

describe("engine over failing ranks", () => {
  for (const kind of ["throw", "exit", "hang"] as const) {
    it(`a rank that ${kind}s fails every request it holds with the error, nothing hangs, the engine shuts down`, async () => {
      const ex = await RankExecutor.create(g.dir, {
        backendPackage: cpu.entry!,
        cache: { numBlocks: 32, blockSize: 64, dtype: "f32" },
        worldSize: 2,
        mtp: false,
        stepTimeoutMs: 2000,
        faultInjection: { rank: 1, kind, atStep: 3 },
      });
      const e = new Engine({ executor: ex, eosIds: [] });
      const prompts = randomPrompts(6, 9, 3, 40);
      const results = await Promise.allSettled(prompts.map((p) => run(e, p, { temperature: 0, maxTokens: 20 })));
      for (const r of results) {
        expect(r.status).toBe("rejected");
        expect(String((r as PromiseRejectedResult).reason)).toMatch(/engine step failed: RankExecutor: rank 1 (failed|exited|did not answer)/);
      }
      expect(() => e.generate({ promptIds: [1, 2, 3] })).toThrow(/engine failed: RankExecutor: rank 1/);
      await e.close();
    }, 30_000);
  }
});
