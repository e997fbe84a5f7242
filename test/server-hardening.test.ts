// The server's HTTP hardening of issue 10, as a hostile client sees it, over raw sockets and
// node:http on a real server at 127.0.0.1 (tiny-v3, token-id prompts): /health/deep behind the
// key, admitted like any request and cached; malformed paths and request targets → 400; bodies
// over the limit → 413 with Connection: close (declared, Expect: 100-continue, chunked, huge);
// the request timeout and the connection cap; DS3_API_KEY entries trimmed; and what a client
// sees when shutdown cuts its request (an error, never finish_reason "abort").
import { type Socket, connect } from "node:net";
import { request as httpRequest } from "node:http";
import { cpu } from "@ds3/backend-cpu";
import { DS3 } from "@ds3/core";
import { type Ds3Server, createServer } from "@ds3/server";
import OpenAI from "openai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { loadGolden } from "./helpers/golden.js";

const g = loadGolden("tiny-v3");
const KEY = "sk-hard";
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function waitFor(cond: () => boolean, ms = 10_000): Promise<void> {
  const t = Date.now();
  while (!cond()) {
    if (Date.now() - t > ms) throw new Error("timed out waiting");
    await sleep(10);
  }
}

/** A raw TCP conversation: write `bytes`, collect what comes back until the server closes or `ms` pass. */
function rawExchange(port: number, bytes: string | Buffer, ms = 3000, onData?: (sock: Socket, text: string) => void): Promise<{ text: string; closed: boolean; error: string | null }> {
  return new Promise((resolve) => {
    const sock = connect(port, "127.0.0.1");
    let text = "";
    let error: string | null = null;
    const timer = setTimeout(() => finish(false), ms);
    const finish = (closed: boolean) => {
      clearTimeout(timer);
      sock.destroy();
      resolve({ text, closed, error });
    };
    sock.on("data", (c) => {
      text += c.toString("latin1");
      onData?.(sock, text);
    });
    sock.on("error", (e) => (error = (e as NodeJS.ErrnoException).code ?? e.message));
    sock.on("close", () => finish(true));
    sock.write(bytes);
  });
}

const status = (text: string) => Number(/^HTTP\/1\.1 (\d{3})/.exec(text)?.[1] ?? 0);

describe("server hardening (issue 10)", () => {
  let ds3: DS3;
  let srv: Ds3Server;
  let port: number;
  let url: string;
  const LIMIT = 64 * 1024;

  beforeAll(async () => {
    ds3 = await DS3.load({ model: g.dir, backend: cpu });
    srv = createServer({ ds3, apiKeys: [KEY], maxBodyBytes: LIMIT, maxQueue: 2 });
    ({ url, port } = await srv.listen(0, "127.0.0.1"));
  });
  afterAll(async () => {
    await srv?.close({ graceMs: 0 });
    await ds3?.close();
  });

  const get = (path: string, key?: string) => fetch(`${url}${path}`, { headers: key ? { Authorization: `Bearer ${key}` } : {} });

  it("/health/deep needs the key; /health stays an open, cheap liveness check", async () => {
    expect((await get("/health")).status).toBe(200);
    expect((await get("/health/deep")).status).toBe(401);
    expect((await get("/health?deep=1")).status).toBe(401);
    expect((await get("/health/deep", "wrong")).status).toBe(401);
    const ok = await get("/health/deep", KEY);
    expect(ok.status).toBe(200);
    expect((await ok.json()).status).toBe("ok");
  });

  it("/health/deep is admitted like any request (429 when the queue is full) and its result is shared", async () => {
    await sleep(2100); // past the cache interval of the check above
    // 20 probes at once: one generation answers them all
    const many = await Promise.all(Array.from({ length: 20 }, () => get("/health/deep", KEY).then((r) => r.json())));
    expect(many.every((b) => b.status === "ok")).toBe(true);
    expect(many.filter((b) => b.cached === false).length).toBe(1);
    await sleep(2100);
    // fill the queue (maxQueue 2) with two long streams: the deep check waits its turn → 429
    const ac = new AbortController();
    const long = () =>
      fetch(`${url}/v1/completions`, {
        method: "POST",
        headers: { Authorization: `Bearer ${KEY}` },
        body: JSON.stringify({ prompt: [7, 8, 9], max_tokens: 3000, ignore_eos: true, stream: true }),
        signal: ac.signal,
      }).catch(() => null);
    const streams = [long(), long()];
    await waitFor(() => srv.inFlight === 2);
    const r = await get("/health/deep", KEY);
    expect(r.status).toBe(429);
    expect((await r.json()).error.code).toBe("queue_full");
    ac.abort();
    await Promise.all(streams);
    await waitFor(() => srv.inFlight === 0);
  });

  it("GET /v1/models/%ZZ and an absolute-form target with a broken host → 400, not 500", async () => {
    const r = await get("/v1/models/%ZZ", KEY);
    expect(r.status).toBe(400);
    expect((await r.json()).error.param).toBe("model");
    for (const target of ["http://[::1/v1/models", "http://exa mple.com/v1/models", "http://:99999/health"]) {
      const x = await rawExchange(port, `GET ${target} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer ${KEY}\r\nConnection: close\r\n\r\n`);
      expect([400], `${target}: ${x.text.slice(0, 200)}`).toContain(status(x.text));
    }
    expect((await get("/health")).status).toBe(200);
  });

  it("a declared Content-Length over the limit → 413 with Connection: close before the body is sent", async () => {
    const head = `POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEY}\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n\r\n`;
    const x = await rawExchange(port, head, 3000); // the body is never sent: an answer at all is before it
    expect(status(x.text), x.text).toBe(413);
    expect(x.text.toLowerCase()).toContain("connection: close");
    expect(JSON.parse(x.text.slice(x.text.indexOf("\r\n\r\n") + 4)).error.code).toBe("request_too_large");
    expect(x.closed).toBe(true);
  });

  it("Expect: 100-continue: 413 without a 100 for an oversize body; 100 then the answer for a fitting one", async () => {
    const big = await rawExchange(port, `POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEY}\r\nContent-Length: ${LIMIT + 1}\r\nExpect: 100-continue\r\n\r\n`, 3000);
    expect(big.text).not.toContain("100 Continue");
    expect(status(big.text)).toBe(413);
    expect(big.text.toLowerCase()).toContain("connection: close");
    const body = JSON.stringify({ prompt: [1, 2], max_tokens: 1 });
    let sent = false;
    const small = await rawExchange(
      port,
      `POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEY}\r\nContent-Length: ${body.length}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n`,
      5000,
      (sock, text) => {
        if (!sent && text.includes("100 Continue")) {
          sent = true;
          sock.write(body);
        }
      },
    );
    expect(small.text.startsWith("HTTP/1.1 100 Continue")).toBe(true);
    expect(small.text).toContain("HTTP/1.1 200");
  });

  it("a chunked body that grows past the limit → 413 at once (the client is still sending), then the close", async () => {
    const chunk = Buffer.alloc(16 * 1024, 0x20);
    let got = "";
    const x = await new Promise<{ text: string; closed: boolean }>((resolve) => {
      const sock = connect(port, "127.0.0.1");
      let timer: NodeJS.Timeout | undefined;
      let n = 0;
      const done = (closed: boolean) => {
        clearInterval(timer);
        sock.destroy();
        resolve({ text: got, closed });
      };
      sock.on("data", (c) => (got += c.toString("latin1")));
      sock.on("error", () => undefined);
      sock.on("close", () => done(true));
      sock.write(`POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEY}\r\nTransfer-Encoding: chunked\r\n\r\n`);
      // keep sending, slowly, and never finish: only the server's answer ends this
      timer = setInterval(() => {
        if (n++ < 40 && !sock.destroyed) sock.write(Buffer.concat([Buffer.from(`${chunk.length.toString(16)}\r\n`), chunk, Buffer.from("\r\n")]));
      }, 20);
      setTimeout(() => done(false), 6000);
    });
    expect(status(x.text), x.text.slice(0, 100)).toBe(413);
    expect(x.text.toLowerCase()).toContain("connection: close");
    expect(x.closed).toBe(true);
  });

  it("a huge body sent in one go gets a real 413, not a connection reset", async () => {
    const huge = Buffer.alloc(24 * 1024 * 1024, 0x20);
    const res = await new Promise<{ status: number; connection: string | undefined }>((resolve, reject) => {
      const req = httpRequest({ host: "127.0.0.1", port, path: "/v1/completions", method: "POST", agent: false, headers: { Authorization: `Bearer ${KEY}`, "Transfer-Encoding": "chunked" } }, (r) => {
        resolve({ status: r.statusCode!, connection: r.headers.connection });
        r.resume();
      });
      req.on("error", (e) => reject(e)); // a reset before the answer fails the test
      req.end(huge);
    });
    expect(res.status).toBe(413);
    expect(res.connection).toBe("close");
    expect((await get("/health")).status).toBe(200);
  });
});

describe("server hardening: request timeout, connection cap, API keys", () => {
  let ds3: DS3;
  beforeAll(async () => {
    ds3 = await DS3.load({ model: g.dir, backend: cpu });
  });
  afterAll(async () => {
    await ds3?.close();
  });

  it("a request whose body never finishes is answered 408 and closed after requestTimeoutMs", async () => {
    const srv = createServer({ ds3, apiKeys: [], requestTimeoutMs: 600 });
    const { port } = await srv.listen(0, "127.0.0.1");
    try {
      // each exchange gives up after 8 s, far below the 30 s default: an answer proves the 600 ms applied
      const t = Date.now();
      const x = await rawExchange(port, 'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{"prompt"', 8000);
      expect(status(x.text), x.text).toBe(408);
      expect(x.closed).toBe(true);
      expect(Date.now() - t).toBeGreaterThanOrEqual(500); // waited for the timeout, not refused at once
      // headers that never finish too
      const y = await rawExchange(port, "GET /health HTTP/1.1\r\nHost: x\r\n", 8000);
      expect(y.closed).toBe(true);
    } finally {
      await srv.close({ graceMs: 0 });
    }
    expect(() => createServer({ ds3, requestTimeoutMs: 0 })).toThrow(/requestTimeoutMs/);
  });

  it("maxConnections: connections past the cap are closed at once, the others keep working", async () => {
    const srv = createServer({ ds3, apiKeys: [], maxConnections: 2 });
    const { port } = await srv.listen(0, "127.0.0.1");
    const open = (): Promise<Socket> =>
      new Promise((resolve, reject) => {
        const s = connect(port, "127.0.0.1", () => resolve(s));
        s.on("error", reject);
      });
    try {
      const a = await open();
      const b = await open();
      await sleep(100);
      const third = await rawExchange(port, "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 3000);
      expect(third.text).toBe("");
      expect(third.closed).toBe(true);
      // the two held connections are served
      const reply = await new Promise<string>((resolve) => {
        let t = "";
        a.on("data", (c) => {
          t += c;
          if (t.includes("\r\n\r\n{")) resolve(t);
        });
        a.write("GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
      });
      expect(status(reply)).toBe(200);
      a.destroy();
      b.destroy();
      await sleep(100);
      const again = await rawExchange(port, "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 3000);
      expect(status(again.text)).toBe(200);
    } finally {
      await srv.close({ graceMs: 0 });
    }
  });

  it('DS3_API_KEY="a, b": every entry works (trimmed); an empty entry is an error', async () => {
    const saved = process.env.DS3_API_KEY;
    try {
      process.env.DS3_API_KEY = "key-a, key-b ,key-c";
      const srv = createServer({ ds3 });
      const { url } = await srv.listen(0, "127.0.0.1");
      try {
        for (const k of ["key-a", "key-b", "key-c"]) expect((await fetch(`${url}/v1/models`, { headers: { Authorization: `Bearer ${k}` } })).status).toBe(200);
        expect((await fetch(`${url}/v1/models`, { headers: { Authorization: "Bearer  key-b" } })).status).toBe(200);
        expect((await fetch(`${url}/v1/models`, { headers: { Authorization: "Bearer key-d" } })).status).toBe(401);
      } finally {
        await srv.close({ graceMs: 0 });
      }
      for (const bad of ["a,,b", "a,", " , a"]) {
        process.env.DS3_API_KEY = bad;
        expect(() => createServer({ ds3 }), bad).toThrow(/DS3_API_KEY: entry \d+ of \d+ is empty/);
      }
    } finally {
      if (saved === undefined) delete process.env.DS3_API_KEY;
      else process.env.DS3_API_KEY = saved;
    }
  });

  it("a request cut by shutdown ends in an error the client recognises, never finish_reason abort", async () => {
    const srv = createServer({ ds3, apiKeys: [], shutdownGraceMs: 300 });
    const { url } = await srv.listen(0, "127.0.0.1");
    const client = new OpenAI({ baseURL: `${url}/v1`, apiKey: "x", maxRetries: 0 });
    const body = { model: "tiny-v3", prompt: [7, 8, 9], max_tokens: 3500, ignore_eos: true };
    // streaming through the openai client: some chunks, then an APIError
    const stream = await client.completions.create({ ...body, stream: true });
    const texts: string[] = [];
    const consumed = (async () => {
      for await (const c of stream) texts.push(JSON.stringify(c));
    })().then(
      () => null,
      (e) => e,
    );
    // non-streaming: a 503 shutting_down instead of a partial answer
    const plain = fetch(`${url}/v1/completions`, { method: "POST", body: JSON.stringify(body) });
    await waitFor(() => srv.inFlight === 2 && texts.length > 0);
    await srv.close();
    const err = await consumed;
    expect(err).toBeInstanceOf(OpenAI.APIError);
    expect(String(err.message)).toMatch(/shut down/);
    expect(texts.join("")).not.toContain('"abort"');
    const r = await plain;
    expect(r.status).toBe(503);
    const j = await r.json();
    expect(j.error.code).toBe("shutting_down");
    await waitFor(() => ds3.engine.stats().running === 0);
    expect(ds3.engine.stats().cacheBlocksUsed).toBe(0);
  });
});
