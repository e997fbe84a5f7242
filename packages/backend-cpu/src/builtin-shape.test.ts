// The built-in generator's shape option (what bench/cpu.mjs uses for issue 16's model): a model
// of another shape, in its own directory, that loads and runs on the CPU backend; bad shapes are
// refused by name.
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { basename, join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { Checkpoint, LocalExecutor, builtinModelDir, ensureBuiltinModel } from "@ds3/core";
import { cpu } from "./index.js";

const cacheDir = mkdtempSync(join(tmpdir(), "ds3-shape-"));
afterAll(() => rmSync(cacheDir, { recursive: true, force: true }));

const SHAPE = {
  vocab_size: 1024, hidden_size: 128, intermediate_size: 320, moe_intermediate_size: 64, num_hidden_layers: 3, num_nextn_predict_layers: 0,
  num_attention_heads: 4, n_routed_experts: 8, n_group: 4, topk_group: 2, num_experts_per_tok: 2, kv_lora_rank: 64, q_lora_rank: 96,
  qk_rope_head_dim: 16, qk_nope_head_dim: 32, v_head_dim: 32,
};

describe("built-in generator with a shape", () => {
  it("writes the shape into its own directory; the checkpoint has its tensors; it runs on the CPU backend", async () => {
    const dir = await ensureBuiltinModel({ cacheDir, shape: SHAPE });
    expect(dir).toBe(builtinModelDir({ cacheDir, shape: SHAPE }));
    expect(basename(dir)).toMatch(/^builtin-v1-[0-9a-f]{8}$/);
    expect(dir).not.toBe(builtinModelDir({ cacheDir }));
    expect(await ensureBuiltinModel({ cacheDir, shape: { ...SHAPE } })).toBe(dir); // same shape, same directory
    const cfg = JSON.parse(readFileSync(join(dir, "config.json"), "utf8"));
    for (const [k, v] of Object.entries(SHAPE)) expect(cfg[k], k).toBe(v);
    const ck = Checkpoint.open(dir);
    try {
      expect(ck.info("model.embed_tokens.weight").shape).toEqual([1024, 128]);
      expect(ck.info("model.layers.0.mlp.down_proj.weight").shape).toEqual([128, 320]);
      expect(ck.info("model.layers.2.mlp.experts.7.up_proj.weight").shape).toEqual([64, 128]);
      expect(ck.info("model.layers.1.self_attn.kv_b_proj.weight").shape).toEqual([4 * (32 + 32), 64]);
      expect(ck.has("model.layers.2.mlp.experts.8.up_proj.weight")).toBe(false);
      expect(ck.names().some((n) => n.startsWith("model.layers.3."))).toBe(false); // no MTP layer
    } finally {
      ck.close();
    }
    const ex = new LocalExecutor(dir, { backend: cpu, backendOptions: { threads: 2 }, cache: { numBlocks: 4, blockSize: 16, dtype: "f32" }, mtp: false });
    try {
      expect(ex.vocabSize).toBe(1024);
      const logits = await ex.step({
        ids: Int32Array.of(5, 77, 901), positions: Int32Array.of(0, 1, 2), seqIdx: new Int32Array(3), blockTables: Int32Array.of(0, 1, 2, 3),
        maxBlocks: 4, logitRows: Int32Array.of(2),
      });
      expect(logits.length).toBe(1024);
      expect(logits.every(Number.isFinite)).toBe(true);
      expect(new Set(logits).size).toBeGreaterThan(1000);
    } finally {
      await ex.close();
    }
  }, 60_000);

  it("refuses a shape that is not a positive integer, an unknown field, or inconsistent grouping", async () => {
    await expect(ensureBuiltinModel({ cacheDir, shape: { hidden_size: 0 } })).rejects.toThrow(/hidden_size must be a positive integer \(got 0\)/);
    await expect(ensureBuiltinModel({ cacheDir, shape: { hidden_size: 12.5 } })).rejects.toThrow(/hidden_size must be a positive integer/);
    await expect(ensureBuiltinModel({ cacheDir, shape: { hiden_size: 64 } as never })).rejects.toThrow(/unknown field "hiden_size"/);
    await expect(ensureBuiltinModel({ cacheDir, shape: { n_routed_experts: 10, n_group: 4 } })).rejects.toThrow(/n_routed_experts 10 is not a multiple of n_group 4/);
  });
});
