// The terminal tab: xterm.js (vendored) on .../terminal, a login shell on a new pty in
// the session's sandbox. Keystrokes go as binary frames, output comes as binary frames,
// and a text frame {"type": "resize", rows, cols} follows the window's size.

import { sessionPath, socketUrl } from "./api.js";
import { el } from "./dom.js";

export class TerminalTab {
  constructor(root, session) {
    this.host = el("div", { class: "terminal", id: "terminal" });
    this.state = el("p", { class: "muted", id: "terminal-state", "aria-live": "polite", text: "connecting…" });
    this.node = el("section", { "aria-label": "Terminal" }, this.state, this.host);
    root.append(this.node);
    this.term = new window.Terminal({ cursorBlink: true, fontSize: 14, convertEol: false, scrollback: 5000 });
    this.fit = new window.FitAddon.FitAddon();
    this.term.loadAddon(this.fit);
    this.term.open(this.host);
    this.fit.fit();
    const encoder = new TextEncoder();
    const ws = new WebSocket(socketUrl(sessionPath(session.id, "/terminal"), { rows: this.term.rows, cols: this.term.cols }));
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    ws.onopen = () => { this.state.textContent = "connected"; this.term.focus(); };
    ws.onmessage = (message) => {
      this.term.write(typeof message.data === "string" ? message.data : new Uint8Array(message.data));
    };
    ws.onclose = (close) => { this.state.textContent = `disconnected${close.reason ? `: ${close.reason}` : ""}`; };
    this.term.onData((data) => { if (ws.readyState === WebSocket.OPEN) ws.send(encoder.encode(data)); });
    this.term.onResize(({ rows, cols }) => {
      if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "resize", rows, cols }));
    });
    this.onWindowResize = () => this.fit.fit();
    window.addEventListener("resize", this.onWindowResize);
  }

  dispose() {
    window.removeEventListener("resize", this.onWindowResize);
    this.ws.close(1000, "tab closed");
    this.term.dispose();
    this.node.remove();
  }
}
