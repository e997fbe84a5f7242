// DeepSeek-V3 on the CPU backend against the independent reference (shared/golden):
// logits at every position, greedy continuations by prefill + incremental decode,
// incremental = recompute, batching invariance, and the MTP block.
import { cpu } from "@ds3/backend-cpu";
import { LocalExecutor } from "@ds3/core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { argmax, comparableGreedyPrefix, type Golden, loadGolden, maxAbsDiff, seqStep } from "./helpers/golden.js";

for (const name of ["tiny-v3", "tiny-v3-bf16"] as const) {
  describe(`golden ${name} (CPU backend, fp32)`, () => {
    let g: Golden;
    let ex: LocalExecutor;
    beforeAll(() => {
      g = loadGolden(name);
      ex = new LocalExecutor(g.dir, { backend: cpu, cache: { numBlocks: 32, blockSize: 64, dtype: "f32" }, mtp: name === "tiny-v3" });
    });
    afterAll(() => ex.close());

    it("logits at every position of every prompt (lengths 1, 7, 40, 300) within 1e-3", async () => {
      expect(g.prompts.map((p) => p.ids.length)).toEqual([1, 7, 40, 300]);
      for (const p of g.prompts) {
        const logits = await ex.step(seqStep(p.ids));
        expect(logits.length).toBe(p.ids.length * g.vocab);
        expect(maxAbsDiff(logits, p.logits)).toBeLessThan(1e-3);
      }
    });

    it("greedy continuation by prefill + incremental decode equals the reference, and equals full recomputation", async () => {
      for (const p of g.prompts) {
        const n = comparableGreedyPrefix(p);
        const L = p.ids.length;
        let logits = await ex.step(seqStep(p.ids, 0, 16, [L - 1]));
        const out: number[] = [];
        const decodeLogits: Float32Array[] = [];
        for (let i = 0; i < p.greedy.length; i++) {
          const next = argmax(logits);
          out.push(next);
          decodeLogits.push(logits);
          if (i + 1 < p.greedy.length) logits = await ex.step(seqStep([next], L + i, 16, [0]));
        }
        expect(out.slice(0, n)).toEqual(p.greedy.slice(0, n));
        // full recomputation of prompt + continuation from an empty cache gives the same logits
        const all = [...p.ids, ...out.slice(0, -1)];
        const re = await ex.step(seqStep(all));
        for (let i = 0; i < out.length; i++) {
          const row = re.subarray((L - 1 + i) * g.vocab, (L + i) * g.vocab);
          expect(maxAbsDiff(row, decodeLogits[i]!)).toBeLessThan(1e-4);
          expect(argmax(row)).toBe(out[i]);
        }
      }
    });

    it("sequences of different lengths batched in one step give the same logits as each alone", async () => {
      const alone: Float32Array[] = [];
      for (const p of g.prompts) alone.push(await ex.step(seqStep(p.ids)));
      // all four prompts in one step, each in its own blocks
      const maxBlocks = 8;
      const ids: number[] = [];
      const positions: number[] = [];
      const seqIdx: number[] = [];
      const bt = new Int32Array(g.prompts.length * maxBlocks).fill(-1);
      g.prompts.forEach((p, s) => {
        p.ids.forEach((t, i) => {
          ids.push(t);
          positions.push(i);
          seqIdx.push(s);
        });
        for (let b = 0; b < Math.ceil(p.ids.length / 64); b++) bt[s * maxBlocks + b] = s * maxBlocks + b;
      });
      const batched = await ex.step({
        ids: Int32Array.from(ids),
        positions: Int32Array.from(positions),
        seqIdx: Int32Array.from(seqIdx),
        blockTables: bt,
        maxBlocks,
        logitRows: Int32Array.from(ids.map((_, i) => i)),
      });
      let row = 0;
      g.prompts.forEach((p, s) => {
        const part = batched.subarray(row * g.vocab, (row + p.ids.length) * g.vocab);
        // bit-identical: every kernel computes each token independently of the batch
        expect(maxAbsDiff(part, alone[s]!)).toBe(0);
        row += p.ids.length;
      });
    });

    if (name === "tiny-v3") {
      it("MTP logits within 1e-3", async () => {
        for (const p of g.prompts) {
          if (p.ids.length < 2) continue;
          const L = p.ids.length;
          await ex.step(seqStep(p.ids));
          const rows = Array.from({ length: L - 1 }, (_, i) => i);
          const s = seqStep(p.ids.slice(0, L - 1));
          const mtp = await ex.mtp({ ...s, rows: Int32Array.from(rows), nextIds: Int32Array.from(p.ids.slice(1)) });
          expect(maxAbsDiff(mtp, p.mtp!)).toBeLessThan(1e-3);
        }
      });
    }

    it("token ids outside the vocabulary are rejected before native code, and the model keeps working", async () => {
      await expect(ex.step(seqStep([1, g.vocab]))).rejects.toThrow(/token id 1024 at index 1 is outside the vocabulary \[0, 1024\)/);
      await expect(ex.step(seqStep([-1]))).rejects.toThrow(/token id -1 .* outside the vocabulary/);
      const p = g.prompts[1]!;
      expect(maxAbsDiff(await ex.step(seqStep(p.ids)), p.logits)).toBeLessThan(1e-3);
    });
  });
}
