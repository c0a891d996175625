// The console tab: an editor (CodeMirror 5, vendored), Shift+Enter runs over the session's
// WebSocket, and every run of the session, this page's or not, appears as a cell whose
// outputs stream in as the events come.

import { api, sessionPath } from "./api.js";
import { el } from "./dom.js";
import { OutputArea } from "./outputs.js";

const MODES = {
  python: "python",
  node: "javascript",
  javascript: "javascript",
  typescript: { name: "javascript", typescript: true },
  deno: { name: "javascript", typescript: true },
  go: "go",
  bash: "shell",
};
const RUN_EVENTS = new Set(["stdout", "stderr", "display", "error", "input_request", "done"]);

function newClientId() {
  return "c-" + Array.from(crypto.getRandomValues(new Uint8Array(8)), (b) => b.toString(16).padStart(2, "0")).join("");
}

export class ConsoleTab {
  constructor(root, session, socket) {
    this.session = session;
    this.socket = socket;
    this.cellsByRun = new Map(); // run id -> cell
    this.cellsByClient = new Map(); // our client id -> cell, until its first event names the run
    this.cells = el("div", { class: "cells", "aria-live": "polite", "aria-label": "Runs" });
    const host = el("div", { class: "editor", id: "editor" });
    this.runButton = el("button", { type: "button", class: "primary", id: "run-button", onclick: () => this.run() }, "Run ⇧⏎");
    const interrupt = el("button", { type: "button", id: "interrupt-button", onclick: () => this.interrupt() }, "Interrupt");
    const clearButton = el("button", { type: "button", onclick: () => this.clearCells() }, "Clear");
    this.node = el("section", { class: "console", "aria-label": "Console" },
      this.cells,
      el("div", { class: "prompt" },
        el("label", { for: "editor", class: "muted", text: `Code (${session.language}) — Shift+Enter runs, Esc leaves the editor` }),
        host,
        el("div", { class: "row" }, this.runButton, interrupt, clearButton)));
    root.append(this.node);
    this.editor = window.CodeMirror(host, {
      value: "",
      mode: MODES[session.language] || null,
      lineNumbers: true,
      indentUnit: session.language === "go" ? 8 : 4,
      indentWithTabs: session.language === "go",
      viewportMargin: Infinity,
      screenReaderLabel: "Code editor",
      extraKeys: {
        "Shift-Enter": () => this.run(),
        "Ctrl-Enter": () => this.run(),
        Esc: () => this.runButton.focus(),
      },
    });
    this.unlisten = socket.listen((event) => this.onEvent(event));
    this.editor.focus();
  }

  dispose() {
    this.unlisten();
    this.node.remove();
  }

  run() {
    const code = this.editor.getValue();
    if (!code.trim()) return;
    const clientId = newClientId();
    const cell = this.makeCell(code, "queued");
    this.cellsByClient.set(clientId, cell);
    this.socket.send({ type: "run", id: clientId, code });
    this.editor.setValue("");
    this.editor.focus();
  }

  interrupt() {
    this.socket.send({ type: "interrupt" });
  }

  clearCells() {
    this.cells.replaceChildren();
    this.cellsByRun.clear();
  }

  makeCell(code, status) {
    const codeNode = el("pre", { class: "cell-code", text: code ?? "" });
    const statusNode = el("span", { class: "cell-status", text: status });
    const out = el("div", { class: "cell-out" });
    const node = el("article", { class: "cell" }, el("div", { class: "cell-head" }, codeNode, statusNode), out);
    this.cells.append(node);
    const cell = { node, codeNode, statusNode, area: null, runId: null };
    cell.area = new OutputArea(out, (value) => this.socket.send({ type: "input_reply", value }));
    node.scrollIntoView({ block: "end" });
    return cell;
  }

  cellFor(event) {
    const runId = event.run_id;
    let cell = this.cellsByRun.get(runId);
    if (cell) return cell;
    if (event.id && this.cellsByClient.has(event.id)) {
      cell = this.cellsByClient.get(event.id);
      this.cellsByClient.delete(event.id);
    } else {
      // Another page's run (or a REST one): its code comes from the run's record, and
      // what it printed before this page saw it from the journal (replayed after the
      // events already delivered live: onEvent puts them back in order by seq).
      cell = this.makeCell("", "running");
      cell.node.classList.add("foreign");
      this.socket.send({ type: "subscribe", run_id: runId, after: 0 });
      api("GET", sessionPath(this.session.id, `/runs/${encodeURIComponent(runId)}`))
        .then((doc) => { cell.codeNode.textContent = doc.code || ""; cell.node.dataset.source = doc.source || ""; })
        .catch(() => { cell.codeNode.textContent = "(code not available)"; });
    }
    cell.runId = runId;
    cell.node.dataset.runId = runId;
    this.cellsByRun.set(runId, cell);
    return cell;
  }

  onEvent(event) {
    if (event.type === "socket" && event.state === "open") {
      // Back after a lost connection: what the unfinished runs printed meanwhile comes
      // from their journals (cells skip what they already have, by seq).
      if (this.connectedBefore) {
        for (const [runId, cell] of this.cellsByRun) {
          if (!cell.done) this.socket.send({ type: "subscribe", run_id: runId, after: cell.lastSeq ?? 0 });
        }
      }
      this.connectedBefore = true;
      return;
    }
    if (event.type === "status") { // the kernel's state shows in the page's header (session.js)
      if (event.run_id && event.state === "busy") { // (a replayed one may come after the run's done)
        const cell = this.cellFor(event);
        if (cell.statusNode.textContent === "queued") this.setStatus(cell, "running");
      }
      return;
    }
    if (event.type === "error" && typeof event.error === "string") { // a protocol error, the API's shape
      const cell = (event.id && this.cellsByClient.get(event.id)) || null;
      if (cell) {
        cell.area.addError({ ename: `Error ${event.status_code}`, evalue: event.error });
        this.setStatus(cell, "refused");
      }
      return;
    }
    if (event.type === "result") return; // the same run's done already came
    if (!RUN_EVENTS.has(event.type) || !event.run_id) return;
    const cell = this.cellFor(event);
    this.addInOrder(cell, event);
    if (event.type === "done") {
      cell.done = true;
      const failed = event.exit_code && event.exit_code !== 0;
      const time = event.duration_ms !== undefined ? ` · ${Math.round(event.duration_ms)} ms` : "";
      this.setStatus(cell, `${event.timed_out ? "timed out" : failed ? "failed" : "done"}${time}`);
      cell.node.classList.toggle("failed", Boolean(failed));
    } else if (cell.statusNode.textContent === "queued") {
      this.setStatus(cell, "running");
    }
    if (this.isNearBottom()) cell.node.scrollIntoView({ block: "end" });
  }

  // Events go out as they come; one older than what the cell shows (a replayed one)
  // makes the cell redraw its outputs in journal order.
  addInOrder(cell, event) {
    cell.events = cell.events || [];
    if (event.seq !== undefined && cell.events.some((e) => e.seq === event.seq)) return; // seen already
    cell.events.push(event);
    const last = cell.lastSeq ?? -1;
    if (typeof event.seq === "number" && event.seq < last) {
      cell.events.sort((a, b) => (a.seq ?? Infinity) - (b.seq ?? Infinity));
      cell.area.reset();
      for (const e of cell.events) this.render(cell, e);
    } else {
      this.render(cell, event);
    }
    if (typeof event.seq === "number") cell.lastSeq = Math.max(last, event.seq);
  }

  render(cell, event) {
    if (event.type !== "input_request") cell.area.closeInputs();
    cell.area.add(event);
  }

  setStatus(cell, text) {
    cell.statusNode.textContent = text;
  }

  isNearBottom() {
    return window.innerHeight + window.scrollY >= document.body.scrollHeight - 200;
  }
}
