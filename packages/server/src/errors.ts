// OpenAI-style errors: {"error": {"message", "type", "param", "code"}} with an HTTP status.

export type ErrorType = "invalid_request_error" | "authentication_error" | "not_found_error" | "rate_limit_error" | "server_error" | "service_unavailable";

export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly param: string | null = null,
    readonly code: string | null = null,
    readonly type: ErrorType = status === 401
      ? "authentication_error"
      : status === 404
        ? "not_found_error"
        : status === 429
          ? "rate_limit_error"
          : status === 503
            ? "service_unavailable"
            : status >= 500
              ? "server_error"
              : "invalid_request_error",
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
    this.name = "ApiError";
  }

  body(): { error: { message: string; type: string; param: string | null; code: string | null } } {
    return { error: { message: this.message, type: this.type, param: this.param, code: this.code } };
  }
}

/** 400 naming the offending field. */
export function invalid(param: string, message: string, code: string | null = null): ApiError {
  return new ApiError(400, `${param}: ${message}`, param, code);
}

/**
 * A request that failed because the executor lost a rank or a node (a rank died or hung, a node of
 * a multi-node group went away): 503 `backend_unavailable` (type server_error) with the message
 * that names the node and rank, not a generic internal error. `failed` is the executor's failure
 * (`Executor.failed`: a RankError then). Null for any other error.
 */
export function backendLost(e: unknown, failed: Error | null | undefined): ApiError | null {
  if (e instanceof ApiError || !e || typeof e !== "object") return null;
  const err = e as Error & { code?: string };
  const isRank = (x: unknown) => !!x && (x as Error).name === "RankError";
  if (isRank(err) || (err.name === "EngineError" && err.code === "engine_failed" && isRank(failed)))
    return new ApiError(503, err.message, null, "backend_unavailable", "server_error");
  return null;
}
