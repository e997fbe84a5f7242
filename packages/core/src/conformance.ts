// The conformance suite of the backend contract, parameterized by provider: every op on random
// inputs against a float64 reference (exact mode), the collectives and the golden checkpoints end
// to end through worker ranks at world size 1, 2 and 4, and rank placement. The vitest file
// (test/conformance/) and `ds3 selftest` both run this code, so what CI checks on the CPU is what a
// user with other hardware runs and sends back.
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { type BackendContext, type BackendProvider, checkProvider, EXACT, OPS, type Precision, PRECISION_NAMES, type PrecisionName, PRECISIONS, REQUIRED_OPS, type Tensor } from "./backend.js";
import { drift, goldenFloor, precisionOpChecks, quantizerChecks } from "./conformance-precision.js";
import { loadConfig } from "./executor.js";
import { placeRanks } from "./devices.js";
import { RankExecutor } from "./ranks.js";
import { bf16Weight, type CheckDraft, type ConformanceCheck, f32Weight, fp8e4m3Decode, fp8Weight, GATE, Inputs, normErr, OP_TOL, OpSuite, refLinear, silu } from "./conformance-common.js";

export { type ConformanceCheck, fp8e4m3Decode, normErr };

export interface ConformanceReport {
  backend: string;
  device: string;
  /** every gating check passed */
  ok: boolean;
  /** the precisions asked for, in order, and what became of each */
  precisions: Array<{ name: PrecisionName; precision: Precision; status: "ran" | "not supported" }>;
  checks: ConformanceCheck[];
}

export interface ConformanceOptions {
  /**
   * which precisions to run: a name, a list, or "all" (the default): every precision at which the
   * backend supports at least one op; the others are reported as not supported. A precision asked
   * for by name that the backend does not support is a failure.
   */
  precision?: PrecisionName | "all" | readonly PrecisionName[];
  /** golden checkpoint directories (golden.json + golden.f32 next to the weights) for the end-to-end checks */
  goldenDirs?: string[];
  /** world sizes of the end-to-end rank checks (default 1, 2, 4) */
  worldSizes?: number[];
  /** random seed of the op inputs */
  seed?: number;
  /** progress lines */
  onCheck?: (c: ConformanceCheck) => void;
}

const GOLDEN_TOL = 1e-3;

/** The op checks on one context (exact mode). */
function opChecks(ctx: BackendContext, provider: BackendProvider, seed: number): CheckDraft[] {
  const inp = new Inputs(seed);
  const s = new OpSuite(ctx, provider, EXACT, inp, "in exact mode", (n, scale) => inp.vec(n, scale), (v) => v);
  const { run, T } = s;
  const up = (x: Float32Array, shape: number[]): Tensor => s.up(x, shape);
  const a = s.basicOps([
    { name: "linear (bf16 weight)", make: (N, K) => bf16Weight(inp, N, K) },
    { name: "linear (fp8 weight, 128x128 block scales, slice inside a block)", make: (N, K) => fp8Weight(inp, N, K, [100, 50]) },
  ]);

  // routing: noaux_tc (sigmoid scores, the bias chooses, groups limit, weights renormalized and scaled)
  const { E, topk, Dg } = GATE;
  const xg = inp.vec(6 * Dg);
  const gw = inp.vec(E * Dg, 0.3);
  const bias = inp.vec(E, 0.2);
  s.moeGate("moeGate (sigmoid, correction bias, group limit)", xg, gw, bias);
  run("moeExperts (experts 4..11 of 16 on this rank)", "moeExperts", () => {
    const Dm = 64;
    const I = 48;
    const first = 4;
    const count = 8;
    const x = inp.vec(T * Dm);
    const ws = Array.from({ length: count }, () => ({ w1: inp.vec(I * Dm, 0.1), w2: inp.vec(Dm * I, 0.1), w3: inp.vec(I * Dm, 0.1) }));
    const set = ctx.expertSet(
      first,
      ws.map((e, i) => ({ w1: ctx.weight(f32Weight(`e${i}.w1`, e.w1, I, Dm)), w2: ctx.weight(f32Weight(`e${i}.w2`, e.w2, Dm, I)), w3: ctx.weight(f32Weight(`e${i}.w3`, e.w3, I, Dm)) })),
    );
    const routing = s.routing(topk);
    const got = ctx.download(ctx.moeExperts(up(x, [T, Dm]), set, up(routing, [T, 2 * topk]), topk));
    const ref = new Float64Array(T * Dm);
    for (let t = 0; t < T; t++)
      for (let k = 0; k < topk; k++) {
        const e = routing[t * 2 * topk + topk + k]! - first;
        if (e < 0 || e >= count) continue;
        const xt = x.subarray(t * Dm, (t + 1) * Dm);
        const h1 = refLinear(xt, 1, ws[e]!.w1, I, Dm);
        const h3 = refLinear(xt, 1, ws[e]!.w3, I, Dm);
        const y = refLinear(Float64Array.from(h1, (v, i) => silu(v) * h3[i]!), 1, ws[e]!.w2, Dm, I);
        for (let i = 0; i < Dm; i++) ref[t * Dm + i]! += routing[t * 2 * topk + k]! * y[i]!;
      }
    return { got, ref };
  }, OP_TOL);
  return s.lastOps("mla (absorbed, paged cache, two sequences, prefill then decode)", a);
}

interface GoldenPrompt {
  ids: number[];
  logits: Float32Array;
  greedy: number[];
}

function readGolden(dir: string): GoldenPrompt[] {
  const g = JSON.parse(readFileSync(join(dir, "golden.json"), "utf8")) as {
    prompts: Array<{ ids: number[]; logits_offset: number; logits_shape: [number, number]; greedy: number[] }>;
  };
  const buf = readFileSync(join(dir, "golden.f32"));
  const f32 = new Float32Array(buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength));
  return g.prompts.map((p) => ({ ids: p.ids, greedy: p.greedy, logits: f32.slice(p.logits_offset / 4, p.logits_offset / 4 + p.logits_shape[0] * p.logits_shape[1]) }));
}

/**
 * Each golden prompt through `ws` worker ranks (at `precision`, or exact mode where absent):
 * `on.logits` gets the logits of every position, then `on.greedy` the first greedy id the ranks
 * sample (on the device where the backend samples, else rank 0). Closes the ranks, also when a
 * callback throws.
 */
async function throughRanks(
  provider: BackendProvider,
  dir: string,
  ws: number,
  prompts: GoldenPrompt[],
  precision: Precision | undefined,
  on: { logits: (p: GoldenPrompt, logits: Float32Array) => void; greedy: (p: GoldenPrompt, id: number | undefined) => void },
): Promise<void> {
  const maxLen = Math.max(...prompts.map((p) => p.ids.length));
  const blockSize = 64;
  const maxBlocks = Math.ceil(maxLen / blockSize);
  let ex: RankExecutor | null = null;
  try {
    ex = await RankExecutor.create(dir, {
      backendPackage: provider.entry!,
      ...(precision && { backendOptions: { precision } }),
      cache: { numBlocks: maxBlocks, blockSize, dtype: precision?.cache ?? "f32" },
      worldSize: ws,
      threadsPerRank: 1,
      ...(ws > 1 && { shareDevices: placeNeedsSharing(provider, ws) }),
    });
    for (const p of prompts) {
      const L = p.ids.length;
      const input = { ids: Int32Array.from(p.ids), positions: Int32Array.from({ length: L }, (_, i) => i), seqIdx: new Int32Array(L), blockTables: Int32Array.from({ length: maxBlocks }, (_, i) => i), maxBlocks };
      const logits = await ex.step({ ...input, logitRows: Int32Array.from({ length: L }, (_, i) => i) });
      on.logits(p, logits);
      // the same step, sampled by the ranks
      const s = await ex.stepSampled({ ...input, logitRows: Int32Array.of(L - 1) }, { params: [{ temperature: 0, topK: 0, topP: 1, minP: 0 }], u: new Float64Array(1), vocabLimit: logits.length / L });
      on.greedy(p, s.ids[0]);
    }
  } finally {
    await ex?.close();
  }
}

const goldenName = (dir: string, ws: number) => `${dir.split(/[\\/]/).filter(Boolean).pop()} at world size ${ws}`;

/** Golden logits (every position) and the first greedy id through worker ranks at world size N. */
async function goldenCheck(provider: BackendProvider, dir: string, ws: number): Promise<CheckDraft[]> {
  const name = goldenName(dir, ws);
  const prompts = readGolden(dir);
  try {
    let worst = 0;
    let wrongIds = 0;
    await throughRanks(provider, dir, ws, prompts, undefined, {
      logits: (p, logits) => void (worst = Math.max(worst, logits.length === p.logits.length ? maxAbs(logits, p.logits) : Infinity)),
      greedy: (p, id) => {
        if (id !== p.greedy[0]) wrongIds++;
      },
    });
    return [
      { name: `${name}: golden logits, every position`, ok: worst <= GOLDEN_TOL, worst, tolerance: GOLDEN_TOL },
      { name: `${name}: greedy ids sampled by the ranks`, ok: wrongIds === 0, worst: wrongIds, tolerance: 0, ...(wrongIds && { detail: `${wrongIds} of ${prompts.length} prompts` }) },
    ];
  } catch (e) {
    return [{ name: `${name}: golden logits, every position`, ok: false, worst: NaN, tolerance: GOLDEN_TOL, detail: e instanceof Error ? e.message : String(e) }];
  }
}

/**
 * At a non-exact precision: how far the golden logits move through worker ranks at world size N.
 * Gates on the mean cosine similarity floor (COSINE_FLOOR); min cosine, KL, top-1 agreement and
 * the greedy id only inform (no fixed bound meets these random models: routing flips).
 */
async function goldenDrift(provider: BackendProvider, dir: string, ws: number, pname: Exclude<PrecisionName, "exact">): Promise<CheckDraft[]> {
  const name = goldenName(dir, ws);
  let floor = goldenFloor(pname, true);
  const prompts = readGolden(dir);
  try {
    floor = goldenFloor(pname, loadConfig(dir).quantization !== null);
    let rows = 0;
    const acc = { meanCos: 0, minCos: 1, meanKl: 0, maxKl: 0, top1: 0, maxAbs: 0 };
    let wrongIds = 0;
    await throughRanks(provider, dir, ws, prompts, PRECISIONS[pname], {
      logits: (p, logits) => {
        const L = p.ids.length;
        if (logits.length !== p.logits.length) throw new Error(`${logits.length} logits for ${p.logits.length} golden values`);
        const d = drift(logits, p.logits, L, logits.length / L);
        acc.meanCos += d.meanCos * L;
        acc.meanKl += d.meanKl * L;
        acc.minCos = Math.min(acc.minCos, d.minCos);
        acc.maxKl = Math.max(acc.maxKl, d.maxKl);
        acc.top1 += d.top1;
        acc.maxAbs = Math.max(acc.maxAbs, d.maxAbs);
        rows += L;
      },
      greedy: (p, id) => {
        if (id !== p.greedy[0]) wrongIds++;
      },
    });
    const meanCos = acc.meanCos / rows;
    const metrics = { meanCos, minCos: acc.minCos, meanKl: acc.meanKl / rows, maxKl: acc.maxKl, top1: acc.top1 / rows, maxAbs: acc.maxAbs };
    const f = (x: number) => x.toPrecision(4);
    return [
      { name: `${name}: golden logits, mean cosine similarity over every position`, ok: meanCos >= floor, worst: meanCos, tolerance: floor, bound: "min", metrics },
      {
        name: `${name}: golden logits, drift`,
        kind: "info",
        ok: true,
        worst: metrics.meanKl,
        tolerance: NaN,
        metrics,
        detail: `mean KL ${f(metrics.meanKl)}, max KL ${f(metrics.maxKl)}, min cosine ${f(metrics.minCos)}, top-1 agreement ${(100 * metrics.top1).toFixed(1)}% of ${rows} positions, max |logit - golden| ${f(metrics.maxAbs)}`,
      },
      { name: `${name}: greedy ids sampled by the ranks`, kind: "info", ok: true, worst: wrongIds, tolerance: NaN, detail: `${prompts.length - wrongIds} of ${prompts.length} prompts give the golden first greedy id` },
    ];
  } catch (e) {
    return [{ name: `${name}: golden logits, mean cosine similarity over every position`, ok: false, worst: NaN, tolerance: floor, bound: "min", detail: e instanceof Error ? e.message : String(e) }];
  }
}

function maxAbs(a: Float32Array, b: Float32Array): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i]! - b[i]!);
    if (!(d <= m)) m = Number.isNaN(d) ? Infinity : d;
  }
  return m;
}

/** whether `ws` ranks need shareDevices on this provider (fewer non-shareable devices than ranks) */
function placeNeedsSharing(p: BackendProvider, ws: number): boolean {
  try {
    placeRanks(p, ws);
    return false;
  } catch {
    return true;
  }
}

/** Rank placement as the contract says: devices listed, distinct per rank unless shareable. */
function placementCheck(p: BackendProvider): CheckDraft {
  const name = "devices() and rank placement";
  try {
    const d = p.devices();
    const bad = d.filter((x, i) => x.index !== i || typeof x.name !== "string" || !(x.memoryTotal > 0) || !(x.memoryFree >= 0 || Number.isNaN(x.memoryFree)));
    if (!d.length || bad.length) return { name, ok: false, worst: bad.length, tolerance: 0, detail: d.length ? `malformed devices: ${JSON.stringify(bad)}` : "no devices" };
    const pl = placeRanks(p, Math.min(d.length, 2) || 1);
    const distinct = d[0]!.shareable || new Set(pl.devices).size === pl.devices.length;
    let dupRefused = false;
    if (!d[0]!.shareable && d.length >= 1) {
      try {
        placeRanks(p, 2, { devices: [0, 0] });
      } catch {
        dupRefused = true;
      }
    } else dupRefused = true;
    return { name, ok: distinct && dupRefused, worst: 0, tolerance: 0, detail: `${d.length} device${d.length === 1 ? "" : "s"}: ${d.map((x) => x.name).join("; ")}` };
  } catch (e) {
    return { name, ok: false, worst: NaN, tolerance: 0, detail: e instanceof Error ? e.message : String(e) };
  }
}

/** the precisions `opts.precision` names, in the suite's order, and whether each was named explicitly */
function precisionsAsked(o: ConformanceOptions["precision"]): { names: PrecisionName[]; explicit: boolean } {
  if (o === undefined || o === "all") return { names: [...PRECISION_NAMES], explicit: false };
  const list = typeof o === "string" ? [o] : [...o];
  for (const n of list)
    if (!(PRECISION_NAMES as readonly string[]).includes(n)) throw new RangeError(`unknown precision "${n}" (one of ${PRECISION_NAMES.join(", ")}, or "all")`);
  return { names: PRECISION_NAMES.filter((n) => list.includes(n)), explicit: true };
}

const describePrecision = (p: Precision) => `activations ${p.activations}, cache ${p.cache}, ${p.actQuant === "none" ? "no activation quantization" : `activations quantized ${p.actQuant} in front of FP8 weights`}`;

/** Run the whole suite on one provider. Never throws for a failing backend: failures are checks. */
export async function runConformance(provider: BackendProvider, opts: ConformanceOptions = {}): Promise<ConformanceReport> {
  checkProvider(provider);
  const asked = precisionsAsked(opts.precision);
  const checks: ConformanceCheck[] = [];
  const precisions: ConformanceReport["precisions"] = [];
  let current: PrecisionName = "exact";
  const add = (c: CheckDraft) => {
    const full: ConformanceCheck = { ...c, precision: current, kind: c.kind ?? "gate" };
    checks.push(full);
    opts.onCheck?.(full);
  };
  const report = (device: string): ConformanceReport => ({ backend: provider.name, device, ok: checks.every((c) => c.ok), precisions, checks });
  current = asked.names[0]!;
  const av = provider.available();
  if (!av.ok) {
    add({ name: "available()", ok: false, worst: NaN, tolerance: 0, detail: av.reason });
    return report("");
  }
  add(placementCheck(provider));
  let device = "";
  const dirs = opts.goldenDirs ?? [];
  for (const pname of asked.names) {
    current = pname;
    const precision: Precision = PRECISIONS[pname];
    const supported = REQUIRED_OPS.filter((o) => provider.supports(o, precision)).length;
    if (!supported) {
      precisions.push({ name: pname, precision, status: "not supported" });
      if (asked.explicit) add({ name: `precision ${pname} (${describePrecision(precision)})`, ok: false, worst: NaN, tolerance: NaN, detail: `backend "${provider.name}" supports no op at this precision` });
      else add({ name: `precision ${pname} (${describePrecision(precision)})`, kind: "not supported", ok: true, worst: NaN, tolerance: NaN, detail: `not supported by backend "${provider.name}"` });
      continue;
    }
    precisions.push({ name: pname, precision, status: "ran" });
    const first = checks.length;
    let ctx: BackendContext | null = null;
    try {
      ctx = provider.create({ precision });
      device ||= ctx.device;
      if (pname === "exact") for (const c of opChecks(ctx, provider, opts.seed ?? 1)) add(c);
      else {
        for (const c of quantizerChecks(ctx, provider, precision, opts.seed ?? 1)) add(c);
        for (const c of precisionOpChecks(ctx, provider, precision, opts.seed ?? 1)) add(c);
      }
    } catch (e) {
      add({ name: `create() ${pname === "exact" ? "in exact mode" : `at precision ${pname}`}`, ok: false, worst: NaN, tolerance: 0, detail: e instanceof Error ? e.message : String(e) });
    } finally {
      ctx?.dispose();
    }
    const mine = checks.slice(first);
    const missing = OPS.filter((o) => o !== "sample" && !mine.some((c) => c.op === o));
    if (missing.length) add({ name: "every op of the contract checked", ok: false, worst: missing.length, tolerance: 0, detail: `not checked: ${missing.join(", ")}` });
    if (dirs.length && !provider.entry)
      add({ name: "golden checkpoints through worker ranks", ok: false, worst: NaN, tolerance: 0, detail: `backend "${provider.name}" has no entry (BackendProvider.entry): ranks cannot import it` });
    else if (supported < REQUIRED_OPS.length && dirs.length)
      add({ name: "golden checkpoints through worker ranks", ok: false, worst: NaN, tolerance: 0, detail: `not run: the backend lacks ops at this precision` });
    else
      for (const dir of dirs) {
        if (!existsSync(join(dir, "golden.json"))) {
          add({ name: `golden checkpoint ${dir}`, ok: false, worst: NaN, tolerance: 0, detail: "no golden.json there" });
          continue;
        }
        for (const ws of opts.worldSizes ?? [1, 2, 4]) for (const c of await (pname === "exact" ? goldenCheck(provider, dir, ws) : goldenDrift(provider, dir, ws, pname))) add(c);
      }
  }
  return report(device);
}

/** The report as tables, one per precision: check, result, worst error, bound. */
export function formatConformance(r: ConformanceReport): string {
  const fmt = (x: number) => (Number.isNaN(x) ? "-" : x === 0 ? "0" : Number.isFinite(x) ? (Number.isInteger(x) ? String(x) : x.toExponential(2)) : "inf");
  const w = Math.max(5, ...r.checks.map((c) => c.name.length));
  const head = `${"check".padEnd(w)}  result  worst     tolerance`;
  const row = (c: ConformanceCheck) => {
    const result = c.kind === "info" ? "info" : c.kind === "not supported" ? "n/s" : c.ok ? "pass" : "FAIL";
    const b = Number.isNaN(c.tolerance) ? "-" : `${c.bound === "min" ? ">= " : ""}${fmt(c.tolerance)}`;
    return `${c.name.padEnd(w)}  ${result.padEnd(6)}  ${fmt(c.worst).padEnd(8)}  ${b}${c.detail ? `  ${c.detail}` : ""}`;
  };
  const lines = [`backend ${r.backend}${r.device ? ` on ${r.device}` : ""}`, head];
  // the backend-wide checks (availability, placement) come first, then one section per precision
  const general = new Set(["available()", "devices() and rank placement"]);
  for (const c of r.checks.filter((x) => general.has(x.name))) lines.push(row(c));
  for (const { name } of r.precisions) {
    const p = PRECISIONS[name];
    const mine = r.checks.filter((c) => c.precision === name && !general.has(c.name));
    if (mine.length === 1 && mine[0]!.kind === "not supported") {
      lines.push("", `precision ${name}: not supported by backend "${r.backend}" (${describePrecision(p)})`);
      continue;
    }
    const gates =
      name === "exact"
        ? "gates: every op within its float64 bound, golden logits within 1e-3"
        : "gates: the quantizers exactly, every op within its bound of the float64 reference emulating this precision, the mean cosine of the golden logits; informs: KL, min cosine, top-1, greedy ids";
    lines.push("", `precision ${name}: ${describePrecision(p)}; ${gates}`, head, ...mine.map(row));
  }
  const gating = r.checks.filter((c) => c.kind === "gate");
  const info = r.checks.filter((c) => c.kind === "info").length;
  const ns = r.precisions.filter((p) => p.status === "not supported").map((p) => p.name);
  lines.push("");
  lines.push(`precisions run: ${r.precisions.filter((p) => p.status === "ran").map((p) => p.name).join(", ") || "none"}${ns.length ? `; not supported: ${ns.join(", ")}` : ""}; ${info} informational row${info === 1 ? "" : "s"}`);
  lines.push(`${gating.filter((c) => c.ok).length} of ${gating.length} checks passed: ${r.ok ? "PASS" : "FAIL"}`);
  return lines.join("\n");
}
