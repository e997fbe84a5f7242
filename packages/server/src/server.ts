// The embeddable OpenAI-compatible server. createServer() returns a request handler that any
// node:http stack can mount, plus listen()/close() for running it on its own. No globals:
// several servers (on one model or several) can live in one process.
//
// The pieces: http.ts (routing, auth, CORS, bodies, errors), context.ts (what routes share),
// stream.ts (admission, running choices, SSE), pipeline.ts (the chat pipeline), routes/ (one
// file per endpoint, listed in routes/index.ts).
import { type IncomingMessage, type Server, type ServerResponse, createServer as createHttpServer } from "node:http";
import type { AddressInfo, Socket } from "node:net";
import { type ServerModel, createContext } from "./context.js";
import { createHttp } from "./http.js";
import { ServerMetrics } from "./metrics.js";
import type { ReasoningMode } from "./reasoning.js";
import { routes } from "./routes/index.js";

export type { ServerModel } from "./context.js";

export interface ServerOptions {
  /** the loaded model (a DS3 from @ds3/core) */
  ds3: ServerModel;
  /** accepted API keys; default: $DS3_API_KEY (comma-separated); none: no authentication */
  apiKeys?: string | string[];
  /** largest request body (bytes); default 4 MiB. Larger ones get 413 (from a declared
   *  Content-Length before reading, and never after a 100 Continue) */
  maxBodyBytes?: number;
  /** listen(): most time to receive a request's headers and body (ms), else 408; default 30000 */
  requestTimeoutMs?: number;
  /** listen(): most open connections; more are closed at once; default 4096 */
  maxConnections?: number;
  /** CORS: off by default; true allows any origin, or give the allowed origins */
  cors?: boolean | string | string[];
  /** the model id clients send and /v1/models lists; default the model's name */
  modelName?: string;
  /** most sequences (choices) in flight before new requests get 429; default 1024 */
  maxQueue?: number;
  /** how long close() lets in-flight requests finish before cancelling them (ms); default 10000 */
  shutdownGraceMs?: number;
  /** Retry-After seconds sent with 429; default 1 */
  retryAfterSeconds?: number;
  /** reasoning_content parsing (see reasoning.ts); default "auto" */
  reasoning?: ReasoningMode;
  /** listen() installs SIGINT/SIGTERM handlers that close() the server and then call onSignal (default: exit) */
  handleSignals?: boolean;
  onSignal?: (signal: NodeJS.Signals) => void | Promise<void>;
  /** one line per request and lifecycle event; default silent */
  log?: (line: string) => void;
}

export interface Ds3Server {
  /** mount in any node:http stack: (req, res) => void */
  readonly handler: (req: IncomingMessage, res: ServerResponse) => void;
  /** for a mounting server's 'checkContinue' event (else node sends 100 Continue even to bodies over the limit) */
  readonly checkContinue: (req: IncomingMessage, res: ServerResponse) => void;
  listen(port?: number, host?: string): Promise<{ host: string; port: number; url: string }>;
  /** stop accepting, let in-flight requests finish within the grace period, cancel the rest */
  close(opts?: { graceMs?: number }): Promise<void>;
  /** the node:http server once listen() was called */
  readonly httpServer: Server | null;
  readonly metrics: ServerMetrics;
  /** sequences in flight */
  readonly inFlight: number;
  readonly modelName: string;
}

export function createServer(opts: ServerOptions): Ds3Server {
  const ds3 = opts.ds3;
  if (!ds3?.engine) throw new TypeError("createServer: ds3 (a loaded model) is required");
  const engine = ds3.engine;
  const modelName = opts.modelName ?? ds3.modelName;
  const graceDefault = opts.shutdownGraceMs ?? 10_000;
  const log = opts.log ?? (() => {});

  let closing = false;
  let closed: Promise<void> | null = null;
  let httpServer: Server | null = null;
  const signalHandlers: Array<[NodeJS.Signals, () => void]> = [];
  const sockets = new Set<Socket>();

  const metrics = new ServerMetrics(engine, () => ctx.admission.inFlight);
  const ctx = createContext({
    ds3,
    modelName,
    reasoningMode: opts.reasoning ?? "auto",
    metrics,
    maxQueue: opts.maxQueue ?? 1024,
    retryAfter: String(opts.retryAfterSeconds ?? 1),
    log,
    isClosing: () => closing,
  });
  const { active } = ctx.admission;
  const { handler, checkContinue, drained } = createHttp(ctx, routes, { apiKeys: opts.apiKeys, maxBodyBytes: opts.maxBodyBytes, cors: opts.cors });
  const requestTimeout = positiveInt(opts.requestTimeoutMs, 30_000, "requestTimeoutMs");
  const maxConnections = positiveInt(opts.maxConnections, 4096, "maxConnections");

  // ---------------------------------------------------------------------------------------
  // lifecycle

  async function listen(port = 8000, host = "127.0.0.1") {
    if (httpServer) throw new Error("listen() was already called");
    if (closing) throw new Error("server is closed");
    const srv = createHttpServer(
      {
        keepAliveTimeout: 5000,
        requestTimeout,
        headersTimeout: Math.min(requestTimeout, 60_000),
        // how often node checks those timeouts (its default, 30 s, would let a short timeout run long)
        connectionsCheckingInterval: Math.max(100, Math.min(1000, Math.floor(requestTimeout / 4))),
      },
      handler,
    );
    srv.maxConnections = maxConnections;
    srv.on("connection", (s: Socket) => {
      sockets.add(s);
      s.once("close", () => sockets.delete(s));
    });
    // 100 Continue only for a body within the limit (node would send it to every request)
    srv.on("checkContinue", checkContinue);
    httpServer = srv;
    await new Promise<void>((resolve, reject) => {
      srv.once("error", reject);
      srv.listen(port, host, () => {
        srv.off("error", reject);
        resolve();
      });
    });
    const a = srv.address() as AddressInfo;
    if (opts.handleSignals) {
      for (const sig of ["SIGINT", "SIGTERM"] as NodeJS.Signals[]) {
        const h = () => {
          log(`${sig}: shutting down`);
          void close().then(async () => {
            if (opts.onSignal) await opts.onSignal(sig);
            else process.exit(0);
          });
        };
        process.once(sig, h);
        signalHandlers.push([sig, h]);
      }
    }
    const shownHost = a.family === "IPv6" ? `[${a.address}]` : a.address;
    return { host: a.address, port: a.port, url: `http://${shownHost}:${a.port}` };
  }

  function close(o: { graceMs?: number } = {}): Promise<void> {
    if (closed) return closed;
    closing = true;
    const grace = o.graceMs ?? graceDefault;
    closed = (async () => {
      for (const [sig, h] of signalHandlers) process.off(sig, h);
      const srv = httpServer;
      const stopped = srv ? new Promise<void>((r) => srv.close(() => r())) : Promise.resolve();
      srv?.closeIdleConnections();
      const all = () => Promise.all([...active].map((a) => a.done));
      let timer: NodeJS.Timeout | undefined;
      const timeout = new Promise<"timeout">((r) => (timer = setTimeout(() => r("timeout"), grace)));
      const outcome = await Promise.race([all().then(() => "done" as const), timeout]);
      clearTimeout(timer);
      if (outcome === "timeout") {
        log(`shutdown: cancelling ${active.size} request(s) after ${grace} ms`);
        for (const a of active) {
          a.cancelledBy ??= "shutdown";
          a.ac.abort();
        }
        await Promise.race([all(), new Promise((r) => setTimeout(r, 5000))]);
      }
      // let the cut requests' answers (503 / the stream's error event) reach their clients:
      // end each connection (its pending writes, then FIN), and destroy what is left after a while
      await drained(1000);
      for (const s of sockets) s.end();
      await Promise.race([Promise.all([...sockets].map((s) => new Promise((r) => s.once("close", r)))), new Promise((r) => setTimeout(r, 1000))]);
      srv?.closeAllConnections();
      await stopped;
    })();
    return closed;
  }

  return {
    handler,
    checkContinue,
    listen,
    close,
    get httpServer() {
      return httpServer;
    },
    metrics,
    get inFlight() {
      return ctx.admission.inFlight;
    },
    modelName,
  };
}

function positiveInt(v: number | undefined, dflt: number, name: string): number {
  if (v === undefined) return dflt;
  if (!Number.isSafeInteger(v) || v < 1) throw new TypeError(`createServer: ${name} must be a positive integer, got ${v}`);
  return v;
}
