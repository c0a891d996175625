// The files tab: the workspace's files (list, upload by drop or picker, download,
// delete) and the session's setup log, which streams in as `setup` events while it runs.

import { api, download, sessionPath } from "./api.js";
import { ago, bytes, el, notice } from "./dom.js";

function filePath(sessionId, path) {
  return sessionPath(sessionId, "/files/" + path.split("/").map(encodeURIComponent).join("/"));
}

export class FilesTab {
  constructor(root, session, socket) {
    this.session = session;
    this.body = el("tbody");
    this.picker = el("input", { type: "file", multiple: true, id: "file-picker", class: "visually-hidden",
      onchange: () => this.upload([...this.picker.files]) });
    this.drop = el("div", { class: "drop", id: "drop-zone", tabindex: "0", role: "button",
      "aria-label": "Upload files: drop them here or press Enter to choose" },
    "Drop files here to upload, or ", el("label", { for: "file-picker", class: "link", text: "choose files" }), ".");
    this.drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); this.picker.click(); } });
    this.drop.addEventListener("dragover", (e) => { e.preventDefault(); this.drop.classList.add("over"); });
    this.drop.addEventListener("dragleave", () => this.drop.classList.remove("over"));
    this.drop.addEventListener("drop", (e) => {
      e.preventDefault();
      this.drop.classList.remove("over");
      this.upload([...e.dataTransfer.files]);
    });
    this.setupLog = el("pre", { class: "setup-log", id: "setup-log", "aria-live": "polite" });
    const setup = session.setup
      ? el("section", { "aria-label": "Setup" },
        el("h3", { text: "Setup" }),
        el("p", { id: "setup-status", text: `status: ${session.setup_status || "none"}` }),
        this.setupLog)
      : null;
    this.node = el("section", { class: "files", "aria-label": "Files" },
      this.drop, this.picker,
      el("table", { class: "grid", id: "files-table" },
        el("thead", {}, el("tr", {}, el("th", { text: "Path" }), el("th", { text: "Size" }), el("th", { text: "Uploaded" }),
          el("th", { text: "" }))),
        this.body),
      setup);
    root.append(this.node);
    this.showSetup(session);
    this.unlisten = socket.listen((event) => {
      if (event.type !== "setup" || typeof event.content !== "string") return;
      this.streamed = true;
      this.setupLog.append(event.content.endsWith("\n") ? event.content : event.content + "\n");
    });
    this.refresh();
    // While setup runs, its log streams in as events; its status is the session's: polled.
    this.setupTimer = setInterval(() => this.pollSetup(), 1500);
  }

  dispose() {
    clearInterval(this.setupTimer);
    this.unlisten();
    this.node.remove();
  }

  showSetup(session) {
    const status = this.node.querySelector("#setup-status");
    if (!status) return;
    status.textContent = `status: ${session.setup_status || "none"}`;
    const result = session.setup_result || {};
    const logs = result.logs || [result.stdout, result.stderr, result.error].filter(Boolean).join("\n");
    // The stored log is the whole story once setup has ended; while it runs, the stream is.
    if (logs && (!this.streamed || ["completed", "failed"].includes(session.setup_status))) this.setupLog.textContent = logs;
  }

  async pollSetup() {
    if (!this.session.setup || ["completed", "failed"].includes(this.session.setup_status)) {
      clearInterval(this.setupTimer);
      return;
    }
    try {
      this.session = await api("GET", sessionPath(this.session.id));
      this.showSetup(this.session);
    } catch (_) { /* the next poll tries again */ }
  }

  async refresh() {
    let doc;
    try {
      doc = await api("GET", sessionPath(this.session.id, "/files"));
    } catch (err) {
      notice(`Files: ${err.message}`);
      return;
    }
    const rows = doc.files.map((file) => el("tr", { "data-path": file.path },
      el("td", {}, el("code", { text: file.path })),
      el("td", { text: bytes(file.size) }),
      el("td", { text: file.uploaded ? ago(file.uploaded) : "" }),
      el("td", { class: "actions" },
        el("button", { type: "button", onclick: () => this.download(file.path), "aria-label": `Download ${file.path}` }, "Download"),
        el("button", { type: "button", class: "danger", onclick: () => this.remove(file.path), "aria-label": `Delete ${file.path}` }, "Delete"))));
    this.body.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: "4", class: "muted", text: "No files." }))]));
  }

  async upload(files) {
    for (const file of files) {
      try {
        await api("PUT", filePath(this.session.id, file.name), await file.arrayBuffer());
        notice(`Uploaded ${file.name}`, "info");
      } catch (err) {
        notice(`Upload of ${file.name} failed: ${err.message}`);
      }
    }
    this.picker.value = "";
    this.refresh();
  }

  async download(path) {
    try {
      await download(filePath(this.session.id, path), path.split("/").pop());
    } catch (err) {
      notice(`Download failed: ${err.message}`);
    }
  }

  async remove(path) {
    if (!confirm(`Delete ${path}?`)) return;
    try {
      await api("DELETE", filePath(this.session.id, path));
    } catch (err) {
      notice(`Delete failed: ${err.message}`);
    }
    this.refresh();
  }
}
