// Token sampling with vLLM semantics: seedable RNG, parameter validation, penalties,
// temperature / top-k / top-p / min-p, OpenAI-style logprobs, and stop-string matching.

/** Seedable PRNG: xoshiro128** with its state filled by splitmix32. */
export class Rng {
  readonly seed: number;
  private s = new Uint32Array(4);

  /** Without a seed a random one is drawn (readable afterwards as `seed`). */
  constructor(seed?: number) {
    this.seed = seed ?? Math.floor(Math.random() * 2 ** 32) + Math.floor(Math.random() * 2 ** 21) * 2 ** 32;
    const lo = splitmix32(this.seed >>> 0);
    const hi = splitmix32(Math.floor(this.seed / 2 ** 32) ^ 0x5bd1e995);
    for (let i = 0; i < 4; i++) this.s[i] = lo() ^ hi();
    if (this.s.every((x) => x === 0)) this.s[0] = 1;
  }

  /** Next 32-bit unsigned integer. */
  nextUint32(): number {
    const s = this.s;
    let a = s[0]!, b = s[1]!, c = s[2]!, d = s[3]!;
    const r = Math.imul(rotl(Math.imul(b, 5), 7), 9);
    const t = b << 9;
    c ^= a;
    d ^= b;
    b ^= c;
    a ^= d;
    c ^= t;
    d = rotl(d, 11);
    s[0] = a;
    s[1] = b;
    s[2] = c;
    s[3] = d;
    return r >>> 0;
  }

  /** Uniform double in [0, 1) with 53 random bits. */
  next(): number {
    return ((this.nextUint32() >>> 5) * 67108864 + (this.nextUint32() >>> 6)) / 9007199254740992;
  }
}

const rotl = (x: number, k: number) => (x << k) | (x >>> (32 - k));

function splitmix32(a: number): () => number {
  return () => {
    a = (a + 0x9e3779b9) | 0;
    let t = a ^ (a >>> 16);
    t = Math.imul(t, 0x21f0aaad);
    t ^= t >>> 15;
    t = Math.imul(t, 0x735a2d97);
    return (t ^ (t >>> 15)) >>> 0;
  };
}

// ---------------------------------------------------------------------------------------
// Parameters

export interface SamplingParams {
  temperature?: number;
  topP?: number;
  topK?: number;
  minP?: number;
  presencePenalty?: number;
  frequencyPenalty?: number;
  repetitionPenalty?: number;
  seed?: number;
  maxTokens?: number;
  stop?: string[];
  stopTokenIds?: number[];
  ignoreEos?: boolean;
  /** Return the top-N logprobs at each position. */
  logprobs?: number;
}

/** Most top logprobs one position may ask for (as vLLM's default `max_logprobs`). */
export const MAX_LOGPROBS = 20;

export class SamplingError extends Error {
  constructor(
    readonly field: string,
    message: string,
  ) {
    const snake = field.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);
    super(`sampling parameter "${field}"${snake !== field ? ` (${snake})` : ""}: ${message}`);
    this.name = "SamplingError";
  }
}

/**
 * Checks sampling parameters and returns a clean copy: only known fields, `null`/`undefined`
 * dropped, a single `stop` string wrapped in an array. Throws a SamplingError naming the field.
 */
export function validateSampling(p: unknown): SamplingParams {
  if (p == null) return {};
  if (typeof p !== "object" || Array.isArray(p)) throw new SamplingError("params", "must be an object");
  const src = p as Record<string, unknown>;
  const out: Record<string, unknown> = {};
  const num = (field: keyof SamplingParams, ok: (x: number) => boolean, want: string, int = false) => {
    const x = src[field];
    if (x == null) return;
    if (typeof x !== "number" || !Number.isFinite(x) || (int && !Number.isSafeInteger(x)) || !ok(x))
      throw new SamplingError(field, `must be ${want}, got ${JSON.stringify(x)}`);
    out[field] = x;
  };
  num("temperature", (x) => x >= 0, "a finite number >= 0");
  num("topP", (x) => x > 0 && x <= 1, "in (0, 1]");
  num("topK", (x) => x >= -1, "an integer >= -1 (0 or -1 disables it)", true);
  num("minP", (x) => x >= 0 && x <= 1, "in [0, 1]");
  num("presencePenalty", (x) => x >= -2 && x <= 2, "in [-2, 2]");
  num("frequencyPenalty", (x) => x >= -2 && x <= 2, "in [-2, 2]");
  num("repetitionPenalty", (x) => x > 0, "a finite number > 0");
  num("seed", () => true, "an integer", true);
  num("maxTokens", (x) => x >= 0, "an integer >= 0", true);
  num("logprobs", (x) => x >= 0 && x <= MAX_LOGPROBS, `an integer in [0, ${MAX_LOGPROBS}]`, true);

  const stop = typeof src.stop === "string" ? [src.stop] : src.stop;
  if (stop != null) {
    if (!Array.isArray(stop)) throw new SamplingError("stop", "must be a string or an array of strings");
    stop.forEach((s, i) => {
      if (typeof s !== "string" || s === "") throw new SamplingError("stop", `stop[${i}] must be a non-empty string`);
    });
    out.stop = [...stop];
  }
  const ids = src.stopTokenIds;
  if (ids != null) {
    if (!Array.isArray(ids)) throw new SamplingError("stopTokenIds", "must be an array of token ids");
    ids.forEach((id, i) => {
      if (!Number.isSafeInteger(id) || id < 0)
        throw new SamplingError("stopTokenIds", `stopTokenIds[${i}] must be an integer >= 0`);
    });
    out.stopTokenIds = [...ids];
  }
  if (src.ignoreEos != null) {
    if (typeof src.ignoreEos !== "boolean") throw new SamplingError("ignoreEos", "must be a boolean");
    out.ignoreEos = src.ignoreEos;
  }
  return out as SamplingParams;
}

// ---------------------------------------------------------------------------------------
// Helpers

/** Numerically stable log-softmax (float64 accumulation). All -Infinity in → all -Infinity out. */
export function logSoftmax(logits: Float32Array): Float32Array {
  const lse = logSumExp(logits);
  const out = new Float32Array(logits.length);
  for (let i = 0; i < logits.length; i++) out[i] = lse === -Infinity ? -Infinity : logits[i]! - lse;
  return out;
}

function logSumExp(x: ArrayLike<number>): number {
  let max = -Infinity;
  for (let i = 0; i < x.length; i++) if (x[i]! > max) max = x[i]!;
  if (max === -Infinity) return -Infinity;
  let sum = 0;
  for (let i = 0; i < x.length; i++) sum += Math.exp(x[i]! - max);
  return max + Math.log(sum);
}

/** The n largest entries, best first (ties → lowest id); -Infinity and NaN entries are skipped. */
export function topN(logprobs: ArrayLike<number>, n: number): Array<{ id: number; logprob: number }> {
  return selectTop(logprobs, n).map((id) => ({ id, logprob: logprobs[id]! }));
}

/**
 * Indices of the n largest values, best first, ties to the lowest index, via a size-n min-heap:
 * O(V log n), and a single comparison for most entries once the heap is full.
 */
function selectTop(v: ArrayLike<number>, n: number): number[] {
  const h: number[] = [];
  if (n <= 0) return h;
  // "a ranks below b": smaller value, or equal value and larger index.
  const below = (a: number, b: number) => v[a]! < v[b]! || (v[a] === v[b] && a > b);
  const swap = (i: number, j: number) => ([h[i], h[j]] = [h[j]!, h[i]!]);
  for (let i = 0; i < v.length; i++) {
    const x = v[i]!;
    if (!(x > -Infinity)) continue;
    if (h.length < n) {
      h.push(i);
      for (let c = h.length - 1, p = (c - 1) >> 1; c > 0 && below(h[c]!, h[p]!); c = p, p = (c - 1) >> 1) swap(c, p);
    } else if (x > v[h[0]!]!) {
      // (an equal value never replaces the root: the root's index is lower)
      h[0] = i;
      for (let p = 0; ; ) {
        const l = 2 * p + 1, r = l + 1;
        let m = p;
        if (l < n && below(h[l]!, h[m]!)) m = l;
        if (r < n && below(h[r]!, h[m]!)) m = r;
        if (m === p) break;
        swap(p, m);
        p = m;
      }
    }
  }
  return h.sort((a, b) => (below(a, b) ? 1 : -1));
}

/**
 * Top-p core: the smallest set of best-ranked ids (logit desc, ties to the lowest id) whose weight
 * reaches `target`, at least one. No full sort: ids are bucketed by -ln(w) = (max - l) / T in steps
 * of 1/64 nat; whole buckets above the boundary are kept, and only the boundary bucket is sorted.
 */
function nucleus(ids: number[], l: Float32Array, w: Float64Array, max: number, T: number, target: number): number[] {
  const NB = 4096;
  const bucket = (id: number) => Math.min(NB - 1, Math.floor(((max - l[id]!) / T) * 64));
  const m = new Float64Array(NB);
  for (const id of ids) {
    const k = bucket(id);
    m[k] = m[k]! + w[id]!;
  }
  let b = 0;
  for (; b < NB - 1 && m[b]! < target; b++) target -= m[b]!;
  const keep: number[] = [], edge: number[] = [];
  for (const id of ids) {
    const k = bucket(id);
    if (k < b) keep.push(id);
    else if (k === b) edge.push(id);
  }
  edge.sort((x, y) => l[y]! - l[x]! || x - y);
  for (const id of edge) {
    keep.push(id);
    if ((target -= w[id]!) <= 0) break;
  }
  return keep;
}

// ---------------------------------------------------------------------------------------
// Sampler

export interface Vocab {
  /** Number of logit rows (the model's vocab size). */
  size: number;
  /** Ids that may be emitted; others (e.g. rows beyond the tokenizer) are masked to -Infinity. */
  allowed?: (id: number) => boolean;
}

export interface SampleHistory {
  prompt: ArrayLike<number>;
  output: ArrayLike<number>;
}

export interface SampleResult {
  id: number;
  /** log-softmax of the raw logits (before penalties and temperature) at `id`. */
  logprob: number;
  /** Top-N of that same raw log-softmax, when `logprobs` is set. */
  top?: Array<{ id: number; logprob: number }>;
}

/** Temperatures below this sample greedily (vLLM's _SAMPLING_EPS). */
export const GREEDY_EPS = 1e-5;

/**
 * Per-request sampler. Order, as vLLM: mask disallowed ids → repetition penalty (prompt+output)
 * → frequency/presence penalties (output) → temperature (≈0: argmax, draws nothing from the rng)
 * → top-k → top-p → min-p (vLLM v0's order; v1 applies min-p before top-p).
 */
export class Sampler {
  readonly params: SamplingParams;
  private readonly masked: Int32Array;
  private readonly work: Float32Array; // masked, then penalized logits
  private readonly w: Float64Array; // exp((l - max) / T); the best token has weight 1
  private readonly counts: Uint32Array;

  constructor(params: SamplingParams, readonly vocab: Vocab) {
    this.params = validateSampling(params);
    if (!Number.isSafeInteger(vocab.size) || vocab.size <= 0) throw new RangeError(`bad vocab size ${vocab.size}`);
    const masked: number[] = [];
    if (vocab.allowed) for (let i = 0; i < vocab.size; i++) if (!vocab.allowed(i)) masked.push(i);
    this.masked = Int32Array.from(masked);
    this.work = new Float32Array(vocab.size);
    this.w = new Float64Array(vocab.size);
    this.counts = new Uint32Array(vocab.size);
  }

  sample(logits: Float32Array, history: SampleHistory, rng: Rng): SampleResult {
    const V = this.vocab.size;
    if (logits.length !== V) throw new RangeError(`expected ${V} logits, got ${logits.length}`);
    const { temperature: T = 1, topK = 0, topP = 1, minP = 0, logprobs } = this.params;
    const l = this.work;
    l.set(logits);
    for (const id of this.masked) l[id] = -Infinity;

    const lse = logSumExp(l);
    if (!Number.isFinite(lse)) throw new Error("no token can be sampled: logits are all -Infinity/masked, or hold NaN/+Infinity");
    const top = logprobs === undefined ? undefined : topN(l, logprobs).map((t) => ({ id: t.id, logprob: t.logprob - lse }));
    const result = (id: number): SampleResult => ({ id, logprob: logits[id]! - lse, ...(top && { top }) });

    this.penalize(history);

    let best = -1; // argmax, ties to the lowest id
    for (let i = 0, m = -Infinity; i < V; i++) {
      if (l[i]! > m) {
        m = l[i]!;
        best = i;
      }
    }
    if (best < 0) throw new Error("no token can be sampled: every penalized logit is -Infinity");
    if (T < GREEDY_EPS) return result(best);

    const w = this.w, max = l[best]!;
    let total = 0;
    for (let i = 0; i < V; i++) total += w[i] = Math.exp((l[i]! - max) / T);
    const idsWhere = (min: number) => {
      const ids: number[] = [];
      for (let i = 0; i < V; i++) if (w[i]! >= min) ids.push(i);
      return ids;
    };
    const mass = (ids: number[]) => ids.reduce((m, id) => m + w[id]!, 0);

    // Candidate ids after each filter; null = every id.
    let ids: number[] | null = null;
    if (topK > 0 && topK < V) ids = selectTop(l, topK);
    if (topP < 1) {
      const target = topP * (ids ? mass(ids) : total);
      // Ids lighter than t together weigh < V*t = (1-topP)*total: the nucleus lies within {w >= t}.
      ids = nucleus(ids ?? idsWhere(((1 - topP) * total) / V), l, w, max, T, target);
    }
    // prob < minP * maxProb  ⇔  w < minP (the best token, always kept, has w = 1)
    if (minP > 0) ids = ids ? ids.filter((id) => w[id]! >= minP) : idsWhere(minP);

    let u = rng.next() * (ids ? mass(ids) : total);
    if (ids) {
      for (const id of ids) if ((u -= w[id]!) < 0) return result(id);
      return result(ids[ids.length - 1]!); // rounding: u landed on the total
    }
    for (let i = 0; i < V; i++) if ((u -= w[i]!) < 0) return result(i);
    return result(best);
  }

  /** HF-style repetition penalty over prompt+output, then OpenAI-style frequency/presence over output. */
  private penalize({ prompt, output }: SampleHistory): void {
    const { repetitionPenalty: r = 1, frequencyPenalty: f = 0, presencePenalty: p = 0 } = this.params;
    const l = this.work, c = this.counts, V = l.length;
    const each = (fn: (id: number) => void) => {
      for (const a of [prompt, output])
        for (let i = 0; i < a.length; i++) {
          const id = a[i]!;
          if (id >= 0 && id < V) fn(id);
        }
    };
    if (r !== 1) {
      each((id) => {
        if (c[id]) return;
        c[id] = 1;
        l[id] = l[id]! > 0 ? l[id]! / r : l[id]! * r;
      });
      each((id) => (c[id] = 0));
    }
    if (f !== 0 || p !== 0) {
      for (let i = 0; i < output.length; i++) {
        const id = output[i]!;
        if (id >= 0 && id < V) c[id]!++;
      }
      for (let i = 0; i < output.length; i++) {
        const id = output[i]!;
        if (id >= 0 && id < V && c[id]) {
          l[id] = l[id]! - f * c[id]! - p;
          c[id] = 0;
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Stop strings

/**
 * Streams text while cutting it at the first stop string. Any tail that could still begin a
 * stop string is held back, so no part of a stop string is ever emitted, however the text is
 * split across pushes. The result does not depend on the split: the stop that completes first
 * (earliest end; at equal ends the one starting earliest) wins, and the text before it is emitted.
 */
export class StopMatcher {
  private held = "";
  private done = false;
  private readonly stops: string[];

  constructor(stops: string[]) {
    this.stops = stops.filter((s) => s.length > 0);
  }

  get stopped(): boolean {
    return this.done;
  }

  push(text: string): { emit: string; stopped: boolean } {
    if (this.done) return { emit: "", stopped: true };
    const buf = this.held + text;
    let cutStart = -1, cutEnd = Infinity;
    for (const s of this.stops) {
      const i = buf.indexOf(s);
      if (i >= 0 && (i + s.length < cutEnd || (i + s.length === cutEnd && i < cutStart))) {
        cutStart = i;
        cutEnd = i + s.length;
      }
    }
    if (cutStart >= 0) {
      this.done = true;
      this.held = "";
      return { emit: buf.slice(0, cutStart), stopped: true };
    }
    // Hold back the longest suffix of buf that is a proper prefix of some stop string.
    let hold = 0;
    for (const s of this.stops)
      for (let k = Math.min(s.length - 1, buf.length); k > hold; k--)
        if (buf.endsWith(s.slice(0, k))) {
          hold = k;
          break;
        }
    this.held = buf.slice(buf.length - hold);
    return { emit: buf.slice(0, buf.length - hold), stopped: false };
  }

  /** Held-back text at the end of generation ("" once stopped). */
  flush(): string {
    const out = this.held;
    this.held = "";
    return out;
  }
}
