// One rank of a RankExecutor, in its own worker thread (a Piscina pool of exactly one thread,
// so the module-level state below lives as long as the executor). The rank imports its backend
// package by name, creates its own context with the shared-memory collective, loads its own
// slice of the weights from the checkpoint and allocates its own latent cache.
//
// A task never throws: failures come back as { ok: false } so the driver can tell a rank that
// failed (the cause) from ranks whose collective was aborted because of it (the consequences).
import { move, transferableSymbol, valueSymbol } from "piscina";
import { type BackendContext, requireOps, resolvePrecision, type Tensor } from "./backend.js";
import { loadConfig, RowSampler } from "./executor.js";
import { Transformer } from "./model.js";
import { CollectiveAbortedError, type FaultInjection, importProvider, type RankInit, type RankReply, type RankTask, SharedCollective } from "./ranks.js";
import { Checkpoint } from "./safetensors.js";

interface RankState {
  rank: number;
  ctx: BackendContext;
  model: Transformer;
  coll: SharedCollective | null;
  last: Tensor | null;
  fault?: FaultInjection;
  /** rank 0 of a backend without `sample`: samples the downloaded logits here */
  rowSampler: RowSampler | null;
}

let st: RankState | null = null;

/** An array that owns its whole (non-shared) buffer, so the buffer can be handed over. */
function own<T extends Float32Array | Int32Array>(a: T): T {
  return a.byteOffset !== 0 || a.byteLength !== a.buffer.byteLength || !(a.buffer instanceof ArrayBuffer) ? (a.slice() as T) : a;
}

function ok(data: Float32Array | null = null, sampled?: { ids: Int32Array; logprobs: Float32Array }): RankReply {
  const reply: RankReply & { ok: true } = { ok: true, data: data && own(data) };
  if (sampled) reply.sampled = { ids: own(sampled.ids), logprobs: own(sampled.logprobs) };
  const buffers: ArrayBuffer[] = [];
  if (reply.data) buffers.push(reply.data.buffer as ArrayBuffer);
  if (reply.sampled) buffers.push(reply.sampled.ids.buffer as ArrayBuffer, reply.sampled.logprobs.buffer as ArrayBuffer);
  if (!buffers.length) return reply;
  // hand the buffers over instead of copying them (Piscina's Transferable protocol: the driver
  // receives `reply`, with the buffers in the transfer list)
  return move({ [transferableSymbol]: buffers, [valueSymbol]: reply } as never) as unknown as RankReply;
}

function state(): RankState {
  if (!st) throw new Error("rank is not initialized (or was closed)");
  return st;
}

async function init(t: RankInit): Promise<RankReply> {
  const provider = await importProvider(t.backendUrl, t.backendPackage);
  const avail = provider.available();
  if (!avail.ok) throw new Error(`backend "${provider.name}" is not available: ${avail.reason}`);
  requireOps(provider, resolvePrecision(t.backendOptions.precision));
  const coll = t.collective ? new SharedCollective(t.collective, t.rank, t.collectiveTimeoutMs) : null;
  const cfg = loadConfig(t.dir);
  const ctx = provider.create({ ...t.backendOptions, collective: coll ?? undefined });
  let model: Transformer;
  try {
    const ck = Checkpoint.open(t.dir);
    try {
      const read = t.progress ? new BigInt64Array(t.progress) : null;
      const onRead = read ? (b: number) => void Atomics.add(read, 0, BigInt(b)) : undefined;
      model = new Transformer(ctx, ck, cfg, { rank: { rank: t.rank, worldSize: t.worldSize }, mtp: t.mtp, onRead });
    } finally {
      ck.close();
    }
    model.allocCache(t.cache.numBlocks, t.cache.blockSize, t.cache.dtype);
  } catch (e) {
    ctx.dispose();
    throw e;
  }
  st = { rank: t.rank, ctx, model, coll, last: null, fault: t.fault?.rank === t.rank ? t.fault : undefined, rowSampler: t.rank === 0 && !ctx.sample ? new RowSampler() : null };
  return { ok: true, data: null, info: { backendName: ctx.name, hasMtp: model.mtp !== null, device: ctx.device, canSample: typeof ctx.sample === "function" } };
}

/** Test hook: fail the way the tests ask for. */
function injectFault(f: FaultInjection, step: number): void {
  if (f.kind === "throw") throw new Error(`injected fault at step ${step}`);
  if (f.kind === "exit") process.exit(7); // in a worker thread this ends the thread, not the process
  // hang: block this thread for good (no CPU burnt); only terminating the worker ends it
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0);
}

export default async function rank(t: RankTask): Promise<RankReply> {
  try {
    switch (t.kind) {
      case "init":
        return await init(t);
      case "step": {
        const s = state();
        if (s.fault && s.fault.atStep === t.step) injectFault(s.fault, t.step);
        s.ctx.beginStep();
        s.last = null;
        const r = s.model.forward(t.input.ids, t.input, t.input.logitRows);
        s.last = r.hidden;
        return ok(s.rank === 0 ? r.logits : null);
      }
      case "stepSampled": {
        // every rank runs the same ops (the collectives line up) and rank 0 answers with the ids:
        // sampled on the device by backends with `sample` (every rank alike), else by rank 0 here
        const s = state();
        if (s.fault && s.fault.atStep === t.step) injectFault(s.fault, t.step);
        s.ctx.beginStep();
        s.last = null;
        if (s.ctx.sample) {
          const r = s.model.forwardSampled(t.input.ids, t.input, t.input.logitRows, t.sampling);
          s.last = r.hidden;
          return ok(null, s.rank === 0 ? { ids: r.ids, logprobs: r.logprobs } : undefined);
        }
        const r = s.model.forward(t.input.ids, t.input, t.input.logitRows);
        s.last = r.hidden;
        return ok(null, s.rowSampler?.sample(r.logits, s.model.cfg.vocabSize, t.sampling));
      }
      case "mtp": {
        const s = state();
        if (!s.last) throw new Error("mtp() needs a target step first");
        const h = s.ctx.rows(s.last, t.input.rows);
        const r = s.model.forwardMtp(h, t.input.nextIds, t.input, t.input.logitRows);
        return ok(s.rank === 0 ? r.logits : null);
      }
      case "readCache": {
        const s = state();
        return ok(s.ctx.readCache(s.model.cache!, t.layer, t.slot, t.count));
      }
      case "close": {
        const s = st;
        st = null;
        s?.ctx.dispose();
        return ok();
      }
    }
  } catch (e) {
    const aborted = e instanceof CollectiveAbortedError;
    if (!aborted) st?.coll?.abort(); // wake the ranks waiting for this one
    const message = e instanceof Error ? e.message : String(e);
    return { ok: false, aborted, message };
  }
}
