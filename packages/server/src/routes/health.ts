// GET /health: liveness, cheap: no key, no engine work (a Kubernetes liveness probe); 503 with
// the reason once the executor failed (a rank died, a node of a multi-node group was lost).
// GET /health/deep (or /health?deep=1): readiness: one generated token through the engine. It
// needs the API key when the server has keys, goes through admission like any request (429 when
// the queue is full), and its result is shared for a few seconds, so a flood of probes costs one
// generation per interval.
import type { ServerContext } from "../context.js";
import { ApiError } from "../errors.js";
import { type Route, sendJson } from "../http.js";
import type { Exchange } from "../stream.js";

/** how long one deep check's result answers later probes (ms) */
export const DEEP_HEALTH_TTL_MS = 2000;

interface DeepResult {
  status: number;
  body: Record<string, unknown>;
  at: number;
}
const lastByServer = new WeakMap<ServerContext, { result: DeepResult | null; running: Promise<DeepResult> | null }>();

async function probe(ctx: ServerContext, x: Exchange): Promise<DeepResult> {
  const { engine, modelName } = ctx;
  const t = performance.now();
  const prompt = [ctx.tok?.bosId ?? engine.executor.config.bosTokenId ?? 0];
  const spec = { index: 0, promptIds: prompt, sampling: { maxTokens: 1, temperature: 0, ignoreEos: true } };
  try {
    const result = await ctx.admission.run(x, [spec], async (runs, active) => {
      const timer = setTimeout(() => active.ac.abort(), 30_000);
      try {
        return await runs[0]!.run(() => undefined);
      } finally {
        clearTimeout(timer);
      }
    });
    if (result.ids.length !== 1) throw new Error(`expected one token, got ${result.ids.length} (${result.finishReason})`);
    return { status: 200, body: { status: "ok", model: modelName, tokens: 1, latency_ms: Math.round((performance.now() - t) * 10) / 10 }, at: Date.now() };
  } catch (e) {
    if (e instanceof ApiError && e.status === 429) throw e; // the queue is full: say so, do not cache
    return { status: 503, body: { status: "error", model: modelName, error: (e as Error).message }, at: Date.now() };
  }
}

async function deepHealth(ctx: ServerContext, x: Exchange): Promise<void> {
  if (ctx.closing) return sendJson(x.res, 503, { status: "shutting_down" });
  const failed = ctx.engine.executor.failed;
  if (failed) return sendJson(x.res, 503, { status: "error", model: ctx.modelName, error: failed.message, cached: false });
  let st = lastByServer.get(ctx);
  if (!st) lastByServer.set(ctx, (st = { result: null, running: null }));
  const fresh = st.result && Date.now() - st.result.at < DEEP_HEALTH_TTL_MS ? st.result : null;
  if (fresh) return sendJson(x.res, fresh.status, { ...fresh.body, cached: true });
  if (st.running) {
    const r = await st.running;
    return sendJson(x.res, r.status, { ...r.body, cached: true });
  }
  const s = st;
  s.running = probe(ctx, x);
  try {
    const r = await s.running;
    s.result = r;
    sendJson(x.res, r.status, { ...r.body, cached: false });
  } finally {
    s.running = null;
  }
}

export const healthRoute: Route = {
  path: "/health",
  methods: ["GET", "HEAD"],
  auth: false,
  handle(ctx, x, m) {
    if (["1", "true"].includes(m.url.searchParams.get("deep") ?? "")) {
      m.authorize();
      return deepHealth(ctx, x);
    }
    // a failed executor (a rank died, a node was lost): unhealthy, with the reason
    const failed = ctx.engine.executor.failed;
    if (failed) return sendJson(x.res, 503, { status: "error", model: ctx.modelName, error: failed.message });
    sendJson(x.res, 200, { status: "ok", model: ctx.modelName });
  },
};

export const deepHealthRoute: Route = {
  path: "/health/deep",
  methods: ["GET", "HEAD"],
  auth: true,
  handle: (ctx, x) => deepHealth(ctx, x),
};
