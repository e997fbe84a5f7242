// Per-token bytes for a byte-level BPE vocabulary (DeepSeek-V3's), built once per tokenizer:
// exact streaming detokenization (a TextDecoder over the bytes never splits a character),
// OpenAI `logprobs` token strings and `bytes`, and the JSON constraint, which runs over bytes.
import type { Tokenizer } from "@ds3/core";

export interface TokenTable {
  readonly size: number;
  /** UTF-8 bytes each id contributes to the output text (empty: special or textless) */
  readonly bytes: Uint8Array[];
  /** ids dropped from the text (BOS, EOS, pad, …): special tokens as the tokenizer marks them */
  readonly special: Uint8Array;
  /** ids with no token at all (embedding rows past the tokenizer's vocabulary) */
  readonly textless: Uint8Array;
  /** the token's own display string (for logprobs): its text, or its content for special tokens */
  tokenString(id: number): string;
  /** the id of a literal token, if the vocabulary has it */
  idOf(token: string): number | undefined;
}

/** GPT-2's byte-level alphabet: the printable bytes stand for themselves, the rest map above U+0100. */
function byteDecoder(): Map<number, number> {
  const bs: number[] = [];
  for (let b = 33; b <= 126; b++) bs.push(b);
  for (let b = 161; b <= 172; b++) bs.push(b);
  for (let b = 174; b <= 255; b++) bs.push(b);
  const cs = [...bs];
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (!bs.includes(b)) {
      bs.push(b);
      cs.push(256 + n++);
    }
  }
  const m = new Map<number, number>();
  bs.forEach((b, i) => m.set(cs[i]!, b));
  return m;
}

const cache = new WeakMap<Tokenizer, TokenTable>();
const utf8 = new TextEncoder();
const lossy = new TextDecoder("utf-8", { fatal: false });

export function tokenTable(tok: Tokenizer, size: number): TokenTable {
  const hit = cache.get(tok);
  if (hit && hit.size === size) return hit;
  const dec = byteDecoder();
  const bytes: Uint8Array[] = new Array(size);
  const special = new Uint8Array(size);
  const textless = new Uint8Array(size);
  const names: (string | undefined)[] = new Array(size);
  const EMPTY = new Uint8Array(0);
  const toBytes = (s: string): Uint8Array | null => {
    const out = new Uint8Array(s.length);
    let i = 0;
    for (const ch of s) {
      const b = dec.get(ch.codePointAt(0)!);
      if (b === undefined) return null;
      out[i++] = b;
    }
    return out.subarray(0, i);
  };
  for (let id = 0; id < size; id++) {
    const t = tok.idToToken(id);
    if (t === undefined) {
      textless[id] = 1;
      bytes[id] = EMPTY;
      continue;
    }
    names[id] = t;
    const b = toBytes(t);
    // an added token (its content is not in the byte alphabet) or a token that looks like markup:
    // ask the tokenizer whether it is special (dropped from text) and what text it has
    if (b === null || (t.startsWith("<") && t.endsWith(">") && t.length > 2)) {
      const text = tok.decode([id], { skipSpecial: true });
      if (text === "") {
        special[id] = 1;
        bytes[id] = EMPTY;
      } else bytes[id] = b ?? utf8.encode(text);
      continue;
    }
    bytes[id] = b;
  }
  // the byte mapping must agree with the tokenizer's own decoding; otherwise fall back to it
  let agrees = true;
  for (let id = 0, checked = 0; id < size && checked < 400; id += 331) {
    if (textless[id] || special[id]) continue;
    checked++;
    const want = tok.decode([id]);
    const got = lossy.decode(bytes[id]!);
    if (want !== got && !want.includes("\uFFFD")) {
      agrees = false;
      break;
    }
  }
  if (!agrees) for (let id = 0; id < size; id++) if (!textless[id] && !special[id]) bytes[id] = utf8.encode(tok.decode([id]));
  const table: TokenTable = {
    size,
    bytes,
    special,
    textless,
    tokenString(id) {
      if (id < 0 || id >= size || textless[id]) return `token_id:${id}`;
      if (special[id]) return names[id] ?? `token_id:${id}`;
      return lossy.decode(bytes[id]!);
    },
    idOf(token) {
      return tok.tokenToId(token);
    },
  };
  cache.set(tok, table);
  return table;
}

/** Incremental detokenizer over token bytes: never emits half a character. */
export class ByteStreamDecoder {
  private readonly dec = new TextDecoder("utf-8", { fatal: false });
  constructor(private readonly table: TokenTable) {}
  push(id: number): string {
    const b = this.table.bytes[id];
    if (!b || b.length === 0) return "";
    return this.dec.decode(b, { stream: true });
  }
  flush(): string {
    return this.dec.decode();
  }
}
