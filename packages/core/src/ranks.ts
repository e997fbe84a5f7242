// Parallel ranks (DESIGN.md, "Parallel ranks"): N ranks of one model, each in its own worker
// thread with its own backend context, its own slice of the weights (read straight from the
// checkpoint) and its own latent cache. The engine drives them through the same `Executor`
// interface as LocalExecutor: every step description goes to every rank, rank 0 answers with
// the logits. On the CPU the ranks meet in SharedCollective, a shared-memory all-reduce /
// all-gather built on Atomics.
//
// Why Piscina with one thread per pool: a rank is long-lived state (weights, cache, the last
// hidden states for MTP) bound to one thread, not a stateless task. Piscina's load balancing
// would scatter a rank's work over threads, so each rank gets a pool of exactly one thread
// (minThreads = maxThreads = 1, idleTimeout = Infinity): the thread — and the module-level
// state of rank-worker.ts in it — lives as long as the executor, and the rank-to-thread
// (later rank-to-device) binding stays explicit. Piscina gives us the task/reply plumbing,
// ordering per rank, worker-exit detection and termination.
import { existsSync, readFileSync, realpathSync } from "node:fs";
import { availableParallelism } from "node:os";
import { dirname, isAbsolute, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { Piscina } from "piscina";
import { type BackendOptions, type BackendProvider, checkProvider, type Collective, requireOps, resolvePrecision } from "./backend.js";
import { placeRanks } from "./devices.js";
import type { ModelConfig } from "./config.js";
import { type CacheSpec, type Executor, loadConfig, type MtpInput, type StepInput, type StepSampling } from "./executor.js";
import { checkRanksFit } from "./fit.js";
import { checkParallel } from "./model.js";
import { Checkpoint } from "./safetensors.js";

// ---------------------------------------------------------------------------------------
// The CPU collective: shared memory between worker threads

// control words (Int32) of the shared buffer
const ABORT = 0; // 0 = healthy; 1 + rank that aborted; worldSize + 1 = the driver (main thread)
const COUNT = 1; // arrivals at the current barrier
const GEN = 2; // barrier generation: bumped by the last arrival, waited on by the others
// group spread over nodes: the last local arrival bumps LOCAL_SEQ instead of GEN, the node's link
// (nodes.ts) exchanges the local slots with the other nodes, fills in theirs and then bumps GEN
const LOCAL_SEQ = 3;
const HDR = 4; // then per rank: WAITING, ARRIVALS, and 2 x (op, length, chunk length) for the two parities
const WAITING = 0; // 1 while this rank waits in a barrier
const ARRIVALS = 1; // barriers this rank has entered
const OP_LEN = 2; // [parity*3] = op code, [parity*3 + 1] = message length, [parity*3 + 2] = values in this chunk
const PER_RANK = 8;

const OPS = ["", "allReduceSum", "allGatherCols", "broadcast (length)", "broadcast"] as const;

/** The shared memory of one SharedCollective group; structured-clone it to every rank. */
export interface CollectiveBuffers {
  worldSize: number;
  /** floats per rank per chunk: larger messages go through in chunks */
  chunk: number;
  ctl: SharedArrayBuffer;
  /** 2 parities x worldSize slots x chunk floats */
  data: SharedArrayBuffer;
  /**
   * the ranks in this process when the group spans nodes (processes or machines): the others'
   * slots are filled in by the node link (nodes.ts); absent: every rank is here
   */
  local?: { first: number; count: number };
}

// Atomics.waitAsync (Node 16+; not in this TypeScript lib's declarations)
const waitAsync = (Atomics as unknown as { waitAsync(a: Int32Array, i: number, v: number, t: number): { async: boolean; value: Promise<string> | string } }).waitAsync;

/** One rank's part of one collective chunk, as the node link moves it between nodes. */
export interface CollectivePart {
  rank: number;
  op: number;
  n: number;
  data: Float32Array;
}

/**
 * The node's side of a SharedCollective that spans nodes (the link in nodes.ts drives it):
 * wait for the local ranks to publish a chunk, read their parts, write the other nodes' parts and
 * release the local ranks.
 */
export class CollectivePort {
  private readonly ctl: Int32Array;
  private readonly slots: Float32Array[][];
  private seen = 0;
  private seq = 0;
  readonly local: { first: number; count: number };

  constructor(readonly b: CollectiveBuffers) {
    if (!b.local) throw new Error("CollectivePort: the collective does not span nodes (no local range)");
    this.local = b.local;
    this.ctl = new Int32Array(b.ctl);
    this.slots = [0, 1].map((p) => Array.from({ length: b.worldSize }, (_, r) => new Float32Array(b.data, ((p * b.worldSize + r) * b.chunk) * 4, b.chunk)));
  }

  get aborted(): boolean {
    return Atomics.load(this.ctl, ABORT) !== 0;
  }

  /**
   * The next chunk the local ranks have all published (its sequence number and their parts),
   * or null once the group is aborted. Waits without blocking the thread (Atomics.waitAsync).
   */
  async next(): Promise<{ seq: number; parts: CollectivePart[] } | null> {
    for (;;) {
      if (this.aborted) return null;
      if (Atomics.load(this.ctl, LOCAL_SEQ) !== this.seen) break;
      const w = waitAsync(this.ctl, LOCAL_SEQ, this.seen, 1000);
      if (w.async) await w.value;
    }
    this.seen++;
    const seq = this.seq++;
    const p = seq & 1;
    const parts: CollectivePart[] = [];
    for (let r = this.local.first; r < this.local.first + this.local.count; r++) {
      const b = HDR + r * PER_RANK + OP_LEN + 3 * p;
      const m = Atomics.load(this.ctl, b + 2);
      parts.push({ rank: r, op: Atomics.load(this.ctl, b), n: Atomics.load(this.ctl, b + 1), data: this.slots[p]![r]!.slice(0, m) });
    }
    return { seq, parts };
  }

  /** The other nodes' parts of chunk `seq` (the one next() returned last): write them, release the local ranks. */
  complete(seq: number, parts: CollectivePart[]): void {
    if (seq !== this.seq - 1) throw new Error(`CollectivePort: chunk ${seq} completed while chunk ${this.seq - 1} is open`);
    const p = seq & 1;
    for (const x of parts) {
      if (x.data.length > this.b.chunk) throw new Error(`CollectivePort: rank ${x.rank} sent ${x.data.length} values for a chunk of ${this.b.chunk}`);
      this.slots[p]![x.rank]!.set(x.data);
      const b = HDR + x.rank * PER_RANK + OP_LEN + 3 * p;
      Atomics.store(this.ctl, b, x.op);
      Atomics.store(this.ctl, b + 1, x.n);
      Atomics.store(this.ctl, b + 2, x.data.length);
      Atomics.add(this.ctl, HDR + x.rank * PER_RANK + ARRIVALS, 1);
    }
    Atomics.add(this.ctl, GEN, 1);
    Atomics.notify(this.ctl, GEN);
  }
}

/** Thrown in a rank whose collective was aborted because another rank (or the driver) failed. */
export class CollectiveAbortedError extends Error {
  override name = "CollectiveAbortedError";
}

/**
 * `Collective` over shared memory for ranks in worker threads of one process.
 *
 * Every collective goes in chunks of `chunk` floats per rank. Each chunk: every rank writes its
 * part into its slot, meets the others at a barrier, and reads all slots. Slots alternate
 * between two parities, so the barrier of chunk k+1 also proves that everyone finished reading
 * chunk k, and one barrier per chunk suffices. The all-reduce sums rank 0, 1, ..., N-1 in that
 * order on every rank, so every rank gets bit-identical results.
 *
 * Barriers use Atomics.wait with a timeout and check an abort word in the shared buffer: when a
 * rank fails (or the driver gives up on one), the others wake up and throw
 * CollectiveAbortedError instead of blocking forever.
 */
export class SharedCollective implements Collective {
  readonly worldSize: number;
  private readonly ctl: Int32Array;
  private readonly slots: Float32Array[][]; // [parity][rank]
  private readonly chunk: number;
  /** ranks in this process that meet at the barrier (all of them unless the group spans nodes) */
  private readonly localCount: number;
  private readonly spansNodes: boolean;
  private seq = 0; // chunks so far (same on every rank): picks the parity

  /** `local`: the ranks in this process when the group spans nodes (see CollectiveBuffers.local). */
  static allocate(worldSize: number, chunk = 1 << 20, local?: { first: number; count: number }): CollectiveBuffers {
    if (!Number.isInteger(worldSize) || worldSize < 1) throw new RangeError(`world size must be a positive integer, got ${worldSize}`);
    if (!Number.isInteger(chunk) || chunk < 1) throw new RangeError(`collective chunk must be a positive integer, got ${chunk}`);
    if (local && !(Number.isInteger(local.first) && Number.isInteger(local.count) && local.first >= 0 && local.count >= 1 && local.first + local.count <= worldSize))
      throw new RangeError(`local ranks [${local.first}, ${local.first + local.count}) outside [0, ${worldSize})`);
    return {
      worldSize,
      chunk,
      ctl: new SharedArrayBuffer((HDR + PER_RANK * worldSize) * 4),
      data: new SharedArrayBuffer(2 * worldSize * chunk * 4),
      ...(local && { local }),
    };
  }

  /** Abort a group from outside (the driver): every rank blocked in a barrier wakes up and throws. */
  static abort(b: CollectiveBuffers, by = b.worldSize + 1): void {
    const ctl = new Int32Array(b.ctl);
    Atomics.compareExchange(ctl, ABORT, 0, by);
    Atomics.notify(ctl, GEN);
    Atomics.notify(ctl, LOCAL_SEQ); // and the node link (CollectivePort.next), at once rather than at its next timeout
  }

  /** Ranks now waiting inside a barrier (for error messages: the others are the slow ones). */
  static waiting(b: CollectiveBuffers): number[] {
    const ctl = new Int32Array(b.ctl);
    const r: number[] = [];
    for (let i = 0; i < b.worldSize; i++) if (Atomics.load(ctl, HDR + i * PER_RANK + WAITING) === 1) r.push(i);
    return r;
  }

  constructor(
    b: CollectiveBuffers,
    readonly rank: number,
    /** the longest one rank waits for the others at one barrier */
    readonly timeoutMs = 300_000,
  ) {
    if (!Number.isInteger(rank) || rank < 0 || rank >= b.worldSize) throw new RangeError(`rank ${rank} outside [0, ${b.worldSize})`);
    this.worldSize = b.worldSize;
    this.chunk = b.chunk;
    this.spansNodes = b.local !== undefined;
    this.localCount = b.local?.count ?? b.worldSize;
    if (b.local && !(rank >= b.local.first && rank < b.local.first + b.local.count)) throw new RangeError(`rank ${rank} is not one of this node's ranks [${b.local.first}, ${b.local.first + b.local.count})`);
    this.ctl = new Int32Array(b.ctl);
    this.slots = [0, 1].map((p) => Array.from({ length: b.worldSize }, (_, r) => new Float32Array(b.data, ((p * b.worldSize + r) * b.chunk) * 4, b.chunk)));
  }

  /** Abort the group from this rank (it failed): the others wake up and throw. */
  abort(): void {
    Atomics.compareExchange(this.ctl, ABORT, 0, this.rank + 1);
    Atomics.notify(this.ctl, GEN);
    Atomics.notify(this.ctl, LOCAL_SEQ);
  }

  get aborted(): boolean {
    return Atomics.load(this.ctl, ABORT) !== 0;
  }

  allReduceSum(data: Float32Array): Float32Array {
    const n = data.length;
    const out = new Float32Array(n);
    const N = this.worldSize;
    let off = 0;
    do {
      const m = Math.min(this.chunk, n - off);
      const p = this.exchange(1, n, off === 0, data.subarray(off, off + m));
      const s = this.slots[p]!;
      const o = out.subarray(off, off + m);
      o.set(s[0]!.subarray(0, m));
      for (let r = 1; r < N; r++) {
        const x = s[r]!;
        for (let i = 0; i < m; i++) o[i]! += x[i]!;
      }
      off += m;
    } while (off < n);
    return out;
  }

  allGatherCols(data: Float32Array, rows: number): Float32Array {
    const n = data.length;
    const N = this.worldSize;
    if (!Number.isInteger(rows) || rows < 0 || (rows === 0 ? n !== 0 : n % rows !== 0))
      throw new RangeError(`allGatherCols: ${n} values do not make ${rows} rows`);
    const c = rows === 0 ? 0 : n / rows; // this rank's columns
    const out = new Float32Array(n * N);
    let off = 0;
    do {
      const m = Math.min(this.chunk, n - off);
      const p = this.exchange(2, n, off === 0, data.subarray(off, off + m));
      const s = this.slots[p]!;
      for (let r = 0; r < N; r++) {
        const x = s[r]!;
        // flat [off, off+m) of rank r's [rows, c] block -> columns [r*c, (r+1)*c) of out
        for (let j = off; j < off + m; ) {
          const row = Math.floor(j / c);
          const col = j - row * c;
          const len = Math.min(c - col, off + m - j);
          out.set(x.subarray(j - off, j - off + len), row * N * c + r * c + col);
          j += len;
        }
      }
      off += m;
    } while (off < n);
    return out;
  }

  /**
   * Rank 0's bytes to every rank, any length: first the length (two 24-bit halves, exact in
   * float32), then the bytes in chunks, copied bit for bit (never summed).
   */
  broadcast(bytes?: Uint8Array): Uint8Array {
    const root = this.rank === 0;
    if (root && !(bytes instanceof Uint8Array)) throw new TypeError("broadcast: rank 0 must pass the bytes (a Uint8Array)");
    const hdr = new Float32Array(2);
    if (root) {
      hdr[0] = Math.floor(bytes!.length / 2 ** 24);
      hdr[1] = bytes!.length % 2 ** 24;
    }
    const h = this.slots[this.exchange(3, 2, true, hdr)]![0]!;
    const n = h[0]! * 2 ** 24 + h[1]!;
    const words = Math.ceil(n / 4);
    // rank 0's bytes, padded to whole floats, viewed as floats (TypedArray.set of the same type copies bytes)
    let src = new Float32Array(0);
    if (root) {
      const padded = new Uint8Array(words * 4);
      padded.set(bytes!);
      src = new Float32Array(padded.buffer);
    }
    const out = new Uint8Array(n);
    let off = 0; // words
    do {
      const m = Math.min(this.chunk, words - off);
      const p = this.exchange(4, words, off === 0, root ? src.subarray(off, off + m) : src);
      const s0 = this.slots[p]![0]!;
      out.set(new Uint8Array(s0.buffer, s0.byteOffset, Math.min(m * 4, n - off * 4)), off * 4);
      off += m;
    } while (off < words);
    return out;
  }

  /** Publish this rank's chunk, meet the others; returns the parity whose slots now hold every rank's chunk. */
  private exchange(op: number, n: number, first: boolean, part: Float32Array): number {
    const p = this.seq++ & 1;
    const me = HDR + this.rank * PER_RANK;
    this.slots[p]![this.rank]!.set(part);
    Atomics.store(this.ctl, me + OP_LEN + 3 * p, op);
    Atomics.store(this.ctl, me + OP_LEN + 3 * p + 1, n);
    Atomics.store(this.ctl, me + OP_LEN + 3 * p + 2, part.length);
    this.barrier(OPS[op]!);
    if (first) {
      // every rank must be in the same collective with the same size, or the chunks would not line up
      for (let r = 0; r < this.worldSize; r++) {
        const b = HDR + r * PER_RANK + OP_LEN + 3 * p;
        const rop = Atomics.load(this.ctl, b);
        const rn = Atomics.load(this.ctl, b + 1);
        if (rop !== op || rn !== n) {
          this.abort();
          throw new Error(`collective mismatch: rank ${this.rank} is in ${OPS[op]}(${n} values) but rank ${r} is in ${OPS[rop] ?? "?"}(${rn} values)`);
        }
      }
    }
    return p;
  }

  private abortedError(what: string): CollectiveAbortedError {
    const by = Atomics.load(this.ctl, ABORT);
    const who = by === this.worldSize + 1 ? "the driver gave up on the step" : `rank ${by - 1} failed`;
    return new CollectiveAbortedError(`rank ${this.rank}: ${what} aborted (${who})`);
  }

  private barrier(what: string): void {
    const ctl = this.ctl;
    if (Atomics.load(ctl, ABORT) !== 0) throw this.abortedError(what);
    const me = HDR + this.rank * PER_RANK;
    const mine = Atomics.add(ctl, me + ARRIVALS, 1) + 1;
    const g = Atomics.load(ctl, GEN);
    if (Atomics.add(ctl, COUNT, 1) === this.localCount - 1) {
      Atomics.store(ctl, COUNT, 0);
      if (!this.spansNodes) {
        Atomics.add(ctl, GEN, 1);
        Atomics.notify(ctl, GEN);
        return;
      }
      // every rank of this node is in: the node link takes it from here and bumps GEN
      Atomics.add(ctl, LOCAL_SEQ, 1);
      Atomics.notify(ctl, LOCAL_SEQ);
    }
    Atomics.store(ctl, me + WAITING, 1);
    const deadline = Date.now() + this.timeoutMs;
    try {
      for (;;) {
        if (Atomics.load(ctl, ABORT) !== 0) throw this.abortedError(what);
        if (Atomics.load(ctl, GEN) !== g) return;
        const left = deadline - Date.now();
        if (left <= 0) {
          const late: number[] = [];
          for (let r = 0; r < this.worldSize; r++) if (Atomics.load(ctl, HDR + r * PER_RANK + ARRIVALS) < mine) late.push(r);
          this.abort();
          throw new Error(`rank ${this.rank}: ${what} timed out after ${this.timeoutMs} ms waiting for rank(s) ${late.join(", ")}`);
        }
        Atomics.wait(ctl, GEN, g, Math.min(left, 1000));
      }
    } finally {
      Atomics.store(ctl, me + WAITING, 0);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Messages between the driver and the rank workers

/** Test hook: make one rank fail at one step (tests only). */
export interface FaultInjection {
  rank: number;
  kind: "throw" | "exit" | "hang";
  /** which step() call fails, counting from 0 */
  atStep: number;
}

export interface RankInit {
  kind: "init";
  rank: number;
  worldSize: number;
  dir: string;
  /** file URL of the backend package's entry, resolved by the driver */
  backendUrl: string;
  backendPackage: string;
  backendOptions: Omit<BackendOptions, "collective">;
  cache: CacheSpec;
  mtp?: boolean;
  collective: CollectiveBuffers | null;
  collectiveTimeoutMs: number;
  fault?: FaultInjection;
  /** weight bytes this rank has read so far (one BigInt64, Atomics): the driver polls it for onWeights */
  progress?: SharedArrayBuffer;
}
export type RankTask =
  | RankInit
  | { kind: "step"; step: number; input: StepInput }
  | { kind: "stepSampled"; step: number; input: StepInput; sampling: StepSampling }
  | { kind: "mtp"; input: MtpInput }
  | { kind: "readCache"; layer: number; slot: number; count: number }
  | { kind: "close" };

export type RankReply =
  | {
      ok: true;
      data: Float32Array | null;
      /** stepSampled: the sampled ids and their logprobs (rank 0) */
      sampled?: { ids: Int32Array; logprobs: Float32Array };
      info?: { backendName: string; hasMtp: boolean; device: string; canSample: boolean };
    }
  | { ok: false; aborted: boolean; message: string };

// ---------------------------------------------------------------------------------------
// The driver

export interface RankExecutorOptions {
  /** backend package imported by name inside each worker, e.g. "@ds3/backend-cpu" (or a path / file URL to its entry) */
  backendPackage: string;
  /** passed to every rank's backend (the collective is made here; `threads` is per rank) */
  backendOptions?: Omit<BackendOptions, "collective">;
  cache: CacheSpec;
  mtp?: boolean;
  worldSize: number;
  /** backend threads per rank (default: the machine's cores divided among the ranks) */
  threadsPerRank?: number;
  /** a step (or MTP step) that a rank does not answer within this many ms fails (default 300 000; Infinity: no deadline) */
  stepTimeoutMs?: number;
  /** floats per rank per collective chunk (default 1 Mi = 4 MiB per rank and parity) */
  collectiveChunk?: number;
  /** device per rank (indices into the backend's `devices()`); default: rank r on device r */
  devices?: readonly number[];
  /** allow ranks to share a device (testing on one accelerator); turns device collectives off */
  shareDevices?: boolean;
  /** tests only: make one rank throw, exit, or hang at a given step */
  faultInjection?: FaultInjection;
  /**
   * progress of reading the weights, polled while the ranks load: (bytes read, bytes of the whole
   * checkpoint); world size 1 only (there the one rank reads the whole checkpoint)
   */
  onWeights?: (done: number, total: number) => void;
  /**
   * ranks on other nodes (processes or machines; nodes.ts: NodeHub, already connected): this
   * node runs ranks [0, perNode) in worker threads, the others run there. `devices` is then
   * per node (perNode entries).
   */
  nodes?: RankNodes;
}

/** One rank as the driver sees it: a worker thread here (a Piscina pool of one thread), or a rank on another node. */
export interface RankHandle {
  run(task: RankTask): Promise<RankReply>;
  destroy(): Promise<void>;
}

/** What RankExecutor needs of the nodes when its ranks span nodes (nodes.ts: NodeHub has it). */
export interface RankNodes {
  readonly nnodes: number;
  /** ranks per node; this node (node 0) runs ranks [0, perNode) */
  readonly perNode: number;
  /** handles of the ranks on the other nodes: ranks perNode .. worldSize-1 */
  remoteRanks(): RankHandle[];
  /** where a rank runs, for messages: "node 1 (10.0.0.2:41234) rank 9" */
  describe(rank: number): string;
  /** move this node's collective chunks to and from the other nodes (from now on) */
  link(coll: CollectiveBuffers): void;
  /** abort the collective on every node (a rank failed, or a step timed out) */
  abort(reason: string): void;
  /** a node was lost (its connection closed): `rank` is its first rank */
  onLost(f: (rank: number, message: string) => void): void;
  /** end the other nodes: they exit (non-zero with an error) */
  close(error?: string): Promise<void>;
}

/** A rank failed: it threw, its worker exited, or it did not answer in time. */
export class RankError extends Error {
  override name = "RankError";
  constructor(
    readonly rank: number,
    message: string,
  ) {
    super(message);
  }
}

const WORKER = "rank-worker.js";

/** A rank's worker thread: a Piscina pool of exactly one long-lived thread (see the top of this file). */
export function newRankThread(): RankHandle {
  return new Piscina<RankTask, RankReply>({ filename: workerUrl().href, minThreads: 1, maxThreads: 1, idleTimeout: Infinity, concurrentTasksPerWorker: 1 });
}

/** The built worker next to this module (dist/); from sources (src/), the built one in ../dist. */
function workerUrl(): URL {
  const here = new URL(`./${WORKER}`, import.meta.url);
  if (existsSync(fileURLToPath(here))) return here;
  const built = new URL(`../dist/${WORKER}`, import.meta.url);
  if (existsSync(fileURLToPath(built))) return built;
  throw new Error(`RankExecutor: worker entry ${fileURLToPath(here)} not found; build @ds3/core (pnpm --filter @ds3/core build)`);
}

/** The ESM entry of an installed package, from its package.json (exports "." import/node/default, else module/main). */
function packageEntry(dir: string): string {
  const pj = JSON.parse(readFileSync(join(dir, "package.json"), "utf8")) as { exports?: unknown; module?: string; main?: string };
  const pick = (e: unknown): string | null => {
    if (typeof e === "string") return e;
    if (Array.isArray(e)) {
      for (const x of e) {
        const r = pick(x);
        if (r) return r;
      }
      return null;
    }
    if (e && typeof e === "object") {
      const o = e as Record<string, unknown>;
      if ("." in o) return pick(o["."]);
      for (const k of ["import", "node", "default"]) if (k in o) {
        const r = pick(o[k]);
        if (r) return r;
      }
    }
    return null;
  };
  const rel = pick(pj.exports) ?? pj.module ?? pj.main ?? "index.js";
  return pathToFileURL(join(dir, rel)).href;
}

/**
 * Find a backend package by name for the workers to import. pnpm keeps packages strict, so
 * @ds3/core itself may not see the backend the application installed: look in node_modules
 * from here, from the working directory, and from the main script.
 */
export function resolveBackendPackage(spec: string): string {
  if (spec.startsWith("file:")) return spec;
  if (isAbsolute(spec)) return pathToFileURL(spec).href;
  const bases = [dirname(fileURLToPath(import.meta.url)), process.cwd()];
  if (process.argv[1]) {
    try {
      bases.push(dirname(realpathSync(process.argv[1])));
    } catch {
      /* no main script on disk */
    }
  }
  for (const base of bases)
    for (let d = base; ; d = dirname(d)) {
      const p = join(d, "node_modules", spec);
      if (existsSync(join(p, "package.json"))) return packageEntry(realpathSync(p));
      if (dirname(d) === d) break;
    }
  throw new Error(`backend package "${spec}" not found in node_modules from ${bases.join(", ")}; install it (e.g. pnpm add ${spec})`);
}

/** Bytes of every tensor of a checkpoint (the total that onWeights reports against). */
function checkpointBytes(dir: string): number {
  const ck = Checkpoint.open(dir);
  try {
    return ck.names().reduce((a, n) => a + ck.info(n).nbytes, 0);
  } finally {
    ck.close();
  }
}

/** The backend provider a module exports (as default or by name), checked against this core's contract. */
export async function importProvider(url: string, what = url): Promise<BackendProvider> {
  const mod = (await import(url)) as { default?: unknown } & Record<string, unknown>;
  const isProvider = (x: unknown): x is BackendProvider =>
    !!x && typeof x === "object" && typeof (x as BackendProvider).create === "function" && typeof (x as BackendProvider).available === "function";
  const provider = [mod.default, ...Object.values(mod)].find(isProvider);
  if (!provider) throw new Error(`backend package "${what}" exports no backend provider (an object with create() and available())`);
  return checkProvider(provider);
}

function describe(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

/** N ranks in N worker threads (one Piscina pool of one thread per rank), driven as one executor. */
export class RankExecutor implements Executor {
  private steps = 0;
  private broken: Error | null = null;
  private closing: Promise<void> | null = null;
  private queue: Promise<unknown> = Promise.resolve();
  private busy = 0;
  /** each rank's device, as its backend context names it (`BackendContext.device`) */
  rankDevices: string[] = [];
  /** each rank's device index (into the backend's `devices()`) */
  placement: number[] = [];

  private constructor(
    readonly config: ModelConfig,
    readonly cache: CacheSpec,
    readonly worldSize: number,
    readonly backendName: string,
    readonly hasMtp: boolean,
    readonly device: string,
    /** whether the ranks' backends sample on the device (`sample`); else rank 0 samples in its worker (RowSampler) */
    readonly backendSamples: boolean,
    private readonly pools: RankHandle[],
    private readonly coll: CollectiveBuffers | null,
    private readonly stepTimeoutMs: number,
    private readonly nodes: RankNodes | null = null,
  ) {
    nodes?.onLost((rank, message) => {
      // a node went away between steps: later steps fail at once, /health says why
      if (!this.broken) this.broken = new RankError(rank, `RankExecutor: ${message}`);
      if (this.coll) SharedCollective.abort(this.coll);
    });
  }

  /** where rank r runs, for messages: "rank 3", or "node 1 (10.0.0.2:41234) rank 3" across nodes */
  private who(r: number): string {
    return this.nodes ? this.nodes.describe(r) : `rank ${r}`;
  }

  static async create(dir: string, opts: RankExecutorOptions): Promise<RankExecutor> {
    const ws = opts.worldSize;
    if (!Number.isInteger(ws) || ws < 1) throw new RangeError(`RankExecutor: worldSize must be a positive integer, got ${ws}`);
    const cfg = loadConfig(dir);
    checkParallel(cfg, ws); // before any worker starts
    const f = opts.faultInjection;
    if (f && !(Number.isInteger(f.rank) && f.rank >= 0 && f.rank < ws)) throw new RangeError(`faultInjection.rank ${f.rank} outside [0, ${ws})`);
    const backendUrl = resolveBackendPackage(opts.backendPackage);
    // the placement is checked here, before any worker starts or any weight is read
    const provider = await importProvider(backendUrl, opts.backendPackage);
    const avail = provider.available();
    if (!avail.ok) throw new Error(`backend "${provider.name}" is not available: ${avail.reason}`);
    requireOps(provider, resolvePrecision(opts.backendOptions?.precision));
    const nodes = opts.nodes ?? null;
    if (nodes && nodes.perNode * nodes.nnodes !== ws) throw new RangeError(`RankExecutor: ${nodes.nnodes} nodes x ${nodes.perNode} ranks is not world size ${ws}`);
    const here = nodes ? nodes.perNode : ws; // ranks in this process: [0, here)
    const placement = placeRanks(provider, here, { devices: opts.devices, shareDevices: opts.shareDevices });
    // this node's ranks must fit their devices (weights + cache), checked from the headers before any
    // weight is read; a checkpoint that does not open is left to the ranks, which report it as a rank's load error
    checkRanksFit({ provider, ck: dir, cfg, worldSize: ws, devices: placement.devices, cache: opts.cache, mtp: opts.mtp });
    workerUrl(); // a missing build is an error now, not in every worker
    const stepTimeoutMs = opts.stepTimeoutMs ?? 300_000;
    if (!(stepTimeoutMs > 0)) throw new RangeError(`stepTimeoutMs must be positive, got ${stepTimeoutMs}`);
    const threads = opts.threadsPerRank ?? opts.backendOptions?.threads ?? Math.max(1, Math.floor(availableParallelism() / here));
    const coll = ws > 1 ? SharedCollective.allocate(ws, opts.collectiveChunk, nodes ? { first: 0, count: here } : undefined) : null;
    // across nodes the link runs from the start: a backend's create() may already broadcast (the NCCL id)
    if (nodes && coll) nodes.link(coll);
    const pools: RankHandle[] = [...Array.from({ length: here }, () => newRankThread()), ...(nodes ? nodes.remoteRanks() : [])];
    // weight-reading progress of a single rank: it counts into shared memory, the driver polls
    const progress = opts.onWeights && ws === 1 ? new SharedArrayBuffer(8) : undefined;
    let poll: NodeJS.Timeout | undefined;
    let pollFinal: (() => void) | undefined;
    if (progress) {
      const total = checkpointBytes(dir);
      const read = new BigInt64Array(progress);
      let last = -1;
      const report = () => {
        const done = Number(Atomics.load(read, 0));
        if (done !== last) opts.onWeights!((last = done), total);
      };
      poll = setInterval(report, 100);
      poll.unref();
      pollFinal = report;
    }
    const replies = await Promise.allSettled(
      pools.map((p, rank) =>
        p.run({
          kind: "init",
          rank,
          worldSize: ws,
          dir,
          backendUrl,
          backendPackage: opts.backendPackage,
          // a rank on another node gets its node's own threads, device and collective there (nodes.ts)
          backendOptions: {
            ...opts.backendOptions,
            threads,
            device: placement.devices[rank] ?? 0,
            ...(!placement.deviceCollectives && { deviceCollectives: false }),
          },
          cache: opts.cache,
          mtp: opts.mtp,
          collective: coll,
          // a safety net for ranks whose driver is gone: the driver's own deadline fires first
          collectiveTimeoutMs: Math.min(2 * stepTimeoutMs, 2 ** 31 - 1),
          fault: f,
          progress,
        }),
      ),
    );
    clearInterval(poll);
    let failure: RankError | null = null;
    // one rank is the whole model: its error (naming the file and tensor) is the whole story
    const where = (r: number) => (nodes ? nodes.describe(r) : `rank ${r}`);
    const failedToLoad = (rank: number, m: string) => new RankError(rank, ws === 1 ? m : `RankExecutor: ${where(rank)} failed to load: ${m}`);
    for (const [rank, r] of replies.entries()) {
      if (failure) break;
      if (r.status === "rejected") failure = failedToLoad(rank, describe(r.reason));
      else if (!r.value.ok) failure = failedToLoad(rank, r.value.message);
    }
    if (failure) {
      if (coll) SharedCollective.abort(coll);
      await Promise.allSettled(pools.map((p) => p.destroy()));
      await nodes?.close(failure.message);
      throw failure;
    }
    pollFinal?.();
    const infos = replies.map((r) => ((r as PromiseFulfilledResult<RankReply>).value as { info?: { canSample: boolean; device: string } }).info);
    const info = (replies[0] as PromiseFulfilledResult<RankReply & { ok: true }>).value.info;
    const canSample = infos.every((i) => i?.canSample === true);
    const ex = new RankExecutor(cfg, opts.cache, ws, info?.backendName ?? opts.backendPackage, info?.hasMtp ?? false, info?.device ?? "", canSample, pools, coll, stepTimeoutMs, nodes);
    ex.rankDevices = infos.map((i) => i?.device ?? "");
    ex.placement = placement.devices;
    return ex;
  }

  get vocabSize(): number {
    return this.config.vocabSize;
  }

  /** true once a rank failed: every further step rejects with that failure; close() is all that is left */
  get failed(): Error | null {
    return this.broken;
  }

  /**
   * Always: the ranks sample (`stepSampled`), on the device where the backend has `sample`, else
   * rank 0 in its worker with the engine's own sampler code (RowSampler). Either way only ids and
   * logprobs come back, and the sampling work stays off the engine's thread.
   */
  get canSampleOnDevice(): boolean {
    return true;
  }

  step(input: StepInput): Promise<Float32Array> {
    return this.serial(() => this.everyRank("step", (step) => ({ kind: "step", step, input }))).then((r) => r.data ?? new Float32Array(0));
  }

  /** `step`, with the logit rows sampled by the ranks (see canSampleOnDevice); rank 0's ids come back. */
  stepSampled(input: StepInput, sampling: StepSampling): Promise<{ ids: Int32Array; logprobs: Float32Array }> {
    return this.serial(() => this.everyRank("step", (step) => ({ kind: "stepSampled", step, input, sampling }))).then((r) => {
      if (!r.sampled) throw new Error("RankExecutor: rank 0 sent no sampled ids");
      return r.sampled;
    });
  }

  mtp(input: MtpInput): Promise<Float32Array> {
    if (!this.hasMtp) return Promise.reject(new Error("this model has no MTP block loaded"));
    return this.serial(() => this.everyRank("mtp", () => ({ kind: "mtp", input }))).then((r) => r.data ?? new Float32Array(0));
  }

  readCache(layer: number, slot: number, count: number): Promise<Float32Array> {
    return this.serial(async () => {
      const r = await this.pools[0]!.run({ kind: "readCache", layer, slot, count });
      if (!r.ok) throw new Error(`RankExecutor: rank 0: ${r.message}`);
      return r.data!;
    });
  }

  /** Run calls one after another (each rank's pool also keeps order; this keeps the bookkeeping simple). */
  private serial<T>(f: () => Promise<T>): Promise<T> {
    const p = this.queue.then(() => {
      if (this.closing) throw new Error("RankExecutor: closed");
      if (this.broken) throw this.broken;
      return f();
    });
    this.queue = p.catch(() => undefined);
    return p;
  }

  /** Post the same task to every rank; rank 0's reply carries the result. Fails on the first rank that fails. */
  private everyRank(what: "step" | "mtp", task: (step: number) => RankTask): Promise<RankReply & { ok: true }> {
    const N = this.worldSize;
    const step = what === "step" ? this.steps++ : this.steps - 1;
    const at = what === "step" ? `step ${step}` : `the MTP step after step ${step}`;
    this.busy++;
    return new Promise<RankReply & { ok: true }>((resolve, reject) => {
      const answered = new Array<boolean>(N).fill(false);
      let left = N;
      let first: (RankReply & { ok: true }) | null = null;
      let aborted: RankError | null = null;
      let done = false;
      const finish = (err: RankError | null) => {
        if (done) return;
        done = true;
        this.busy--;
        clearTimeout(timer);
        if (err) {
          this.broken = err;
          if (this.coll) SharedCollective.abort(this.coll); // wake the ranks still blocked in a collective
          this.nodes?.abort(err.message); // ... on every node
          reject(err);
        } else resolve(first ?? { ok: true, data: null });
      };
      const timer = Number.isFinite(this.stepTimeoutMs)
        ? setTimeout(() => {
            const pending = [...answered.keys()].filter((r) => !answered[r]);
            const inBarrier = new Set(this.coll ? SharedCollective.waiting(this.coll) : []);
            const stuck = pending.filter((r) => !inBarrier.has(r));
            const culprits = stuck.length > 0 ? stuck : pending;
            const waiting = pending.filter((r) => inBarrier.has(r));
            finish(
              new RankError(
                culprits[0]!,
                `RankExecutor: ${culprits.map((r) => this.who(r)).join(", ")} did not answer within ${this.stepTimeoutMs} ms (${at})` +
                  (waiting.length && stuck.length ? `; rank ${waiting.join(", ")} waiting for it in a collective` : ""),
              ),
            );
          }, this.stepTimeoutMs)
        : undefined;
      for (let r = 0; r < N; r++) {
        this.pools[r]!.run(task(step)).then(
          (rep) => {
            answered[r] = true;
            left--;
            if (rep.ok) {
              if (r === 0) first = rep;
            } else if (rep.aborted) {
              // a consequence, not a cause: keep waiting for the rank that failed (or the deadline)
              aborted ??= new RankError(r, `RankExecutor: ${rep.message} (${at})`);
            } else return finish(new RankError(r, `RankExecutor: ${this.who(r)} failed at ${at}: ${rep.message}`));
            if (left === 0) finish(aborted);
          },
          (e) => {
            answered[r] = true;
            left--;
            const m = describe(e);
            finish(new RankError(r, `RankExecutor: ${this.who(r)} ${/exited/.test(m) ? "exited" : "failed"} at ${at}: ${m}`));
          },
        );
      }
    });
  }

  /** Stop every rank: dispose the backends when healthy, then terminate the workers (also hung ones). */
  close(): Promise<void> {
    this.closing ??= (async () => {
      if (!this.broken && this.busy === 0) {
        const bye = Promise.allSettled(this.pools.map((p) => p.run({ kind: "close" })));
        let t: NodeJS.Timeout | undefined;
        await Promise.race([bye, new Promise((r) => (t = setTimeout(r, 10_000)))]);
        clearTimeout(t);
      }
      if (this.coll) SharedCollective.abort(this.coll);
      await Promise.allSettled(this.pools.map((p) => p.destroy()));
      await this.nodes?.close(this.broken?.message);
    })();
    return this.closing;
  }
}
