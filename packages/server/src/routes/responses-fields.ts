// Field checks shared by the Responses and Messages parsers: every problem is a 400 naming the
// field (as `param`), and a field the route does not implement is a 400 too, never ignored.
import { invalid } from "../errors.js";

export type Obj = Record<string, unknown>;

export const kind = (v: unknown): string => (v === null ? "null" : Array.isArray(v) ? "array" : typeof v);
export const show = (v: unknown): string => {
  const s = JSON.stringify(v);
  return s === undefined ? String(v) : s.length > 60 ? `${s.slice(0, 57)}...` : s;
};

export function isObj(v: unknown): v is Obj {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/** `null` and absent mean "not given" */
export function num(o: Obj, key: string, lo: number, hi: number, param: string, int = false): number | undefined {
  const v = o[key];
  if (v == null) return undefined;
  const want = `${int ? "an integer" : "a number"} in [${lo}, ${hi === Number.MAX_SAFE_INTEGER ? "inf)" : `${hi}]`}`;
  if (typeof v !== "number" || !Number.isFinite(v) || (int && !Number.isSafeInteger(v)) || v < lo || v > hi)
    throw invalid(param, `must be ${want}, got ${kind(v)} ${show(v)}`);
  return v;
}

export function bool(o: Obj, key: string, param: string): boolean | undefined {
  const v = o[key];
  if (v == null) return undefined;
  if (typeof v !== "boolean") throw invalid(param, `must be a boolean, got ${kind(v)} ${show(v)}`);
  return v;
}

export function str(o: Obj, key: string, param: string): string | undefined {
  const v = o[key];
  if (v == null) return undefined;
  if (typeof v !== "string") throw invalid(param, `must be a string, got ${kind(v)} ${show(v)}`);
  return v;
}

export function obj(o: Obj, key: string, param: string): Obj | undefined {
  const v = o[key];
  if (v == null) return undefined;
  if (!isObj(v)) throw invalid(param, `must be an object, got ${kind(v)}`);
  return v;
}

export function arr(o: Obj, key: string, param: string): unknown[] | undefined {
  const v = o[key];
  if (v == null) return undefined;
  if (!Array.isArray(v)) throw invalid(param, `must be an array, got ${kind(v)}`);
  return v;
}

/** Fields of `o` outside `known` (and not null) are a 400: the route does not implement them. */
export function onlyKnown(o: Obj, known: ReadonlySet<string>, prefix: string, what: string): void {
  for (const [k, v] of Object.entries(o)) {
    if (v === null || v === undefined || known.has(k)) continue;
    const p = prefix ? `${prefix}.${k}` : k;
    throw invalid(p, `is not supported by ${what}`, "unsupported_parameter");
  }
}

/** A tool name as the tool-call format and the grammar accept it. */
export function toolName(v: unknown, param: string): string {
  if (typeof v !== "string" || !/^[A-Za-z0-9_.-]{1,64}$/.test(v)) throw invalid(param, `must be 1-64 characters of a-z, A-Z, 0-9, _, . or -; got ${show(v)}`);
  return v;
}
