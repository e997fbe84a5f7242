// A plan whose weights + latent cache exceed its device's memory is refused at load, before any
// weight is read (fit.ts, wired into the LocalExecutor constructor and RankExecutor.create; across
// nodes each node checks its own ranks). The device is the tiny-memory test backend's (memory
// from DS3_TEST_DEVICE_MEMORY); the bytes it needs are computed here from the safetensors headers
// and config.json, independently of fit.ts.
import { DS3, FitError } from "@ds3/core";
import { closeSync, openSync, readFileSync, readSync } from "node:fs";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { FIXTURES } from "./helpers/golden.js";
import { alive, freePort, start, within } from "./helpers/multinode.js";
// @ts-expect-error plain ESM helper without types (worker ranks import it by path)
import { tinyMemoryBackend } from "./helpers/multinode-tinymem-backend.mjs";

const TINY = join(FIXTURES, "tiny-v3");
const FIT = new URL("./helpers/multinode-fit.mjs", import.meta.url).pathname;
const cfg = JSON.parse(readFileSync(join(TINY, "config.json"), "utf8")) as { num_hidden_layers: number; kv_lora_rank: number; qk_rope_head_dim: number };
const BLOCKS = 4;

/** bytes of every tensor in the checkpoint's shards, from their headers; `mtp`: with the MTP layer's (layers >= num_hidden_layers) */
function weightBytes(mtp: boolean): number {
  const index = JSON.parse(readFileSync(join(TINY, "model.safetensors.index.json"), "utf8")) as { weight_map: Record<string, string> };
  let total = 0;
  for (const shard of new Set(Object.values(index.weight_map))) {
    const fd = openSync(join(TINY, shard), "r");
    try {
      const len = Buffer.alloc(8);
      readSync(fd, len, 0, 8, 0);
      const h = Buffer.alloc(Number(len.readBigUInt64LE(0)));
      readSync(fd, h, 0, h.length, 8);
      for (const [name, t] of Object.entries(JSON.parse(h.toString("utf8")) as Record<string, { data_offsets?: [number, number] }>)) {
        if (!t.data_offsets) continue; // __metadata__
        const layer = /^model\.layers\.(\d+)\./.exec(name);
        if (!mtp && layer && Number(layer[1]) >= cfg.num_hidden_layers) continue;
        total += t.data_offsets[1] - t.data_offsets[0];
      }
    } finally {
      closeSync(fd);
    }
  }
  return total;
}
/** latent cache bytes of one rank: blocks x layers x 64 tokens x (kv_lora_rank + rope dims) x f32 */
const cacheBytes = (mtp: boolean) => BLOCKS * (cfg.num_hidden_layers + (mtp ? 1 : 0)) * 64 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4;
const kib = (b: number) => `${(b / 1024).toFixed(2)} KiB`;
const mib = (b: number) => `${(b / 2 ** 20).toFixed(2)} MiB`;
const fmt = (b: number) => (b >= 2 ** 20 ? mib(b) : kib(b));

const setMemory = (bytes: number) => (process.env.DS3_TEST_DEVICE_MEMORY = String(bytes));
afterEach(() => {
  delete process.env.DS3_TEST_DEVICE_MEMORY;
});
const g = globalThis as { __tinymemCreates?: number };

describe("a plan that does not fit its device is refused at load", () => {
  const w = weightBytes(false);
  const c = cacheBytes(false);
  const need = w + c;

  it("one rank in this thread (LocalExecutor): one byte short is refused naming device, rank and bytes, before any backend context exists; exactly enough loads", async () => {
    setMemory(need - 1);
    g.__tinymemCreates = 0;
    const err = await DS3.load({ model: TINY, backend: tinyMemoryBackend, executor: "thread", cacheBlocks: BLOCKS }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(FitError);
    expect((err as Error).message).toBe(
      `the placement plan does not fit on backend "tinymem-test": device 0 (tinymem device) holds rank 0: ${fmt(w)} of weights + ${fmt(c)} of latent cache = ${fmt(need)}, more than its ${fmt(need - 1)} (more ranks (--tp), fewer cache blocks (--cache-blocks / --cache-bytes), a bf16 cache, or devices with more memory)`,
    );
    expect((err as FitError).devices).toEqual([{ device: expect.objectContaining({ index: 0 }), ranks: [0], needBytes: need, totalBytes: need - 1 }]);
    expect(g.__tinymemCreates).toBe(0);
    setMemory(need);
    const ds3 = await DS3.load({ model: TINY, backend: tinyMemoryBackend, executor: "thread", cacheBlocks: BLOCKS });
    expect(g.__tinymemCreates).toBe(1);
    await ds3.close();
  });

  it("the MTP layer counts when it is loaded (its weights and its cache layer)", async () => {
    setMemory(need);
    const err = await DS3.load({ model: TINY, backend: tinyMemoryBackend, executor: "thread", cacheBlocks: BLOCKS, speculative: { drafter: "mtp" } }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(FitError);
    expect((err as FitError).devices[0]!.needBytes).toBe(weightBytes(true) + cacheBytes(true));
  });

  it("two worker ranks on the one device (RankExecutor) add up: refused naming both ranks, before any worker starts", async () => {
    setMemory(need); // one rank's whole-model footprint: two ranks (replicated tensors twice, two caches) need more
    const err = await DS3.load({ model: TINY, backend: tinyMemoryBackend, tp: 2, cacheBlocks: BLOCKS }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(FitError);
    const d = (err as FitError).devices;
    expect(d.map((x) => x.ranks)).toEqual([[0, 1]]);
    expect(d[0]!.needBytes).toBeGreaterThan(need);
    expect(d[0]!.needBytes).toBeLessThan(2 * need);
    expect((err as Error).message).toMatch(/device 0 \(tinymem device\) holds ranks 0, 1: [\d.]+ [KM]iB of weights \+ [\d.]+ [KM]iB of latent cache = [\d.]+ [KM]iB, more than its/);
  });

  it("across nodes each node checks its own ranks: node 1's device too small fails node 1's rank at node 0's load, both nodes exit naming it", async () => {
    const addr = `127.0.0.1:${await freePort()}`;
    const n1 = start([FIT, TINY, addr, "1"], { DS3_TEST_DEVICE_MEMORY: "1024" });
    const n0 = start([FIT, TINY, addr, "0"], { DS3_TEST_DEVICE_MEMORY: String(2 ** 40) });
    try {
      const [c0, c1] = await within(Promise.all([n0.exited, n1.exited]), 60_000, "both nodes");
      expect([c0, c1]).toEqual([1, 1]);
      const r0 = JSON.parse(n0.stdout()) as { message: string };
      const r1 = JSON.parse(n1.stdout()) as { message: string };
      const why = `the placement plan does not fit on backend "tinymem-test": device 0 (tinymem device) holds rank 1: `;
      expect(r0.message).toMatch(/^RankExecutor: node 1 \(127\.0\.0\.1:\d+\) rank 1 failed to load: /);
      expect(r0.message).toContain(why);
      expect(r0.message).toContain("more than its 1.00 KiB");
      expect(r1.message).toContain(`node 0 (${addr}) ended after a failure: RankExecutor: node 1`);
      expect(r1.message).toContain(why);
    } finally {
      for (const p of [n0, n1]) if (alive(p.pid)) p.child.kill("SIGKILL");
    }
  });
});
