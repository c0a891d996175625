// The session's WebSocket (/api/sessions/{id}/ws), shared by the console and files tabs:
// every run's events of the session (REST, schedules and other pages' runs too) come to
// it. Reconnects with a growing pause while the page shows the session.

import { sessionPath, socketUrl } from "./api.js";

export class SessionSocket {
  constructor(sessionId) {
    this.sessionId = sessionId;
    this.listeners = new Set();
    this.closed = false;
    this.ws = null;
    this.pending = [];
    this.retryMs = 500;
    this.connect();
  }

  connect() {
    if (this.closed) return;
    const ws = new WebSocket(socketUrl(sessionPath(this.sessionId, "/ws")));
    this.ws = ws;
    ws.onopen = () => {
      this.retryMs = 500;
      for (const text of this.pending.splice(0)) ws.send(text);
      this.emit({ type: "socket", state: "open" });
    };
    ws.onmessage = (message) => {
      let event;
      try { event = JSON.parse(message.data); } catch (_) { return; }
      this.emit(event);
    };
    ws.onclose = (close) => {
      if (this.ws !== ws) return;
      this.emit({ type: "socket", state: "closed", code: close.code, reason: close.reason });
      if (this.closed || close.code === 1008 || close.reason === "session deleted") return;
      setTimeout(() => this.connect(), this.retryMs);
      this.retryMs = Math.min(this.retryMs * 2, 10000);
    };
  }

  emit(event) {
    for (const listener of [...this.listeners]) {
      try { listener(event); } catch (err) { console.error(err); }
    }
  }

  listen(callback) {
    this.listeners.add(callback);
    return () => this.listeners.delete(callback);
  }

  send(message) {
    const text = JSON.stringify(message);
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(text);
    else this.pending.push(text);
  }

  close() {
    this.closed = true;
    this.listeners.clear();
    if (this.ws) this.ws.close(1000, "page left the session");
  }
}
