// The sessions page: every session with its language, provisioner, kernel state, memory,
// last run and setup status (the list joined with /api/resources/stats' live kernels),
// refreshed every few seconds; a form to create one; and each row's actions.

import { api, sessionPath } from "./api.js";
import { ago, bytes, el, notice } from "./dom.js";

const REFRESH_MS = 3000;
const LANGUAGES = ["python", "node", "typescript", "deno", "go", "bash"];
const SETUP_KEYS = { python: "pip", node: "npm", typescript: "npm", deno: "npm", go: "go" };

export async function sessionAction(id, action) {
  if (action === "delete") {
    if (!confirm(`Delete session ${id}, its kernel, files and history?`)) return null;
    return api("DELETE", sessionPath(id));
  }
  if (action === "duplicate") return api("POST", sessionPath(id, "/duplicate"), {});
  return api("POST", sessionPath(id, `/${action}`), {});
}

export function createForm(onCreated) {
  const language = el("select", { id: "new-language", name: "language" }, LANGUAGES.map((name) => el("option", { value: name, text: name })));
  const provisioner = el("select", { id: "new-provisioner", name: "provisioner" },
    el("option", { value: "", text: "server default" }), el("option", { value: "local", text: "local (bubblewrap)" }),
    el("option", { value: "docker", text: "docker" }));
  const id = el("input", { id: "new-id", name: "id", placeholder: "automatic", pattern: "[A-Za-z0-9_\\-]{1,128}", autocomplete: "off" });
  const packages = el("input", { id: "new-packages", name: "packages", placeholder: "e.g. requests numpy", autocomplete: "off" });
  const persistent = el("input", { id: "new-persistent", type: "checkbox", name: "persistent" });
  const internet = el("input", { id: "new-internet", type: "checkbox", name: "internet" });
  const submit = el("button", { type: "submit", class: "primary", id: "create-session" }, "Create session");
  const form = el("form", { class: "create", id: "create-form", "aria-label": "New session" },
    el("h2", { text: "New session" }),
    el("div", { class: "fields" },
      el("label", {}, "Language ", language),
      el("label", {}, "Provisioner ", provisioner),
      el("label", {}, "Id ", id),
      el("label", {}, "Setup packages ", packages),
      el("label", { class: "check" }, persistent, " persistent"),
      el("label", { class: "check" }, internet, " internet access")),
    submit);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = { language: language.value, persistent: persistent.checked, allowInternetAccess: internet.checked };
    if (provisioner.value) body.provisioner = provisioner.value;
    if (id.value.trim()) body.id = id.value.trim();
    const names = packages.value.split(/[\s,]+/).filter(Boolean);
    if (names.length) {
      const key = SETUP_KEYS[language.value];
      if (!key) { notice(`${language.value} sessions take no setup packages`); return; }
      body.setup = { [key]: names };
    }
    submit.disabled = true;
    submit.textContent = "Creating…";
    try {
      const doc = await api("POST", "/api/sessions", body);
      id.value = packages.value = "";
      onCreated(doc);
    } catch (err) {
      notice(`Could not create the session: ${err.message}${err.field ? ` (field ${err.field})` : ""}`);
    } finally {
      submit.disabled = false;
      submit.textContent = "Create session";
    }
  });
  return form;
}

export class SessionsPage {
  constructor(root) {
    this.body = el("tbody", { id: "sessions-body" });
    this.count = el("span", { class: "muted", "aria-live": "polite" });
    this.node = el("div", { class: "sessions-page" },
      createForm((doc) => { location.hash = `#/session/${encodeURIComponent(doc.id)}`; }),
      el("section", { "aria-label": "Sessions" },
        el("h2", {}, "Sessions ", this.count),
        el("div", { class: "table-wrap" },
          el("table", { class: "grid", id: "sessions-table" },
            el("thead", {}, el("tr", {}, ["Id", "Language", "Provisioner", "Kernel", "Memory", "Last run", "Setup", "Actions"]
              .map((name) => el("th", { scope: "col", text: name })))),
            this.body))));
    root.append(this.node);
    this.refresh();
    this.timer = setInterval(() => this.refresh(), REFRESH_MS);
  }

  dispose() {
    clearInterval(this.timer);
    this.node.remove();
  }

  async refresh() {
    let list;
    let stats;
    try {
      [list, stats] = await Promise.all([api("GET", "/api/sessions"), api("GET", "/api/resources/stats")]);
    } catch (err) {
      notice(`Sessions: ${err.message}`);
      return;
    }
    const kernels = new Map((stats.kernels || []).map((k) => [k.session_id, k]));
    this.count.textContent = `(${list.count}${list.truncated ? "+" : ""})`;
    const rows = list.sessions.map((s) => this.row(s, kernels.get(s.id)));
    this.body.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: "8", class: "muted", text: "No sessions yet." }))]));
  }

  row(s, kernel) {
    const act = (action, label, cls) => el("button", { type: "button", class: cls, "data-action": action,
      "aria-label": `${label} ${s.id}`,
      onclick: async () => {
        try {
          const doc = await sessionAction(s.id, action);
          if (doc && action === "duplicate") notice(`Duplicated as ${doc.id}`, "info");
        } catch (err) {
          notice(`${label} failed: ${err.message}`);
        }
        this.refresh();
      } }, label);
    const state = (s.kernel && s.kernel.state) || "none";
    return el("tr", { "data-session-id": s.id },
      el("td", {}, el("a", { href: `#/session/${encodeURIComponent(s.id)}`, text: s.id })),
      el("td", { text: s.language }),
      el("td", { text: (kernel && kernel.provisioner) || s.provisioner || "–" }),
      el("td", {}, el("span", { class: `state state-${state}`, text: state })),
      el("td", { text: kernel ? bytes(kernel.memory_bytes) : "–" }),
      el("td", { text: ago(s.last_run_at) }),
      el("td", { text: s.setup_status || "–" }),
      el("td", { class: "actions" }, act("interrupt", "Interrupt"), act("restart", "Restart"), act("duplicate", "Duplicate"),
        act("delete", "Delete", "danger")));
  }
}
