// HTTP plumbing: the route table and dispatch, API-key auth, CORS, request bodies (size limit,
// JSON), and errors as JSON (or as an SSE event once a stream has begun). No model logic here.
import { createHash, timingSafeEqual } from "node:crypto";
import type { IncomingMessage, ServerResponse } from "node:http";
import type { ServerContext } from "./context.js";
import { ApiError, backendLost } from "./errors.js";
import type { Exchange } from "./stream.js";
import { isObject } from "./validate.js";

const MiB = 1024 * 1024;

/** One endpoint. The table in routes/index.ts lists them all. */
export interface Route {
  /** exact path, or a prefix with one trailing parameter: "/v1/models/{id}" */
  path: string;
  /** allowed methods; GET routes also answer HEAD where listed */
  methods: string[];
  /** needs an API key when the server has keys */
  auth: boolean;
  handle(ctx: ServerContext, x: Exchange, m: RouteMatch): Promise<void> | void;
  /** the error body this route's clients expect (default OpenAI's {"error": {...}}) */
  errorBody?: (e: ApiError) => unknown;
}

export interface RouteMatch {
  url: URL;
  /** the raw (still percent-encoded) trailing parameter of a "{...}" route */
  param?: string;
  /** the request body, read within the limit */
  body(): Promise<Buffer>;
  /** the request body as a JSON object (400 otherwise) */
  json(): Promise<Record<string, unknown>>;
  /** 401 unless the request carries an accepted API key (when the server has keys) */
  authorize(): void;
}

export interface HttpOptions {
  apiKeys?: string | string[];
  maxBodyBytes?: number;
  cors?: boolean | string | string[];
}

export interface Http {
  handler(req: IncomingMessage, res: ServerResponse): void;
  checkContinue(req: IncomingMessage, res: ServerResponse): void;
  /** resolves once every response begun so far has ended (or after `ms`) */
  drained(ms: number): Promise<void>;
}

/**
 * The accepted API keys: the option, else $DS3_API_KEY (comma-separated). Entries are trimmed;
 * an empty entry ("a,,b", a trailing comma) is an error rather than a key nobody can send.
 */
export function apiKeys(option: string | string[] | undefined): string[] {
  const fromEnv = option === undefined;
  const env = process.env.DS3_API_KEY;
  const list = fromEnv ? (env ? env.split(",") : []) : typeof option === "string" ? [option] : option;
  return list.map((k, i) => {
    const t = k.trim();
    if (t === "")
      throw new TypeError(fromEnv ? `DS3_API_KEY: entry ${i + 1} of ${list.length} is empty (keys are comma-separated)` : `apiKeys: key ${i + 1} is empty`);
    return t;
  });
}

/** The request's declared body length, or null (none, or chunked). */
export function declaredLength(req: IncomingMessage): number | null {
  const h = req.headers["content-length"];
  if (h === undefined) return null;
  const n = Number(h);
  return Number.isFinite(n) ? n : null;
}

/**
 * After answering 413 with Connection: close: read and drop what the client still sends (so it
 * gets to read our answer instead of a reset), for at most `maxBytes` or `ms`, then close.
 */
export function discardBody(req: IncomingMessage, maxBytes: number, ms = 2000): void {
  let seen = 0;
  const kill = () => req.socket?.destroy();
  const timer = setTimeout(kill, ms);
  timer.unref();
  req.on("data", (c: Buffer) => {
    seen += c.length;
    if (seen > maxBytes) kill();
  });
  req.on("end", () => clearTimeout(timer));
  req.on("close", () => clearTimeout(timer));
  req.resume();
}

/**
 * Once the answer is out, node:http destroys a Connection: close socket: with body bytes still
 * arriving, that is a reset, and the client may never read the answer. Close our side only
 * (FIN) instead, and let discardBody() read the rest for a while.
 */
function lingeringClose(req: IncomingMessage): void {
  const sock = req.socket as (typeof req.socket & { destroySoon?: () => void }) | null;
  if (sock && typeof sock.destroySoon === "function") sock.destroySoon = () => void sock.end();
}

function sha256(s: string): Buffer {
  return createHash("sha256").update(s, "utf8").digest();
}

export function sendJson(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  if (res.headersSent) {
    if (!res.writableEnded) res.end();
    return;
  }
  const data = JSON.stringify(body);
  res.writeHead(status, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(data), ...headers });
  res.end(data);
}

/** Answer an error: a JSON error response, or mid-stream an SSE error event and the end. */
export function sendError(res: ServerResponse, e: unknown, log: (line: string) => void, errorBody: (e: ApiError) => unknown = (e) => e.body()): void {
  const err =
    e instanceof ApiError ? e : new ApiError(500, `internal error: ${e instanceof Error ? e.message : String(e)}`, null, "internal_error");
  if (err.status >= 500) log(`error: ${err.message}`);
  if (res.headersSent) {
    if (!res.writableEnded && !res.destroyed) {
      res.write(`data: ${JSON.stringify(errorBody(err))}\n\n`);
      res.end();
    }
    return;
  }
  sendJson(res, err.status, errorBody(err), err.headers);
}

export function createHttp(ctx: ServerContext, routes: readonly Route[], o: HttpOptions): Http {
  const maxBody = o.maxBodyBytes ?? 4 * MiB;
  // API keys: compared in constant time (hashes of equal length, every key checked)
  const keyHashes = apiKeys(o.apiKeys).map((k) => sha256(k));
  const corsOrigins = o.cors === true ? "*" : o.cors ? (typeof o.cors === "string" ? [o.cors] : o.cors) : null;

  function checkAuth(req: IncomingMessage): void {
    if (keyHashes.length === 0) return;
    const h = req.headers.authorization;
    const x = req.headers["x-api-key"]; // Anthropic's clients send the key this way
    const m = typeof h === "string" ? /^Bearer\s+(.+)$/i.exec(h.trim()) : typeof x === "string" && x.trim() ? [x, x] : null;
    if (!m) throw new ApiError(401, "Missing API key: send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'", null, "invalid_api_key", "invalid_request_error");
    const got = sha256(m[1]!.trim());
    let ok = 0;
    for (const k of keyHashes) ok |= timingSafeEqual(got, k) ? 1 : 0;
    if (!ok) throw new ApiError(401, "Incorrect API key provided", null, "invalid_api_key", "invalid_request_error");
  }

  function setCors(req: IncomingMessage, res: ServerResponse): void {
    if (!corsOrigins) return;
    const origin = req.headers.origin;
    if (corsOrigins === "*") res.setHeader("Access-Control-Allow-Origin", "*");
    else if (typeof origin === "string" && corsOrigins.includes(origin)) {
      res.setHeader("Access-Control-Allow-Origin", origin);
      res.setHeader("Vary", "Origin");
    }
  }

  const tooLarge = () => new ApiError(413, `request body is larger than the limit of ${maxBody} bytes`, null, "request_too_large", "invalid_request_error", { Connection: "close" });

  /** The body, up to the limit: past it, 413 at once (the handler then drains and closes). */
  function readBody(req: IncomingMessage): Promise<Buffer> {
    const declared = declaredLength(req);
    if (declared !== null && declared > maxBody) return Promise.reject(tooLarge());
    return new Promise((resolve, reject) => {
      const chunks: Buffer[] = [];
      let size = 0;
      const onData = (c: Buffer) => {
        size += c.length;
        if (size > maxBody) {
          done();
          reject(tooLarge());
          return;
        }
        chunks.push(c);
      };
      const onEnd = () => {
        done();
        resolve(Buffer.concat(chunks));
      };
      const onError = (e: Error) => {
        done();
        reject(new ApiError(400, `reading the request body failed: ${e.message}`, null, "bad_request"));
      };
      const done = () => {
        req.off("data", onData);
        req.off("end", onEnd);
        req.off("error", onError);
        req.pause();
      };
      req.on("data", onData);
      req.on("end", onEnd);
      req.on("error", onError);
    });
  }

  async function readJson(req: IncomingMessage): Promise<Record<string, unknown>> {
    const buf = await readBody(req);
    let v: unknown;
    try {
      v = JSON.parse(buf.toString("utf8"));
    } catch (e) {
      throw new ApiError(400, `request body is not valid JSON: ${(e as Error).message}`, null, "invalid_json");
    }
    if (!isObject(v)) throw new ApiError(400, "request body must be a JSON object", null, "invalid_json");
    return v;
  }

  /** responses not yet closed (shutdown lets them finish writing) */
  const open = new Set<ServerResponse>();

  // the table, split into exact paths and "{param}" prefixes
  const exact = new Map<string, Route>();
  const prefixed: Array<[string, Route]> = [];
  for (const r of routes) {
    const i = r.path.indexOf("{");
    if (i < 0) exact.set(r.path, r);
    else prefixed.push([r.path.slice(0, i), r]);
  }
  function find(path: string): { route: Route; param?: string } | null {
    const r = exact.get(path);
    if (r) return { route: r };
    for (const [prefix, route] of prefixed) if (path.startsWith(prefix) && path.length > prefix.length) return { route, param: path.slice(prefix.length) };
    return null;
  }

  async function dispatch(x: Exchange, url: URL, path: string, found: { route: Route; param?: string } | null): Promise<void> {
    const { req, res } = x;
    const method = req.method ?? "GET";
    setCors(req, res);
    if (method === "OPTIONS" && corsOrigins) {
      res.writeHead(204, {
        "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
        "Access-Control-Allow-Headers": String(req.headers["access-control-request-headers"] ?? "authorization, content-type"),
        "Access-Control-Max-Age": "600",
      });
      res.end();
      return;
    }
    if (ctx.closing) throw new ApiError(503, "server is shutting down", null, "shutting_down", "service_unavailable", { Connection: "close" });
    // everything under /v1/ needs the key, also paths that do not exist
    if (found?.route.auth || (!found && path.startsWith("/v1/"))) checkAuth(req);
    if (!found) throw new ApiError(404, `no route for ${method} ${path}`, null, "not_found");
    const { route, param } = found;
    if (!route.methods.includes(method))
      throw new ApiError(405, `method ${method} is not allowed on ${path}`, null, "method_not_allowed", "invalid_request_error", { Allow: route.methods.join(",") });
    await route.handle(ctx, x, { url, ...(param !== undefined && { param }), body: () => readBody(req), json: () => readJson(req), authorize: () => checkAuth(req) });
  }

  function handler(req: IncomingMessage, res: ServerResponse): void {
    const t0 = performance.now();
    let url: URL | null = null;
    let early: ApiError | null = null;
    try {
      url = new URL(req.url ?? "/", "http://localhost");
    } catch {
      // an absolute-form target with a broken host, or no URL at all
      early = new ApiError(400, `invalid request target ${JSON.stringify(String(req.url).slice(0, 200))}`, null, "bad_request");
    }
    // a declared body over the limit: 413 before reading it (and before any 100 Continue)
    const declared = declaredLength(req);
    if (!early && declared !== null && declared > maxBody) early = tooLarge();
    const path = url ? (url.pathname.length > 1 ? url.pathname.replace(/\/+$/, "") : url.pathname) : "";
    const found = url ? find(path) : null;
    const endpoint = found ? found.route.path : "other";
    res.setHeader("X-Content-Type-Options", "nosniff");
    open.add(res);
    res.once("close", () => {
      open.delete(res);
      ctx.metrics.httpRequests.inc({ endpoint, method: req.method ?? "GET", code: String(res.statusCode) });
      ctx.log(`${req.method} ${req.url} ${res.statusCode} ${(performance.now() - t0).toFixed(1)}ms`);
    });
    const run = early || !url ? Promise.reject(early) : dispatch({ req, res, t0 }, url, path, found);
    run.catch((e_) => {
      // a rank or node lost mid-request: 503 backend_unavailable naming them, not an internal error
      const e = backendLost(e_, ctx.engine.executor.failed) ?? e_;
      // a request whose body we did not read: answer, drop the rest of the body, close
      if (e instanceof ApiError && e.status === 413) {
        lingeringClose(req);
        sendError(res, e, ctx.log, found?.route.errorBody);
        discardBody(req, Math.max(maxBody, MiB));
        return;
      }
      sendError(res, e, ctx.log, found?.route.errorBody);
    });
  }

  /** For the server's 'checkContinue' event: 100 Continue only for a body within the limit. */
  function checkContinue(req: IncomingMessage, res: ServerResponse): void {
    const declared = declaredLength(req);
    if (declared === null || declared <= maxBody) res.writeContinue();
    handler(req, res);
  }

  async function drained(ms: number): Promise<void> {
    const t = Date.now();
    while ([...open].some((r) => !r.writableFinished) && Date.now() - t < ms) await new Promise((r) => setTimeout(r, 10));
  }

  return { handler, checkContinue, drained };
}
