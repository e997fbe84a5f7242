// `ds3 score` on checkpoints that load but compute non-finite logits, and the load warnings a CLI
// user sees on stderr: run as a user runs it (the built bundle in a child process).
import { execFile } from "node:child_process";
import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { FIXTURES, loadGolden } from "./helpers/golden.js";

const ROOT = fileURLToPath(new URL("..", import.meta.url));
const BIN = join(ROOT, "packages/cli/dist/ds3.js");
const TINY = join(FIXTURES, "tiny-v3");
const golden = loadGolden("tiny-v3");

let tmp: string;
beforeAll(() => {
  tmp = mkdtempSync(join(tmpdir(), "ds3-score-"));
});
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

function ds3(args: string[]): Promise<Run> {
  return new Promise((resolve) => {
    execFile(
      process.execPath,
      [BIN, ...args],
      { cwd: ROOT, env: { ...process.env, DS3_CACHE_DIR: join(tmp, "cache") }, maxBuffer: 64 * 1024 * 1024, encoding: "utf8" },
      (err, stdout, stderr) => resolve({ code: err ? (typeof err.code === "number" ? err.code : 1) : 0, stdout, stderr }),
    );
  });
}

/** A copy of tiny-v3 whose BF16 `tensor` has element (row, col) set to a NaN. */
function withNaN(name: string, tensor: string, row: number, col: number): string {
  const dir = join(tmp, name);
  cpSync(TINY, dir, { recursive: true });
  const ix = JSON.parse(readFileSync(join(dir, "model.safetensors.index.json"), "utf8")) as { weight_map: Record<string, string> };
  const file = join(dir, ix.weight_map[tensor]!);
  const b = readFileSync(file);
  const hlen = Number(b.readBigUInt64LE(0));
  const h = JSON.parse(b.subarray(8, 8 + hlen).toString("utf8")) as Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }>;
  const e = h[tensor]!;
  expect(e.dtype).toBe("BF16");
  b.writeUInt16LE(0x7fc0, 8 + hlen + e.data_offsets[0] + (row * e.shape[1]! + col) * 2);
  writeFileSync(file, b);
  return dir;
}

describe("ds3 score: logits that are not finite fail the command, naming the position", () => {
  const ids = golden.prompts[1]!.ids; // 7 tokens

  it("a healthy checkpoint scores with exit 0, finite perplexity and no warning", async () => {
    const r = await ds3(["score", "--model", TINY, "--ids", ids.join(","), "--json"]);
    expect(r.code, r.stderr).toBe(0);
    const o = JSON.parse(r.stdout) as { perplexity: number };
    expect(Number.isFinite(o.perplexity)).toBe(true);
    expect(r.stderr).not.toMatch(/warning/);
  });

  it("a NaN in the embedding row of the third token: positions 0-1 are finite, position 2 is named", async () => {
    const dir = withNaN("nan-embed", "model.embed_tokens.weight", ids[2]!, 7);
    for (const extra of [[], ["--json"]]) {
      const r = await ds3(["score", "--model", dir, "--ids", ids.join(","), ...extra]);
      expect(r.code).toBe(1);
      expect(r.stderr).toMatch(new RegExp(`ds3: error: the logits at position 2 \\(token ${ids[2]}\\) are not finite \\(NaN\\)`));
      expect(r.stdout).not.toMatch(/perplexity/);
    }
  });

  it("a NaN in one lm_head row: every position's logits are non-finite, the first is named, --dump-logits still gets every row", async () => {
    const dir = withNaN("nan-head", "lm_head.weight", 100, 3);
    const dump = join(tmp, "nan-head.f32");
    const r = await ds3(["score", "--model", dir, "--ids", ids.join(","), "--dump-logits", dump]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/the logits at position 0 \(token \d+\) are not finite \(NaN at id 100\)/);
    expect(r.stdout).not.toMatch(/perplexity/);
    const f = new Float32Array(readFileSync(dump).buffer.slice(0));
    expect(f.length).toBe(ids.length * golden.vocab);
    expect(Number.isNaN(f[100]!)).toBe(true);
    // the other ids' logits are the golden ones: only the poisoned row's dot product is NaN
    expect(Math.abs(f[0]! - golden.prompts[1]!.logits[0]!)).toBeLessThan(1e-3);
  });
});

describe("a NaN router bias (finite output, silently different routing before) is refused at load", () => {
  it("at --tp 1 and --tp 2 the command fails naming the shard and the tensor", async () => {
    const tensor = "model.layers.2.mlp.gate.e_score_correction_bias";
    const dir = join(tmp, "nan-bias");
    cpSync(TINY, dir, { recursive: true });
    const ix = JSON.parse(readFileSync(join(dir, "model.safetensors.index.json"), "utf8")) as { weight_map: Record<string, string> };
    const file = join(dir, ix.weight_map[tensor]!);
    const b = readFileSync(file);
    const hlen = Number(b.readBigUInt64LE(0));
    const e = (JSON.parse(b.subarray(8, 8 + hlen).toString("utf8")) as Record<string, { dtype: string; data_offsets: [number, number] }>)[tensor]!;
    expect(e.dtype).toBe("F32");
    b.writeFloatLE(NaN, 8 + hlen + e.data_offsets[0] + 4 * 11);
    writeFileSync(file, b);
    for (const tp of ["1", "2"]) {
      const r = await ds3(["score", "--model", dir, "--ids", "1,2,3", "--tp", tp]);
      expect(r.code, r.stderr).not.toBe(0);
      // (through worker ranks the message is prefixed with the rank that failed)
      expect(r.stderr).toMatch(/^ds3: error: /m);
      expect(r.stderr).toContain(`${file}, tensor "${tensor}": non-finite value NaN at element 11 of 16`);
      expect(r.stdout).toBe("");
    }
  });
});

describe("load warnings reach a CLI user on stderr", () => {
  it("a config that leaves checkpoint tensors unread warns once, naming them, and still scores", async () => {
    const dir = join(tmp, "no-shared");
    cpSync(TINY, dir, { recursive: true });
    const cfg = JSON.parse(readFileSync(join(dir, "config.json"), "utf8")) as Record<string, unknown>;
    writeFileSync(join(dir, "config.json"), JSON.stringify({ ...cfg, n_shared_experts: 0 }));
    const r = await ds3(["score", "--model", dir, "--ids", "1,2,3"]);
    expect(r.code, r.stderr).toBe(0);
    const lines = r.stderr.split("\n").filter((l) => l.startsWith("ds3: warning:"));
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatch(/24 checkpoint tensor\(s\) that the model never reads/);
    expect(lines[0]).toContain('"model.layers.*.mlp.shared_experts.gate_proj.weight" (4 tensors)');
  });
});
