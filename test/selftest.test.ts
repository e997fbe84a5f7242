// `ds3 selftest`: the conformance suite through the CLI, as a user runs it: a table per precision or
// JSON with the precision of each check, exit status 0 only when every gating check passes, a wrong
// backend failed by name, a precision the backend lacks "not supported" unless named. And the CLI's
// rank placement flags (--devices, --share-devices).
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { ds3, ROOT } from "./helpers/cli.js";
import { FIXTURES, loadGolden } from "./helpers/golden.js";

interface Report {
  backend: string;
  device: string;
  ok: boolean;
  precisions: Array<{ name: string; precision: { activations: string; cache: string; actQuant: string }; status: string }>;
  checks: Array<{ name: string; op?: string; precision: string; kind: string; ok: boolean; worst: number | null; tolerance: number | null; bound?: string; detail?: string; metrics?: Record<string, number> }>;
}

const PRECISIONS = ["exact", "bf16", "fp8", "fp8-ue8m0", "fp8-fnuz"];
const OPS = ["embed", "rmsNorm", "linear", "add", "siluMul", "concat", "slice", "rows", "rope", "mla", "moeGate", "moeExperts", "allReduce", "allGatherCols"];
const BF16_ONLY = join(ROOT, "test/conformance/bf16-only-backend.mjs");

describe("ds3 selftest", () => {
  it("--backend cpu --json: every precision by default, passes, the JSON parses, each check names its precision; every op and the golden checkpoint at the --world-sizes given at each", async () => {
    const r = await ds3(["selftest", "--backend", "cpu", "--json", "--golden", "test/fixtures/tiny-v3", "--world-sizes", "1,2"]);
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
    const o = JSON.parse(r.stdout) as Report;
    expect(o.backend).toBe("cpu");
    expect(o.device).toMatch(/^cpu \(/);
    expect(o.ok).toBe(true);
    expect(o.precisions.map((p) => [p.name, p.status])).toEqual(PRECISIONS.map((p) => [p, "ran"]));
    expect(o.precisions[2]!.precision).toEqual({ activations: "bf16", cache: "bf16", actQuant: "fp8" });
    for (const c of o.checks) {
      expect(PRECISIONS, c.name).toContain(c.precision);
      if (c.kind === "info") {
        expect(c.ok, c.name).toBe(true);
        expect(c.tolerance, c.name).toBeNull(); // informs, gates nothing
        continue;
      }
      expect(c.kind, c.name).toBe("gate");
      expect(c.ok, c.name).toBe(true);
      expect(c.worst, c.name).not.toBeNull();
      if (c.bound === "min") expect(c.worst!, c.name).toBeGreaterThanOrEqual(c.tolerance!);
      else expect(c.worst!, c.name).toBeLessThanOrEqual(c.tolerance!);
    }
    for (const p of PRECISIONS) {
      const mine = o.checks.filter((c) => c.precision === p);
      const ops = new Set(mine.map((c) => c.op));
      for (const op of OPS) expect(ops, `${p} ${op}`).toContain(op);
      for (const ws of [1, 2]) expect(mine.map((c) => c.name)).toContain(`tiny-v3 at world size ${ws}: golden logits, ${p === "exact" ? "every position" : "mean cosine similarity over every position"}`);
      expect(mine.some((c) => c.name.includes("world size 4")), p).toBe(false); // --world-sizes 1,2
    }
    // without --golden: the repository's two checkpoints
    const ex = await ds3(["selftest", "--backend", "cpu", "--json", "--precision", "exact"]);
    expect(ex.code).toBe(0);
    const e = JSON.parse(ex.stdout) as Report;
    for (const g of ["tiny-v3", "tiny-v3-bf16"]) for (const ws of [1, 2, 4]) expect(e.checks.map((c) => c.name)).toContain(`${g} at world size ${ws}: golden logits, every position`);
    // the end-to-end drift is reported with its numbers
    const drift = o.checks.find((c) => c.precision === "fp8" && c.name === "tiny-v3 at world size 1: golden logits, drift")!;
    expect(drift.kind).toBe("info");
    expect(drift.metrics!.meanCos).toBeGreaterThan(0.9);
    expect(drift.metrics!.meanKl).toBeGreaterThan(0);
  });

  it("the table: one section per precision, one row per check with its result and worst error, and the verdict", async () => {
    const r = await ds3(["selftest", "--backend", "cpu", "--golden", "test/fixtures/tiny-v3", "--precision", "exact,fp8"]);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^backend cpu on cpu \(/);
    expect(r.stdout).toMatch(/^check +result +worst +tolerance$/m);
    expect(r.stdout).toMatch(/^precision exact: activations f32, cache f32, no activation quantization; gates: /m);
    expect(r.stdout).toMatch(/^precision fp8: activations bf16, cache bf16, activations quantized fp8 in front of FP8 weights; gates: the quantizers exactly, .*; informs: KL, min cosine, top-1, greedy ids$/m);
    expect(r.stdout).toMatch(/^mla \(absorbed.*\) +pass +\d\.\d\de-\d+ +1\.00e-5$/m);
    expect(r.stdout).toMatch(/^mla \(absorbed, paged bf16 cache.*\) +pass +\d\.\d\de-\d+ +1\.56e-2$/m);
    expect(r.stdout).toMatch(/^FP8 activation quantization \(fp8: e4m3fn, max 448\).* +pass +0 +0 +\d+ values$/m);
    expect(r.stdout).toMatch(/^tiny-v3 at world size 4: golden logits, every position +pass /m);
    expect(r.stdout).toMatch(/^tiny-v3 at world size 4: golden logits, mean cosine similarity over every position +pass +9\.\d\de-1 +>= 9\.00e-1$/m);
    expect(r.stdout).toMatch(/^tiny-v3 at world size 4: golden logits, drift +info +\S+ +- +mean KL [\d.]+, max KL [\d.]+, min cosine [\d.]+, top-1 agreement [\d.]+% of 348 positions/m);
    expect(r.stdout).not.toMatch(/tiny-v3-bf16/); // only the checkpoint given
    expect(r.stdout).not.toMatch(/^precision bf16/m); // only the precisions asked for
    expect(r.stdout).toMatch(/^precisions run: exact, fp8; 6 informational rows$/m);
    expect(r.stdout).toMatch(/^\d+ of \d+ checks passed: PASS$/m);
  });

  it("a backend with a wrong op fails (exit 1) naming it; a backend of another contract version is refused; a bad --golden or --precision is named", async () => {
    const bad = await ds3(["selftest", "--backend", join(ROOT, "test/helpers/wrong-rmsnorm-backend.mjs"), "--golden", "test/fixtures/tiny-v3", "--precision", "exact"]);
    expect(bad.code).toBe(1);
    expect(bad.stdout).toMatch(/^rmsNorm +FAIL +1\.\d\de-3 +1\.00e-5$/m);
    expect(bad.stdout).toMatch(/^linear \(f32 weight\) +pass/m);
    expect(bad.stdout).toMatch(/: FAIL$/m);
    expect(bad.stderr).toMatch(/selftest failed on backend cpu-wrong-rmsnorm: rmsNorm \[exact\]; tiny-v3 at world size 1: golden logits, every position \[exact\]/);
    const v3 = await ds3(["selftest", "--backend", join(ROOT, "test/helpers/devices/v3.mjs")]);
    expect(v3.code).toBe(1);
    expect(v3.stderr).toMatch(/is not available: backend "fake-gpu" implements backend contract version 3, this @ds3\/core needs version 2/);
    const g = await ds3(["selftest", "--backend", "cpu", "--golden", "/nonexistent"]);
    expect(g.code).toBe(2);
    expect(g.stderr).toMatch(/--golden \/nonexistent: no golden.json there/);
    const p = await ds3(["selftest", "--backend", "cpu", "--precision", "exact,fp4"]);
    expect(p.code).toBe(2);
    expect(p.stderr).toMatch(/--precision: "fp4" is not a precision \(exact, bf16, fp8, fp8-ue8m0, fp8-fnuz, or all\)/);
    const ws = await ds3(["selftest", "--backend", "cpu", "--world-sizes", "1,0"]);
    expect(ws.code).toBe(2);
    expect(ws.stderr).toMatch(/--world-sizes: "0" is not a positive integer \(in "1,0"\)/);
  });

  it("a BF16-only backend: the other precisions are 'not supported' by default (exit 0), and a failure when asked for", async () => {
    const all = await ds3(["selftest", "--backend", BF16_ONLY, "--golden", "test/fixtures/tiny-v3", "--json"]);
    expect(all.code).toBe(0);
    const o = JSON.parse(all.stdout) as Report;
    expect(o.precisions.map((p) => [p.name, p.status])).toEqual([["exact", "not supported"], ["bf16", "ran"], ["fp8", "not supported"], ["fp8-ue8m0", "not supported"], ["fp8-fnuz", "not supported"]]);
    expect(o.checks.filter((c) => c.kind === "not supported").map((c) => c.precision)).toEqual(["exact", "fp8", "fp8-ue8m0", "fp8-fnuz"]);
    expect(o.checks.some((c) => c.precision === "bf16" && c.name === "tiny-v3 at world size 2: golden logits, mean cosine similarity over every position" && c.ok)).toBe(true);
    const named = await ds3(["selftest", "--backend", BF16_ONLY, "--golden", "test/fixtures/tiny-v3", "--precision", "fp8"]);
    expect(named.code).toBe(1);
    expect(named.stdout).toMatch(/^precision fp8 \(activations bf16, cache bf16, activations quantized fp8 in front of FP8 weights\) +FAIL +- +- +backend "cpu-bf16-only" supports no op at this precision$/m);
    expect(named.stderr).toMatch(/selftest failed on backend cpu-bf16-only: precision fp8 \(.*\) \[fp8\]/);
  });
});

describe("ds3 --devices / --share-devices", () => {
  const g = loadGolden("tiny-v3");
  const TINY = join(FIXTURES, "tiny-v3");
  const gen = (extra: string[]) => ds3(["generate", "--model", TINY, "--prompt-ids", g.prompts[0]!.ids.join(","), "--temperature", "0", "--max-tokens", "6", "--json", ...extra]);

  it("ranks placed by --devices give the golden greedy ids; a bad list is named before anything loads", async () => {
    // the CPU is one shareable device: two ranks on device 0
    const r = await gen(["--backend", "cpu", "--tp", "2", "--devices", "0,0"]);
    expect(r.stderr).not.toMatch(/error/i);
    expect(r.code).toBe(0);
    expect((JSON.parse(r.stdout.trim().split("\n")[0]!) as { token_ids: number[] }).token_ids).toEqual(g.prompts[0]!.greedy.slice(0, 6));
    // the devices backend has 4 devices, exactly one per rank
    const fake = join(ROOT, "test/helpers/devices-backend.mjs");
    const four = await gen(["--backend", fake, "--tp", "4", "--devices", "3,2,1,0"]);
    expect(four.code).toBe(0);
    const dup = await gen(["--backend", fake, "--tp", "2", "--devices", "1,1"]);
    expect(dup.code).toBe(1);
    expect(dup.stderr).toMatch(/device 1 is given to rank 0 and rank 1; each rank needs its own device \(or shareDevices \/ --share-devices, for testing\)/);
    expect(dup.stderr).not.toMatch(/loading/); // refused before the load starts
    const shared = await gen(["--backend", fake, "--tp", "2", "--devices", "1,1", "--share-devices"]);
    expect(shared.code).toBe(0);
    const missing = await gen(["--backend", "cpu", "--devices", "1"]);
    expect(missing.code).toBe(1);
    expect(missing.stderr).toMatch(/device 1 does not exist on backend "cpu" \(its devices: 0: cpu/);
    const junk = await gen(["--backend", "cpu", "--devices", "0,gpu1"]);
    expect(junk.code).toBe(2);
    expect(junk.stderr).toMatch(/--devices: "gpu1" is not a device index \(a non-negative integer\) in "0,gpu1"/);
  });
});

describe("ds3 inspect --tp N --devices: the placement plan", () => {
  const TINY = join(FIXTURES, "tiny-v3");
  const fake = join(ROOT, "test/helpers/devices-backend.mjs");
  interface Plan {
    rank: number;
    device: { index: number; name: string; memoryFree: number | null };
    heads: [number, number];
    experts: [number, number];
    vocabRows: [number, number];
    weightBytes: number;
    cacheBytes: number;
    fits: boolean | null;
  }

  it("which rank holds which heads, experts and vocabulary rows, on which device, its bytes, whether it fits", async () => {
    const r = await ds3(["inspect", "--model", TINY, "--tp", "4", "--devices", "3,2,1,0", "--backend", fake, "--cache-blocks", "10", "--json"]);
    expect(r.code).toBe(0);
    const o = JSON.parse(r.stdout) as { model: { bytes: number; config: { nHeads: number; nRoutedExperts: number; vocabSize: number }; plan: Plan[] } };
    const { plan, config: c } = o.model;
    expect(plan.map((p) => p.device.index)).toEqual([3, 2, 1, 0]);
    expect(plan.map((p) => p.device.name)).toEqual(["Fake GPU 3", "Fake GPU 2", "Fake GPU 1", "Fake GPU 0"]);
    // the ranks' slices tile the heads, experts and vocabulary exactly
    for (const [k, n] of [["heads", c.nHeads], ["experts", c.nRoutedExperts], ["vocabRows", c.vocabSize]] as const) {
      expect(plan[0]![k][0]).toBe(0);
      for (let i = 1; i < 4; i++) expect(plan[i]![k][0]).toBe(plan[i - 1]![k][1]);
      expect(plan[3]![k][1]).toBe(n);
    }
    // every tensor is on some rank, none on all of them in full
    const sum = plan.reduce((a, p) => a + p.weightBytes, 0);
    expect(sum).toBeGreaterThanOrEqual(o.model.bytes);
    for (const p of plan) expect(p.weightBytes).toBeLessThan(o.model.bytes);
    // 10 blocks of 64 tokens of the latent cache: 4 layers x 64 tokens x (kv_lora 128 + rope 32) x 4 bytes each
    for (const p of plan) expect(p.cacheBytes).toBe(10 * 4 * 64 * (128 + 32) * 4);
    for (const p of plan) expect(p.fits).toBe(true);
    const text = await ds3(["inspect", "--model", TINY, "--tp", "2", "--backend", "cpu", "--cache-blocks", "100000000"]);
    expect(text.code).toBe(0);
    expect(text.stdout).toMatch(/rank 1: device 0 \(cpu .*\); heads 2-3, experts 8-15, vocab rows 512-1023; weights [\d.]+ MiB \+ cache [\d.]+ [TP]iB; does NOT fit in [\d.]+ GiB free/);
  });
});
