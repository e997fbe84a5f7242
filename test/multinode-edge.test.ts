// Multi-node edge cases (issue 15, the adversarial review): leaks after close and after a lost
// node (the process must exit on its own, no handle left), a node that falls silent while node 0
// still admits the others, node 0 going away during the handshake (retried), IPv6 and hostname
// init addresses, two node-0s on one port, init addresses that are not HOST:PORT, node 0
// SIGSTOPped while node 1 watches, the messages and responses routes' mid-stream 503, and
// `ds3 serve` SIGTERM draining a request in flight, then ending node 1 (both exit 0).
// Node 0 runs here in the test process where only the node protocol is under test (NodeHub with
// raw or in-process peers), as child processes of the CLI or of helpers/multinode-api.mjs otherwise.
import { join } from "node:path";
import { connect, createServer, type Socket } from "node:net";
import { deserialize, serialize } from "node:v8";
import { cpu } from "@ds3/backend-cpu";
import { checkNodeOptions, DS3, ds3Version, modelIdentity, NodeHub, type NodeHello, parseInitAddr, resolvePrecision } from "@ds3/core";
import { afterEach, describe, expect, it } from "vitest";
import { FIXTURES } from "./helpers/golden.js";
import { alive, ds3, frame, freePort, type Proc, ROOT, start, stderrMatches, within } from "./helpers/multinode.js";
import { namedEvents } from "./helpers/sse.js";

const TINY = join(FIXTURES, "tiny-v3");
const API = join(ROOT, "test/helpers/multinode-api.mjs");
const MAGIC = "ds3-node/2";

const procs: Proc[] = [];
const track = (p: Proc) => (procs.push(p), p);
afterEach(() => {
  for (const p of procs.splice(0)) if (alive(p.pid)) p.child.kill("SIGKILL");
});

const nodeFlags = (tp: number, rank: number, addr: string) => ["--model", TINY, "--tp", String(tp), "--nnodes", "2", "--node-rank", String(rank), "--dist-init-addr", addr, "--dist-timeout", "60"];
const hello = (nnodes: number, worldSize: number): NodeHello => ({
  version: ds3Version(),
  nnodes,
  nodeRank: 0,
  worldSize,
  model: modelIdentity(TINY),
  backend: "cpu",
  precision: resolvePrecision({ cache: "f32" }),
});
const lines = (p: Proc) =>
  p
    .stdout()
    .split("\n")
    .filter((l) => l.trim())
    .map((l) => JSON.parse(l) as { ok?: boolean; ids?: number[]; error?: string; resources?: string[]; exitAfterMs?: number })
    // the stdio pipes to this test are the process's own (a write may be in flight), and a connection
    // may still be ending gracefully (its FIN sent, the peer's on the way): the exit time bounds those
    .map((x) => (x.resources ? { resources: x.resources.filter((r) => !["PipeWrap", "TCPSocketWrap", "SimpleShutdownWrap"].includes(r)) } : x));

/**
 * A node R speaking the node protocol by hand: answers node 0's challenge with `h`, then sends
 * heartbeats every `pingMs` (none if 0). Resolves with the socket and the first message after its hello.
 */
function fakeNode(addr: string, h: NodeHello, pingMs: number): Promise<{ sock: Socket; first: { t: string; message?: string } }> {
  const { host, port } = parseInitAddr(addr);
  return new Promise((resolve, reject) => {
    const sock = connect({ host, port });
    let buf = Buffer.alloc(0);
    sock.on("error", reject);
    sock.on("data", (d) => {
      buf = Buffer.concat([buf, d]);
      while (buf.length >= 4 && buf.length >= 4 + buf.readUInt32LE(0)) {
        const m = deserialize(buf.subarray(4, 4 + buf.readUInt32LE(0))) as { t: string; magic?: string; message?: string };
        buf = buf.subarray(4 + buf.readUInt32LE(0));
        if (m.t === "challenge") sock.write(frame({ t: "hello", magic: MAGIC, body: serialize(h), nonce: Buffer.alloc(32, h.nodeRank) }));
        else if (m.t !== "ping") {
          if (pingMs > 0) {
            const t = setInterval(() => sock.writable && sock.write(frame({ t: "ping" })), pingMs);
            sock.on("close", () => clearInterval(t));
          }
          resolve({ sock, first: m });
        }
      }
    });
  });
}

describe("node 0 admitting the nodes", () => {
  it("a node that falls silent before the group is complete is dropped (not kept as a dead member); a new node with its rank joins and the group works", async () => {
    const addr = `127.0.0.1:${await freePort()}`;
    const log: string[] = [];
    const me = hello(3, 3);
    const hub = NodeHub.listen({ addr, me, timeoutMs: 30_000, heartbeatMs: 50, onProgress: (m) => log.push(m) });
    hub.catch(() => {}); // awaited below; a failure before that is reported there
    await within(
      (async () => {
        while (!log.some((l) => /waiting for 2 nodes/.test(l))) await new Promise((r) => setTimeout(r, 10));
      })(),
      5_000,
      "node 0 listening",
    );
    // node 1 joins, then says nothing (a stopped process): 15 x 50 ms later node 0 must let it go
    const silent = await fakeNode(addr, { ...me, nodeRank: 1 }, 0);
    expect(silent.first.t).toBe("welcome");
    const gone = new Promise<void>((r) => silent.sock.on("close", () => r()));
    await within(gone, 5_000, "node 0 dropping the silent node 1");
    expect(log.join("\n")).toMatch(/node 1 \(127\.0\.0\.1:\d+\) left before the group was complete: no message for 0\.75 s/);
    // the real node 1 and node 2 join: the group is complete, and every member answers
    const [n1, n2] = await Promise.all([fakeNode(addr, { ...me, nodeRank: 1 }, 50), fakeNode(addr, { ...me, nodeRank: 2 }, 50)]);
    expect([n1.first.t, n2.first.t]).toEqual(["welcome", "welcome"]);
    const h = await within(hub, 5_000, "the group");
    // a task to a member: it reaches node 1's live connection (the fake answers nothing: the close rejects it)
    const got = new Promise<string>((r) => n1.sock.on("data", (d) => /task/.test(d.toString("latin1")) && r("task")));
    const run = h.remoteRanks()[0]!.run({ kind: "close" });
    const refused = expect(run).rejects.toThrow(/the node group is closed/);
    expect(await within(got, 5_000, "the task on node 1's connection")).toBe("task");
    await h.close();
    await refused;
    n1.sock.destroy();
    n2.sock.destroy();
  });

  it("two node-0s on one init address: the second fails at once, naming the address and that the port is in use", async () => {
    const addr = `127.0.0.1:${await freePort()}`;
    const first = track(ds3(["serve", ...nodeFlags(2, 0, addr), "--port", "0"]));
    await stderrMatches(first, /node 0: waiting for 1 node at/);
    const second = track(ds3(["generate", ...nodeFlags(2, 0, addr), "--prompt-ids", "0,1"]));
    expect(await within(second.exited, 20_000, "the second node 0")).toBe(1);
    expect(second.stderr()).toContain(`--dist-init-addr ${addr}: the port is in use`);
    expect(alive(first.pid)).toBe(true); // the first one goes on waiting
  });
});

describe("init addresses", () => {
  it.each(["[::1]", "localhost"])("%s:PORT: node 0 listens there, node 1 joins (and retries while node 0 is not up yet); both end cleanly", async (host) => {
    const port = await freePort();
    const addr = `${host}:${port}`;
    const o = { model: TINY, backend: cpu, tp: 2, nnodes: 2, distInitAddr: addr, distTimeoutMs: 20_000 };
    const n1 = DS3.runNode({ ...o, nodeRank: 1 }); // before node 0 listens: it retries
    await new Promise((r) => setTimeout(r, 300));
    const hub = await within(NodeHub.listen({ addr, me: hello(2, 2), timeoutMs: 20_000 }), 20_000, "node 1 joining");
    expect(hub.describe(1)).toMatch(host === "[::1]" ? /^node 1 \(\[::1\]:\d+\) rank 1$/ : /^node 1 \((127\.0\.0\.1|\[::1\]):\d+\) rank 1$/);
    await hub.close();
    await within(n1, 10_000, "node 1 ending");
  });

  it("a connection that node 0 loses during the handshake (node 0 restarted) is retried until the deadline", async () => {
    const port = await freePort();
    const addr = `127.0.0.1:${port}`;
    // the old node 0: accepts and goes away without a word (it was restarted)
    let dropped = 0;
    const old = createServer((s) => {
      dropped++;
      s.destroy();
      old.close();
    });
    await new Promise<void>((r) => old.listen(port, "127.0.0.1", r));
    const n1 = DS3.runNode({ model: TINY, backend: cpu, tp: 2, nnodes: 2, nodeRank: 1, distInitAddr: addr, distTimeoutMs: 20_000 });
    const ended = n1.then(
      () => "resolved",
      (e: Error) => e.message,
    );
    await within(
      (async () => {
        while (dropped === 0) await new Promise((r) => setTimeout(r, 10));
      })(),
      10_000,
      "node 1 reaching the old node 0",
    );
    await new Promise<void>((r) => (old.listening ? old.once("close", () => r()) : r()));
    // the new node 0 on the same address
    const hub = await within(NodeHub.listen({ addr, me: hello(2, 2), timeoutMs: 20_000 }), 20_000, `node 1 joining the new node 0 (node 1: ${await Promise.race([ended, new Promise((r) => setTimeout(() => r("still running"), 3_000))])})`);
    await hub.close();
    expect(await within(ended, 10_000, "node 1 ending")).toBe("resolved");
  });

  it("addresses that are not HOST:PORT are clear errors naming the problem", () => {
    const err = (a: string) => {
      try {
        checkNodeOptions({ nnodes: 2, nodeRank: 1, distInitAddr: a }, 2);
        return "accepted";
      } catch (e) {
        return (e as Error).message;
      }
    };
    expect(err("10.0.0.1")).toBe('--dist-init-addr must be HOST:PORT (e.g. 10.0.0.1:5000), got "10.0.0.1"');
    expect(err("10.0.0.1:")).toBe('--dist-init-addr must be HOST:PORT (e.g. 10.0.0.1:5000), got "10.0.0.1:"');
    expect(err(":5000")).toBe('--dist-init-addr must be HOST:PORT (e.g. 10.0.0.1:5000), got ":5000"');
    expect(err("[::1]")).toBe('--dist-init-addr must be HOST:PORT (e.g. 10.0.0.1:5000), got "[::1]"');
    expect(err("::1:5000")).toBe('--dist-init-addr: an IPv6 address goes in brackets, [::1]:5000, got "::1:5000"');
    expect(err("fe80::1")).toBe('--dist-init-addr: an IPv6 address goes in brackets, [fe80::1]:PORT, got "fe80::1"');
    expect(err("10.0.0.1:0")).toBe('--dist-init-addr: port 0 outside [1, 65535] in "10.0.0.1:0"');
    expect(err("10.0.0.1:70000")).toBe('--dist-init-addr: port 70000 outside [1, 65535] in "10.0.0.1:70000"');
    expect(err("[::1]:5000")).toBe("accepted");
    expect(err("node0.example.com:5000")).toBe("accepted");
  });
});

describe("nothing left behind (the API, no process.exit)", () => {
  it("node 0 (DS3.load) and node 1 (DS3.runNode) each end with no socket, timer or worker left: both processes exit on their own", async () => {
    const addr = `127.0.0.1:${await freePort()}`;
    const n1 = track(start([API, TINY, addr, "1", "2"]));
    const n0 = track(start([API, TINY, addr, "0", "2"]));
    expect(await within(n0.exited, 60_000, "node 0"), n0.stderr()).toBe(0);
    expect(await within(n1.exited, 10_000, "node 1"), n1.stderr()).toBe(0);
    const [r0, left0, exit0] = lines(n0);
    const [r1, left1, exit1] = lines(n1);
    expect(r0!.ok, n0.stdout()).toBe(true);
    expect(r0!.ids).toHaveLength(4);
    expect(r1!.ok, n1.stdout()).toBe(true);
    // no socket, timer, worker, listener (the init port) or message port left: the processes ended on their own
    expect(left0!.resources).toEqual([]);
    expect(left1!.resources).toEqual([]);
    expect(exit0, n0.stdout()).toBeDefined();
    expect(exit1, n1.stdout()).toBeDefined();
  });

  it("node 0 SIGSTOPped while node 1 watches: node 1 (DS3.runNode) fails naming node 0 within its heartbeat bound and its process exits on its own", async () => {
    const addr = `127.0.0.1:${await freePort()}`;
    const n0 = track(ds3(["serve", ...nodeFlags(2, 0, addr), "--port", "0"], { DS3_DIST_HEARTBEAT_MS: "200" }));
    const n1 = track(start([API, TINY, addr, "1", "2"]));
    await n0.waitFor(/http:\/\/\S+\n/);
    n0.child.kill("SIGSTOP");
    const t0 = performance.now();
    expect(await within(n1.exited, 20_000, "node 1")).toBe(1);
    const ms = performance.now() - t0;
    n0.child.kill("SIGKILL");
    const [r1, left1, exit1] = lines(n1);
    expect(r1!.error).toMatch(new RegExp(`^node 0 \\(${addr.replace(/\./g, "\\.")}\\): no message for 3 s \\(heartbeat every 200 ms\\): the node stopped answering`));
    expect(left1!.resources).toEqual([]);
    // not before 15 intervals of 200 ms since node 0's last message (the upper bound is the 20 s
    // `within` above, far below the 300 s step deadline); then out on its own: no half-closed
    // connection to the stopped node 0 left holding the process
    expect(ms).toBeGreaterThanOrEqual(2_600);
    expect(exit1, n1.stdout()).toBeDefined();
  });
});

describe("ds3 serve over two nodes (the built-in model: it has a chat template)", () => {
  const flags = (rank: number, addr: string) => ["--tp", "2", "--nnodes", "2", "--node-rank", String(rank), "--dist-init-addr", addr, "--dist-timeout", "60"];

  it("killing node 1 mid-stream: /v1/messages ends with Anthropic's error event and /v1/responses with error + response.failed, both 503 backend_unavailable naming the node", async () => {
    const addr = `127.0.0.1:${await freePort()}`;
    const n0 = track(ds3(["serve", ...flags(0, addr), "--port", "0"]));
    const n1 = track(ds3(["serve", ...flags(1, addr)]));
    const url = (await n0.waitFor(/http:\/\/\S+\n/, 120_000)).trim();
    const post = (path: string, body: object) => fetch(`${url}${path}`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
    const msgs = await post("/v1/messages", { model: "ds3-builtin-tiny", max_tokens: 3000, temperature: 1, stream: true, messages: [{ role: "user", content: "Talk." }] });
    const resp = await post("/v1/responses", { model: "ds3-builtin-tiny", max_output_tokens: 3000, temperature: 1, stream: true, input: "Talk." });
    expect([msgs.status, resp.status]).toEqual([200, 200]);
    const read = async (r: Response, onEvents: (n: number) => void) => {
      const reader = r.body!.getReader();
      const dec = new TextDecoder();
      let s = "";
      for (;;) {
        const { value, done } = await within(reader.read(), 30_000, "a stream");
        if (done) return s;
        s += dec.decode(value, { stream: true });
        onEvents((s.match(/^event: /gm) ?? []).length);
      }
    };
    let a = 0;
    let b = 0;
    const kill = () => a >= 6 && b >= 6 && !n1.child.killed && n1.child.kill("SIGKILL");
    const [sm, sr] = await Promise.all([read(msgs, (n) => ((a = n), kill())), read(resp, (n) => ((b = n), kill()))]);
    expect(n1.child.killed).toBe(true);
    const events = namedEvents;
    const node = /node 1 \(127\.0\.0\.1:\d+\) rank 1 failed at step \d+: connection lost/;
    const me = events(sm);
    const merr = me.find((e) => e.name === "error");
    expect(merr, sm.slice(-400)).toBeDefined();
    expect(merr!.data.error.type).toBe("overloaded_error"); // Anthropic's type for a 503
    expect(merr!.data.error.message).toMatch(node);
    expect(me.some((e) => e.name === "message_stop")).toBe(false); // cut short, not finished
    const re = events(sr);
    const rerr = re.find((e) => e.name === "error");
    expect(rerr, sr.slice(-400)).toBeDefined();
    expect(rerr!.data.code).toBe("backend_unavailable");
    expect(rerr!.data.message).toMatch(node);
    const failed = re.find((e) => e.name === "response.failed");
    expect(failed?.data.response.status).toBe("failed");
    expect(failed!.data.response.error.code).toBe("backend_unavailable");
    expect(re.some((e) => e.name === "response.completed")).toBe(false);
    expect(await within(n0.exited, 20_000, "node 0 exit")).toBe(1);
  });

  it("SIGTERM on node 0 drains the request in flight (it finishes), then ends node 1: both exit 0", async () => {
    const addr = `127.0.0.1:${await freePort()}`;
    const n0 = track(ds3(["serve", ...nodeFlags(2, 0, addr), "--port", "0"]));
    const n1 = track(ds3(["serve", ...nodeFlags(2, 1, addr)]));
    const url = (await n0.waitFor(/http:\/\/\S+\n/)).trim();
    const res = await fetch(`${url}/v1/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ prompt: [0, 5, 7], max_tokens: 40, temperature: 0, ignore_eos: true, stream: true }),
    });
    const reader = res.body!.getReader();
    const dec = new TextDecoder();
    let sse = "";
    let sent = false;
    for (;;) {
      const { value, done } = await within(reader.read(), 30_000, "the stream");
      if (done) break;
      sse += dec.decode(value, { stream: true });
      if (!sent && (sse.match(/^data: /gm) ?? []).length >= 2) {
        sent = true;
        n0.child.kill("SIGTERM");
      }
    }
    expect(sent).toBe(true);
    const data = sse.split("\n").filter((l) => l.startsWith("data: "));
    expect(data.at(-1)).toBe("data: [DONE]");
    const chunks = data.slice(0, -1).map((l) => JSON.parse(l.slice(6)) as { error?: unknown; choices: Array<{ finish_reason: string | null }> });
    expect(chunks.some((c) => c.error)).toBe(false);
    expect(chunks.at(-1)!.choices[0]!.finish_reason).toBe("length"); // all 40 tokens: drained, not cut
    expect(await within(Promise.all([n0.exited, n1.exited]), 20_000, "both nodes")).toEqual([0, 0]);
  });
});
