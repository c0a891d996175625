// The server page: /health and /api/resources/stats as numbers, and kernel and server
// memory over the last minutes as a small chart (canvas), sampled every 2 seconds.

import { api } from "./api.js";
import { bytes, el, notice } from "./dom.js";

const SAMPLE_MS = 2000;
const KEEP = 150; // 5 minutes of samples
const history = []; // kept across visits to the page: {at, kernels, server}

function table(caption, rows) {
  return el("table", { class: "grid compact" }, el("caption", { text: caption }),
    el("tbody", {}, rows.map(([name, value]) => el("tr", {}, el("th", { scope: "row", text: name }), el("td", { text: String(value) })))));
}

export class ServerPage {
  constructor(root) {
    this.numbers = el("div", { class: "server-numbers", id: "server-numbers" });
    this.canvas = el("canvas", { id: "memory-chart", width: "640", height: "180", role: "img",
      "aria-label": "Memory over time: kernels and server" });
    this.node = el("div", { class: "server-page" },
      el("h2", { text: "Server" }),
      this.numbers,
      el("section", { "aria-label": "Memory chart" }, el("h3", { text: "Memory (last 5 minutes)" }), this.canvas,
        el("p", { class: "legend" }, el("span", { class: "swatch kernels" }), " kernels ", el("span", { class: "swatch server" }), " server")));
    root.append(this.node);
    this.sample();
    this.timer = setInterval(() => this.sample(), SAMPLE_MS);
  }

  dispose() {
    clearInterval(this.timer);
    this.node.remove();
  }

  async sample() {
    let stats;
    let health;
    try {
      [stats, health] = await Promise.all([api("GET", "/api/resources/stats"), fetch("/health").then((r) => r.json())]);
    } catch (err) {
      notice(`Server: ${err.message}`);
      return;
    }
    const memory = stats.memory || {};
    history.push({ at: Date.now(), kernels: memory.kernels_bytes ?? 0, server: memory.server_rss_bytes ?? 0 });
    while (history.length > KEEP) history.shift();
    const pool = stats.pool || {};
    const pools = [
      ...Object.entries(pool.pools || health.pool || {}).map(([name, p]) =>
        [name, `${p.ready ?? "?"} ready${p.starting ? `, ${p.starting} starting` : ""} of ${p.target ?? "?"}`]),
      ...["size", "claimed", "misses"].filter((k) => pool[k] !== undefined).map((k) => [k, pool[k]]),
    ];
    const objectRows = (obj) => Object.entries(obj || {}).map(([k, v]) => [k, typeof v === "object" ? JSON.stringify(v) : v]);
    this.numbers.replaceChildren(
      table("Health", [["state", health.state], ["version", health.version], ["uptime", `${Math.round(health.uptime_s)} s`],
        ["sessions", stats.sessions], ["live kernels", stats.live_kernels],
        ["WebSocket clients", stats.server?.websocket_clients ?? "–"], ["background runs", stats.server?.background_runs ?? "–"]]),
      table("Kernels by state", objectRows(stats.kernel_states)),
      table("Pool", pools.length ? pools : [["pool", "off"]]),
      table("Culls by reason", objectRows(stats.culled).length ? objectRows(stats.culled) : [["culls", 0]]),
      table("Memory", [["kernels", bytes(memory.kernels_bytes)], ["server", bytes(memory.server_rss_bytes)],
        ...objectRows(memory).filter(([k]) => !["kernels_bytes", "server_rss_bytes"].includes(k))]));
    this.draw();
  }

  draw() {
    const ctx = this.canvas.getContext("2d");
    const { width, height } = this.canvas;
    ctx.clearRect(0, 0, width, height);
    const max = Math.max(1, ...history.map((h) => Math.max(h.kernels, h.server)));
    ctx.strokeStyle = "#ccc";
    ctx.strokeRect(0.5, 0.5, width - 1, height - 1);
    ctx.fillStyle = "#555";
    ctx.font = "12px system-ui, sans-serif";
    ctx.fillText(bytes(max), 6, 14);
    const line = (key, colour) => {
      ctx.strokeStyle = colour;
      ctx.lineWidth = 2;
      ctx.beginPath();
      history.forEach((h, i) => {
        const x = (i / Math.max(1, KEEP - 1)) * (width - 2) + 1;
        const y = height - 2 - (h[key] / max) * (height - 24);
        if (i) ctx.lineTo(x, y); else ctx.moveTo(x, y);
      });
      ctx.stroke();
      const last = history[history.length - 1];
      if (last) { // the newest sample as a dot: visible from the first one on
        const x = ((history.length - 1) / Math.max(1, KEEP - 1)) * (width - 2) + 1;
        ctx.fillStyle = colour;
        ctx.beginPath();
        ctx.arc(x, height - 2 - (last[key] / max) * (height - 24), 3, 0, 2 * Math.PI);
        ctx.fill();
      }
    };
    line("kernels", "#2458c6");
    line("server", "#cd3131");
  }
}
