// Ranks across nodes (issue 15), as a user starts them: every node is a real child process of
// the built CLI (node 0 also through the API in a helper script), on 127.0.0.1 with free ports,
// CPU ranks meeting in the cross-process collective. Checked against the golden files and a
// one-node run; a node killed mid-stream must fail the request with the node named and leave
// no process behind; mismatched nodes must fail at startup on both sides.
import { createHmac } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { connect, createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { deserialize, serialize } from "node:v8";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { comparableGreedyPrefix, FIXTURES, loadGolden, maxAbsDiff } from "./helpers/golden.js";
import { alive, delayingProxy, ds3, frame, freePort, type Proc, ROOT, rawPeer, start, stderrMatches, unframe, within } from "./helpers/multinode.js";

const TINY = join(FIXTURES, "tiny-v3");
const BF16 = join(FIXTURES, "tiny-v3-bf16");
const LOGITS = join(ROOT, "test/helpers/multinode-logits.mjs");
const FAULT = join(ROOT, "test/helpers/multinode-fault.mjs");
const BOOT = join(ROOT, "test/helpers/multinode-bootstrap.mjs");
const golden = loadGolden("tiny-v3");
const V = golden.vocab;

let tmp: string;
const procs: Proc[] = [];
const track = (p: Proc) => (procs.push(p), p);

beforeAll(() => {
  tmp = mkdtempSync(join(tmpdir(), "ds3-multinode-"));
});
afterEach(() => {
  // nothing outlives a test, whatever it asserted
  for (const p of procs.splice(0)) if (alive(p.pid)) p.child.kill("SIGKILL");
});
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const nodeFlags = (tp: number, rank: number, addr: string) => ["--model", TINY, "--tp", String(tp), "--nnodes", "2", "--node-rank", String(rank), "--dist-init-addr", addr, "--dist-timeout", "60"];

describe.each([2, 4])("tp %i over two node processes", (tp) => {
  it(`gives the golden logits of tiny-v3 (1e-3), bit-identical to tp ${tp} in one process, prompt by prompt and as one batch of every prompt${tp === 4 ? " (node 1 behind a proxy that delays every chunk at random)" : ""}`, async () => {
    const addr = `127.0.0.1:${await freePort()}`;
    // at tp 4 the link between the nodes delays at random: the collectives' arrival order varies, the sums' order must not
    const proxy = tp === 4 ? await delayingProxy(addr) : null;
    const addr1 = proxy?.addr ?? addr;
    const out = join(tmp, `logits-${tp}.f32`);
    try {
      const n1 = track(ds3(["generate", ...nodeFlags(tp, 1, addr1)]));
      const n0 = track(start([LOGITS, TINY, String(tp), "2", addr, out, "--one-node"]));
      expect(await within(n0.exited, 60_000, "node 0"), n0.stderr()).toBe(0);
      expect(await within(n1.exited, 10_000, "node 1"), n1.stderr()).toBe(0);
      // node 1 ran ranks tp/2 .. tp-1 and said so in one line; it stopped (exit 0) when node 0 ended
      expect(n1.stderr()).toBe(`ds3: node 1 of 2: ${tp === 2 ? "rank 1" : "ranks 2-3"} on cpu, waiting for node 0 at ${addr1}\n`);
      expect(n1.stdout()).toBe("");
      if (proxy) expect(proxy.delayed()).toBeGreaterThan(100);
    } finally {
      proxy?.close();
    }
    const f32 = (b: Buffer) => new Float32Array(b.buffer, b.byteOffset, b.byteLength / 4);
    const multi = readFileSync(out);
    const one = readFileSync(`${out}.one`);
    // the same rank-order sums as on one node: not close, equal
    expect(multi.equals(one)).toBe(true);
    const got = f32(multi);
    let off = 0;
    for (const p of golden.prompts) {
      const n = p.ids.length * V;
      expect(maxAbsDiff(got.subarray(off, off + n), p.logits), `${p.ids.length} tokens`).toBeLessThan(1e-3);
      off += n;
    }
    expect(off).toBe(got.length);
    // every prompt in one step (a batch of sequences of 1 .. 300 tokens): equal to one process, and golden
    const batch = readFileSync(`${out}.batch`);
    expect(batch.equals(readFileSync(`${out}.one.batch`))).toBe(true);
    expect(batch.length).toBe(multi.length);
    const b = f32(batch);
    off = 0;
    for (const p of golden.prompts) {
      const n = p.ids.length * V;
      expect(maxAbsDiff(b.subarray(off, off + n), p.logits), `batched, ${p.ids.length} tokens`).toBeLessThan(1e-3);
      off += n;
    }
  });

  it("gives the golden greedy ids through ds3 generate (every golden prompt, one batch)", async () => {
    const addr = `127.0.0.1:${await freePort()}`;
    const file = join(tmp, `prompts-${tp}.txt`);
    writeFileSync(file, golden.prompts.map((p) => p.ids.join(",")).join("\n") + "\n");
    const n1 = track(ds3(["generate", ...nodeFlags(tp, 1, addr)]));
    const n0 = track(ds3(["generate", ...nodeFlags(tp, 0, addr), "--input-file", file, "--ids", "--temperature", "0", "--max-tokens", "24", "--json"]));
    expect(await within(n0.exited, 60_000, "node 0"), n0.stderr()).toBe(0);
    expect(await within(n1.exited, 10_000, "node 1"), n1.stderr()).toBe(0);
    expect(n0.stderr()).toContain(`over 2 nodes`);
    const rows = n0
      .stdout()
      .split("\n")
      .filter((l) => l.trim())
      .map((l) => JSON.parse(l) as { token_ids: number[] });
    expect(rows).toHaveLength(golden.prompts.length);
    golden.prompts.forEach((p, i) => {
      const k = comparableGreedyPrefix(p);
      expect(rows[i]!.token_ids.slice(0, k), `prompt ${i}`).toEqual(p.greedy.slice(0, k));
    });
  });
});

describe("ds3 serve with a second node", () => {
  it("serves completions from node 0; killing node 1 mid-stream fails the stream naming the node, /health turns 503, node 0 exits, no process is left", async () => {
    const addr = `127.0.0.1:${await freePort()}`;
    const n0 = track(ds3(["serve", ...nodeFlags(2, 0, addr), "--port", "0"]));
    const n1 = track(ds3(["serve", ...nodeFlags(2, 1, addr)]));
    const url = (await n0.waitFor(/http:\/\/\S+\n/)).trim();
    expect(n1.stdout()).toBe(""); // node 1 opens no port and prints no URL

    // a real completion through the server on node 0, the ranks on both nodes
    await goldenCompletion(url);
    const p = golden.prompts[1]!;
    expect((await fetch(`${url}/health`)).status).toBe(200);

    // a long stream; node 1 dies after its first tokens
    const stream = await fetch(`${url}/v1/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ prompt: p.ids, max_tokens: 3000, temperature: 0, ignore_eos: true, stream: true }),
    });
    expect(stream.status).toBe(200);
    const reader = stream.body!.getReader();
    const dec = new TextDecoder();
    let sse = "";
    let killed = false;
    for (;;) {
      const { value, done } = await within(reader.read(), 30_000, "the stream");
      if (done) break;
      sse += dec.decode(value, { stream: true });
      if (!killed && (sse.match(/^data: /gm) ?? []).length >= 3) {
        killed = true;
        n1.child.kill("SIGKILL");
      }
    }
    expect(killed).toBe(true);
    const events = sse
      .split("\n")
      .filter((l) => l.startsWith("data: ") && l !== "data: [DONE]")
      .map((l) => JSON.parse(l.slice(6)) as { error?: { message: string; type: string; code: string } });
    const err = events.find((e) => e.error)?.error;
    expect(err, `no error event in:\n${sse.slice(-500)}`).toBeDefined();
    // the error names the node (its address) and the rank; a lost backend, not an internal error
    expect(err!.message).toMatch(/^engine step failed: RankExecutor: node 1 \(127\.0\.0\.1:\d+\) rank 1 failed at step \d+: connection lost/);
    expect([err!.type, err!.code]).toEqual(["server_error", "backend_unavailable"]);
    expect(events.filter((e) => !e.error).length).toBeLessThan(3000); // cut short, not finished

    // /health says why until node 0 stops
    const h = await fetch(`${url}/health`);
    expect(h.status).toBe(503);
    expect(((await h.json()) as { error: string }).error).toMatch(/node 1 \(127\.0\.0\.1:\d+\) rank 1/);
    // a new request meanwhile: 503 backend_unavailable with the same reason
    const late = await fetch(`${url}/v1/completions`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ prompt: p.ids, max_tokens: 4 }) });
    expect(late.status).toBe(503);
    const lateErr = ((await late.json()) as { error: { message: string; type: string; code: string } }).error;
    expect([lateErr.type, lateErr.code]).toEqual(["server_error", "backend_unavailable"]);
    expect(lateErr.message).toMatch(/node 1 \(127\.0\.0\.1:\d+\) rank 1 failed at step \d+: connection lost/);
    expect(await within(n0.exited, 20_000, "node 0 exit")).toBe(1);
    expect(n0.stderr()).toMatch(/node 0 stops/);
    expect(await n1.exited).toBe(137);
    expect(alive(n0.pid)).toBe(false);
    expect(alive(n1.pid)).toBe(false);
  });

  it("node 0 going away ends node 1 with an error naming node 0", async () => {
    const addr = `127.0.0.1:${await freePort()}`;
    const n0 = track(ds3(["serve", ...nodeFlags(2, 0, addr), "--port", "0"]));
    const n1 = track(ds3(["serve", ...nodeFlags(2, 1, addr)]));
    await n0.waitFor(/http:\/\/\S+\n/);
    n0.child.kill("SIGKILL");
    expect(await within(n1.exited, 20_000, "node 1 exit")).toBe(1);
    expect(n1.stderr()).toContain(`node 0 (${addr}): connection lost`);
    expect(alive(n1.pid)).toBe(false);
  });
});

describe.each(["SIGCONT", "SIGKILL"] as const)("a node that stops answering (SIGSTOP, then %s)", (after) => {
  it("fails the stream in flight naming the node within the heartbeat bound (DS3_DIST_HEARTBEAT_MS), /health turns 503, both nodes exit, no process is left", async () => {
    const addr = `127.0.0.1:${await freePort()}`;
    // node 0's heartbeat interval holds for the group: node 1 gets it in the welcome
    const n0 = track(ds3(["serve", ...nodeFlags(2, 0, addr), "--port", "0"], { DS3_DIST_HEARTBEAT_MS: "250" }));
    const n1 = track(ds3(["serve", ...nodeFlags(2, 1, addr)]));
    const url = (await n0.waitFor(/http:\/\/\S+\n/)).trim();
    const p = golden.prompts[1]!;
    const stream = await fetch(`${url}/v1/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ prompt: p.ids, max_tokens: 3000, temperature: 0, ignore_eos: true, stream: true }),
    });
    expect(stream.status).toBe(200);
    // and a request that is not streamed, in flight when node 1 stops: its JSON answer is the 503
    const plain = fetch(`${url}/v1/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ prompt: p.ids, max_tokens: 3000, temperature: 0, ignore_eos: true }),
    });
    const reader = stream.body!.getReader();
    const dec = new TextDecoder();
    let sse = "";
    let stoppedAt = 0;
    for (;;) {
      const { value, done } = await within(reader.read(), 30_000, "the stream");
      if (done) break;
      sse += dec.decode(value, { stream: true });
      if (!stoppedAt && (sse.match(/^data: /gm) ?? []).length >= 3) {
        n1.child.kill("SIGSTOP");
        stoppedAt = performance.now();
      }
    }
    const failedAfterMs = performance.now() - stoppedAt;
    expect(stoppedAt).toBeGreaterThan(0);
    const err = sse
      .split("\n")
      .filter((l) => l.startsWith("data: ") && l !== "data: [DONE]")
      .map((l) => JSON.parse(l.slice(6)) as { error?: { message: string } })
      .find((e) => e.error)?.error;
    expect(err, `no error event in:\n${sse.slice(-500)}`).toBeDefined();
    expect(err!.message).toMatch(/node 1 \(127\.0\.0\.1:\d+\) rank 1 failed at step \d+: no message for 3\.75 s \(heartbeat every 250 ms\): the node stopped answering/);
    // 15 intervals of 250 ms, checked every 250 ms: not at once, and long before the 300 s step deadline
    expect(failedAfterMs).toBeGreaterThanOrEqual(3_500);
    expect(failedAfterMs).toBeLessThan(15_000);
    const res = await within(plain, 20_000, "the request that is not streamed");
    expect(res.status).toBe(503);
    const body = (await res.json()) as { error: { message: string; type: string; code: string } };
    expect([body.error.type, body.error.code]).toEqual(["server_error", "backend_unavailable"]);
    expect(body.error.message).toMatch(/node 1 \(127\.0\.0\.1:\d+\) rank 1 failed at step \d+: no message for 3\.75 s/);
    const h = await fetch(`${url}/health`);
    expect(h.status).toBe(503);
    expect(((await h.json()) as { error: string }).error).toMatch(/node 1 \(127\.0\.0\.1:\d+\) rank 1/);
    n1.child.kill(after);
    expect(await within(n0.exited, 20_000, "node 0 exit")).toBe(1);
    if (after === "SIGCONT") {
      // node 1 wakes up to a closed connection (or a silent node 0) and ends, naming node 0
      expect(await within(n1.exited, 20_000, "node 1 exit")).toBe(1);
      expect(n1.stderr()).toMatch(new RegExp(`node 0 \\(${addr.replace(/\./g, "\\.")}\\): (connection lost|no message for)`));
    } else expect(await within(n1.exited, 20_000, "node 1 exit")).toBe(137);
    expect(alive(n0.pid)).toBe(false);
    expect(alive(n1.pid)).toBe(false);
  });
});

describe.each(["throw", "exit", "hang"])("a rank on node 1 that fails (%s) at a step", (kind) => {
  it("fails the step and the executor with the node and rank named; node 1 exits non-zero with node 0's reason", async () => {
    const addr = `127.0.0.1:${await freePort()}`;
    const n1 = track(ds3(["generate", ...nodeFlags(2, 1, addr)]));
    const n0 = track(start([FAULT, TINY, addr, kind]));
    expect(await within(n0.exited, 60_000, "node 0"), n0.stderr()).toBe(0);
    expect(await within(n1.exited, 20_000, "node 1")).toBe(1);
    const r = JSON.parse(n0.stdout()) as { logits: number; error: string; failed: string; ms: number };
    expect(r.logits).toBe(V); // step 0 ran on both nodes
    const cause = { throw: "failed at step 1: injected fault at step 1", exit: "exited at step 1: worker exited with code: 7", hang: "did not answer within 3000 ms (step 1)" }[kind]!;
    expect(r.error).toMatch(new RegExp(`^RankExecutor: node 1 \\(127\\.0\\.0\\.1:\\d+\\) rank 1 ${cause.replace(/[()]/g, "\\$&")}`));
    expect(r.failed).toBe(r.error); // what /health reports
    if (kind === "hang") expect(r.ms).toBeGreaterThanOrEqual(3000); // bounded by the step timeout
    expect(n1.stderr()).toContain(`node 0 (${addr}) ended after a failure: ${r.error}`);
    expect(alive(n1.pid)).toBe(false);
  });
});

/** A greedy completion through node 0's server: the golden tokens of prompt 1 (both nodes' ranks ran it). */
async function goldenCompletion(url: string): Promise<void> {
  const p = golden.prompts[1]!;
  const k = comparableGreedyPrefix(p);
  const res = await fetch(`${url}/v1/completions`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ prompt: p.ids, max_tokens: k, temperature: 0, ignore_eos: true, logprobs: 1, return_tokens_as_token_ids: true }),
  });
  expect(res.status).toBe(200);
  const body = (await res.json()) as { choices: Array<{ logprobs: { tokens: string[] } }> };
  expect(body.choices[0]!.logprobs.tokens).toEqual(p.greedy.slice(0, k).map((id) => `token_id:${id}`));
}

/** Whether a TCP connection to HOST:PORT is refused (nobody listens there any more). */
function refused(addr: string): Promise<boolean> {
  const i = addr.lastIndexOf(":");
  return new Promise((resolve) => {
    const s = connect({ host: addr.slice(0, i), port: Number(addr.slice(i + 1)) });
    s.once("connect", () => (s.destroy(), resolve(false)));
    s.once("error", (e: NodeJS.ErrnoException) => resolve(e.code === "ECONNREFUSED"));
  });
}

const MAGIC = "ds3-node/2";
const HELLO = { version: "0.1.0", nnodes: 2, nodeRank: 1, worldSize: 2, model: { path: TINY, configHash: "x", indexHash: "y" }, backend: "cpu", precision: { activations: "f32", cache: "f32", actQuant: "none" } };

describe("the init port is a network service", () => {
  it("drops garbage, an oversized length prefix, a frame that does not deserialize, malformed hellos and a silent connection, each with the reason logged; node 0 keeps waiting, then serves the real node", async () => {
    const addr = `127.0.0.1:${await freePort()}`;
    const n0 = track(ds3(["serve", ...nodeFlags(2, 0, addr), "--port", "0"], { DS3_DIST_HELLO_TIMEOUT_MS: "1000" }));
    await stderrMatches(n0, /node 0: waiting for 1 node at/);
    const nonce = Buffer.alloc(32, 7);
    const drop = /node 0: dropped the connection from 127\.0\.0\.1:\d+: /.source;
    const cases: Array<[string, Buffer, string]> = [
      ["garbage (an HTTP request)", Buffer.from("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), "protocol error: a message of 542393671 bytes, over the limit of 65536"],
      ["a length prefix of 512 MiB", Buffer.from([0, 0, 0, 0x20]), "protocol error: a message of 536870912 bytes, over the limit of 65536"],
      ["a frame that does not deserialize", Buffer.from([4, 0, 0, 0, 0xff, 0x0f, 0x5a, 0x5a]), "protocol error: a message that does not deserialize \\(Unable to deserialize cloned data"],
      ["a frame that is not a node message", frame(42), "protocol error: not a ds3 node message"],
      ["a hello of another protocol", frame({ t: "hello", magic: "ds3-node/1", ...HELLO }), 'a hello of protocol "ds3-node/1", not ds3-node/2'],
      ["a hello whose body is not bytes", frame({ t: "hello", magic: MAGIC, body: "hello", nonce }), "a malformed hello \\(no body or no 32-byte nonce\\)"],
      ["a hello with a number for the version", frame({ t: "hello", magic: MAGIC, body: serialize({ ...HELLO, version: 1 }), nonce }), "a malformed hello: version is not a string \\(number\\)"],
      ["a hello with a string for the node rank", frame({ t: "hello", magic: MAGIC, body: serialize({ ...HELLO, nodeRank: "1" }), nonce }), "a malformed hello: nodeRank is not an integer \\(string\\)"],
      ["a hello without a model", frame({ t: "hello", magic: MAGIC, body: serialize({ ...HELLO, model: null }), nonce }), "a malformed hello: model is not an object"],
      ["a connection that sends nothing", Buffer.alloc(0), "no hello within 1 s"],
    ];
    for (const [what, bytes, reason] of cases) {
      const r = await rawPeer(addr, bytes);
      await stderrMatches(n0, new RegExp(drop + reason), 10_000, what);
      if (bytes.length === 0) expect(r.closedAfterMs, what).toBeGreaterThanOrEqual(900); // the hello deadline, not at once
      expect(alive(n0.pid), what).toBe(true);
    }
    // a ds3 node with a shared secret, node 0 without: refused, naming it on both sides
    const withToken = track(ds3(["serve", ...nodeFlags(2, 1, addr), "--dist-token", "abc"]));
    expect(await within(withToken.exited, 20_000, "the node with a token")).toBe(1);
    expect(withToken.stderr()).toContain(`node 0 (${addr}) refused this node: this node has a --dist-token / DS3_DIST_TOKEN and node 0 has none`);
    await stderrMatches(n0, new RegExp(drop + "it has a shared secret \\(--dist-token / DS3_DIST_TOKEN\\) and node 0 has none"));
    // the real node 1 still joins, and the group serves
    const n1 = track(ds3(["serve", ...nodeFlags(2, 1, addr)]));
    const url = (await n0.waitFor(/http:\/\/\S+\n/)).trim();
    await goldenCompletion(url);
    expect(await refused(addr)).toBe(true); // the group is complete: the init port no longer listens
    // node 0 ends normally (SIGTERM): node 1 ends too, exit 0, after one line saying what it did
    n0.child.kill("SIGTERM");
    expect(await within(Promise.all([n0.exited, n1.exited]), 20_000, "both nodes")).toEqual([0, 0]);
    expect(n1.stderr()).toBe(`ds3: node 1 of 2: rank 1 on cpu, waiting for node 0 at ${addr}\n`);
    expect(n1.stdout()).toBe("");
  });

  it("with a shared secret (DS3_DIST_TOKEN / --dist-token): a wrong or a missing token is refused with a clear error on both sides, the right one joins", async () => {
    const addr = `127.0.0.1:${await freePort()}`;
    const token = "s3cret-token-of-the-group";
    const n0 = track(ds3(["serve", ...nodeFlags(2, 0, addr), "--port", "0"], { DS3_DIST_TOKEN: token }));
    await stderrMatches(n0, /node 0: waiting for 1 node at \S+ \(with a shared secret\)/);
    const drop = /node 0: dropped the connection from 127\.0\.0\.1:\d+: /.source;
    const wrong = track(ds3(["serve", ...nodeFlags(2, 1, addr), "--dist-token", "not-the-token"]));
    expect(await within(wrong.exited, 20_000, "wrong token")).toBe(1);
    expect(wrong.stderr()).toContain(`node 0 (${addr}) refused this node: a wrong shared secret: this node's --dist-token / DS3_DIST_TOKEN is not node 0's`);
    await stderrMatches(n0, new RegExp(drop + "a wrong shared secret \\(--dist-token / DS3_DIST_TOKEN\\)"));
    const none = track(ds3(["serve", ...nodeFlags(2, 1, addr)]));
    expect(await within(none.exited, 20_000, "no token")).toBe(1);
    expect(none.stderr()).toContain(`node 0 (${addr}) refused this node: node 0 requires a shared secret: give this node the same --dist-token / DS3_DIST_TOKEN as node 0`);
    await stderrMatches(n0, new RegExp(drop + "no proof of the shared secret: node 0 requires --dist-token / DS3_DIST_TOKEN"));
    expect(alive(n0.pid)).toBe(true);
    const n1 = track(ds3(["serve", ...nodeFlags(2, 1, addr), "--dist-token", token]));
    const url = (await n0.waitFor(/http:\/\/\S+\n/)).trim();
    await goldenCompletion(url);
    for (const p of [n0, n1, wrong, none]) expect(p.stderr() + p.stdout()).not.toContain(token);
    n0.child.kill("SIGTERM");
    expect(await within(Promise.all([n0.exited, n1.exited]), 20_000, "both nodes")).toEqual([0, 0]);
  });

  it("the token never travels: node 1's hello carries HMAC-SHA256(token, ds3-hello || nonce0 || nonce1 || hello); a node 0 that cannot prove the token is refused", async () => {
    const token = "another-s3cret";
    const nonce0 = Buffer.from(Array.from({ length: 32 }, (_, i) => i));
    let received = Buffer.alloc(0);
    const server = createServer((sock) => {
      sock.write(frame({ t: "challenge", magic: MAGIC, nonce: nonce0, auth: true }));
      sock.on("data", (d) => {
        received = Buffer.concat([received, d]);
        // the hello is in: answer with a welcome whose MAC is not HMAC(token, ...)
        if (unframe(received).length === 1) sock.write(frame({ t: "welcome", heartbeatMs: 2000, mac: Buffer.alloc(32) }));
      });
      sock.on("error", () => {});
    });
    await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
    try {
      const addr = `127.0.0.1:${(server.address() as { port: number }).port}`;
      const n1 = track(ds3(["generate", ...nodeFlags(2, 1, addr)], { DS3_DIST_TOKEN: token }));
      expect(await within(n1.exited, 20_000, "node 1")).toBe(1);
      expect(n1.stderr()).toContain(`node 0 (${addr}) did not prove the shared secret (--dist-token / DS3_DIST_TOKEN)`);
      const [body] = unframe(received);
      const hello = deserialize(body!) as { t: string; magic: string; body: Uint8Array; nonce: Uint8Array; mac: Uint8Array };
      expect([hello.t, hello.magic, hello.nonce.length]).toEqual(["hello", MAGIC, 32]);
      const mac = createHmac("sha256", token).update("ds3-hello").update(nonce0).update(hello.nonce).update(hello.body).digest();
      expect(Buffer.from(hello.mac).equals(mac)).toBe(true);
      expect(deserialize(hello.body)).toMatchObject({ nnodes: 2, nodeRank: 1, worldSize: 2, backend: "cpu" });
      const raw = Buffer.from(token);
      for (const needle of [raw, Buffer.from(token, "utf16le"), Buffer.from(raw.toString("hex")), Buffer.from(raw.toString("base64"))]) expect(received.includes(needle)).toBe(false);
    } finally {
      server.close();
    }
  });
});

describe("device-collective bootstrap across nodes", () => {
  it("rank 0's communicator id (Collective.broadcast in the backend's create) reaches the ranks of node 1, byte for byte", async () => {
    const addr = `127.0.0.1:${await freePort()}`;
    const n1 = track(start([BOOT, TINY, addr, "1"]));
    const n0 = track(start([BOOT, TINY, addr, "0"]));
    expect(await within(n0.exited, 60_000, "node 0"), n0.stderr()).toBe(0);
    expect(await within(n1.exited, 10_000, "node 1"), n1.stderr()).toBe(0);
    const r = JSON.parse(n0.stdout()) as { devices: string[]; logits: number[] };
    expect(r.devices).toHaveLength(4);
    const id = /^comm ([0-9a-f]{256}) rank 0\/4$/.exec(r.devices[0]!)?.[1];
    expect(id, r.devices[0]).toBeDefined();
    expect(r.devices).toEqual([0, 1, 2, 3].map((k) => `comm ${id} rank ${k}/4`));
    expect(r.logits.every(Number.isFinite)).toBe(true);
  });
});

describe("ds3 inspect --nnodes", () => {
  it("plans tp/nnodes ranks per node, node-major", async () => {
    const p = track(ds3(["inspect", "--model", TINY, "--tp", "4", "--nnodes", "2", "--json"]));
    expect(await within(p.exited, 30_000, "inspect"), p.stderr()).toBe(0);
    const plan = (JSON.parse(p.stdout()) as { model: { plan: Array<{ rank: number; node: number; experts: [number, number] }> } }).model.plan;
    expect(plan.map((x) => [x.rank, x.node])).toEqual([[0, 0], [1, 0], [2, 1], [3, 1]]);
    expect(plan.map((x) => x.experts)).toEqual([[0, 4], [4, 8], [8, 12], [12, 16]]);
  });
});

describe("startup errors", () => {
  const both = async (a: string[], b: string[]) => {
    const n0 = track(ds3(a));
    const n1 = track(ds3(b));
    const [c0, c1] = await within(Promise.all([n0.exited, n1.exited]), 60_000, "both nodes");
    return { c0, c1, e0: n0.stderr(), e1: n1.stderr() };
  };

  it("mismatched world sizes fail on both nodes, naming the field and both values", async () => {
    const addr = `127.0.0.1:${await freePort()}`;
    const r = await both(["generate", ...nodeFlags(2, 0, addr), "--prompt-ids", "0,1"], ["generate", ...nodeFlags(4, 1, addr)]);
    expect([r.c0, r.c1]).toEqual([1, 1]);
    expect(r.e0).toMatch(/node 1 \(127\.0\.0\.1:\d+\) does not match node 0: world size \(--tp\) is 2 on node 0 and 4 on node 1/);
    expect(r.e1).toContain(`node 0 (${addr}) refused this node: world size (--tp) is 2 on node 0 and 4 on node 1`);
  });

  it("a different checkpoint on one node (tiny-v3 vs tiny-v3-bf16) fails on both nodes, naming both", async () => {
    const addr = `127.0.0.1:${await freePort()}`;
    const b = nodeFlags(2, 1, addr);
    b[b.indexOf(TINY)] = BF16;
    const r = await both(["serve", ...nodeFlags(2, 0, addr), "--port", "0"], ["serve", ...b]);
    expect([r.c0, r.c1]).toEqual([1, 1]);
    for (const e of [r.e0, r.e1]) {
      expect(e).toContain("the model is");
      expect(e).toContain(`${TINY} (config`);
      expect(e).toContain(`${BF16} (config`);
    }
    expect(r.e0).toMatch(/does not match node 0: the model is/);
    expect(r.e1).toMatch(/refused this node: the model is/);
  });

  it("a node that cannot reach node 0 fails after --dist-timeout, naming the address", async () => {
    const addr = `127.0.0.1:${await freePort()}`; // nobody listens there
    const n1 = track(ds3(["generate", ...nodeFlags(2, 1, addr).slice(0, -1), "1"]));
    expect(await within(n1.exited, 20_000, "node 1")).toBe(1);
    expect(n1.stderr()).toContain(`cannot reach node 0 at ${addr} within 1 s (--dist-timeout): ECONNREFUSED`);
  });

  it("node 0 whose nodes never join fails after --dist-timeout, naming them and the address", async () => {
    const addr = `127.0.0.1:${await freePort()}`;
    const n0 = track(ds3(["generate", ...nodeFlags(2, 0, addr).slice(0, -1), "1", "--prompt-ids", "0,1"]));
    expect(await within(n0.exited, 20_000, "node 0")).toBe(1);
    expect(n0.stderr()).toContain(`node 1 did not join at ${addr} within 1 s (--dist-timeout)`);
  });

  it("a second node with a node rank already taken is refused; the group goes on waiting", async () => {
    const addr = `127.0.0.1:${await freePort()}`;
    const flags = (rank: number) => ["--model", TINY, "--tp", "4", "--nnodes", "4", "--node-rank", String(rank), "--dist-init-addr", addr, "--dist-timeout", "60"];
    const n0 = track(ds3(["serve", ...flags(0), "--port", "0"]));
    const a = track(ds3(["serve", ...flags(1)]));
    await within(
      (async () => {
        while (!/node 1 joined/.test(n0.stderr())) await new Promise((r) => setTimeout(r, 50));
      })(),
      30_000,
      "node 1 joining",
    );
    const b = track(ds3(["serve", ...flags(1)]));
    expect(await within(b.exited, 30_000, "the second node 1")).toBe(1);
    expect(b.stderr()).toMatch(/refused this node: node rank 1 is already taken by 127\.0\.0\.1:\d+/);
    expect(alive(n0.pid) && alive(a.pid)).toBe(true); // still waiting for nodes 2 and 3
  });

  it("a node that does not match ends the whole group at startup: the nodes already in get the reason too", async () => {
    const addr = `127.0.0.1:${await freePort()}`;
    const flags = (rank: number, model = TINY) => ["--model", model, "--tp", "4", "--nnodes", "4", "--node-rank", String(rank), "--dist-init-addr", addr, "--dist-timeout", "60"];
    const n0 = track(ds3(["serve", ...flags(0), "--port", "0"]));
    const n1 = track(ds3(["serve", ...flags(1)]));
    await within(
      (async () => {
        while (!/node 1 joined/.test(n0.stderr())) await new Promise((r) => setTimeout(r, 50));
      })(),
      30_000,
      "node 1 joining",
    );
    const n2 = track(ds3(["serve", ...flags(2, BF16)]));
    const [c0, c1, c2] = await within(Promise.all([n0.exited, n1.exited, n2.exited]), 30_000, "the three nodes");
    expect([c0, c1, c2]).toEqual([1, 1, 1]);
    expect(n0.stderr()).toMatch(/node 2 \(127\.0\.0\.1:\d+\) does not match node 0: the model is/);
    expect(n1.stderr()).toMatch(new RegExp(`node 0 \\(${addr.replace(/\./g, "\\.")}\\) failed at startup: node 2 \\(127\\.0\\.0\\.1:\\d+\\) does not match node 0: the model is`));
    expect(n2.stderr()).toMatch(/refused this node: the model is/);
  });

  it("bad node flags are usage errors before anything loads", async () => {
    const cases: Array<[string[], RegExp]> = [
      [["--tp", "3", "--nnodes", "2", "--dist-init-addr", "127.0.0.1:1"], /--tp 3 is the total over all nodes and must divide by --nnodes 2/],
      [["--tp", "2", "--nnodes", "2", "--node-rank", "2", "--dist-init-addr", "127.0.0.1:1"], /--node-rank 2 is not below --nnodes 2/],
      [["--tp", "2", "--nnodes", "2"], /--nnodes 2 needs --dist-init-addr HOST:PORT/],
      [["--tp", "2", "--nnodes", "2", "--node-rank", "1", "--dist-init-addr", "nohost"], /--dist-init-addr must be HOST:PORT/],
      [["--dist-token", "abc"], /--dist-token goes with --nnodes N/],
      [["--tp", "2", "--nnodes", "2", "--node-rank", "1", "--dist-init-addr", "127.0.0.1:1", "--dist-token", ""], /--dist-token is empty/],
    ];
    for (const [flags, re] of cases) {
      const p = track(ds3(["serve", "--model", TINY, "--port", "0", ...flags]));
      expect(await within(p.exited, 20_000, flags.join(" "))).not.toBe(0);
      expect(p.stderr()).toMatch(re);
      expect(p.stdout()).toBe("");
    }
    // the shared secret is documented where users look
    for (const cmd of ["serve", "generate"]) {
      const h = track(ds3([cmd, "--help"]));
      expect(await within(h.exited, 20_000, `${cmd} --help`)).toBe(0);
      expect(h.stdout()).toMatch(/--dist-token[\s\S]*DS3_DIST_TOKEN[\s\S]*HMAC-SHA256 challenge-response[\s\S]*it never travels/);
    }
  });
});
