// Independent check that a text is a prefix of a JSON object (shared by the server tests).

/**
 * Independent check that `p` is a prefix of a JSON object: close what is open (string, literal,
 * number, pending key/value) and the brackets, and let JSON.parse decide.
 */
export function completesToJson(p: string): boolean {
  const stack: string[] = [];
  let inStr = false;
  let esc = 0; // 1 after '\', 2..5 inside \uXXXX
  let isKey = false;
  let expect: "value" | "key" | "colon" | "after" | "start" = "start";
  let tail = "";
  for (let i = 0; i < p.length; i++) {
    const c = p[i]!;
    if (inStr) {
      if (esc === 1) esc = c === "u" ? 5 : 0;
      else if (esc > 1) esc = esc === 2 ? 0 : esc - 1;
      else if (c === "\\") esc = 1;
      else if (c === '"') {
        inStr = false;
        expect = isKey ? "colon" : "after";
      }
      continue;
    }
    if (/\s/.test(c)) continue;
    if (c === '"') {
      inStr = true;
      isKey = expect === "key";
    } else if (c === "{") {
      stack.push("}");
      expect = "key";
    } else if (c === "[") {
      stack.push("]");
      expect = "value";
    } else if (c === "}" || c === "]") {
      stack.pop();
      expect = "after";
    } else if (c === ":") expect = "value";
    else if (c === ",") expect = stack[stack.length - 1] === "}" ? "key" : "value";
    else expect = "after"; // inside a number or literal
  }
  if (inStr) {
    tail += esc === 1 ? "n" : esc > 1 ? "0".repeat(esc - 1) : "";
    tail += '"';
    expect = isKey ? "colon" : "after";
  }
  // an unfinished number or literal at the end
  const m = /(-|\d\.|[eE][+-]?|t|tr|tru|f|fa|fal|fals|n|nu|nul)$/.exec(p);
  if (!inStr && m) {
    const lit: Record<string, string> = { t: "rue", tr: "ue", tru: "e", f: "alse", fa: "lse", fal: "se", fals: "e", n: "ull", nu: "ll", nul: "l" };
    tail += lit[m[1]!] ?? "0";
  }
  if (expect === "colon") tail += ":0";
  else if (expect === "value" && stack.length) tail += "0";
  else if (expect === "key") tail += '"k":0';
  if (expect === "start") tail = "{}";
  const fixed = p + tail + [...stack].reverse().join("");
  for (const candidate of [fixed, p + [...stack].reverse().join("")]) {
    try {
      const v = JSON.parse(candidate);
      if (typeof v === "object" && v !== null && !Array.isArray(v)) return true;
    } catch {
      // try the next
    }
  }
  return false;
}
