// GET /health: liveness (cheap, no key). GET /health/deep (or /health?deep=1): readiness, one
// generated token through the engine.
import type { ServerContext } from "../context.js";
import { type Route, sendJson } from "../http.js";
import type { Exchange } from "../stream.js";

async function deepHealth(ctx: ServerContext, x: Exchange): Promise<void> {
  const { res } = x;
  const { engine, modelName } = ctx;
  if (ctx.closing) return sendJson(res, 503, { status: "shutting_down" });
  const t = performance.now();
  const ac = new AbortController();
  const timer = setTimeout(() => ac.abort(), 30_000);
  try {
    let n = 0;
    let finish = "";
    const prompt = [ctx.tok?.bosId ?? engine.executor.config.bosTokenId ?? 0];
    for await (const ev of engine.generate({ promptIds: prompt, sampling: { maxTokens: 1, temperature: 0, ignoreEos: true }, signal: ac.signal })) {
      n += ev.ids.length;
      if (ev.finishReason) finish = ev.finishReason;
    }
    if (n !== 1) throw new Error(`expected one token, got ${n} (${finish})`);
    sendJson(res, 200, { status: "ok", model: modelName, tokens: n, latency_ms: Math.round((performance.now() - t) * 10) / 10 });
  } catch (e) {
    sendJson(res, 503, { status: "error", model: modelName, error: (e as Error).message });
  } finally {
    clearTimeout(timer);
  }
}

export const healthRoute: Route = {
  path: "/health",
  methods: ["GET", "HEAD"],
  auth: false,
  handle(ctx, x, m) {
    if (["1", "true"].includes(m.url.searchParams.get("deep") ?? "")) return deepHealth(ctx, x);
    sendJson(x.res, 200, { status: "ok", model: ctx.modelName });
  },
};

export const deepHealthRoute: Route = {
  path: "/health/deep",
  methods: ["GET", "HEAD"],
  auth: false,
  handle: (ctx, x) => deepHealth(ctx, x),
};
