// Logits processors the server hands to the engine (core's GenerateRequest.logitsProcessor):
// logit_bias, forbidding ids, JSON mode (json.ts), and the tool-call grammar that
// tool_choice "required" / a named function enforce.
import { type JsonMasker, type JsonState, copyState, initialJsonState, isComplete, stepBytes } from "./json.js";
import type { TokenTable } from "./tokens.js";
import { T } from "./tools.js";

export type Processor = (outputIds: readonly number[], logits: Float32Array) => void;

export function compose(ps: Processor[]): Processor | undefined {
  if (ps.length === 0) return undefined;
  if (ps.length === 1) return ps[0];
  return (ids, logits) => {
    for (const p of ps) p(ids, logits);
  };
}

export function logitBias(bias: Map<number, number>): Processor {
  const entries = [...bias];
  return (_ids, logits) => {
    for (const [id, b] of entries) if (id < logits.length) logits[id] = logits[id]! + b;
  };
}

export function forbid(ids: number[]): Processor {
  return (_ids, logits) => {
    for (const id of ids) if (id >= 0 && id < logits.length) logits[id] = -Infinity;
  };
}

/** Applies an allowed-mask; never leaves every id at -Infinity. */
export function applyMask(m: Uint8Array, logits: Float32Array): void {
  let any = false;
  for (let i = 0; i < logits.length; i++) {
    if (!m[i]) logits[i] = -Infinity;
    else if (logits[i]! > -Infinity) any = true;
  }
  if (!any) {
    const first = m.indexOf(1);
    if (first >= 0) logits[first] = 0;
  }
}

const enc = new TextEncoder();

interface Markers {
  callsBegin: number;
  callsEnd: number;
  callBegin: number;
  callEnd: number;
  sep: number;
}

export function toolMarkers(table: TokenTable): Markers | null {
  const ids = {
    callsBegin: table.idOf(T.callsBegin),
    callsEnd: table.idOf(T.callsEnd),
    callBegin: table.idOf(T.callBegin),
    callEnd: table.idOf(T.callEnd),
    sep: table.idOf(T.sep),
  };
  if (Object.values(ids).some((x) => x === undefined)) return null;
  return ids as Markers;
}

const enum S {
  CallsBegin,
  CallBegin,
  Type, // "function"
  Sep,
  Name, // NAME + "\n```json\n"
  Args, // a JSON object
  Fence, // "\n```"
  CallEnd,
  AfterCall, // another call, or the end of the calls
  Eos,
}

/**
 * The tool-call grammar: the output must be one (or, with parallel calls, several) well-formed
 * DeepSeek-V3 tool calls to the given functions, with JSON-object arguments, then EOS.
 * Masks are cached per grammar state; the JSON part reuses the JSON masker.
 */
export class ToolCallGrammar {
  private readonly masks = new Map<string, Uint8Array>();
  constructor(
    readonly table: TokenTable,
    readonly markers: Markers,
    readonly json: JsonMasker,
    readonly eosIds: readonly number[],
  ) {}

  processor(names: string[], parallel: boolean): Processor {
    const nameAlts = names.map((n) => enc.encode(`${n}\n\`\`\`json\n`));
    const typeLit = [enc.encode("function")];
    const fenceLit = [enc.encode("\n```")];
    let stage = S.CallsBegin;
    let alts: Uint8Array[] = [];
    let pos = 0;
    const js: JsonState = initialJsonState();
    let seen = 0;
    let broken = false;
    const m = this.markers;
    const enterLit = (s: S, a: Uint8Array[]) => {
      stage = s;
      alts = a;
      pos = 0;
    };
    const advance = (id: number) => {
      const b = this.table.bytes[id]!;
      switch (stage) {
        case S.CallsBegin:
          if (id !== m.callsBegin) return false;
          stage = S.CallBegin;
          return true;
        case S.CallBegin:
          if (id !== m.callBegin) return false;
          enterLit(S.Type, typeLit);
          return true;
        case S.Sep:
          if (id !== m.sep) return false;
          enterLit(S.Name, nameAlts);
          return true;
        case S.Type:
        case S.Name:
        case S.Fence: {
          if (b.length === 0) return false;
          alts = alts.filter((a) => startsWithAt(a, pos, b));
          if (alts.length === 0) return false;
          pos += b.length;
          const done = alts.find((a) => a.length === pos);
          if (done) {
            if (stage === S.Type) stage = S.Sep;
            else if (stage === S.Name) {
              stage = S.Args;
              copyState(initialJsonState(), js);
            } else stage = S.CallEnd;
          }
          return true;
        }
        case S.Args:
          if (b.length === 0 || !stepBytes(js, b)) return false;
          if (isComplete(js)) enterLit(S.Fence, fenceLit);
          return true;
        case S.CallEnd:
          if (id !== m.callEnd) return false;
          stage = S.AfterCall;
          return true;
        case S.AfterCall:
          if (id === m.callsEnd) {
            stage = S.Eos;
            return true;
          }
          if (parallel && id === m.callBegin) {
            enterLit(S.Type, typeLit);
            return true;
          }
          return false;
        case S.Eos:
          return true;
      }
      return false;
    };
    return (outputIds, logits) => {
      try {
        while (seen < outputIds.length) {
          if (!broken && !advance(outputIds[seen]!)) broken = true;
          seen++;
        }
        if (broken) return;
        let mask: Uint8Array;
        switch (stage) {
          case S.CallsBegin:
            mask = this.single(m.callsBegin);
            break;
          case S.CallBegin:
            mask = this.single(m.callBegin);
            break;
          case S.Sep:
            mask = this.single(m.sep);
            break;
          case S.CallEnd:
            mask = this.single(m.callEnd);
            break;
          case S.AfterCall:
            mask = parallel ? this.ids([m.callsEnd, m.callBegin]) : this.single(m.callsEnd);
            break;
          case S.Eos:
            mask = this.ids([...this.eosIds]);
            break;
          case S.Args:
            mask = this.json.mask(js);
            break;
          default:
            mask = this.literal(alts, pos);
        }
        applyMask(mask, logits);
      } catch {
        // never throw inside the engine's step
      }
    };
  }

  private single(id: number): Uint8Array {
    return this.ids([id]);
  }

  private ids(ids: number[]): Uint8Array {
    const key = `ids:${ids.join(",")}`;
    let mask = this.masks.get(key);
    if (!mask) {
      mask = new Uint8Array(this.table.size);
      for (const id of ids) mask[id] = 1;
      this.remember(key, mask);
    }
    return mask;
  }

  private literal(alts: Uint8Array[], pos: number): Uint8Array {
    const key = `lit:${pos}:${alts.map((a) => new TextDecoder().decode(a)).join("\u0000")}`;
    let mask = this.masks.get(key);
    if (mask) return mask;
    mask = new Uint8Array(this.table.size);
    const { bytes, size } = this.table;
    for (let id = 0; id < size; id++) {
      const b = bytes[id]!;
      if (b.length === 0) continue;
      for (const a of alts)
        if (startsWithAt(a, pos, b)) {
          mask[id] = 1;
          break;
        }
    }
    this.remember(key, mask);
    return mask;
  }

  private remember(key: string, mask: Uint8Array): void {
    this.masks.set(key, mask);
    if (this.masks.size > 512) this.masks.delete(this.masks.keys().next().value!);
  }
}

/** Whether a[pos..] starts with b (b no longer than what is left of a). */
function startsWithAt(a: Uint8Array, pos: number, b: Uint8Array): boolean {
  if (pos + b.length > a.length) return false;
  for (let i = 0; i < b.length; i++) if (a[pos + i] !== b[i]) return false;
  return true;
}
