// Lazy safetensors reader: single file or sharded via model.safetensors.index.json.
// Nothing is read until a tensor (or a slice of one) is asked for; every read is a
// positioned read of just those bytes, in chunks well under Node's 2 GiB limit.
import { closeSync, existsSync, fstatSync, openSync, readdirSync, readFileSync, readSync, statSync } from "node:fs";
import { join } from "node:path";

export type DType = "F8_E4M3" | "BF16" | "F16" | "F32" | "I32" | "I64";
export const DTYPE_SIZE: Record<DType, number> = { F8_E4M3: 1, BF16: 2, F16: 2, F32: 4, I32: 4, I64: 8 };

export class CheckpointError extends Error {
  constructor(
    message: string,
    readonly file?: string,
    readonly tensor?: string,
  ) {
    super(`${file ? `${file}` : ""}${tensor ? `${file ? ", " : ""}tensor "${tensor}"` : ""}${file || tensor ? ": " : ""}${message}`);
    this.name = "CheckpointError";
  }
}

export interface TensorInfo {
  name: string;
  dtype: DType;
  shape: number[];
  /** absolute byte offset in the file */
  offset: number;
  nbytes: number;
  file: string;
}

const MAX_HEADER = 100 * 1024 * 1024;
const READ_CHUNK = 64 * 1024 * 1024;

export class SafetensorsFile {
  readonly tensors = new Map<string, TensorInfo>();
  readonly metadata: Record<string, string> = {};
  private fd: number;

  constructor(readonly path: string) {
    if (!existsSync(path)) throw new CheckpointError("file not found", path);
    this.fd = openSync(path, "r");
    try {
      const size = fstatSync(this.fd).size;
      if (size < 8) throw new CheckpointError(`truncated: ${size} bytes, shorter than the 8-byte header length`, path);
      const lenBuf = Buffer.alloc(8);
      readSync(this.fd, lenBuf, 0, 8, 0);
      const hlen = Number(lenBuf.readBigUInt64LE(0));
      if (hlen > MAX_HEADER) throw new CheckpointError(`header length ${hlen} is implausible (over ${MAX_HEADER} bytes)`, path);
      if (8 + hlen > size) throw new CheckpointError(`header length ${hlen} runs past the end of the file (${size} bytes)`, path);
      const hbuf = Buffer.alloc(hlen);
      readSync(this.fd, hbuf, 0, hlen, 8);
      let text: string;
      try {
        text = new TextDecoder("utf-8", { fatal: true }).decode(hbuf);
      } catch {
        throw new CheckpointError("header is not valid UTF-8", path);
      }
      let header: Record<string, unknown>;
      try {
        header = JSON.parse(text) as Record<string, unknown>;
      } catch (e) {
        throw new CheckpointError(`header is not valid JSON (${(e as Error).message})`, path);
      }
      if (typeof header !== "object" || header === null || Array.isArray(header)) throw new CheckpointError("header is not a JSON object", path);
      // safetensors' own rules: the header starts with "{" (only trailing padding is allowed), and
      // a key given twice is an error (JSON.parse would silently keep the last one)
      if (hbuf[0] !== 0x7b) throw new CheckpointError(`header must start with "{" (it starts with ${JSON.stringify(text.slice(0, 1))})`, path);
      const dup = duplicateKey(text);
      if (dup) throw new CheckpointError(dup.parent === undefined ? `duplicate key in the header` : `duplicate key "${dup.key}" in the header entry`, path, dup.parent ?? dup.key);
      const dataStart = 8 + hlen;
      const dataLen = size - dataStart;
      const spans: Array<[number, number, string]> = [];
      for (const [tname, v] of Object.entries(header)) {
        if (tname === "__metadata__") {
          if (v === null) continue;
          if (typeof v !== "object" || Array.isArray(v) || !Object.values(v).every((x) => typeof x === "string"))
            throw new CheckpointError(`__metadata__ must map strings to strings, got ${JSON.stringify(v).slice(0, 200)}`, path);
          Object.assign(this.metadata, v);
          continue;
        }
        const t = v as { dtype?: unknown; shape?: unknown; data_offsets?: unknown };
        if (!t || typeof t !== "object") throw new CheckpointError("header entry is not an object", path, tname);
        for (const k of ["dtype", "shape", "data_offsets"] as const) if (t[k] === undefined) throw new CheckpointError(`header entry has no "${k}"`, path, tname);
        if (typeof t.dtype !== "string" || !Object.hasOwn(DTYPE_SIZE, t.dtype))
          throw new CheckpointError(`unknown dtype ${JSON.stringify(t.dtype)} (supported: ${Object.keys(DTYPE_SIZE).join(", ")})`, path, tname);
        const dtype = t.dtype as DType;
        if (!Array.isArray(t.shape) || !t.shape.every((d) => Number.isSafeInteger(d) && d >= 0))
          throw new CheckpointError(`bad shape ${JSON.stringify(t.shape)}`, path, tname);
        const shape = t.shape as number[];
        const offs = t.data_offsets;
        if (!Array.isArray(offs) || offs.length !== 2 || !offs.every((d) => Number.isSafeInteger(d) && d >= 0))
          throw new CheckpointError(`bad data_offsets ${JSON.stringify(offs)}`, path, tname);
        const [b, e] = offs as [number, number];
        if (e < b) throw new CheckpointError(`data_offsets [${b}, ${e}] end before they begin`, path, tname);
        const want = shape.reduce((a, d) => a * d, 1) * DTYPE_SIZE[dtype];
        if (e - b !== want)
          throw new CheckpointError(`data_offsets span ${e - b} bytes but ${dtype} x [${shape.join(", ")}] needs ${want}`, path, tname);
        if (e > dataLen && b >= dataLen && e > b)
          throw new CheckpointError(`data_offsets [${b}, ${e}] are out of bounds: the data section holds only ${dataLen} bytes`, path, tname);
        if (e > dataLen)
          throw new CheckpointError(`truncated: data_offsets [${b}, ${e}] run past the end of the data (${dataLen} bytes): the file is truncated or the header lies`, path, tname);
        spans.push([b, e, tname]);
        this.tensors.set(tname, { name: tname, dtype, shape, offset: dataStart + b, nbytes: e - b, file: path });
      }
      checkTiling(spans, dataLen, path);
    } catch (e) {
      closeSync(this.fd);
      throw e;
    }
  }

  /** Read `len` bytes at absolute offset `pos` into `dst` at `dstOff`. */
  readInto(pos: number, len: number, dst: Uint8Array, dstOff = 0): void {
    let done = 0;
    while (done < len) {
      const n = Math.min(READ_CHUNK, len - done);
      const got = readSync(this.fd, dst, dstOff + done, n, pos + done);
      if (got <= 0) throw new CheckpointError(`unexpected end of file reading ${len} bytes at ${pos}`, this.path);
      done += got;
    }
  }

  close(): void {
    closeSync(this.fd);
  }
}

/** A host-side tensor read from a checkpoint (raw bytes in the stored dtype). */
export interface HostTensor {
  name: string;
  dtype: DType;
  shape: number[];
  data: Uint8Array;
}

/** A 2-D slice: rows [r0, r1), cols [c0, c1) of a tensor. */
export interface Slice2D {
  rows?: [number, number];
  cols?: [number, number];
}

export class Checkpoint {
  private files = new Map<string, SafetensorsFile>();
  private where = new Map<string, string>();

  private constructor(readonly dir: string) {}

  /** Open a checkpoint directory (sharded with model.safetensors.index.json, or single files). */
  static open(dir: string): Checkpoint {
    if (!existsSync(dir) || !statSync(dir).isDirectory()) throw new CheckpointError(`model directory not found: ${dir}`);
    const ck = new Checkpoint(dir);
    // a failure part way closes the shards already opened: the process stays up and leaks nothing
    try {
      const indexPath = join(dir, "model.safetensors.index.json");
      if (existsSync(indexPath)) {
        let index: { weight_map?: Record<string, string> };
        const text = readFileSync(indexPath, "utf8");
        try {
          index = JSON.parse(text) as typeof index;
        } catch (e) {
          throw new CheckpointError(`not valid JSON (${(e as Error).message})`, indexPath);
        }
        // a tensor listed twice: JSON.parse would keep the last shard named, silently
        const dup = duplicateKey(text);
        if (dup) throw new CheckpointError(`duplicate key "${dup.key}" in model.safetensors.index.json`, indexPath);
        if (!index || typeof index !== "object" || !index.weight_map || typeof index.weight_map !== "object") throw new CheckpointError(`has no "weight_map"`, indexPath);
        if (Array.isArray(index.weight_map)) throw new CheckpointError(`"weight_map" must be an object of tensor name -> shard file`, indexPath);
        // a shard is a plain file name inside the model directory: never "", ".", "..", a path or a directory
        for (const [t, s] of Object.entries(index.weight_map as Record<string, unknown>))
          if (typeof s !== "string" || s === "" || s === "." || s === ".." || /[/\\\0]/.test(s))
            throw new CheckpointError(`weight_map entry "${t}": shard ${JSON.stringify(s)} is not a plain file name inside the model directory`, indexPath);
        const shards = new Set(Object.values(index.weight_map));
        for (const s of shards) {
          const p = join(dir, s);
          if (existsSync(p) && !statSync(p).isFile()) {
            const t = Object.keys(index.weight_map).find((k) => index.weight_map![k] === s);
            throw new CheckpointError(`weight_map entry "${t}": shard "${s}" is a directory, not a file`, indexPath);
          }
          if (!existsSync(p)) {
            const held = Object.keys(index.weight_map).filter((t) => index.weight_map![t] === s);
            throw new CheckpointError(`missing shard "${s}" named by model.safetensors.index.json (it should hold ${held.length} tensor(s), e.g. "${held[0]}")`, p);
          }
          ck.files.set(s, new SafetensorsFile(p));
        }
        for (const [t, s] of Object.entries(index.weight_map)) {
          const f = ck.files.get(s)!;
          if (!f.tensors.has(t)) throw new CheckpointError(`the index places tensor "${t}" in this shard, but the shard does not hold it`, f.path, t);
          ck.where.set(t, s);
        }
      } else {
        const st = readdirSync(dir).filter((f: string) => f.endsWith(".safetensors")).sort();
        if (st.length === 0) throw new CheckpointError(`no model.safetensors.index.json and no *.safetensors files in ${dir}`);
        for (const s of st) {
          const f = new SafetensorsFile(join(dir, s));
          ck.files.set(s, f);
          for (const t of f.tensors.keys()) {
            if (ck.where.has(t)) throw new CheckpointError(`tensor appears in two files ("${ck.where.get(t)}" and "${s}")`, join(dir, s), t);
            ck.where.set(t, s);
          }
        }
      }
    } catch (e) {
      ck.close();
      throw e;
    }
    return ck;
  }

  names(): string[] {
    return [...this.where.keys()];
  }

  has(name: string): boolean {
    return this.where.has(name);
  }

  info(name: string): TensorInfo {
    const s = this.where.get(name);
    if (s === undefined) throw new CheckpointError(`required tensor is missing from the checkpoint`, this.dir, name);
    return this.files.get(s)!.tensors.get(name)!;
  }

  private file(name: string): SafetensorsFile {
    return this.files.get(this.where.get(name)!)!;
  }

  /** Read a whole tensor. */
  read(name: string): HostTensor {
    const ti = this.info(name);
    const data = new Uint8Array(ti.nbytes);
    this.file(name).readInto(ti.offset, ti.nbytes, data);
    return { name, dtype: ti.dtype, shape: [...ti.shape], data };
  }

  /** Read a 2-D slice (rows and/or cols) of a 1-D or 2-D tensor; reads only the bytes it needs. */
  readSlice(name: string, slice: Slice2D): HostTensor {
    const ti = this.info(name);
    const es = DTYPE_SIZE[ti.dtype];
    if (ti.shape.length === 1) {
      const [c0, c1] = slice.cols ?? slice.rows ?? [0, ti.shape[0]!];
      checkRange(ti, 0, c0, c1);
      const data = new Uint8Array((c1 - c0) * es);
      this.file(name).readInto(ti.offset + c0 * es, data.length, data);
      return { name, dtype: ti.dtype, shape: [c1 - c0], data };
    }
    if (ti.shape.length !== 2) throw new CheckpointError(`cannot slice a ${ti.shape.length}-D tensor`, ti.file, name);
    const [R, C] = ti.shape as [number, number];
    const [r0, r1] = slice.rows ?? [0, R];
    const [c0, c1] = slice.cols ?? [0, C];
    checkRange(ti, 0, r0, r1);
    checkRange(ti, 1, c0, c1);
    const rowBytes = C * es;
    const outRow = (c1 - c0) * es;
    const data = new Uint8Array((r1 - r0) * outRow);
    const f = this.file(name);
    if (c0 === 0 && c1 === C) {
      f.readInto(ti.offset + r0 * rowBytes, data.length, data);
    } else {
      // read whole rows in chunks, copy the column window out
      const rowsPerChunk = Math.max(1, Math.floor(READ_CHUNK / rowBytes));
      const buf = new Uint8Array(Math.min(r1 - r0, rowsPerChunk) * rowBytes);
      for (let r = r0; r < r1; r += rowsPerChunk) {
        const n = Math.min(rowsPerChunk, r1 - r);
        f.readInto(ti.offset + r * rowBytes, n * rowBytes, buf);
        for (let i = 0; i < n; i++) data.set(buf.subarray(i * rowBytes + c0 * es, i * rowBytes + c1 * es), (r - r0 + i) * outRow);
      }
    }
    return { name, dtype: ti.dtype, shape: [r1 - r0, c1 - c0], data };
  }

  close(): void {
    for (const f of this.files.values()) f.close();
    this.files.clear();
  }
}

function checkRange(ti: TensorInfo, dim: number, a: number, b: number): void {
  const n = ti.shape[dim]!;
  if (!(Number.isInteger(a) && Number.isInteger(b) && 0 <= a && a < b && b <= n))
    throw new CheckpointError(`slice [${a}, ${b}) of dim ${dim} is outside [0, ${n})`, ti.file, ti.name);
}

/**
 * safetensors' layout rule: the tensors' byte spans, sorted, start at 0, each begins where the
 * previous one ended and the last ends at the end of the file. Anything else (a gap, an overlap,
 * trailing bytes) means the header length or the offsets are wrong, and the data would be read
 * from the wrong place. An empty tensor occupies no bytes: it may sit at any boundary between
 * tensors, not inside one.
 */
function checkTiling(spans: Array<[number, number, string]>, dataLen: number, path: string): void {
  const full = spans.filter((s) => s[1] > s[0]).sort((x, y) => x[0] - y[0] || x[1] - y[1]);
  const bounds = new Set<number>([0]);
  let end = 0;
  let prev: string | undefined;
  for (const [b, e, name] of full) {
    if (b < end) throw new CheckpointError(`data overlaps tensor "${prev}"`, path, name);
    if (b > end)
      throw new CheckpointError(
        `bytes [${end}, ${b}) of the data section belong to no tensor (${prev === undefined ? "the first tensor must start at 0" : `after tensor "${prev}"`}): the header length or data_offsets are wrong`,
        path,
        name,
      );
    end = e;
    prev = name;
    bounds.add(e);
  }
  if (end !== dataLen)
    throw new CheckpointError(
      `${dataLen - end} trailing byte(s) after the last tensor (the data section holds ${dataLen} bytes, the tensors cover ${end}): the header length or data_offsets are wrong, or bytes were appended`,
      path,
      prev,
    );
  for (const [b, e, name] of spans) {
    if (e > b || bounds.has(b)) continue;
    const inside = full.find((s) => s[0] < b && b < s[1])!;
    throw new CheckpointError(`empty tensor at offset ${b} lies inside tensor "${inside[2]}"`, path, name);
  }
}

/**
 * The first key that appears twice in one object of valid JSON `text` (JSON.parse keeps the last
 * silently); `parent` is the top-level key whose entry holds it (undefined at the top level).
 */
function duplicateKey(text: string): { key: string; parent?: string } | null {
  const frames: Array<{ keys: Set<string>; last?: string } | null> = []; // null: an array
  let expectKey = false;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c === 0x22) {
      let j = i + 1;
      while (text.charCodeAt(j) !== 0x22) j += text.charCodeAt(j) === 0x5c ? 2 : 1;
      const top = frames[frames.length - 1];
      if (top && expectKey) {
        const k = JSON.parse(text.slice(i, j + 1)) as string;
        if (top.keys.has(k)) return { key: k, parent: frames.length > 1 ? (frames[0]?.last ?? undefined) : undefined };
        top.keys.add(k);
        top.last = k;
        expectKey = false;
      }
      i = j;
    } else if (c === 0x7b) {
      frames.push({ keys: new Set() });
      expectKey = true;
    } else if (c === 0x5b) {
      frames.push(null);
      expectKey = false;
    } else if (c === 0x7d || c === 0x5d) {
      frames.pop();
      expectKey = false;
    } else if (c === 0x2c) expectKey = frames[frames.length - 1] != null;
  }
  return null;
}

/** Write a safetensors file (used by `ds3 convert`, the built-in model and tests). */
export function encodeSafetensors(tensors: Array<{ name: string; dtype: DType; shape: number[]; data: Uint8Array }>, metadata?: Record<string, string>): Buffer[] {
  const header: Record<string, unknown> = {};
  if (metadata) header.__metadata__ = metadata;
  let off = 0;
  for (const t of tensors) {
    header[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [off, off + t.data.length] };
    off += t.data.length;
  }
  let json = JSON.stringify(header);
  const pad = (8 - ((Buffer.byteLength(json, "utf8") + 8) % 8)) % 8;
  json += " ".repeat(pad);
  const hb = Buffer.from(json, "utf8");
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(hb.length));
  return [len, hb, ...tensors.map((t) => Buffer.from(t.data.buffer, t.data.byteOffset, t.data.length))];
}
