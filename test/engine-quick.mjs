import { Engine, LocalExecutor } from "@ds3/core";
import { cpu } from "@ds3/backend-cpu";
import { readFileSync } from "node:fs";
const dir = "test/fixtures/tiny-v3";
const g = JSON.parse(readFileSync(dir + "/golden.json", "utf8"));
const ex = new LocalExecutor(dir, { backend: cpu, cache: { numBlocks: 64, blockSize: 64, dtype: "f32" } });
const eng = new Engine({ executor: ex, eosIds: [] });
let t0 = Date.now();
const outs = await Promise.all(g.prompts.map(async (p) => {
  const ids = [];
  for await (const ev of eng.generate({ promptIds: p.ids, sampling: { temperature: 0, maxTokens: 24 } })) ids.push(...ev.ids);
  return ids;
}));
g.prompts.forEach((p, i) => console.log(p.ids.length, JSON.stringify(outs[i]) === JSON.stringify(p.greedy), outs[i].slice(0,8).join(","), p.greedy.slice(0,8).join(",")));
console.log(Date.now() - t0, "ms", eng.stats());
await eng.close();
