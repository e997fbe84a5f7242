// Constrained decoding by XGrammar (the grammar engine vLLM, SGLang and TensorRT-LLM use), through
// its WebAssembly build @mlc-ai/web-xgrammar, on the checkpoint's own vocabulary (TokenTable).
// One engine serves json_object, json_schema (strict or not), regex, choice, EBNF grammars and
// DeepSeek-V3 tool calls whose arguments follow each tool's `parameters` schema.
//
// How it is wired:
// - The package is a UMD bundle inside a "type": "module" package, so Node cannot import it; it is
//   evaluated here as CommonJS (its wasm is inlined, nothing is fetched). Two small source patches
//   expose the wasm module (for synchronous bitmasks: the engine's logits hook is synchronous) and
//   route the engine's fatal messages to us (a bad schema aborts the wasm call; the message names it).
// - Every spec is first parsed in a separate, disposable "checker" instance: a bad schema / regex /
//   grammar aborts that instance only; its message becomes a GrammarError and the instance is
//   replaced. Only specs that parse are compiled against the vocabulary in the main instance.
// - The vocabulary handed to XGrammar is the token table's bytes (byte-level). Ids without text
//   (special tokens, the rows past the tokenizer) are never allowed; EOS ids are the stop tokens.
//   DeepSeek-V3's markup tokens (<｜User｜>, <｜tool▁…｜>, …) are never allowed as text; the five
//   tool-call markers stand for control bytes \x01..\x05 instead, which no JSON text can hold, so a
//   tool-call grammar can ask for the marker token itself (never for its spelling in pieces).
import { readFileSync } from "node:fs";
import NodeModule, { createRequire } from "node:module";
import { dirname } from "node:path";
import type { Processor } from "./constraints.js";
import type { TokenTable } from "./tokens.js";
import { T } from "./tools.js";

export type GrammarSpec =
  | { type: "json_object" }
  | { type: "json_schema"; schema: Record<string, unknown>; strict?: boolean }
  | { type: "regex"; pattern: string }
  | { type: "choice"; choices: string[] }
  | { type: "grammar"; grammar: string } // EBNF as XGrammar accepts it (vLLM structured_outputs.grammar, SGLang ebnf)
  | {
      type: "tool_calls";
      tools: { name: string; parameters?: Record<string, unknown> }[];
      choice: "auto" | "required" | { name: string };
      parallel: boolean;
    };

/** an invalid schema / regex / grammar; the message names what is wrong. Routes answer 400 with it. */
export class GrammarError extends Error {
  override name = "GrammarError";
}

export interface CompiledGrammar {
  /** a fresh matcher for one generated choice: masks logits so the output follows the grammar and,
   *  once the grammar is complete, allows only the end-of-sequence token */
  processor(): Processor;
}

export interface Grammars {
  /** compiled off the request's critical path and cached per spec; rejects with GrammarError */
  compile(spec: GrammarSpec): Promise<CompiledGrammar>;
}

/**
 * JSON under json_object / json_schema is laid out on one line with ", " and ": " (as
 * json.dumps writes it) rather than with any whitespace: a noisy model cannot idle in whitespace,
 * and compiling is far cheaper. Measured on DeepSeek-V3's vocabulary (2-core EPYC), a 20-property
 * schema: 77 ms laid out so, 658 ms with any whitespace, 3.2 s with any whitespace capped at 16.
 */
const JSON_ANY_WHITESPACE = false;
/** Compiled specs kept per vocabulary (least recently used dropped first). */
const CACHE_SIZE = 128;

// ---------------------------------------------------------------------------------------------
// Loading the wasm build

/* eslint-disable @typescript-eslint/no-explicit-any */
interface XG {
  api: any; // the package's exports (Grammar, GrammarCompiler, GrammarMatcher, TokenizerInfo, …)
  binding: any; // the Emscripten module (synchronous calls)
  /** the engine's last fatal message (it prints, then aborts the call) */
  lastError: string[];
  dead: boolean;
}

const PATCHES: [string, string][] = [
  ["binding = await Module();", "binding = await Module(exports.__moduleArg);"],
  ["exports.default = index;", "exports.default = index; exports.__binding = () => binding;"],
];
let source: { file: string; text: string } | null = null;

/** A fresh, independent XGrammar instance (its own wasm memory). */
async function loadInstance(): Promise<XG> {
  if (!source) {
    const require = createRequire(import.meta.url);
    const file = require.resolve("@mlc-ai/web-xgrammar");
    let text = readFileSync(file, "utf8");
    for (const [from, to] of PATCHES) {
      if (text.split(from).length !== 2) throw new Error(`@mlc-ai/web-xgrammar: unexpected build (no unique '${from}'); ds3 needs version 0.1.27`);
      text = text.replace(from, to);
    }
    source = { file, text };
  }
  // Module#_compile (what require() itself runs) rather than a vm script: the bundle uses dynamic
  // import(), which only a real CommonJS module resolves; each call is a fresh instance
  const Mod = NodeModule as any;
  const m = new Mod(source.file);
  m.filename = source.file;
  m.paths = Mod._nodeModulePaths(dirname(source.file));
  const xg: XG = { api: null, binding: null, lastError: [], dead: false };
  m.exports.__moduleArg = {
    print: () => {},
    printErr: (s: string) => {
      xg.lastError.push(s);
      if (xg.lastError.length > 20) xg.lastError.shift();
    },
  };
  m._compile(source.text, source.file);
  xg.api = m.exports;
  (await xg.api.Grammar.builtinJSONGrammar()).dispose(); // initializes the wasm module
  xg.binding = xg.api.__binding();
  return xg;
}

/** The engine's fatal message, without its source location. */
function engineMessage(xg: XG, e: unknown): string {
  const lines = xg.lastError.filter((l) => l.trim() !== "" && !/^Aborted\(/.test(l));
  xg.lastError.length = 0;
  let msg = lines.length ? lines[lines.length - 1]! : e instanceof Error ? e.message : String(e);
  msg = msg.replace(/^\[FATAL\]\s*\S+:\d+:\s*/, "").replace(/^Check failed: \(.*?\) is false:\s*/, "");
  return msg.trim();
}

// ---------------------------------------------------------------------------------------------
// Specs → what XGrammar compiles

const MARKERS = [T.callsBegin, T.callsEnd, T.callBegin, T.callEnd, T.sep] as const;
/** the control byte each tool-call marker token stands for inside XGrammar */
const ALIAS = { callsBegin: "\u0001", callsEnd: "\u0002", callBegin: "\u0003", callEnd: "\u0004", sep: "\u0005" };

type Plan =
  | { kind: "json_schema"; schema: string; strict: boolean }
  | { kind: "ebnf"; grammar: string }
  | { kind: "tag"; tag: string; auto?: boolean };

function isObject(x: unknown): x is Record<string, unknown> {
  return typeof x === "object" && x !== null && !Array.isArray(x);
}

/** An EBNF string literal. */
function ebnfString(s: string): string {
  let out = '"';
  for (const ch of s) {
    const c = ch.codePointAt(0)!;
    if (ch === '"' || ch === "\\") out += `\\${ch}`;
    else if (c < 0x20 || c === 0x7f) out += `\\x${c.toString(16).padStart(2, "0")}`;
    else out += ch;
  }
  return `${out}"`;
}

/** Canonical JSON (sorted keys): the cache key of a spec. */
function canonical(x: unknown): string {
  if (Array.isArray(x)) return `[${x.map(canonical).join(",")}]`;
  if (isObject(x))
    return `{${Object.keys(x)
      .sort()
      .filter((k) => x[k] !== undefined)
      .map((k) => `${JSON.stringify(k)}:${canonical(x[k])}`)
      .join(",")}}`;
  return JSON.stringify(x) ?? "null";
}

function plan(spec: GrammarSpec): Plan {
  switch (spec.type) {
    case "json_object":
      return { kind: "json_schema", schema: '{"type":"object"}', strict: false };
    case "json_schema":
      if (!isObject(spec.schema)) throw new GrammarError("json_schema: the schema must be a JSON object");
      return { kind: "json_schema", schema: JSON.stringify(spec.schema), strict: spec.strict !== false };
    case "regex":
      if (typeof spec.pattern !== "string" || spec.pattern === "") throw new GrammarError("regex: the pattern must be a non-empty string");
      try {
        new RegExp(spec.pattern, "u");
      } catch (e) {
        throw new GrammarError(`regex: ${(e as Error).message}`);
      }
      return { kind: "tag", tag: JSON.stringify({ type: "structural_tag", format: { type: "regex", pattern: spec.pattern } }) };
    case "choice":
      if (!Array.isArray(spec.choices) || spec.choices.length === 0) throw new GrammarError("choice: choices must be a non-empty array of strings");
      if (spec.choices.some((c) => typeof c !== "string")) throw new GrammarError("choice: every choice must be a string");
      return { kind: "ebnf", grammar: `root ::= ${spec.choices.map(ebnfString).join(" | ")}\n` };
    case "grammar":
      if (typeof spec.grammar !== "string" || spec.grammar.trim() === "") throw new GrammarError("grammar: the EBNF grammar must be a non-empty string");
      return { kind: "ebnf", grammar: spec.grammar };
    case "tool_calls":
      return { kind: "tag", tag: toolTag(spec), auto: spec.choice === "auto" };
  }
  throw new GrammarError(`unknown structured output type '${(spec as { type: unknown }).type}'`);
}

/** DeepSeek-V3's tool-call section as a structural tag (after <｜tool▁calls▁begin｜> under `auto`). */
function toolTag(spec: Extract<GrammarSpec, { type: "tool_calls" }>, layout?: Map<string, string>): string {
  if (!Array.isArray(spec.tools) || spec.tools.length === 0) throw new GrammarError("tool_calls: no tools given");
  let tools = spec.tools;
  if (isObject(spec.choice)) {
    const name = spec.choice.name;
    tools = tools.filter((t) => t.name === name);
    if (tools.length === 0) throw new GrammarError(`tool_calls: tool_choice names '${name}', which is not among the tools`);
  }
  const tags = tools.map((t) => {
    if (typeof t.name !== "string" || t.name === "") throw new GrammarError("tool_calls: every tool needs a name");
    if (t.parameters !== undefined && !isObject(t.parameters)) throw new GrammarError(`tool_calls: the parameters of '${t.name}' must be a JSON schema object`);
    return {
      type: "tag",
      begin: `function${ALIAS.sep}${t.name}\n\`\`\`json\n`,
      // arguments laid out as json_schema output is (EBNF from the checker), else any whitespace
      content: layout?.has(t.name)
        ? { type: "grammar", grammar: layout.get(t.name)! }
        : { type: "json_schema", json_schema: t.parameters ?? { type: "object", properties: {} } },
      end: `\n\`\`\`${ALIAS.callEnd}`,
    };
  });
  // <calls-begin> <call-begin> CALL (<call-begin> CALL)* <calls-end>, CALL ending in <call-end>
  const calls = { type: "tags_with_separator", tags, separator: ALIAS.callBegin, at_least_one: true, stop_after_first: !spec.parallel || isObject(spec.choice) };
  const begin = (spec.choice === "auto" ? "" : ALIAS.callsBegin) + ALIAS.callBegin;
  return JSON.stringify({ type: "structural_tag", format: { type: "tag", begin, content: calls, end: ALIAS.callsEnd } });
}

// ---------------------------------------------------------------------------------------------
// The engine over one vocabulary

const B2U: string[] = (() => {
  const cs: number[] = new Array(256);
  for (let b = 33; b <= 126; b++) cs[b] = b;
  for (let b = 161; b <= 172; b++) cs[b] = b;
  for (let b = 174; b <= 255; b++) cs[b] = b;
  let n = 0;
  for (let b = 0; b < 256; b++) if (cs[b] === undefined) cs[b] = 256 + n++;
  return cs.map((c) => String.fromCodePoint(c));
})();
const lossy = new TextDecoder();

interface Main {
  xg: XG;
  compiler: any;
  /** marker token ids (tool-call markers; never text under a non-tool grammar) */
  markerIds: number[];
}

/** `eosIds` defaults to the vocabulary's <｜end▁of▁sentence｜>. */
export function createGrammars(table: TokenTable, eosIds?: readonly number[]): Grammars {
  const eos = [...new Set(eosIds ?? [table.idOf(T.eos)].filter((x): x is number => x !== undefined))];
  const size = table.size;
  let main: Promise<Main> | null = null;
  let checker: Promise<XG> | null = null;
  const cache = new Map<string, Promise<CompiledGrammar>>();

  const markerIds = MARKERS.map((m) => table.idOf(m));
  const hasMarkers = markerIds.every((x, i) => x !== undefined && x < size && lossy.decode(table.bytes[x]!) === MARKERS[i]);

  const getMain = () =>
    (main ??= (async () => {
      const xg = await loadInstance();
      const aliasBytes = new Set(Object.values(ALIAS).map((a) => a.charCodeAt(0)));
      const vocab: string[] = new Array(size);
      for (let id = 0; id < size; id++) {
        const b = table.bytes[id]!;
        let s = "";
        let bad = false;
        for (let i = 0; i < b.length; i++) {
          if (aliasBytes.has(b[i]!)) bad = true;
          s += B2U[b[i]!];
        }
        // DeepSeek-V3's markup tokens are control tokens, never text under a grammar
        if (bad || (b.length > 4 && b[0] === 0x3c && isMarkup(b))) s = "";
        vocab[id] = s;
      }
      if (hasMarkers) {
        const al = [ALIAS.callsBegin, ALIAS.callsEnd, ALIAS.callBegin, ALIAS.callEnd, ALIAS.sep];
        markerIds.forEach((id, i) => (vocab[id!] = B2U[al[i]!.charCodeAt(0)]!));
      }
      const info = await xg.api.TokenizerInfo.createTokenizerInfo(vocab, "byte_level", false, size, eos.length ? eos : undefined);
      const compiler = await xg.api.GrammarCompiler.createGrammarCompiler(info, true);
      info.dispose();
      return { xg, compiler, markerIds: hasMarkers ? (markerIds as number[]) : [] };
    })().catch((e) => {
      main = null;
      throw e;
    }));

  const getChecker = () =>
    (checker ??= loadInstance().catch((e) => {
      checker = null;
      throw e;
    }));

  /** Parses the plan in the checker instance: a bad spec aborts that one only. */
  async function check(p: Plan, what: string): Promise<void> {
    const xg = await getChecker();
    const G = xg.api.Grammar;
    xg.lastError.length = 0;
    try {
      const g =
        p.kind === "json_schema"
          ? await G.fromJSONSchema(p.schema, JSON_ANY_WHITESPACE, -1, undefined, p.strict)
          : p.kind === "ebnf"
            ? await G.fromEBNF(p.grammar, "root")
            : await G.fromStructuralTag(p.tag);
      g.dispose();
    } catch (e) {
      checker = null; // that instance aborted; the next check gets a fresh one
      throw new GrammarError(`${what}: ${engineMessage(xg, e)}`);
    }
  }

  /** Each tool's arguments as EBNF with json_schema's layout (a noisy model cannot idle in whitespace). */
  async function toolLayout(spec: Extract<GrammarSpec, { type: "tool_calls" }>): Promise<Map<string, string>> {
    const xg = await getChecker();
    const out = new Map<string, string>();
    for (const t of spec.tools) {
      xg.lastError.length = 0;
      try {
        const g = await xg.api.Grammar.fromJSONSchema(JSON.stringify(t.parameters ?? { type: "object", properties: {} }), JSON_ANY_WHITESPACE, -1, undefined, true);
        out.set(t.name, g.toString());
        g.dispose();
      } catch (e) {
        checker = null;
        throw new GrammarError(`tool_calls: the parameters of '${t.name}': ${engineMessage(xg, e)}`);
      }
    }
    return out;
  }

  async function build(spec: GrammarSpec): Promise<CompiledGrammar> {
    let p = plan(spec);
    if (spec.type === "tool_calls" && !hasMarkers) throw new GrammarError("tool_calls: this model's vocabulary has no DeepSeek-V3 tool-call tokens");
    if (spec.type === "tool_calls") p = { ...p, kind: "tag", tag: toolTag(spec, await toolLayout(spec)) };
    await check(p, spec.type);
    const m = await getMain();
    const { xg } = m;
    let cg: any;
    try {
      cg =
        p.kind === "json_schema"
          ? await m.compiler.compileJSONSchema(p.schema, JSON_ANY_WHITESPACE, -1, undefined, p.strict)
          : p.kind === "ebnf"
            ? await m.compiler.compileGrammar(p.grammar, "root")
            : await m.compiler.compileStructuralTag(p.tag);
    } catch (e) {
      // the checker accepted it but compilation aborted: start over with a fresh instance
      main = null;
      cache.clear();
      throw new GrammarError(`${spec.type}: ${engineMessage(xg, e)}`);
    }
    const forbid = spec.type === "tool_calls" ? [] : m.markerIds;
    const auto = p.kind === "tag" && p.auto === true ? m.markerIds[0]! : -1;
    return { processor: () => matcherProcessor(m, cg, size, forbid, auto) };
  }

  return {
    compile(spec) {
      let key: string;
      try {
        key = canonical(spec);
      } catch {
        return Promise.reject(new GrammarError("structured output spec is not JSON"));
      }
      let hit = cache.get(key);
      if (hit) {
        cache.delete(key);
        cache.set(key, hit);
        return hit;
      }
      hit = build(spec);
      cache.set(key, hit);
      hit.catch(() => cache.delete(key));
      if (cache.size > CACHE_SIZE) cache.delete(cache.keys().next().value!);
      return hit;
    },
  };
}

/** <｜…｜>: DeepSeek-V3's markup (chat roles, tool calls, FIM, placeholders). */
function isMarkup(b: Uint8Array): boolean {
  const s = lossy.decode(b);
  return s.startsWith("<｜") && s.endsWith("｜>");
}

// matchers are wasm objects: freed when their processor is collected
const finalizer = new FinalizationRegistry<{ delete(): void }>((h) => {
  try {
    h.delete();
  } catch {
    // the instance is gone
  }
});

/**
 * One generated choice's matcher: it follows the output ids (accepting each sampled token) and
 * masks the logits with XGrammar's next-token bitmask. `auto`: the calls-begin id; until the model
 * emits it nothing is masked, from then on the grammar (which starts after it) holds.
 */
function matcherProcessor(m: Main, cg: any, size: number, forbidIds: number[], auto: number): Processor {
  const handle = new m.xg.binding.GrammarMatcher(cg.handle, undefined, false, 0);
  const words = Math.ceil(size / 32);
  let seen = 0;
  let active = auto < 0;
  let broken = false;
  const proc: Processor = (outputIds, logits) => {
    if (broken) return;
    try {
      while (seen < outputIds.length) {
        const id = outputIds[seen++]!;
        if (!active) {
          if (id === auto) active = true;
          continue;
        }
        if (handle.IsTerminated() || id < 0 || id >= size || !handle.AcceptToken(id, false)) {
          broken = true; // a token outside the mask (another processor's doing): stop constraining
          return;
        }
      }
      if (!active) return;
      if (handle.IsTerminated()) return;
      const vec = handle.GetNextTokenBitmask(size);
      const bm: Int32Array = m.xg.binding.vecIntToView(vec);
      applyBitmask(bm, words, logits);
      vec.delete();
      for (const id of forbidIds) if (id < logits.length) logits[id] = -Infinity;
    } catch {
      broken = true; // never throw inside the engine's step
    }
  };
  finalizer.register(proc, handle);
  return proc;
}

/** Sets the logits of ids the bitmask rejects to -Infinity; never leaves every id at -Infinity. */
export function applyBitmask(bm: Int32Array, words: number, logits: Float32Array): void {
  const n = logits.length;
  let finite = false;
  let firstAllowed = -1;
  for (let w = 0; w < words; w++) {
    const x = bm[w]!;
    const base = w << 5;
    if (base >= n) break;
    if (x === -1) {
      if (!finite) {
        if (firstAllowed < 0) firstAllowed = base;
        for (let j = base; j < base + 32 && j < n; j++) if (logits[j]! > -Infinity) finite = true;
      }
      continue;
    }
    if (x === 0) {
      logits.fill(-Infinity, base, Math.min(base + 32, n));
      continue;
    }
    for (let j = 0; j < 32 && base + j < n; j++) {
      if ((x >>> j) & 1) {
        if (firstAllowed < 0) firstAllowed = base + j;
        if (!finite && logits[base + j]! > -Infinity) finite = true;
      } else logits[base + j] = -Infinity;
    }
  }
  if (words * 32 < n) logits.fill(-Infinity, words * 32);
  if (!finite && firstAllowed >= 0) logits[firstAllowed] = 0;
}
