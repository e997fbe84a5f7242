// `response_format: {type: "json_object"}` by constrained decoding: a byte-level state machine
// that accepts exactly the prefixes of one JSON object (RFC 8259; whitespace between tokens
// bounded), and a per-step mask of the token ids whose bytes keep the output such a prefix.
// EOS is allowed only once the object is complete, and then nothing else is; so an output that
// stops on its own parses, and one cut by max_tokens is a valid JSON prefix.
import type { TokenTable } from "./tokens.js";

const enum M {
  Start, // before the top-level object
  Value, // a value must come (after ':' or ',' in an array)
  ArrFirst, // after '[': a value or ']'
  ObjFirst, // after '{': a key or '}'
  ObjKey, // after ',' in an object: a key
  Colon, // after a key
  After, // after a value in a container: ',' or the closer
  Str, // inside a string
  Num, // inside a number
  Lit, // inside true / false / null
  Done, // the top-level object is complete
}

// number sub-states
const enum N {
  Minus, // after '-': a digit
  Zero, // after a leading 0: '.', 'e', or the end
  Int, // integer digits
  Dot, // after '.': a digit
  Frac, // fraction digits
  E, // after 'e': sign or digit
  ESign, // after the exponent sign: a digit
  Exp, // exponent digits
}

/** Longest run of whitespace bytes allowed between tokens (keeps a noisy model from idling). */
export const MAX_WS = 32;

export interface JsonState {
  mode: M;
  /** open containers, innermost last: 'o' or 'a' */
  stack: string;
  /** string: the key flag; number: the sub-state; literal: chars matched */
  a: number;
  /** string: escape state (0 none, 1 after '\\', 2..5 hex digits left + 1); literal: which */
  b: number;
  /** string: UTF-8 continuation bytes still due */
  u: number;
  /** whitespace bytes in the current run */
  ws: number;
}

const LITS = ["true", "false", "null"];

export function initialJsonState(): JsonState {
  return { mode: M.Start, stack: "", a: 0, b: 0, u: 0, ws: 0 };
}

export function copyState(s: JsonState, into: JsonState = initialJsonState()): JsonState {
  into.mode = s.mode;
  into.stack = s.stack;
  into.a = s.a;
  into.b = s.b;
  into.u = s.u;
  into.ws = s.ws;
  return into;
}

export function isComplete(s: JsonState): boolean {
  return s.mode === M.Done;
}

const isWs = (c: number) => c === 0x20 || c === 0x0a || c === 0x0d || c === 0x09;
const isDigit = (c: number) => c >= 0x30 && c <= 0x39;
const isHex = (c: number) => isDigit(c) || (c >= 0x41 && c <= 0x46) || (c >= 0x61 && c <= 0x66);

function valueDone(s: JsonState): void {
  s.mode = s.stack.length === 0 ? M.Done : M.After;
  s.ws = 0;
}

/** Starts a value at byte c; false if c cannot start one. */
function startValue(s: JsonState, c: number): boolean {
  s.ws = 0;
  switch (c) {
    case 0x7b: // {
      s.stack += "o";
      s.mode = M.ObjFirst;
      return true;
    case 0x5b: // [
      s.stack += "a";
      s.mode = M.ArrFirst;
      return true;
    case 0x22: // "
      s.mode = M.Str;
      s.a = 0;
      s.b = 0;
      s.u = 0;
      return true;
    case 0x2d: // -
      s.mode = M.Num;
      s.a = N.Minus;
      return true;
    case 0x74: // t
    case 0x66: // f
    case 0x6e: // n
      s.mode = M.Lit;
      s.b = c === 0x74 ? 0 : c === 0x66 ? 1 : 2;
      s.a = 1;
      return true;
  }
  if (isDigit(c)) {
    s.mode = M.Num;
    s.a = c === 0x30 ? N.Zero : N.Int;
    return true;
  }
  return false;
}

function close(s: JsonState, c: number): boolean {
  const top = s.stack[s.stack.length - 1];
  if ((c === 0x7d && top !== "o") || (c === 0x5d && top !== "a")) return false;
  s.stack = s.stack.slice(0, -1);
  valueDone(s);
  return true;
}

function ws(s: JsonState): boolean {
  return ++s.ws <= MAX_WS;
}

/** Feeds one byte; false if the output would stop being a JSON-object prefix (s is then undefined). */
export function stepByte(s: JsonState, c: number): boolean {
  switch (s.mode) {
    case M.Start:
      if (isWs(c)) return ws(s);
      if (c !== 0x7b) return false;
      return startValue(s, c);
    case M.Value:
      if (isWs(c)) return ws(s);
      return startValue(s, c);
    case M.ArrFirst:
      if (isWs(c)) return ws(s);
      if (c === 0x5d) return close(s, c);
      return startValue(s, c);
    case M.ObjFirst:
    case M.ObjKey:
      if (isWs(c)) return ws(s);
      if (c === 0x7d && s.mode === M.ObjFirst) return close(s, c);
      if (c !== 0x22) return false;
      s.mode = M.Str;
      s.a = 1;
      s.b = 0;
      s.u = 0;
      s.ws = 0;
      return true;
    case M.Colon:
      if (isWs(c)) return ws(s);
      if (c !== 0x3a) return false;
      s.mode = M.Value;
      s.ws = 0;
      return true;
    case M.After:
      if (isWs(c)) return ws(s);
      if (c === 0x2c) {
        s.mode = s.stack[s.stack.length - 1] === "o" ? M.ObjKey : M.Value;
        s.ws = 0;
        return true;
      }
      if (c === 0x7d || c === 0x5d) return close(s, c);
      return false;
    case M.Str:
      if (s.u > 0) {
        if ((c & 0xc0) !== 0x80) return false;
        s.u--;
        return true;
      }
      if (s.b === 1) {
        // after a backslash
        if (c === 0x75) s.b = 5; // \u: 4 hex digits
        else if (c === 0x22 || c === 0x5c || c === 0x2f || c === 0x62 || c === 0x66 || c === 0x6e || c === 0x72 || c === 0x74) s.b = 0;
        else return false;
        return true;
      }
      if (s.b >= 2) {
        if (!isHex(c)) return false;
        s.b = s.b === 2 ? 0 : s.b - 1;
        return true;
      }
      if (c === 0x22) {
        if (s.a === 1) {
          s.mode = M.Colon;
          s.ws = 0;
        } else valueDone(s);
        return true;
      }
      if (c === 0x5c) {
        s.b = 1;
        return true;
      }
      if (c < 0x20 || c === 0x7f) return false;
      if (c < 0x80) return true;
      // UTF-8 lead byte
      if (c >= 0xc2 && c <= 0xdf) s.u = 1;
      else if (c >= 0xe0 && c <= 0xef) s.u = 2;
      else if (c >= 0xf0 && c <= 0xf4) s.u = 3;
      else return false;
      return true;
    case M.Num: {
      const n = s.a as N;
      if (isDigit(c)) {
        if (n === N.Minus) s.a = c === 0x30 ? N.Zero : N.Int;
        else if (n === N.Zero) return false;
        else if (n === N.Dot) s.a = N.Frac;
        else if (n === N.E || n === N.ESign) s.a = N.Exp;
        return true;
      }
      if (c === 0x2e) {
        if (n !== N.Zero && n !== N.Int) return false;
        s.a = N.Dot;
        return true;
      }
      if (c === 0x65 || c === 0x45) {
        if (n !== N.Zero && n !== N.Int && n !== N.Frac) return false;
        s.a = N.E;
        return true;
      }
      if (c === 0x2b || c === 0x2d) {
        if (n !== N.E) return false;
        s.a = N.ESign;
        return true;
      }
      // the number ends here if it can
      if (n === N.Minus || n === N.Dot || n === N.E || n === N.ESign) return false;
      valueDone(s);
      return stepByte(s, c);
    }
    case M.Lit: {
      const lit = LITS[s.b]!;
      if (c !== lit.charCodeAt(s.a)) return false;
      if (++s.a === lit.length) valueDone(s);
      return true;
    }
    case M.Done:
      return false;
  }
  return false;
}

export function stepBytes(s: JsonState, bytes: Uint8Array): boolean {
  for (let i = 0; i < bytes.length; i++) if (!stepByte(s, bytes[i]!)) return false;
  return true;
}

/** Whether `text` is a prefix of some JSON object (as the constraint sees it). */
export function isJsonObjectPrefix(text: string): boolean {
  return stepBytes(initialJsonState(), new TextEncoder().encode(text));
}

function stateKey(s: JsonState): string {
  return `${s.mode}|${s.stack}|${s.a}|${s.b}|${s.u}|${s.ws}`;
}

/**
 * The allowed-id masks of one vocabulary, cached by machine state (a string's inside looks the
 * same at every step, so most steps hit). Shared by every request on that vocabulary.
 */
export class JsonMasker {
  private readonly masks = new Map<string, Uint8Array>();
  private readonly scratch = initialJsonState();
  constructor(
    readonly table: TokenTable,
    readonly eosIds: readonly number[],
    private readonly maxCached = 256,
  ) {}

  mask(s: JsonState): Uint8Array {
    const key = stateKey(s);
    let m = this.masks.get(key);
    if (m) {
      // refresh LRU position
      this.masks.delete(key);
      this.masks.set(key, m);
      return m;
    }
    const { bytes, size } = this.table;
    m = new Uint8Array(size);
    if (s.mode === M.Done) for (const e of this.eosIds) m[e] = 1;
    else {
      const t = this.scratch;
      for (let id = 0; id < size; id++) {
        const b = bytes[id]!;
        if (b.length === 0) continue;
        copyState(s, t);
        if (stepBytes(t, b)) m[id] = 1;
      }
    }
    this.masks.set(key, m);
    if (this.masks.size > this.maxCached) this.masks.delete(this.masks.keys().next().value!);
    return m;
  }

  /** A logits processor for one request: the state follows the output ids. */
  processor(): { process: (outputIds: readonly number[], logits: Float32Array) => void; state: JsonState } {
    const state = initialJsonState();
    let seen = 0;
    let broken = false;
    const process = (outputIds: readonly number[], logits: Float32Array) => {
      try {
        while (seen < outputIds.length) {
          const b = this.table.bytes[outputIds[seen++]!];
          if (b && b.length && !broken && !stepBytes(state, b)) broken = true;
        }
        if (broken) return; // cannot happen while every sampled token obeys the mask
        const m = this.mask(state);
        let any = false;
        for (let i = 0; i < m.length && i < logits.length; i++) {
          if (!m[i]) logits[i] = -Infinity;
          else if (logits[i]! > -Infinity) any = true;
        }
        if (!any) {
          // nothing allowed has a finite logit (e.g. EOS masked elsewhere): leave one allowed id finite
          const first = m.indexOf(1);
          if (first >= 0) logits[first] = 0;
        }
      } catch {
        // a processor must never throw inside the engine's step
      }
    };
    return { process, state };
  }
}
