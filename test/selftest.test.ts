// `ds3 selftest`: the conformance suite through the CLI, as a user runs it: a table or JSON, exit
// status 0 only when every check passes, a wrong backend failed by name. And the CLI's rank
// placement flags (--devices, --share-devices).
import { execFile } from "node:child_process";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";
import { FIXTURES, loadGolden } from "./helpers/golden.js";

const ROOT = fileURLToPath(new URL("..", import.meta.url));
const BIN = join(ROOT, "packages/cli/dist/ds3.js");

function ds3(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [BIN, ...args], { cwd: ROOT, encoding: "utf8", maxBuffer: 16 * 1024 * 1024 }, (err, stdout, stderr) =>
      resolve({ code: err ? (typeof err.code === "number" ? err.code : 1) : 0, stdout, stderr }),
    );
  });
}

interface Report {
  backend: string;
  device: string;
  ok: boolean;
  checks: Array<{ name: string; op?: string; ok: boolean; worst: number | null; tolerance: number; detail?: string }>;
}

describe("ds3 selftest", () => {
  it("--backend cpu --json: passes, the JSON parses, every op and both golden checkpoints at 1, 2 and 4 ranks are in it", async () => {
    const r = await ds3(["selftest", "--backend", "cpu", "--json"]);
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
    const o = JSON.parse(r.stdout) as Report;
    expect(o.backend).toBe("cpu");
    expect(o.device).toMatch(/^cpu \(/);
    expect(o.ok).toBe(true);
    for (const c of o.checks) {
      expect(c.ok, c.name).toBe(true);
      expect(c.worst, c.name).not.toBeNull();
      expect(c.worst!, c.name).toBeLessThanOrEqual(c.tolerance);
    }
    const ops = new Set(o.checks.map((c) => c.op));
    for (const op of ["embed", "rmsNorm", "linear", "add", "siluMul", "concat", "slice", "rows", "rope", "mla", "moeGate", "moeExperts", "allReduce", "allGatherCols"]) expect(ops).toContain(op);
    for (const g of ["tiny-v3", "tiny-v3-bf16"]) for (const ws of [1, 2, 4]) expect(o.checks.map((c) => c.name)).toContain(`${g} at world size ${ws}: golden logits, every position`);
  });

  it("the table: one row per check with its result and worst error, and the verdict", async () => {
    const r = await ds3(["selftest", "--backend", "cpu", "--golden", "test/fixtures/tiny-v3"]);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^backend cpu on cpu \(/);
    expect(r.stdout).toMatch(/^check +result +worst +tolerance$/m);
    expect(r.stdout).toMatch(/^mla \(absorbed.*\) +pass +\d\.\d\de-\d+ +1\.00e-5$/m);
    expect(r.stdout).toMatch(/^tiny-v3 at world size 4: golden logits, every position +pass /m);
    expect(r.stdout).not.toMatch(/tiny-v3-bf16/); // only the checkpoint given
    expect(r.stdout).toMatch(/^\d+ of \d+ checks passed: PASS$/m);
  });

  it("a backend with a wrong op fails (exit 1) naming it; a backend of another contract version is refused; a bad --golden is named", async () => {
    const bad = await ds3(["selftest", "--backend", join(ROOT, "test/helpers/wrong-rmsnorm-backend.mjs"), "--golden", "test/fixtures/tiny-v3"]);
    expect(bad.code).toBe(1);
    expect(bad.stdout).toMatch(/^rmsNorm +FAIL +1\.\d\de-3 +1\.00e-5$/m);
    expect(bad.stdout).toMatch(/^linear \(f32 weight\) +pass/m);
    expect(bad.stdout).toMatch(/: FAIL$/m);
    expect(bad.stderr).toMatch(/selftest failed on backend cpu-wrong-rmsnorm: rmsNorm; tiny-v3 at world size 1: golden logits/);
    const v3 = await ds3(["selftest", "--backend", join(ROOT, "test/helpers/devices/v3.mjs")]);
    expect(v3.code).toBe(1);
    expect(v3.stderr).toMatch(/is not available: backend "fake-gpu" implements backend contract version 3, this @ds3\/core needs version 2/);
    const g = await ds3(["selftest", "--backend", "cpu", "--golden", "/nonexistent"]);
    expect(g.code).toBe(2);
    expect(g.stderr).toMatch(/--golden \/nonexistent: no golden.json there/);
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
