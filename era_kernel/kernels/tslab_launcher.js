// Starts tslab (JavaScript and TypeScript kernels) the way ERA needs it.
//
//   node tslab_launcher.js TSLAB_PACKAGE_DIR [--js] CONNECTION_FILE
//
// (era_kernel/kernels/tslab.py finds the package and runs this.) Six adjustments to
// tslab 1.0.x, all from outside its files:
// 1. IPC: tslab binds "<transport>://<ip>:<port>", but Jupyter's IPC sockets are
//    "<ip>-<port>"; ERA's provisioners only hand out IPC connection files.
// 2. Errors: tslab prints a cell's exception to stderr and replies "error" with no
//    ename/evalue; we reply (and publish) the exception's name, message and stack, so
//    clients get an exit code and an `error` like every other kernel's.
// 3. process.exit(n) while a cell runs throws SystemExit(n) instead of killing the
//    kernel (as sys.exit does in IPython): the session keeps its state and its
//    output, and the reply says ename "SystemExit", evalue "n".
// 4. After an error, tslab cancels every request queued in the next 200 ms, so a run
//    sent right after a failed one was "aborted". Now only stop_on_error requests
//    (Jupyter's default) do that; ERA sends stop_on_error=false.
// 5. Types never stop a run: JavaScript runs as Node runs it, and TypeScript is
//    transpiled without type-checking (as ERA's tsx does); only syntax errors refuse a
//    cell. A TypeScript kernel started with ERA_TYPECHECK=1 reports type errors too.
// 6. Jupyter's protocol as jupyter_kernel_test checks it: kernel_info_reply has a
//    status and the real language versions, comm_info_request gets a comm_info_reply
//    (tslab sent a "complete_reply"), history_request is answered from this kernel's
//    cells, a cell's last value is an execute_result (tslab printed it to stdout), and a
//    failed cell's only output is its `error` (tslab also printed it to stderr).
// Also: NODE_PATH is honoured when a session sets it after the start, by require and
// by TypeScript's module resolution (which never looks at it on its own); HTTP_PROXY,
// HTTPS_PROXY and NO_PROXY by fetch and http/https (node_proxy.js: Node before 24 does
// not), so a session behind ERA's egress proxy reaches out; and a thrown error's causes
// (fetch's "fetch failed" says nothing else) are in its traceback.
"use strict";

const crypto = require("crypto");
const path = require("path");
const util = require("util");

const [tslabDir, ...rest] = process.argv.slice(2);
const jsKernel = rest.includes("--js");
const configPath = rest.filter((a) => a !== "--js")[0];
if (!tslabDir || !configPath) {
  console.error("usage: node tslab_launcher.js TSLAB_PACKAGE_DIR [--js] CONNECTION_FILE");
  process.exit(2);
}
const dist = (name) => require(path.join(tslabDir, "dist", name));

// ---- proxy variables, for fetch and http/https --------------------------------------
// In the kernel's environment from its start (a session behind the egress proxy), or set
// by a cell later: looked at again before each cell. undici is installed beside tslab.
const nodeProxy = require(path.join(__dirname, "node_proxy.js"));
const undiciDir = path.dirname(tslabDir);
nodeProxy.refresh(undiciDir);

// ---- NODE_PATH, for require and for TypeScript's module resolution ---------------
// Node reads NODE_PATH once at start; a session sets it later (startup cells), so it is
// read again before a cell whenever it changed, and tslab's TypeScript converter (whose
// module resolution never looks at NODE_PATH) is rebuilt with "paths" pointing there.
const Module = require("module");
const nodePathDirs = () => (process.env.NODE_PATH || "").split(path.delimiter).filter(Boolean);
// TypeScript's exports are read-only getters: tslab gets a view of the module in which
// createWatchCompilerHost adds the options. Done before any tslab file loads it.
const tsPath = require.resolve("@tslab/typescript-for-tslab", { paths: [path.join(tslabDir, "dist")] });
const ts = require(tsPath);
const createWatchCompilerHost = ts.createWatchCompilerHost;
const withNodePath = function (rootFiles, options, ...more) {
  const dirs = nodePathDirs();
  if (dirs.length > 0) {
    const paths = { "*": [...dirs.map((dir) => path.join(dir, "*")), "*"] };
    const typeRoots = [...(options.typeRoots || []), ...dirs.map((dir) => path.join(dir, "@types"))];
    options = { ...options, baseUrl: "/", paths, typeRoots };
  }
  return createWatchCompilerHost.call(this, rootFiles, options, ...more);
};

// ---- 5. which diagnostics refuse a cell ------------------------------------------
// tslab asks for every pre-emit diagnostic (syntax, types, declarations) and refuses
// the cell on any. Without type-checking, only syntax counts, plus TS1308 ("await is
// only allowed in async functions"), which tslab drops itself after taking it as the
// sign of a top-level await (so it is needed, never shown).
const typecheck = !jsKernel && process.env.ERA_TYPECHECK === "1";
const TOP_LEVEL_AWAIT = 1308;
function syntaxOnly(program, sourceFiles, token) {
  const found = [...program.getConfigFileParsingDiagnostics(), ...program.getOptionsDiagnostics(token)];
  for (const file of sourceFiles) {
    found.push(...program.getSyntacticDiagnostics(file, token));
    found.push(...program.getSemanticDiagnostics(file, token).filter((d) => d.code === TOP_LEVEL_AWAIT));
  }
  return ts.sortAndDeduplicateDiagnostics(found);
}
const overrides = {
  createWatchCompilerHost: withNodePath,
  getPreEmitDiagnosticsOfFiles: typecheck ? ts.getPreEmitDiagnosticsOfFiles : syntaxOnly,
  // "//%module" cells (tslab's modules) ask this one
  getPreEmitDiagnostics: typecheck
    ? ts.getPreEmitDiagnostics
    : (program, file, token) => syntaxOnly(program, file ? [file] : program.getSourceFiles(), token),
};
require.cache[tsPath].exports = new Proxy(ts, {
  get: (target, key) => (Object.hasOwn(overrides, key) ? overrides[key] : target[key]),
});

// ---- 1. IPC socket names --------------------------------------------------------
const jupyter = dist("jupyter");
jupyter.ZmqServer.prototype.bindSocket = async function bindSocket(sock, port) {
  const conn = this.connInfo;
  const sep = conn.transport === "ipc" ? "-" : ":";
  await sock.bind(`${conn.transport}://${conn.ip}${sep}${port}`);
};

// ---- 2. what the cell threw, captured where tslab prints it ----------------------
// The cell running now: its failure ({ename, evalue, traceback}), and where its last
// value goes (6). tslab's executor "logs" only that value and "errors" only what a cell
// threw or its diagnostics, both of which end up in the cell's `error` instead.
const cell = { failure: null, diagnostics: [], result: null };
const executorModule = dist("executor");
const createExecutor = executorModule.createExecutor;
const converterSets = [];
executorModule.createExecutor = (rootDir, convs, out) => {
  converterSets.push(convs);
  return createExecutor(rootDir, convs, {
    log: (...args) => (cell.result && args.length === 1 ? cell.result(args[0]) : out.log(...args)),
    error: (...args) => {
      if (args.length === 1 && cell.failure === null) {
        cell.failure = describe(args[0]);
      } else if (args.length > 1) {
        // diagnostics, "file line:col - message": a failure unless the cell was a
        // "//%module" one (registered all the same), whose diagnostics go to stderr
        cell.diagnostics.push(util.format(...args));
      } else {
        out.error(...args);
      }
    },
  });
};

function compileError(lines) {
  return { ename: typecheck ? "CompileError" : "SyntaxError", evalue: lines.join("\n"), traceback: lines };
}

function describe(thrown) {
  if (thrown instanceof Object && "message" in thrown) {
    const name = String(thrown.name || "Error");
    if (name === "SystemExit") return { ename: name, evalue: String(thrown.message), traceback: [] };
    let stack = typeof thrown.stack === "string" ? thrown.stack.split("\n") : [`${name}: ${thrown.message}`];
    // the frames below the cell are tslab's and ours, not the user's
    const inner = stack.findIndex((line) => /^\s+at (sigintHandlersWrap|Script\.runInThisContext) /.test(line));
    if (inner > 0) stack = stack.slice(0, inner);
    stack.push(...causes(thrown));
    // "throw new Error()" has no message; an error always says something (its name)
    return { ename: name, evalue: String(thrown.message) || name, traceback: stack };
  }
  const shown = util.inspect(thrown);
  return { ename: "Error", evalue: `Uncaught ${shown}`, traceback: [`Uncaught ${shown}`] };
}

// "fetch failed" and the like: what went wrong is in the error's cause (and its cause's)
function causes(thrown) {
  const lines = [];
  const seen = new Set([thrown]);
  for (let cause = thrown.cause; cause !== undefined && cause !== null && !seen.has(cause) && lines.length < 5;
    cause = cause instanceof Object ? cause.cause : undefined) {
    seen.add(cause);
    const said = cause instanceof Object && "message" in cause ? `${cause.name || "Error"}: ${cause.message}` : util.inspect(cause);
    lines.push(`Caused by ${said}`);
  }
  return lines;
}

// ---- 3. process.exit during a cell ------------------------------------------------
class SystemExit extends Error {
  constructor(code) {
    super(String(code));
    this.name = "SystemExit";
  }
}
const realExit = process.exit;
const realStderrWrite = process.stderr.write.bind(process.stderr); // the kernel's log, not a cell's stream
function cellExit(code) {
  const value = code === undefined || code === null ? process.exitCode ?? 0 : code;
  throw new SystemExit(Number.isInteger(Number(value)) ? Number(value) : 1);
}

// ---- 2, 3, 4 and 6 in the execute handlers -----------------------------------------
const isExecutionCount = (e) => e instanceof Object && typeof e.count === "number"; // tslab's, not exported
const history = []; // [execution_count, code] of the cells run with store_history, the latest
const HISTORY_MAX = 10000; // a long session's memory stays bounded

jupyter.JupyterHandlerImpl.prototype.handleExecute = async function handleExecute(
  req, writeStream, writeDisplayData, publish = () => {},
) {
  const failed = (count) => {
    const error = cell.failure || (cell.diagnostics.length > 0 ? compileError(cell.diagnostics) : null) ||
      { ename: "Error", evalue: "the cell failed and said nothing about why", traceback: [] };
    return { status: "error", execution_count: count.count, ...error };
  };
  const quiet = Boolean(req.silent);
  try {
    return await this.execQueue.add(async () => {
      cell.failure = null;
      cell.diagnostics = [];
      const count = this.execCount + 1; // handleExecuteImpl's own increment, below
      if (!quiet) publish("execute_input", { code: req.code, execution_count: count });
      if (!quiet && req.store_history !== false) {
        history.push([count, req.code]);
        if (history.length > HISTORY_MAX) history.splice(0, history.length - HISTORY_MAX);
      }
      // Node's REPL shows a value this way ('text' quoted, objects inspected)
      cell.result = (value) => {
        if (!quiet) {
          const data = { "text/plain": util.inspect(value) };
          publish("execute_result", { execution_count: count, data, metadata: {} });
        }
      };
      refreshNodePath();
      nodeProxy.refresh(undiciDir);
      process.exit = cellExit;
      try {
        await this.handleExecuteImpl(req, writeStream, writeDisplayData);
        if (cell.diagnostics.length > 0) writeStream("stderr", cell.diagnostics.join("\n") + "\n"); // a //%module's
        return { status: "ok", execution_count: count, payload: [], user_expressions: {} };
      } catch (e) {
        // tslab's queue is a promise chain: a rejected task cancels every later one.
        // Without stop_on_error the failure is an answer, not a rejection, whatever it was.
        if (req.stop_on_error === false) return isExecutionCount(e) ? failed(e) : unexpected(e, count);
        throw e;
      } finally {
        process.exit = realExit;
        cell.result = null;
      }
    });
  } catch (e) {
    if (isExecutionCount(e)) {
      this.execQueue.reset(200); // tslab's own way to drop what was queued behind a failure
      return failed(e);
    }
    if (e instanceof Object && e.name === "TaskCanceledError") return { status: "aborted" };
    this.execQueue.reset(200); // or every later request would be cancelled, for good
    return unexpected(e, this.execCount);
  }
};

// A failure of tslab's or ours, not the cell's: said as the cell's error all the same.
function unexpected(e, count) {
  const error = describe(e);
  return { status: "error", execution_count: count, ...error, evalue: `the kernel failed: ${error.evalue}` };
}

jupyter.ZmqServer.prototype.handleExecute = async function handleExecute(sock, msg) {
  const send = (socket, msgType, content) => {
    const reply = msg.createReply();
    reply.header.msg_type = msgType;
    reply.content = content;
    reply.signAndSend(this.connInfo.key, socket);
  };
  const content = await this.handler.handleExecute(
    msg.content,
    (name, text) => send(this.iopub, "stream", { name, text }),
    (data, update) => send(this.iopub, update ? "update_display_data" : "display_data", data),
    (msgType, body) => {
      try {
        send(this.iopub, msgType, body);
      } catch (e) { // a message lost is better than a queue stuck behind a rejected task
        realStderrWrite(`era: could not publish ${msgType}: ${util.inspect(e)}\n`);
      }
    },
  );
  if (content.status === "error" && !msg.content.silent) {
    const { ename, evalue, traceback } = content;
    send(this.iopub, "error", { ename, evalue, traceback });
  }
  send(sock, "execute_reply", content);
};

// ---- 6. the other requests, as the protocol has them --------------------------------
const tsVersion = ts.version;
const handleKernel = jupyter.JupyterHandlerImpl.prototype.handleKernel;
jupyter.JupyterHandlerImpl.prototype.handleKernel = function () {
  const reply = handleKernel.call(this);
  reply.status = "ok";
  reply.language_info.version = this.isJs ? process.versions.node : tsVersion; // tslab says "" and "3.7.2"
  reply.help_links = [];
  return reply;
};

jupyter.ZmqServer.prototype.handleCommInfoRequest = function (sock, msg) {
  const reply = msg.createReply();
  reply.header.msg_type = "comm_info_reply";
  reply.content = { status: "ok", comms: {} };
  reply.signAndSend(this.connInfo.key, sock);
};

// history_request: this kernel's cells (session 0 is "this session", as in IPython).
// Inputs only: a cell's outputs are not kept, so output=true pairs each with null.
function historyReply(req) {
  const entry = ([count, code]) => [0, count, req.output ? [code, null] : code];
  const n = Number.isInteger(req.n) ? req.n : null;
  let found;
  if (req.hist_access_type === "tail") {
    found = n === null ? history : history.slice(-n);
  } else if (req.hist_access_type === "range") {
    const stop = req.stop || Infinity;
    found = req.session === 0 || req.session === undefined
      ? history.filter(([count]) => count >= (req.start || 0) && count < stop) : [];
  } else if (req.hist_access_type === "search") {
    found = history.filter(([, code]) => globMatch(req.pattern || "*", code));
    if (req.unique) { // the latest of each distinct input, in order
      const latest = new Map(found.map((h) => [h[1], h]));
      found = found.filter((h) => latest.get(h[1]) === h);
    }
    if (n !== null) found = found.slice(-n);
  } else {
    found = [];
  }
  return { status: "ok", history: found.map(entry) };
}

function globMatch(pattern, text) { // IPython's search patterns: * and ? as in a shell glob
  const source = pattern.replace(/[.+^${}()|[\]\\]/g, "\\$&").replace(/\*/g, "[\\s\\S]*").replace(/\?/g, "[\\s\\S]");
  return new RegExp(`^${source}$`).test(text);
}

// tslab drops the request types it does not know without a reply (a client waits for
// ever); it does not export its message class either, so history_request is read here.
const DELIM = "<IDS|MSG>";
class Message {
  constructor(key, identity, header, content) {
    Object.assign(this, { key, identity, header, content });
  }
  static parse(key, frames) {
    const at = frames.findIndex((frame) => frame.toString() === DELIM);
    if (at < 0 || frames.length < at + 6) return null;
    const parts = frames.slice(at + 2, at + 6);
    const hmac = crypto.createHmac("sha256", key);
    parts.forEach((part) => hmac.update(part));
    if (key && hmac.digest("hex") !== frames[at + 1].toString()) return null; // tslab rejects it itself
    return new Message(key, frames.slice(0, at), JSON.parse(parts[0]), JSON.parse(parts[3]));
  }
  createReply() { // what tslab's publishStatus needs of a request
    const header = { ...this.header, date: new Date().toISOString(), msg_id: crypto.randomBytes(16).toString("hex") };
    const reply = new Message(this.key, this.identity, header, {});
    reply.parent = this.header;
    return reply;
  }
  signAndSend(key, sock) {
    const bodies = [this.header, this.parent, {}, this.content].map((part) => JSON.stringify(part));
    const hmac = crypto.createHmac("sha256", key);
    bodies.forEach((body) => hmac.update(body));
    sock.send([...this.identity, DELIM, hmac.digest("hex"), ...bodies]);
  }
}

const handleShellMessage = jupyter.ZmqServer.prototype.handleShellMessage;
jupyter.ZmqServer.prototype.handleShellMessage = async function (sock, ...frames) {
  const msg = Message.parse(this.connInfo.key, frames);
  if (msg === null || msg.header.msg_type !== "history_request") return handleShellMessage.call(this, sock, ...frames);
  this.publishStatus("busy", msg);
  const reply = msg.createReply();
  reply.header.msg_type = "history_reply";
  reply.content = historyReply(msg.content);
  reply.signAndSend(this.connInfo.key, sock);
  this.publishStatus("idle", msg);
};

let seenNodePath = process.env.NODE_PATH || "";

function refreshNodePath() {
  const now = process.env.NODE_PATH || "";
  if (now === seenNodePath) return;
  seenNodePath = now;
  Module._initPaths();
  for (const convs of converterSets) {
    if (convs._node) {
      convs._node.close();
      convs._node = undefined; // ConverterSetImpl makes a new one on next use
    }
  }
}

// Our own patches, not a tslab found under the working directory.
dist("main").startKernel({ configPath, enableFindLocal: false, jsKernel });
