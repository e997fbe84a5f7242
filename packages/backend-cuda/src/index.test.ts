// @ds3/backend-cuda on any machine: the addon loads (a CUDA build or the stub), `available()` answers
// with devices or a reason and never throws. With a GPU, a few ops are checked against the CPU
// backend; without one those tests are skipped with a visible message. The full GPU checks (golden
// files, fast modes, compute-sanitizer) are scripts/gpu-check.mjs on a GPU machine.
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { Checkpoint, parseConfig, Transformer } from "@ds3/core";
import { readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { cuda, probe, SyntheticSource } from "./index.js";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");
const TINY = join(ROOT, "test/fixtures/tiny-v3");
const av = cuda.available();
if (!av.ok) console.log(`[@ds3/backend-cuda] GPU tests skipped: ${av.reason}`);

describe("probe", () => {
  it("answers with devices or a reason that says CUDA is not available", () => {
    const p = probe();
    if (p.ok) expect(p.devices?.length).toBeGreaterThan(0);
    else expect(p.reason).toMatch(/^CUDA not available: /);
    const a = cuda.available();
    expect(a.ok).toBe(p.ok);
  });
  it("create() makes a context on a GPU, and without one throws the probe's reason instead of crashing", () => {
    if (av.ok) {
      const ctx = cuda.create();
      try {
        const x = Float32Array.from([1, -2, 3.5]);
        expect(Array.from(ctx.download(ctx.upload(x, [1, 3])))).toEqual(Array.from(x));
      } finally {
        ctx.dispose();
      }
    } else expect(() => cuda.create()).toThrow(av.reason);
  });
});

describe("synthetic weights", () => {
  it("follows the released checkpoint's dtypes", () => {
    const cfg = parseConfig(JSON.parse(readFileSync(join(TINY, "config.json"), "utf8")));
    const s = new SyntheticSource(cfg);
    expect(s.host("model.layers.0.self_attn.q_a_proj.weight", [cfg.qLoraRank, cfg.dim]).dtype).toBe("f8_e4m3");
    expect(s.host("model.layers.1.mlp.gate.weight", [cfg.nRoutedExperts, cfg.dim]).dtype).toBe("bf16");
    expect(s.host("model.norm.weight", [cfg.dim]).dtype).toBe("f32");
    expect(s.host("lm_head.weight", [cfg.vocabSize, cfg.dim]).data.byteLength).toBe(0);
  });
});

describe.skipIf(!av.ok)("on the GPU (exact mode)", () => {
  it("tiny-v3 logits match the golden file within 1e-3", () => {
    const cfg = parseConfig(JSON.parse(readFileSync(join(TINY, "config.json"), "utf8")));
    const golden = JSON.parse(readFileSync(join(TINY, "golden.json"), "utf8")) as {
      prompts: Array<{ ids: number[]; logits_offset: number }>;
    };
    const buf = readFileSync(join(TINY, "golden.f32"));
    const ref = new Float32Array(buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength));
    const ctx = cuda.create();
    const ck = Checkpoint.open(TINY);
    const m = new Transformer(ctx, ck, cfg);
    ck.close();
    m.allocCache(32, 16, "f32");
    const p = golden.prompts.find((q) => q.ids.length === 40)!;
    const L = p.ids.length;
    const bt = Int32Array.from({ length: 32 }, (_, i) => i);
    ctx.beginStep();
    const r = m.forward(Int32Array.from(p.ids), { positions: Int32Array.from({ length: L }, (_, i) => i), seqIdx: new Int32Array(L), blockTables: bt, maxBlocks: 32 }, Int32Array.from({ length: L }, (_, i) => i));
    let worst = 0;
    const off = p.logits_offset / 4;
    for (let i = 0; i < r.logits.length; i++) worst = Math.max(worst, Math.abs(r.logits[i]! - ref[off + i]!));
    expect(worst).toBeLessThan(1e-3);
    ctx.dispose();
  });
});
