// One session's page: its header (state and actions) and tabs: console, files, history,
// terminal. One WebSocket per page, shared by the tabs; the console tab stays alive while
// another tab shows, so no run's events are missed.

import { api, sessionPath } from "./api.js";
import { ConsoleTab } from "./console.js";
import { el, notice } from "./dom.js";
import { FilesTab } from "./files.js";
import { HistoryTab } from "./history.js";
import { sessionAction } from "./sessions.js";
import { SessionSocket } from "./socket.js";
import { TerminalTab } from "./terminal.js";

const TABS = [["console", "Console"], ["files", "Files"], ["history", "History"], ["terminal", "Terminal"]];

export class SessionPage {
  constructor(root, sessionId, tab) {
    this.root = root;
    this.sessionId = sessionId;
    this.tabs = {};
    this.node = el("div", { class: "session-page" }, el("p", { class: "muted", text: "Loading…" }));
    root.append(this.node);
    this.ready = this.load(tab || "console");
  }

  async load(tab) {
    try {
      this.session = await api("GET", sessionPath(this.sessionId));
    } catch (err) {
      this.node.replaceChildren(el("p", { class: "error-text", text: `Session ${this.sessionId}: ${err.message}` }),
        el("a", { href: "#/", text: "Back to sessions" }));
      return;
    }
    const s = this.session;
    this.socket = new SessionSocket(s.id);
    this.stateNode = el("span", { class: `state state-${s.kernel.state}`, id: "kernel-state", text: s.kernel.state });
    this.socketNode = el("span", { class: "muted", id: "socket-state", text: "connecting" });
    this.socket.listen((event) => {
      if (event.type === "socket") this.socketNode.textContent = event.state === "open" ? "live" : "reconnecting…";
      if (event.type === "status" && event.state) this.setState(event.state);
      if (event.type === "status" && event.state === "deleted") notice(`Session ${s.id} was deleted`);
    });
    const action = (name, label) => el("button", { type: "button", "data-action": name,
      onclick: async () => {
        try {
          const doc = await sessionAction(s.id, name);
          if (name === "delete" && doc) { location.hash = "#/"; return; }
          if (name === "duplicate" && doc) location.hash = `#/session/${encodeURIComponent(doc.id)}`;
        } catch (err) {
          notice(`${label} failed: ${err.message}`);
        }
      } }, label);
    this.tabList = el("div", { class: "tabs", role: "tablist", "aria-label": "Session views" },
      TABS.map(([name, label]) => el("a", { role: "tab", id: `tab-${name}`, href: `#/session/${encodeURIComponent(s.id)}/${name}`,
        "data-tab": name, text: label })));
    this.panel = el("div", { class: "tab-panel", role: "tabpanel" });
    this.node.replaceChildren(
      el("div", { class: "session-head" },
        el("h2", {}, el("code", { text: s.id })),
        el("span", { class: "pill", text: s.language }),
        s.persistent ? el("span", { class: "pill", text: "persistent" }) : null,
        el("span", {}, "kernel ", this.stateNode),
        el("span", {}, "socket ", this.socketNode),
        el("span", { class: "row" }, action("interrupt", "Interrupt"), action("restart", "Restart"), action("duplicate", "Duplicate"),
          action("delete", "Delete"))),
      this.tabList, this.panel);
    this.show(tab);
  }

  setState(state) {
    if (!this.stateNode) return;
    this.stateNode.textContent = state;
    this.stateNode.className = `state state-${state}`;
  }

  async show(tab) {
    await this.ready;
    if (!this.session) return;
    if (!TABS.some(([name]) => name === tab)) tab = "console";
    for (const link of this.tabList.children) link.setAttribute("aria-selected", String(link.dataset.tab === tab));
    for (const [name, view] of Object.entries(this.tabs)) {
      if (name === tab) continue;
      if (name === "console") view.node.hidden = true;
      else { view.dispose(); delete this.tabs[name]; }
    }
    if (this.tabs[tab]) {
      this.tabs[tab].node.hidden = false;
      if (tab === "console") this.tabs.console.editor.refresh();
      return;
    }
    const s = this.session;
    if (tab === "console") this.tabs.console = new ConsoleTab(this.panel, s, this.socket);
    else if (tab === "files") this.tabs.files = new FilesTab(this.panel, s, this.socket);
    else if (tab === "history") this.tabs.history = new HistoryTab(this.panel, s);
    else if (tab === "terminal") this.tabs.terminal = new TerminalTab(this.panel, s);
  }

  dispose() {
    for (const view of Object.values(this.tabs)) view.dispose();
    if (this.socket) this.socket.close();
    this.node.remove();
  }
}
