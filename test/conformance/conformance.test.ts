// The backend conformance suite (@ds3/core's runConformance, the code `ds3 selftest` runs) on the
// CPU backend at every precision: exact mode (every op against float64 references, the golden
// checkpoints end to end through worker ranks at world size 1, 2 and 4, rank placement), and bf16,
// fp8, fp8-ue8m0 and fp8-fnuz (the CPU's quantizers exactly against quant.ts on grids of their
// rounding boundaries, every op against a float64 reference emulating the same quantization, the
// golden drift). And the suite itself is checked: a backend with one wrong op fails that op, and
// only it; a backend that quantizes the wrong way fails at that precision; a precision a backend
// lacks is "not supported" unless asked for by name.
import { cpu } from "@ds3/backend-cpu";
import { type BackendContext, type BackendOptions, type BackendProvider, formatConformance, type Precision, type PrecisionName, runConformance, type Tensor } from "@ds3/core";
import { describe, expect, it } from "vitest";
import { FIXTURES } from "../helpers/golden.js";
// @ts-expect-error plain ESM helper without types (worker ranks import it by path)
import { bf16Only as bf16OnlyJs } from "./bf16-only-backend.mjs";
// @ts-expect-error plain ESM helper without types (worker ranks import it by path)
import { noAllReduce as noAllReduceJs } from "./no-allreduce-backend.mjs";

const bf16Only = bf16OnlyJs as BackendProvider;
const noAllReduce = noAllReduceJs as BackendProvider;
const GOLDEN = ["tiny-v3", "tiny-v3-bf16"].map((n) => FIXTURES + n);
const OPS = ["embed", "rmsNorm", "linear", "add", "siluMul", "concat", "slice", "rows", "rope", "mla", "moeGate", "moeExperts", "allReduce", "allGatherCols"];

describe.each([{ name: "cpu", provider: cpu }])("conformance: $name backend", ({ provider }) => {
  it("exact: every op, the collectives at world size 2 and 4, the golden checkpoints end to end, rank placement", async () => {
    const r = await runConformance(provider, { precision: "exact", goldenDirs: GOLDEN });
    console.log(formatConformance(r));
    for (const c of r.checks) expect({ check: c.name, ok: c.ok, kind: c.kind, precision: c.precision, detail: c.detail }).toEqual({ check: c.name, ok: true, kind: "gate", precision: "exact", detail: c.detail });
    expect(r.ok).toBe(true);
    expect(r.precisions).toEqual([{ name: "exact", precision: { activations: "f32", cache: "f32", actQuant: "none" }, status: "ran" }]);
    // every op of the contract this backend supports was checked, and both checkpoints at 1, 2 and 4 ranks
    const ops = new Set(r.checks.map((c) => c.op).filter(Boolean));
    for (const op of OPS) expect(ops.has(op as never)).toBe(true);
    for (const g of ["tiny-v3", "tiny-v3-bf16"]) for (const ws of [1, 2, 4]) expect(r.checks.some((c) => c.name === `${g} at world size ${ws}: golden logits, every position` && c.ok)).toBe(true);
    // exact mode is what it was: the float64 bound of every op, 1e-3 on the golden logits
    for (const c of r.checks.filter((x) => x.op)) expect(c.tolerance, c.name).toBe(c.op === "rope" ? 1e-4 : c.op === "allReduce" || c.op === "allGatherCols" ? 0 : 1e-5);
  });

  // the FP8 modes end to end on tiny-v3 only: tiny-v3-bf16 has no FP8 weight, so there they compute what bf16 does
  it.each([
    ["bf16", ["tiny-v3", "tiny-v3-bf16"]],
    ["fp8", ["tiny-v3"]],
    ["fp8-ue8m0", ["tiny-v3"]],
    ["fp8-fnuz", ["tiny-v3"]],
  ] as const)("%s: the quantizers exactly, every op within its bound of the emulating reference, the golden drift of %j at world size 1, 2 and 4", async (pname, goldens) => {
    const r = await runConformance(provider, { precision: pname, goldenDirs: goldens.map((g) => FIXTURES + g) });
    console.log(formatConformance(r));
    expect(r.precisions.map((p) => [p.name, p.status])).toEqual([[pname, "ran"]]);
    for (const c of r.checks.filter((x) => x.kind === "gate")) expect({ check: c.name, ok: c.ok, detail: c.detail }).toEqual({ check: c.name, ok: true, detail: c.detail });
    expect(r.ok).toBe(true);
    expect(r.checks.every((c) => c.precision === pname)).toBe(true);
    const ops = new Set(r.checks.map((c) => c.op).filter(Boolean));
    for (const op of OPS) expect(ops.has(op as never)).toBe(true);
    // the quantizers on their grids: exact
    const grids = r.checks.filter((c) => /, exact\)?$/.test(c.name));
    expect(grids.map((c) => c.name.split(" (")[0])).toEqual(pname === "bf16" ? ["bf16 rounding of activations", "bf16 latent cache"] : ["bf16 rounding of activations", "bf16 latent cache", "FP8 activation quantization"]);
    for (const c of grids) expect([c.worst, c.tolerance]).toEqual([0, 0]);
    // op bounds: U = 2^-8 per rounding on top of the fp32 slack, measured well inside them
    const U = 2 ** -8;
    const tol = (name: string) => r.checks.find((c) => c.name.startsWith(name))!.tolerance;
    expect(tol("add")).toBeCloseTo(1e-5 + U, 12);
    expect(tol("linear (fp8 weight")).toBeCloseTo(1e-5 + U, 12);
    expect(tol("mla")).toBeCloseTo(1e-5 + 4 * U, 12);
    expect(tol("moeExperts")).toBeCloseTo(1e-5 + 4 * U, 12);
    // the outputs the CPU backend rounds to bf16 (from inputs it does not) show it
    for (const c of r.checks.filter((x) => x.tolerance > 1e-4 && ["rmsNorm", "linear", "add", "siluMul", "rope", "mla", "moeExperts"].includes(x.op!))) expect(c.worst, c.name).toBeGreaterThan(1e-4);
    // end to end: the mean cosine floor gates; KL, min cosine and top-1 inform, with numbers
    for (const g of goldens)
      for (const ws of [1, 2, 4]) {
        const cos = r.checks.find((c) => c.name === `${g} at world size ${ws}: golden logits, mean cosine similarity over every position`)!;
        expect([cos.kind, cos.bound, cos.ok]).toEqual(["gate", "min", true]);
        expect(cos.worst).toBeGreaterThanOrEqual(cos.tolerance);
        expect(cos.worst).toBeLessThan(1); // the precision moved the logits
        const info = r.checks.find((c) => c.name === `${g} at world size ${ws}: golden logits, drift`)!;
        expect(info.kind).toBe("info");
        expect(Object.keys(info.metrics!).sort()).toEqual(["maxAbs", "maxKl", "meanCos", "meanKl", "minCos", "top1"]);
        expect(info.metrics!.meanKl).toBeGreaterThan(0);
        expect(info.metrics!.minCos).toBeLessThanOrEqual(info.metrics!.meanCos!);
      }
    expect(formatConformance(r)).toMatch(new RegExp(`^precision ${pname}: activations bf16, cache bf16`, "m"));
  });
});

describe("the suite catches a wrong backend", () => {
  // the CPU backend with one op off by a little: rmsNorm scaled by 1 + 1e-3
  const off: BackendProvider = {
    ...cpu,
    name: "cpu-wrong-rmsnorm",
    entry: undefined,
    create(o?: BackendOptions): BackendContext {
      const ctx = cpu.create(o);
      const rms = ctx.rmsNorm.bind(ctx);
      ctx.rmsNorm = (x, w, eps): Tensor => {
        const y = ctx.download(rms(x, w, eps));
        return ctx.upload(y.map((v) => v * 1.001), x.shape);
      };
      return ctx;
    },
  };

  it("fails rmsNorm with its error, passes the other ops, and says a backend without entry cannot run ranks", async () => {
    const r = await runConformance(off, { precision: "exact", goldenDirs: [GOLDEN[0]!] });
    expect(r.ok).toBe(false);
    const rms = r.checks.find((c) => c.op === "rmsNorm")!;
    expect(rms.ok).toBe(false);
    expect(rms.worst).toBeGreaterThan(5e-4);
    expect(rms.worst).toBeLessThan(2e-3);
    expect(r.checks.filter((c) => c.op && c.op !== "rmsNorm").every((c) => c.ok)).toBe(true);
    expect(r.checks.find((c) => c.name === "golden checkpoints through worker ranks")?.detail).toMatch(/has no entry/);
    expect(formatConformance(r)).toMatch(/^rmsNorm +FAIL +1\.\d\de-3/m);
  });

  it("an op the backend says it lacks is a failure naming it, not a silent pass", async () => {
    const r = await runConformance({ ...cpu, name: "cpu-no-mla", supports: (op, p) => op !== "mla" && cpu.supports(op, p) });
    const mla = r.checks.find((c) => c.op === "mla")!;
    expect(mla.ok).toBe(false);
    expect(mla.detail).toBe('backend "cpu-no-mla" does not support op mla in exact mode');
    // and at every other precision, by name
    for (const p of ["bf16", "fp8", "fp8-ue8m0", "fp8-fnuz"]) {
      const c = r.checks.find((x) => x.op === "mla" && x.precision === p)!;
      expect(c.ok).toBe(false);
      expect(c.detail).toMatch(/^backend "cpu-no-mla" does not support op mla at activations=bf16 cache=bf16 actQuant=/);
    }
    expect(r.ok).toBe(false);
  });

  // the CPU backend told one precision and running another: each must fail at the claimed one
  const claiming = (actual: Precision): BackendProvider => ({ ...cpu, name: `cpu-running-${actual.activations}-${actual.actQuant}`, entry: undefined, create: (o) => cpu.create({ ...o, precision: actual }) });
  const BF16 = { activations: "bf16", cache: "bf16" } as const;
  it.each([
    ["fp8", { ...BF16, actQuant: "fp8-ue8m0" }],
    ["fp8", { ...BF16, actQuant: "fp8-fnuz" }],
    ["fp8", { ...BF16, actQuant: "none" }],
    ["fp8-ue8m0", { ...BF16, actQuant: "fp8" }],
    ["fp8-fnuz", { ...BF16, actQuant: "fp8" }],
  ] as Array<[PrecisionName, Precision]>)("claimed %s, computed %j: the FP8 grid and the FP8 ops fail", async (claim, actual) => {
    const r = await runConformance(claiming(actual), { precision: claim });
    expect(r.ok).toBe(false);
    const failed = r.checks.filter((c) => !c.ok);
    expect(failed.map((c) => c.name.split(" (")[0])).toEqual(["FP8 activation quantization", "linear", "moeExperts"]);
    const grid = failed[0]!;
    expect(grid.worst).toBeGreaterThan(100); // mismatching values
    expect(grid.detail).toMatch(/^first at \d+: input .*, got .*, want /);
    // the errors are quantization noise, several times the bound (3 to 11 times on this seed)
    for (const c of failed.slice(1)) expect(c.worst, c.name).toBeGreaterThan(2 * c.tolerance);
  });

  it("a backend whose allReduce does not sum across ranks passes every op (world size 1) and fails the golden logits through 2 ranks, exact and bf16", async () => {
    const r = await runConformance(noAllReduce, { precision: ["exact", "bf16"], goldenDirs: [GOLDEN[0]!], worldSizes: [1, 2] });
    expect(r.checks.filter((c) => c.op && !c.ok)).toEqual([]);
    expect(r.checks.filter((c) => c.kind === "gate" && !c.ok).map((c) => `${c.precision}: ${c.name}`)).toEqual([
      "exact: tiny-v3 at world size 2: golden logits, every position",
      "exact: tiny-v3 at world size 2: greedy ids sampled by the ranks",
      "bf16: tiny-v3 at world size 2: golden logits, mean cosine similarity over every position",
    ]);
    expect(r.checks.find((c) => c.precision === "bf16" && c.name.startsWith("tiny-v3 at world size 2: golden logits, mean cosine"))!.worst).toBeLessThan(0.5);
  });

  it("claimed bf16, computed in fp32: only the rounding grid fails (more accurate ops are within their bounds)", async () => {
    const r = await runConformance(claiming({ activations: "f32", cache: "f32", actQuant: "none" }), { precision: "bf16" });
    expect(r.checks.filter((c) => !c.ok).map((c) => c.name)).toEqual(["bf16 rounding of activations (add x + 0 on a grid of rounding boundaries, exact)"]);
  });

  it("bf16 rounding half away from zero instead of to even: the grid's ties catch it, no op bound does", async () => {
    const f = new Float32Array(1);
    const u = new Uint32Array(f.buffer);
    const halfAway = (x: number) => {
      f[0] = x;
      u[0] = (u[0]! + 0x8000) & 0xffff0000;
      return f[0]!;
    };
    const r = await runConformance(
      {
        ...cpu,
        name: "cpu-bf16-half-away",
        entry: undefined,
        create(o) {
          const ctx = cpu.create({ ...o, precision: { ...o?.precision, activations: "f32" } });
          const add = ctx.add.bind(ctx);
          ctx.add = (a, b) => ctx.upload(ctx.download(add(a, b)).map(halfAway), a.shape);
          return ctx;
        },
      },
      { precision: "bf16" },
    );
    const failed = r.checks.filter((c) => !c.ok);
    expect(failed.map((c) => c.name.split(" (")[0])).toEqual(["bf16 rounding of activations"]);
    expect(failed[0]!.worst).toBeGreaterThan(10);
    expect(failed[0]!.worst).toBeLessThan(500); // ties only, of the 1792 values
    expect(r.checks.find((c) => c.name === "add")!.ok).toBe(true);
  });
});

describe("the bf16 bounds admit the roundings bf16 GPU kernels do", () => {
  // The CPU backend with rmsNorm, siluMul, rope and mla replaced by TypeScript versions that round
  // where transformers' bf16 modules and tensor-core attention kernels round: rmsNorm rounds the
  // normalized x, then the product with the weight; siluMul rounds silu, then the product; rope
  // keeps bf16 cos/sin tables and rounds each product and the sum; mla rounds the absorbed query,
  // the probabilities, the latent output and the output. Such a backend is right, and must pass.
  const rb = (x: number) => {
    const f = new Float32Array([x]);
    const u = new Uint32Array(f.buffer);
    u[0] = ((u[0]! + 0x7fff + ((u[0]! >>> 16) & 1)) >>> 16) << 16;
    return f[0]!;
  };
  const fr = Math.fround;
  const calls = { rmsNorm: 0, siluMul: 0, rope: 0, mla: 0 };
  const gpuLike: BackendProvider = {
    ...cpu,
    name: "cpu-gpu-like-rounding",
    entry: undefined,
    create(o) {
      const ctx = cpu.create(o);
      const dense = new Map<object, Float32Array>();
      const weight = ctx.weight.bind(ctx);
      ctx.weight = (hw) => {
        const w = weight(hw);
        if (hw.dtype === "f32") dense.set(w, new Float32Array(hw.data.slice().buffer));
        return w;
      };
      const W = (w: object) => {
        const d = dense.get(w);
        if (!d) throw new Error("gpu-like wrapper: f32 weights only");
        return d;
      };
      const T = (x: Tensor) => ctx.download(x);
      ctx.rmsNorm = (x, w, eps) => {
        calls.rmsNorm++;
        const a = T(x);
        const D = x.shape[1]!;
        const g = W(w);
        const y = new Float32Array(a.length);
        for (let t = 0; t < a.length / D; t++) {
          let ss = 0;
          for (let i = 0; i < D; i++) ss = fr(ss + a[t * D + i]! * a[t * D + i]!);
          const r = fr(1 / Math.sqrt(fr(ss / D) + eps));
          for (let i = 0; i < D; i++) y[t * D + i] = rb(g[i]! * rb(a[t * D + i]! * r));
        }
        return ctx.upload(y, x.shape);
      };
      ctx.siluMul = (g, u) => {
        calls.siluMul++;
        const a = T(g);
        const b = T(u);
        return ctx.upload(a.map((v, i) => rb(rb(v / (1 + Math.exp(-v))) * b[i]!)), g.shape);
      };
      ctx.rope = (x, H, hd, off, rd, pos, inv, attn) => {
        calls.rope++;
        const y = T(x).slice();
        for (let t = 0; t < pos.length; t++)
          for (let i = 0; i < rd / 2; i++) {
            const ang = fr(pos[t]! * inv[i]!);
            const c = rb(Math.cos(ang) * attn);
            const sn = rb(Math.sin(ang) * attn);
            for (let h = 0; h < H; h++) {
              const k = t * H * hd + h * hd + off + 2 * i;
              const x0 = y[k]!;
              const x1 = y[k + 1]!;
              y[k] = rb(rb(x0 * c) - rb(x1 * sn));
              y[k + 1] = rb(rb(x0 * sn) + rb(x1 * c));
            }
          }
        return ctx.upload(y, x.shape);
      };
      const mla = ctx.mla.bind(ctx);
      ctx.mla = (q, kv, pe, wkvB, cache, layer, m, d) => {
        calls.mla++;
        mla(q, kv, pe, wkvB, cache, layer, m, d); // the CPU writes the latents into the cache
        const Q = T(q);
        const wb = W(wkvB);
        const C = d.kvLora;
        const hd = d.nope + d.v;
        const qw = d.nope + d.rope;
        const out = new Float32Array(m.positions.length * d.heads * d.v);
        for (let t = 0; t < m.positions.length; t++) {
          const s = m.seqIdx[t]!;
          const rows = Array.from({ length: m.positions[t]! + 1 }, (_, j) =>
            ctx.readCache(cache, layer, m.blockTables[s * m.maxBlocks + Math.floor(j / cache.blockSize)]! * cache.blockSize + (j % cache.blockSize), 1),
          );
          for (let h = 0; h < d.heads; h++) {
            const qh = Q.subarray((t * d.heads + h) * qw, (t * d.heads + h + 1) * qw);
            const qa = Array.from({ length: C }, (_, c) => {
              let a = 0;
              for (let i = 0; i < d.nope; i++) a = fr(a + qh[i]! * wb[(h * hd + i) * C + c]!);
              return rb(a);
            });
            const sc = rows.map((r) => {
              let a = 0;
              for (let c = 0; c < C; c++) a = fr(a + qa[c]! * r[c]!);
              for (let i = 0; i < d.rope; i++) a = fr(a + qh[d.nope + i]! * r[C + i]!);
              return fr(a * d.scale);
            });
            const mx = Math.max(...sc);
            const e = sc.map((v) => fr(Math.exp(v - mx)));
            const z = e.reduce((a, b) => fr(a + b), 0);
            const p = e.map((v) => rb(v / z));
            const ol = Array.from({ length: C }, (_, c) => rb(rows.reduce((a, r, j) => fr(a + p[j]! * r[c]!), 0)));
            for (let i = 0; i < d.v; i++) {
              let a = 0;
              for (let c = 0; c < C; c++) a = fr(a + ol[c]! * wb[(h * hd + d.nope + i) * C + c]!);
              out[(t * d.heads + h) * d.v + i] = rb(a);
            }
          }
        }
        return ctx.upload(out, [m.positions.length, d.heads * d.v]);
      };
      return ctx;
    },
  };

  it("passes at bf16, each replaced op within its bound with room to spare", async () => {
    const [gpu, ref] = await Promise.all([runConformance(gpuLike, { precision: "bf16" }), runConformance(cpu, { precision: "bf16" })]);
    console.log(formatConformance(gpu));
    expect(gpu.checks.filter((c) => !c.ok).map((c) => c.name)).toEqual([]);
    for (const op of ["rmsNorm", "siluMul", "rope", "mla"] as const) {
      const g = gpu.checks.find((c) => c.op === op && c.kind === "gate" && c.tolerance > 0.001)!;
      const c = ref.checks.find((x) => x.name === g.name)!;
      expect(g.worst, op).toBeLessThan(0.75 * g.tolerance);
      expect(c.ok, op).toBe(true);
    }
    // each replaced op ran (the op check and the quantizer grids call them), and computed otherwise than the CPU
    expect(calls).toEqual({ rmsNorm: 1, siluMul: 1, rope: 1, mla: 4 });
    for (const op of ["rmsNorm", "rope"]) expect(gpu.checks.find((c) => c.op === op)!.worst).toBeGreaterThan(ref.checks.find((c) => c.op === op)!.worst);
  });
});

describe("precisions a backend does not support", () => {
  it("under all (the default): reported as not supported, not failed; the supported one runs", async () => {
    const r = await runConformance(bf16Only);
    expect(r.precisions.map((p) => [p.name, p.status])).toEqual([
      ["exact", "not supported"],
      ["bf16", "ran"],
      ["fp8", "not supported"],
      ["fp8-ue8m0", "not supported"],
      ["fp8-fnuz", "not supported"],
    ]);
    expect(r.ok).toBe(true);
    const ns = r.checks.filter((c) => c.kind === "not supported");
    expect(ns.map((c) => c.precision)).toEqual(["exact", "fp8", "fp8-ue8m0", "fp8-fnuz"]);
    for (const c of ns) expect([c.ok, c.detail]).toEqual([true, 'not supported by backend "cpu-bf16-only"']);
    expect(r.checks.filter((c) => c.precision === "bf16" && c.op).length).toBeGreaterThanOrEqual(OPS.length);
    const text = formatConformance(r);
    expect(text).toMatch(/^precision fp8: not supported by backend "cpu-bf16-only" \(activations bf16, cache bf16, activations quantized fp8 in front of FP8 weights\)$/m);
    expect(text).toMatch(/^precisions run: bf16; not supported: exact, fp8, fp8-ue8m0, fp8-fnuz; 0 informational rows$/m);
    expect(text).toMatch(/: PASS$/m);
  });

  it("asked for by name: a failure; an unknown name is an error", async () => {
    const r = await runConformance(bf16Only, { precision: ["bf16", "fp8"] });
    expect(r.ok).toBe(false);
    const f = r.checks.filter((c) => !c.ok);
    expect(f.map((c) => [c.precision, c.name, c.detail])).toEqual([["fp8", "precision fp8 (activations bf16, cache bf16, activations quantized fp8 in front of FP8 weights)", 'backend "cpu-bf16-only" supports no op at this precision']]);
    await expect(runConformance(cpu, { precision: "fp16" as never })).rejects.toThrow('unknown precision "fp16" (one of exact, bf16, fp8, fp8-ue8m0, fp8-fnuz, or "all")');
  });
});
