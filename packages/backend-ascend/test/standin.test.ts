// @ds3/backend-ascend through the CANN stand-in (standin/build: ACL/aclnn/HCCL on the CPU with the
// documented semantics, its stream QUEUED until aclrtSynchronizeStream as on an NPU): the conformance suite
// of @ds3/core at the exact and bf16 precisions (every op vs float64 / the bf16 bounds, the tiny golden
// checkpoints end to end at world size 1 and 2 with HCCL), ranks sharing one NPU on the host collective,
// the two fused operators that only run at DeepSeek-V3's own shapes (each against the CPU backend),
// hostile inputs, and last the stand-in's own counters: no descriptor, executor or allocation leaked, no
// destroy refused (a double free on CANN), no synchronous copy that raced a queued task (500001).
import { existsSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";

const pkg = join(dirname(fileURLToPath(import.meta.url)), "..");
// the toolkit layout the stand-in build writes (lib64 and <arch>-linux/ascend_toolkit_install.info), as CANN's installer does
const TOOLKIT_LIB = join(pkg, "standin/build/ascend-toolkit/latest/lib64");
process.env.DS3_ASCEND_LIB_DIR = process.env.DS3_ASCEND_TEST_LIB_DIR ?? TOOLKIT_LIB;
process.env.DS3_STANDIN_STREAM = "queue"; // the stand-in's default, stated: tasks wait for a synchronize, copies that race them fail
const { ascend, standinStats } = await import("../dist/index.js");
const { cpu } = await import("@ds3/backend-cpu");
const { formatConformance, runConformance, RankExecutor } = await import("@ds3/core");
type Ctx = ReturnType<typeof cpu.create>;
type ACtx = ReturnType<typeof ascend.create>;
const FIXTURES = join(pkg, "../../test/fixtures/");

function rng(seed: number) {
  let s = seed >>> 0;
  return () => ((s = (s * 1664525 + 1013904223) >>> 0) / 2 ** 32) * 2 - 1;
}
const f32w = (name: string, data: Float32Array, rows: number, cols: number) => ({ name, dtype: "f32" as const, shape: [rows, cols] as [number, number], data: new Uint8Array(data.buffer.slice(0)) });
const relErr = (a: Float32Array, b: Float32Array) => {
  let num = 0, den = 0;
  for (let i = 0; i < a.length; i++) { num += (a[i]! - b[i]!) ** 2; den += b[i]! ** 2; }
  return Math.sqrt(num / Math.max(den, 1e-30));
};
const stats = () => {
  const s = standinStats();
  expect(s, "ds3StandinStats() from the stand-in's libascendcl.so").not.toBeNull();
  return s!;
};

describe("ascend backend through the stand-in", () => {
  it("the stand-in is built (by the test script) and the backend is available on it, with the toolkit's CANN version", () => {
    for (const l of ["libascendcl.so", "libnnopbase.so", "libopapi.so", "libhccl.so"]) expect(existsSync(join(TOOLKIT_LIB, l)), l).toBe(true);
    const a = ascend.available();
    expect(a).toMatchObject({ ok: true });
    expect(a.devices![0]).toMatch(/^npu:0 Ascend910B3-standin \([\d.]+ GiB, CANN 8\.2\.RC1\.standin\)$/);
    expect(stats().eager).toBe(false);
  });

  it("conformance at exact and bf16: every op, the golden checkpoints at world size 1 and 2 (HCCL), placement", async () => {
    const golden = ["tiny-v3", "tiny-v3-bf16"];
    const r = await runConformance(ascend, { precision: ["exact", "bf16"], goldenDirs: golden.map((n) => FIXTURES + n), worldSizes: [1, 2] });
    console.log(formatConformance(r));
    expect(r.precisions.map((p) => [p.name, p.status])).toEqual([["exact", "ran"], ["bf16", "ran"]]);
    for (const c of r.checks) expect({ check: c.name, ok: c.ok, detail: c.detail }).toEqual({ check: c.name, ok: true, detail: c.detail });
    expect(r.ok).toBe(true);
    // the golden gates really ran at both precisions, both checkpoints, both world sizes
    for (const g of golden)
      for (const ws of [1, 2]) {
        const at = `${g} at world size ${ws}: golden logits, `;
        expect(r.checks.filter((c) => c.precision === "exact" && c.kind === "gate" && c.name === `${at}every position`).length, `${at} exact`).toBe(1);
        expect(r.checks.filter((c) => c.precision === "bf16" && c.kind === "gate" && c.name === `${at}mean cosine similarity over every position`).length, `${at} bf16`).toBe(1);
      }
    for (const p of ["exact", "bf16"]) expect(r.checks.filter((c) => c.precision === p && c.kind === "gate" && c.op).length, p).toBeGreaterThanOrEqual(14);
  }, 600_000);

  it("ranks sharing one NPU (shareDevices, world size 2 on npu:0) use the host collective, not HCCL, and match the golden logits", async () => {
    const dir = FIXTURES + "tiny-v3";
    const g = JSON.parse(readFileSync(join(dir, "golden.json"), "utf8")) as { prompts: Array<{ ids: number[]; logits_offset: number; logits_shape: [number, number] }> };
    const buf = readFileSync(join(dir, "golden.f32"));
    const all = new Float32Array(buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength));
    const before = stats();
    const ex = await RankExecutor.create(dir, {
      backendPackage: join(pkg, "dist/index.js"),
      cache: { numBlocks: 1, blockSize: 64, dtype: "f32" },
      worldSize: 2,
      threadsPerRank: 1,
      devices: [0, 0],
      shareDevices: true,
    });
    try {
      expect(stats().comms).toBe(0); // no HCCL communicator (two HCCL ranks on one device would be refused: HCCL_E_PARA)
      for (const p of g.prompts.filter((q) => q.ids.length <= 40)) {
        const L = p.ids.length;
        const want = all.subarray(p.logits_offset / 4, p.logits_offset / 4 + p.logits_shape[0] * p.logits_shape[1]);
        const got = await ex.step({ ids: Int32Array.from(p.ids), positions: Int32Array.from({ length: L }, (_, i) => i), seqIdx: new Int32Array(L), blockTables: Int32Array.of(0), maxBlocks: 1, logitRows: Int32Array.from({ length: L }, (_, i) => i) });
        let worst = 0;
        for (let i = 0; i < want.length; i++) worst = Math.max(worst, Math.abs(got[i]! - want[i]!));
        expect(got.length).toBe(want.length);
        expect(worst, `prompt of ${L} tokens`).toBeLessThanOrEqual(1e-3);
      }
    } finally {
      await ex.close();
    }
    const after = stats();
    expect(after.errors["1"] ?? 0, "no HCCL_E_PARA").toBe(before.errors["1"] ?? 0);
  }, 120_000);

  it("moeGate at DeepSeek-V3's shape (256 experts, 8 groups, top-4 groups, top-8) runs aclnnMoeGatingTopK and matches the CPU backend", () => {
    const T = 5, D = 64, E = 256;
    const r = rng(7);
    const x = Float32Array.from({ length: T * D }, r);
    const g = Float32Array.from({ length: E * D }, () => r() * 0.3);
    const bias = Float32Array.from({ length: E }, () => r() * 0.05);
    const cfg = { topk: 8, nGroups: 8, topkGroups: 4, scoreFunc: "sigmoid" as const, normTopk: true, routeScale: 2.5 };
    const run = (ctx: Ctx | ReturnType<typeof ascend.create>) => ctx.download(ctx.moeGate(ctx.upload(x, [T, D]), ctx.weight(f32w("gate", g, E, D)), bias, cfg));
    const a = ascend.create({ precision: { activations: "f32", cache: "f32" } }) as ReturnType<typeof ascend.create> & { stats(): { gatingTopK: boolean } };
    expect(a.stats().gatingTopK).toBe(true);
    const got = run(a);
    const want = run(cpu.create({ threads: 1 }));
    for (let t = 0; t < T; t++) {
      expect(Array.from(got.subarray(t * 16 + 8, t * 16 + 16))).toEqual(Array.from(want.subarray(t * 16 + 8, t * 16 + 16)));
      for (let j = 0; j < 8; j++) expect(got[t * 16 + j]).toBeCloseTo(want[t * 16 + j]!, 5);
    }
    // the composition (the path of every other shape) gives the same at this shape
    process.env.DS3_ASCEND_NO_GATING_TOPK = "1";
    try {
      const comp = run(a);
      for (let t = 0; t < T; t++) {
        expect(Array.from(comp.subarray(t * 16 + 8, t * 16 + 16))).toEqual(Array.from(got.subarray(t * 16 + 8, t * 16 + 16)));
        for (let j = 0; j < 8; j++) expect(comp[t * 16 + j]).toBeCloseTo(got[t * 16 + j]!, 6);
      }
    } finally {
      delete process.env.DS3_ASCEND_NO_GATING_TOPK;
    }
    a.dispose();
  });

  it("mla at DeepSeek-V3's latent shape (512 + 64) in bf16 runs aclnnFusedInferAttentionScoreV3 and matches the composition and the CPU backend", () => {
    const H = 2, n = 16, rp = 64, v = 16, L = 512, bs = 4, T = 3;
    const r = rng(11);
    const wkv = Float32Array.from({ length: H * (n + v) * L }, () => r() * 0.05);
    const prec = { activations: "bf16" as const, cache: "bf16" as const };
    // two sequences: seq 0 has positions 0..5 written over two steps, seq 1 one token; step 2 decodes
    const tables = new Int32Array([2, 0, -1, 1, -1, -1]);
    const steps = [
      { T: 5, pos: [0, 1, 2, 3, 4], seq: [0, 0, 0, 0, 0] },
      { T, pos: [5, 0, 6], seq: [0, 1, 0] },
    ];
    const run = (ctx: Ctx | ReturnType<typeof ascend.create>) => {
      const cache = ctx.createCache(1, 3, bs, L + rp, "bf16");
      const w = ctx.weight(f32w("wkv_b", wkv, H * (n + v), L));
      const rr = rng(3);
      let y: Float32Array = new Float32Array();
      for (const s of steps) {
        ctx.beginStep();
        const q = ctx.upload(Float32Array.from({ length: s.T * H * (n + rp) }, rr), [s.T, H * (n + rp)]);
        const kv = ctx.upload(Float32Array.from({ length: s.T * L }, rr), [s.T, L]);
        const pe = ctx.upload(Float32Array.from({ length: s.T * rp }, rr), [s.T, rp]);
        const meta = { positions: Int32Array.from(s.pos), seqIdx: Int32Array.from(s.seq), blockTables: tables, maxBlocks: 3 };
        y = ctx.download(ctx.mla(q, kv, pe, w, cache, 0, meta, { heads: H, nope: n, rope: rp, v, kvLora: L, scale: 0.125 }));
      }
      return y;
    };
    const a = ascend.create({ precision: prec }) as ReturnType<typeof ascend.create> & { stats(): { fia: boolean } };
    expect(a.stats().fia).toBe(true);
    const fia = run(a);
    process.env.DS3_ASCEND_NO_FIA = "1";
    let comp: Float32Array;
    try {
      comp = run(a);
    } finally {
      delete process.env.DS3_ASCEND_NO_FIA;
    }
    const ref = run(cpu.create({ threads: 1, precision: prec }));
    expect(relErr(comp, ref)).toBeLessThan(2e-2);
    expect(relErr(fia, ref)).toBeLessThan(2e-2);
    a.dispose();
  });

  it("hostile inputs through the public surface: clear errors naming the op, no crash, the context still right afterwards", () => {
    const a = ascend.create({ precision: { activations: "f32", cache: "f32" } }) as ACtx;
    const c = cpu.create({ threads: 1 });
    const r = rng(5);
    const T = 3, D = 16, V = 10;
    const xs = Float32Array.from({ length: T * D }, r);
    const wd = Float32Array.from({ length: 8 * D }, r);
    try {
      a.beginStep();
      const x = a.upload(xs, [T, D]);
      // a weight whose shape does not match the op
      expect(() => a.linear(x, a.weight(f32w("w", Float32Array.from({ length: 8 * (D + 1) }, r), 8, D + 1)))).toThrow(/^linear: input width 16 != weight in-features 17/);
      expect(() => a.rmsNorm(x, a.weight(f32w("n", new Float32Array(D + 2).fill(1), 1, D + 2)), 1e-6)).toThrow(/^rmsNorm: weight \[1,18\] for rows of width 16/);
      expect(() => a.moeGate(x, a.weight(f32w("g", Float32Array.from({ length: 8 * 12 }, r), 8, 12)), null, { topk: 2, nGroups: 1, topkGroups: 1, scoreFunc: "softmax", normTopk: false, routeScale: 1 })).toThrow(/^moeGate: gate weight \[8,12\] for inputs of width 16/);
      const ew = (rows: number, cols: number) => a.weight(f32w("e", Float32Array.from({ length: rows * cols }, r), rows, cols));
      expect(() => a.expertSet(0, [{ w1: ew(4, D), w2: ew(D, 4), w3: ew(4, D) }, { w1: ew(4, D), w2: ew(D, 5), w3: ew(4, D) }])).toThrow(/^expertSet: expert 1 has/);
      const experts = a.expertSet(0, [{ w1: ew(4, 8), w2: ew(8, 4), w3: ew(4, 8) }]);
      expect(() => a.moeExperts(x, experts, a.upload(new Float32Array(T * 2), [T, 2]), 1)).toThrow(/^moeExperts: input width 16 != the experts' width 8/);
      // ids out of the vocabulary: rows outside this rank's slice are zero (the contract's vocab split), as on the CPU backend
      const tab = Float32Array.from({ length: V * D }, r);
      const ids = Int32Array.of(3, V, -1, 2 ** 31 - 1, 0);
      const ge = a.download(a.embed(a.weight(f32w("emb", tab, V, D)), ids, 0));
      expect(Array.from(ge)).toEqual(Array.from(c.download(c.embed(c.weight(f32w("emb", tab, V, D)), ids, 0))));
      expect(Array.from(ge.subarray(D, 4 * D)).every((v) => Object.is(v, 0))).toBe(true);
      const nan = tab.slice();
      nan.fill(Number.NaN, 0, D); // the clamped row the backend looks up for outside ids: nothing of it leaks through
      expect(Array.from(a.download(a.embed(a.weight(f32w("emb", nan, V, D)), Int32Array.of(-5, V), 0))).every((v) => Object.is(v, 0))).toBe(true);
      // cache slots out of range
      const H = 2, n = 8, rp = 4, v = 8, L = 16, bs = 4;
      const cache = a.createCache(1, 2, bs, L + rp, "f32");
      const wkv = a.weight(f32w("wkv_b", Float32Array.from({ length: H * (n + v) * L }, r), H * (n + v), L));
      const q = a.upload(Float32Array.from({ length: H * (n + rp) }, r), [1, H * (n + rp)]);
      const kv = a.upload(Float32Array.from({ length: L }, r), [1, L]);
      const pe = a.upload(Float32Array.from({ length: rp }, r), [1, rp]);
      const dims = { heads: H, nope: n, rope: rp, v, kvLora: L, scale: 0.3 };
      const meta = (pos: number, table: number[]) => ({ positions: Int32Array.of(pos), seqIdx: Int32Array.of(0), blockTables: Int32Array.from(table), maxBlocks: 2 });
      expect(() => a.mla(q, kv, pe, wkv, cache, 0, meta(1, [2, -1]), dims)).toThrow(/^mla: block table of sequence 0 names block 2, outside the cache/);
      expect(() => a.mla(q, kv, pe, wkv, cache, 0, meta(5, [0, -7]), dims)).toThrow(/^mla: block table of sequence 0 names block -7, outside the cache/);
      expect(() => a.mla(q, kv, pe, wkv, cache, 0, meta(8, [0, 1]), dims)).toThrow(/^mla: token 0 \(sequence 0, position 8\) is outside its block table/);
      expect(() => a.mla(q, kv, pe, wkv, cache, 1, meta(0, [0, 1]), dims)).toThrow(/^mla: layer 1 outside the cache's 1/);
      expect(() => a.mla(q, kv, pe, a.weight(f32w("bad", new Float32Array(H * (n + v) * (L + 1)), H * (n + v), L + 1)), cache, 0, meta(0, [0, 1]), dims)).toThrow(/^mla: wkv_b \[32,17\] is not/);
      expect(() => a.readCache(cache, 0, 7, 2)).toThrow(/^readCache: slots \[7, 9\) outside the cache's 8/);
      expect(() => a.readCache(cache, 0, -1, 1)).toThrow(/^readCache/);
      // nothing left corrupt: the same context computes correctly afterwards
      const w = Float32Array.from({ length: 8 * D }, r);
      a.beginStep();
      const got = a.download(a.linear(a.upload(xs, [T, D]), a.weight(f32w("w", w, 8, D))));
      const want = c.download(c.linear(c.upload(xs, [T, D]), c.weight(f32w("w", w, 8, D))));
      expect(relErr(got, want)).toBeLessThan(1e-6);
      expect(Array.from(a.readCache(cache, 0, 0, 8)).every((x) => x === 0)).toBe(true); // no refused write reached the cache
      void wd;
    } finally {
      a.dispose();
    }
  });

  it("the stand-in's counters after everything above: no descriptor, executor, stream or communicator leaked, no destroy refused, no copy raced a queued task", () => {
    const s = stats();
    console.log("ds3StandinStats:", JSON.stringify(s));
    expect(s.eager).toBe(false);
    expect({ tensors: s.tensors, tensorLists: s.tensorLists, intArrays: s.intArrays, scalars: s.scalars, executorsPending: s.executorsPending, comms: s.comms, refusedDestroys: s.refusedDestroys })
      .toEqual({ tensors: 0, tensorLists: 0, intArrays: 0, scalars: 0, executorsPending: 0, comms: 0, refusedDestroys: 0 });
    expect(s.errors["500001"] ?? 0, "a synchronous aclrtMemcpy/aclrtMemset raced a queued task").toBe(0);
    expect(s.errors["161002"] ?? 0, "ACLNN_ERR_PARAM_INVALID").toBe(0);
    expect(s.errors["161001"] ?? 0, "ACLNN_ERR_PARAM_NULLPTR").toBe(0);
    expect(s.launched as number).toBeGreaterThan(1000);
  });
});
