// ANSI SGR colours (what tracebacks and coloured logs use) to spans of text. Text only:
// the output becomes text nodes, never markup. Other escape sequences are dropped.

const SGR = /\x1b\[([0-9;]*)m/g;
const OTHER_ESCAPES = /\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])/g;
const PALETTE = ["#000000", "#cd3131", "#0d7d3d", "#9a6700", "#2458c6", "#a73bb5", "#0f7b8a", "#767676",
  "#555555", "#e5484d", "#1a9c52", "#b08800", "#3b78ff", "#c450d8", "#1aa3b5", "#bbbbbb"];

function color256(n) {
  if (n < 16) return PALETTE[n];
  if (n >= 232) { const v = 8 + (n - 232) * 10; return `rgb(${v},${v},${v})`; }
  n -= 16;
  const level = (x) => (x ? 55 + x * 40 : 0);
  return `rgb(${level(Math.floor(n / 36))},${level(Math.floor(n / 6) % 6)},${level(n % 6)})`;
}

function applyCodes(state, codes) {
  for (let i = 0; i < codes.length; i += 1) {
    const code = codes[i];
    if (code === 0) { state.fg = state.bg = null; state.bold = state.italic = state.underline = false; }
    else if (code === 1) state.bold = true;
    else if (code === 3) state.italic = true;
    else if (code === 4) state.underline = true;
    else if (code === 22) state.bold = false;
    else if (code === 23) state.italic = false;
    else if (code === 24) state.underline = false;
    else if (code >= 30 && code <= 37) state.fg = PALETTE[code - 30];
    else if (code >= 90 && code <= 97) state.fg = PALETTE[code - 90 + 8];
    else if (code >= 40 && code <= 47) state.bg = PALETTE[code - 40];
    else if (code >= 100 && code <= 107) state.bg = PALETTE[code - 100 + 8];
    else if (code === 39) state.fg = null;
    else if (code === 49) state.bg = null;
    else if (code === 38 || code === 48) {
      let value = null;
      if (codes[i + 1] === 5) { value = color256(codes[i + 2] || 0); i += 2; }
      else if (codes[i + 1] === 2) { value = `rgb(${codes[i + 2] || 0},${codes[i + 3] || 0},${codes[i + 4] || 0})`; i += 4; }
      if (code === 38) state.fg = value; else state.bg = value;
    }
  }
}

function span(text, state) {
  if (!state.fg && !state.bg && !state.bold && !state.italic && !state.underline) return document.createTextNode(text);
  const node = document.createElement("span");
  node.textContent = text;
  if (state.fg) node.style.color = state.fg;
  if (state.bg) node.style.backgroundColor = state.bg;
  if (state.bold) node.style.fontWeight = "bold";
  if (state.italic) node.style.fontStyle = "italic";
  if (state.underline) node.style.textDecoration = "underline";
  return node;
}

// Appends the text's pieces to ``parent``; ``state`` carries colours across chunks.
export function appendAnsi(parent, text, state = {}) {
  let last = 0;
  SGR.lastIndex = 0;
  const strip = (piece) => piece.replace(OTHER_ESCAPES, "");
  for (let match = SGR.exec(text); match; match = SGR.exec(text)) {
    if (match.index > last) parent.append(span(strip(text.slice(last, match.index)), state));
    applyCodes(state, match[1] === "" ? [0] : match[1].split(";").map((x) => parseInt(x || "0", 10)));
    last = SGR.lastIndex;
  }
  if (last < text.length) parent.append(span(strip(text.slice(last)), state));
  return state;
}
