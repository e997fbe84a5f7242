// fit.ts: per-rank weight bytes from the safetensors headers (every byte of the checkpoint on
// some rank, replicated tensors on all, routed experts on exactly one), and the refusal of a
// plan that exceeds a device's memory, with its numbers.
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";
import type { DeviceInfo } from "./backend.js";
import { cacheBytesPerBlock, loadConfig } from "./executor.js";
import { checkPlanFits, FitError, planFootprint, tensorSplit, weightBytesPerRank } from "./fit.js";
import { Checkpoint } from "./safetensors.js";

const TINY = join(fileURLToPath(new URL("../../..", import.meta.url)), "test/fixtures/tiny-v3");
const GiB = 2 ** 30;
const dev = (index: number, memoryTotal: number): DeviceInfo => ({ index, name: `GPU ${index}`, memoryTotal, memoryFree: memoryTotal });

describe("weightBytesPerRank", () => {
  it("tiny-v3 at 1, 2 and 4 ranks: replicated tensors on every rank, split ones divided, each routed expert on one rank", () => {
    const cfg = loadConfig(TINY);
    const ck = Checkpoint.open(TINY);
    try {
      const bytes = { replicated: 0, split: 0, expert: new Map<number, number>() };
      for (const n of ck.names()) {
        const s = tensorSplit(n);
        const b = ck.info(n).nbytes;
        if (s.split === "expert") bytes.expert.set(s.expert, (bytes.expert.get(s.expert) ?? 0) + b);
        else bytes[s.split] += b;
      }
      expect(bytes.expert.size).toBe(cfg.nRoutedExperts);
      expect(bytes.split).toBeGreaterThan(0);
      const total = bytes.replicated + bytes.split + [...bytes.expert.values()].reduce((a, b) => a + b, 0);
      expect(weightBytesPerRank(ck, cfg, 1)).toEqual([total]);
      for (const ws of [2, 4]) {
        const per = weightBytesPerRank(ck, cfg, ws);
        const k = cfg.nRoutedExperts / ws;
        for (let r = 0; r < ws; r++) {
          let ex = 0;
          for (let e = r * k; e < (r + 1) * k; e++) ex += bytes.expert.get(e)!;
          expect(Math.abs(per[r]! - (bytes.replicated + bytes.split / ws + ex))).toBeLessThan(1);
        }
      }
    } finally {
      ck.close();
    }
  });

  it("names: experts, vocab-split tables, head-split attention and MLP projections, the rest replicated; scales follow their weights", () => {
    expect(tensorSplit("model.layers.3.mlp.experts.17.down_proj.weight_scale_inv")).toEqual({ split: "expert", expert: 17 });
    expect(tensorSplit("model.embed_tokens.weight").split).toBe("split");
    expect(tensorSplit("lm_head.weight").split).toBe("split");
    expect(tensorSplit("model.layers.0.self_attn.kv_b_proj.weight_scale_inv").split).toBe("split");
    expect(tensorSplit("model.layers.3.mlp.shared_experts.up_proj.weight").split).toBe("split");
    expect(tensorSplit("model.layers.0.self_attn.kv_a_proj_with_mqa.weight").split).toBe("replicated");
    expect(tensorSplit("model.layers.3.mlp.gate.weight").split).toBe("replicated");
    expect(tensorSplit("model.norm.weight").split).toBe("replicated");
  });
});

describe("checkPlanFits", () => {
  it("a plan within every device's memory passes; one over is refused naming device, ranks and bytes", () => {
    const plan = [0, 1].map((rank) => ({ rank, device: dev(rank, 80 * GiB), weightBytes: 70 * GiB, cacheBytes: 5 * GiB }));
    expect(() => checkPlanFits(plan)).not.toThrow();
    const big = plan.map((r) => ({ ...r, cacheBytes: 12 * GiB }));
    expect(() => checkPlanFits(big, 'backend "cuda"')).toThrow(
      'the placement plan does not fit on backend "cuda": device 0 (GPU 0) holds rank 0: 70.00 GiB of weights + 12.00 GiB of latent cache = 82.00 GiB, more than its 80.00 GiB; device 1 (GPU 1) holds rank 1: 70.00 GiB of weights + 12.00 GiB of latent cache = 82.00 GiB, more than its 80.00 GiB',
    );
    try {
      checkPlanFits(big);
    } catch (e) {
      expect(e).toBeInstanceOf(FitError);
      expect((e as FitError).devices.map((d) => [d.device.index, d.ranks, d.needBytes / GiB, d.totalBytes / GiB])).toEqual([
        [0, [0], 82, 80],
        [1, [1], 82, 80],
      ]);
    }
  });

  it("ranks sharing a device add up; a device that cannot tell its memory is not checked", () => {
    const shared = dev(0, 100 * GiB);
    const plan = [0, 1].map((rank) => ({ rank, device: shared, weightBytes: 45 * GiB, cacheBytes: 4 * GiB }));
    expect(() => checkPlanFits(plan)).not.toThrow(); // 98 of 100 GiB
    expect(() => checkPlanFits(plan.map((r) => ({ ...r, cacheBytes: 6 * GiB })))).toThrow(/holds ranks 0, 1: 90\.00 GiB of weights \+ 12\.00 GiB of latent cache = 102\.00 GiB, more than its 100\.00 GiB/);
    expect(() => checkPlanFits(plan.map((r) => ({ ...r, device: dev(0, NaN), cacheBytes: 1e15 })))).not.toThrow();
  });

  it("planFootprint: the checkpoint's per-rank bytes and the cache each rank allocates", () => {
    const cfg = loadConfig(TINY);
    const ck = Checkpoint.open(TINY);
    try {
      const cache = { numBlocks: 10, blockSize: 64, dtype: "bf16" as const };
      const plan = planFootprint(ck, cfg, [dev(0, GiB), dev(1, GiB)], cache);
      expect(plan.map((r) => r.weightBytes)).toEqual(weightBytesPerRank(ck, cfg, 2));
      for (const r of plan) expect(r.cacheBytes).toBe(10 * cacheBytesPerBlock(cfg, 64, "bf16", false));
      expect(() => checkPlanFits(plan)).not.toThrow();
      expect(() => checkPlanFits(planFootprint(ck, cfg, [dev(0, 1e6), dev(1, 1e6)], cache))).toThrow(/does not fit/);
    } finally {
      ck.close();
    }
  });
});
