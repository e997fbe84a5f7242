// @ds3/backend-ascend through the CANN stand-in (standin/build: ACL/aclnn/HCCL on the CPU with the
// documented semantics): the conformance suite of @ds3/core (every op vs float64 in exact mode, bf16
// op checks, the tiny golden checkpoints end to end at world size 1 and 2 with HCCL), and the two fused
// operators that only run at DeepSeek-V3's own shapes, each against the CPU backend.
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";

const pkg = join(dirname(fileURLToPath(import.meta.url)), "..");
process.env.DS3_ASCEND_LIB_DIR = process.env.DS3_ASCEND_TEST_LIB_DIR ?? join(pkg, "standin/build");
const { ascend } = await import("../dist/index.js");
const { cpu } = await import("@ds3/backend-cpu");
const { formatConformance, runConformance } = await import("@ds3/core");
type Ctx = ReturnType<typeof cpu.create>;
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

describe("ascend backend through the stand-in", () => {
  it("is available on the stand-in", () => {
    const a = ascend.available();
    expect(a).toMatchObject({ ok: true });
  });

  it("conformance: every op, the golden checkpoints at world size 1 and 2 (HCCL), placement", async () => {
    const r = await runConformance(ascend, { goldenDirs: ["tiny-v3", "tiny-v3-bf16"].map((n) => FIXTURES + n), worldSizes: [1, 2] });
    console.log(formatConformance(r));
    for (const c of r.checks) expect({ check: c.name, ok: c.ok, detail: c.detail }).toEqual({ check: c.name, ok: true, detail: c.detail });
    expect(r.ok).toBe(true);
  }, 600_000);

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
});
