// The API as the page calls it: one fetch wrapper that sends the key, asks for it on a
// 401 (once, for every request waiting), and turns the API's error shape into an Error.
// The key lives in sessionStorage only: not a cookie (no CSRF), not the URL (no history).

const KEY_NAME = "era.apiKey";

export class ApiError extends Error {
  constructor(status, message, field) {
    super(message);
    this.status = status;
    this.field = field;
  }
}

export function apiKey() {
  return sessionStorage.getItem(KEY_NAME);
}

let asking = null; // the one pending key prompt

function askForKey(reason) {
  if (asking) return asking;
  const dialog = document.getElementById("key-dialog");
  const form = document.getElementById("key-form");
  const input = document.getElementById("key-input");
  const message = document.getElementById("key-message");
  message.textContent = reason === "wrong"
    ? "That API key was not accepted (401 Unauthorized). Check it and try again."
    : "This server needs its API key. It is kept in this tab only (sessionStorage).";
  message.className = reason === "wrong" ? "error-text" : "";
  asking = new Promise((resolve) => {
    const submit = (event) => {
      event.preventDefault();
      const key = input.value.trim();
      if (!key) return;
      sessionStorage.setItem(KEY_NAME, key);
      input.value = ""; // never shown again
      form.removeEventListener("submit", submit);
      dialog.close();
      asking = null;
      resolve();
    };
    form.addEventListener("submit", submit);
    dialog.addEventListener("cancel", (event) => event.preventDefault(), { once: true });
    if (!dialog.open) dialog.showModal();
    input.focus();
  });
  return asking;
}

function isRawBody(body) {
  return body instanceof Blob || body instanceof ArrayBuffer || ArrayBuffer.isView(body);
}

// api("GET", "/api/sessions") -> parsed JSON (or text); opts.raw -> the Response.
export async function api(method, path, body, opts = {}) {
  const headers = {};
  const key = apiKey();
  if (key) headers.Authorization = "Bearer " + key;
  let payload;
  if (body !== undefined) {
    if (isRawBody(body)) {
      payload = body;
      headers["Content-Type"] = "application/octet-stream";
    } else {
      payload = JSON.stringify(body);
      headers["Content-Type"] = "application/json";
    }
  }
  const res = await fetch(path, { method, headers, body: payload, cache: "no-store" });
  if (res.status === 401) {
    if (key) sessionStorage.removeItem(KEY_NAME);
    await askForKey(key ? "wrong" : "needed");
    return api(method, path, body, opts);
  }
  if (!res.ok) {
    let message = `${res.status} ${res.statusText}`;
    let field;
    try {
      const doc = await res.json();
      if (doc && typeof doc.error === "string") message = doc.error;
      field = doc && doc.field;
    } catch (_) { /* not JSON: keep the status line */ }
    throw new ApiError(res.status, message, field);
  }
  if (opts.raw) return res;
  const type = res.headers.get("Content-Type") || "";
  return type.includes("json") ? res.json() : res.text();
}

// A WebSocket URL on this server. Browsers cannot set headers on a WebSocket, so the key
// goes as ?token= on the socket's own URL (never the page's); the server redacts it in logs.
export function socketUrl(path, params = {}) {
  const url = new URL(path, location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  for (const [name, value] of Object.entries(params)) url.searchParams.set(name, String(value));
  const key = apiKey();
  if (key) url.searchParams.set("token", key);
  return url.toString();
}

// Save a response body as a file: fetched with the key, handed over as a blob URL.
export async function download(path, filename) {
  const res = await api("GET", path, undefined, { raw: true });
  const blob = await res.blob();
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = filename;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

export function sessionPath(id, rest = "") {
  return `/api/sessions/${encodeURIComponent(id)}${rest}`;
}
