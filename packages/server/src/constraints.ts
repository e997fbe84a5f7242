// Logits processors the server hands to the engine (core's GenerateRequest.logitsProcessor):
// logit_bias and forbidding ids. Structured outputs (JSON, schemas, regex, grammars, tool calls)
// are grammar.ts's, by XGrammar.
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
