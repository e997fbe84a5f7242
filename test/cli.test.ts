// The `ds3` CLI, run as a user runs it: the built bundle (packages/cli/dist/ds3.js) in a
// child process with node, checked against the golden files.
import { execFile, spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { FIXTURES, loadGolden } from "./helpers/golden.js";

const ROOT = fileURLToPath(new URL("..", import.meta.url));
const BIN = join(ROOT, "packages/cli/dist/ds3.js");
const TINY = join(FIXTURES, "tiny-v3");
const golden = loadGolden("tiny-v3");
const V = golden.vocab;

let tmp: string;
let cache: string; // DS3_CACHE_DIR of every run: the built-in model is generated here, not in ~/.cache

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

function ds3(args: string[], opts: { env?: NodeJS.ProcessEnv; input?: string } = {}): Promise<Run> {
  return new Promise((resolve) => {
    const child = execFile(
      process.execPath,
      [BIN, ...args],
      {
        cwd: ROOT,
        env: {
          ...process.env,
          DS3_CACHE_DIR: cache,
          // nothing may reach the network: a dead proxy makes any attempt fail
          HTTP_PROXY: "http://127.0.0.1:9",
          HTTPS_PROXY: "http://127.0.0.1:9",
          ...opts.env,
        },
        maxBuffer: 64 * 1024 * 1024,
        encoding: "utf8",
      },
      (err, stdout, stderr) => resolve({ code: err ? (typeof err.code === "number" ? err.code : 1) : 0, stdout, stderr }),
    );
    if (opts.input !== undefined) child.stdin!.end(opts.input);
    else child.stdin!.end();
  });
}

function ok(r: Run): Run {
  if (r.code !== 0) throw new Error(`ds3 exited ${r.code}:\n${r.stderr}`);
  return r;
}

/** Runs `fn` over `items`, `n` at a time (a small machine runs a few processes at once, not dozens). */
async function pool<T, R>(items: readonly T[], n: number, fn: (t: T, i: number) => Promise<R>): Promise<R[]> {
  const out = new Array<R>(items.length);
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const k = next++;
      out[k] = await fn(items[k]!, k);
    }
  };
  await Promise.all(Array.from({ length: Math.min(n, items.length) }, worker));
  return out;
}

const jsonLines = (s: string) =>
  s
    .split("\n")
    .filter((l) => l.trim())
    .map((l) => JSON.parse(l) as Record<string, unknown>);

beforeAll(() => {
  if (!existsSync(BIN)) throw new Error(`${BIN} is missing: build the CLI first (pnpm build)`);
  tmp = mkdtempSync(join(tmpdir(), "ds3-cli-"));
  cache = join(tmp, "cache");
});

afterAll(() => {
  if (tmp) rmSync(tmp, { recursive: true, force: true });
});

describe("generate", () => {
  it("prints the golden greedy ids of tiny-v3 for --prompt-ids", async () => {
    for (const p of golden.prompts.slice(0, 2)) {
      const r = ok(await ds3(["generate", "--model", TINY, "--prompt-ids", p.ids.join(","), "--temperature", "0", "--max-tokens", "24", "--json"]));
      const [o, ...rest] = jsonLines(r.stdout);
      expect(rest).toEqual([]);
      expect(o!.token_ids).toEqual(p.greedy);
      expect(o!.finish_reason).toBe("length");
      expect(o!.text).toBeNull(); // tiny-v3 has no tokenizer
      expect(o!.timings).toMatchObject({ ttft_s: expect.any(Number), e2e_s: expect.any(Number) });
    }
  });

  it("--mtp (speculative decoding with the MTP layer) keeps the greedy ids", async () => {
    const p = golden.prompts[1]!;
    const r = ok(await ds3(["generate", "--model", TINY, "--mtp", "--prompt-ids", p.ids.join(","), "--temperature", "0", "--max-tokens", "24", "--json"]));
    expect(jsonLines(r.stdout)[0]!.token_ids).toEqual(p.greedy);
    expect(r.stderr).toMatch(/MTP drafts accepted \d+\/\d+/);
  });

  it("runs an --input-file of ids as one batch, results in input order", async () => {
    const file = join(tmp, "prompts.txt");
    // longest first: finishing order differs from input order
    const order = [3, 0, 2, 1];
    writeFileSync(file, order.map((i) => golden.prompts[i]!.ids.join(",")).join("\n") + "\n\n");
    const r = ok(await ds3(["generate", "--model", TINY, "--input-file", file, "--ids", "--temperature", "0", "--max-tokens", "24", "--json"]));
    const out = jsonLines(r.stdout);
    expect(out.map((o) => o.index)).toEqual([0, 1, 2, 3]);
    expect(out.map((o) => o.token_ids)).toEqual(order.map((i) => golden.prompts[i]!.greedy));
  });
});

describe("tokenize", () => {
  const cases = JSON.parse(readFileSync(join(FIXTURES, "tokenizer/deepseek-v3-cases.json"), "utf8")) as {
    encode: Array<{ text: string; ids: number[] }>;
    chat: Array<{ messages: unknown[]; add_generation_prompt: boolean; text: string; ids?: number[] }>;
  };

  it("prints the reference ids of every case", async () => {
    const runs = await pool(cases.encode, 3, (c) => ds3(["tokenize", "--", c.text]));
    runs.forEach((r, i) => {
      expect(r.code, r.stderr).toBe(0);
      expect(JSON.parse(r.stdout), JSON.stringify(cases.encode[i]!.text)).toEqual(cases.encode[i]!.ids);
    });
    const bos = ok(await ds3(["tokenize", "--add-special", "Hello, world!"]));
    expect(JSON.parse(bos.stdout)).toEqual([0, ...cases.encode.find((c) => c.text === "Hello, world!")!.ids]);
  });

  it("renders --chat messages through the chat template", async () => {
    const runs = await pool(cases.chat, 3, (c, i) => {
      const f = join(tmp, `chat-${i}.json`);
      writeFileSync(f, JSON.stringify(c.messages));
      return ds3(["tokenize", "--chat", f, "--json", ...(c.add_generation_prompt ? ["--generation-prompt"] : [])]);
    });
    runs.forEach((r, i) => {
      const o = JSON.parse(ok(r).stdout) as { text: string; ids: number[] };
      expect(o.text).toBe(cases.chat[i]!.text);
      if (cases.chat[i]!.ids) expect(o.ids).toEqual(cases.chat[i]!.ids);
    });
  });
});

describe("score", () => {
  it("--dump-logits writes the golden logits of every position (within 1e-3)", async () => {
    for (const p of golden.prompts) {
      const file = join(tmp, `logits-${p.ids.length}.f32`);
      const r = ok(await ds3(["score", "--model", TINY, "--ids", p.ids.join(","), "--dump-logits", file, "--json"]));
      const buf = readFileSync(file);
      expect(buf.length).toBe(p.ids.length * V * 4);
      const got = new Float32Array(buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.length));
      let maxd = 0;
      for (let i = 0; i < got.length; i++) maxd = Math.max(maxd, Math.abs(got[i]! - p.logits[i]!));
      expect(maxd).toBeLessThan(1e-3);
      // logprob of token i under the golden logits of position i - 1
      const o = JSON.parse(r.stdout) as { tokens: Array<{ id: number; logprob: number | null }>; n_scored: number; perplexity: number | null };
      expect(o.tokens.map((t) => t.id)).toEqual(p.ids);
      expect(o.n_scored).toBe(p.ids.length - 1);
      expect(o.tokens[0]!.logprob).toBeNull();
      let sum = 0;
      for (let i = 1; i < p.ids.length; i++) {
        const row = p.logits.subarray((i - 1) * V, i * V);
        const mx = row.reduce((a, b) => Math.max(a, b), -Infinity);
        const lse = mx + Math.log(row.reduce((a, b) => a + Math.exp(b - mx), 0));
        const want = row[p.ids[i]!]! - lse;
        expect(Math.abs(o.tokens[i]!.logprob! - want)).toBeLessThan(2e-3);
        sum += want;
      }
      if (p.ids.length > 1) expect(Math.abs(Math.log(o.perplexity!) + sum / (p.ids.length - 1))).toBeLessThan(1e-3);
      else expect(o.perplexity).toBeNull();
    }
  });

  it("scores text with the built-in model and prints a table", async () => {
    const r = ok(await ds3(["score", "--text", "The capital of France is Paris."]));
    expect(r.stdout).toMatch(/^pos\tid\tlogprob\ttoken\n0\t0\t-\t/);
    expect(r.stdout).toMatch(/perplexity: \d/);
    expect(r.stderr).toMatch(/noise/);
  });
});

// ---------------------------------------------------------------------------------------
// convert: an independent reading of safetensors and of FP8 e4m3 / BF16 rounding

interface Tensor {
  dtype: string;
  shape: number[];
  data: Buffer;
}

function readShards(dir: string): Map<string, Tensor> {
  const out = new Map<string, Tensor>();
  for (const f of readdirSync(dir).filter((x) => x.endsWith(".safetensors"))) {
    const b = readFileSync(join(dir, f));
    const n = Number(b.readBigUInt64LE(0));
    const h = JSON.parse(b.subarray(8, 8 + n).toString("utf8")) as Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }>;
    for (const [name, t] of Object.entries(h)) {
      if (name === "__metadata__") continue;
      out.set(name, { dtype: t.dtype, shape: t.shape, data: b.subarray(8 + n + t.data_offsets[0], 8 + n + t.data_offsets[1]) });
    }
  }
  return out;
}

function e4m3(b: number): number {
  const e = (b >> 3) & 15;
  const m = b & 7;
  if (e === 15 && m === 7) return NaN;
  const v = e === 0 ? m * 2 ** -9 : (1 + m / 8) * 2 ** (e - 7);
  return b & 0x80 ? -v : v;
}

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);
const bf16Value = (h: number) => {
  u32[0] = h << 16;
  return f32[0]!;
};

/** BF16 bits nearest to the float32 `x`, ties to even: decided by comparing the two neighbours. */
function rneBf16(x: number): number {
  f32[0] = x;
  const lo = u32[0]! >>> 16; // truncation toward zero
  const hi = lo + 1; // the next one away from zero
  const dl = Math.abs(x - bf16Value(lo));
  const dh = Math.abs(bf16Value(hi) - x);
  return dl < dh ? lo : dh < dl ? hi : lo % 2 === 0 ? lo : hi;
}

describe("convert", () => {
  it("--to bf16: every FP8 weight becomes RNE-bf16 of fp8 x scale_inv; the output loads and runs", async () => {
    const dst = join(tmp, "tiny-v3-bf16-converted");
    // leftovers of an "interrupted" run that did not come from this source are cleared, never used
    mkdirSync(`${dst}.partial`);
    writeFileSync(join(`${dst}.partial`, "model-00001-of-00002.safetensors"), "junk");
    const r = ok(await ds3(["convert", "--to", "bf16", TINY, dst]));
    expect(r.stdout.trim()).toBe(dst);
    expect(existsSync(`${dst}.partial`)).toBe(false);
    expect(r.stderr).toMatch(/converted 232 FP8 weights/);

    const cfg = JSON.parse(readFileSync(join(dst, "config.json"), "utf8")) as Record<string, unknown>;
    expect(cfg.quantization_config).toBeUndefined();
    expect(cfg.hidden_size).toBe(256);
    const index = JSON.parse(readFileSync(join(dst, "model.safetensors.index.json"), "utf8")) as { weight_map: Record<string, string>; metadata: { total_size: number } };
    expect(Object.keys(index.weight_map).some((k) => k.endsWith("_scale_inv"))).toBe(false);
    expect(readFileSync(join(dst, "generation_config.json"), "utf8")).toBe(readFileSync(join(TINY, "generation_config.json"), "utf8"));

    const src = readShards(TINY);
    const out = readShards(dst);
    expect([...out.keys()].sort()).toEqual(Object.keys(index.weight_map).sort());
    expect(index.metadata.total_size).toBe([...out.values()].reduce((a, t) => a + t.data.length, 0));
    let converted = 0;
    for (const [name, t] of src) {
      if (name.endsWith("_scale_inv")) {
        expect(out.has(name)).toBe(false);
        continue;
      }
      const o = out.get(name)!;
      expect(o, name).toBeDefined();
      expect(o.shape).toEqual(t.shape);
      if (t.dtype !== "F8_E4M3") {
        expect(o.dtype).toBe(t.dtype);
        expect(o.data.equals(t.data), name).toBe(true);
        continue;
      }
      expect(o.dtype).toBe("BF16");
      const s = src.get(`${name}_scale_inv`)!;
      const [R, C] = t.shape as [number, number];
      const sc = s.shape[1]!;
      let bad = 0;
      for (let r = 0; r < R; r++)
        for (let c = 0; c < C; c++) {
          const scale = s.data.readFloatLE(((r >> 7) * sc + (c >> 7)) * 4);
          const want = rneBf16(Math.fround(e4m3(t.data[r * C + c]!) * scale));
          if (o.data.readUInt16LE((r * C + c) * 2) !== want) bad++;
        }
      expect(bad, name).toBe(0);
      converted++;
    }
    expect(converted).toBe(232);

    // the output loads and runs: the first golden prompt (greedy margins >= 0.45) keeps its
    // greedy ids; the rest run (bf16 rounding of the weights may flip routing on random weights)
    const file = join(tmp, "ids.txt");
    writeFileSync(file, golden.prompts.map((p) => p.ids.join(",")).join("\n"));
    const g = jsonLines(ok(await ds3(["generate", "--model", dst, "--input-file", file, "--ids", "--temperature", "0", "--max-tokens", "24", "--json"])).stdout);
    expect(g[0]!.token_ids).toEqual(golden.prompts[0]!.greedy);
    for (const o of g) expect((o.token_ids as number[]).length).toBe(24);

    // converting again into an existing directory, or a checkpoint that has no FP8, is a clear error
    const again = await ds3(["convert", "--to", "bf16", TINY, dst]);
    expect(again.code).not.toBe(0);
    expect(again.stderr.trim()).toMatch(/^ds3: error: destination already exists/);
    const bf16 = await ds3(["convert", "--to", "bf16", join(FIXTURES, "tiny-v3-bf16"), join(tmp, "x")]);
    expect(bf16.code).not.toBe(0);
    expect(bf16.stderr.trim()).toMatch(/^ds3: error: .*no FP8 weights/);
  });
});

// ---------------------------------------------------------------------------------------

describe("the built-in model", () => {
  const sha = (f: string) => createHash("sha256").update(readFileSync(f)).digest("hex");

  it("is generated offline, atomically and deterministically, and generates", async () => {
    // a stale temporary of an interrupted first run (its process is gone) is cleaned up
    const one = join(tmp, "cache-a");
    const other = join(tmp, "cache-b");
    mkdirSync(one);
    const stale = join(one, ".builtin-v1.tmp-999999999-x");
    mkdirSync(stale);
    writeFileSync(join(stale, "config.json"), "{");
    // a first run killed while it writes leaves no model directory behind
    const killed = spawn(process.execPath, [BIN, "generate", "Hello"], { cwd: ROOT, env: { ...process.env, DS3_CACHE_DIR: one } });
    let killedErr = "";
    killed.stderr.on("data", (d: Buffer) => (killedErr += d));
    const t0 = Date.now();
    while (!/generating the built-in/.test(killedErr) && Date.now() - t0 < 30_000) await new Promise((r) => setTimeout(r, 10));
    await new Promise((r) => setTimeout(r, 300));
    killed.kill("SIGKILL");
    await new Promise((r) => killed.on("exit", r));
    expect(existsSync(join(one, "builtin-v1"))).toBe(false);
    expect(readdirSync(one).some((n) => n.startsWith(".builtin-v1.tmp-"))).toBe(true); // it was mid-write

    const args = ["generate", "Hello", "--max-tokens", "12", "--seed", "7", "--json"];
    const a = ok(await ds3(args, { env: { DS3_CACHE_DIR: one } }));
    const b = ok(await ds3(args, { env: { DS3_CACHE_DIR: other } }));
    expect(a.stderr).toMatch(/built-in tiny DeepSeek-V3.*noise/);
    expect(a.stderr).toMatch(/generating the built-in/);
    const [oa, ob] = [jsonLines(a.stdout)[0]!, jsonLines(b.stdout)[0]!];
    expect((oa.token_ids as number[]).length).toBe(12);
    expect(typeof oa.text).toBe("string");
    expect(oa).toMatchObject({ token_ids: ob.token_ids, text: ob.text });
    expect(readdirSync(one)).toEqual(["builtin-v1"]);
    // same files, byte for byte
    const da = join(one, "builtin-v1");
    const db = join(other, "builtin-v1");
    const files = readdirSync(da).sort();
    expect(readdirSync(db).sort()).toEqual(files);
    for (const f of files) expect(sha(join(db, f)), f).toBe(sha(join(da, f)));
    // a second run finds it ready and does not write it again
    const c = ok(await ds3(["generate", "--raw", "Hi", "--max-tokens", "4", "--temperature", "0"], { env: { DS3_CACHE_DIR: one } }));
    expect(c.stderr).not.toMatch(/generating the built-in/);
  });

  it("inspect describes it: real vocabulary, FP8 blocks, an MTP layer", async () => {
    const r = ok(await ds3(["inspect", "--model", "builtin", "--json"]));
    const o = JSON.parse(r.stdout) as {
      backends: Array<{ name: string; available: boolean; reason?: string }>;
      model: { config: { vocabSize: number }; layers: { mtp: number; dense: number; moe: number }; dtypes: Record<string, unknown>; ranks: Array<{ tp: number; ok: boolean }> };
    };
    expect(o.backends.find((b) => b.name === "cpu")!.available).toBe(true);
    for (const b of o.backends.filter((x) => !x.available)) expect(b.reason).toMatch(/\w/);
    expect(o.model.config.vocabSize).toBe(129280);
    expect(o.model.layers).toMatchObject({ mtp: 1, dense: 1 });
    expect(Object.keys(o.model.dtypes).sort()).toEqual(["BF16", "F32", "F8_E4M3"]);
    expect(o.model.ranks.find((x) => x.tp === 2)!.ok).toBe(true);
    const text = ok(await ds3(["inspect"]));
    expect(text.stdout).toMatch(/cpu\s+available/);
  });
});

describe("serve", () => {
  it("serves the OpenAI API on the port it prints, and stops on SIGINT", async () => {
    const child = spawn(process.execPath, [BIN, "serve", "--model", TINY, "--port", "0"], { cwd: ROOT, env: { ...process.env, DS3_CACHE_DIR: cache } });
    let out = "";
    let err = "";
    child.stdout.on("data", (d: Buffer) => (out += d));
    child.stderr.on("data", (d: Buffer) => (err += d));
    const exited = new Promise<number | null>((r) => child.on("exit", (c) => r(c)));
    try {
      const t0 = Date.now();
      while (!out.includes("\n")) {
        if (Date.now() - t0 > 30_000) throw new Error(`no URL on stdout; stderr:\n${err}`);
        await new Promise((r) => setTimeout(r, 50));
      }
      const url = out.trim();
      expect(url).toMatch(/^http:\/\/127\.0\.0\.1:\d+$/);
      const models = (await (await fetch(`${url}/v1/models`)).json()) as { data: Array<{ id: string }> };
      expect(models.data[0]!.id).toBe("tiny-v3");
      const p = golden.prompts[0]!;
      const res = await fetch(`${url}/v1/completions`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ model: "tiny-v3", prompt: p.ids, max_tokens: 5, temperature: 0 }),
      });
      expect(res.status).toBe(200);
      const c = (await res.json()) as { usage: { completion_tokens: number } };
      expect(c.usage.completion_tokens).toBe(5);
      child.kill("SIGINT");
      expect(await exited).toBe(0);
    } finally {
      child.kill("SIGKILL");
    }
  });
});

describe("errors", () => {
  it("bad flags and missing paths give one line on stderr and a non-zero exit", async () => {
    const missing = join(tmp, "no-such-dir");
    const cases: Array<[string[], RegExp]> = [
      [["generate", "--bogus-flag", "hi"], /unknown option --bogus-flag/],
      [["generate", "one", "two"], /unexpected argument "two"/],
      [["frobnicate"], /unknown command "frobnicate"/],
      [["generate", "--model", missing, "hi"], /model directory not found/],
      [["generate", "--model", TINY, "--max-tokens", "lots", "--prompt-ids", "1"], /--max-tokens must be an integer/],
      [["generate", "--model", TINY, "--top-p", "1.5", "--prompt-ids", "1"], /--top-p: must be in \(0, 1\]/],
      [["generate", "--model", TINY, "--prompt-ids", "1,x"], /--prompt-ids: "x"/],
      [["generate", "--model", TINY, "--prompt-ids", "5000"], /outside the vocabulary \[0, 1024\)/],
      [["generate", "--model", TINY, "hello"], /has no tokenizer/],
      [["generate", "--model", TINY, "--input-file", join(tmp, "nope.txt"), "--ids"], /file not found/],
      [["generate", "--backend", "nonexistent-backend", "hi"], /backend "nonexistent-backend" is not available/],
      [["generate", "--tp", "0", "hi"], /--tp must be an integer >= 1/],
      [["generate"], /give a prompt/],
      [["score", "--model", TINY], /give one of --text and --ids/],
      [["score", "--model", TINY, "--ids", "1,2", "--dump-logits", join(missing, "x.f32")], /cannot write/],
      [["tokenize", "--chat", join(tmp, "nope.json")], /file not found/],
      [["tokenize", "--model", TINY, "hi"], /has no tokenizer/],
      [["convert", "--to", "bf16", missing, join(tmp, "out")], /source not found/],
      [["convert", "--to", "fp4", TINY, join(tmp, "out")], /Invalid values/],
      [["convert", TINY, join(tmp, "out")], /Missing required argument: to/],
      [["chat", "--model", missing], /model directory not found/],
      [["inspect", "--model", missing], /model directory not found/],
      [["generate", "--model", TINY, "--prompt-ids", "1,2", "--cache-blocks", "1", "--max-model-len", "100"], /max model length 100 exceeds what the cache holds \(1 blocks x 64 = 64 tokens\)/],
      [["generate", "--model", TINY, "--prompt-ids", "1,2", "--cache-dtype", "f8"], /Invalid values/],
      [["generate", "--model", TINY, "--prompt-ids", "1,2,3", "--max-model-len", "2"], /prompt has 3 tokens, the maximum context length is 2/],
    ];
    const runs = await pool(cases, 4, ([args]) => ds3(args));
    runs.forEach((r, i) => {
      const [args, re] = cases[i]!;
      const what = `ds3 ${args.join(" ")}`;
      expect(r.code, what).not.toBe(0);
      expect(r.stdout, what).toBe("");
      const errors = r.stderr.split("\n").filter((l) => l.startsWith("ds3: error:"));
      expect(errors, `${what}\n${r.stderr}`).toHaveLength(1);
      expect(errors[0], what).toMatch(re);
      expect(r.stderr, what).not.toMatch(/\n\s+at /); // no stack without --verbose
    });
    const v = await ds3(["generate", "--model", missing, "hi", "--verbose"]);
    expect(v.stderr).toMatch(/\n\s+at /);
  });

  it("--help works for every command", async () => {
    const cmds = ["chat", "generate", "score", "serve", "tokenize", "convert", "inspect"];
    const runs = await pool([[], ...cmds.map((c) => [c])], 4, (c) => ds3([...c, "--help"]));
    expect(runs[0]!.stdout).toMatch(/Commands:/);
    runs.slice(1).forEach((r, i) => {
      expect(r.code).toBe(0);
      expect(r.stdout).toMatch(new RegExp(`ds3 ${cmds[i]}`));
    });
  });
});
