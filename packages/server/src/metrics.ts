// A small Prometheus registry (text exposition format 0.0.4): counters, gauges and histograms,
// with labels. One per server; nothing global.

type Labels = Record<string, string>;

function labelKey(l: Labels): string {
  const ks = Object.keys(l).sort();
  return ks.map((k) => `${k}="${escapeLabel(l[k]!)}"`).join(",");
}

function escapeLabel(v: string): string {
  return v.replace(/\\/g, "\\\\").replace(/\n/g, "\\n").replace(/"/g, '\\"');
}

function fmt(v: number): string {
  if (Number.isNaN(v)) return "NaN";
  if (v === Infinity) return "+Inf";
  if (v === -Infinity) return "-Inf";
  return String(v);
}

interface Metric {
  name: string;
  help: string;
  type: "counter" | "gauge" | "histogram";
  render(): string[];
}

export class Counter implements Metric {
  readonly type = "counter";
  private values = new Map<string, number>();
  constructor(
    readonly name: string,
    readonly help: string,
    private readonly initial: Labels[] = [{}],
  ) {
    for (const l of initial) this.values.set(labelKey(l), 0);
  }
  inc(labels: Labels = {}, by = 1): void {
    const k = labelKey(labels);
    this.values.set(k, (this.values.get(k) ?? 0) + by);
  }
  get(labels: Labels = {}): number {
    return this.values.get(labelKey(labels)) ?? 0;
  }
  render(): string[] {
    return [...this.values].map(([k, v]) => `${this.name}${k ? `{${k}}` : ""} ${fmt(v)}`);
  }
}

export class Gauge implements Metric {
  readonly type = "gauge";
  constructor(
    readonly name: string,
    readonly help: string,
    private readonly read: () => number,
  ) {}
  render(): string[] {
    return [`${this.name} ${fmt(this.read())}`];
  }
}

export class Histogram implements Metric {
  readonly type = "histogram";
  private readonly counts: number[];
  private sum = 0;
  private count = 0;
  constructor(
    readonly name: string,
    readonly help: string,
    readonly buckets: number[],
  ) {
    this.counts = new Array(buckets.length).fill(0);
  }
  observe(v: number): void {
    if (!Number.isFinite(v)) return;
    for (let i = 0; i < this.buckets.length; i++) if (v <= this.buckets[i]!) this.counts[i]!++;
    this.sum += v;
    this.count++;
  }
  get total(): number {
    return this.count;
  }
  render(): string[] {
    const out = this.buckets.map((b, i) => `${this.name}_bucket{le="${fmt(b)}"} ${this.counts[i]}`);
    out.push(`${this.name}_bucket{le="+Inf"} ${this.count}`);
    out.push(`${this.name}_sum ${fmt(this.sum)}`);
    out.push(`${this.name}_count ${this.count}`);
    return out;
  }
}

export class Registry {
  private readonly metrics: Metric[] = [];
  add<T extends Metric>(m: T): T {
    this.metrics.push(m);
    return m;
  }
  render(): string {
    const lines: string[] = [];
    for (const m of this.metrics) {
      lines.push(`# HELP ${m.name} ${m.help.replace(/\\/g, "\\\\").replace(/\n/g, "\\n")}`);
      lines.push(`# TYPE ${m.name} ${m.type}`);
      lines.push(...m.render());
    }
    return lines.join("\n") + "\n";
  }
}

const LATENCY = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80, 160, 640];
const TPOT = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 10, 20, 40, 80];
const TOKENS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000];

export interface EngineView {
  stats(): {
    running: number;
    waiting: number;
    cacheUsage: number;
    cacheBlocksUsed: number;
    cacheBlocksTotal: number;
    prefixHitRate: number;
    specAcceptance: number;
    specProposed: number;
    specAccepted: number;
    preemptions: number;
  };
}

/** The server's metrics: ds3_* names (vLLM's set, under ds3's prefix). */
export class ServerMetrics {
  readonly registry = new Registry();
  readonly httpRequests: Counter;
  readonly requestSuccess: Counter;
  readonly promptTokens: Counter;
  readonly generationTokens: Counter;
  readonly ttft: Histogram;
  readonly tpot: Histogram;
  readonly e2e: Histogram;
  readonly queueTime: Histogram;
  readonly promptLen: Histogram;
  readonly generationLen: Histogram;
  readonly clientDisconnects: Counter;
  readonly rejected: Counter;

  constructor(engine: EngineView, inFlight: () => number) {
    const r = this.registry;
    this.httpRequests = r.add(new Counter("ds3_http_requests_total", "HTTP requests answered, by endpoint and status code", []));
    this.requestSuccess = r.add(
      new Counter(
        "ds3_request_success_total",
        "Finished sequences (one per choice), by finish reason",
        ["stop", "length", "tool_calls", "abort"].map((finished_reason) => ({ finished_reason })),
      ),
    );
    this.rejected = r.add(new Counter("ds3_requests_rejected_total", "Requests refused before generation, by reason", []));
    this.clientDisconnects = r.add(new Counter("ds3_client_disconnects_total", "Requests whose client went away before the response ended"));
    this.promptTokens = r.add(new Counter("ds3_prompt_tokens_total", "Prompt tokens processed (each choice counts its prompt)"));
    this.generationTokens = r.add(new Counter("ds3_generation_tokens_total", "Tokens generated (aborted sequences included)"));
    r.add(new Gauge("ds3_num_requests_running", "Sequences in the engine's running batch", () => engine.stats().running));
    r.add(new Gauge("ds3_num_requests_waiting", "Sequences waiting for admission to the engine", () => engine.stats().waiting));
    r.add(new Gauge("ds3_server_requests_in_flight", "Sequences this server has admitted and not finished", inFlight));
    r.add(new Gauge("ds3_kv_cache_usage_perc", "Fraction of latent-cache blocks in use (0..1)", () => engine.stats().cacheUsage));
    r.add(new Gauge("ds3_kv_cache_blocks_used", "Latent-cache blocks in use", () => engine.stats().cacheBlocksUsed));
    r.add(new Gauge("ds3_kv_cache_blocks_total", "Latent-cache blocks", () => engine.stats().cacheBlocksTotal));
    r.add(new Gauge("ds3_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / prompt tokens looked up (0..1)", () => engine.stats().prefixHitRate));
    r.add(new Gauge("ds3_spec_decode_acceptance_rate", "Accepted / proposed speculative draft tokens (0..1)", () => engine.stats().specAcceptance));
    r.add(new Gauge("ds3_spec_decode_num_draft_tokens", "Speculative draft tokens proposed so far", () => engine.stats().specProposed));
    r.add(new Gauge("ds3_spec_decode_num_accepted_tokens", "Speculative draft tokens accepted so far", () => engine.stats().specAccepted));
    r.add(new Gauge("ds3_num_preemptions", "Sequences preempted (recomputed) so far", () => engine.stats().preemptions));
    this.ttft = r.add(new Histogram("ds3_time_to_first_token_seconds", "Time from request arrival to the first generated token", LATENCY));
    this.tpot = r.add(new Histogram("ds3_time_per_output_token_seconds", "Mean time between generated tokens of a sequence", TPOT));
    this.e2e = r.add(new Histogram("ds3_e2e_request_latency_seconds", "Time from request arrival to the sequence's end", LATENCY));
    this.queueTime = r.add(new Histogram("ds3_request_queue_time_seconds", "Time a sequence waited for admission to the engine", LATENCY));
    this.promptLen = r.add(new Histogram("ds3_request_prompt_tokens", "Prompt length of finished sequences", TOKENS));
    this.generationLen = r.add(new Histogram("ds3_request_generation_tokens", "Generated tokens of finished sequences", TOKENS));
  }

  render(): string {
    return this.registry.render();
  }
}
