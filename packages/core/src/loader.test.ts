// Issue "Foundation", the weights side: config parsing, the lazy safetensors reader and the
// per-rank WeightLoader. Bad files are built on the fly in a temp dir; every failure must be a
// catchable error that names the file and the tensor (or config field), never a crash.
import { closeSync, cpSync, existsSync, ftruncateSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync, rmSync, statSync, truncateSync, unlinkSync, writeFileSync, writeSync } from "node:fs";
import { tmpdir } from "node:os";
import { basename, dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, describe, expect, it } from "vitest";
import type { BackendContext, HostWeight } from "./backend.js";
import { ConfigError, type ModelConfig, parseConfig } from "./config.js";
import { Transformer, WeightLoader } from "./model.js";
import { Checkpoint, CheckpointError, DTYPE_SIZE, type DType, encodeSafetensors, SafetensorsFile } from "./safetensors.js";
import { summarizeNames, unusedTensors, warnUnusedTensors } from "./checks.js";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");
const TINY = join(ROOT, "test/fixtures/tiny-v3");
const TINY_BF16 = join(ROOT, "test/fixtures/tiny-v3-bf16");
const SEEDS = existsSync("/work/shared/seeds") ? "/work/shared/seeds" : join(ROOT, "shared/seeds");
const SHARD1 = "model-00001-of-00002.safetensors";
const SHARD2 = "model-00002-of-00002.safetensors";
const KV_B = "model.layers.0.self_attn.kv_b_proj.weight"; // F8_E4M3 [512, 128], scale [4, 1]
const O_PROJ = "model.layers.0.self_attn.o_proj.weight"; // F8_E4M3 [256, 256], scale [2, 2]

// ---------------------------------------------------------------------------------------
// helpers

const tmpRoots: string[] = [];
function tmp(): string {
  const d = mkdtempSync(join(tmpdir(), "ds3-loader-"));
  tmpRoots.push(d);
  return d;
}
afterAll(() => {
  for (const d of tmpRoots) rmSync(d, { recursive: true, force: true });
});

interface T {
  name: string;
  dtype: DType;
  shape: number[];
  data: Uint8Array;
}

/** Write a well-formed safetensors file with encodeSafetensors. */
function writeST(path: string, tensors: T[], metadata?: Record<string, string>): string {
  writeFileSync(path, Buffer.concat(encodeSafetensors(tensors, metadata)));
  return path;
}

/** A safetensors file with a hand-written header (object, or raw text) and `data` after it. */
function writeRaw(path: string, header: unknown, data: Uint8Array | number, opts: { hlen?: number } = {}): string {
  const hb = Buffer.from(typeof header === "string" ? header : JSON.stringify(header), "utf8");
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(opts.hlen ?? hb.length));
  const body = typeof data === "number" ? new Uint8Array(data) : data;
  writeFileSync(path, Buffer.concat([len, hb, body]));
  return path;
}

function f32(values: ArrayLike<number>): Uint8Array {
  return new Uint8Array(new Float32Array(values).buffer);
}

/** n position-dependent bytes (so a slice taken from the wrong place shows). */
function pattern(n: number, seed = 0): Uint8Array {
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) out[i] = (Math.imul(i + seed * 7919, 2654435761) >>> 24) ^ (i & 0xff);
  return out;
}

function fp8(name: string, shape: [number, number], seed = 0): T {
  return { name, dtype: "F8_E4M3", shape, data: pattern(shape[0] * shape[1], seed) };
}

/** Scale blocks valued 1 + 10*blockRow + blockCol, so each block is recognisable. */
function scales(name: string, shape: [number, number]): T {
  const v: number[] = [];
  for (let r = 0; r < shape[0]; r++) for (let c = 0; c < shape[1]; c++) v.push(1 + 10 * r + c);
  return { name, dtype: "F32", shape, data: f32(v) };
}

/** Parse a safetensors file by hand, independently of SafetensorsFile. */
function rawHeader(file: string): { b: Buffer; start: number; h: Record<string, { dtype: DType; shape: number[]; data_offsets: [number, number] }> } {
  const b = readFileSync(file);
  const hlen = Number(b.readBigUInt64LE(0));
  const h = JSON.parse(b.subarray(8, 8 + hlen).toString("utf8")) as Record<string, { dtype: DType; shape: number[]; data_offsets: [number, number] }>;
  delete h.__metadata__;
  return { b, start: 8 + hlen, h };
}

/** Read a tensor's bytes straight from a file, independently of SafetensorsFile. */
function rawTensor(file: string, name: string): T {
  const t = rawAll(file).find((x) => x.name === name);
  if (!t) throw new Error(`test fixture: ${name} not in ${file}`);
  return t;
}

/** All tensors of a file, in header order, read independently. */
function rawAll(file: string): T[] {
  const { b, start, h } = rawHeader(file);
  return Object.entries(h).map(([name, e]) => ({
    name,
    dtype: e.dtype,
    shape: e.shape,
    data: new Uint8Array(b.subarray(start + e.data_offsets[0], start + e.data_offsets[1])),
  }));
}

function asF32(t: T): Float32Array {
  return new Float32Array(t.data.slice().buffer);
}

/** Run fn; it must throw a CheckpointError whose message matches `re` and names `file` and `tensor`. */
function expectCkError(fn: () => unknown, re: RegExp, where: { file?: string; tensor?: string } = {}): CheckpointError {
  let err: unknown;
  try {
    fn();
  } catch (e) {
    err = e;
  }
  expect(err, "expected a CheckpointError").toBeInstanceOf(CheckpointError);
  const e = err as CheckpointError;
  expect(e.message).toMatch(re);
  if (where.file !== undefined) expect(e.message).toContain(where.file);
  if (where.tensor !== undefined) expect(e.message).toContain(`"${where.tensor}"`);
  return e;
}

/** Run fn; it must throw a ConfigError for `field` whose message matches `re`. */
function expectConfigError(fn: () => unknown, field: string, re: RegExp, file?: string): ConfigError {
  let err: unknown;
  try {
    fn();
  } catch (e) {
    err = e;
  }
  expect(err, "expected a ConfigError").toBeInstanceOf(ConfigError);
  const e = err as ConfigError;
  expect(e.field).toBe(field);
  expect(e.message).toContain(`config field "${field}"`);
  expect(e.message).toMatch(re);
  if (file !== undefined) expect(e.message.startsWith(`${file}: `)).toBe(true);
  return e;
}

/** Copy a fixture checkpoint into a fresh temp dir. */
function copyFixture(src = TINY): string {
  const d = join(tmp(), basename(src));
  cpSync(src, d, { recursive: true });
  return d;
}

/** Rewrite shard `shard` of checkpoint `dir` without `drop`; optionally keep the index entry. */
function dropTensor(dir: string, shard: string, drop: string, keepInIndex: boolean): void {
  const p = join(dir, shard);
  const kept = rawAll(p).filter((t) => t.name !== drop);
  writeST(p, kept, { format: "pt" });
  if (!keepInIndex) {
    const ip = join(dir, "model.safetensors.index.json");
    const ix = JSON.parse(readFileSync(ip, "utf8")) as { weight_map: Record<string, string> };
    delete ix.weight_map[drop];
    writeFileSync(ip, JSON.stringify(ix, null, 2));
  }
}

/** A BackendContext that only keeps what the loader hands it (no device, no kernels). */
function hostOnlyContext(): BackendContext & { weights: HostWeight[] } {
  const weights: HostWeight[] = [];
  return {
    weights,
    weight: (w: HostWeight) => {
      weights.push(w);
      return w;
    },
    expertSet: (first: number, experts: unknown[]) => ({ first, experts }),
  } as unknown as BackendContext & { weights: HostWeight[] };
}

function tinyConfig(src = TINY): ModelConfig {
  return parseConfig(JSON.parse(readFileSync(join(src, "config.json"), "utf8")), join(src, "config.json"));
}

function openFds(): number | null {
  return existsSync("/proc/self/fd") ? readdirSync("/proc/self/fd").length : null;
}

/**
 * Check a HostWeight against the full tensor it was cut from: bytes at (i, j) are the full
 * tensor's at (r0 + i, c0 + j), and the scale that element (i, j) uses —
 * scale[(i + origin0) / 128][(j + origin1) / 128] of the returned block — is the full scale at
 * [(r0 + i) / 128][(c0 + j) / 128].
 */
function checkSliceOf(w: HostWeight, full: T, fullScale: T | null, r0: number, c0: number): void {
  const es = DTYPE_SIZE[full.dtype];
  const C = full.shape.length === 1 ? full.shape[0]! : full.shape[1]!;
  const [rows, cols] = w.shape;
  expect(w.data.length).toBe(rows * cols * es);
  let bad = 0;
  for (let i = 0; i < rows; i++)
    for (let j = 0; j < cols * es; j++) if (w.data[i * cols * es + j] !== full.data[(r0 + i) * C * es + c0 * es + j]) bad++;
  expect(bad, "bytes that differ from the full tensor").toBe(0);
  if (!fullScale) {
    expect(w.scale).toBeUndefined();
    return;
  }
  const fs = asF32(fullScale);
  const SC = fullScale.shape[1]!;
  const [sr, sc] = w.scaleShape!;
  const [o0, o1] = w.scaleOrigin!;
  expect(o0).toBe(r0 % 128);
  expect(o1).toBe(c0 % 128);
  expect(sr).toBe(Math.ceil((o0 + rows) / 128));
  expect(sc).toBe(Math.ceil((o1 + cols) / 128));
  expect(w.scale!.length).toBe(sr * sc);
  let badS = 0;
  for (let i = 0; i < rows; i++)
    for (let j = 0; j < cols; j++) {
      const got = w.scale![Math.floor((i + o0) / 128) * sc + Math.floor((j + o1) / 128)];
      const want = fs[Math.floor((r0 + i) / 128) * SC + Math.floor((c0 + j) / 128)];
      if (got !== want) badS++;
    }
  expect(badS, "elements whose scale differs from the full tensor's").toBe(0);
}

// ---------------------------------------------------------------------------------------
// safetensors: bad files

describe("safetensors: a bad file fails with an error naming the file and tensor", () => {
  it("missing shard named by the index", () => {
    const dir = copyFixture();
    unlinkSync(join(dir, SHARD2));
    const e = expectCkError(() => Checkpoint.open(dir), /missing shard "model-00002-of-00002\.safetensors" named by model\.safetensors\.index\.json/, {
      file: join(dir, SHARD2),
    });
    expect(e.message).toMatch(/\(it should hold \d+ tensor\(s\), e\.g\. "[\w.]+"\)$/);
  });

  it("index names a tensor that its shard does not hold", () => {
    const dir = copyFixture();
    const gone = "model.layers.1.mlp.experts.3.up_proj.weight";
    dropTensor(dir, SHARD1, gone, true);
    expectCkError(() => Checkpoint.open(dir), /the index places tensor .* in this shard, but the shard does not hold it/, { file: join(dir, SHARD1), tensor: gone });
  });

  it("index that is not JSON", () => {
    const dir = copyFixture();
    writeFileSync(join(dir, "model.safetensors.index.json"), "{ weight_map: ");
    expectCkError(() => Checkpoint.open(dir), /not valid JSON/, { file: join(dir, "model.safetensors.index.json") });
  });

  it("index without a weight_map, or JSON null; directory not found; tensor in two files", () => {
    const dir = copyFixture();
    const ip = join(dir, "model.safetensors.index.json");
    writeFileSync(ip, "null");
    expectCkError(() => Checkpoint.open(dir), /has no "weight_map"/, { file: ip });
    writeFileSync(ip, JSON.stringify({ metadata: {} }));
    expectCkError(() => Checkpoint.open(dir), /has no "weight_map"/, { file: ip });
    expectCkError(() => Checkpoint.open(join(dir, "nope")), /model directory not found: .*nope/);
    const d = tmp();
    writeST(join(d, "a.safetensors"), [fp8("x.weight", [4, 4])]);
    writeST(join(d, "b.safetensors"), [fp8("x.weight", [4, 4])]);
    expectCkError(() => Checkpoint.open(d), /tensor appears in two files \("a\.safetensors" and "b\.safetensors"\)/, { file: join(d, "b.safetensors"), tensor: "x.weight" });
  });

  it("truncated file: data shorter than the offsets say", () => {
    const d = tmp();
    const p = writeST(join(d, "trunc.safetensors"), [fp8("a.weight", [16, 16]), fp8("b.weight", [16, 16], 1)]);
    truncateSync(p, statSync(p).size - 10);
    expectCkError(() => new SafetensorsFile(p), /truncated: data_offsets \[256, 512\] run past the end of the data \(502 bytes\)/, { file: p, tensor: "b.weight" });
    // also through Checkpoint.open on the directory (single-file form)
    expectCkError(() => Checkpoint.open(d), /truncated/, { file: p, tensor: "b.weight" });
  });

  it("file shorter than the 8-byte header length", () => {
    const p = join(tmp(), "tiny.safetensors");
    writeFileSync(p, Buffer.from([1, 2, 3]));
    expectCkError(() => new SafetensorsFile(p), /truncated: 3 bytes, shorter than the 8-byte header length/, { file: p });
  });

  it("header length past EOF", () => {
    const p = writeRaw(join(tmp(), "hlen.safetensors"), { a: { dtype: "F32", shape: [1], data_offsets: [0, 4] } }, 4, { hlen: 4096 });
    expectCkError(() => new SafetensorsFile(p), /header length 4096 runs past the end of the file \(\d+ bytes\)/, { file: p });
  });

  it("implausibly large header length", () => {
    const p = writeRaw(join(tmp(), "hbig.safetensors"), "{}", 0, { hlen: 2 ** 40 });
    expectCkError(() => new SafetensorsFile(p), /header length \d+ is implausible/, { file: p });
  });

  it("header not JSON", () => {
    const p = writeRaw(join(tmp(), "notjson.safetensors"), '{"a": {"dtype": "F32", ', 16);
    expectCkError(() => new SafetensorsFile(p), /header is not valid JSON/, { file: p });
    const q = writeRaw(join(tmp(), "array.safetensors"), "[1, 2]", 16);
    expectCkError(() => new SafetensorsFile(q), /header is not a JSON object/, { file: q });
  });

  it("header entry that is not an object", () => {
    const p = writeRaw(join(tmp(), "entry.safetensors"), { "x.weight": 5 }, 0);
    expectCkError(() => new SafetensorsFile(p), /header entry is not an object/, { file: p, tensor: "x.weight" });
  });

  it("offsets that overlap", () => {
    const p = writeRaw(
      join(tmp(), "overlap.safetensors"),
      { "a.weight": { dtype: "F32", shape: [4], data_offsets: [0, 16] }, "b.weight": { dtype: "F32", shape: [4], data_offsets: [8, 24] } },
      24,
    );
    expectCkError(() => new SafetensorsFile(p), /data overlaps tensor "a\.weight"/, { file: p, tensor: "b.weight" });
  });

  it("offsets that overlap, with an empty tensor sorted between them", () => {
    // a covers [0, 40); the empty e sits at 8; b at [16, 32) is inside a. Only neighbours were compared before.
    const p = writeRaw(
      join(tmp(), "overlap2.safetensors"),
      {
        "a.weight": { dtype: "F32", shape: [10], data_offsets: [0, 40] },
        "e.weight": { dtype: "F32", shape: [0], data_offsets: [8, 8] },
        "b.weight": { dtype: "F32", shape: [4], data_offsets: [16, 32] },
      },
      40,
    );
    expectCkError(() => new SafetensorsFile(p), /data overlaps tensor "a\.weight"/, { file: p, tensor: "b.weight" });
  });

  it("offsets out of bounds", () => {
    const p = writeRaw(
      join(tmp(), "oob.safetensors"),
      { "a.weight": { dtype: "F32", shape: [4], data_offsets: [0, 16] }, "b.weight": { dtype: "F32", shape: [4], data_offsets: [1000, 1016] } },
      32,
    );
    expectCkError(() => new SafetensorsFile(p), /data_offsets \[1000, 1016\] are out of bounds: the data section holds only 32 bytes/, { file: p, tensor: "b.weight" });
  });

  it("offsets that end before they begin, or are not two non-negative integers", () => {
    const d = tmp();
    const p = writeRaw(join(d, "rev.safetensors"), { "a.weight": { dtype: "F32", shape: [0], data_offsets: [16, 0] } }, 16);
    expectCkError(() => new SafetensorsFile(p), /data_offsets \[16, 0\] end before they begin/, { file: p, tensor: "a.weight" });
    const q = writeRaw(join(d, "neg.safetensors"), { "a.weight": { dtype: "F32", shape: [1], data_offsets: [-4, 0] } }, 16);
    expectCkError(() => new SafetensorsFile(q), /bad data_offsets \[-4,0\]/, { file: q, tensor: "a.weight" });
    const r = writeRaw(join(d, "three.safetensors"), { "a.weight": { dtype: "F32", shape: [1], data_offsets: [0, 4, 8] } }, 16);
    expectCkError(() => new SafetensorsFile(r), /bad data_offsets/, { file: r, tensor: "a.weight" });
  });

  it("size that is not dtype x shape", () => {
    const p = writeRaw(join(tmp(), "size.safetensors"), { "a.weight": { dtype: "BF16", shape: [3, 4], data_offsets: [0, 12] } }, 24);
    expectCkError(() => new SafetensorsFile(p), /data_offsets span 12 bytes but BF16 x \[3, 4\] needs 24/, { file: p, tensor: "a.weight" });
  });

  it("unknown dtype", () => {
    const d = tmp();
    const p = writeRaw(join(d, "u8.safetensors"), { "a.weight": { dtype: "U8", shape: [4], data_offsets: [0, 4] } }, 4);
    expectCkError(() => new SafetensorsFile(p), /unknown dtype "U8" \(supported: F8_E4M3, BF16, F16, F32, I32, I64\)/, { file: p, tensor: "a.weight" });
    // names that exist on every object must not pass as dtypes
    const q = writeRaw(join(d, "proto.safetensors"), { "a.weight": { dtype: "toString", shape: [4], data_offsets: [0, 4] } }, 4);
    expectCkError(() => new SafetensorsFile(q), /unknown dtype "toString"/, { file: q, tensor: "a.weight" });
  });

  it("bad shape", () => {
    const p = writeRaw(join(tmp(), "shape.safetensors"), { "a.weight": { dtype: "F32", shape: [2, -2], data_offsets: [0, 16] } }, 16);
    expectCkError(() => new SafetensorsFile(p), /bad shape \[2,-2\]/, { file: p, tensor: "a.weight" });
  });

  it("a slice outside the tensor", () => {
    const d = tmp();
    writeST(join(d, "model.safetensors"), [fp8("a.weight", [16, 8])]);
    const ck = Checkpoint.open(d);
    try {
      expectCkError(() => ck.readSlice("a.weight", { rows: [8, 17] }), /slice \[8, 17\) of dim 0 is outside \[0, 16\)/, { tensor: "a.weight" });
      expectCkError(() => ck.readSlice("a.weight", { cols: [4, 4] }), /slice \[4, 4\) of dim 1/, { tensor: "a.weight" });
    } finally {
      ck.close();
    }
  });

  it("failing opens leak no file descriptors and leave the process usable", () => {
    const d = tmp();
    const bad = writeRaw(join(d, "bad.safetensors"), { "a.weight": { dtype: "F32", shape: [4], data_offsets: [0, 16] } }, 8);
    // a sharded checkpoint whose second shard is missing: the first was already open when it failed
    const partial = copyFixture();
    unlinkSync(join(partial, SHARD2));
    // two single files that both hold "a.weight": the first was open when the second failed
    const dup = join(d, "dup");
    mkdirSync(dup);
    writeST(join(dup, "a.safetensors"), [fp8("a.weight", [4, 4])]);
    writeST(join(dup, "b.safetensors"), [fp8("a.weight", [4, 4])]);
    const before = openFds();
    for (let i = 0; i < 50; i++) {
      expect(() => new SafetensorsFile(bad)).toThrow(CheckpointError);
      expect(() => Checkpoint.open(partial)).toThrow(/missing shard/);
      expect(() => Checkpoint.open(dup)).toThrow(/tensor appears in two files/);
    }
    const after = openFds();
    if (before !== null) expect(after, "file descriptors left open by failed opens").toBe(before);
    // and a good checkpoint still opens and reads afterwards
    const ck = Checkpoint.open(TINY);
    try {
      expect(ck.read(KV_B).data.length).toBe(512 * 128);
    } finally {
      ck.close();
    }
  });
});

// ---------------------------------------------------------------------------------------
// safetensors: the format's own rules (issue 10). safetensors itself rejects all of these:
// sorted spans start at 0, each begins where the previous ended, the last ends at the end of
// the file; the header starts with "{", is UTF-8, and has no duplicate keys.

/** A shard split into its header text and its data section (independently of SafetensorsFile). */
function shardParts(file: string): { json: string; data: Buffer } {
  const b = readFileSync(file);
  const hlen = Number(b.readBigUInt64LE(0));
  return { json: b.subarray(8, 8 + hlen).toString("utf8"), data: b.subarray(8 + hlen) };
}

/** Write a shard from header bytes and data; `hlen` overrides the declared header length. */
function writeShard(file: string, header: string | Buffer, data: Uint8Array, hlen?: number): void {
  const hb = typeof header === "string" ? Buffer.from(header, "utf8") : header;
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(hlen ?? hb.length));
  writeFileSync(file, Buffer.concat([len, hb, data]));
}

/** JSON text padded with spaces so that 8 + length is a multiple of 8 (as encodeSafetensors pads). */
function padded(json: string): string {
  return json + " ".repeat((8 - ((Buffer.byteLength(json) + 8) % 8)) % 8);
}

describe("safetensors: the format's rules (spans tile the data section, header starts with {, UTF-8, no duplicate keys)", () => {
  const SMALL = "model.layers.0.input_layernorm.weight";

  it("a header length 1-3 bytes short (only padding spaces dropped: the JSON still parses) is rejected", () => {
    for (const short of [1, 2, 3]) {
      const dir = copyFixture();
      const p = join(dir, SHARD2);
      const { json, data } = shardParts(p);
      expect(json.endsWith(" ".repeat(short)), "the fixture's header is padded").toBe(true);
      // the same bytes, only the declared length is shorter: the data section starts inside the padding
      writeShard(p, Buffer.from(json, "utf8"), data, Buffer.byteLength(json) - short);
      expectCkError(() => Checkpoint.open(dir), new RegExp(`${short} trailing byte\\(s\\) after the last tensor`), { file: p });
    }
  });

  it("bytes appended after the data are rejected, naming the last tensor", () => {
    const dir = copyFixture();
    const p = join(dir, SHARD2);
    const { json, data } = shardParts(p);
    writeShard(p, json, Buffer.concat([data, Buffer.alloc(16)]));
    const h = JSON.parse(json) as Record<string, { data_offsets: [number, number] }>;
    const last = Object.entries(h).filter(([k]) => k !== "__metadata__").sort((a, b) => b[1].data_offsets[1] - a[1].data_offsets[1])[0]![0];
    expectCkError(() => Checkpoint.open(dir), /16 trailing byte\(s\) after the last tensor/, { file: p, tensor: last });
  });

  it("a tensor re-pointed at bytes appended after the data is rejected (the bytes it left belong to no tensor)", () => {
    const dir = copyFixture();
    const p = join(dir, SHARD1);
    const { json, data } = shardParts(p);
    const h = JSON.parse(json) as Record<string, { data_offsets: [number, number] }>;
    const [b, e] = h[SMALL]!.data_offsets;
    h[SMALL]!.data_offsets = [data.length, data.length + (e - b)];
    writeShard(p, padded(JSON.stringify(h)), Buffer.concat([data, data.subarray(b, e)]));
    const err = expectCkError(() => Checkpoint.open(dir), new RegExp(`bytes \\[${b}, ${e}\\) of the data section belong to no tensor`), { file: p });
    expect(err.tensor).toBeDefined();
  });

  it("a duplicate JSON key is rejected (JSON.parse would keep the last one)", () => {
    const dir = copyFixture();
    const p = join(dir, SHARD1);
    const { json, data } = shardParts(p);
    const h = JSON.parse(json) as Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }>;
    const other = "model.layers.0.post_attention_layernorm.weight";
    const dup = `${JSON.stringify(SMALL)}:${JSON.stringify(h[other])}`;
    const text = json.trimEnd().replace(/}$/, `,${dup}}`);
    writeShard(p, padded(text), data);
    expectCkError(() => Checkpoint.open(dir), /duplicate key in the header/, { file: p, tensor: SMALL });
    // the same key spelled with an escape is the same key
    const esc = JSON.stringify(SMALL).replace("m", "\\u006d");
    writeShard(p, padded(json.trimEnd().replace(/}$/, `,${esc}:${JSON.stringify(h[other])}}`)), data);
    expectCkError(() => Checkpoint.open(dir), /duplicate key in the header/, { file: p, tensor: SMALL });
  });

  it("a header that does not start with {, or is not UTF-8, is rejected", () => {
    const d = tmp();
    const t = { "a.weight": { dtype: "F32", shape: [2], data_offsets: [0, 8] } };
    const p = join(d, "ws.safetensors");
    writeShard(p, padded(` ${JSON.stringify(t)}`), new Uint8Array(8));
    expectCkError(() => new SafetensorsFile(p), /header must start with "\{"/, { file: p });
    const q = join(d, "utf8.safetensors");
    const bad = Buffer.concat([Buffer.from('{"a.weight\xff'.slice(0, 10), "latin1"), Buffer.from([0xff, 0xfe]), Buffer.from(`":${JSON.stringify(t["a.weight"])}}`)]);
    writeShard(q, bad, new Uint8Array(8));
    expectCkError(() => new SafetensorsFile(q), /header is not valid UTF-8/, { file: q });
  });

  it("a gap between tensors, or data that does not start at 0, is rejected naming the tensors", () => {
    const d = tmp();
    const p = writeRaw(
      join(d, "gap.safetensors"),
      { "a.weight": { dtype: "F32", shape: [2], data_offsets: [0, 8] }, "b.weight": { dtype: "F32", shape: [2], data_offsets: [16, 24] } },
      24,
    );
    expectCkError(() => new SafetensorsFile(p), /bytes \[8, 16\) of the data section belong to no tensor \(after tensor "a\.weight"\)/, { file: p, tensor: "b.weight" });
    const q = writeRaw(join(d, "start.safetensors"), { "a.weight": { dtype: "F32", shape: [2], data_offsets: [8, 16] } }, 16);
    expectCkError(() => new SafetensorsFile(q), /bytes \[0, 8\) of the data section belong to no tensor/, { file: q, tensor: "a.weight" });
  });

  it("an empty tensor must sit at a boundary between tensors, not inside one; empty files and empty tensors at the edges are fine", () => {
    const d = tmp();
    const p = writeRaw(
      join(d, "inside.safetensors"),
      { "a.weight": { dtype: "F32", shape: [4], data_offsets: [0, 16] }, "e.weight": { dtype: "F32", shape: [0], data_offsets: [8, 8] } },
      16,
    );
    expectCkError(() => new SafetensorsFile(p), /empty tensor at offset 8 lies inside tensor "a\.weight"/, { file: p, tensor: "e.weight" });
    const ok = writeRaw(
      join(d, "edges.safetensors"),
      {
        "e0": { dtype: "F32", shape: [0], data_offsets: [0, 0] },
        "a.weight": { dtype: "F32", shape: [4], data_offsets: [0, 16] },
        "e1": { dtype: "F32", shape: [0, 3], data_offsets: [16, 16] },
      },
      16,
    );
    new SafetensorsFile(ok).close();
    const none = writeRaw(join(d, "none.safetensors"), { __metadata__: { format: "pt" } }, 0);
    new SafetensorsFile(none).close();
  });

  it("__metadata__ must map strings to strings", () => {
    const d = tmp();
    const p = writeRaw(join(d, "meta.safetensors"), { __metadata__: { format: 5 }, "a.weight": { dtype: "F32", shape: [1], data_offsets: [0, 4] } }, 4);
    expectCkError(() => new SafetensorsFile(p), /__metadata__ must map strings to strings/, { file: p });
  });

  it("a duplicate key in the index's weight_map is rejected, naming the index and the tensor", () => {
    const dir = copyFixture();
    const ip = join(dir, "model.safetensors.index.json");
    const text = readFileSync(ip, "utf8");
    writeFileSync(ip, text.replace(`"weight_map": {`, `"weight_map": {\n    "${SMALL}": "${SHARD1}",`));
    expectCkError(() => Checkpoint.open(dir), new RegExp(`duplicate key "${SMALL.replace(/\./g, "\\.")}" in model\\.safetensors\\.index\\.json`), { file: ip });
  });

  it("an entry without dtype, shape or data_offsets says which is missing", () => {
    const d = tmp();
    for (const k of ["dtype", "shape", "data_offsets"]) {
      const e: Record<string, unknown> = { dtype: "F32", shape: [1], data_offsets: [0, 4] };
      delete e[k];
      const p = writeRaw(join(d, `no-${k}.safetensors`), { "a.weight": e }, 4);
      const err = expectCkError(() => new SafetensorsFile(p), new RegExp(`header entry has no "${k}"`), { file: p, tensor: "a.weight" });
      expect(err.message).not.toMatch(/undefined/);
    }
  });

  it('index entries whose shard is not a plain file name inside the model directory ("", ".", "..", a directory) name the entry', () => {
    for (const bad of ["", ".", "..", "sub", 5]) {
      const dir = copyFixture();
      mkdirSync(join(dir, "sub"));
      const ip = join(dir, "model.safetensors.index.json");
      const ix = JSON.parse(readFileSync(ip, "utf8")) as { weight_map: Record<string, unknown> };
      ix.weight_map[SMALL] = bad;
      writeFileSync(ip, JSON.stringify(ix));
      const e = expectCkError(() => Checkpoint.open(dir), bad === "sub" ? /shard "sub" is a directory, not a file/ : /is not a plain file name inside the model directory/, {
        file: ip,
      });
      expect(e.message).toContain(`weight_map entry "${SMALL}"`);
      expect(e.message).not.toMatch(/EISDIR/);
    }
  });
});

// ---------------------------------------------------------------------------------------
// WeightLoader: tensors checked against the config

describe("WeightLoader: missing tensors, wrong shapes and wrong scales are named", () => {
  it("a tensor the config needs that is absent (WeightLoader.host and a whole-model load)", () => {
    const dir = copyFixture();
    const gone = "model.layers.1.mlp.experts.3.up_proj.weight";
    dropTensor(dir, SHARD1, gone, false);
    const ck = Checkpoint.open(dir);
    try {
      const L = new WeightLoader(ck, { rank: 0, worldSize: 1 });
      expectCkError(() => L.host(gone, [192, 256]), /required tensor is missing from the checkpoint/, { file: dir, tensor: gone });
      // the config decides what is needed: building the model must stop at the same tensor
      expectCkError(() => new Transformer(hostOnlyContext(), ck, tinyConfig()), /required tensor is missing/, { file: dir, tensor: gone });
    } finally {
      ck.close();
    }
  });

  it("a tensor absent from a small synthetic file", () => {
    const d = tmp();
    writeST(join(d, "model.safetensors"), [fp8("a.weight", [128, 128]), scales("a.weight_scale_inv", [1, 1])]);
    const ck = Checkpoint.open(d);
    try {
      expectCkError(() => new WeightLoader(ck, { rank: 0, worldSize: 1 }).host("b.weight", [128, 128]), /required tensor is missing/, { file: d, tensor: "b.weight" });
    } finally {
      ck.close();
    }
  });

  it("a shape that disagrees with the config", () => {
    const ck = Checkpoint.open(TINY);
    try {
      const L = new WeightLoader(ck, { rank: 0, worldSize: 1 });
      expectCkError(() => L.host(KV_B, [512, 64]), /shape \[512, 128\] disagrees with the config, which needs \[512, 64\]/, { file: join(TINY, SHARD1), tensor: KV_B });
      expectCkError(() => L.host(KV_B, [512 * 128]), /disagrees with the config/, { tensor: KV_B });
      expectCkError(() => L.vector("model.layers.1.mlp.gate.e_score_correction_bias", 8), /shape \[16\] disagrees with the config, which needs \[8\]/, {
        tensor: "model.layers.1.mlp.gate.e_score_correction_bias",
      });
      // a config whose v_head_dim does not match the checkpoint: the first weight it shapes is named
      const raw = JSON.parse(readFileSync(join(TINY, "config.json"), "utf8")) as Record<string, unknown>;
      const cfg = parseConfig({ ...raw, v_head_dim: 32 });
      expectCkError(() => new Transformer(hostOnlyContext(), ck, cfg), /shape \[512, 128\] disagrees with the config, which needs \[384, 128\]/, { tensor: KV_B });
    } finally {
      ck.close();
    }
  });

  it("a scale tensor of the wrong shape", () => {
    const d = tmp();
    writeST(join(d, "model.safetensors"), [fp8("w.weight", [256, 384]), scales("w.weight_scale_inv", [2, 2])]);
    const ck = Checkpoint.open(d);
    try {
      expectCkError(
        () => new WeightLoader(ck, { rank: 0, worldSize: 1 }).host("w.weight", [256, 384]),
        /scale shape \[2, 2\] is wrong for weight \[256, 384\] in 128x128 blocks \(needs \[2, 3\]\)/,
        { file: join(d, "model.safetensors"), tensor: "w.weight_scale_inv" },
      );
    } finally {
      ck.close();
    }
  });

  it("a 1-D vector (router bias) of a non-float dtype is named with its file", () => {
    const d = tmp();
    writeST(join(d, "model.safetensors"), [{ name: "b.bias", dtype: "I32", shape: [4], data: new Uint8Array(16) }]);
    const ck = Checkpoint.open(d);
    try {
      expectCkError(() => new WeightLoader(ck, { rank: 0, worldSize: 1 }).vector("b.bias", 4), /dtype I32 cannot be a float vector/, { file: join(d, "model.safetensors"), tensor: "b.bias" });
    } finally {
      ck.close();
    }
  });

  it("an FP8 weight with no scale, a scale of a bad dtype, a weight of a non-float dtype", () => {
    const d = tmp();
    writeST(join(d, "model.safetensors"), [
      fp8("noscale.weight", [128, 128]),
      fp8("i8scale.weight", [128, 128]),
      { name: "i8scale.weight_scale_inv", dtype: "I32", shape: [1, 1], data: new Uint8Array(4) },
      { name: "ints.weight", dtype: "I32", shape: [4, 4], data: new Uint8Array(64) },
    ]);
    const ck = Checkpoint.open(d);
    try {
      const L = new WeightLoader(ck, { rank: 0, worldSize: 1 });
      expectCkError(() => L.host("noscale.weight", [128, 128]), /FP8 weight has no "noscale\.weight_scale_inv"/, { tensor: "noscale.weight" });
      expectCkError(() => L.host("i8scale.weight", [128, 128]), /scale must be F32 or BF16, got I32/, { tensor: "i8scale.weight_scale_inv" });
      expectCkError(() => L.host("ints.weight", [4, 4]), /dtype I32 cannot be a weight/, { tensor: "ints.weight" });
    } finally {
      ck.close();
    }
  });
});

// ---------------------------------------------------------------------------------------
// WeightLoader: good reads

describe("WeightLoader: whole tensors and rank slices of tiny-v3", () => {
  const kvb = rawTensor(join(TINY, SHARD1), KV_B);
  const kvbS = rawTensor(join(TINY, SHARD1), `${KV_B}_scale_inv`);
  const oproj = rawTensor(join(TINY, SHARD1), O_PROJ);
  const oprojS = rawTensor(join(TINY, SHARD1), `${O_PROJ}_scale_inv`);

  it("reads a whole FP8 tensor with its scales", () => {
    const ck = Checkpoint.open(TINY);
    try {
      const w = new WeightLoader(ck, { rank: 0, worldSize: 1 }).host(KV_B, [512, 128], "rows");
      expect(w.dtype).toBe("f8_e4m3");
      expect(w.shape).toEqual([512, 128]);
      expect(Buffer.compare(Buffer.from(w.data), Buffer.from(kvb.data))).toBe(0);
      expect(w.scaleShape).toEqual([4, 1]);
      expect(w.scaleOrigin).toEqual([0, 0]);
      expect([...w.scale!]).toEqual([...asF32(kvbS)]);
      checkSliceOf(w, kvb, kvbS, 0, 0);
    } finally {
      ck.close();
    }
  });

  it("rank 1 of 2: kv_b_proj rows split", () => {
    const ck = Checkpoint.open(TINY);
    try {
      const w = new WeightLoader(ck, { rank: 1, worldSize: 2 }).host(KV_B, [512, 128], "rows");
      expect(w.shape).toEqual([256, 128]);
      expect(Buffer.compare(Buffer.from(w.data), Buffer.from(kvb.data.subarray(256 * 128)))).toBe(0);
      expect(w.scaleShape).toEqual([2, 1]);
      expect(w.scaleOrigin).toEqual([0, 0]);
      expect([...w.scale!]).toEqual([...asF32(kvbS).subarray(2, 4)]);
      checkSliceOf(w, kvb, kvbS, 256, 0);
    } finally {
      ck.close();
    }
  });

  it("rank 0 and 1 of 2: o_proj cols split", () => {
    const ck = Checkpoint.open(TINY);
    try {
      for (const rank of [0, 1]) {
        const w = new WeightLoader(ck, { rank, worldSize: 2 }).host(O_PROJ, [256, 256], "cols");
        expect(w.shape).toEqual([256, 128]);
        const want = new Uint8Array(256 * 128);
        for (let r = 0; r < 256; r++) want.set(oproj.data.subarray(r * 256 + rank * 128, r * 256 + rank * 128 + 128), r * 128);
        expect(Buffer.compare(Buffer.from(w.data), Buffer.from(want))).toBe(0);
        const s = asF32(oprojS); // [2, 2]
        expect(w.scaleShape).toEqual([2, 1]);
        expect(w.scaleOrigin).toEqual([0, 0]);
        expect([...w.scale!]).toEqual([s[rank]!, s[2 + rank]!]);
        checkSliceOf(w, oproj, oprojS, 0, rank * 128);
      }
    } finally {
      ck.close();
    }
  });

  it("BF16 checkpoint: rows split, no scale", () => {
    const ck = Checkpoint.open(TINY_BF16);
    try {
      const full = rawTensor(join(TINY_BF16, ck.info(KV_B).file.split("/").pop()!), KV_B);
      expect(full.dtype).toBe("BF16");
      const w = new WeightLoader(ck, { rank: 1, worldSize: 2 }).host(KV_B, [512, 128], "rows");
      expect(w.dtype).toBe("bf16");
      checkSliceOf(w, full, null, 256, 0);
      expect(w.scaleShape).toBeUndefined();
    } finally {
      ck.close();
    }
  });

  it("vector() converts a 1-D F32 tensor", () => {
    const ck = Checkpoint.open(TINY);
    try {
      const name = "model.layers.1.mlp.gate.e_score_correction_bias";
      const v = new WeightLoader(ck, { rank: 1, worldSize: 2 }).vector(name, 16);
      expect([...v]).toEqual([...asF32(rawTensor(join(TINY, SHARD1), name))]);
    } finally {
      ck.close();
    }
  });

  it("the whole tiny-v3 model loads for rank 0 of 1 and each rank of 2, every scale block covering its slice", () => {
    const cfg = tinyConfig();
    for (const r of [
      { rank: 0, worldSize: 1 },
      { rank: 0, worldSize: 2 },
      { rank: 1, worldSize: 2 },
    ]) {
      const ck = Checkpoint.open(TINY);
      try {
        const ctx = hostOnlyContext();
        const m = new Transformer(ctx, ck, cfg, { rank: r });
        expect(m.mtp).not.toBeNull();
        expect(ctx.weights.length).toBeGreaterThan(100);
        for (const w of ctx.weights) {
          const es = w.dtype === "f8_e4m3" ? 1 : w.dtype === "f32" ? 4 : 2;
          expect(w.data.length, w.name).toBe(w.shape[0] * w.shape[1] * es);
          if (w.dtype === "f8_e4m3") {
            const [sr, sc] = w.scaleShape!;
            expect(w.scale!.length, w.name).toBe(sr * sc);
            expect(sr, w.name).toBe(Math.ceil((w.scaleOrigin![0] + w.shape[0]) / 128));
            expect(sc, w.name).toBe(Math.ceil((w.scaleOrigin![1] + w.shape[1]) / 128));
          }
        }
      } finally {
        ck.close();
      }
    }
  });

  it("rank 1 of 3 is refused by the parallel checks, naming what does not divide", () => {
    const ck = Checkpoint.open(TINY);
    try {
      expect(() => new Transformer(hostOnlyContext(), ck, tinyConfig(), { rank: { rank: 1, worldSize: 3 } })).toThrow(
        /tensor\/expert parallel size 3 does not divide num_attention_heads \(4\)/,
      );
    } finally {
      ck.close();
    }
  });
});

describe("WeightLoader: slices not aligned to the 128x128 scale blocks (synthetic FP8 [300, 200], scales [3, 2])", () => {
  const W = fp8("w.weight", [300, 200], 3);
  const S = scales("w.weight_scale_inv", [3, 2]);
  let dir = "";
  function withCk<R>(fn: (ck: Checkpoint) => R): R {
    if (!dir) {
      dir = tmp();
      writeST(join(dir, "model.safetensors"), [S, W]);
    }
    const ck = Checkpoint.open(dir);
    try {
      return fn(ck);
    } finally {
      ck.close();
    }
  }

  it("rows [100, 200) (rank 1 of 3): origin 100 inside scale block 0, blocks rows [0, 2)", () => {
    withCk((ck) => {
      const w = new WeightLoader(ck, { rank: 1, worldSize: 3 }).host("w.weight", [300, 200], "rows");
      expect(w.shape).toEqual([100, 200]);
      expect(w.scaleOrigin).toEqual([100, 0]);
      expect(w.scaleShape).toEqual([2, 2]);
      expect([...w.scale!]).toEqual([1, 2, 11, 12]);
      checkSliceOf(w, W, S, 100, 0);
    });
  });

  it("rows [200, 300) (rank 2 of 3): origin 72, blocks rows [1, 3)", () => {
    withCk((ck) => {
      const w = new WeightLoader(ck, { rank: 2, worldSize: 3 }).host("w.weight", [300, 200], "rows");
      expect(w.scaleOrigin).toEqual([72, 0]);
      expect([...w.scale!]).toEqual([11, 12, 21, 22]);
      checkSliceOf(w, W, S, 200, 0);
    });
  });

  it("cols [50, 100) (rank 1 of 4) and cols [100, 200) (rank 1 of 2, across a block edge)", () => {
    withCk((ck) => {
      const a = new WeightLoader(ck, { rank: 1, worldSize: 4 }).host("w.weight", [300, 200], "cols");
      expect(a.shape).toEqual([300, 50]);
      expect(a.scaleOrigin).toEqual([0, 50]);
      expect(a.scaleShape).toEqual([3, 1]);
      expect([...a.scale!]).toEqual([1, 11, 21]);
      checkSliceOf(a, W, S, 0, 50);
      const b = new WeightLoader(ck, { rank: 1, worldSize: 2 }).host("w.weight", [300, 200], "cols");
      expect(b.scaleOrigin).toEqual([0, 100]);
      expect(b.scaleShape).toEqual([3, 2]);
      checkSliceOf(b, W, S, 0, 100);
    });
  });

  it("2-D slice rows [100, 200) x cols [50, 150): bytes and the scale block that covers it", () => {
    withCk((ck) => {
      const t = ck.readSlice("w.weight", { rows: [100, 200], cols: [50, 150] });
      expect(t.shape).toEqual([100, 100]);
      // the scale window WeightLoader would take: blocks rows [0, 2), cols [0, 2), origin (100, 50)
      const s = ck.readSlice("w.weight_scale_inv", { rows: [0, 2], cols: [0, 2] });
      const hw: HostWeight = {
        name: "w.weight",
        dtype: "f8_e4m3",
        shape: [100, 100],
        data: t.data,
        scale: new Float32Array(s.data.slice().buffer),
        scaleShape: [2, 2],
        scaleOrigin: [100, 50],
      };
      checkSliceOf(hw, W, S, 100, 50);
    });
  });
});

// ---------------------------------------------------------------------------------------
// Lazy reading

describe("lazy reading", () => {
  it("a sparse 5 GiB checkpoint: reading a small tensor and a few rows keeps RSS within 64 MB", () => {
    const R = 40960;
    const C = 131072; // R * C = 5 GiB of F8_E4M3
    const big = R * C;
    const SR = R / 128;
    const SC = C / 128;
    const scaleBytes = SR * SC * 4;
    const entries: Array<[string, DType, number[], number]> = [
      ["big.weight", "F8_E4M3", [R, C], big],
      ["big.weight_scale_inv", "F32", [SR, SC], scaleBytes],
      ["small", "F32", [16], 64],
    ];
    const header: Record<string, unknown> = { __metadata__: { format: "pt" } };
    let off = 0;
    for (const [name, dtype, shape, n] of entries) {
      header[name] = { dtype, shape, data_offsets: [off, off + n] };
      off += n;
    }
    // the header exactly as encodeSafetensors pads it
    const [lenBuf, hb] = headerBytes(header);
    const dataStart = lenBuf.length + hb.length;
    const dir = tmp();
    const p = join(dir, "model.safetensors");
    const fd = openSync(p, "w");
    try {
      writeSync(fd, lenBuf, 0, lenBuf.length, 0);
      writeSync(fd, hb, 0, hb.length, 8);
      ftruncateSync(fd, dataStart + off); // sparse: nothing of the 5 GiB is written
      const rowsAt = 1000;
      const rows = pattern(10 * C, 9);
      writeSync(fd, rows, 0, rows.length, dataStart + rowsAt * C);
      const sv = new Float32Array(SR * SC);
      for (let i = 0; i < sv.length; i++) sv[i] = i + 0.5;
      const sb = new Uint8Array(sv.buffer);
      writeSync(fd, sb, 0, sb.length, dataStart + big);
      const small = f32(Array.from({ length: 16 }, (_, i) => i * 1.25 - 3));
      writeSync(fd, small, 0, small.length, dataStart + big + scaleBytes);
    } finally {
      closeSync(fd);
    }
    expect(statSync(p).size).toBe(dataStart + off);
    expect(statSync(p).size).toBeGreaterThan(5 * 2 ** 30);

    const rss0 = process.memoryUsage().rss;
    const ck = Checkpoint.open(dir);
    try {
      expect(ck.info("big.weight").nbytes).toBe(5 * 2 ** 30);
      const s = ck.read("small");
      expect([...new Float32Array(s.data.slice().buffer)]).toEqual(Array.from({ length: 16 }, (_, i) => i * 1.25 - 3));
      // ten whole rows (contiguous read)
      const t = ck.readSlice("big.weight", { rows: [1000, 1010] });
      expect(Buffer.compare(Buffer.from(t.data), Buffer.from(pattern(10 * C, 9)))).toBe(0);
      // a window of columns of those rows
      const tc = ck.readSlice("big.weight", { rows: [1002, 1004], cols: [130000, 130100] });
      const pat = pattern(10 * C, 9);
      const want = Buffer.concat([pat.subarray(2 * C + 130000, 2 * C + 130100), pat.subarray(3 * C + 130000, 3 * C + 130100)]);
      expect(Buffer.compare(Buffer.from(tc.data), want)).toBe(0);
      // the last rows of the file read back (as zeros: they were never written)
      const tail = ck.readSlice("big.weight", { rows: [R - 2, R] });
      expect(tail.data.every((b) => b === 0)).toBe(true);
      // and through WeightLoader: rank 100 of 4096 owns rows [1000, 1010), scale block row 7, origin 104
      const w = new WeightLoader(ck, { rank: 100, worldSize: 4096 }).host("big.weight", [R, C], "rows");
      expect(w.shape).toEqual([10, C]);
      expect(Buffer.compare(Buffer.from(w.data), Buffer.from(pat))).toBe(0);
      expect(w.scaleOrigin).toEqual([104, 0]);
      expect(w.scaleShape).toEqual([1, SC]);
      expect(w.scale![0]).toBe(7 * SC + 0.5);
      expect(w.scale![SC - 1]).toBe(7 * SC + SC - 1 + 0.5);
      const grew = process.memoryUsage().rss - rss0;
      expect(grew, `RSS grew by ${(grew / 2 ** 20).toFixed(1)} MB`).toBeLessThan(64 * 2 ** 20);
    } finally {
      ck.close();
    }
  });
});

/** The 8-byte length and the padded JSON header encodeSafetensors would write for `header`. */
function headerBytes(header: Record<string, unknown>): [Buffer, Buffer] {
  let json = JSON.stringify(header);
  json += " ".repeat((8 - ((Buffer.byteLength(json) + 8) % 8)) % 8);
  const hb = Buffer.from(json, "utf8");
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(hb.length));
  return [len, hb];
}

// ---------------------------------------------------------------------------------------
// encodeSafetensors round trip

describe("encodeSafetensors", () => {
  it("round-trips through SafetensorsFile, with 8-byte-aligned data even for non-ASCII names", () => {
    const d = tmp();
    const ts: T[] = [
      { name: "é.weight", dtype: "BF16", shape: [3, 5], data: pattern(30, 1) },
      { name: "x", dtype: "I64", shape: [2], data: pattern(16, 2) },
      { name: "empty", dtype: "F32", shape: [0], data: new Uint8Array(0) },
      fp8("y", [7, 9], 4),
    ];
    const p = writeST(join(d, "model.safetensors"), ts, { format: "pt" });
    const hlen = Number(readFileSync(p).readBigUInt64LE(0));
    expect((8 + hlen) % 8).toBe(0);
    const f = new SafetensorsFile(p);
    try {
      expect(f.metadata).toEqual({ format: "pt" });
      for (const t of ts) {
        const ti = f.tensors.get(t.name)!;
        expect(ti.dtype).toBe(t.dtype);
        expect(ti.shape).toEqual(t.shape);
        const got = new Uint8Array(ti.nbytes);
        f.readInto(ti.offset, ti.nbytes, got);
        expect(Buffer.compare(Buffer.from(got), Buffer.from(t.data))).toBe(0);
      }
    } finally {
      f.close();
    }
  });
});

// ---------------------------------------------------------------------------------------
// config

describe("config: errors name the field", () => {
  const file = join(TINY, "config.json");
  const base = JSON.parse(readFileSync(file, "utf8")) as Record<string, unknown>;
  const hf = (patch: Record<string, unknown>, drop: string[] = []) => {
    const o: Record<string, unknown> = { ...structuredClone(base), ...patch };
    for (const k of drop) delete o[k];
    return o;
  };

  it("the tiny-v3 HF config parses", () => {
    const c = parseConfig(base, file);
    expect(c).toMatchObject({ vocabSize: 1024, dim: 256, nLayers: 4, nHeads: 4, qLoraRank: 192, kvLoraRank: 128, nMtpLayers: 1, topkMethod: "noaux_tc" });
    expect(c.quantization).toEqual({ method: "fp8", fmt: "e4m3", blockSize: [128, 128], scaleFmt: "float", activationScheme: "dynamic" });
    expect(c.ropeScaling.type).toBe("yarn");
    expect(c.eosTokenId).toEqual([1]);
  });

  it("missing field", () => {
    // the HF form without model_type: no defaults apply, every field is required
    expectConfigError(() => parseConfig(hf({}, ["hidden_size", "model_type"]), file), "model_type", /is missing/, file);
    expectConfigError(() => parseConfig(hf({ model_type: undefined }, ["kv_lora_rank"]), file), "model_type", /is missing/, file);
    // with model_type deepseek_v3 a missing field takes transformers' default (see below)
    expect(parseConfig(hf({}, ["hidden_size"]), file).dim).toBe(7168);
    // DeepSeek form
    const ds = JSON.parse(readFileSync(join(SEEDS, "config_671B.json"), "utf8")) as Record<string, unknown>;
    delete ds.n_heads;
    expectConfigError(() => parseConfig(ds, "config_671B.json"), "n_heads", /is missing/, "config_671B.json");
  });

  it("wrong type", () => {
    expectConfigError(() => parseConfig(hf({ num_attention_heads: "4" }), file), "num_attention_heads", /must be a number, got "4"/, file);
    expectConfigError(() => parseConfig(hf({ hidden_size: 256.5 }), file), "hidden_size", /must be an integer, got 256\.5/, file);
    expectConfigError(() => parseConfig(hf({ norm_topk_prob: "yes" }), file), "norm_topk_prob", /must be true or false/, file);
    expectConfigError(() => parseConfig(hf({ scoring_func: 3 }), file), "scoring_func", /must be one of "sigmoid", "softmax", got 3/, file);
    expectConfigError(() => parseConfig(hf({ eos_token_id: "1" }), file), "eos_token_id", /must be a token id/, file);
    expectConfigError(() => parseConfig([1, 2], file), "(root)", /must be a JSON object/, file);
  });

  it("bad rope_scaling", () => {
    expectConfigError(() => parseConfig(hf({ rope_scaling: { type: "linear", factor: 4 } }), file), "rope_scaling.type", /only "yarn" is supported, got "linear"/, file);
    expectConfigError(() => parseConfig(hf({ rope_scaling: "yarn" }), file), "rope_scaling", /must be an object or null/, file);
    // a bad member is named once, with its path, and the message is not doubled up
    const e = expectConfigError(
      () => parseConfig(hf({ rope_scaling: { type: "yarn", factor: "40" } }), file),
      "rope_scaling.factor",
      /config field "rope_scaling\.factor": must be a number, got "40"$/,
      file,
    );
    expect(e.message.split("config field").length).toBe(2);
    expectConfigError(() => parseConfig(hf({ rope_scaling: { rope_type: "yarn", factor: 0.5 } }), file), "rope_scaling.factor", /must be >= 1, got 0\.5/, file);
    // rope_type (newer HF name) is accepted, null means no scaling
    expect(parseConfig(hf({ rope_scaling: { rope_type: "yarn", factor: 4 } })).ropeScaling.factor).toBe(4);
    expect(parseConfig(hf({ rope_scaling: null })).ropeScaling.type).toBe("none");
  });

  it("bad quantization_config", () => {
    const q = base.quantization_config as Record<string, unknown>;
    expectConfigError(() => parseConfig(hf({ quantization_config: "fp8" }), file), "quantization_config", /must be an object/, file);
    expectConfigError(() => parseConfig(hf({ quantization_config: { ...q, quant_method: "gptq" } }), file), "quantization_config.quant_method", /only "fp8" is supported, got "gptq"/, file);
    expectConfigError(() => parseConfig(hf({ quantization_config: { ...q, fmt: "e5m2" } }), file), "quantization_config.fmt", /only "e4m3"/, file);
    expectConfigError(
      () => parseConfig(hf({ quantization_config: { ...q, weight_block_size: [64, 64] } }), file),
      "quantization_config.weight_block_size",
      /only \[128, 128\] is supported, got \[64,64\]/,
      file,
    );
    expectConfigError(() => parseConfig(hf({ quantization_config: { ...q, activation_scheme: "static" } }), file), "quantization_config.activation_scheme", /only "dynamic"/, file);
    expectConfigError(() => parseConfig(hf({ quantization_config: { ...q, scale_fmt: "e8m0" } }), file), "quantization_config.scale_fmt", /must be "ue8m0" or absent, got "e8m0"/, file);
    // no quantization_config: a BF16 checkpoint
    expect(parseConfig(hf({}, ["quantization_config"])).quantization).toBeNull();
  });

  it("other checks name their field", () => {
    expectConfigError(() => parseConfig(hf({ model_type: "llama" }), file), "model_type", /must be "deepseek_v3"/, file);
    expectConfigError(() => parseConfig(hf({ n_group: 3 }), file), "n_group", /must divide n_routed_experts \(16\)/, file);
    expectConfigError(() => parseConfig(hf({ hidden_act: "gelu" }), file), "hidden_act", /only "silu"/, file);
    expectConfigError(() => parseConfig(hf({ eos_token_id: 5000 }), file), "eos_token_id", /outside the vocabulary/, file);
    expectConfigError(() => parseConfig(hf({ qk_rope_head_dim: 33 }), file), "qk_rope_head_dim", /must be even/, file);
  });

  it("q_lora_rank: null is accepted as 0 (HF and DeepSeek forms)", () => {
    expect(parseConfig(hf({ q_lora_rank: null })).qLoraRank).toBe(0);
    // absent, transformers' default (1536) applies; only null means "no q LoRA"
    expect(parseConfig(hf({}, ["q_lora_rank"])).qLoraRank).toBe(1536);
    const ds = JSON.parse(readFileSync(join(SEEDS, "config_671B.json"), "utf8")) as Record<string, unknown>;
    expect(parseConfig({ ...ds, q_lora_rank: null }).qLoraRank).toBe(0);
    expect(parseConfig({ ...ds, q_lora_rank: 0 }).qLoraRank).toBe(0);
    expectConfigError(() => parseConfig(hf({ q_lora_rank: -1 }), file), "q_lora_rank", /must be >= 0/, file);
  });
});

describe("config: DeepSeek's config_671B.json form and the HF form", () => {
  // DeepSeek-V3's HF config.json, as published with the 671B checkpoint
  const hf671B = {
    architectures: ["DeepseekV3ForCausalLM"],
    model_type: "deepseek_v3",
    vocab_size: 129280,
    hidden_size: 7168,
    intermediate_size: 18432,
    moe_intermediate_size: 2048,
    num_hidden_layers: 61,
    num_nextn_predict_layers: 1,
    num_attention_heads: 128,
    num_key_value_heads: 128,
    n_shared_experts: 1,
    n_routed_experts: 256,
    routed_scaling_factor: 2.5,
    kv_lora_rank: 512,
    q_lora_rank: 1536,
    qk_rope_head_dim: 64,
    v_head_dim: 128,
    qk_nope_head_dim: 128,
    topk_method: "noaux_tc",
    n_group: 8,
    topk_group: 4,
    num_experts_per_tok: 8,
    moe_layer_freq: 1,
    first_k_dense_replace: 3,
    norm_topk_prob: true,
    scoring_func: "sigmoid",
    hidden_act: "silu",
    max_position_embeddings: 163840,
    rms_norm_eps: 1e-6,
    bos_token_id: 0,
    eos_token_id: 1,
    tie_word_embeddings: false,
    rope_theta: 10000,
    rope_scaling: { beta_fast: 32, beta_slow: 1, factor: 40, mscale: 1.0, mscale_all_dim: 1.0, original_max_position_embeddings: 4096, type: "yarn" },
    quantization_config: { activation_scheme: "dynamic", fmt: "e4m3", quant_method: "fp8", weight_block_size: [128, 128] },
  };
  const seed = (n: string) => JSON.parse(readFileSync(join(SEEDS, n), "utf8")) as Record<string, unknown>;

  it("config_671B.json parses", () => {
    const c = parseConfig(seed("config_671B.json"), "config_671B.json");
    expect(c).toMatchObject({
      vocabSize: 129280,
      dim: 7168,
      interDim: 18432,
      moeInterDim: 2048,
      nLayers: 61,
      nDenseLayers: 3,
      nHeads: 128,
      nRoutedExperts: 256,
      nSharedExperts: 1,
      nActivatedExperts: 8,
      nExpertGroups: 8,
      nLimitedGroups: 4,
      routeScale: 2.5,
      scoreFunc: "sigmoid",
      topkMethod: "noaux_tc",
      qLoraRank: 1536,
      kvLoraRank: 512,
      qkNopeHeadDim: 128,
      qkRopeHeadDim: 64,
      vHeadDim: 128,
    });
    expect(c.quantization).toEqual({ method: "fp8", fmt: "e4m3", blockSize: [128, 128], scaleFmt: "float", activationScheme: "dynamic" });
  });

  it("the HF form of the same model parses to the same config (the DeepSeek form carries no MTP layer count)", () => {
    const a = parseConfig(hf671B, "config.json");
    const b = parseConfig(seed("config_671B.json"), "config_671B.json");
    expect(a.nMtpLayers).toBe(1);
    expect({ ...a, nMtpLayers: 0 }).toEqual(b);
  });

  it("v3.1: scale_fmt ue8m0 is recognised at the top level of the DeepSeek form and in the HF quantization_config", () => {
    const v31 = seed("config_v3.1.json");
    // in DeepSeek's own form the field sits at the top level, next to "dtype": "fp8"
    expect(v31.scale_fmt).toBe("ue8m0");
    expect(v31.quantization_config).toBeUndefined();
    const a = parseConfig(v31, "config_v3.1.json");
    expect(a.quantization?.scaleFmt).toBe("ue8m0");
    // the HF form of V3.1 keeps it in quantization_config.scale_fmt
    const b = parseConfig({ ...hf671B, quantization_config: { ...hf671B.quantization_config, scale_fmt: "ue8m0" } });
    expect(b.quantization?.scaleFmt).toBe("ue8m0");
    expect({ ...b, nMtpLayers: 0 }).toEqual(a);
    // V3 (no scale_fmt) keeps float scales
    expect(parseConfig(seed("config_671B.json")).quantization?.scaleFmt).toBe("float");
  });

  it("DeepSeek form: a bad scale_fmt or dtype is named, bf16 means no quantization", () => {
    const ds = seed("config_v3.1.json");
    expectConfigError(() => parseConfig({ ...ds, scale_fmt: "ue8m1" }, "config_v3.1.json"), "scale_fmt", /must be "ue8m0" or absent, got "ue8m1"/, "config_v3.1.json");
    expectConfigError(() => parseConfig({ ...ds, dtype: "int4" }, "config_v3.1.json"), "dtype", /must be one of "fp8", "bf16", got "int4"/, "config_v3.1.json");
    expect(parseConfig({ ...ds, dtype: "bf16", scale_fmt: undefined }).quantization).toBeNull();
    expectConfigError(() => parseConfig({ ...ds, dim: "7168" }), "dim", /must be a number/);
  });
});

// transformers' DeepseekV3Config defaults, written from its source independently of config.ts (see the file)
const TRANSFORMERS_V3_DEFAULTS = (JSON.parse(readFileSync(join(TINY, "..", "transformers-deepseek-v3-defaults.json"), "utf8")) as { defaults: Record<string, unknown> }).defaults;

describe("config: missing fields default as transformers' DeepseekV3Config does (model_type deepseek_v3)", () => {
  const file = join(TINY, "config.json");
  const base = JSON.parse(readFileSync(file, "utf8")) as Record<string, unknown>;

  it("a config of only model_type: deepseek_v3 is DeepseekV3Config()", () => {
    const c = parseConfig({ model_type: "deepseek_v3" }, "config.json");
    expect(c).toEqual(parseConfig({ model_type: "deepseek_v3", ...TRANSFORMERS_V3_DEFAULTS }, "config.json"));
    expect(c).toMatchObject({
      vocabSize: 129280,
      dim: 7168,
      nLayers: 61,
      nDenseLayers: 3,
      nSharedExperts: 1,
      nRoutedExperts: 256,
      nExpertGroups: 8,
      nLimitedGroups: 4,
      routeScale: 2.5,
      normTopkProb: true,
      scoreFunc: "sigmoid",
      topkMethod: "noaux_tc",
      qLoraRank: 1536,
      maxPositionEmbeddings: 4096,
      nMtpLayers: 0,
      bosTokenId: 0,
      eosTokenId: [1],
    });
    expect(c.ropeScaling.type).toBe("none");
  });

  it("each field deleted from tiny-v3's config parses as transformers' default value given explicitly", () => {
    for (const [k, v] of Object.entries(TRANSFORMERS_V3_DEFAULTS)) {
      const without = { ...structuredClone(base) };
      delete without[k];
      expect(parseConfig(without, file), k).toEqual(parseConfig({ ...structuredClone(base), [k]: v }, file));
    }
    // the routing fields of the issue: tiny-v3 has transformers' values, so deleting them changes nothing
    for (const k of ["topk_method", "norm_topk_prob", "scoring_func", "n_shared_experts", "routed_scaling_factor"]) {
      const without = { ...structuredClone(base) };
      delete without[k];
      expect(parseConfig(without, file), k).toEqual(parseConfig(base, file));
    }
  });

  it("without model_type the HF form is refused (nothing says which defaults apply)", () => {
    const o = { ...structuredClone(base) };
    delete o.model_type;
    expectConfigError(() => parseConfig(o, file), "model_type", /is missing/, file);
  });
});

describe("config: values are bounded and cross-checked before anything is allocated", () => {
  const file = join(TINY, "config.json");
  const base = JSON.parse(readFileSync(file, "utf8")) as Record<string, unknown>;
  const hf = (patch: Record<string, unknown>) => ({ ...structuredClone(base), ...patch });

  it("absurd sizes are named by field (no 5e8-entry table, no 'Invalid typed array length')", () => {
    const cases: Array<[string, unknown]> = [
      ["qk_rope_head_dim", 1e9],
      ["qk_rope_head_dim", 1e308],
      ["n_shared_experts", 1e308],
      ["num_nextn_predict_layers", 1e308],
      ["hidden_size", 2 ** 40],
      ["vocab_size", 1e12],
      ["num_hidden_layers", 1e6],
      ["n_routed_experts", 1e9],
      ["kv_lora_rank", 1e9],
      ["q_lora_rank", 1e9],
      ["qk_nope_head_dim", 1e9],
      ["v_head_dim", 1e9],
      ["intermediate_size", 1e12],
      ["moe_intermediate_size", 1e12],
      ["num_attention_heads", 1e6],
      ["max_position_embeddings", 1e15],
      ["routed_scaling_factor", 1e308],
      ["rms_norm_eps", 2],
      ["rope_theta", 1e300],
    ];
    for (const [k, v] of cases) expectConfigError(() => parseConfig(hf({ [k]: v }), file), k, /must be <= /, file);
    expectConfigError(() => parseConfig(hf({ routed_scaling_factor: 0 }), file), "routed_scaling_factor", /must be > 0/, file);
    expectConfigError(() => parseConfig(hf({ rms_norm_eps: 0 }), file), "rms_norm_eps", /must be > 0/, file);
    expectConfigError(() => parseConfig(hf({ rope_scaling: { ...(base.rope_scaling as object), factor: 1e308 } }), file), "rope_scaling.factor", /must be <= /, file);
    expectConfigError(() => parseConfig(hf({ rope_scaling: { ...(base.rope_scaling as object), original_max_position_embeddings: 1e300 } }), file), "rope_scaling.original_max_position_embeddings", /must be <= /, file);
    // DeepSeek's own form is bounded the same way
    const ds = JSON.parse(readFileSync(join(SEEDS, "config_671B.json"), "utf8")) as Record<string, unknown>;
    expectConfigError(() => parseConfig({ ...ds, n_shared_experts: 1e308 }), "n_shared_experts", /must be <= /);
    expectConfigError(() => parseConfig({ ...ds, qk_rope_head_dim: 1e9 }), "qk_rope_head_dim", /must be <= /);
  });

  it("a config whose sizes disagree with the checkpoint stops at the first weight shape they set, naming it", () => {
    const ck = Checkpoint.open(TINY);
    try {
      // kv_a_proj_with_mqa has kv_lora_rank + qk_rope_head_dim rows (q_a_proj does not depend on either)
      expectCkError(() => new Transformer(hostOnlyContext(), ck, parseConfig(hf({ kv_lora_rank: 160 }))), /shape \[160, 256\] disagrees with the config, which needs \[192, 256\]/, {
        tensor: "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
      });
      // an in-bounds but wrong qk_rope_head_dim is named at q_b_proj (heads x (nope + rope) rows)
      expectCkError(() => new Transformer(hostOnlyContext(), ck, parseConfig(hf({ qk_rope_head_dim: 4096 }))), /disagrees with the config, which needs \[16640, 192\]/, {
        tensor: "model.layers.0.self_attn.q_b_proj.weight",
      });
    } finally {
      ck.close();
    }
  });
});

describe("non-finite values in the small vectors are refused at load (norms, router bias, FP8 scales)", () => {
  /** Copy `src` and overwrite element `index` of `tensor` (in its shard) with `value` in the tensor's dtype. */
  function poison(src: string, tensor: string, index: number, value: number): { dir: string; file: string } {
    const dir = copyFixture(src);
    const ix = JSON.parse(readFileSync(join(dir, "model.safetensors.index.json"), "utf8")) as { weight_map: Record<string, string> };
    const file = join(dir, ix.weight_map[tensor]!);
    const { b, start, h } = rawHeader(file);
    const e = h[tensor]!;
    const at = start + e.data_offsets[0];
    if (e.dtype === "F32") b.writeFloatLE(value, at + index * 4);
    else if (e.dtype === "BF16") {
      const f = Buffer.alloc(4);
      f.writeFloatLE(value);
      b.writeUInt16LE(f.readUInt32LE() >>> 16, at + index * 2);
    } else throw new Error(`test fixture: cannot poison ${e.dtype}`);
    writeFileSync(file, b);
    return { dir, file };
  }

  const cases: Array<[string, string, number, number, RegExp]> = [
    [TINY, "model.layers.1.mlp.gate.e_score_correction_bias", 5, NaN, /non-finite value NaN at element 5 of 16/],
    [TINY, "model.layers.2.input_layernorm.weight", 17, Infinity, /non-finite value Infinity at element 17 of 256/],
    [TINY, "model.norm.weight", 0, -Infinity, /non-finite value -Infinity at element 0 of 256/],
    [TINY, "model.layers.0.self_attn.kv_a_layernorm.weight", 3, NaN, /non-finite value NaN at element 3 of 128/],
    [TINY, `${KV_B}_scale_inv`, 2, NaN, /non-finite scale NaN at element 2 of 4/],
    [TINY_BF16, "model.layers.2.post_attention_layernorm.weight", 9, NaN, /non-finite value NaN at element 9 of 256/],
  ];
  for (const [src, tensor, index, value, re] of cases)
    it(`${basename(src)}: ${value} in ${tensor}`, () => {
      const { dir, file } = poison(src, tensor, index, value);
      const ck = Checkpoint.open(dir);
      try {
        expectCkError(() => new Transformer(hostOnlyContext(), ck, tinyConfig(src)), re, { file, tensor });
      } finally {
        ck.close();
      }
    });
});

describe("checkpoint tensors the model never reads are named (one warning)", () => {
  const raw = () => JSON.parse(readFileSync(join(TINY, "config.json"), "utf8")) as Record<string, unknown>;
  const unused = (dir: string, cfg: ModelConfig) => {
    const ck = Checkpoint.open(dir);
    try {
      return unusedTensors(ck, cfg).sort();
    } finally {
      ck.close();
    }
  };

  it("tiny-v3 and tiny-v3-bf16 with their own configs: every tensor is read (the MTP block included)", () => {
    expect(unused(TINY, tinyConfig())).toEqual([]);
    expect(unused(TINY_BF16, tinyConfig(TINY_BF16))).toEqual([]);
  });

  it("a config that drops tensors names them: no shared experts, greedy routing, no MTP layer", () => {
    const shared = unused(TINY, parseConfig({ ...raw(), n_shared_experts: 0 }));
    expect(shared.length).toBe(4 * 3 * 2); // 3 MoE layers + the MTP layer: gate/up/down, each with its FP8 scale
    expect(shared.every((n) => /^model\.layers\.[1-4]\.mlp\.shared_experts\.(gate|up|down)_proj\.weight(_scale_inv)?$/.test(n))).toBe(true);
    const greedy = unused(TINY, parseConfig({ ...raw(), topk_method: "greedy" }));
    expect(greedy).toEqual([1, 2, 3, 4].map((l) => `model.layers.${l}.mlp.gate.e_score_correction_bias`));
    const noMtp = unused(TINY, parseConfig({ ...raw(), num_nextn_predict_layers: 0 }));
    expect(noMtp.length).toBeGreaterThan(0);
    expect(noMtp.every((n) => n.startsWith("model.layers.4."))).toBe(true);
  });

  it("an extra tensor in a shard (well formed) is named, and the summary groups numbered names", () => {
    const dir = copyFixture();
    const p = join(dir, SHARD2);
    writeST(p, [...rawAll(p), { name: "model.layers.0.self_attn.rotary_emb.inv_freq", dtype: "F32", shape: [16], data: f32(new Array(16).fill(1)) }], { format: "pt" });
    const ip = join(dir, "model.safetensors.index.json");
    const ix = JSON.parse(readFileSync(ip, "utf8")) as { weight_map: Record<string, string> };
    ix.weight_map["model.layers.0.self_attn.rotary_emb.inv_freq"] = SHARD2;
    writeFileSync(ip, JSON.stringify(ix));
    expect(unused(dir, tinyConfig())).toEqual(["model.layers.0.self_attn.rotary_emb.inv_freq"]);
    const messages: string[] = [];
    expect(warnUnusedTensors(dir, tinyConfig(), (m) => messages.push(m))).toEqual(["model.layers.0.self_attn.rotary_emb.inv_freq"]);
    expect(messages).toHaveLength(1);
    expect(messages[0]).toContain(dir);
    expect(messages[0]).toMatch(/1 checkpoint tensor\(s\) that the model never reads .*"model\.layers\.0\.self_attn\.rotary_emb\.inv_freq"$/);
    expect(summarizeNames(["model.layers.1.a.weight", "model.layers.2.a.weight", "lm_head.x"])).toBe('"model.layers.*.a.weight" (2 tensors), "lm_head.x"');
  });
});
