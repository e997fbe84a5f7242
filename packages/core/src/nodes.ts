// Ranks across nodes (processes or machines), started as SGLang starts them: every node gets
// `--nnodes N --node-rank R --dist-init-addr HOST:PORT`; `--tp` is the total.
//
// Node 0 runs the engine, the scheduler and the server, and the ranks of its own devices; node
// R > 0 runs only the ranks of its devices: ranks are numbered node-major (node R has ranks
// [R*tp/N, (R+1)*tp/N)). Node 0 listens on the init address; the others connect (with retries up
// to a deadline) and say who they are (NodeHello: ds3 version, model identity, world size, node
// count, node rank, backend, precision): any mismatch fails startup on both sides with the field
// and both values.
//
// The init connection (one TCP connection per node, length-prefixed v8-serialized messages)
// then carries:
// - each step's task (StepInput ...) from node 0's RankExecutor to every remote rank, and the
//   replies back: a remote rank is a RankHandle whose run() is a request on this connection;
// - the host collective between nodes: within a node the ranks meet in SharedCollective (shared
//   memory); the last local arrival hands the chunk to the node's link (CollectivePort), which
//   sends the local ranks' parts to node 0; node 0, once it has every node's parts, sends each
//   node the parts of all other ranks, and every rank then reduces / gathers all worldSize parts
//   in rank order itself. So the sum order is the same as on one node (rank 0, 1, ..., N-1): the
//   result is bit-identical on every rank and to a one-node run. Device backends use this only
//   for `broadcast` (the NCCL unique id / HCCL root info of rank 0); their data plane is the
//   vendor's communicator;
// - aborts (a rank failed: wake every rank blocked in a collective on every node), heartbeats,
//   and close (node 0 ends: the others exit, non-zero after a failure).
//
// The init port is a network service. Whatever reaches it before a node is admitted — garbage, a
// length prefix over the bound, a message that does not deserialize, a hello with wrong types, a
// connection that says nothing within the hello deadline — drops that connection with a logged
// reason, and node 0 goes on waiting for the real nodes. With a shared secret (`distToken`,
// `--dist-token` / DS3_DIST_TOKEN) the handshake is an HMAC-SHA256 challenge-response both ways:
// node 0 sends a nonce, node R answers HMAC(token, "ds3-hello" || nonce0 || nonceR || hello),
// node 0 answers HMAC(token, "ds3-welcome" || nonceR || nonce0 || hello); the token never travels.
// Without one, the init address must be on a trusted network (as torch.distributed's and NCCL's
// are): a peer there can join the group. Either way the connection is not encrypted: steps and
// collective data travel in clear (as NCCL's socket transport's do).
import { createHash, createHmac, randomBytes, timingSafeEqual } from "node:crypto";
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { availableParallelism } from "node:os";
import { type Server, type Socket, connect, createServer, isIPv6 } from "node:net";
import { deserialize, serialize } from "node:v8";
import { type BackendOptions, type Precision, requireOps, resolvePrecision } from "./backend.js";
import { placeRanks } from "./devices.js";
import { loadConfig } from "./executor.js";
import { checkRanksFit } from "./fit.js";
import { checkParallel } from "./model.js";
import {
  type CollectiveBuffers,
  type CollectivePart,
  CollectivePort,
  importProvider,
  newRankThread,
  type RankHandle,
  type RankInit,
  type RankNodes,
  type RankReply,
  type RankTask,
  resolveBackendPackage,
  SharedCollective,
} from "./ranks.js";
import { Checkpoint } from "./safetensors.js";

/** How a process joins a group of nodes (`--nnodes --node-rank --dist-init-addr --dist-timeout`). */
export interface NodeOptions {
  nnodes: number;
  nodeRank: number;
  /** HOST:PORT where node 0 listens ([v6addr]:PORT for IPv6) */
  distInitAddr: string;
  /** how long node 0 waits for the others and the others retry reaching node 0 (ms, default 300 000) */
  distTimeoutMs?: number;
  /**
   * shared secret of the group (`--dist-token` / DS3_DIST_TOKEN): every node proves it knows it in
   * the handshake (HMAC-SHA256 challenge-response both ways); it never travels. The same on every
   * node, or on none.
   */
  distToken?: string;
  /**
   * heartbeat interval (ms; default $DS3_DIST_HEARTBEAT_MS, else 2000): a node that sends nothing
   * for 15 intervals is lost. Node 0's value holds for the whole group (it tells the others).
   */
  heartbeatMs?: number;
  /** how long node 0 gives a new connection to send its hello (ms; default $DS3_DIST_HELLO_TIMEOUT_MS, else 10 000) */
  helloTimeoutMs?: number;
}

export const DEFAULT_DIST_TIMEOUT_MS = 300_000;
export const DEFAULT_HEARTBEAT_MS = 2_000;
/** a node that sends nothing (not even a heartbeat) for this many heartbeat intervals is lost */
export const HEARTBEAT_MISSES = 15;
export const DEFAULT_HELLO_TIMEOUT_MS = 10_000;
/** the largest message before a node is admitted (a hello is well under 1 KiB) */
const HANDSHAKE_MAX_FRAME = 64 * 1024;
/** the largest message after (raised where a collective chunk of every other rank needs more) */
export const MAX_FRAME = 256 * 2 ** 20;
const MAGIC = "ds3-node/2";

/** A duration in ms from the environment (tests), else the default. */
function envMs(name: string, dflt: number): number {
  const v = process.env[name];
  if (v === undefined || v.trim() === "") return dflt;
  const n = Number(v);
  if (!(Number.isFinite(n) && n > 0)) throw new Error(`${name} must be a positive number of milliseconds, got "${v}"`);
  return n;
}

/** The ds3 version that nodes compare (the @ds3/core package version). */
export function ds3Version(): string {
  const req = createRequire(import.meta.url);
  return String((req("../package.json") as { version: string }).version);
}

/** Parse HOST:PORT (or [IPv6]:PORT), with an error naming the flag. */
export function parseInitAddr(s: string): { host: string; port: number } {
  const m = /^\[([^\]]+)\]:(\d+)$/.exec(s) ?? /^([^:\s]+):(\d+)$/.exec(s);
  if (!m) {
    // an IPv6 address without brackets: its last group would read as the port
    const i = s.lastIndexOf(":");
    const withPort = /^\d+$/.test(s.slice(i + 1)) && isIPv6(s.slice(0, i));
    if (withPort || isIPv6(s)) {
      const hint = withPort ? `[${s.slice(0, i)}]:${s.slice(i + 1)}` : `[${s}]:PORT`;
      throw new Error(`--dist-init-addr: an IPv6 address goes in brackets, ${hint}, got "${s}"`);
    }
    throw new Error(`--dist-init-addr must be HOST:PORT (e.g. 10.0.0.1:5000), got "${s}"`);
  }
  const port = Number(m[2]);
  if (!(port >= 1 && port <= 65535)) throw new Error(`--dist-init-addr: port ${m[2]} outside [1, 65535] in "${s}"`);
  return { host: m[1]!, port };
}

/** The checks every node does on its own options, before anything is loaded. */
export function checkNodeOptions(o: NodeOptions, tp: number): { perNode: number; timeoutMs: number; heartbeatMs: number; helloTimeoutMs: number } {
  const { nnodes, nodeRank } = o;
  if (!Number.isInteger(nnodes) || nnodes < 1) throw new Error(`--nnodes must be a positive integer, got ${nnodes}`);
  if (!Number.isInteger(nodeRank) || nodeRank < 0) throw new Error(`--node-rank must be a non-negative integer, got ${nodeRank}`);
  if (nodeRank >= nnodes) throw new Error(`--node-rank ${nodeRank} is not below --nnodes ${nnodes} (node ranks are 0 .. ${nnodes - 1})`);
  if (nnodes > 1 && o.distInitAddr === undefined) throw new Error(`--nnodes ${nnodes} needs --dist-init-addr HOST:PORT (where node 0 listens)`);
  if (tp % nnodes !== 0) throw new Error(`--tp ${tp} is the total over all nodes and must divide by --nnodes ${nnodes} (each node runs tp/nnodes ranks)`);
  parseInitAddr(o.distInitAddr);
  const timeoutMs = o.distTimeoutMs ?? DEFAULT_DIST_TIMEOUT_MS;
  if (!(timeoutMs > 0)) throw new Error(`--dist-timeout must be positive, got ${timeoutMs / 1000} s`);
  if (o.distToken !== undefined && (typeof o.distToken !== "string" || o.distToken === "")) throw new Error("--dist-token (DS3_DIST_TOKEN) must be a non-empty string");
  const heartbeatMs = o.heartbeatMs ?? envMs("DS3_DIST_HEARTBEAT_MS", DEFAULT_HEARTBEAT_MS);
  if (!(Number.isFinite(heartbeatMs) && heartbeatMs > 0)) throw new Error(`the heartbeat interval must be a positive number of ms, got ${heartbeatMs}`);
  const helloTimeoutMs = o.helloTimeoutMs ?? envMs("DS3_DIST_HELLO_TIMEOUT_MS", DEFAULT_HELLO_TIMEOUT_MS);
  if (!(Number.isFinite(helloTimeoutMs) && helloTimeoutMs > 0)) throw new Error(`the hello deadline must be a positive number of ms, got ${helloTimeoutMs}`);
  return { perNode: tp / nnodes, timeoutMs, heartbeatMs, helloTimeoutMs };
}

/** Which checkpoint a node loads: config.json's hash and the hash of its tensor index (names, dtypes, shapes). */
export interface ModelIdentity {
  path: string;
  configHash: string;
  indexHash: string;
}

export function modelIdentity(dir: string): ModelIdentity {
  const h = (x: string | Buffer) => createHash("sha256").update(x).digest("hex").slice(0, 16);
  const ck = Checkpoint.open(dir);
  try {
    const index = ck
      .names()
      .sort()
      .map((n) => {
        const i = ck.info(n);
        return `${n} ${i.dtype} ${i.shape.join("x")}`;
      })
      .join("\n");
    return { path: dir, configHash: h(readFileSync(`${dir}/config.json`)), indexHash: h(index) };
  } finally {
    ck.close();
  }
}

/** What a node says about itself when it joins; node 0 compares every field with its own. */
export interface NodeHello {
  version: string;
  nnodes: number;
  nodeRank: number;
  worldSize: number;
  model: ModelIdentity;
  backend: string;
  precision: Precision;
}

/** The first field where two nodes differ, as "field is A on node 0 and B on node R"; null if none. */
export function helloMismatch(a: NodeHello, b: NodeHello): string | null {
  const m = (x: ModelIdentity) => `${x.path} (config ${x.configHash}, tensors ${x.indexHash})`;
  const p = (x: Precision) => `activations=${x.activations} cache=${x.cache} actQuant=${x.actQuant}`;
  const fields: Array<[string, string, string]> = [
    ["ds3 version", a.version, b.version],
    ["node count (--nnodes)", String(a.nnodes), String(b.nnodes)],
    ["world size (--tp)", String(a.worldSize), String(b.worldSize)],
    ["backend", a.backend, b.backend],
    ["precision", p(a.precision), p(b.precision)],
  ];
  for (const [f, x, y] of fields) if (x !== y) return `${f} is ${x} on node ${a.nodeRank} and ${y} on node ${b.nodeRank}`;
  if (a.model.configHash !== b.model.configHash || a.model.indexHash !== b.model.indexHash)
    return `the model is ${m(a.model)} on node ${a.nodeRank} and ${m(b.model)} on node ${b.nodeRank}`;
  return null;
}

/** What is wrong with a hello's fields (types and sizes), or null: a malformed hello drops only its connection. */
export function helloProblem(h: unknown): string | null {
  const isObj = (x: unknown): x is Record<string, unknown> => !!x && typeof x === "object" && !Array.isArray(x);
  const str = (o: Record<string, unknown>, k: string, where: string) =>
    typeof o[k] === "string" && (o[k] as string).length <= 4096 ? null : `${where}${k} is ${typeof o[k] === "string" ? "over 4096 characters" : `not a string (${typeof o[k]})`}`;
  if (!isObj(h)) return "the hello is not an object";
  for (const k of ["version", "backend"]) {
    const p = str(h, k, "");
    if (p) return p;
  }
  for (const k of ["nnodes", "nodeRank", "worldSize"]) if (!Number.isSafeInteger(h[k])) return `${k} is not an integer (${typeof h[k]})`;
  if (!isObj(h.model)) return "model is not an object";
  for (const k of ["path", "configHash", "indexHash"]) {
    const p = str(h.model, k, "model.");
    if (p) return p;
  }
  if (!isObj(h.precision)) return "precision is not an object";
  for (const k of ["activations", "cache", "actQuant"]) {
    const p = str(h.precision, k, "precision.");
    if (p) return p;
  }
  return null;
}

/** HMAC-SHA256 of the handshake: the token keys it, `label` tells hello from welcome. */
function handshakeMac(token: string, label: string, ...parts: Uint8Array[]): Buffer {
  const h = createHmac("sha256", token).update(label);
  for (const p of parts) h.update(p);
  return h.digest();
}

function macMatches(token: string, got: unknown, label: string, ...parts: Uint8Array[]): boolean {
  if (!(got instanceof Uint8Array) || got.length !== 32) return false;
  return timingSafeEqual(Buffer.from(got.buffer, got.byteOffset, got.length), handshakeMac(token, label, ...parts));
}

function describe(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

// ---------------------------------------------------------------------------------------
// Messages on the init connection

type Msg =
  /** node 0, first thing on a new connection: its nonce, and whether the group has a shared secret */
  | { t: "challenge"; magic: string; nonce: Uint8Array; auth: boolean }
  /** node R's answer: its NodeHello (v8-serialized, so the MAC covers exact bytes), its own nonce, the MAC with a token */
  | { t: "hello"; magic: string; body: Uint8Array; nonce: Uint8Array; mac?: Uint8Array }
  /** node R is in: the group's heartbeat interval, and node 0's MAC with a token */
  | { t: "welcome"; heartbeatMs: number; mac?: Uint8Array }
  | { t: "reject"; message: string }
  | { t: "task"; id: number; rank: number; task: RankTask; chunk?: number }
  | { t: "reply"; id: number; reply?: RankReply; error?: string }
  | { t: "coll"; seq: number; parts: CollectivePart[] }
  | { t: "abort"; reason: string }
  | { t: "close"; error?: string }
  | { t: "ping" };

/** Length-prefixed v8-serialized messages over one socket. */
class Wire {
  private bufs: Buffer[] = [];
  private have = 0;
  /** length of the message being received; -1 while its 4-byte prefix is not in yet */
  private frame = -1;
  lastHeard = Date.now();
  closed = false;
  /** the largest message accepted: small until the peer is admitted (see HANDSHAKE_MAX_FRAME) */
  maxFrame = HANDSHAKE_MAX_FRAME;
  private onMsg: (m: Msg) => void = () => {};
  private onEnd: (why: string) => void = () => {};

  constructor(
    readonly sock: Socket,
    /** the peer, for messages: "127.0.0.1:53122" */
    readonly peer: string,
  ) {
    sock.setNoDelay(true);
    sock.setKeepAlive(true, 10_000);
    sock.on("data", (d) => this.feed(d));
    sock.on("error", (e) => this.end(`connection lost (${(e as NodeJS.ErrnoException).code ?? e.message})`));
    sock.on("close", () => this.end("connection lost"));
  }

  handle(onMsg: (m: Msg) => void, onEnd: (why: string) => void): void {
    this.onMsg = onMsg;
    this.onEnd = onEnd;
  }

  send(m: Msg): void {
    if (this.closed) return;
    const body = serialize(m);
    const h = Buffer.allocUnsafe(4);
    h.writeUInt32LE(body.length);
    this.sock.cork();
    this.sock.write(h);
    this.sock.write(body);
    this.sock.uncork();
  }

  /** end the connection (after what was sent is flushed) */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.sock.end();
    setTimeout(() => this.sock.destroy(), 5_000).unref();
  }

  /** end the connection now, telling the handler why (a protocol error, a lost peer) */
  end(why: string): void {
    if (this.closed) {
      this.sock.destroy();
      return;
    }
    this.closed = true;
    this.sock.destroy();
    this.onEnd(why);
  }

  /** the first n received bytes (n <= have), removed */
  private take(n: number): Buffer {
    const b0 = this.bufs[0]!;
    this.have -= n;
    if (b0.length >= n) {
      if (b0.length === n) this.bufs.shift();
      else this.bufs[0] = b0.subarray(n);
      return b0.subarray(0, n);
    }
    const out = Buffer.allocUnsafe(n);
    for (let o = 0; o < n; ) {
      const b = this.bufs[0]!;
      const k = Math.min(b.length, n - o);
      b.copy(out, o, 0, k);
      o += k;
      if (k === b.length) this.bufs.shift();
      else this.bufs[0] = b.subarray(k);
    }
    return out;
  }

  private feed(d: Buffer): void {
    this.lastHeard = Date.now();
    if (this.closed) return;
    this.bufs.push(d);
    this.have += d.length;
    for (;;) {
      if (this.frame < 0) {
        if (this.have < 4) return;
        this.frame = this.take(4).readUInt32LE(0);
        if (this.frame > this.maxFrame) return this.end(`protocol error: a message of ${this.frame} bytes, over the limit of ${this.maxFrame}`);
      }
      if (this.have < this.frame) return;
      const body = this.take(this.frame);
      this.frame = -1;
      let m: Msg;
      try {
        m = deserialize(body) as Msg;
      } catch (e) {
        return this.end(`protocol error: a message that does not deserialize (${describe(e)})`);
      }
      if (!m || typeof m !== "object" || typeof (m as { t?: unknown }).t !== "string") return this.end("protocol error: not a ds3 node message");
      if (m.t === "ping") continue;
      try {
        this.onMsg(m);
      } catch (e) {
        // a message whose fields do not fit what its type needs: this connection ends, not the process
        return this.end(`protocol error: a malformed "${m.t}" message (${describe(e)})`);
      }
      if (this.closed) return;
    }
  }
}

/**
 * Send a heartbeat every `everyMs` and declare the peer lost after HEARTBEAT_MISSES intervals
 * without a message from it. The last check runs after pending input is read (setImmediate runs
 * after the poll phase): an event loop that was busy for a while does not mistake its own
 * backlog for a silent peer.
 */
function heartbeat(w: Wire, everyMs: number, onSilent: (why: string) => void): () => void {
  const limit = HEARTBEAT_MISSES * everyMs;
  const t = setInterval(() => {
    if (w.closed) return clearInterval(t);
    w.send({ t: "ping" });
    if (Date.now() - w.lastHeard > limit)
      setImmediate(() => {
        if (w.closed || Date.now() - w.lastHeard <= limit) return;
        clearInterval(t);
        onSilent(`no message for ${limit / 1000} s (heartbeat every ${everyMs} ms): the node stopped answering`);
      });
  }, everyMs);
  t.unref();
  return () => clearInterval(t);
}

/** the largest "coll" message of a collective (every rank's part of one chunk), with room for the rest of the message */
function collectiveFrame(b: CollectiveBuffers): number {
  return b.worldSize * b.chunk * 4 + 2 ** 20;
}

function fmtAddr(host: string, port: number): string {
  return host.includes(":") ? `[${host}]:${port}` : `${host}:${port}`;
}

// ---------------------------------------------------------------------------------------
// Node 0

interface Peer {
  nodeRank: number;
  wire: Wire;
  requests: Map<number, { resolve: (r: RankReply) => void; reject: (e: Error) => void }>;
  lost: string | null;
  stopBeat: () => void;
  /** what to do when the node falls silent (changes once the group is complete) */
  onSilent: (why: string) => void;
}

/** How node 0 admits the other nodes (NodeHub.listen). */
export interface ListenOptions {
  addr: string;
  me: NodeHello;
  timeoutMs: number;
  /** the group's shared secret: a node must prove it knows it (see the top of this file) */
  token?: string;
  /** heartbeat interval of the group (ms; default $DS3_DIST_HEARTBEAT_MS, else 2000) */
  heartbeatMs?: number;
  /** how long a new connection has to send its hello (ms; default $DS3_DIST_HELLO_TIMEOUT_MS, else 10 000) */
  helloTimeoutMs?: number;
  /** progress, and the reason each connection that was not admitted was dropped */
  onProgress?: (m: string) => void;
}

/**
 * Node 0's side: listens on the init address, admits the other nodes (checking their hello),
 * then serves RankExecutor as its `nodes` (remote rank handles, the collective link, aborts).
 */
export class NodeHub implements RankNodes {
  readonly perNode: number;
  private readonly peers: Peer[] = []; // index nodeRank - 1
  private nextId = 1;
  private lostHandlers: Array<(rank: number, message: string) => void> = [];
  private closed = false;
  private port: CollectivePort | null = null;
  private readonly chunks = new Map<number, { local?: CollectivePart[]; remote: Map<number, CollectivePart[]> }>();

  private constructor(
    readonly nnodes: number,
    readonly worldSize: number,
    readonly addr: string,
    peers: Peer[],
    /** the group's heartbeat interval (ms) */
    readonly heartbeatMs: number,
  ) {
    this.perNode = worldSize / nnodes;
    this.peers = peers;
    for (const p of peers) {
      p.wire.handle(
        (m) => this.onMessage(p, m),
        (why) => this.lose(p, why),
      );
      // a silent node gets no goodbye: a graceful end to a stopped peer would hold the socket open
      p.onSilent = (why) => p.wire.end(why);
      // gone between its welcome and now: lost from the start (its tasks must fail, not wait)
      if (p.wire.closed) p.lost = "connection lost";
    }
  }

  /**
   * Listen on `addr` and wait until nodes 1 .. nnodes-1 have joined with a hello that matches
   * `me` (or fail: a mismatch, or the deadline). Mismatching nodes get the same error. A
   * connection that is not a ds3 node (garbage, a malformed or late hello, a wrong or missing
   * shared secret) is dropped with the reason logged; the others are still awaited.
   */
  static async listen(o: ListenOptions): Promise<NodeHub> {
    const { host, port } = parseInitAddr(o.addr);
    const need = o.me.nnodes - 1;
    const token = o.token;
    if (token !== undefined && (typeof token !== "string" || token === "")) throw new Error("--dist-token (DS3_DIST_TOKEN) must be a non-empty string");
    const heartbeatMs = o.heartbeatMs ?? envMs("DS3_DIST_HEARTBEAT_MS", DEFAULT_HEARTBEAT_MS);
    const helloMs = o.helloTimeoutMs ?? envMs("DS3_DIST_HELLO_TIMEOUT_MS", DEFAULT_HELLO_TIMEOUT_MS);
    const log = o.onProgress ?? (() => {});
    const joined = new Map<number, Peer>();
    const server: Server = createServer();
    const conns = new Set<Wire>();
    /** the last few connections dropped, for the deadline's message */
    const dropped: string[] = [];
    return await new Promise<NodeHub>((resolve, reject) => {
      let done = false;
      const timer = setTimeout(() => {
        const missing = Array.from({ length: need }, (_, i) => i + 1).filter((r) => !joined.has(r));
        fail(
          new Error(
            `node${missing.length > 1 ? "s" : ""} ${missing.join(", ")} did not join at ${o.addr} within ${o.timeoutMs / 1000} s (--dist-timeout)` +
              (dropped.length ? `; connections dropped meanwhile: ${dropped.join("; ")}` : ""),
          ),
        );
      }, o.timeoutMs);
      const fail = (e: Error) => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        for (const w of conns) {
          w.send({ t: "reject", message: `node 0 (${o.addr}) failed at startup: ${e.message}` });
          w.close();
        }
        server.close();
        reject(e);
      };
      server.on("error", (e: NodeJS.ErrnoException) =>
        fail(new Error(e.code === "EADDRINUSE" ? `--dist-init-addr ${o.addr}: the port is in use` : e.code === "EADDRNOTAVAIL" ? `--dist-init-addr ${o.addr}: not an address of this machine` : `--dist-init-addr ${o.addr}: ${e.message}`)),
      );
      server.on("connection", (sock) => {
        const w = new Wire(sock, fmtAddr(sock.remoteAddress ?? "?", sock.remotePort ?? 0));
        if (done) return w.close();
        conns.add(w);
        const nonce = randomBytes(32);
        let settled = false;
        /** not admitted: log why, tell the peer (if it listens), keep waiting for the real nodes */
        const drop = (why: string, tell?: string) => {
          if (settled) return;
          settled = true;
          clearTimeout(t);
          log(`node 0: dropped the connection from ${w.peer}: ${why}`);
          dropped.push(`${w.peer}: ${why}`);
          if (dropped.length > 3) dropped.shift();
          if (tell) w.send({ t: "reject", message: `node 0 (${o.addr}) refused this node: ${tell}` });
          conns.delete(w);
          w.close();
        };
        const t = setTimeout(() => drop(`no hello within ${helloMs / 1000} s`), helloMs);
        w.handle(
          (m) => {
            if (settled) return;
            clearTimeout(t);
            if (m.t !== "hello" || m.magic !== MAGIC)
              return drop(
                m.t === "hello" ? `a hello of protocol ${JSON.stringify(m.magic)}, not ${MAGIC} (another ds3 version?)` : `not a ds3 node hello (a "${m.t}" message)`,
                `expected a ${MAGIC} hello (is this node the same ds3 version?)`,
              );
            if (!(m.body instanceof Uint8Array) || !(m.nonce instanceof Uint8Array) || m.nonce.length !== 32) return drop("a malformed hello (no body or no 32-byte nonce)", "a malformed hello");
            if (token !== undefined) {
              if (m.mac === undefined)
                return drop(
                  "no proof of the shared secret: node 0 requires --dist-token / DS3_DIST_TOKEN",
                  "node 0 requires a shared secret: give this node the same --dist-token / DS3_DIST_TOKEN as node 0",
                );
              if (!macMatches(token, m.mac, "ds3-hello", nonce, m.nonce, m.body))
                return drop("a wrong shared secret (--dist-token / DS3_DIST_TOKEN)", "a wrong shared secret: this node's --dist-token / DS3_DIST_TOKEN is not node 0's");
            } else if (m.mac !== undefined)
              return drop(
                "it has a shared secret (--dist-token / DS3_DIST_TOKEN) and node 0 has none",
                "this node has a --dist-token / DS3_DIST_TOKEN and node 0 has none: give every node the same one, or none",
              );
            let h: unknown;
            try {
              h = deserialize(m.body);
            } catch (e) {
              return drop(`a hello that does not deserialize (${describe(e)})`, "a malformed hello");
            }
            const malformed = helloProblem(h);
            if (malformed) return drop(`a malformed hello: ${malformed}`, `a malformed hello: ${malformed}`);
            const hello = h as NodeHello;
            settled = true;
            const rank = hello.nodeRank;
            const who = `node ${rank} (${w.peer})`;
            if (rank < 1 || rank >= o.me.nnodes) {
              const msg = `${who} has node rank ${rank}, outside 1 .. ${o.me.nnodes - 1} (--nnodes ${o.me.nnodes} on node 0)`;
              w.send({ t: "reject", message: `node 0 (${o.addr}) refused this node: ${msg}` });
              conns.delete(w);
              w.close();
              return fail(new Error(msg));
            }
            if (joined.has(rank)) {
              // the first one is the real node: refuse the duplicate, keep waiting for the rest
              const msg = `node rank ${rank} is already taken by ${joined.get(rank)!.wire.peer}`;
              w.send({ t: "reject", message: `node 0 (${o.addr}) refused this node: ${msg}` });
              conns.delete(w);
              w.close();
              log(`refused a second node ${rank} from ${w.peer}: ${msg}`);
              return;
            }
            const bad = helloMismatch(o.me, hello);
            if (bad) {
              w.send({ t: "reject", message: `node 0 (${o.addr}) refused this node: ${bad}` });
              conns.delete(w);
              w.close();
              return fail(new Error(`${who} does not match node 0: ${bad}`));
            }
            w.send({ t: "welcome", heartbeatMs, ...(token !== undefined && { mac: handshakeMac(token, "ds3-welcome", m.nonce, nonce, m.body) }) });
            w.maxFrame = MAX_FRAME;
            const peer: Peer = { nodeRank: rank, wire: w, requests: new Map(), lost: null, stopBeat: () => {}, onSilent: (why) => w.end(why) };
            peer.stopBeat = heartbeat(w, heartbeatMs, (why) => peer.onSilent(why));
            joined.set(rank, peer);
            log(`node ${rank} joined from ${w.peer} (${joined.size} of ${need})`);
            if (joined.size === need) {
              done = true;
              clearTimeout(timer);
              server.close(); // no more nodes; the joined connections stay
              resolve(new NodeHub(o.me.nnodes, o.me.worldSize, o.addr, [...joined.values()].sort((a, b) => a.nodeRank - b.nodeRank), heartbeatMs));
            } else
              w.handle(
                () => {},
                (why) => {
                  // gone (or silent) before the group was complete: dropped, the node may join again
                  peer.stopBeat();
                  if (joined.get(rank) === peer) joined.delete(rank);
                  conns.delete(w);
                  log(`node 0: ${who} left before the group was complete: ${why}`);
                },
              );
          },
          (why) => drop(why === "connection lost" ? "closed before its hello" : why),
        );
        w.send({ t: "challenge", magic: MAGIC, nonce, auth: token !== undefined });
      });
      server.listen(port, host, () => log(`node 0: waiting for ${need} node${need > 1 ? "s" : ""} at ${o.addr}${token !== undefined ? " (with a shared secret)" : ""}`));
    });
  }

  describe(rank: number): string {
    const k = Math.floor(rank / this.perNode);
    if (k === 0) return `node 0 rank ${rank}`;
    return `node ${k} (${this.peers[k - 1]!.wire.peer}) rank ${rank}`;
  }

  onLost(f: (rank: number, message: string) => void): void {
    this.lostHandlers.push(f);
  }

  remoteRanks(): RankHandle[] {
    return Array.from({ length: this.worldSize - this.perNode }, (_, i) => {
      const rank = this.perNode + i;
      const peer = this.peers[Math.floor(rank / this.perNode) - 1]!;
      return { run: (task: RankTask) => this.request(peer, rank, task), destroy: async () => {} };
    });
  }

  private request(p: Peer, rank: number, task: RankTask): Promise<RankReply> {
    if (p.lost) return Promise.reject(new Error(p.lost));
    if (this.closed) return Promise.reject(new Error("the node group is closed"));
    if (p.wire.closed) return Promise.reject(new Error("connection lost"));
    const id = this.nextId++;
    let t: RankTask = task;
    let chunk: number | undefined;
    if (task.kind === "init") {
      // shared memory and this node's device do not travel: the node puts in its own
      chunk = task.collective?.chunk;
      t = { ...task, collective: null, progress: undefined };
    }
    return new Promise<RankReply>((resolve, reject) => {
      p.requests.set(id, { resolve, reject });
      p.wire.send({ t: "task", id, rank, task: t, ...(chunk !== undefined && { chunk }) });
    });
  }

  private onMessage(p: Peer, m: Msg): void {
    if (m.t === "reply") {
      const r = p.requests.get(m.id);
      if (!r) return;
      p.requests.delete(m.id);
      if (m.reply) r.resolve(m.reply);
      else r.reject(new Error(m.error ?? "no reply"));
    } else if (m.t === "coll") {
      let c = this.chunks.get(m.seq);
      if (!c) this.chunks.set(m.seq, (c = { remote: new Map() }));
      c.remote.set(p.nodeRank, m.parts);
      this.tryComplete(m.seq);
    } else if (m.t === "abort") {
      if (this.port) SharedCollective.abort(this.port.b);
    }
  }

  link(coll: CollectiveBuffers): void {
    // node 0 sends each node the parts of all other ranks of a chunk in one message
    for (const p of this.peers) p.wire.maxFrame = Math.max(MAX_FRAME, collectiveFrame(coll));
    const port = (this.port = new CollectivePort(coll));
    void (async () => {
      for (;;) {
        const c = await port.next();
        if (!c) return;
        let e = this.chunks.get(c.seq);
        if (!e) this.chunks.set(c.seq, (e = { remote: new Map() }));
        e.local = c.parts;
        this.tryComplete(c.seq);
      }
    })();
  }

  /** Every node's parts of chunk `seq` are here: release this node's ranks, send each node the others' parts. */
  private tryComplete(seq: number): void {
    const c = this.chunks.get(seq);
    if (!c?.local || c.remote.size < this.peers.length) return;
    this.chunks.delete(seq);
    const all = [c.local, ...this.peers.map((p) => c.remote.get(p.nodeRank)!)];
    for (const p of this.peers) p.wire.send({ t: "coll", seq, parts: all.filter((_, k) => k !== p.nodeRank).flat() });
    this.port!.complete(seq, all.slice(1).flat());
  }

  abort(reason: string): void {
    if (this.port) SharedCollective.abort(this.port.b);
    for (const p of this.peers) if (!p.lost) p.wire.send({ t: "abort", reason });
  }

  private lose(p: Peer, why: string): void {
    if (p.lost || this.closed) return;
    p.lost = why;
    p.stopBeat();
    for (const r of p.requests.values()) r.reject(new Error(why));
    p.requests.clear();
    const first = p.nodeRank * this.perNode;
    const msg = `${this.describe(first)}${this.perNode > 1 ? ` (and the node's other ranks to ${first + this.perNode - 1})` : ""}: ${why}`;
    this.abort(msg);
    for (const f of this.lostHandlers) f(first, msg);
  }

  async close(error?: string): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.port) SharedCollective.abort(this.port.b); // ends the link
    await Promise.all(
      this.peers.map(
        (p) =>
          new Promise<void>((resolve) => {
            p.stopBeat();
            for (const r of p.requests.values()) r.reject(new Error("the node group is closed"));
            if (p.lost) return resolve();
            p.wire.send({ t: "close", ...(error !== undefined && { error }) });
            p.wire.sock.once("close", () => resolve());
            p.wire.close();
            setTimeout(resolve, 5_000).unref();
          }),
      ),
    );
  }
}

// ---------------------------------------------------------------------------------------
// Nodes 1 .. N-1

export interface RunNodeOptions extends NodeOptions {
  dir: string;
  /** backend package (name or entry URL) the ranks import */
  backendPackage: string;
  backendOptions?: Omit<BackendOptions, "collective">;
  /** total ranks over all nodes */
  worldSize: number;
  /** this node's device per local rank */
  devices?: readonly number[];
  shareDevices?: boolean;
  threadsPerRank?: number;
  onProgress?: (m: string) => void;
}

/** Connect to node 0 at `addr`, retrying with backoff until the deadline. */
async function reach(addr: string, deadline: number, timeoutMs: number): Promise<Socket> {
  const { host, port } = parseInitAddr(addr);
  let wait = 100;
  let last = "";
  for (;;) {
    const r = await new Promise<Socket | string>((resolve) => {
      const s = connect({ host, port });
      const t = setTimeout(() => {
        s.destroy();
        resolve("ETIMEDOUT");
      }, Math.max(100, Math.min(10_000, deadline - Date.now())));
      s.once("connect", () => {
        clearTimeout(t);
        s.removeAllListeners("error");
        resolve(s);
      });
      s.once("error", (e: NodeJS.ErrnoException) => {
        clearTimeout(t);
        s.destroy();
        resolve(e.code ?? e.message);
      });
    });
    if (typeof r !== "string") return r;
    last = r;
    if (Date.now() + wait > deadline) throw new Error(`cannot reach node 0 at ${addr} within ${timeoutMs / 1000} s (--dist-timeout): ${last}`);
    await new Promise((res) => setTimeout(res, wait));
    wait = Math.min(2_000, wait * 2);
  }
}

/**
 * Run this node's ranks (node rank > 0) for node 0's engine: join node 0, load the ranks when
 * it says so, run their steps, and resolve when node 0 ends (reject when node 0 ended after a
 * failure, closed the connection, or refused this node).
 */
export async function runNode(o: RunNodeOptions): Promise<void> {
  const { perNode, timeoutMs } = checkNodeOptions(o, o.worldSize);
  if (o.nodeRank === 0) throw new Error("runNode runs a node other than node 0 (node 0 runs the engine: DS3.load)");
  const say = o.onProgress ?? (() => {});
  const cfg = loadConfig(o.dir);
  checkParallel(cfg, o.worldSize);
  const backendUrl = resolveBackendPackage(o.backendPackage);
  const provider = await importProvider(backendUrl, o.backendPackage);
  const avail = provider.available();
  if (!avail.ok) throw new Error(`backend "${provider.name}" is not available: ${avail.reason}`);
  const precision = resolvePrecision(o.backendOptions?.precision);
  requireOps(provider, precision);
  const placement = placeRanks(provider, perNode, { devices: o.devices, shareDevices: o.shareDevices });
  const first = o.nodeRank * perNode;
  const me: NodeHello = {
    version: ds3Version(),
    nnodes: o.nnodes,
    nodeRank: o.nodeRank,
    worldSize: o.worldSize,
    model: modelIdentity(o.dir),
    backend: provider.name,
    precision,
  };
  const deadline = Date.now() + timeoutMs;
  say(`node ${o.nodeRank}: reaching node 0 at ${o.distInitAddr}`);
  const there = `node 0 (${o.distInitAddr})`;
  // the handshake: node 0's challenge, this node's hello (with the MAC when there is a token),
  // node 0's welcome (with its MAC) or reject; what comes right after the welcome waits in `early`
  const early: Msg[] = [];
  let heartbeatMs = DEFAULT_HEARTBEAT_MS;
  const token = o.distToken;
  function handshake(w: Wire): Promise<{ heartbeatMs: number }> {
    let welcomed = false;
    return new Promise<{ heartbeatMs: number }>((resolve, reject) => {
      const t = setTimeout(() => {
        w.close();
        reject(new Error(`${there} did not answer this node's hello within ${timeoutMs / 1000} s`));
      }, Math.max(1_000, deadline - Date.now()));
      const fail = (e: Error) => {
        clearTimeout(t);
        w.close();
        reject(e);
      };
      const mine = randomBytes(32);
      let theirs: Uint8Array | null = null;
      let body: Buffer | null = null;
      w.handle(
        (m) => {
          if (welcomed) return void early.push(m);
          if (m.t === "reject") return fail(new Error(String(m.message)));
          if (!theirs || !body) {
            if (m.t !== "challenge" || m.magic !== MAGIC || !(m.nonce instanceof Uint8Array) || m.nonce.length !== 32)
              return fail(new Error(`${there} is not a ds3 node 0 speaking ${MAGIC}: it sent ${m.t === "challenge" ? `a challenge of protocol ${JSON.stringify(m.magic)}` : `a "${m.t}" message`} first (another ds3 version, or not ds3 at all)`));
            theirs = m.nonce;
            body = serialize(me);
            w.send({ t: "hello", magic: MAGIC, body, nonce: mine, ...(token !== undefined && { mac: handshakeMac(token, "ds3-hello", theirs, mine, body) }) });
            return;
          }
          if (m.t !== "welcome") return fail(new Error(`${there} sent ${m.t} before welcome`));
          if (token !== undefined && !macMatches(token, m.mac, "ds3-welcome", mine, theirs, body))
            return fail(new Error(`${there} did not prove the shared secret (--dist-token / DS3_DIST_TOKEN): its token is not this node's, or it is not this group's node 0`));
          if (!(typeof m.heartbeatMs === "number" && m.heartbeatMs > 0 && Number.isFinite(m.heartbeatMs))) return fail(new Error(`${there} sent a welcome without a heartbeat interval`));
          clearTimeout(t);
          welcomed = true;
          w.maxFrame = MAX_FRAME;
          resolve({ heartbeatMs: m.heartbeatMs });
        },
        (why) => {
          clearTimeout(t);
          // the connection went away before node 0 said anything decisive (a reject, a welcome): worth another try
          reject(Object.assign(new Error(`${there}: ${why} during the handshake`), { retry: /^connection lost/.test(why) }));
        },
      );
    });
  }
  // a connection that node 0 drops before its welcome (node 0 restarted, or not yet ready) is retried until the deadline
  let w!: Wire;
  for (let wait = 100; ; wait = Math.min(2_000, wait * 2)) {
    w = new Wire(await reach(o.distInitAddr, deadline, timeoutMs), o.distInitAddr);
    try {
      ({ heartbeatMs } = await handshake(w));
      break;
    } catch (e) {
      if (!(e as { retry?: boolean }).retry || Date.now() + wait > deadline) throw e;
      say(`node ${o.nodeRank}: ${describe(e)}; trying again`);
      await new Promise((r) => setTimeout(r, wait));
    }
  }
  say(`node ${o.nodeRank}: joined ${there} as ranks ${first}..${first + perNode - 1} of ${o.worldSize}; waiting for the load`);

  const threads = o.threadsPerRank ?? o.backendOptions?.threads ?? Math.max(1, Math.floor(availableParallelism() / perNode));
  const ranks: RankHandle[] = Array.from({ length: perNode }, () => newRankThread());
  let coll: CollectiveBuffers | null = null;
  let port: CollectivePort | null = null;
  let end: (e: Error | null) => void = () => {};
  // node 0 silent: no goodbye (a graceful end to a stopped peer would hold the socket open); end() follows
  const stopBeat = heartbeat(w, heartbeatMs, (why) => w.end(why));
  const finished = new Promise<void>((resolve, reject) => {
    let ended = false;
    end = (e) => {
      if (ended) return;
      ended = true;
      stopBeat();
      if (coll) SharedCollective.abort(coll);
      void Promise.allSettled(ranks.map((r) => r.destroy())).then(() => {
        w.close();
        if (e) reject(e);
        else resolve();
      });
    };
  });

  const startLink = (b: CollectiveBuffers) => {
    port = new CollectivePort(b);
    const p = port;
    void (async () => {
      for (;;) {
        const c = await p.next();
        if (!c) return;
        w.send({ t: "coll", seq: c.seq, parts: c.parts });
      }
    })();
  };

  /** whether this node's ranks fit their devices (checked at node 0's load, which brings the cache size): null once it is known they do */
  let unfit: string | null | undefined;
  const runTask = (id: number, rank: number, task: RankTask, chunk?: number) => {
    const i = rank - first;
    if (!(i >= 0 && i < perNode)) return w.send({ t: "reply", id, error: `rank ${rank} is not on node ${o.nodeRank} (ranks ${first}..${first + perNode - 1})` });
    let t = task;
    if (task.kind === "init") {
      if (unfit === undefined) {
        try {
          checkRanksFit({ provider, ck: o.dir, cfg, worldSize: o.worldSize, first, devices: placement.devices, cache: task.cache, mtp: task.mtp });
          unfit = null;
        } catch (e) {
          unfit = describe(e);
        }
      }
      if (unfit) return w.send({ t: "reply", id, error: unfit });
      if (o.worldSize > 1 && !coll) {
        coll = SharedCollective.allocate(o.worldSize, chunk, { first, count: perNode });
        w.maxFrame = Math.max(MAX_FRAME, collectiveFrame(coll));
        startLink(coll);
      }
      const init: RankInit = {
        ...task,
        dir: o.dir,
        backendUrl,
        backendPackage: o.backendPackage,
        backendOptions: {
          ...task.backendOptions,
          ...o.backendOptions,
          precision,
          threads,
          device: placement.devices[i]!,
          ...(!placement.deviceCollectives && { deviceCollectives: false }),
        },
        collective: coll,
        progress: undefined,
      };
      t = init;
    }
    ranks[i]!.run(t).then(
      (reply) => w.send({ t: "reply", id, reply }),
      (e) => w.send({ t: "reply", id, error: describe(e) }),
    );
  };

  const onMsg = (m: Msg) => {
    if (m.t === "task") runTask(m.id, m.rank, m.task, m.chunk);
    else if (m.t === "coll") port?.complete(m.seq, m.parts);
    else if (m.t === "abort") {
      if (coll) SharedCollective.abort(coll);
    } else if (m.t === "close") end(m.error !== undefined ? new Error(`${there} ended after a failure: ${m.error}`) : null);
    else if (m.t === "reject") end(new Error(m.message)); // node 0 failed to start (another node did not match, or did not join)
  };
  w.handle(onMsg, (why) => end(new Error(`${there}: ${why}`)));
  for (const m of early.splice(0)) onMsg(m);
  if (w.closed) end(new Error(`${there}: connection lost`));
  return finished;
}
