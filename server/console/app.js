// The console's router: #/ (sessions), #/session/{id}[/{tab}], #/server. Hash routes, so
// the server serves one page and nothing of the session ever goes in a request path.

import { ServerPage } from "./server.js";
import { SessionPage } from "./session.js";
import { SessionsPage } from "./sessions.js";

const main = document.getElementById("main");
let page = null;
let pageKey = null;

function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  if (parts[0] === "session" && parts[1]) {
    const key = `session:${parts[1]}`;
    if (pageKey === key) { page.show(parts[2] || "console"); return; }
    swap(key, () => new SessionPage(main, parts[1], parts[2]));
  } else if (parts[0] === "server") {
    swap("server", () => new ServerPage(main));
  } else {
    swap("sessions", () => new SessionsPage(main));
  }
  for (const link of document.querySelectorAll("header nav a")) {
    const current = (link.id === "nav-server") === (pageKey === "server");
    if (current) link.setAttribute("aria-current", "page"); else link.removeAttribute("aria-current");
  }
}

function swap(key, make) {
  if (pageKey === key) return;
  if (page) page.dispose();
  pageKey = key;
  page = make();
}

async function health() {
  const node = document.getElementById("health");
  try {
    const doc = await (await fetch("/health")).json();
    node.textContent = `${doc.state} · v${doc.version}`;
  } catch (_) {
    node.textContent = "server unreachable";
  }
}

window.addEventListener("hashchange", route);
route();
health();
setInterval(health, 10000);
window.eraConsole = { version: 1 }; // what the tests wait for: the module ran
