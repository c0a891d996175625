// A run's outputs as the page shows them. Kernel output is untrusted: streams, errors,
// JSON and plain text go in as text (ANSI colours as styled spans); images as data: URLs
// in <img> (an image cannot run script, SVG included); HTML only inside an iframe
// sandboxed without allow-same-origin, so it has an opaque origin: no sessionStorage, no
// cookies, no key. Its document, frame.html, has its own CSP: scripts yes, connections
// none. The HTML goes to it by postMessage; only its height (a number) comes back.

import { appendAnsi } from "./ansi.js";
import { el } from "./dom.js";

const FRAME_URL = "/console/frame.html";
const MAX_FRAME_HEIGHT = 4000;
const frameHtml = new WeakMap(); // iframe -> the HTML it is to show

function frameOf(source) {
  for (const frame of document.querySelectorAll("iframe.out-html")) if (frame.contentWindow === source) return frame;
  return null;
}

window.addEventListener("message", (event) => {
  const frame = frameOf(event.source); // only our output frames are listened to
  if (!frame || !event.data || typeof event.data !== "object") return;
  if (event.data.type === "era-frame-ready" && frameHtml.has(frame)) {
    frame.contentWindow.postMessage({ type: "era-html", html: frameHtml.get(frame) }, "*"); // opaque origin: "*"
  } else if (event.data.type === "era-frame-height" && Number.isFinite(event.data.height)) {
    frame.style.height = `${Math.min(MAX_FRAME_HEIGHT, Math.max(24, Math.round(event.data.height) + 4))}px`;
  }
});

const IMAGE_TYPES = ["image/png", "image/jpeg", "image/gif", "image/webp"];
const BASE64 = /^[A-Za-z0-9+/=\s]*$/;

function utf8Base64(text) {
  const bytes = new TextEncoder().encode(text);
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(binary);
}

function asText(value) {
  return Array.isArray(value) ? value.join("") : String(value ?? "");
}

export function renderMimeBundle(data) {
  for (const type of IMAGE_TYPES) {
    if (data[type] !== undefined) {
      const b64 = asText(data[type]).replace(/\s+/g, "");
      if (!BASE64.test(b64)) break;
      return el("img", { class: "out-image", src: `data:${type};base64,${b64}`, alt: asText(data["text/plain"]) || "image output" });
    }
  }
  if (data["image/svg+xml"] !== undefined) {
    return el("img", { class: "out-image", src: `data:image/svg+xml;base64,${utf8Base64(asText(data["image/svg+xml"]))}`,
      alt: "SVG output" });
  }
  if (data["text/html"] !== undefined) {
    const frame = el("iframe", { class: "out-html", sandbox: "allow-scripts", src: FRAME_URL, title: "HTML output",
      referrerpolicy: "no-referrer" });
    frameHtml.set(frame, asText(data["text/html"]));
    return frame;
  }
  if (data["application/json"] !== undefined) {
    return el("pre", { class: "out-json", text: JSON.stringify(data["application/json"], null, 2) });
  }
  for (const type of ["text/markdown", "text/latex", "text/plain"]) {
    if (data[type] !== undefined) {
      const pre = el("pre", { class: "out-text" });
      appendAnsi(pre, asText(data[type]));
      return pre;
    }
  }
  const types = Object.keys(data).join(", ");
  return el("pre", { class: "out-text muted", text: `(output of type ${types || "none"} not shown)` });
}

export class OutputArea {
  // onInput(value): answers an input() prompt (the console sends it on the socket).
  constructor(node, onInput) {
    this.node = node;
    this.onInput = onInput;
    this.stream = null; // the <pre> the last stream chunk went to, while nothing else came after
    this.streamName = null;
    this.ansiState = {};
  }

  add(event) {
    switch (event.type) {
      case "stdout":
      case "stderr":
        return this.addStream(event.type, event.content ?? event.text ?? "");
      case "display":
      case "display_data":
      case "execute_result":
        this.endStream();
        return this.node.append(el("div", { class: "out-display" }, renderMimeBundle(event.data || {})));
      case "error":
        return this.addError(event);
      case "input_request":
        return this.addInput(event);
      case "done":
        return this.addDone(event);
      default:
        return undefined;
    }
  }

  reset() {
    this.node.replaceChildren();
    this.stream = null;
    this.streamName = null;
  }

  addStream(name, text) {
    if (!text) return;
    if (!this.stream || this.streamName !== name || this.stream !== this.node.lastChild) {
      this.stream = el("pre", { class: `out-${name}` });
      this.streamName = name;
      this.ansiState = {};
      this.node.append(this.stream);
    }
    appendAnsi(this.stream, text, this.ansiState);
  }

  endStream() {
    this.stream = null;
  }

  addError(event) {
    this.endStream();
    const pre = el("pre", { class: "out-error", role: "alert" });
    const traceback = Array.isArray(event.traceback) && event.traceback.length
      ? event.traceback.join("\n")
      : `${event.ename || "Error"}: ${event.evalue || ""}`;
    appendAnsi(pre, traceback);
    this.node.append(pre);
  }

  addInput(event) {
    this.endStream();
    if (!this.onInput) return;
    const input = el("input", { type: event.password ? "password" : "text", class: "input-reply", "aria-label": event.prompt || "input" });
    const form = el("form", { class: "input-request" }, el("label", { text: event.prompt || "input: " }), input,
      el("button", { type: "submit", text: "Send" }));
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      const value = input.value;
      form.replaceWith(el("pre", { class: "out-stdout", text: `${event.prompt || ""}${event.password ? "••••" : value}` }));
      this.onInput(value);
    });
    this.node.append(form);
    input.focus();
  }

  // An input() that another page answered, or that ended with its run: no longer asks.
  closeInputs() {
    for (const form of this.node.querySelectorAll("form.input-request")) form.remove();
  }

  addDone(event) {
    this.endStream();
    this.closeInputs();
  }
}

// A stored run (GET .../runs) rendered from its outputs list.
export function renderStoredOutputs(node, outputs) {
  const area = new OutputArea(node, null);
  for (const output of outputs || []) {
    const type = output.type || output.output_type;
    if (type === "stream") area.add({ type: output.name === "stderr" ? "stderr" : "stdout", content: asText(output.text) });
    else if (type === "stdout" || type === "stderr") area.add({ type, content: asText(output.content ?? output.text) });
    else if (type === "display" || type === "display_data" || type === "execute_result") area.add({ type: "display", data: output.data || {} });
    else if (type === "error") area.add({ type: "error", ...output });
  }
  return area;
}
