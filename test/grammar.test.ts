// The grammar engine (XGrammar's wasm build) on DeepSeek-V3's real vocabulary (the bundled
// tokenizer, 129,280 ids as the checkpoints have): outputs sampled under each spec are checked
// by independent means — zod for JSON schemas, JS RegExp for regexes, a hand parser for an EBNF
// grammar, tools.ts's parser for tool calls. Sampling: seeded random logits plus a per-token bias,
// masked by the engine's processor, greedy over the result.
import { Tokenizer } from "@ds3/core";
import { beforeAll, describe, expect, it } from "vitest";
import { z } from "zod";
import { type CompiledGrammar, type GrammarSpec, type Grammars, GrammarError, createGrammars } from "../packages/server/src/grammar.js";
import { type TokenTable, tokenTable } from "../packages/server/src/tokens.js";
import { T, parseToolCalls } from "../packages/server/src/tools.js";

const VOCAB = 129_280;
let tok: Tokenizer;
let table: TokenTable;
let grammars: Grammars;
let eos: number;
let texts: string[];
const dec = new TextDecoder();

beforeAll(async () => {
  tok = await Tokenizer.load();
  table = tokenTable(tok, VOCAB);
  grammars = createGrammars(table, [tok.eosId]);
  eos = tok.eosId;
  texts = table.bytes.map((b) => dec.decode(b));
});

/** A bias over the vocabulary: `score(text)` for each token with text, `eosBias` for EOS. */
function bias(score: (t: string) => number, eosBias = 0): Float32Array {
  const b = new Float32Array(VOCAB);
  for (let id = 0; id < VOCAB; id++) if (texts[id]) b[id] = score(texts[id]!);
  b[eos] = eosBias;
  return b;
}
/** Short structural tokens: closes strings and containers soon, so outputs finish. */
const closing = () =>
  bias((t) => (/^\s*["}\],:]{1,3}\s*$/.test(t) || /^(true|false|null|[0-9])$/.test(t) ? 9 : /^(\\[n"\\]|[()+*])$/.test(t) ? 10 : t === "[{" || t === "{" ? 8 : t.length <= 2 ? 2 : 0), 12);
/** Tokens with quotes, backslashes and newlines: strings get escapes. */
const escapy = () => bias((t) => (/[\\"\n]/.test(t) && t.length <= 3 ? 5 : /^[a-z ]{1,4}$/.test(t) ? 2 : 0), 4);

interface Run {
  ids: number[];
  text: string;
  done: boolean; // ended with EOS
}

/** Greedy decoding of (seeded noise + bias) under the processor; continues `from` if given. */
function sample(p: (ids: readonly number[], l: Float32Array) => void, seed: number, steps: number, b: Float32Array, from: number[] = []): Run {
  const ids = [...from];
  const logits = new Float32Array(VOCAB);
  let s = seed >>> 0 || 1;
  for (let i = 0; i < steps; i++) {
    for (let j = 0; j < VOCAB; j++) {
      s ^= s << 13;
      s ^= s >>> 17;
      s ^= s << 5;
      logits[j] = ((s >>> 0) / 2 ** 32) * 6 + b[j]!;
    }
    p(ids, logits);
    let best = 0;
    for (let j = 1; j < VOCAB; j++) if (logits[j]! > logits[best]!) best = j;
    expect(logits[best]).toBeGreaterThan(-Infinity);
    if (best === eos) return { ids, text: textOf(ids), done: true };
    ids.push(best);
  }
  return { ids, text: textOf(ids), done: false };
}
const textOf = (ids: number[]) => dec.decode(Uint8Array.from(ids.flatMap((id) => [...table.bytes[id]!])));

/** The ids a processor leaves allowed for the given output so far. */
function allowed(p: (ids: readonly number[], l: Float32Array) => void, ids: number[]): number[] {
  const l = new Float32Array(VOCAB);
  p(ids, l);
  const out: number[] = [];
  for (let j = 0; j < VOCAB; j++) if (l[j]! > -Infinity) out.push(j);
  return out;
}

/**
 * Samples `trials` outputs; each is cut after a few noisy tokens (the cut text must be a valid
 * prefix: the same matcher then finishes it, and the whole must pass `check`), or runs to EOS.
 */
function exercise(cg: CompiledGrammar, trials: number, check: (text: string) => void): Run[] {
  const runs: Run[] = [];
  for (let t = 0; t < trials; t++) {
    const p = cg.processor();
    const cut = sample(p, 1000 + t, 4 + ((t * 7) % 40), t % 2 ? escapy() : bias(() => 0, -5));
    const full = cut.done ? cut : sample(p, 2000 + t, 400, closing(), cut.ids);
    expect(full.done, `trial ${t} did not finish: ${JSON.stringify(full.text)}`).toBe(true);
    expect(full.text.startsWith(cut.text)).toBe(true);
    check(full.text);
    runs.push(cut, full);
  }
  return runs;
}

const Order = z.object({
  status: z.enum(["pending", "shipped", "delivered"]),
  paid: z.boolean(),
  customer: z.object({ name: z.string(), note: z.string(), vip: z.boolean() }),
  items: z.array(z.object({ sku: z.string(), qty: z.number().int() })),
  total: z.number(),
  discount: z.number().optional(),
});

describe("grammar engine (XGrammar) on DeepSeek-V3's vocabulary", () => {
  it("json_schema: every output parses and validates (enum, boolean, required nested object, array, numbers, escaped strings); cut outputs are valid prefixes", async () => {
    const schema = z.toJSONSchema(Order) as Record<string, unknown>;
    const cg = await grammars.compile({ type: "json_schema", schema, strict: true });
    const parsed: z.infer<typeof Order>[] = [];
    const runs = exercise(cg, 8, (text) => {
      const v = Order.safeParse(JSON.parse(text));
      expect(v.success, `${text}\n${JSON.stringify(v.error?.issues)}`).toBe(true);
      // strict: no keys beyond the schema's
      for (const k of Object.keys(JSON.parse(text))) expect(Object.keys(Order.shape)).toContain(k);
      parsed.push(v.data!);
    });
    // the samples reach what the schema is about
    expect(runs.some((r) => !r.done)).toBe(true);
    expect(parsed.some((o) => o.items.length > 0)).toBe(true);
    expect(parsed.some((o) => /["\\\n]/.test(o.customer.name + o.customer.note + o.items.map((i) => i.sku).join("")))).toBe(true);
  });

  it("json_object: outputs are JSON objects; ids past the tokenizer and special ids are never allowed", async () => {
    const cg = await grammars.compile({ type: "json_object" });
    exercise(cg, 4, (text) => {
      const v = JSON.parse(text);
      expect(typeof v === "object" && v !== null && !Array.isArray(v), text).toBe(true);
    });
    const p = cg.processor();
    const a = allowed(p, []);
    expect(a.length).toBeGreaterThan(1);
    for (const id of a) {
      expect(id).toBeLessThan(tok.vocabSize);
      expect(table.special[id]).toBe(0);
      expect(texts[id]!.trimStart().startsWith("{") || texts[id]!.trim() === "").toBe(true);
    }
    // DeepSeek's markup tokens are no text under a grammar, not even inside a string
    const inString = allowed(p, tok.encode('{"a": "x'));
    expect(inString.length).toBeGreaterThan(100_000);
    for (const m of [T.callsBegin, T.callEnd, T.user, T.assistant]) expect(inString).not.toContain(table.idOf(m));
    expect(inString).not.toContain(eos);
  });

  it("once the grammar is complete only EOS may follow", async () => {
    const cg = await grammars.compile({ type: "choice", choices: ["yes", "no"] });
    expect(allowed(cg.processor(), tok.encode("yes"))).toEqual([eos]);
    const obj = await grammars.compile({ type: "json_object" });
    expect(allowed(obj.processor(), tok.encode('{"a": [1, {"b": null}]}'))).toEqual([eos]);
  });

  it("regex: outputs match the pattern", async () => {
    const pattern = "[a-z]{2,6}-[0-9]{3}(\\.[0-9]+)?";
    const cg = await grammars.compile({ type: "regex", pattern });
    const re = new RegExp(`^(?:${pattern})$`);
    exercise(cg, 5, (text) => expect(text).toMatch(re));
  });

  it("choice: outputs are one of the choices", async () => {
    const choices = ["positive", "negative", 'neutral "so-so"', "很好\n"];
    const cg = await grammars.compile({ type: "choice", choices });
    const seen = new Set<string>();
    exercise(cg, 6, (text) => {
      expect(choices).toContain(text);
      seen.add(text);
    });
    expect(seen.size).toBeGreaterThan(1);
  });

  it("EBNF grammar: outputs are sentences of the grammar", async () => {
    const grammar = 'root ::= expr\nexpr ::= term (("+" | "*") term)*\nterm ::= [0-9]+ | "(" expr ")"\n';
    const cg = await grammars.compile({ type: "grammar", grammar });
    // an independent recursive-descent recognizer of the same language
    const accepts = (s: string): boolean => {
      let i = 0;
      const term = (): boolean => {
        if (s[i] === "(") {
          i++;
          if (!expr() || s[i] !== ")") return false;
          i++;
          return true;
        }
        const st = i;
        while (i < s.length && s[i]! >= "0" && s[i]! <= "9") i++;
        return i > st;
      };
      const expr = (): boolean => {
        if (!term()) return false;
        while (s[i] === "+" || s[i] === "*") {
          i++;
          if (!term()) return false;
        }
        return true;
      };
      return expr() && i === s.length;
    };
    const runs = exercise(cg, 5, (text) => expect(accepts(text), text).toBe(true));
    expect(runs.some((r) => r.done && /[(+*]/.test(r.text))).toBe(true);
  });

  const Weather = z.object({ city: z.string(), unit: z.enum(["celsius", "fahrenheit"]), days: z.number().int() });
  const tools = [
    { name: "get_weather", parameters: z.toJSONSchema(Weather) as Record<string, unknown> },
    { name: "get_time", parameters: { type: "object", properties: { tz: { type: "string" } }, required: ["tz"] } },
  ];
  const TimeArgs = z.object({ tz: z.string() });
  const checkCalls = (text: string, names: string[]) => {
    expect(text.startsWith(T.callsBegin) || names.length === 0, text).toBe(true);
    const { calls } = parseToolCalls(text);
    expect(calls.length, text).toBeGreaterThan(0);
    for (const c of calls) {
      expect(names).toContain(c.function.name);
      const args = JSON.parse(c.function.arguments);
      const v = (c.function.name === "get_weather" ? Weather : TimeArgs).safeParse(args);
      expect(v.success, `${c.function.arguments} ${JSON.stringify(v.error?.issues)}`).toBe(true);
    }
    expect(text.endsWith(T.callsEnd), text).toBe(true);
    return calls;
  };

  it("tool calls (required, parallel): parse with tools.ts's parser and their arguments validate against each tool's schema", async () => {
    const cg = await grammars.compile({ type: "tool_calls", tools, choice: "required", parallel: true });
    const counts: number[] = [];
    exercise(cg, 6, (text) => counts.push(checkCalls(text, ["get_weather", "get_time"]).length));
    expect(Math.max(...counts)).toBeGreaterThan(1); // parallel calls happen
    // the first token is the calls-begin marker itself, never its spelling in pieces
    expect(allowed(cg.processor(), [])).toEqual([table.idOf(T.callsBegin)]);
  });

  it("tool calls (named, not parallel): exactly one call, to that tool", async () => {
    const cg = await grammars.compile({ type: "tool_calls", tools, choice: { name: "get_weather" }, parallel: true });
    exercise(cg, 4, (text) => expect(checkCalls(text, ["get_weather"]).length).toBe(1));
  });

  it("tool calls (auto): free text until the model opens the calls, constrained from there on", async () => {
    const cg = await grammars.compile({ type: "tool_calls", tools, choice: "auto", parallel: false });
    const p = cg.processor();
    const prose = tok.encode("Let me check. ");
    // nothing is masked during free text
    expect(allowed(p, prose.slice(0, 2)).length).toBe(VOCAB);
    const open = [...prose, table.idOf(T.callsBegin)!];
    expect(allowed(p, open)).toEqual([table.idOf(T.callBegin)]);
    const run = sample(p, 77, 400, closing(), open);
    expect(run.done).toBe(true);
    expect(run.text.startsWith("Let me check. ")).toBe(true);
    expect(parseToolCalls(run.text).content).toBe("Let me check. ");
    checkCalls(run.text.slice("Let me check. ".length), ["get_weather", "get_time"]);
  });

  it("a bad schema, regex or grammar is a GrammarError that names the problem; the engine goes on working", async () => {
    const bad: [GrammarSpec, RegExp][] = [
      [{ type: "json_schema", schema: { type: "wat" } }, /json_schema: .*Unsupported type "wat"/],
      [{ type: "json_schema", schema: { $ref: "#/$defs/missing" } }, /json_schema: .*\$defs/],
      [{ type: "regex", pattern: "a[0-9" }, /regex: .*(Unterminated|Unclosed)/],
      [{ type: "regex", pattern: "(?<=a)b" }, /regex: .*Lookbehind/],
      [{ type: "grammar", grammar: 'root ::= "a" rest' }, /grammar: .*Rule "rest" is not defined/],
      [{ type: "grammar", grammar: 'root ::= "a' }, /grammar: .*string/],
      [{ type: "choice", choices: [] }, /choice: /],
      [{ type: "tool_calls", tools, choice: { name: "nope" }, parallel: false }, /'nope'/],
    ];
    for (const [spec, msg] of bad) {
      const e = await grammars.compile(spec).then(
        () => null,
        (x: unknown) => x,
      );
      expect(e, JSON.stringify(spec)).toBeInstanceOf(GrammarError);
      expect((e as Error).message).toMatch(msg);
    }
    const ok = await grammars.compile({ type: "regex", pattern: "ok|fine" });
    exercise(ok, 2, (text) => expect(["ok", "fine"]).toContain(text));
  });

  it("compilation is cached per spec (key order does not matter)", async () => {
    const a = await grammars.compile({ type: "json_schema", schema: { type: "object", properties: { x: { type: "integer" }, y: { type: "string" } }, required: ["x"] } });
    const b = await grammars.compile({ schema: { required: ["x"], properties: { y: { type: "string" }, x: { type: "integer" } }, type: "object" }, type: "json_schema" } as GrammarSpec);
    expect(b).toBe(a);
    const c = await grammars.compile({ type: "json_schema", schema: { type: "object", properties: { x: { type: "integer" } } }, strict: false });
    expect(c).not.toBe(a);
  });
});
