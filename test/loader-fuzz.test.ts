// Seeded fuzzing of the checkpoint loader: a few hundred mutants of tiny-v3 (header length,
// header JSON, offsets, duplicate keys, index entries, config values, non-finite vectors), each
// loaded as DS3.load loads a model at tp 1 in this thread (loadConfig, LocalExecutor, the unused-
// tensor check) and run on one prompt. Every mutant must end one of these ways, never another:
//   - rejected with an error that names the file (and the tensor or config field it is about);
//   - loaded, with the unmutated logits bit for bit (a legal change: key order, layout, a renamed shard...);
//   - loaded with other logits only when that is what the change means and it is said: a config
//     field deleted gives exactly what its transformers DeepseekV3Config default gives when written
//     out, and a config that leaves checkpoint tensors unread names them in a warning.
// The unmutated model itself is checked against the golden logits (transformers' fp32 reference).
// DS3_FUZZ_SEED and DS3_FUZZ_SCALE (a multiplier of the mutant counts) reproduce or widen a run.
import { cpu } from "@ds3/backend-cpu";
import { type BackendContext, type BackendOptions, type BackendProvider, CheckpointError, ConfigError, LocalExecutor, loadConfig, warnUnusedTensors } from "@ds3/core";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { FIXTURES, loadGolden, maxAbsDiff, seqStep } from "./helpers/golden.js";

const SEED = Number(process.env.DS3_FUZZ_SEED ?? 20261201);
const SCALE = Number(process.env.DS3_FUZZ_SCALE ?? 1);
const TINY = join(FIXTURES, "tiny-v3");
const SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"] as const;
const INDEX = "model.safetensors.index.json";
const FILES = ["config.json", "generation_config.json", INDEX, ...SHARDS];
const golden = loadGolden("tiny-v3");
const PROMPT = golden.prompts[1]!; // 7 tokens

// transformers' DeepseekV3Config defaults (see the fixture, shared with loader.test.ts)
const DEFAULTS = (JSON.parse(readFileSync(join(FIXTURES, "transformers-deepseek-v3-defaults.json"), "utf8")) as { defaults: Record<string, unknown> }).defaults;
// fields with no bearing on the logits (not read, or only validated)
const INERT = ["architectures", "initializer_range", "use_cache", "attention_bias", "attention_dropout", "torch_dtype", "moe_layer_freq", "quantization_config"];

// ---------------------------------------------------------------------------------------
// the fixture, parsed independently of @ds3/core

interface Entry {
  dtype: string;
  shape: number[];
  data_offsets: [number, number];
}
interface Shard {
  json: string;
  header: Record<string, unknown>;
  data: Buffer;
}
const shards = new Map<string, Shard>();
for (const s of SHARDS) {
  const b = readFileSync(join(TINY, s));
  const hlen = Number(b.readBigUInt64LE(0));
  const json = b.subarray(8, 8 + hlen).toString("utf8");
  shards.set(s, { json, header: JSON.parse(json) as Record<string, unknown>, data: b.subarray(8 + hlen) });
}
const config = JSON.parse(readFileSync(join(TINY, "config.json"), "utf8")) as Record<string, unknown>;
const indexText = readFileSync(join(TINY, INDEX), "utf8");
const index = JSON.parse(indexText) as { metadata?: unknown; weight_map: Record<string, string> };
const tensorsOf = (s: string) => Object.keys(shards.get(s)!.header).filter((k) => k !== "__metadata__");
const entry = (s: string, t: string) => shards.get(s)!.header[t] as Entry;
/** 1-D tensors and FP8 block scales: the small vectors checked for NaN and infinity at load. */
const smallVectors = SHARDS.flatMap((s) => tensorsOf(s).filter((t) => entry(s, t).shape.length === 1 || t.endsWith("_scale_inv")).map((t) => [s, t] as const));

function pad(json: string): string {
  return json + " ".repeat((8 - ((Buffer.byteLength(json) + 8) % 8)) % 8);
}
function shardBytes(header: string | Buffer, data: Uint8Array, hlen?: number): Buffer {
  const hb = typeof header === "string" ? Buffer.from(header, "utf8") : header;
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(hlen ?? hb.length));
  return Buffer.concat([len, hb, data]);
}
const clone = <T>(x: T): T => structuredClone(x);
const headerJson = (h: Record<string, unknown>) => pad(JSON.stringify(h));

// ---------------------------------------------------------------------------------------
// seeded randomness (sfc32)

function rng(seed: number) {
  let a = 0x9e3779b9 ^ seed;
  let b = 0x243f6a88;
  let c = 0xb7e15162;
  let d = seed >>> 0;
  const next = () => {
    a >>>= 0;
    b >>>= 0;
    c >>>= 0;
    d >>>= 0;
    let t = (a + b) | 0;
    a = b ^ (b >>> 9);
    b = (c + (c << 3)) | 0;
    c = (c << 21) | (c >>> 11);
    d = (d + 1) | 0;
    t = (t + d) | 0;
    c = (c + t) | 0;
    return (t >>> 0) / 4294967296;
  };
  for (let i = 0; i < 16; i++) next();
  const int = (n: number) => Math.floor(next() * n);
  return { next, int, pick: <T>(xs: readonly T[]): T => xs[int(xs.length)]!, between: (lo: number, hi: number) => lo + int(hi - lo + 1) };
}
type R = ReturnType<typeof rng>;

// ---------------------------------------------------------------------------------------
// mutants

type Expect =
  /** must be rejected, naming `file` (and `tensor` / `field` when given; any file of the checkpoint if none) */
  | { kind: "reject"; file?: string; tensor?: string; field?: string }
  /** must load with the unmutated logits, with no warning */
  | { kind: "same" }
  /** rejected naming a file of the checkpoint, or loaded with the unmutated logits */
  | { kind: "either" }
  /** must behave exactly as `config` (the deleted field written out with transformers' default) */
  | { kind: "like"; config: Record<string, unknown> }
  /** loads, and a warning names the checkpoint tensors it leaves unread (or is rejected, naming them) */
  | { kind: "warn"; pattern: RegExp };

interface Mutant {
  name: string;
  category: string;
  /** files that replace the fixture's (null: the file is absent); others are links to the fixture */
  files: Record<string, Buffer | string | null>;
  extra?: (dir: string) => void;
  expect: Expect;
}

const reject = (file: string | undefined, more: { tensor?: string; field?: string } = {}): Expect => ({ kind: "reject", file, ...more });

function genHeaderLength(r: R): Mutant {
  const s = r.pick(SHARDS);
  const sh = shards.get(s)!;
  const delta = r.pick([-1, 1]) * r.between(1, 16);
  const hb = Buffer.from(sh.json, "utf8");
  return { name: `${s}: header length ${delta > 0 ? "+" : ""}${delta}`, category: "header length", files: { [s]: shardBytes(hb, sh.data, hb.length + delta) }, expect: reject(s) };
}

function genHeaderJson(r: R): Mutant {
  const s = r.pick(SHARDS);
  const sh = shards.get(s)!;
  const h = clone(sh.header);
  const op = r.int(9);
  const files = (json: string | Buffer, data: Uint8Array = sh.data) => ({ [s]: shardBytes(json, data) });
  const t = r.pick(tensorsOf(s));
  switch (op) {
    case 0: {
      // whitespace before "{" (the padding keeps the length right)
      const ws = r.pick([" ", "\n", "\t", "\r\n"]);
      return { name: `${s}: ${JSON.stringify(ws)} before "{"`, category: "header JSON", files: files(pad(ws + JSON.stringify(h))), expect: reject(s) };
    }
    case 1: {
      // one byte of the header replaced: a syntax error, a renamed tensor, a changed number, or nothing that matters
      const b = Buffer.from(sh.json, "utf8");
      const at = r.int(b.length);
      const by = r.pick([0x20, 0x0a, 0x22, 0x2c, 0x7b, 0x7d, 0x30 + r.int(10), 0x61 + r.int(26), 0x80 + r.int(128)]);
      const old = b[at]!;
      b[at] = by;
      return { name: `${s}: header byte ${at} ${old} -> ${by}`, category: "header JSON", files: files(b), expect: { kind: "either" } };
    }
    case 2: {
      // a byte that is not UTF-8 inside a tensor name
      const b = Buffer.from(headerJson(h), "utf8");
      const at = b.indexOf(Buffer.from(`"${t}"`)) + 1 + r.int(t.length);
      b[at] = r.pick([0xff, 0xc0, 0x80, 0xfe]);
      return { name: `${s}: invalid UTF-8 in "${t}"`, category: "header JSON", files: files(b), expect: reject(s) };
    }
    case 3: {
      // the same entries in another order: legal
      const keys = Object.keys(h);
      for (let i = keys.length - 1; i > 0; i--) {
        const j = r.int(i + 1);
        [keys[i], keys[j]] = [keys[j]!, keys[i]!];
      }
      return { name: `${s}: header keys shuffled`, category: "header JSON", files: files(pad(JSON.stringify(Object.fromEntries(keys.map((k) => [k, h[k]]))))), expect: { kind: "same" } };
    }
    case 4:
      return { name: `${s}: header pretty-printed`, category: "header JSON", files: files(pad(JSON.stringify(h, null, r.pick([1, 2, "\t"])))), expect: { kind: "same" } };
    case 5: {
      const m = r.pick([undefined, {}, { format: "pt", extra: "x" }, null]);
      if (m === undefined) delete h.__metadata__;
      else h.__metadata__ = m;
      return { name: `${s}: __metadata__ = ${JSON.stringify(m)}`, category: "header JSON", files: files(headerJson(h)), expect: { kind: "same" } };
    }
    case 6: {
      h.__metadata__ = { format: r.pick([5, true, ["pt"], { a: 1 }]) };
      return { name: `${s}: __metadata__ value not a string`, category: "header JSON", files: files(headerJson(h)), expect: reject(s) };
    }
    case 7: {
      const junk = r.pick(["x", "}", ",", "{}", "null"]);
      return { name: `${s}: ${JSON.stringify(junk)} after the header's JSON`, category: "header JSON", files: files(pad(JSON.stringify(h) + junk)), expect: reject(s) };
    }
    default: {
      const body = r.pick(["[]", "null", "5", '"x"', "[{}]"]);
      return { name: `${s}: header ${body}`, category: "header JSON", files: files(pad(body)), expect: reject(s) };
    }
  }
}

function genOffsets(r: R): Mutant {
  const s = r.pick(SHARDS);
  const sh = shards.get(s)!;
  const h = clone(sh.header) as Record<string, Entry> & Record<string, unknown>;
  const nonEmpty = tensorsOf(s).filter((t) => entry(s, t).data_offsets[1] > entry(s, t).data_offsets[0]);
  const t = r.pick(nonEmpty);
  const e = h[t] as Entry;
  const [b0, e0] = e.data_offsets;
  const op = r.int(9);
  const cat = "offsets";
  switch (op) {
    case 0: {
      // re-pointed at a copy of its bytes appended after the data: the bytes it left belong to no tensor
      e.data_offsets = [sh.data.length, sh.data.length + (e0 - b0)];
      return { name: `${s}: "${t}" re-pointed at appended bytes`, category: cat, files: { [s]: shardBytes(headerJson(h), Buffer.concat([sh.data, sh.data.subarray(b0, e0)])) }, expect: reject(s) };
    }
    case 1: {
      const k = r.pick([-1, 1]) * r.between(1, 8);
      if (b0 + k < 0) e.data_offsets = [b0 + 1, e0 + 1];
      else e.data_offsets = [b0 + k, e0 + k];
      return { name: `${s}: "${t}" shifted by ${e.data_offsets[0] - b0}`, category: cat, files: { [s]: shardBytes(headerJson(h), sh.data) }, expect: reject(s) };
    }
    case 2: {
      e.data_offsets = [b0, e0 + r.pick([-1, 1, -2, 2])];
      return { name: `${s}: "${t}" end off by ${e.data_offsets[1] - e0}`, category: cat, files: { [s]: shardBytes(headerJson(h), sh.data) }, expect: reject(s, { tensor: t }) };
    }
    case 3: {
      // the data laid out in another order, the offsets following it: legal
      const names = tensorsOf(s);
      for (let i = names.length - 1; i > 0; i--) {
        const j = r.int(i + 1);
        [names[i], names[j]] = [names[j]!, names[i]!];
      }
      const parts: Buffer[] = [];
      let off = 0;
      for (const n of names) {
        const [a, z] = entry(s, n).data_offsets;
        (h[n] as Entry).data_offsets = [off, off + (z - a)];
        parts.push(sh.data.subarray(a, z));
        off += z - a;
      }
      return { name: `${s}: data laid out in another order`, category: cat, files: { [s]: shardBytes(headerJson(h), Buffer.concat(parts)) }, expect: { kind: "same" } };
    }
    case 4: {
      const n = r.between(1, 64);
      return { name: `${s}: ${n} bytes appended`, category: cat, files: { [s]: shardBytes(sh.json, Buffer.concat([sh.data, Buffer.alloc(n, r.int(256))])) }, expect: reject(s) };
    }
    case 5: {
      const n = r.between(1, 64);
      return { name: `${s}: ${n} bytes cut off the end`, category: cat, files: { [s]: shardBytes(sh.json, sh.data.subarray(0, sh.data.length - n)) }, expect: reject(s) };
    }
    case 6: {
      e.data_offsets = r.pick([[e0, b0], [-b0 - 1, e0], [b0 + 0.5, e0], [String(b0), e0], [b0], [b0, e0, e0], null]) as never;
      return { name: `${s}: "${t}" data_offsets ${JSON.stringify(e.data_offsets)}`, category: cat, files: { [s]: shardBytes(headerJson(h), sh.data) }, expect: reject(s, { tensor: t }) };
    }
    case 7: {
      // the same bytes read as another shape: the config's shape check names it
      const n = e.shape.reduce((a, b) => a * b, 1);
      const shapes = [[n], [1, n], [n, 1], e.shape.length === 2 ? [e.shape[1]!, e.shape[0]!] : [n / 2, 2]].filter((x) => JSON.stringify(x) !== JSON.stringify(e.shape));
      e.shape = r.pick(shapes);
      return { name: `${s}: "${t}" shape ${JSON.stringify(e.shape)}`, category: cat, files: { [s]: shardBytes(headerJson(h), sh.data) }, expect: reject(s, { tensor: t }) };
    }
    default: {
      // (BF16 <-> F16 is left out: the same bytes as another float type are a different, valid checkpoint)
      e.dtype = r.pick(["U8", "I8", "F64", "bf16", "", "F8_E5M2", "BOOL", ...(e.dtype === "F32" ? ["I32", "I32", "I32"] : [])]);
      return { name: `${s}: "${t}" dtype ${JSON.stringify(e.dtype)}`, category: cat, files: { [s]: shardBytes(headerJson(h), sh.data) }, expect: reject(s, { tensor: t }) };
    }
  }
}

function genDuplicates(r: R): Mutant {
  const op = r.int(4);
  const s = r.pick(SHARDS);
  const sh = shards.get(s)!;
  const t = r.pick(tensorsOf(s));
  const cat = "duplicates";
  if (op === 0) {
    // a key given twice: JSON.parse keeps the last, safetensors refuses
    const other = r.pick(tensorsOf(s));
    const body = sh.json.trimEnd();
    const dup = `${JSON.stringify(t)}:${JSON.stringify(entry(s, other))}`;
    const json = r.next() < 0.5 ? body.replace(/}$/, `,${dup}}`) : `{${dup},${body.slice(1)}`;
    return { name: `${s}: "${t}" twice (second like "${other}")`, category: cat, files: { [s]: shardBytes(pad(json), sh.data) }, expect: reject(s, { tensor: t }) };
  }
  if (op === 1) {
    // a key twice inside one entry
    const e = entry(s, t);
    const k = r.pick(["dtype", "shape", "data_offsets"]);
    const json = sh.json.replace(`${JSON.stringify(t)}:{`, `${JSON.stringify(t)}:{${JSON.stringify(k)}:${JSON.stringify(e[k as keyof Entry])},`);
    expect(json).not.toBe(sh.json);
    return { name: `${s}: "${k}" twice in "${t}"`, category: cat, files: { [s]: shardBytes(pad(json), sh.data) }, expect: reject(s, { tensor: t }) };
  }
  if (op === 2) {
    // a weight_map entry twice
    const name = r.pick(Object.keys(index.weight_map));
    const text = indexText.replace(`"weight_map": {`, `"weight_map": {\n    ${JSON.stringify(name)}: ${JSON.stringify(r.pick(SHARDS))},`);
    expect(text).not.toBe(indexText);
    return { name: `index: "${name}" twice`, category: cat, files: { [INDEX]: text }, expect: reject(INDEX) };
  }
  // a tensor also stored (well formed) in the other shard: the index says where it is, the copy is never read
  const o = SHARDS.find((x) => x !== s)!;
  const oh = clone(shards.get(o)!.header) as Record<string, unknown>;
  const od = shards.get(o)!.data;
  const [a, z] = entry(s, t).data_offsets;
  oh[t] = { ...entry(s, t), data_offsets: [od.length, od.length + (z - a)] };
  return { name: `"${t}" also in ${o}`, category: cat, files: { [o]: shardBytes(headerJson(oh), Buffer.concat([od, sh.data.subarray(a, z)])) }, expect: { kind: "either" } };
}

function genIndex(r: R): Mutant {
  const ix = clone(index);
  const names = Object.keys(ix.weight_map);
  const t = r.pick(names);
  const op = r.int(9);
  const cat = "index entries";
  const write = (x: unknown) => ({ [INDEX]: JSON.stringify(x, null, 2) });
  switch (op) {
    case 0: {
      const bad = r.pick(["", ".", "..", "sub", `../tiny-v3/${SHARDS[0]}`, `/${SHARDS[0]}`, `./${SHARDS[0]}`, "nope.safetensors", "config.json", 5, null, {}, ["x"]]);
      (ix.weight_map as Record<string, unknown>)[t] = bad;
      return { name: `index: "${t}" -> ${JSON.stringify(bad)}`, category: cat, files: write(ix), extra: (d) => mkdirSync(join(d, "sub")), expect: reject(bad === "config.json" ? "config.json" : bad === "nope.safetensors" ? "nope.safetensors" : INDEX) };
    }
    case 1: {
      ix.weight_map[t] = SHARDS.find((s) => s !== index.weight_map[t])!;
      return { name: `index: "${t}" in the wrong shard`, category: cat, files: write(ix), expect: reject(ix.weight_map[t]!, { tensor: t }) };
    }
    case 2: {
      delete ix.weight_map[t];
      return { name: `index: "${t}" dropped`, category: cat, files: write(ix), expect: { kind: "either" } };
    }
    case 3: {
      const ghost = `${t.replace(/\.weight$/, "")}.ghost.weight`;
      ix.weight_map[ghost] = r.pick(SHARDS);
      return { name: `index: names "${ghost}", which no shard holds`, category: cat, files: write(ix), expect: reject(ix.weight_map[ghost]!, { tensor: ghost }) };
    }
    case 4: {
      // a shard renamed, the index following it: legal
      const s = r.pick(SHARDS);
      const to = r.pick(["weights-a.safetensors", "x.safetensors", "model 1.safetensors", "模型.safetensors"]);
      for (const k of names) if (ix.weight_map[k] === s) ix.weight_map[k] = to;
      const sh = shards.get(s)!;
      return { name: `index: ${s} renamed ${to}`, category: cat, files: { ...write(ix), [s]: null, [to]: shardBytes(sh.json, sh.data) }, expect: { kind: "same" } };
    }
    case 5: {
      const wm = r.pick([[], "x", null, 5]);
      return { name: `index: weight_map ${JSON.stringify(wm)}`, category: cat, files: write({ ...ix, weight_map: wm }), expect: reject(INDEX) };
    }
    case 6: {
      const text = indexText.slice(0, r.between(1, indexText.length - 2));
      return { name: `index: cut at ${text.length}`, category: cat, files: { [INDEX]: text }, expect: reject(INDEX) };
    }
    case 7: {
      const m = r.pick([undefined, {}, { total_size: 1 }, "x"]);
      if (m === undefined) delete ix.metadata;
      else ix.metadata = m;
      return { name: `index: metadata ${JSON.stringify(m)}`, category: cat, files: write(ix), expect: { kind: "same" } };
    }
    default:
      // no index: the shards are read as single files
      return { name: "index: absent", category: cat, files: { [INDEX]: null }, expect: { kind: "same" } };
  }
}

// invalid values per config field: every one must be refused, naming the field
const INT_FIELDS = [
  "vocab_size",
  "hidden_size",
  "intermediate_size",
  "moe_intermediate_size",
  "num_hidden_layers",
  "num_attention_heads",
  "n_routed_experts",
  "num_experts_per_tok",
  "kv_lora_rank",
  "qk_nope_head_dim",
  "qk_rope_head_dim",
  "v_head_dim",
  "n_group",
  "topk_group",
  "max_position_embeddings",
];
const INVALID: Record<string, unknown[]> = {
  ...Object.fromEntries(INT_FIELDS.map((k) => [k, [0, -1, 0.5, "8", true, [], {}, 1e308, 2 ** 40, -1e308]])),
  n_shared_experts: [-1, 0.5, "1", 1e308, 2 ** 40],
  first_k_dense_replace: [-1, 0.5, "1", 1e308, 1e9],
  num_nextn_predict_layers: [-1, 0.5, "1", 1e308, 1e9],
  q_lora_rank: [-1, 0.5, "192", 1e308, 1e9],
  routed_scaling_factor: [0, -2.5, "2.5", 1e308, true],
  rope_theta: [0, -5, "1e4", 1e308],
  rms_norm_eps: [0, -1e-6, 2, "1e-6"],
  norm_topk_prob: ["yes", 1, 0, []],
  tie_word_embeddings: ["no", 1],
  topk_method: ["bogus", "", 1, "NOAUX_TC"],
  scoring_func: ["tanh", "", 1],
  hidden_act: ["gelu", "", 3],
  model_type: ["llama", "", 3, "deepseek_v2"],
  rope_scaling: ["yarn", [], { type: "linear", factor: 4 }],
  bos_token_id: [5000, -1, "0", 0.5],
  eos_token_id: [5000, -1, "1", [1, 5000]],
  quantization_config: ["fp8", { quant_method: "gptq" }, { quant_method: "fp8", weight_block_size: [64, 64] }],
};
const ROPE_INVALID: Record<string, unknown[]> = {
  factor: [0.5, 1e308, "40", -1],
  original_max_position_embeddings: [0, 1e300, "4096"],
  beta_fast: ["32", 1e308],
  mscale: ["1", -1e308],
};
// fields that set weight shapes: another valid value must be refused (config or shape error)
const SHAPE_FIELDS = ["vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "num_attention_heads", "n_routed_experts"];

function genConfig(r: R): Mutant {
  const c = clone(config);
  const op = r.int(6);
  const cat = "config values";
  const files = (x: unknown) => ({ "config.json": typeof x === "string" ? x : JSON.stringify(x, null, 2) });
  if (op === 0) {
    const k = r.pick(Object.keys(INVALID));
    const v = r.pick(INVALID[k]!);
    c[k] = v;
    return { name: `config: ${k} = ${JSON.stringify(v)}`, category: cat, files: files(c), expect: reject("config.json", { field: k }) };
  }
  if (op === 1) {
    const k = r.pick(Object.keys(ROPE_INVALID));
    const v = r.pick(ROPE_INVALID[k]!);
    c.rope_scaling = { ...(c.rope_scaling as object), [k]: v };
    return { name: `config: rope_scaling.${k} = ${JSON.stringify(v)}`, category: cat, files: files(c), expect: reject("config.json", { field: `rope_scaling.${k}` }) };
  }
  if (op === 2) {
    // a field deleted: exactly what transformers' default, written out, gives
    const k = r.pick(Object.keys(config).filter((x) => x !== "model_type"));
    delete c[k];
    if (k in DEFAULTS) return { name: `config: ${k} deleted`, category: cat, files: files(c), expect: { kind: "like", config: { ...clone(config), [k]: DEFAULTS[k] } } };
    expect(INERT, k).toContain(k);
    return { name: `config: ${k} deleted (inert)`, category: cat, files: files(c), expect: { kind: "same" } };
  }
  if (op === 3) {
    const k = r.pick(SHAPE_FIELDS);
    const v0 = c[k] as number;
    let v = r.pick([v0 * 2, v0 / 2, v0 + 2, v0 - 2, v0 * 3]);
    if (v === v0 || v < 1 || !Number.isInteger(v)) v = v0 + 2;
    c[k] = v;
    // refused by a config cross-check or, more often, at the first weight whose shape it sets
    return { name: `config: ${k} ${v0} -> ${v}`, category: cat, files: files(c), expect: reject(undefined) };
  }
  if (op === 4) {
    // changes that leave tensors unread: the warning names them
    const [k, v, pattern] = r.pick([
      ["n_shared_experts", 0, /shared_experts/],
      ["topk_method", "greedy", /e_score_correction_bias/],
      ["topk_method", "group_limited_greedy", /e_score_correction_bias/],
      ["num_nextn_predict_layers", 0, /model\.layers\.4\./],
      ["num_hidden_layers", 3, /model\.layers\.[34]\./],
    ] as const);
    c[k] = v;
    return { name: `config: ${k} = ${JSON.stringify(v)}`, category: cat, files: files(c), expect: { kind: "warn", pattern } };
  }
  // changes with no bearing on these logits
  const [k, v] = r.pick([
    ["max_position_embeddings", 8192],
    ["architectures", []],
    ["some_new_field", { a: 1 }],
    ["eos_token_id", [1, 2]],
    ["bos_token_id", 5],
    ["torch_dtype", "float32"],
    ["num_key_value_heads", 128],
  ] as const);
  c[k] = v;
  return { name: `config: ${k} = ${JSON.stringify(v)}`, category: cat, files: files(c), expect: { kind: "same" } };
}

function genNonFinite(r: R): Mutant {
  const [s, t] = r.pick(smallVectors);
  const sh = shards.get(s)!;
  const e = entry(s, t);
  const n = e.shape.reduce((a, b) => a * b, 1);
  const i = r.int(n);
  const data = Buffer.from(sh.data);
  const at = e.data_offsets[0];
  const v = r.pick(["NaN", "Infinity", "-Infinity"]);
  if (e.dtype === "F32") data.writeUInt32LE(v === "NaN" ? 0x7fc00000 + r.int(1000) : v === "Infinity" ? 0x7f800000 : 0xff800000, at + i * 4);
  else if (e.dtype === "BF16") data.writeUInt16LE(v === "NaN" ? 0x7fc0 + r.int(60) : v === "Infinity" ? 0x7f80 : 0xff80, at + i * 2);
  else throw new Error(`fixture: ${t} is ${e.dtype}`);
  return { name: `${s}: ${v} at element ${i} of "${t}"`, category: "non-finite vectors", files: { [s]: shardBytes(sh.json, data) }, expect: reject(s, { tensor: t }) };
}

const PLAN: Array<[string, (r: R) => Mutant, number]> = [
  ["header length", genHeaderLength, 30],
  ["header JSON", genHeaderJson, 60],
  ["offsets", genOffsets, 55],
  ["duplicates", genDuplicates, 25],
  ["index entries", genIndex, 45],
  ["config values", genConfig, 75],
  ["non-finite vectors", genNonFinite, 30],
];

// ---------------------------------------------------------------------------------------
// running a mutant

let root: string;
let live = 0; // backend contexts created and not yet disposed
const counting: BackendProvider = {
  ...cpu,
  create(o?: BackendOptions): BackendContext {
    const ctx = cpu.create(o);
    live++;
    const dispose = ctx.dispose.bind(ctx);
    ctx.dispose = () => {
      live--;
      dispose();
    };
    return ctx;
  },
};

type Outcome = { kind: "rejected"; error: Error } | { kind: "loaded"; logits: Float32Array; warnings: string[] };

function materialize(m: Mutant, i: number): string {
  const dir = join(root, `m${i}`);
  mkdirSync(dir);
  for (const f of FILES) if (!(f in m.files)) symlinkSync(join(TINY, f), join(dir, f));
  for (const [f, b] of Object.entries(m.files)) if (b !== null) writeFileSync(join(dir, f), b);
  m.extra?.(dir);
  return dir;
}

/** What DS3.load does at tp 1 in this thread, then one step over the prompt. */
async function load(dir: string): Promise<Outcome> {
  let ex: LocalExecutor | undefined;
  const warnings: string[] = [];
  try {
    const cfg = loadConfig(dir);
    ex = new LocalExecutor(dir, { backend: counting, cache: { numBlocks: 1, blockSize: 64, dtype: "f32" } });
    warnUnusedTensors(dir, cfg, (w) => warnings.push(w));
    const logits = await ex.step(seqStep(PROMPT.ids, 0, 1));
    return { kind: "loaded", logits, warnings };
  } catch (e) {
    return { kind: "rejected", error: e as Error };
  } finally {
    await ex?.close();
  }
}

const sameBits = (a: Float32Array, b: Float32Array) => a.length === b.length && Buffer.compare(Buffer.from(a.buffer, a.byteOffset, a.byteLength), Buffer.from(b.buffer, b.byteOffset, b.byteLength)) === 0;

/** A rejection must be the loader's own error, naming a file of this checkpoint. */
function checkRejection(o: Outcome & { kind: "rejected" }, dir: string, what: string): void {
  const msg = o.error.message;
  expect(o.error instanceof CheckpointError || o.error instanceof ConfigError || o.error.constructor === Error, `${what}: ${o.error.constructor.name}: ${msg}`).toBe(true);
  expect(msg, what).toContain(dir);
  expect(msg, what).not.toMatch(/EISDIR|ENOENT|EACCES|Invalid typed array length|Cannot read properties|is not a function|undefined|Maximum call stack/);
}

// ---------------------------------------------------------------------------------------

describe(`loader fuzz: seeded mutants of tiny-v3 (seed ${SEED})`, () => {
  let ref: Float32Array;
  beforeAll(async () => {
    root = mkdtempSync(join(tmpdir(), "ds3-fuzz-"));
    const o = await load(TINY);
    if (o.kind !== "loaded") throw o.error;
    expect(o.warnings).toEqual([]);
    ref = o.logits;
  });
  afterAll(() => rmSync(root, { recursive: true, force: true }));

  it("the unmutated tiny-v3 gives the golden logits (transformers' fp32 reference) within 1e-3", () => {
    expect(maxAbsDiff(ref, PROMPT.logits)).toBeLessThan(1e-3);
  });

  it("every mutant is rejected naming the file/tensor/field, or gives the unmutated logits (or what its stated meaning gives)", async () => {
    const r = rng(SEED);
    const mutants: Mutant[] = [];
    for (const [, gen, n] of PLAN) for (let i = 0; i < Math.round(n * SCALE); i++) mutants.push(gen(r));
    expect(mutants.length).toBeGreaterThanOrEqual(300 * SCALE - 5);
    const likeCache = new Map<string, Outcome>();
    const tally = new Map<string, { rejected: number; same: number; other: number }>();
    const failures: string[] = [];
    let i = 0;
    for (const m of mutants) {
      const dir = materialize(m, i++);
      const what = `[${m.category}] ${m.name}`;
      try {
        const o = await load(dir);
        const t = tally.get(m.category) ?? { rejected: 0, same: 0, other: 0 };
        tally.set(m.category, t);
        const same = o.kind === "loaded" && sameBits(o.logits, ref);
        t[o.kind === "rejected" ? "rejected" : same ? "same" : "other"]++;
        const x = m.expect;
        if (o.kind === "rejected") checkRejection(o, dir, what);
        if (x.kind === "reject") {
          expect(o.kind, `${what}: must be rejected`).toBe("rejected");
          const e = (o as { error: Error }).error;
          if (x.file !== undefined) expect(e.message, what).toContain(join(dir, x.file));
          if (x.tensor) expect(e.message, what).toContain(`"${x.tensor}"`);
          if (x.field) {
            expect(e, `${what}: ${e.message}`).toBeInstanceOf(ConfigError);
            // the field itself, or one of its members (quantization_config.weight_block_size)
            const f = (e as ConfigError).field;
            expect(f === x.field || f.startsWith(`${x.field}.`), `${what}: names field ${f}: ${e.message}`).toBe(true);
          }
        } else if (x.kind === "same") {
          expect(o.kind, `${what}: must load (${o.kind === "rejected" ? o.error.message : ""})`).toBe("loaded");
          expect(same, `${what}: logits differ from the unmutated model's`).toBe(true);
          expect((o as { warnings: string[] }).warnings, what).toEqual([]);
        } else if (x.kind === "either") {
          if (o.kind === "loaded") expect(same, `${what}: loaded with logits that differ from the unmutated model's`).toBe(true);
        } else if (x.kind === "warn") {
          if (o.kind === "loaded") {
            expect(o.warnings, `${what}: no warning names the unread tensors`).toHaveLength(1);
            expect(o.warnings[0], what).toMatch(x.pattern);
          }
        } else {
          const key = JSON.stringify(x.config);
          let want = likeCache.get(key);
          if (!want) {
            const d = join(root, `like${likeCache.size}`);
            mkdirSync(d);
            for (const f of FILES) if (f !== "config.json") symlinkSync(join(TINY, f), join(d, f));
            writeFileSync(join(d, "config.json"), key);
            want = await load(d);
            rmSync(d, { recursive: true, force: true });
            likeCache.set(key, want);
          }
          expect(o.kind, `${what}: the deleted field must act as its default written out (${want.kind === "rejected" ? want.error.message : "loads"})`).toBe(want.kind);
          if (o.kind === "loaded" && want.kind === "loaded") {
            expect(sameBits(o.logits, want.logits), `${what}: logits differ from the explicit default's`).toBe(true);
            expect(o.warnings.length, what).toBe(want.warnings.length);
          }
          if (o.kind === "rejected" && want.kind === "rejected") expect(o.error.constructor, what).toBe(want.error.constructor);
        }
      } catch (e) {
        failures.push((e as Error).message.split("\n")[0]!);
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    }
    const summary = [...tally.entries()].map(([c, t]) => `${c}: ${t.rejected} rejected, ${t.same} same logits, ${t.other} other`).join("; ");
    console.log(`loader fuzz, seed ${SEED}: ${mutants.length} mutants; ${summary}`);
    expect(failures, failures.slice(0, 20).join("\n")).toEqual([]);
    // every category produced both outcomes somewhere (the generators are not all-reject or all-legal)
    expect([...tally.values()].reduce((a, t) => a + t.rejected, 0)).toBeGreaterThan(150 * SCALE);
    expect([...tally.values()].reduce((a, t) => a + t.same, 0)).toBeGreaterThan(30 * SCALE);
    // a failed load releases its backend context
    expect(live, "backend contexts of failed loads that were never disposed").toBe(0);
  });
});

describe("config fields deleted from tiny-v3 load as transformers' defaults (the logits used to move by 7 to 15)", () => {
  let dirRoot: string;
  beforeAll(() => {
    dirRoot = mkdtempSync(join(tmpdir(), "ds3-defaults-"));
  });
  afterAll(() => rmSync(dirRoot, { recursive: true, force: true }));
  const withConfig = async (name: string, c: Record<string, unknown>) => {
    const d = join(dirRoot, name);
    mkdirSync(d);
    for (const f of FILES) if (f !== "config.json") symlinkSync(join(TINY, f), join(d, f));
    writeFileSync(join(d, "config.json"), JSON.stringify(c));
    const o = await load(d);
    if (o.kind !== "loaded") throw o.error;
    return o;
  };

  it("topk_method, norm_topk_prob, scoring_func, n_shared_experts, routed_scaling_factor: tiny-v3 has transformers' values, so the golden logits", async () => {
    for (const k of ["topk_method", "norm_topk_prob", "scoring_func", "n_shared_experts", "routed_scaling_factor"]) {
      const c = clone(config);
      delete c[k];
      const o = await withConfig(`no-${k}`, c);
      expect(maxAbsDiff(o.logits, PROMPT.logits), k).toBeLessThan(1e-3);
      expect(o.warnings, k).toEqual([]);
    }
  });

  it("topk_group (tiny-v3: 2, transformers: 4): the logits of topk_group 4 written out, and not those of 2", async () => {
    const c = clone(config);
    delete c.topk_group;
    const a = await withConfig("no-topk_group", c);
    const b = await withConfig("topk_group-4", { ...clone(config), topk_group: 4 });
    expect(sameBits(a.logits, b.logits)).toBe(true);
    expect(maxAbsDiff(a.logits, PROMPT.logits)).toBeGreaterThan(1e-3);
  });
});
