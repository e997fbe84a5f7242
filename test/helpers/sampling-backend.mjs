// A test backend: the CPU backend plus `sample`, the optional device-sampling op, computed with
// @ds3/core's own Sampler on the downloaded logits (each row's uniform draw is the one the engine
// sends). It stands in for a GPU backend's sampler to test the plumbing around it (the engine,
// RankExecutor, the rank workers); worker ranks import it by path (`entry`), so it is plain ESM.
// Every call is announced on the BroadcastChannel SAMPLE_CHANNEL (which reaches across threads),
// so a test can tell this op ran from the executor's own fallback.
import { cpu } from "@ds3/backend-cpu";
import { Sampler } from "@ds3/core";

export const SAMPLE_CHANNEL = "ds3-test-device-sample";
const channel = new BroadcastChannel(SAMPLE_CHANNEL);
channel.unref();

function wrap(ctx) {
  const sample = (logits, params, u) => {
    const [T, V] = logits.shape;
    const all = ctx.download(logits);
    const ids = new Int32Array(T);
    const logprobs = new Float32Array(T);
    for (let r = 0; r < T; r++) {
      const q = params[r];
      const s = new Sampler({ temperature: q.temperature, topK: q.topK, topP: q.topP, minP: q.minP }, { size: V });
      const res = s.sample(all.subarray(r * V, (r + 1) * V), { prompt: [], output: [] }, { next: () => u[r] });
      ids[r] = res.id;
      logprobs[r] = res.logprob;
    }
    channel.postMessage(T);
    return { ids, logprobs };
  };
  return new Proxy(ctx, {
    get(t, k) {
      if (k === "sample") return sample;
      if (k === "name") return "cpu-sampling-test";
      const v = t[k];
      return typeof v === "function" ? v.bind(t) : v;
    },
  });
}

/** @type {import("@ds3/core").BackendProvider} */
export const samplingCpu = {
  name: "cpu-sampling-test",
  entry: import.meta.url,
  available: () => cpu.available(),
  apiVersion: cpu.apiVersion,
  devices: () => cpu.devices(),
  supports: (op, p) => op === "sample" || cpu.supports(op, p),
  create: (opts) => wrap(cpu.create(opts)),
};
export default samplingCpu;
