import { describe, expect, it } from "vitest";
import {
  logSoftmax,
  Rng,
  Sampler,
  SamplingError,
  type SamplingParams,
  type SampleHistory,
  StopMatcher,
  topN,
  validateSampling,
} from "./sampling.js";

const EMPTY: SampleHistory = { prompt: [], output: [] };
/** Chi-square critical values at p = 0.001, by degrees of freedom. */
const CHI2_999: Record<number, number> = { 1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 9: 27.88 };

function softmax(logits: number[], T = 1): number[] {
  const m = Math.max(...logits);
  const e = logits.map((x) => Math.exp((x - m) / T));
  const s = e.reduce((a, b) => a + b, 0);
  return e.map((x) => x / s);
}

function chi2(counts: number[], probs: number[]): number {
  const n = counts.reduce((a, b) => a + b, 0);
  return probs.reduce((acc, p, i) => acc + (counts[i]! - n * p) ** 2 / (n * p), 0);
}

/** Draw n tokens; returns per-id counts. */
function draw(params: SamplingParams, logits: number[], n: number, seed = 1, history: SampleHistory = EMPTY): number[] {
  const sampler = new Sampler(params, { size: logits.length });
  const rng = new Rng(seed);
  const l = Float32Array.from(logits);
  const counts = new Array<number>(logits.length).fill(0);
  for (let i = 0; i < n; i++) counts[sampler.sample(l, history, rng).id]!++;
  return counts;
}

const seen = (counts: number[]) => counts.flatMap((c, id) => (c > 0 ? [id] : []));

function randomLogits(n: number, seed: number, scale = 4): Float32Array {
  const rng = new Rng(seed);
  const l = new Float32Array(n);
  // Sum of uniforms: roughly normal, a realistic bulk with a spread of a few nats.
  for (let i = 0; i < n; i++) l[i] = (rng.next() + rng.next() + rng.next() - 1.5) * scale;
  return l;
}

/** Ids sorted by logit desc, ties to the lowest id (the reference ranking). */
const ranked = (l: ArrayLike<number>) =>
  Array.from({ length: l.length }, (_, i) => i).sort((a, b) => l[b]! - l[a]! || a - b);

describe("Rng", () => {
  it("same seed gives the same sequence, in [0, 1)", () => {
    const a = new Rng(42), b = new Rng(42);
    for (let i = 0; i < 1000; i++) {
      const x = a.next();
      expect(x).toBe(b.next());
      expect(x >= 0 && x < 1).toBe(true);
    }
  });

  it("different seeds differ, including seeds differing only above bit 32 and negative seeds", () => {
    const seq = (seed: number) => Array.from({ length: 8 }, ((r) => () => r.next())(new Rng(seed)));
    const seqs = [0, 1, 2, 2 ** 32, 2 ** 40 + 1, -1, Number.MAX_SAFE_INTEGER].map(seq);
    for (let i = 0; i < seqs.length; i++)
      for (let j = i + 1; j < seqs.length; j++) expect(seqs[i]).not.toEqual(seqs[j]);
  });

  it("unseeded generators draw a random seed that reproduces their sequence", () => {
    const a = new Rng(), b = new Rng();
    expect(a.seed).not.toBe(b.seed);
    const replay = new Rng(a.seed);
    for (let i = 0; i < 100; i++) expect(replay.next()).toBe(a.next());
  });

  it("is uniform (chi-square over 10 bins)", () => {
    const rng = new Rng(7);
    const bins = new Array<number>(10).fill(0);
    for (let i = 0; i < 100_000; i++) bins[Math.floor(rng.next() * 10)]!++;
    expect(chi2(bins, new Array(10).fill(0.1))).toBeLessThan(CHI2_999[9]!);
  });
});

describe("logSoftmax / topN", () => {
  it("normalizes and is stable for large logits", () => {
    const out = logSoftmax(Float32Array.from([1000, 1001, 1002, -Infinity]));
    expect(out[3]).toBe(-Infinity);
    const p = softmax([0, 1, 2]);
    for (let i = 0; i < 3; i++) expect(out[i]).toBeCloseTo(Math.log(p[i]!), 6);
    expect(Array.from(out).reduce((s, x) => s + Math.exp(x), 0)).toBeCloseTo(1, 6);
    expect(Array.from(logSoftmax(Float32Array.from([-Infinity, -Infinity])))).toEqual([-Infinity, -Infinity]);
  });

  it("topN is best first, ties to the lowest id, skips -Infinity", () => {
    const lp = [0.1, 0.5, 0.5, -Infinity, 0.3];
    expect(topN(lp, 3)).toEqual([
      { id: 1, logprob: 0.5 },
      { id: 2, logprob: 0.5 },
      { id: 4, logprob: 0.3 },
    ]);
    expect(topN(lp, 10).map((t) => t.id)).toEqual([1, 2, 4, 0]);
    expect(topN(lp, 0)).toEqual([]);
    const big = randomLogits(50_000, 3);
    expect(topN(big, 25).map((t) => t.id)).toEqual(ranked(big).slice(0, 25));
  });
});

describe("validateSampling", () => {
  it("accepts valid params (boundaries included) and returns a clean copy", () => {
    const ok = {
      temperature: 0, topP: 1, topK: -1, minP: 1, presencePenalty: -2, frequencyPenalty: 2,
      repetitionPenalty: 1.3, seed: -5, maxTokens: 0, stopTokenIds: [1, 2], ignoreEos: true, logprobs: 20,
    };
    expect(validateSampling({ ...ok, stop: ["\n"] })).toEqual({ ...ok, stop: ["\n"] });
    expect(validateSampling({ stop: "END", topK: 0, topP: null, junk: 1 })).toEqual({ stop: ["END"], topK: 0 });
    expect(validateSampling(undefined)).toEqual({});
  });

  const bad: Array<[string, unknown]> = [
    ["temperature", -0.1], ["temperature", NaN], ["temperature", Infinity], ["temperature", "1"],
    ["topP", 0], ["topP", 1.01], ["topP", -0.5],
    ["topK", -2], ["topK", 1.5],
    ["minP", -0.01], ["minP", 1.5],
    ["presencePenalty", 2.01], ["presencePenalty", -3],
    ["frequencyPenalty", 2.5], ["frequencyPenalty", NaN],
    ["repetitionPenalty", 0], ["repetitionPenalty", -1], ["repetitionPenalty", Infinity],
    ["seed", 1.5], ["seed", "7"],
    ["maxTokens", -1], ["maxTokens", 2.5],
    ["stop", [1]], ["stop", [""]], ["stop", 5], ["stop", ["ok", null]],
    ["stopTokenIds", [-1]], ["stopTokenIds", [1.5]], ["stopTokenIds", "3"],
    ["ignoreEos", "yes"],
    ["logprobs", -1], ["logprobs", 21], ["logprobs", 1.5],
  ];
  it.each(bad)("rejects %s = %j, naming the field", (field, value) => {
    let err: unknown;
    try {
      validateSampling({ [field]: value });
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(SamplingError);
    expect((err as SamplingError).field).toBe(field);
    expect((err as SamplingError).message).toContain(field);
  });

  it("names the snake_case form too, and the Sampler constructor validates", () => {
    expect(() => validateSampling({ topP: 2 })).toThrow(/top_p/);
    expect(() => new Sampler({ topK: -3 }, { size: 4 })).toThrow(SamplingError);
  });
});

describe("Sampler: greedy and temperature", () => {
  it("temperature 0 is argmax over a full 129,280 vocab, with the raw logprob", () => {
    for (const seed of [1, 2, 3]) {
      const l = randomLogits(129_280, seed);
      const s = new Sampler({ temperature: 0 }, { size: l.length });
      const r = s.sample(l, EMPTY, new Rng(seed));
      expect(r.id).toBe(ranked(l)[0]);
      expect(r.logprob).toBeCloseTo(logSoftmax(l)[r.id]!, 5);
    }
  });

  it("greedy ties go to the lowest id", () => {
    expect(seen(draw({ temperature: 0 }, [1, 3, 3, 2], 10))).toEqual([1]);
  });

  it("temperature -> 0 converges to argmax; T = 0.5 sharpens softmax exactly", () => {
    const logits = [1, 2.5, 2, 0];
    for (const T of [1e-2, 1e-3, 1e-4]) expect(seen(draw({ temperature: T }, logits, 2000, 5))).toEqual([1]);
    const counts = draw({ temperature: 0.5 }, logits, 20_000, 5);
    expect(seen(counts).length).toBeGreaterThan(1);
    expect(chi2(counts, softmax(logits, 0.5))).toBeLessThan(CHI2_999[3]!);
  });

  it("temperature 1, no filtering: 20,000 draws match softmax (chi-square, df 4, p = 0.001)", () => {
    const logits = [1, 2, 0.5, -1, 1.5];
    const counts = draw({}, logits, 20_000, 1234);
    expect(chi2(counts, softmax(logits))).toBeLessThan(CHI2_999[4]!);
    // and the test has power: the same counts are far from a uniform distribution
    expect(chi2(counts, new Array(5).fill(0.2))).toBeGreaterThan(1000);
  });

  it("is deterministic for a seed", () => {
    const l = Array.from(randomLogits(1000, 9));
    expect(draw({ topP: 0.9 }, l, 500, 77)).toEqual(draw({ topP: 0.9 }, l, 500, 77));
    expect(draw({ topP: 0.9 }, l, 500, 77)).not.toEqual(draw({ topP: 0.9 }, l, 500, 78));
  });
});

describe("Sampler: top-k / top-p / min-p", () => {
  it("top-k only emits the k best ids, and all of them", () => {
    const l = Array.from(randomLogits(2000, 11, 1));
    const allowed = ranked(l).slice(0, 10).sort((a, b) => a - b);
    expect(seen(draw({ topK: 10, temperature: 1.5 }, l, 5000, 3))).toEqual(allowed);
  });

  it("top-k ties go to the lowest id; top-k >= vocab is disabled; top-k 1 is greedy", () => {
    expect(seen(draw({ topK: 2 }, [5, 4, 4, 4, 1], 3000))).toEqual([0, 1]);
    expect(seen(draw({ topK: 5 }, [1, 1, 1, 1, 1], 3000))).toEqual([0, 1, 2, 3, 4]);
    expect(seen(draw({ topK: 1, temperature: 5 }, [0, 2, 1], 500))).toEqual([1]);
  });

  it("top-p keeps the smallest set reaching the mass, renormalized", () => {
    const probs = [0.5, 0.2, 0.15, 0.1, 0.05];
    const logits = probs.map(Math.log);
    const counts = draw({ topP: 0.8 }, logits, 20_000, 21);
    expect(seen(counts)).toEqual([0, 1, 2]);
    expect(chi2(counts.slice(0, 3), [0.5, 0.2, 0.15].map((p) => p / 0.85))).toBeLessThan(CHI2_999[2]!);
    expect(seen(draw({ topP: 0.01 }, logits, 1000))).toEqual([0]); // always keeps one
  });

  it("top-p never leaves the nucleus on a large vocab", () => {
    const l = randomLogits(5000, 12);
    const p = softmax(Array.from(l), 0.7);
    const order = ranked(l);
    const nucleus = new Set<number>();
    for (let k = 0, cum = 0; cum < 0.9; k++) (cum += p[order[k]!]!), nucleus.add(order[k]!);
    const counts = draw({ topP: 0.9, temperature: 0.7 }, Array.from(l), 2000, 4);
    expect(seen(counts).every((id) => nucleus.has(id))).toBe(true);
    expect(seen(counts).length).toBeGreaterThan(nucleus.size / 3); // not collapsed onto a few ids
  });

  it("top-k applies before top-p (top-p is over the renormalized top-k mass)", () => {
    const logits = [0.4, 0.3, 0.2, 0.1].map(Math.log);
    expect(seen(draw({ topK: 2, topP: 0.5 }, logits, 2000))).toEqual([0]); // 0.4/0.7 >= 0.5
    expect(seen(draw({ topP: 0.5 }, logits, 2000))).toEqual([0, 1]); // 0.4 < 0.5
  });

  it("min-p drops ids below min_p * max prob, renormalized", () => {
    const probs = [0.5, 0.3, 0.1, 0.06, 0.04];
    const counts = draw({ minP: 0.15 }, probs.map(Math.log), 20_000, 8); // threshold 0.075
    expect(seen(counts)).toEqual([0, 1, 2]);
    expect(chi2(counts.slice(0, 3), [0.5, 0.3, 0.1].map((p) => p / 0.9))).toBeLessThan(CHI2_999[2]!);
    expect(seen(draw({ minP: 1 }, [2, 1, 2], 1000))).toEqual([0, 2]);
  });

  it("combined filters on the full vocab never emit outside the allowed set", () => {
    const V = 129_280, T = 0.8, topK = 40, topP = 0.9, minP = 0.02;
    const l = randomLogits(V, 13, 6);
    // reference: top-k by sort, nucleus over the renormalized top-k, then min-p
    const top = ranked(l).slice(0, topK);
    const p = softmax(top.map((id) => l[id]!), T);
    let n = 0;
    for (let cum = 0; cum < topP; n++) cum += p[n]!;
    const allowed = new Set(top.slice(0, n).filter((_, k) => p[k]! >= minP * p[0]!));
    const sampler = new Sampler({ temperature: T, topK, topP, minP }, { size: V });
    const rng = new Rng(99), got = new Set<number>();
    for (let i = 0; i < 400; i++) got.add(sampler.sample(l, EMPTY, rng).id);
    expect([...got].every((id) => allowed.has(id))).toBe(true);
    expect(got.size).toBeGreaterThan(1);
  });
});

describe("Sampler: penalties", () => {
  const greedy = (p: SamplingParams, logits: number[], history: { prompt: number[]; output: number[] }) =>
    new Sampler({ temperature: 0, ...p }, { size: logits.length }).sample(Float32Array.from(logits), history, new Rng(0))
      .id;

  it("repetition penalty divides positive / multiplies negative logits, once per id, prompt and output", () => {
    expect(greedy({ repetitionPenalty: 2 }, [2, 1.5, 0], { prompt: [0], output: [] })).toBe(1); // 2/2 = 1 < 1.5
    expect(greedy({ repetitionPenalty: 2 }, [2, 1.5, 0], { prompt: [], output: [0] })).toBe(1);
    expect(greedy({ repetitionPenalty: 2 }, [-1, -1.5, -3], { prompt: [0], output: [] })).toBe(1); // -2 < -1.5
    expect(greedy({ repetitionPenalty: 1.2 }, [-1, -1.5, -3], { prompt: [0], output: [] })).toBe(0); // -1.2 > -1.5
    expect(greedy({ repetitionPenalty: 1.3 }, [2, 1.5, 0], { prompt: [0, 0, 0, 0], output: [0] })).toBe(0); // 1.54
    expect(greedy({ repetitionPenalty: 0.5 }, [1, 1.5, 0], { prompt: [0], output: [] })).toBe(0); // < 1 rewards
  });

  it("repetition penalty lowers the sampled frequency of a repeated token by the right amount", () => {
    const counts = draw({ repetitionPenalty: 2 }, [1, 1, 1], 20_000, 3, { prompt: [0], output: [] });
    const expected = softmax([0.5, 1, 1]);
    expect(chi2(counts, expected)).toBeLessThan(CHI2_999[2]!);
    expect(counts[0]! / 20_000).toBeLessThan(0.3);
  });

  it("frequency penalty scales with the output count; the prompt does not count", () => {
    const h = { prompt: [], output: [0, 0] };
    expect(greedy({ frequencyPenalty: 0.49 }, [3, 2], h)).toBe(0); // 3 - 0.98
    expect(greedy({ frequencyPenalty: 0.51 }, [3, 2], h)).toBe(1); // 3 - 1.02
    expect(greedy({ frequencyPenalty: 2 }, [3, 2], { prompt: [0, 0, 0], output: [] })).toBe(0);
  });

  it("presence penalty applies once per present token", () => {
    const h = { prompt: [], output: [0, 0, 0] };
    expect(greedy({ presencePenalty: 0.99 }, [3, 2], h)).toBe(0);
    expect(greedy({ presencePenalty: 1.01 }, [3, 2], h)).toBe(1);
    expect(greedy({ presencePenalty: 2 }, [3, 2], { prompt: [0], output: [] })).toBe(0);
  });

  it("frequency and presence add up, and negative values reward", () => {
    const h = { prompt: [], output: [0, 0] };
    expect(greedy({ frequencyPenalty: 0.3, presencePenalty: 0.39 }, [3, 2], h)).toBe(0); // 2.01
    expect(greedy({ frequencyPenalty: 0.3, presencePenalty: 0.41 }, [3, 2], h)).toBe(1); // 1.99
    expect(greedy({ presencePenalty: -1.01 }, [2, 3], { prompt: [], output: [0] })).toBe(0);
    const counts = draw({ frequencyPenalty: 0.5, presencePenalty: 0.25 }, [0, 0, 0, 0], 20_000, 6, {
      prompt: [3, 3],
      output: [0, 1, 1],
    });
    expect(chi2(counts, softmax([-0.75, -1.25, 0, 0]))).toBeLessThan(CHI2_999[3]!);
  });

  it("the returned logprob is the raw log-softmax, whatever penalties and temperature do", () => {
    const l = randomLogits(500, 15);
    const raw = logSoftmax(l);
    const sampler = new Sampler(
      { temperature: 0.6, topK: 20, repetitionPenalty: 1.5, frequencyPenalty: 1, presencePenalty: 1 },
      { size: 500 },
    );
    // every id is in the prompt, the best 30 also in the output: whatever is chosen was penalized
    const rng = new Rng(3), history = { prompt: ranked(l), output: ranked(l).slice(0, 30) };
    for (let i = 0; i < 200; i++) {
      const r = sampler.sample(l, history, rng);
      expect(r.logprob).toBeCloseTo(raw[r.id]!, 5);
    }
  });
});

describe("Sampler: disallowed ids and logprobs", () => {
  const V = 1000;
  const allowed = (id: number) => id < 900 && id % 7 !== 3;
  const logits = () => {
    const l = randomLogits(V, 16);
    for (let id = 0; id < V; id++) if (!allowed(id)) l[id] = 50; // would dominate if not masked
    return l;
  };

  it("never emits a disallowed id, greedy or sampled, and normalizes over allowed ids", () => {
    const l = logits();
    const masked = l.map((x, id) => (allowed(id) ? x : -Infinity));
    for (const p of [{ temperature: 0 }, { temperature: 3 }, { topP: 0.99, temperature: 2 }, { minP: 0.001 }]) {
      const sampler = new Sampler(p, { size: V, allowed });
      const rng = new Rng(5);
      for (let i = 0; i < 1000; i++) {
        const r = sampler.sample(l, EMPTY, rng);
        expect(allowed(r.id)).toBe(true);
        expect(r.logprob).toBeCloseTo(logSoftmax(masked)[r.id]!, 5);
      }
    }
  });

  it("masks the rows beyond the tokenizer on the real vocab shape", () => {
    const l = randomLogits(129_280, 17);
    l.fill(40, 128_815);
    const sampler = new Sampler({ temperature: 1.5 }, { size: 129_280, allowed: (id) => id < 128_815 });
    const rng = new Rng(2);
    for (let i = 0; i < 100; i++) expect(sampler.sample(l, EMPTY, rng).id).toBeLessThan(128_815);
  });

  it("returns the top-N raw logprobs over allowed ids", () => {
    const l = logits();
    const masked = logSoftmax(l.map((x, id) => (allowed(id) ? x : -Infinity)));
    const r = new Sampler({ logprobs: 5, temperature: 0.5 }, { size: V, allowed }).sample(l, EMPTY, new Rng(1));
    const want = topN(masked, 5);
    expect(r.top!.map((t) => t.id)).toEqual(want.map((t) => t.id));
    r.top!.forEach((t, i) => expect(t.logprob).toBeCloseTo(want[i]!.logprob, 5));
    expect(new Sampler({ logprobs: 0 }, { size: V }).sample(l, EMPTY, new Rng(1)).top).toEqual([]);
    expect(new Sampler({}, { size: V }).sample(l, EMPTY, new Rng(1)).top).toBeUndefined();
  });

  it("throws when nothing can be sampled or the logits have the wrong size", () => {
    const s = new Sampler({}, { size: 3, allowed: (id) => id === 1 });
    expect(() => s.sample(Float32Array.from([0, -Infinity, 0]), EMPTY, new Rng(1))).toThrow(/no token/);
    expect(() => s.sample(new Float32Array(4), EMPTY, new Rng(1))).toThrow(RangeError);
  });
});

describe("StopMatcher", () => {
  /** Push chunks; returns everything emitted (plus the flush if never stopped) and whether it stopped. */
  function run(stops: string[], chunks: string[]) {
    const m = new StopMatcher(stops);
    let out = "", stopped = false;
    for (const c of chunks) {
      const r = m.push(c);
      expect(stopped && r.emit !== "").toBe(false); // nothing after a stop
      out += r.emit;
      stopped ||= r.stopped;
    }
    return { out: out + m.flush(), stopped };
  }
  /** Reference: scan end positions; the first stop to end wins (the longest at that end). */
  function reference(stops: string[], text: string) {
    for (let e = 1; e <= text.length; e++) {
      const hit = stops.filter((s) => text.slice(0, e).endsWith(s)).sort((a, b) => b.length - a.length)[0];
      if (hit) return { out: text.slice(0, e - hit.length), stopped: true };
    }
    return { out: text, stopped: false };
  }

  it("passes text through without stops", () => {
    expect(run([], ["a", "bc"])).toEqual({ out: "abc", stopped: false });
  });

  it("cuts exactly before the stop string", () => {
    const m = new StopMatcher(["STOP"]);
    expect(m.push("Hello wor")).toEqual({ emit: "Hello wor", stopped: false });
    expect(m.push("ld STOP here")).toEqual({ emit: "ld ", stopped: true });
    expect(m.push("more")).toEqual({ emit: "", stopped: true });
    expect(m.flush()).toBe("");
  });

  it("holds back a possible stop prefix and releases it when the match fails", () => {
    const m = new StopMatcher(["STOP"]);
    expect(m.push("abcST")).toEqual({ emit: "abc", stopped: false });
    expect(m.push("O")).toEqual({ emit: "", stopped: false });
    expect(m.push("x")).toEqual({ emit: "STOx", stopped: false });
    expect(m.push("S")).toEqual({ emit: "", stopped: false });
    expect(m.flush()).toBe("S");
  });

  it("catches a stop split across many pushes", () => {
    expect(run(["<|end|>"], ["hi ", "<", "|", "en", "d", "|", ">", " tail"])).toEqual({ out: "hi ", stopped: true });
    expect(run(["STOP"], [..."abcSTxSTOP"])).toEqual({ out: "abcSTx", stopped: true });
  });

  it("handles overlapping partial matches (stop 'aab' in 'aaab')", () => {
    expect(run(["aab"], ["aaab"])).toEqual({ out: "a", stopped: true });
    expect(run(["aab"], [..."aaab"])).toEqual({ out: "a", stopped: true });
    expect(run(["aab"], ["aa", "ab"])).toEqual({ out: "a", stopped: true });
    expect(run(["aab"], [..."aaaac"])).toEqual({ out: "aaaac", stopped: false });
    const m = new StopMatcher(["aab"]);
    expect(m.push("aaa")).toEqual({ emit: "a", stopped: false });
  });

  it("with multiple stops, the first to complete wins", () => {
    expect(run(["</s>", "\n\n"], ["foo\n", "\nbar</s>"])).toEqual({ out: "foo", stopped: true });
    expect(run(["</s>", "\n\n"], ["foo</", "s>\n\n"])).toEqual({ out: "foo", stopped: true });
    expect(run(["abcd", "bc"], ["abcd"])).toEqual({ out: "a", stopped: true }); // "bc" ends first
    expect(run(["bc", "abc"], ["zabc"])).toEqual({ out: "z", stopped: true }); // same end: earlier start
  });

  it("gives the same result however the text is chunked (randomized)", () => {
    const rng = new Rng(2024);
    const stopSets = [["aab"], ["aba", "bb"], ["abab", "ba"], ["a\nb", "\n\n", "bbb"]];
    for (let trial = 0; trial < 500; trial++) {
      const stops = stopSets[trial % stopSets.length]!;
      const text = Array.from({ length: 1 + Math.floor(rng.next() * 14) }, () => "ab\n"[Math.floor(rng.next() * 3)]).join("");
      const chunks: string[] = [];
      for (let i = 0; i < text.length; ) {
        const n = 1 + Math.floor(rng.next() * 4);
        chunks.push(text.slice(i, i + n));
        i += n;
      }
      const got = run(stops, chunks);
      expect(got).toEqual(reference(stops, text));
      if (got.stopped) for (const s of stops) expect(got.out.includes(s)).toBe(false);
    }
  });
});
