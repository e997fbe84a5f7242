// Load-time checks of a checkpoint against its config, beyond shapes (those are in WeightLoader):
// non-finite values in the small vectors that steer the model (norms, router biases, FP8 block
// scales), and checkpoint tensors the model never reads (a sign that the config does not
// describe the checkpoint: e.g. a missing routing field whose default drops a tensor).
import type { BackendContext, HostWeight } from "./backend.js";
import type { ModelConfig } from "./config.js";
import { Transformer, type WeightSource } from "./model.js";
import { Checkpoint, CheckpointError, type DType } from "./safetensors.js";

/** Index of the first NaN or infinity in `data` (raw little-endian bytes of `dtype`), or -1. */
export function firstNonFinite(data: Uint8Array, dtype: DType): number {
  const dv = new DataView(data.buffer, data.byteOffset, data.byteLength);
  if (dtype === "F32") {
    for (let i = 0; i < data.length >> 2; i++) if ((dv.getUint32(i * 4, true) & 0x7f800000) === 0x7f800000) return i;
  } else if (dtype === "BF16") {
    for (let i = 0; i < data.length >> 1; i++) if ((dv.getUint16(i * 2, true) & 0x7f80) === 0x7f80) return i;
  } else if (dtype === "F16") {
    for (let i = 0; i < data.length >> 1; i++) if ((dv.getUint16(i * 2, true) & 0x7c00) === 0x7c00) return i;
  } else if (dtype === "F8_E4M3") {
    for (let i = 0; i < data.length; i++) if ((data[i]! & 0x7f) === 0x7f) return i; // e4m3fn: NaN only
  }
  return -1;
}

function describeValue(data: Uint8Array | Float32Array, dtype: DType, i: number): string {
  if (data instanceof Float32Array) return String(data[i]);
  const dv = new DataView(data.buffer, data.byteOffset, data.byteLength);
  if (dtype === "F32") return String(dv.getFloat32(i * 4, true));
  const bits = dtype === "F8_E4M3" ? data[i]! : dv.getUint16(i * 2, true);
  const mant = dtype === "BF16" ? bits & 0x7f : dtype === "F16" ? bits & 0x3ff : 1;
  return mant ? "NaN" : bits & (dtype === "BF16" || dtype === "F16" ? 0x8000 : 0x80) ? "-Infinity" : "Infinity";
}

/**
 * Throws if a small vector (a norm weight, a router bias) or an FP8 block scale holds a NaN or an
 * infinity: one such value silently changes routing or poisons every output.
 */
export function checkFinite(data: Uint8Array | Float32Array, dtype: DType, file: string, tensor: string, what = "value"): void {
  let i = -1;
  if (data instanceof Float32Array) {
    for (let k = 0; k < data.length; k++)
      if (!Number.isFinite(data[k]!)) {
        i = k;
        break;
      }
  } else i = firstNonFinite(data, dtype);
  if (i < 0) return;
  const n = data instanceof Float32Array ? data.length : data.length / (dtype === "F32" ? 4 : dtype === "F8_E4M3" ? 1 : 2);
  throw new CheckpointError(`non-finite ${what} ${describeValue(data, dtype, i)} at element ${i} of ${n}`, file, tensor);
}

/**
 * A source that records which tensors the model asks for, without reading any: building the
 * Transformer over it lists exactly what model.ts reads for this config.
 */
class RecordingSource implements WeightSource {
  readonly read = new Set<string>();
  constructor(private ck: Checkpoint) {}
  has(name: string): boolean {
    return this.ck.has(name);
  }
  host(name: string, shape: [number, number] | [number]): HostWeight {
    this.read.add(name);
    if (this.ck.has(`${name}_scale_inv`)) this.read.add(`${name}_scale_inv`);
    return { name, dtype: "f32", shape: shape.length === 1 ? [1, shape[0]] : shape, data: new Uint8Array(0) };
  }
  vector(name: string, n: number): Float32Array {
    this.read.add(name);
    return new Float32Array(n);
  }
}

/** The checkpoint tensors that the model (with its MTP block, when the config has one) never reads. */
export function unusedTensors(ck: Checkpoint, cfg: ModelConfig): string[] {
  const src = new RecordingSource(ck);
  const ctx = { weight: (w: HostWeight) => w, expertSet: (first: number, experts: unknown[]) => ({ first, experts }) } as unknown as BackendContext;
  new Transformer(ctx, src, cfg, { mtp: cfg.nMtpLayers > 0 });
  return ck.names().filter((n) => !src.read.has(n));
}

/** The names, grouped by their pattern with layer and expert numbers as `*` ("model.layers.*.x (3 tensors)"). */
export function summarizeNames(names: string[]): string {
  const groups = new Map<string, string[]>();
  for (const n of names) {
    const p = n.replace(/\.\d+(?=\.|$)/g, ".*");
    const g = groups.get(p);
    if (g) g.push(n);
    else groups.set(p, [n]);
  }
  return [...groups.entries()].map(([p, g]) => (g.length === 1 ? `"${g[0]}"` : `"${p}" (${g.length} tensors)`)).join(", ");
}

/** How a load reports a warning: the callback given, else process.emitWarning (visible on stderr). */
export type WarningSink = (message: string) => void;

export function emitWarning(message: string, sink?: WarningSink, code = "DS3_CHECKPOINT"): void {
  if (sink) sink(message);
  else process.emitWarning(message, { type: "DS3Warning", code });
}

/** Warn (one warning) about every checkpoint tensor the model never reads; returns their names. */
export function warnUnusedTensors(dir: string, cfg: ModelConfig, sink?: WarningSink): string[] {
  const ck = Checkpoint.open(dir);
  try {
    const unused = unusedTensors(ck, cfg);
    if (unused.length)
      emitWarning(
        `${dir}: ${unused.length} checkpoint tensor(s) that the model never reads with this config.json (does the config describe this checkpoint?): ${summarizeNames(unused)}`,
        sink,
        "DS3_UNUSED_TENSORS",
      );
    return unused;
  } finally {
    ck.close();
  }
}
