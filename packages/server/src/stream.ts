// The generation plumbing every generating route shares: admission (all of a request's choices
// or none, 429 when the queue is full), running a request's choices with disconnect and shutdown
// handling, the server-sent-events writer, usage and the logprob token names.
import type { IncomingMessage, ServerResponse } from "node:http";
import type { Engine } from "@ds3/core";
import { ApiError, backendLost, invalid } from "./errors.js";
import { type ChoiceResult, ChoiceRun, type ChoiceSpec } from "./generate.js";
import type { ServerMetrics } from "./metrics.js";
import type { TokenTable } from "./tokens.js";

/** one HTTP request/response pair and when it arrived (performance.now()) */
export interface Exchange {
  req: IncomingMessage;
  res: ServerResponse;
  t0: number;
}

/** A request whose sequences are admitted: cancelled on client disconnect or by shutdown. */
export class ActiveRequest {
  readonly ac = new AbortController();
  cancelledBy: "client" | "shutdown" | null = null;
  constructor(readonly done: Promise<void>) {}
}

export class Admission {
  /** sequences in flight */
  inFlight = 0;
  readonly active = new Set<ActiveRequest>();

  constructor(
    private readonly engine: Engine,
    private readonly table: TokenTable | null,
    private readonly metrics: ServerMetrics,
    private readonly maxQueue: number,
    private readonly retryAfter: string,
    private readonly isClosing: () => boolean,
  ) {}

  /**
   * Admit every sequence of a request at once (or none: 429 when the queue is full), run `fn`
   * with them, and release them after. The request is tracked for shutdown while it runs.
   */
  async run<T>(x: Exchange, specs: ChoiceSpec[], fn: (runs: ChoiceRun[], active: ActiveRequest) => Promise<T>): Promise<T> {
    return this.track(async (active) => {
      const runs = this.admit(specs, active, x.t0);
      try {
        return await fn(runs, active);
      } finally {
        this.inFlight -= runs.length;
      }
    });
  }

  /** Runs a request's sequences concurrently; a client disconnect or a failure ends them all. */
  async runAll(x: Exchange, runs: ChoiceRun[], active: ActiveRequest, each: (run: ChoiceRun) => Promise<void>): Promise<void> {
    const { res } = x;
    const onClose = () => {
      if (!res.writableFinished) {
        if (!active.cancelledBy) {
          active.cancelledBy = "client";
          this.metrics.clientDisconnects.inc();
        }
        active.ac.abort();
      }
    };
    res.on("close", onClose);
    try {
      const settled = await Promise.allSettled(
        runs.map((r) =>
          each(r).catch((e) => {
            active.ac.abort(); // one sequence failed: end its siblings too
            throw e;
          }),
        ),
      );
      const failed = settled.find((x): x is PromiseRejectedResult => x.status === "rejected");
      if (failed) throw failed.reason;
    } finally {
      res.off("close", onClose);
    }
  }

  /** Every request in flight, for shutdown: close() waits for them, then cancels the rest. */
  track<T>(fn: (a: ActiveRequest) => Promise<T>): Promise<T> {
    let resolve!: () => void;
    const a = new ActiveRequest(new Promise<void>((r) => (resolve = r)));
    this.active.add(a);
    return fn(a).finally(() => {
      this.active.delete(a);
      resolve();
    });
  }

  private admit(specs: ChoiceSpec[], req: ActiveRequest, t0: number): ChoiceRun[] {
    if (this.isClosing()) throw new ApiError(503, "server is shutting down", null, "shutting_down");
    if (this.inFlight + specs.length > this.maxQueue) {
      this.metrics.rejected.inc({ reason: "queue_full" });
      throw new ApiError(429, `server is at capacity (${this.inFlight} sequences in flight, limit ${this.maxQueue}); retry later`, null, "queue_full", "rate_limit_error", {
        "Retry-After": this.retryAfter,
      });
    }
    const runs: ChoiceRun[] = [];
    try {
      for (const s of specs) runs.push(new ChoiceRun(this.engine, s, this.table, req.ac.signal, t0));
    } catch (e) {
      req.ac.abort();
      for (const r of runs) r.discard();
      throw this.engineError(e);
    }
    this.inFlight += runs.length;
    return runs;
  }

  engineError(e: unknown): ApiError {
    if (e instanceof ApiError) return e;
    const lost = backendLost(e, this.engine.executor.failed);
    if (lost) return lost;
    const err = e as Error & { code?: string; queueFull?: boolean; field?: string };
    if (err.queueFull) {
      this.metrics.rejected.inc({ reason: "engine_queue_full" });
      return new ApiError(429, "the engine's queue is full; retry later", null, "queue_full", "rate_limit_error", { "Retry-After": this.retryAfter });
    }
    if (err.name === "SamplingError") {
      const snake = (err.field ?? "").replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);
      return invalid(snake || "sampling", err.message);
    }
    if (err.name === "EngineError") {
      if (err.code === "context_length_exceeded") return new ApiError(400, err.message, "max_tokens", "context_length_exceeded");
      if (err.code === "engine_closed") return new ApiError(503, err.message, null, "engine_closed");
      if (err.code === "engine_failed") return new ApiError(500, err.message, null, "engine_failed");
      return new ApiError(400, err.message, "prompt", "invalid_request");
    }
    return new ApiError(500, `internal error: ${err?.message ?? String(e)}`, null, "internal_error");
  }
}

/** The error a request cut by shutdown (or by the engine stopping) ends with. */
export function cutError(active: ActiveRequest): ApiError {
  return active.cancelledBy === "shutdown"
    ? new ApiError(503, "the server shut down before this request finished; retry it", null, "shutting_down")
    : new ApiError(503, "the engine stopped this request before it finished; retry it", null, "engine_aborted");
}

export function finishMetrics(metrics: ServerMetrics, r: ChoiceResult, reason: string): void {
  metrics.requestSuccess.inc({ finished_reason: reason });
  metrics.promptTokens.inc({}, r.promptTokens);
  metrics.generationTokens.inc({}, r.ids.length);
  if (r.ttft !== null) metrics.ttft.observe(r.ttft);
  if (r.tpot !== null) metrics.tpot.observe(r.tpot);
  metrics.e2e.observe(r.e2e);
  if (r.queueTime !== null) metrics.queueTime.observe(r.queueTime);
  metrics.promptLen.observe(r.promptTokens);
  metrics.generationLen.observe(r.ids.length);
}

export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
  prompt_tokens_details?: { cached_tokens: number };
}

export function usage(promptTokens: number, results: ChoiceResult[]): Usage {
  const completion = results.reduce((a, r) => a + r.ids.length, 0);
  const cached = results.reduce((a, r) => Math.max(a, r.cachedTokens), 0);
  return {
    prompt_tokens: promptTokens,
    completion_tokens: completion,
    total_tokens: promptTokens + completion,
    ...(cached > 0 && { prompt_tokens_details: { cached_tokens: cached } }),
  };
}

// ---------------------------------------------------------------------------------------
// server-sent events

export interface SseWriter {
  readonly open: boolean;
  /** one `data:` event (waits for the socket to drain) */
  send(obj: unknown): Promise<void>;
  /** one event with an `event:` name (Anthropic / Responses style) */
  event(name: string, obj: unknown): Promise<void>;
  /** `data: [DONE]` and the end */
  end(): void;
  /** the end without [DONE] */
  close(): void;
}

/** Start a server-sent-events response. */
export function openSse(res: ServerResponse): SseWriter {
  res.writeHead(200, { "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache", Connection: "keep-alive", "X-Accel-Buffering": "no" });
  res.flushHeaders();
  return sse(res);
}

/** An SSE writer that respects backpressure and goes quiet once the client is gone. */
export function sse(res: ServerResponse): SseWriter {
  let open = true;
  res.on("close", () => (open = false));
  const isOpen = () => open && !res.destroyed && !res.writableEnded;
  const write = async (text: string): Promise<void> => {
    if (!isOpen()) return;
    if (!res.write(text))
      await new Promise<void>((resolve) => {
        const done = () => {
          res.off("drain", done);
          res.off("close", done);
          resolve();
        };
        res.on("drain", done);
        res.on("close", done);
      });
  };
  return {
    get open() {
      return isOpen();
    },
    send: (obj) => write(`data: ${JSON.stringify(obj)}\n\n`),
    event: (name, obj) => write(`event: ${name}\ndata: ${JSON.stringify(obj)}\n\n`),
    end() {
      if (!isOpen()) return;
      res.write("data: [DONE]\n\n");
      res.end();
    },
    close() {
      if (isOpen()) res.end();
    },
  };
}

/** An OpenAI SSE stream: `chunk` wraps one choice in the chunk envelope. */
export function openChunkStream(res: ServerResponse, id: string, object: string, model: string, includeUsage: boolean | undefined) {
  const out = openSse(res);
  const chunk = (choice: object) => ({ id, object, created: Math.floor(Date.now() / 1000), model, choices: [choice], ...(includeUsage && { usage: null }) });
  return { out, chunk };
}

// ---------------------------------------------------------------------------------------
// logprob token names

const LOGPROB_FLOOR = -9999;
/** -Infinity is not JSON: the floor OpenAI uses */
export const clampLp = (x: number): number => (Number.isFinite(x) ? x : LOGPROB_FLOOR);

export function tokenName(table: TokenTable | null, id: number, asIds: boolean): string {
  return asIds || !table ? `token_id:${id}` : table.tokenString(id);
}

export function tokenBytes(table: TokenTable | null, id: number, asIds: boolean): number[] {
  if (asIds || !table) return [...Buffer.from(`token_id:${id}`)];
  const b = table.bytes[id]!;
  return b.length ? [...b] : [...Buffer.from(table.tokenString(id))];
}
