// ds3 serve's hardening flags on the real CLI: --request-timeout (a request whose body never
// arrives is answered 408 and closed) and --max-connections (connections past the cap are closed).
import { spawn } from "node:child_process";
import { type Socket, connect } from "node:net";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { expect, it } from "vitest";

const ROOT = fileURLToPath(new URL("..", import.meta.url));
const BIN = join(ROOT, "packages/cli/dist/ds3.js");
const TINY = join(ROOT, "test/fixtures/tiny-v3");

function talk(port: number, bytes: string, ms: number): Promise<{ text: string; closed: boolean }> {
  return new Promise((resolve) => {
    const s = connect(port, "127.0.0.1");
    let text = "";
    const done = (closed: boolean) => {
      clearTimeout(t);
      s.destroy();
      resolve({ text, closed });
    };
    const t = setTimeout(() => done(false), ms);
    s.on("data", (c) => (text += c));
    s.on("error", () => undefined);
    s.on("close", () => done(true));
    s.write(bytes);
  });
}

it("ds3 serve --request-timeout 1 --max-connections 2", async () => {
  const child = spawn(process.execPath, [BIN, "serve", "--model", TINY, "--port", "0", "--request-timeout", "1", "--max-connections", "2", "--quiet"], { cwd: ROOT });
  let out = "";
  let err = "";
  child.stdout.on("data", (d: Buffer) => (out += d));
  child.stderr.on("data", (d: Buffer) => (err += d));
  const held: Socket[] = [];
  try {
    const t0 = Date.now();
    while (!out.includes("\n")) {
      if (Date.now() - t0 > 60_000) throw new Error(`no URL on stdout; stderr:\n${err}`);
      await new Promise((r) => setTimeout(r, 50));
    }
    const port = Number(new URL(out.trim()).port);
    const t = Date.now();
    const slow = await talk(port, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{", 10_000);
    expect(slow.text.startsWith("HTTP/1.1 408")).toBe(true);
    expect(slow.closed).toBe(true);
    // the 1 s of the flag, not at once; the upper bound is talk()'s 10 s, far below the 30 s default
    expect(Date.now() - t).toBeGreaterThanOrEqual(900);
    for (let i = 0; i < 2; i++) held.push(await new Promise<Socket>((r) => { const s = connect(port, "127.0.0.1", () => r(s)); }));
    await new Promise((r) => setTimeout(r, 100));
    const third = await talk(port, "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 3000);
    expect(third).toEqual({ text: "", closed: true });
    for (const s of held) s.destroy();
    await new Promise((r) => setTimeout(r, 100));
    expect((await talk(port, "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 3000)).text.startsWith("HTTP/1.1 200")).toBe(true);
  } finally {
    for (const s of held) s.destroy();
    child.kill("SIGKILL");
  }
  // a bad value is a usage error naming the flag
  const bad = spawn(process.execPath, [BIN, "serve", "--model", TINY, "--max-connections", "0"], { cwd: ROOT });
  let berr = "";
  bad.stderr.on("data", (d: Buffer) => (berr += d));
  const code = await new Promise<number | null>((r) => bad.on("exit", (c) => r(c)));
  expect(code).not.toBe(0);
  expect(berr).toContain("--max-connections");
});
