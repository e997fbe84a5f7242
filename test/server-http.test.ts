// @ds3/server over raw HTTP on 127.0.0.1 (tiny-v3, token-id prompts): every kind of bad request
// gets the right status and an OpenAI-style error body while the server keeps serving; API keys,
// body limits, CORS, queue limits (429), client disconnects, shutdown, mounting in another
// http stack; a bounded load test (100 streaming clients, a seeded third hanging up mid-stream)
// after which the cache is empty and /metrics adds up; /metrics parses as Prometheus text.
import { spawn } from "node:child_process";
import { fileURLToPath } from "node:url";
import { type IncomingHttpHeaders, request as httpRequest, createServer as createHttpServer } from "node:http";
import type { AddressInfo } from "node:net";
import { cpu } from "@ds3/backend-cpu";
import { DS3, Rng } from "@ds3/core";
import { type Ds3Server, createServer } from "@ds3/server";
// @ts-expect-error -- the package ships no type declarations
import parsePrometheusTextFormat from "parse-prometheus-text-format";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { loadGolden } from "./helpers/golden.js";

const g = loadGolden("tiny-v3");
const KEY = "sk-ds3-secret";

interface Reply {
  status: number;
  headers: IncomingHttpHeaders;
  text: string;
  // biome-ignore lint: test helper
  json: () => any;
}

/** One raw HTTP request (a fresh connection each time). */
function raw(base: string, method: string, path: string, body?: string | Buffer, headers: Record<string, string> = {}): Promise<Reply> {
  const u = new URL(path, base);
  return new Promise((resolve, reject) => {
    const req = httpRequest(
      { host: u.hostname, port: u.port, path: u.pathname + u.search, method, agent: false, headers: { ...(body !== undefined && { "Content-Type": "application/json" }), ...headers } },
      (res) => {
        const chunks: Buffer[] = [];
        res.on("data", (c: Buffer) => chunks.push(c));
        res.on("end", () => {
          const text = Buffer.concat(chunks).toString("utf8");
          resolve({ status: res.statusCode!, headers: res.headers, text, json: () => JSON.parse(text) });
        });
        res.on("error", reject);
      },
    );
    req.on("error", reject);
    if (body !== undefined) req.end(body);
    else req.end();
  });
}

/** Prometheus text → { "name{labels}": value } (and the parsed families). */
function scrape(text: string) {
  const families = parsePrometheusTextFormat(text) as Array<{ name: string; type: string; metrics: Array<{ value?: string; labels?: Record<string, string>; buckets?: Record<string, string>; count?: string; sum?: string }> }>;
  const value = (name: string, labels: Record<string, string> = {}) => {
    const f = families.find((x) => x.name === name);
    if (!f) throw new Error(`no metric ${name}`);
    const m = f.metrics.find((x) => Object.entries(labels).every(([k, v]) => x.labels?.[k] === v));
    if (!m) return 0;
    return Number(m.value ?? m.count);
  };
  return { families, value };
}

async function waitFor(cond: () => boolean, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error("timed out waiting");
    await new Promise((r) => setTimeout(r, 10));
  }
}

describe("server: raw HTTP safety", () => {
  let ds3: DS3;
  let srv: Ds3Server;
  let base: string;
  const auth = { Authorization: `Bearer ${KEY}` };

  beforeAll(async () => {
    ds3 = await DS3.load({ model: g.dir, backend: cpu });
    srv = createServer({ ds3, apiKeys: KEY, maxBodyBytes: 64 * 1024 });
    base = (await srv.listen(0, "127.0.0.1")).url;
  });
  afterAll(async () => {
    await srv?.close();
    await ds3?.close();
  });

  const post = (path: string, body: unknown, headers: Record<string, string> = auth) => raw(base, "POST", path, typeof body === "string" ? body : JSON.stringify(body), headers);
  const expectError = (r: Reply, status: number, param?: string | null) => {
    expect(r.status, r.text).toBe(status);
    expect(r.headers["content-type"]).toMatch(/application\/json/);
    const e = r.json().error;
    expect(typeof e.message).toBe("string");
    expect(e.message.length).toBeGreaterThan(0);
    expect(typeof e.type).toBe("string");
    expect(e).toHaveProperty("code");
    if (param !== undefined) {
      expect(e.param).toBe(param);
      if (param) expect(e.message).toContain(param);
    }
    return e;
  };

  it("malformed JSON and non-object bodies → 400", async () => {
    for (const body of ["{", '{"prompt": [1,2,3],', "", "[1,2,3]", '"text"', "null", "\u0000\u0001"]) {
      const r = await post("/v1/completions", body);
      expectError(r, 400);
      expect(r.json().error.type).toBe("invalid_request_error");
    }
  });

  it("every invalid field → 400 naming it", async () => {
    const ok = { model: "tiny-v3", prompt: [1, 2, 3], max_tokens: 2 };
    const cases: Array<[Record<string, unknown>, string]> = [
      [{ prompt: undefined }, "prompt"],
      [{ prompt: 5 }, "prompt"],
      [{ prompt: [] }, "prompt"],
      [{ prompt: [1.5, 2] }, "prompt"],
      [{ prompt: [1, -1] }, "prompt"],
      [{ prompt: [1, 1024] }, "prompt"],
      [{ prompt: [[1, 2], []] }, "prompt[1]"],
      [{ prompt: [1, "a"] }, "prompt"],
      [{ temperature: "hot" }, "temperature"],
      [{ temperature: -0.1 }, "temperature"],
      [{ temperature: 2.5 }, "temperature"],
      [{ top_p: 0 }, "top_p"],
      [{ top_p: 1.01 }, "top_p"],
      [{ top_k: 1.5 }, "top_k"],
      [{ top_k: -2 }, "top_k"],
      [{ min_p: 2 }, "min_p"],
      [{ presence_penalty: 3 }, "presence_penalty"],
      [{ frequency_penalty: -2.5 }, "frequency_penalty"],
      [{ repetition_penalty: 0 }, "repetition_penalty"],
      [{ max_tokens: -1 }, "max_tokens"],
      [{ max_tokens: 2.5 }, "max_tokens"],
      [{ max_tokens: "10" }, "max_tokens"],
      [{ n: 0 }, "n"],
      [{ n: 1000 }, "n"],
      [{ n: "2" }, "n"],
      [{ seed: 1.5 }, "seed"],
      [{ stream: "yes" }, "stream"],
      [{ stream_options: { include_usage: true } }, "stream_options"],
      [{ stream: true, stream_options: { include_usage: 1 } }, "stream_options.include_usage"],
      [{ stop: 5 }, "stop"],
      [{ stop: ["ok", ""] }, "stop"],
      [{ stop_token_ids: [1, 99999] }, "stop_token_ids"],
      [{ logprobs: 21 }, "logprobs"],
      [{ logprobs: true }, "logprobs"],
      [{ echo: "yes" }, "echo"],
      [{ logit_bias: { abc: 1 } }, "logit_bias"],
      [{ logit_bias: { "5": 101 } }, "logit_bias"],
      [{ logit_bias: [1] }, "logit_bias"],
      [{ response_format: { type: "xml" } }, "response_format.type"],
      [{ response_format: "json" }, "response_format"],
      [{ return_tokens_as_token_ids: 1 }, "return_tokens_as_token_ids"],
      [{ ignore_eos: "no" }, "ignore_eos"],
      [{ best_of: 3 }, "best_of"],
      [{ suffix: "x" }, "suffix"],
      [{ model: 7 }, "model"],
    ];
    for (const [patch, param] of cases) {
      const body = { ...ok, ...patch };
      const r = await post("/v1/completions", body);
      expectError(r, 400, param);
    }
    // chat-specific fields (this model has no tokenizer, so validation runs first and names them)
    const chatOk = { model: "tiny-v3", messages: [{ role: "user", content: "hi" }] };
    const chatCases: Array<[Record<string, unknown>, string]> = [
      [{ messages: "hi" }, "messages"],
      [{ messages: [] }, "messages"],
      [{ messages: [{ role: "wizard", content: "x" }] }, "messages[0].role"],
      [{ messages: [{ role: "user", content: 5 }] }, "messages[0].content"],
      [{ messages: [{ role: "user", content: [{ type: "image_url" }] }] }, "messages[0].content[0].type"],
      [{ messages: [{ role: "assistant", content: null, tool_calls: [{ type: "function", function: { name: "f", arguments: {} } }] }] }, "messages[0].tool_calls[0].function.arguments"],
      [{ logprobs: "yes" }, "logprobs"],
      [{ top_logprobs: 3 }, "top_logprobs"],
      [{ logprobs: true, top_logprobs: 30 }, "top_logprobs"],
      [{ max_tokens: 0 }, "max_tokens"],
      [{ max_completion_tokens: -5 }, "max_completion_tokens"],
      [{ tools: {} }, "tools"],
      [{ tools: [{ type: "function", function: { name: "bad name!" } }] }, "tools[0].function.name"],
      [{ tool_choice: "always" }, "tool_choice"],
      [{ tool_choice: "required" }, "tool_choice"],
      [{ tools: [{ type: "function", function: { name: "f" } }], tool_choice: { type: "function", function: { name: "g" } } }, "tool_choice"],
      [{ response_format: { type: "json_schema", json_schema: "x" } }, "response_format.json_schema"],
    ];
    for (const [patch, param] of chatCases) {
      const r = await post("/v1/chat/completions", { ...chatOk, ...patch });
      expectError(r, 400, param);
    }
    // the server is still fine
    const r = await post("/v1/completions", ok);
    expect(r.status, r.text).toBe(200);
    expect(r.json().choices[0].finish_reason).toBe("length");
  });

  it("unknown model → 404; prompt longer than the context, max_tokens beyond it → 400", async () => {
    const e1 = expectError(await post("/v1/completions", { model: "gpt-4", prompt: [1], max_tokens: 1 }), 404, "model");
    expect(e1.code).toBe("model_not_found");
    const long = Array.from({ length: ds3.engine.maxModelLen + 1 }, (_, i) => i % 1000);
    const e2 = expectError(await post("/v1/completions", { prompt: long, max_tokens: 1 }), 400, "prompt");
    expect(e2.code).toBe("context_length_exceeded");
    const e3 = expectError(await post("/v1/completions", { prompt: [1, 2, 3], max_tokens: ds3.engine.maxModelLen }), 400, "max_tokens");
    expect(e3.code).toBe("context_length_exceeded");
    const e4 = expectError(await post("/v1/completions", { prompt: [[1, 2], long], max_tokens: 1 }), 400, "prompt[1]");
    expect(e4.code).toBe("context_length_exceeded");
  });

  it("oversized bodies → 413, and the server keeps serving", async () => {
    const big = JSON.stringify({ prompt: Array.from({ length: 40_000 }, () => 1), max_tokens: 1 });
    expect(big.length).toBeGreaterThan(64 * 1024);
    expectError(await post("/v1/completions", big), 413);
    // chunked (no Content-Length) too
    const r = await new Promise<Reply>((resolve, reject) => {
      const u = new URL("/v1/completions", base);
      const req = httpRequest({ host: u.hostname, port: u.port, path: u.pathname, method: "POST", agent: false, headers: { ...auth, "Transfer-Encoding": "chunked" } }, (res) => {
        let text = "";
        res.on("data", (c) => (text += c));
        res.on("end", () => resolve({ status: res.statusCode!, headers: res.headers, text, json: () => JSON.parse(text) }));
      });
      req.on("error", reject);
      for (let i = 0; i < 10; i++) req.write(big.slice(i * 8000, (i + 1) * 8000));
      req.end(big.slice(80000));
    });
    expectError(r, 413);
    expect((await post("/v1/completions", { prompt: [1, 2], max_tokens: 1 })).status).toBe(200);
  });

  it("API keys: missing or wrong → 401 in OpenAI's shape; health and metrics stay open", async () => {
    for (const headers of [{}, { Authorization: "Bearer nope" }, { Authorization: `Bearer ${KEY}x` }, { Authorization: KEY }, { Authorization: `Basic ${KEY}` }] as Record<string, string>[]) {
      const e = expectError(await post("/v1/completions", { prompt: [1], max_tokens: 1 }, headers), 401, null);
      expect(e.code).toBe("invalid_api_key");
      expectError(await raw(base, "GET", "/v1/models", undefined, headers), 401);
    }
    expect((await raw(base, "GET", "/v1/models", undefined, auth)).json().data[0].id).toBe("tiny-v3");
    expect((await raw(base, "GET", "/health")).status).toBe(200);
    expect((await raw(base, "GET", "/metrics")).status).toBe(200);
  });

  it("unknown routes → 404, wrong methods → 405, CORS headers absent by default", async () => {
    expectError(await raw(base, "GET", "/v1/nothing", undefined, auth), 404);
    expectError(await raw(base, "GET", "/v1/models/other", undefined, auth), 404);
    const r = await raw(base, "GET", "/v1/completions", undefined, auth);
    expectError(r, 405);
    const o = await raw(base, "OPTIONS", "/v1/completions", undefined, { Origin: "http://evil.example", "Access-Control-Request-Method": "POST" });
    expect(o.headers["access-control-allow-origin"]).toBeUndefined();
    const c = await raw(base, "GET", "/health", undefined, { Origin: "http://evil.example" });
    expect(c.headers["access-control-allow-origin"]).toBeUndefined();
  });

  it("a client that disconnects mid-request aborts it (non-streaming)", async () => {
    const before = srv.metrics.clientDisconnects.get();
    const u = new URL("/v1/completions", base);
    await new Promise<void>((resolve) => {
      const req = httpRequest({ host: u.hostname, port: u.port, path: u.pathname, method: "POST", agent: false, headers: { ...auth, "Content-Type": "application/json" } });
      req.on("error", () => resolve());
      req.end(JSON.stringify({ prompt: [1, 2, 3], max_tokens: 3000, ignore_eos: true }));
      setTimeout(() => {
        req.destroy();
        resolve();
      }, 150);
    });
    await waitFor(() => srv.inFlight === 0 && ds3.engine.stats().running === 0);
    expect(srv.metrics.clientDisconnects.get()).toBe(before + 1);
    expect(ds3.engine.stats().cacheBlocksUsed).toBe(0);
  });
});

describe("server: CORS, queue limit, several servers, shutdown", () => {
  let ds3: DS3;
  beforeAll(async () => {
    ds3 = await DS3.load({ model: g.dir, backend: cpu });
  });
  afterAll(async () => {
    await ds3?.close();
  });

  it("CORS when enabled: allowed origins only, preflight answered", async () => {
    const srv = createServer({ ds3, apiKeys: [], cors: ["http://app.example"] });
    const { url } = await srv.listen(0);
    try {
      const pre = await raw(url, "OPTIONS", "/v1/chat/completions", undefined, { Origin: "http://app.example", "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type" });
      expect(pre.status).toBe(204);
      expect(pre.headers["access-control-allow-origin"]).toBe("http://app.example");
      expect(pre.headers["access-control-allow-methods"]).toContain("POST");
      const other = await raw(url, "GET", "/v1/models", undefined, { Origin: "http://evil.example" });
      expect(other.status).toBe(200);
      expect(other.headers["access-control-allow-origin"]).toBeUndefined();
    } finally {
      await srv.close();
    }
  });

  it("a full queue → 429 with Retry-After; two servers and a mounted handler share one model", async () => {
    const srv = createServer({ ds3, apiKeys: [], maxQueue: 2, retryAfterSeconds: 3 });
    const { url } = await srv.listen(0);
    // a second server on the same model, mounted inside a host application's own http server
    const other = createServer({ ds3, apiKeys: [], modelName: "tiny-alias" });
    const host = createHttpServer((req, res) => {
      if (req.url?.startsWith("/v1/") || req.url === "/health") other.handler(req, res);
      else res.writeHead(200, { "Content-Type": "text/plain" }).end("host app");
    });
    await new Promise<void>((r) => host.listen(0, "127.0.0.1", r));
    const hostUrl = `http://127.0.0.1:${(host.address() as AddressInfo).port}`;
    try {
      const ctl = new AbortController();
      const long = () =>
        fetch(`${url}/v1/completions`, { method: "POST", signal: ctl.signal, body: JSON.stringify({ prompt: [1, 2, 3], max_tokens: 3000, ignore_eos: true, stream: true }) }).then(async (r) => {
          const reader = r.body!.getReader();
          await reader.read(); // the first chunk: admitted
          return reader;
        });
      const readers = await Promise.all([long(), long()]);
      expect(srv.inFlight).toBe(2);
      const r = await raw(url, "POST", "/v1/completions", JSON.stringify({ prompt: [1], max_tokens: 1 }));
      expect(r.status).toBe(429);
      expect(r.headers["retry-after"]).toBe("3");
      expect(r.json().error.type).toBe("rate_limit_error");
      // the host app and the other server are unaffected
      expect((await raw(hostUrl, "GET", "/")).text).toBe("host app");
      const m = await raw(hostUrl, "GET", "/v1/models");
      expect(m.json().data[0].id).toBe("tiny-alias");
      const c = await raw(hostUrl, "POST", "/v1/completions", JSON.stringify({ model: "tiny-alias", prompt: [4, 5], max_tokens: 2 }));
      expect(c.status, c.text).toBe(200);
      ctl.abort();
      for (const rd of readers) await rd.cancel().catch(() => undefined);
      await waitFor(() => srv.inFlight === 0);
      const again = await raw(url, "POST", "/v1/completions", JSON.stringify({ prompt: [1], max_tokens: 1 }));
      expect(again.status).toBe(200);
    } finally {
      await srv.close();
      await other.close();
      await new Promise((r) => host.close(r));
    }
    await waitFor(() => ds3.engine.stats().running === 0);
    expect(ds3.engine.stats().cacheBlocksUsed).toBe(0);
  });

  it("close(): stops accepting, finishes short streams, cancels long ones after the grace period", async () => {
    const srv = createServer({ ds3, apiKeys: [], shutdownGraceMs: 400 });
    const { url } = await srv.listen(0);
    const readAll = async (body: unknown) => {
      const r = await fetch(`${url}/v1/completions`, { method: "POST", body: JSON.stringify(body) });
      return r.text();
    };
    const long = readAll({ prompt: [7, 8, 9], max_tokens: 3500, ignore_eos: true, stream: true });
    const short = readAll({ prompt: [3, 4], max_tokens: 3, stream: true });
    await waitFor(() => srv.inFlight === 2);
    const t = Date.now();
    await srv.close();
    const took = Date.now() - t;
    expect(took).toBeGreaterThanOrEqual(350);
    expect(took).toBeLessThan(5000);
    const [l, s] = await Promise.all([long, short]);
    expect(s).toContain('"finish_reason":"length"');
    expect(s.trimEnd().endsWith("data: [DONE]")).toBe(true);
    // the cut stream ends in an error event (OpenAI's error shape), never finish_reason "abort"
    expect(l).not.toContain('"abort"');
    expect(l.trimEnd().endsWith('"code":"shutting_down"}}')).toBe(true);
    await expect(fetch(`${url}/health`)).rejects.toThrow();
    await waitFor(() => ds3.engine.stats().running === 0);
    expect(ds3.engine.stats().cacheBlocksUsed).toBe(0);
  });
});

describe("server: SIGTERM / SIGINT", () => {
  // a child process runs the server with handleSignals; a stream is in flight when the signal comes
  const child = (withHook: boolean) => `
    import { DS3 } from "@ds3/core";
    import { cpu } from "@ds3/backend-cpu";
    import { createServer } from "@ds3/server";
    const ds3 = await DS3.load({ model: ${JSON.stringify(g.dir)}, backend: cpu });
    const srv = createServer({ ds3, apiKeys: [], handleSignals: true, shutdownGraceMs: 300,
      ${withHook ? `onSignal: async (sig) => { await ds3.close(); console.log("closed on " + sig); process.exit(0); },` : ""} });
    const { url } = await srv.listen(0, "127.0.0.1");
    console.log("LISTEN " + url);`;

  for (const [sig, hook] of [["SIGTERM", true], ["SIGINT", false]] as const) {
    it(`${sig}: stops accepting, ends the in-flight stream, exits 0`, async () => {
      const p = spawn(process.execPath, ["--input-type=module", "-e", child(hook)], { cwd: fileURLToPath(new URL(".", import.meta.url)), stdio: ["ignore", "pipe", "pipe"] });
      let out = "";
      let err = "";
      p.stderr.on("data", (c) => (err += c));
      const url = await new Promise<string>((resolve, reject) => {
        p.stdout.on("data", (c) => {
          out += c;
          const m = /LISTEN (\S+)/.exec(out);
          if (m) resolve(m[1]!);
        });
        p.on("exit", (code) => reject(new Error(`child exited ${code}: ${err}`)));
      });
      const exited = new Promise<number | null>((r) => p.on("exit", (code) => r(code)));
      const res = await fetch(`${url}/v1/completions`, { method: "POST", body: JSON.stringify({ prompt: [1, 2], max_tokens: 3000, ignore_eos: true, stream: true }) });
      const reader = res.body!.getReader();
      let text = new TextDecoder().decode((await reader.read()).value);
      p.kill(sig);
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        text += new TextDecoder().decode(value);
      }
      expect(text).not.toContain('"abort"');
      expect(text.trimEnd().endsWith('"code":"shutting_down"}}')).toBe(true);
      expect(await exited).toBe(0);
      if (hook) expect(out).toContain(`closed on ${sig}`);
    });
  }
});

describe("server: bounded load test and /metrics", () => {
  let ds3: DS3;
  let srv: Ds3Server;
  let base: string;
  beforeAll(async () => {
    ds3 = await DS3.load({ model: g.dir, backend: cpu });
    srv = createServer({ ds3, apiKeys: [] });
    base = (await srv.listen(0, "127.0.0.1")).url;
  });
  afterAll(async () => {
    await srv?.close();
    await ds3?.close();
  });

  it("100 concurrent streaming clients, a seeded random third hanging up mid-stream", async () => {
    const N = 100;
    const rng = new Rng(2024);
    const quitters = new Set<number>();
    while (quitters.size < Math.round(N / 3)) quitters.add(Math.floor(rng.next() * N));
    const u = new URL("/v1/completions", base);
    interface Outcome {
      i: number;
      quit: boolean;
      tokens: number;
      usage?: { prompt_tokens: number; completion_tokens: number };
      done: boolean;
      finish?: string;
    }
    const one = (i: number) =>
      new Promise<Outcome>((resolve, reject) => {
        const quit = quitters.has(i);
        const prompt = Array.from({ length: 3 + (i % 17) }, (_, k) => (i * 31 + k * 7) % 1000);
        const body = JSON.stringify({ prompt, max_tokens: quit ? 400 : 4 + (i % 5), ignore_eos: true, temperature: 1, seed: i, stream: true, stream_options: { include_usage: true } });
        const out: Outcome = { i, quit, tokens: 0, done: false };
        const req = httpRequest({ host: u.hostname, port: u.port, path: u.pathname, method: "POST", agent: false, headers: { "Content-Type": "application/json" } }, (res) => {
          expect(res.statusCode).toBe(200);
          let buf = "";
          res.setEncoding("utf8");
          res.on("data", (c: string) => {
            buf += c;
            let k: number;
            while ((k = buf.indexOf("\n\n")) >= 0) {
              const ev = buf.slice(0, k);
              buf = buf.slice(k + 2);
              if (!ev.startsWith("data: ")) continue;
              const data = ev.slice(6);
              if (data === "[DONE]") {
                out.done = true;
                continue;
              }
              const j = JSON.parse(data);
              if (j.usage) out.usage = j.usage;
              for (const ch of j.choices) {
                if (ch.finish_reason) out.finish = ch.finish_reason;
                else out.tokens++;
              }
              if (quit && out.tokens >= 2) {
                req.destroy();
                resolve(out);
                return;
              }
            }
          });
          res.on("end", () => resolve(out));
          res.on("error", () => resolve(out));
        });
        req.on("error", (e) => (quit ? resolve(out) : reject(e)));
        req.end(body);
      });
    const t0 = Date.now();
    const outcomes = await Promise.all(Array.from({ length: N }, (_, i) => one(i)));
    const elapsed = Date.now() - t0;
    const stayed = outcomes.filter((o) => !o.quit);
    for (const o of stayed) {
      expect(o.done).toBe(true);
      expect(o.finish).toBe("length");
      expect(o.usage!.completion_tokens).toBe(4 + (o.i % 5));
      expect(o.tokens).toBe(o.usage!.completion_tokens);
    }
    for (const o of outcomes.filter((x) => x.quit)) expect(o.done).toBe(false);

    // every sequence ends, the cache empties
    await waitFor(() => srv.inFlight === 0 && ds3.engine.stats().running === 0 && ds3.engine.stats().waiting === 0, 30_000);
    expect(ds3.engine.stats().cacheBlocksUsed).toBe(0);

    const m = scrape((await raw(base, "GET", "/metrics")).text);
    expect(m.value("ds3_kv_cache_usage_perc")).toBe(0);
    expect(m.value("ds3_num_requests_running")).toBe(0);
    expect(m.value("ds3_server_requests_in_flight")).toBe(0);
    expect(m.value("ds3_http_requests_total", { endpoint: "/v1/completions", code: "200" })).toBe(N);
    expect(m.value("ds3_request_success_total", { finished_reason: "length" })).toBe(stayed.length);
    expect(m.value("ds3_request_success_total", { finished_reason: "abort" })).toBe(quitters.size);
    expect(m.value("ds3_client_disconnects_total")).toBe(quitters.size);
    expect(m.value("ds3_e2e_request_latency_seconds")).toBe(N);
    expect(m.value("ds3_time_to_first_token_seconds")).toBe(N);
    const promptSum = outcomes.reduce((a, o) => a + 3 + (o.i % 17), 0);
    expect(m.value("ds3_prompt_tokens_total")).toBe(promptSum);
    const stayedTokens = stayed.reduce((a, o) => a + o.usage!.completion_tokens, 0);
    const quitTokensSeen = outcomes.filter((o) => o.quit).reduce((a, o) => a + o.tokens, 0);
    const gen = m.value("ds3_generation_tokens_total");
    expect(gen).toBeGreaterThanOrEqual(stayedTokens + quitTokensSeen);
    expect(gen).toBeLessThan(stayedTokens + quitters.size * 400);
    expect(m.value("ds3_generation_tokens_total")).toBe(ds3.engine.stats().generatedTokens);

    // and a new request still succeeds
    const r = await raw(base, "POST", "/v1/completions", JSON.stringify({ prompt: [1, 2, 3], max_tokens: 3 }));
    expect(r.status).toBe(200);
    expect(r.json().usage.completion_tokens).toBe(3);
    console.log(`load test: ${N} streaming clients (${quitters.size} hung up) in ${elapsed} ms`);
  });

  it("/metrics is valid Prometheus text exposition", async () => {
    const r = await raw(base, "GET", "/metrics");
    expect(r.status).toBe(200);
    expect(r.headers["content-type"]).toMatch(/^text\/plain; version=0\.0\.4/);
    const { families } = scrape(r.text);
    const names = families.map((f) => f.name);
    expect(families.filter((f) => f.type === "UNTYPED")).toEqual([]);
    for (const n of [
      "ds3_time_to_first_token_seconds",
      "ds3_time_per_output_token_seconds",
      "ds3_e2e_request_latency_seconds",
      "ds3_num_requests_running",
      "ds3_num_requests_waiting",
      "ds3_kv_cache_usage_perc",
      "ds3_prefix_cache_hit_rate",
      "ds3_spec_decode_acceptance_rate",
      "ds3_prompt_tokens_total",
      "ds3_generation_tokens_total",
    ])
      expect(names).toContain(n);
    // line grammar of the text format, and histogram invariants
    const metricLine = /^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="(\\.|[^"\\])*",?)*\})? (NaN|[+-]Inf|-?\d+(\.\d+)?([eE][+-]?\d+)?)$/;
    const types = new Map<string, string>();
    for (const line of r.text.trimEnd().split("\n")) {
      if (line.startsWith("# HELP ")) continue;
      const t = /^# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (counter|gauge|histogram|summary|untyped)$/.exec(line);
      if (t) {
        expect(types.has(t[1]!)).toBe(false);
        types.set(t[1]!, t[2]!);
        continue;
      }
      expect(line).toMatch(metricLine);
      const name = line.split(/[{ ]/)[0]!;
      const family = types.has(name) ? name : name.replace(/_(bucket|sum|count)$/, "");
      expect(types.has(family), line).toBe(true);
    }
    for (const f of families.filter((x) => x.type === "HISTOGRAM")) {
      for (const m of f.metrics) {
        const counts = Object.entries(m.buckets!).map(([le, v]) => [le === "+Inf" ? Infinity : Number(le), Number(v)] as const);
        counts.sort((a, b) => a[0] - b[0]);
        for (let i = 1; i < counts.length; i++) expect(counts[i]![1]).toBeGreaterThanOrEqual(counts[i - 1]![1]);
        expect(Number(m.count)).toBeGreaterThanOrEqual(counts[counts.length - 1]![1]);
      }
    }
  });
});
