// The history tab: the session's stored runs with their outputs (GET .../runs), and the
// notebook download (GET .../notebook).

import { api, download, sessionPath } from "./api.js";
import { ago, el, notice } from "./dom.js";
import { renderStoredOutputs } from "./outputs.js";

export class HistoryTab {
  constructor(root, session) {
    this.session = session;
    this.list = el("div", { class: "history", id: "history-list" });
    this.node = el("section", { "aria-label": "Run history" },
      el("div", { class: "row" },
        el("button", { type: "button", onclick: () => this.refresh() }, "Refresh"),
        el("button", { type: "button", id: "notebook-download", onclick: () => this.notebook() }, "Download notebook (.ipynb)")),
      this.list);
    root.append(this.node);
    this.refresh();
  }

  dispose() {
    this.node.remove();
  }

  async refresh() {
    let doc;
    try {
      doc = await api("GET", sessionPath(this.session.id, "/runs"));
    } catch (err) {
      notice(`History: ${err.message}`);
      return;
    }
    const runs = doc.runs || [];
    if (!runs.length) {
      this.list.replaceChildren(el("p", { class: "muted", text: "No runs yet." }));
      return;
    }
    this.list.replaceChildren(...runs.map((run) => {
      const out = el("div", { class: "cell-out" });
      renderStoredOutputs(out, run.outputs && run.outputs.length ? run.outputs : [
        ...(run.stdout ? [{ type: "stdout", content: run.stdout }] : []),
        ...(run.stderr ? [{ type: "stderr", content: run.stderr }] : []),
        ...(run.error ? [{ type: "error", ...run.error }] : []),
      ]);
      const when = run.started_at ? ago(run.started_at) : "";
      const meta = [run.status, when, run.duration_ms !== undefined && run.duration_ms !== null ? `${Math.round(run.duration_ms)} ms` : ""]
        .filter(Boolean).join(" · ");
      return el("article", { class: "cell", "data-run-id": run.run_id || "" },
        el("div", { class: "cell-head" }, el("pre", { class: "cell-code", text: run.code || "" }),
          el("span", { class: "cell-status", text: meta })),
        out);
    }));
  }

  async notebook() {
    try {
      await download(sessionPath(this.session.id, "/notebook"), `${this.session.id}.ipynb`);
    } catch (err) {
      notice(`Notebook: ${err.message}`);
    }
  }
}
