// The Ascend backend through the CLI, as an Atlas user meets it first: `ds3 selftest --backend ascend`
// and `ds3 inspect`, run as built commands (packages/cli/dist/ds3.js) against the CPU stand-in of CANN
// (packages/backend-ascend/standin, built here by its own script: skipped when up to date, and a build
// failure fails this file), found the way a CANN install is found (ASCEND_TOOLKIT_HOME=<toolkit>/latest,
// the version from <arch>-linux/ascend_toolkit_install.info); and without CANN: exit 1 naming the reason.
// Nothing here runs on an NPU.
import { execFile, execFileSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

const ROOT = fileURLToPath(new URL("..", import.meta.url));
const BIN = join(ROOT, "packages/cli/dist/ds3.js");
const STANDIN = join(ROOT, "packages/backend-ascend/standin");
const TOOLKIT = join(STANDIN, "build/ascend-toolkit/latest");
const empty = mkdtempSync(join(tmpdir(), "ds3-no-cann-"));
afterAll(() => rmSync(empty, { recursive: true, force: true }));

function ds3(args: string[], env: Record<string, string>): Promise<{ code: number; stdout: string; stderr: string }> {
  const clean = { ...process.env };
  for (const k of ["DS3_ASCEND_LIB_DIR", "ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH", "DS3_STANDIN_STREAM", "DS3_STANDIN_DEVICES", "DS3_STANDIN_NPUS"]) delete clean[k];
  return new Promise((resolve) => {
    execFile(process.execPath, [BIN, ...args], { cwd: ROOT, encoding: "utf8", maxBuffer: 16 * 1024 * 1024, env: { ...clean, ...env } }, (err, stdout, stderr) =>
      resolve({ code: err ? (typeof err.code === "number" ? err.code : 1) : 0, stdout, stderr }),
    );
  });
}
const withStandin = { ASCEND_TOOLKIT_HOME: TOOLKIT };
const NPU0 = "npu:0 Ascend910B3-standin (64.0 GiB, CANN 8.2.RC1.standin)";
const NPU1 = "npu:1 Ascend910B3-standin (64.0 GiB, CANN 8.2.RC1.standin)";

beforeAll(() => {
  execFileSync("bash", [join(STANDIN, "build.sh")], { stdio: ["ignore", "ignore", "inherit"], timeout: 600_000 });
}, 600_000);

describe("ds3 and the Ascend backend through the CANN stand-in", () => {
  it("ds3 inspect lists the NPUs with the SoC name, memory and the CANN version", async () => {
    const t = await ds3(["inspect"], withStandin);
    expect(t.code).toBe(0);
    expect(t.stdout.split("\n").find((l) => /^ {2}ascend\s/.test(l))).toBe(`  ${"ascend".padEnd(7)} available: ${NPU0}, ${NPU1}`);
  });

  it("ds3 selftest --backend ascend: the table, exact and bf16, every op and the golden checkpoint at world size 1 and 2, exit 0", async () => {
    const r = await ds3(["selftest", "--backend", "ascend", "--precision", "exact,bf16", "--golden", "test/fixtures/tiny-v3", "--world-sizes", "1,2"], withStandin);
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
    const lines = r.stdout.split("\n");
    expect(lines[0]).toBe(`backend ascend on ${NPU0}`);
    expect(lines.filter((l) => /\bFAIL\b/.test(l))).toEqual([]);
    expect(lines.some((l) => l.startsWith("precision exact: "))).toBe(true);
    expect(lines.some((l) => l.startsWith("precision bf16: "))).toBe(true);
    for (const ws of [1, 2]) {
      expect(lines.some((l) => new RegExp(`^tiny-v3 at world size ${ws}: golden logits, every position\\s+pass\\s`).test(l)), `exact ws ${ws}`).toBe(true);
      expect(lines.some((l) => new RegExp(`^tiny-v3 at world size ${ws}: golden logits, mean cosine similarity over every position\\s+pass\\s`).test(l)), `bf16 ws ${ws}`).toBe(true);
    }
    for (const op of ["embed", "rmsNorm", "moeGate", "moeExperts", "mla"]) expect(lines.filter((l) => new RegExp(`^${op}\\b.*\\spass\\s`).test(l)).length, op).toBe(2);
    expect(lines.some((l) => l.startsWith("precisions run: exact, bf16"))).toBe(true);
  }, 300_000);

  it("ds3 selftest --backend ascend --precision bf16 --json (what an Ascend user runs first): one JSON report, every gate passed", async () => {
    const r = await ds3(["selftest", "--backend", "ascend", "--precision", "bf16", "--json", "--golden", "test/fixtures/tiny-v3-bf16", "--world-sizes", "1"], withStandin);
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
    const o = JSON.parse(r.stdout) as { backend: string; device: string; ok: boolean; precisions: Array<{ name: string; status: string }>; checks: Array<{ name: string; precision: string; kind: string; ok: boolean }> };
    expect(o).toMatchObject({ backend: "ascend", device: NPU0, ok: true });
    expect(o.precisions.map((p) => [p.name, p.status])).toEqual([["bf16", "ran"]]);
    expect(o.checks.filter((c) => c.kind === "gate" && !c.ok)).toEqual([]);
    expect(o.checks.some((c) => c.name === "tiny-v3-bf16 at world size 1: golden logits, mean cosine similarity over every position" && c.ok)).toBe(true);
  }, 300_000);

  it("without CANN: ds3 selftest --backend ascend exits 1 naming the reason and every folder it looked in; ds3 inspect says the same", async () => {
    const r = await ds3(["selftest", "--backend", "ascend"], { DS3_ASCEND_LIB_DIR: empty });
    expect(r.code).toBe(1);
    expect(r.stdout).toBe("");
    expect(r.stderr).toContain(`backend "ascend" is not available: Ascend not available: no CANN: libascendcl.so, libnnopbase.so and libopapi.so not found in ${empty}`);
    const d = await ds3(["selftest", "--backend", "ascend"], { ASCEND_TOOLKIT_HOME: join(empty, "tk") });
    expect(d.code).toBe(1);
    expect(d.stderr).toContain(`not found in ${join(empty, "tk", "lib64")}, /usr/local/Ascend/ascend-toolkit/latest/lib64`);
    const t = await ds3(["inspect"], { DS3_ASCEND_LIB_DIR: empty });
    expect(t.code).toBe(0);
    expect(t.stdout.split("\n").find((l) => /^ {2}ascend\s/.test(l))).toMatch(/^ {2}ascend {2}not available: Ascend not available: no CANN: /);
  });
});
