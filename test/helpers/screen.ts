// What a terminal shows for a stream of output: a small VT100 interpreter (printable ASCII,
// CR, LF, autowrap with the pending-wrap column, CSI A/B/C/D/J/K), enough to check that a
// line editor's redraws leave on screen what a person would read. The screen is `height` rows
// (unbounded by default): a line feed on its last row scrolls its top row into the scrollback,
// and the cursor never moves above its top. Returns scrollback and screen, top to bottom.
export function screenOf(out: string, cols: number, height = Infinity): string[] {
  const rows: string[][] = [[]];
  let row = 0;
  let base = 0; // the screen's top row
  let col = 0;
  let pending = false; // the cursor sits past the last column until the next character
  const line = (r: number) => (rows[r] ??= []);
  for (let i = 0; i < out.length; i++) {
    const ch = out[i]!;
    if (ch === "\x1b") {
      const m = /^\x1b\[(\??)([\d;]*)([A-Za-z@`~])/.exec(out.slice(i));
      if (!m) continue;
      i += m[0].length - 1;
      if (m[1]) continue; // private modes (bracketed paste)
      const n = Number(m[2] || "1");
      pending = false;
      if (m[3] === "A") row = Math.max(base, row - n);
      else if (m[3] === "B") row += n;
      else if (m[3] === "C") col = Math.min(cols - 1, col + n);
      else if (m[3] === "D") col = Math.max(0, col - n);
      else if (m[3] === "K") {
        const l = line(row);
        if (m[2] === "2") l.length = 0;
        else l.length = Math.min(l.length, col);
      } else if (m[3] === "J") {
        line(row).length = Math.min(line(row).length, col);
        rows.length = row + 1;
      }
      continue;
    }
    if (ch === "\r") {
      col = 0;
      pending = false;
    } else if (ch === "\n") {
      row++;
      if (row >= base + height) base++;
      pending = false;
    } else if (ch >= " " && ch !== "\x7f") {
      if (pending) {
        row++;
        if (row >= base + height) base++;
        col = 0;
        pending = false;
      }
      const l = line(row);
      while (l.length < col) l.push(" ");
      l[col] = ch;
      if (col === cols - 1) pending = true;
      else col++;
    }
  }
  for (let r = 0; r <= row; r++) line(r);
  return rows.map((l) => (l ?? []).join("").trimEnd());
}
