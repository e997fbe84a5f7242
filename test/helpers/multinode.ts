// Child processes of the built CLI (and of node) for the multi-node tests: free ports on
// 127.0.0.1, a process with its output collected and its exit awaited, and a check that a
// process is gone.
import { type ChildProcess, spawn } from "node:child_process";
import { connect, createServer } from "node:net";
import { serialize } from "node:v8";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

export const ROOT = fileURLToPath(new URL("../..", import.meta.url));
export const BIN = join(ROOT, "packages/cli/dist/ds3.js");

/** A port that was free a moment ago (the OS picks it; closed again for the child to take). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}

export interface Proc {
  child: ChildProcess;
  pid: number;
  stdout: () => string;
  stderr: () => string;
  /** the exit code (a signal counts as 128 + its number: SIGKILL 137) */
  exited: Promise<number>;
  /** resolves with stdout once it contains `re` (or rejects when the process exits first) */
  waitFor(re: RegExp, timeoutMs?: number): Promise<string>;
}

const SIGNALS: Record<string, number> = { SIGKILL: 9, SIGTERM: 15, SIGINT: 2 };

/** Start `node args...` (args[0] is the script: the CLI's BIN or a helper). */
export function start(args: string[], env: NodeJS.ProcessEnv = {}): Proc {
  const child = spawn(process.execPath, args, { cwd: ROOT, env: { ...process.env, HTTP_PROXY: "http://127.0.0.1:9", HTTPS_PROXY: "http://127.0.0.1:9", ...env } });
  let out = "";
  let err = "";
  child.stdout!.on("data", (d) => (out += d));
  child.stderr!.on("data", (d) => (err += d));
  const exited = new Promise<number>((resolve) => child.on("exit", (code, sig) => resolve(code ?? 128 + (SIGNALS[sig ?? ""] ?? 1))));
  return {
    child,
    pid: child.pid!,
    stdout: () => out,
    stderr: () => err,
    exited,
    waitFor(re, timeoutMs = 60_000) {
      return new Promise((resolve, reject) => {
        const t = setTimeout(() => reject(new Error(`no ${re} within ${timeoutMs} ms; stderr:\n${err}`)), timeoutMs);
        const check = () => {
          if (re.test(out)) {
            clearTimeout(t);
            child.stdout!.off("data", check);
            resolve(out);
          }
        };
        child.stdout!.on("data", check);
        void exited.then((c) => {
          clearTimeout(t);
          reject(new Error(`exited ${c} before ${re}; stderr:\n${err}`));
        });
        check();
      });
    },
  };
}

/** The CLI: `ds3 args...` */
export const ds3 = (args: string[], env: NodeJS.ProcessEnv = {}) => start([BIN, ...args], env);

/** One message as the nodes frame them on the init connection: a 4-byte little-endian length, then v8-serialized bytes. */
export function frame(msg: unknown): Buffer {
  const body = serialize(msg);
  const h = Buffer.alloc(4);
  h.writeUInt32LE(body.length);
  return Buffer.concat([h, body]);
}

/** Split received bytes into the frames' v8-serialized bodies. */
export function unframe(b: Buffer): Buffer[] {
  const out: Buffer[] = [];
  for (let o = 0; o + 4 <= b.length; ) {
    const n = b.readUInt32LE(o);
    if (o + 4 + n > b.length) break;
    out.push(b.subarray(o + 4, o + 4 + n));
    o += 4 + n;
  }
  return out;
}

/**
 * A raw TCP client at HOST:PORT: sends `bytes` (nothing if empty) and resolves when the other
 * side closes the connection, with what it sent and after how long (rejects after `ms`).
 */
export function rawPeer(addr: string, bytes: Buffer, ms = 15_000): Promise<{ received: Buffer; closedAfterMs: number }> {
  const i = addr.lastIndexOf(":");
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const s = connect({ host: addr.slice(0, i), port: Number(addr.slice(i + 1)) });
    const got: Buffer[] = [];
    const t = setTimeout(() => {
      s.destroy();
      reject(new Error(`${addr} did not close the connection within ${ms} ms`));
    }, ms);
    s.on("connect", () => {
      if (bytes.length) s.write(bytes);
    });
    s.on("data", (d) => got.push(d));
    s.on("error", () => {}); // a reset by the peer counts as closing
    s.on("close", () => {
      clearTimeout(t);
      resolve({ received: Buffer.concat(got), closedAfterMs: performance.now() - t0 });
    });
  });
}

/** Whether a process id is still there (signal 0 probes without sending anything). */
export function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** Wait until a process's stderr matches `re` (at most `ms`, then reject with what it printed). */
export async function stderrMatches(p: Proc, re: RegExp, ms = 30_000, what = String(re)): Promise<void> {
  const t0 = Date.now();
  while (!re.test(p.stderr())) {
    if (Date.now() - t0 > ms) throw new Error(`${what}: no ${re} on stderr within ${ms} ms; stderr:\n${p.stderr()}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** Wait for a promise, at most `ms` (then reject naming `what`): no test hangs on a stuck child. */
export function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`${what}: not within ${ms} ms`)), ms);
    p.then(
      (v) => (clearTimeout(t), resolve(v)),
      (e) => (clearTimeout(t), reject(e)),
    );
  });
}

/**
 * A TCP proxy on 127.0.0.1 in front of `target` (HOST:PORT) that holds every chunk it forwards for
 * a random 0 .. maxDelayMs (in order, per direction): node 1 joining through it sees its collective
 * parts reach node 0 sometimes before and sometimes after node 0's own ranks are in. `delayed`
 * counts the chunks it held back.
 */
export async function delayingProxy(target: string, maxDelayMs = 4, seed = 1): Promise<{ addr: string; delayed: () => number; close: () => void }> {
  const i = target.lastIndexOf(":");
  let x = seed >>> 0 || 1;
  const rand = () => ((x = (x * 1103515245 + 12345) >>> 0), x / 2 ** 32); // reproducible delays
  let delayed = 0;
  const socks = new Set<import("node:net").Socket>();
  const pipe = (from: import("node:net").Socket, to: import("node:net").Socket) => {
    let chain = Promise.resolve();
    from.on("data", (d) => {
      const ms = Math.floor(rand() * (maxDelayMs + 1));
      if (ms > 0) delayed++;
      chain = chain.then(() => new Promise<void>((r) => setTimeout(r, ms))).then(() => void (to.writable && to.write(d)));
    });
    from.on("close", () => void chain.then(() => to.destroy()));
    from.on("error", () => {});
  };
  const server = createServer((a) => {
    const b = connect({ host: target.slice(0, i), port: Number(target.slice(i + 1)) });
    socks.add(a).add(b);
    pipe(a, b);
    pipe(b, a);
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  return {
    addr: `127.0.0.1:${(server.address() as { port: number }).port}`,
    delayed: () => delayed,
    close: () => {
      server.close();
      for (const s of socks) s.destroy();
    },
  };
}
