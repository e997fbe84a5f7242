// Backend contract v2 and rank placement: the contract version the core checks, supports(op)
// errors naming the op and the backend, one device per rank (default and --devices), the
// placement errors (before any weight is read), shared devices only when asked for, and the
// host collective's broadcast of bytes of any length.
import { cpu } from "@ds3/backend-cpu";
import { type BackendProvider, type CacheSpec, type CollectiveBuffers, DS3, EXACT, LocalExecutor, parseDeviceList, placeRanks, RankExecutor, SharedCollective } from "@ds3/core";
import { copyFileSync, mkdtempSync, rmSync } from "node:fs";
import { createRequire } from "node:module";
import { freemem, tmpdir, totalmem } from "node:os";
import { dirname, join } from "node:path";
import { pathToFileURL } from "node:url";
import { Worker } from "node:worker_threads";
import { afterAll, describe, expect, it } from "vitest";
import { loadGolden } from "./helpers/golden.js";
// @ts-expect-error plain ESM helper without types (worker ranks import it by path)
import { makeDevicesBackend } from "./helpers/devices-backend.mjs";

const g = loadGolden("tiny-v3");
const CACHE: CacheSpec = { numBlocks: 8, blockSize: 64, dtype: "f32" };
const FAKE = new URL("./helpers/devices-backend.mjs", import.meta.url).href;
const variant = (name: string) => new URL(`./helpers/devices/${name}.mjs`, import.meta.url).href;
const fake = (o: { count?: number; api?: number; lack?: string[] } = {}): BackendProvider => makeDevicesBackend(FAKE, o);

const step = (ids: number[]) => ({
  ids: Int32Array.from(ids),
  positions: Int32Array.from(ids, (_, i) => i),
  seqIdx: new Int32Array(ids.length),
  blockTables: Int32Array.from({ length: 4 }, (_, i) => i),
  maxBlocks: 4,
  logitRows: Int32Array.from(ids, (_, i) => i),
});
function maxAbsDiff(a: Float32Array, b: Float32Array): number {
  expect(a.length).toBe(b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}

// a model directory with the config and no weights: a placement error must come before any read
const noWeights = mkdtempSync(join(tmpdir(), "ds3-devices-"));
copyFileSync(join(g.dir, "config.json"), join(noWeights, "config.json"));
afterAll(() => rmSync(noWeights, { recursive: true, force: true }));

describe("backend contract v2", () => {
  it("the CPU backend: version 2, one shareable device (the host, its memory), every op but sample", () => {
    expect(cpu.apiVersion).toBe(2);
    const d = cpu.devices();
    expect(d).toHaveLength(1);
    expect(d[0]!.index).toBe(0);
    expect(d[0]!.name).toMatch(/^cpu \(\d+ hardware threads/);
    expect(d[0]!.memoryTotal).toBe(totalmem());
    expect(d[0]!.memoryFree).toBeGreaterThan(0);
    expect(d[0]!.memoryFree).toBeLessThanOrEqual(totalmem());
    expect(Math.abs(d[0]!.memoryFree - freemem())).toBeLessThan(totalmem() / 2);
    expect(d[0]!.shareable).toBe(true);
    expect(cpu.supports("mla", EXACT)).toBe(true);
    expect(cpu.supports("linear", { activations: "bf16", cache: "bf16", actQuant: "fp8-ue8m0" })).toBe(true);
    expect(cpu.supports("sample", EXACT)).toBe(false);
  });

  it("a provider of another contract version is refused naming both versions (thread and ranks)", async () => {
    const old = fake({ api: 1 });
    expect(() => new LocalExecutor(g.dir, { backend: old, cache: CACHE })).toThrow(/backend "fake-gpu" implements backend contract version 1, this @ds3\/core needs version 2/);
    const none = { name: "v1", available: cpu.available, create: cpu.create } as unknown as BackendProvider;
    expect(() => new LocalExecutor(g.dir, { backend: none, cache: CACHE })).toThrow(/backend "v1" implements backend contract version 1 \(no apiVersion\), this @ds3\/core needs version 2/);
    await expect(RankExecutor.create(noWeights, { backendPackage: variant("v3"), cache: CACHE, worldSize: 2 })).rejects.toThrow(/contract version 3, this @ds3\/core needs version 2/);
  });

  it("an op the backend lacks: an error naming the op and the backend, in this thread and in the ranks", async () => {
    const noMla = fake({ lack: ["mla"] });
    expect(() => new LocalExecutor(g.dir, { backend: noMla, cache: CACHE })).toThrow('backend "fake-gpu" does not support op mla at precision activations=f32 cache=f32 actQuant=none');
    await expect(RankExecutor.create(noWeights, { backendPackage: variant("no-rope-gate"), cache: CACHE, worldSize: 2 })).rejects.toThrow(
      /^backend "fake-gpu" does not support ops rope, moeGate at precision activations=f32/,
    );
    // the op table is complete on the CPU: the same load works
    const ok = new LocalExecutor(g.dir, { backend: fake(), cache: CACHE });
    expect(maxAbsDiff(await ok.step(step(g.prompts[0]!.ids)), g.prompts[0]!.logits)).toBeLessThan(1e-3);
    await ok.close();
  });
});

describe("ranks on devices", () => {
  it("4 ranks on a backend with 4 devices: rank r on device r, device collectives on, golden logits", async () => {
    const ex = await RankExecutor.create(g.dir, { backendPackage: FAKE, cache: CACHE, worldSize: 4, threadsPerRank: 1 });
    try {
      expect(ex.placement).toEqual([0, 1, 2, 3]);
      expect(ex.rankDevices).toEqual([0, 1, 2, 3].map((d) => `fake-gpu:${d} (device collectives on)`));
      const p = g.prompts[1]!;
      expect(maxAbsDiff(await ex.step(step(p.ids)), p.logits)).toBeLessThan(1e-3);
    } finally {
      await ex.close();
    }
  });

  it("--devices: each rank gets the device listed for it", async () => {
    const ex = await RankExecutor.create(g.dir, { backendPackage: FAKE, cache: CACHE, worldSize: 2, devices: [3, 1], threadsPerRank: 1 });
    try {
      expect(ex.rankDevices).toEqual(["fake-gpu:3 (device collectives on)", "fake-gpu:1 (device collectives on)"]);
    } finally {
      await ex.close();
    }
    expect(parseDeviceList("0,1, 2 3")).toEqual([0, 1, 2, 3]);
    expect(() => parseDeviceList("0,x")).toThrow('--devices: "x" is not a device index (a non-negative integer) in "0,x"');
    expect(() => parseDeviceList(" ")).toThrow(/expected a comma-separated list/);
  });

  it("more ranks than devices, a device twice, a device that does not exist, a list of the wrong length: errors before any weight is read", async () => {
    const two = variant("two");
    // noWeights has no safetensors: an error about the placement proves nothing was read first
    await expect(RankExecutor.create(noWeights, { backendPackage: two, cache: CACHE, worldSize: 4 })).rejects.toThrow(
      '4 ranks but backend "fake-gpu" has 2 devices (0: Fake GPU 0; 1: Fake GPU 1); use fewer ranks, or shareDevices (--share-devices) to put several ranks on one device for testing',
    );
    await expect(RankExecutor.create(noWeights, { backendPackage: FAKE, cache: CACHE, worldSize: 2, devices: [1, 1] })).rejects.toThrow(
      "device 1 is given to rank 0 and rank 1; each rank needs its own device (or shareDevices / --share-devices, for testing)",
    );
    await expect(RankExecutor.create(noWeights, { backendPackage: FAKE, cache: CACHE, worldSize: 2, devices: [0, 7] })).rejects.toThrow(
      'device 7 does not exist on backend "fake-gpu" (its devices: 0: Fake GPU 0; 1: Fake GPU 1; 2: Fake GPU 2; 3: Fake GPU 3)',
    );
    await expect(RankExecutor.create(noWeights, { backendPackage: FAKE, cache: CACHE, worldSize: 4, devices: [0, 1] })).rejects.toThrow(
      "2 devices given (0,1) for 4 ranks: give one device per rank",
    );
    // DS3.load checks the same before reading anything (also in this thread, at tp 1)
    const p = fake({ count: 2 });
    await expect(DS3.load({ model: noWeights, backend: p, tp: 4 })).rejects.toThrow(/4 ranks but backend "fake-gpu" has 2 devices/);
    await expect(DS3.load({ model: noWeights, backend: p, tp: 2, devices: [0, 0] })).rejects.toThrow(/device 0 is given to rank 0 and rank 1/);
    await expect(DS3.load({ model: noWeights, backend: p, executor: "thread", devices: [5] })).rejects.toThrow(/device 5 does not exist on backend "fake-gpu"/);
    expect(() => new LocalExecutor(noWeights, { backend: p, cache: CACHE, backendOptions: { device: 2 } })).toThrow(/device 2 does not exist on backend "fake-gpu"/);
  });

  it("sharing one device only with shareDevices, which turns device collectives off; the host (CPU) is shared without it", async () => {
    const one = variant("one");
    const ex = await RankExecutor.create(g.dir, { backendPackage: one, cache: CACHE, worldSize: 2, shareDevices: true, threadsPerRank: 1 });
    try {
      expect(ex.rankDevices).toEqual(["fake-gpu:0 (device collectives off)", "fake-gpu:0 (device collectives off)"]);
      const p = g.prompts[0]!;
      expect(maxAbsDiff(await ex.step(step(p.ids)), p.logits)).toBeLessThan(1e-3);
    } finally {
      await ex.close();
    }
    const four = fake();
    expect(placeRanks(four, 4, { devices: [2, 2, 0, 0], shareDevices: true })).toMatchObject({ devices: [2, 2, 0, 0], deviceCollectives: false });
    expect(placeRanks(four, 2)).toMatchObject({ devices: [0, 1], deviceCollectives: true });
    expect(placeRanks(cpu, 4)).toMatchObject({ devices: [0, 0, 0, 0] });
  });
});

// broadcast across real worker threads: rank 0's bytes (any length, any bit pattern) arrive intact
describe("SharedCollective.broadcast", () => {
  const coreUrl = pathToFileURL(join(dirname(createRequire(import.meta.url).resolve("@ds3/core/package.json")), "dist/index.js")).href;
  const workerCode = `
    const { workerData, parentPort } = require("node:worker_threads");
    import(workerData.coreUrl).then(({ SharedCollective }) => {
      const { bufs, rank, payloads } = workerData;
      const c = new SharedCollective(bufs, rank, 20000);
      try {
        const got = payloads.map((p) => c.broadcast(rank === 0 ? p : new Uint8Array(3)));
        const sum = c.allReduceSum(Float32Array.of(rank)); // the collective lines up after broadcasts
        parentPort.postMessage({ got, sum });
      } catch (e) { parentPort.postMessage({ error: e.message }); }
    });`;
  const run = (bufs: CollectiveBuffers, rank: number, payloads: Uint8Array[]) =>
    new Promise<{ got?: Uint8Array[]; sum?: Float32Array; error?: string }>((resolve, reject) => {
      const w = new Worker(workerCode, { eval: true, workerData: { coreUrl, bufs, rank, payloads } });
      w.once("message", (m) => {
        resolve(m);
        void w.terminate();
      });
      w.once("error", reject);
    });

  for (const N of [2, 4])
    it(`world size ${N}: a 4,108-byte payload (HCCL root info size), empty and chunked ones, bit for bit on every rank`, async () => {
      // bytes that are NaN / -0 / denormal patterns as floats, so a float path would change them
      const hccl = Uint8Array.from({ length: 4108 }, (_, i) => (i * 131 + 7) & 255);
      hccl.set([0xff, 0xff, 0xff, 0x7f, 0x00, 0x00, 0x00, 0x80, 0x01, 0x00, 0x00, 0x00], 100);
      const payloads = [hccl, new Uint8Array(0), Uint8Array.of(42), Uint8Array.from({ length: 1001 }, (_, i) => (i * 7) & 255)];
      const bufs = SharedCollective.allocate(N, 64); // 256 bytes per chunk: the 4,108 bytes go in 17 chunks
      const out = await Promise.all(Array.from({ length: N }, (_, r) => run(bufs, r, payloads)));
      for (const o of out) {
        expect(o.error).toBeUndefined();
        expect(o.got!.map((b) => Buffer.from(b).toString("hex"))).toEqual(payloads.map((b) => Buffer.from(b).toString("hex")));
        expect(o.sum![0]).toBe((N * (N - 1)) / 2);
      }
    });

  it("rank 0 without bytes is a clear error", () => {
    const c = new SharedCollective(SharedCollective.allocate(1), 0);
    expect(() => c.broadcast()).toThrow("broadcast: rank 0 must pass the bytes (a Uint8Array)");
    expect(Buffer.from(c.broadcast(Uint8Array.of(1, 2, 3)))).toEqual(Buffer.from([1, 2, 3]));
  });
});
