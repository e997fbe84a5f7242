// `ds3 convert --to bf16`: an FP8 checkpoint to BF16, as DeepSeek's fp8_cast_bf16.py does it.
// Every FP8 e4m3 weight becomes BF16 = round-to-nearest-even(fp8 × weight_scale_inv of its
// 128x128 block) computed in float32; the `weight_scale_inv` tensors are dropped, the index is
// rewritten, `quantization_config` leaves config.json, every other file is copied.
//
// Atomic and resumable: the output is written into `DST.partial` and renamed to DST when
// complete. Each shard lands in `DST.partial` only when it is whole (written as `.tmp`, then
// renamed), so a rerun after an interruption skips the shards already done, as long as the
// source has not changed since (a fingerprint of the source shards is kept beside them).
import { closeSync, cpSync, existsSync, fsyncSync, mkdirSync, openSync, readdirSync, readFileSync, renameSync, rmdirSync, rmSync, statSync, writeFileSync, writeSync } from "node:fs";
import { basename, join, resolve, sep } from "node:path";
import { CheckpointError, DTYPE_SIZE, type DType, SafetensorsFile, type TensorInfo } from "./safetensors.js";

export interface ConvertProgress {
  /** "tensor": a tensor (or part of a large one) was written; "skip": a shard done by an earlier run; "done": finished */
  phase: "start" | "tensor" | "skip" | "files" | "done";
  /** output bytes of tensors written so far, of `bytesTotal` */
  bytesDone: number;
  bytesTotal: number;
  file?: string;
  tensor?: string;
  message?: string;
}

export interface ConvertOptions {
  onProgress?: (p: ConvertProgress) => void;
}

export interface ConvertResult {
  dir: string;
  /** tensors written */
  tensors: number;
  /** FP8 weights converted to BF16 */
  converted: number;
  /** weight_scale_inv tensors dropped */
  dropped: number;
  /** bytes of tensor data written */
  bytes: number;
  /** shards an interrupted earlier run had finished */
  resumedShards: number;
}

export class ConvertError extends Error {
  override name = "ConvertError";
}

const INDEX = "model.safetensors.index.json";
const MARK = ".ds3-convert.json";
const CHUNK = 64 * 1024 * 1024;

/** float32 value of each FP8 e4m3fn byte (0x7f and 0xff are NaN). */
export const FP8_E4M3_TO_F32: Float32Array = (() => {
  const t = new Float32Array(256);
  for (let b = 0; b < 256; b++) {
    const e = (b >> 3) & 15;
    const m = b & 7;
    const v = (b & 0x7f) === 0x7f ? NaN : e === 0 ? m * 2 ** -9 : (1 + m / 8) * 2 ** (e - 7);
    t[b] = b & 0x80 ? -v : v;
  }
  return t;
})();

/**
 * BF16 bits of `rows x cols` FP8 values times their 128x128 block scales (row-major
 * [ceil(rows/128), ceil(cols/128)]), the product in float32 rounded to nearest even.
 * `row0` is the first row's index in the whole weight (for chunks of rows).
 */
export function dequantFp8ToBf16(fp8: Uint8Array, rows: number, cols: number, scale: Float32Array, row0 = 0): Uint16Array {
  const out = new Uint16Array(rows * cols);
  const f = new Float32Array(128);
  const u = new Uint32Array(f.buffer);
  const sc = Math.ceil(cols / 128);
  for (let r = 0; r < rows; r++) {
    const srow = ((row0 + r) >> 7) * sc;
    for (let cb = 0; cb < sc; cb++) {
      const s = scale[srow + cb]!;
      const c0 = cb * 128;
      const n = Math.min(128, cols - c0);
      const base = r * cols + c0;
      // a product of two float32 values is exact in float64; the store rounds it once to float32
      for (let j = 0; j < n; j++) f[j] = FP8_E4M3_TO_F32[fp8[base + j]!]! * s;
      for (let j = 0; j < n; j++) {
        const x = u[j]!;
        out[base + j] = (x & 0x7fffffff) > 0x7f800000 ? ((x >>> 16) | 0x40) & 0xffff : (x + 0x7fff + ((x >>> 16) & 1)) >>> 16;
      }
    }
  }
  return out;
}

interface Source {
  dir: string;
  shards: string[];
  files: Map<string, SafetensorsFile>;
  where: Map<string, string>;
  index: { metadata?: Record<string, unknown>; weight_map: Record<string, string> } | null;
}

function openSource(dir: string): Source {
  if (!existsSync(dir)) throw new ConvertError(`source not found: ${dir}`);
  if (!statSync(dir).isDirectory()) throw new ConvertError(`source is not a directory: ${dir}`);
  if (!existsSync(join(dir, "config.json"))) throw new ConvertError(`${dir}: not a model directory (no config.json)`);
  const src: Source = { dir, shards: [], files: new Map(), where: new Map(), index: null };
  try {
    const ip = join(dir, INDEX);
    if (existsSync(ip)) {
      let index: Source["index"];
      try {
        index = JSON.parse(readFileSync(ip, "utf8"));
      } catch (e) {
        throw new CheckpointError(`not valid JSON (${(e as Error).message})`, ip);
      }
      if (!index || typeof index.weight_map !== "object" || index.weight_map === null) throw new CheckpointError(`has no "weight_map"`, ip);
      src.index = index;
      src.shards = [...new Set(Object.values(index.weight_map))];
      for (const s of src.shards) {
        if (typeof s !== "string" || s.includes("/") || s.includes("\\")) throw new CheckpointError(`bad shard name ${JSON.stringify(s)}`, ip);
        if (!existsSync(join(dir, s))) throw new CheckpointError(`missing shard "${s}" named by ${INDEX}`, join(dir, s));
      }
    } else {
      src.shards = readdirSync(dir).filter((f) => f.endsWith(".safetensors")).sort();
      if (src.shards.length === 0) throw new ConvertError(`${dir}: no ${INDEX} and no *.safetensors files`);
    }
    for (const s of src.shards) {
      const f = new SafetensorsFile(join(dir, s));
      src.files.set(s, f);
      for (const t of f.tensors.keys()) {
        if (src.where.has(t)) throw new CheckpointError(`tensor appears in two files ("${src.where.get(t)}" and "${s}")`, join(dir, s), t);
        src.where.set(t, s);
      }
    }
    if (src.index)
      for (const [t, s] of Object.entries(src.index.weight_map))
        if (src.where.get(t) !== s) throw new CheckpointError(`the index places tensor "${t}" in "${s}", which does not hold it`, join(dir, s), t);
  } catch (e) {
    for (const f of src.files.values()) f.close();
    throw e;
  }
  return src;
}

const numel = (shape: number[]) => shape.reduce((a, b) => a * b, 1);

function fingerprint(src: Source): string {
  return JSON.stringify({
    src: src.dir,
    shards: src.shards.map((s) => {
      const st = statSync(join(src.dir, s));
      return [s, st.size, Math.floor(st.mtimeMs)];
    }),
    version: 1,
  });
}

/** Convert the FP8 checkpoint in `src` to a BF16 one in `dst` (which must not exist, or be empty). */
export async function convertToBf16(srcDir: string, dstDir: string, opts: ConvertOptions = {}): Promise<ConvertResult> {
  const srcPath = resolve(srcDir);
  const dst = resolve(dstDir);
  if (dst === srcPath) throw new ConvertError("the destination must differ from the source");
  if (dst.startsWith(srcPath + sep)) throw new ConvertError(`the destination must not be inside the source (${srcPath})`);
  if (existsSync(dst) && (!statSync(dst).isDirectory() || readdirSync(dst).length > 0)) throw new ConvertError(`destination already exists: ${dst}`);
  const src = openSource(srcPath);
  try {
    return convert(src, dst, opts);
  } finally {
    for (const f of src.files.values()) f.close();
  }
}

function convert(src: Source, dst: string, opts: ConvertOptions): ConvertResult {
  const info = (name: string): TensorInfo => src.files.get(src.where.get(name)!)!.tensors.get(name)!;
  // which tensors are FP8, and their scales
  const fp8 = new Set<string>();
  for (const [name] of src.where) {
    const ti = info(name);
    if (ti.dtype !== "F8_E4M3") continue;
    if (ti.shape.length !== 2) throw new CheckpointError(`FP8 tensor must be 2-D, has shape [${ti.shape.join(", ")}]`, ti.file, name);
    const sname = `${name}_scale_inv`;
    if (!src.where.has(sname)) throw new CheckpointError(`FP8 weight has no "${sname}"`, ti.file, name);
    const si = info(sname);
    const [R, C] = ti.shape as [number, number];
    const want = [Math.ceil(R / 128), Math.ceil(C / 128)];
    if (si.dtype !== "F32" && si.dtype !== "BF16") throw new CheckpointError(`scale must be F32 or BF16, got ${si.dtype}`, si.file, sname);
    if (si.shape.length !== 2 || si.shape[0] !== want[0] || si.shape[1] !== want[1])
      throw new CheckpointError(`scale shape [${si.shape.join(", ")}] is wrong for weight [${R}, ${C}] in 128x128 blocks (needs [${want.join(", ")}])`, si.file, sname);
    fp8.add(name);
  }
  if (fp8.size === 0) throw new ConvertError(`${src.dir} has no FP8 weights: nothing to convert (already BF16?)`);
  const dropped = (name: string) => name.endsWith("_scale_inv") && fp8.has(name.slice(0, -"_scale_inv".length));

  // the output layout: per shard, its tensors in file order, FP8 ones as BF16
  const plan = src.shards.map((s) => {
    const f = src.files.get(s)!;
    const tensors = [...f.tensors.values()].filter((t) => !dropped(t.name)).sort((a, b) => a.offset - b.offset);
    const out = tensors.map((t) => ({ t, dtype: (fp8.has(t.name) ? "BF16" : t.dtype) as DType, nbytes: numel(t.shape) * (fp8.has(t.name) ? 2 : DTYPE_SIZE[t.dtype]) }));
    return { shard: s, file: f, out, bytes: out.reduce((a, o) => a + o.nbytes, 0) };
  });
  const bytesTotal = plan.reduce((a, p) => a + p.bytes, 0);
  let bytesDone = 0;
  const progress = (p: Omit<ConvertProgress, "bytesDone" | "bytesTotal">) => opts.onProgress?.({ ...p, bytesDone, bytesTotal });

  // the work directory: resume it when it holds an earlier run on the same source
  const partial = `${dst}.partial`;
  const fp = fingerprint(src);
  let resumedShards = 0;
  if (existsSync(partial)) {
    const mark = join(partial, MARK);
    const same = existsSync(mark) && readFileSync(mark, "utf8") === fp;
    if (!same) rmSync(partial, { recursive: true, force: true });
  }
  mkdirSync(partial, { recursive: true });
  writeFileSync(join(partial, MARK), fp);
  progress({ phase: "start", message: `converting ${fp8.size} FP8 weights in ${src.shards.length} shard(s)` });

  let tensors = 0;
  for (const p of plan) {
    const outPath = join(partial, p.shard);
    tensors += p.out.length;
    if (existsSync(outPath) && statSync(outPath).size > p.bytes) {
      bytesDone += p.bytes;
      resumedShards++;
      progress({ phase: "skip", file: p.shard, message: `${p.shard}: done by an earlier run` });
      continue;
    }
    const tmp = `${outPath}.tmp`;
    const fd = openSync(tmp, "w");
    try {
      const header: Record<string, unknown> = {};
      if (Object.keys(p.file.metadata).length) header.__metadata__ = p.file.metadata;
      let off = 0;
      for (const o of p.out) {
        header[o.t.name] = { dtype: o.dtype, shape: o.t.shape, data_offsets: [off, off + o.nbytes] };
        off += o.nbytes;
      }
      let json = JSON.stringify(header);
      json += " ".repeat((8 - ((Buffer.byteLength(json) + 8) % 8)) % 8);
      const hb = Buffer.from(json);
      const len = Buffer.alloc(8);
      len.writeBigUInt64LE(BigInt(hb.length));
      writeAll(fd, len);
      writeAll(fd, hb);
      for (const o of p.out) {
        const t = o.t;
        if (fp8.has(t.name)) {
          const [R, C] = t.shape as [number, number];
          const si = info(`${t.name}_scale_inv`);
          const sbuf = new Uint8Array(si.nbytes);
          src.files.get(src.where.get(si.name)!)!.readInto(si.offset, si.nbytes, sbuf);
          const scale = si.dtype === "F32" ? new Float32Array(sbuf.buffer, 0, sbuf.length / 4) : bf16ToF32(sbuf);
          // 128-row bands: one scale row each, bounded memory
          const band = Math.max(128, Math.floor(CHUNK / 2 / C / 128) * 128);
          const buf = new Uint8Array(Math.min(R, band) * C);
          for (let r = 0; r < R; r += band) {
            const n = Math.min(band, R - r);
            p.file.readInto(t.offset + r * C, n * C, buf);
            const y = dequantFp8ToBf16(buf.subarray(0, n * C), n, C, scale, r);
            writeAll(fd, new Uint8Array(y.buffer, 0, y.byteLength));
            bytesDone += y.byteLength;
            progress({ phase: "tensor", file: p.shard, tensor: t.name });
          }
        } else {
          const buf = new Uint8Array(Math.min(CHUNK, t.nbytes));
          for (let b = 0; b < t.nbytes; b += CHUNK) {
            const n = Math.min(CHUNK, t.nbytes - b);
            p.file.readInto(t.offset + b, n, buf);
            writeAll(fd, buf.subarray(0, n));
            bytesDone += n;
          }
          progress({ phase: "tensor", file: p.shard, tensor: t.name });
        }
      }
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    renameSync(tmp, outPath);
  }

  // the index, config.json, and every other file
  if (src.index) {
    const wm: Record<string, string> = {};
    for (const [name, s] of Object.entries(src.index.weight_map)) if (!dropped(name)) wm[name] = s;
    writeJson(join(partial, INDEX), { ...src.index, metadata: { ...src.index.metadata, total_size: bytesTotal }, weight_map: wm });
  }
  const cfgPath = join(src.dir, "config.json");
  let cfg: Record<string, unknown>;
  try {
    cfg = JSON.parse(readFileSync(cfgPath, "utf8"));
  } catch (e) {
    throw new ConvertError(`${cfgPath}: not valid JSON (${(e as Error).message})`);
  }
  delete cfg.quantization_config;
  writeJson(join(partial, "config.json"), cfg);
  progress({ phase: "files", message: "copying the other files" });
  const skip = new Set([...src.shards, INDEX, "config.json"]);
  for (const name of readdirSync(src.dir)) {
    if (skip.has(name)) continue;
    cpSync(join(src.dir, name), join(partial, name), { recursive: true });
  }
  rmSync(join(partial, MARK), { force: true });
  if (existsSync(dst)) rmdirSync(dst); // an empty directory (checked above)
  renameSync(partial, dst);
  progress({ phase: "done", message: `wrote ${basename(dst)}` });
  return { dir: dst, tensors, converted: fp8.size, dropped: fp8.size, bytes: bytesTotal, resumedShards };
}

function bf16ToF32(b: Uint8Array): Float32Array {
  const n = b.length / 2;
  const out = new Float32Array(n);
  const u = new Uint32Array(out.buffer);
  for (let i = 0; i < n; i++) u[i] = (b[2 * i]! | (b[2 * i + 1]! << 8)) << 16;
  return out;
}

function writeJson(path: string, v: unknown): void {
  writeFileSync(path, JSON.stringify(v, null, 2) + "\n");
}

function writeAll(fd: number, b: Uint8Array): void {
  let done = 0;
  while (done < b.length) done += writeSync(fd, b, done, Math.min(b.length - done, 1 << 26));
}
