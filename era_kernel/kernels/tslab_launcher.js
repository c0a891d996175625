// Starts tslab (JavaScript and TypeScript kernels) the way ERA needs it.
//
//   node tslab_launcher.js TSLAB_PACKAGE_DIR [--js] CONNECTION_FILE
//
// (era_kernel/kernels/tslab.py finds the package and runs this.) Four adjustments to
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
// Also: NODE_PATH is honoured when a session sets it after the start, by require and
// by TypeScript's module resolution (which never looks at it on its own).
"use strict";

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
require.cache[tsPath].exports = new Proxy(ts, {
  get: (target, key) => (key === "createWatchCompilerHost" ? withNodePath : target[key]),
});

// ---- 1. IPC socket names --------------------------------------------------------
const jupyter = dist("jupyter");
jupyter.ZmqServer.prototype.bindSocket = async function bindSocket(sock, port) {
  const conn = this.connInfo;
  const sep = conn.transport === "ipc" ? "-" : ":";
  await sock.bind(`${conn.transport}://${conn.ip}${sep}${port}`);
};

// ---- 2. what the cell threw, captured where tslab prints it ----------------------
let failure = null; // {ename, evalue, traceback} of the cell running now
const executorModule = dist("executor");
const createExecutor = executorModule.createExecutor;
const converterSets = [];
executorModule.createExecutor = (rootDir, convs, out) => {
  converterSets.push(convs);
  return createExecutor(rootDir, convs, {
    log: out.log,
    error: (...args) => {
      if (args.length === 1 && failure === null) {
        failure = describe(args[0]);
        if (failure.ename === "SystemExit") return; // an exit is not an error to print
      } else if (args.length > 1) {
        // TypeScript diagnostics: "file line:col - message"
        const line = util.format(...args);
        failure = failure || { ename: "CompileError", evalue: "", traceback: [] };
        failure.evalue = failure.evalue ? `${failure.evalue}\n${line}` : line;
        failure.traceback.push(line);
      }
      out.error(...args);
    },
  });
};

function describe(thrown) {
  if (thrown instanceof Object && "message" in thrown) {
    const name = String(thrown.name || "Error");
    if (name === "SystemExit") return { ename: name, evalue: String(thrown.message), traceback: [] };
    const stack = typeof thrown.stack === "string" ? thrown.stack.split("\n") : [`${name}: ${thrown.message}`];
    return { ename: name, evalue: String(thrown.message), traceback: stack };
  }
  return { ename: "Error", evalue: util.inspect(thrown), traceback: [`Uncaught ${util.inspect(thrown)}`] };
}

// ---- 3. process.exit during a cell ------------------------------------------------
class SystemExit extends Error {
  constructor(code) {
    super(String(code));
    this.name = "SystemExit";
  }
}
const realExit = process.exit;
function cellExit(code) {
  const value = code === undefined || code === null ? process.exitCode ?? 0 : code;
  throw new SystemExit(Number.isInteger(Number(value)) ? Number(value) : 1);
}

// ---- 2, 3 and 4 in the execute handlers --------------------------------------------
const isExecutionCount = (e) => e instanceof Object && typeof e.count === "number"; // tslab's, not exported

jupyter.JupyterHandlerImpl.prototype.handleExecute = async function handleExecute(req, writeStream, writeDisplayData) {
  const failed = (count) => {
    const error = failure || { ename: "Error", evalue: "the cell failed", traceback: [] };
    return { status: "error", execution_count: count.count, ...error };
  };
  try {
    return await this.execQueue.add(async () => {
      failure = null;
      refreshNodePath();
      process.exit = cellExit;
      try {
        const count = await this.handleExecuteImpl(req, writeStream, writeDisplayData);
        return { status: "ok", execution_count: count.count };
      } catch (e) {
        // tslab's queue is a promise chain: a rejected task cancels every later one.
        // Without stop_on_error the failure is an answer, not a rejection.
        if (isExecutionCount(e) && req.stop_on_error === false) return failed(e);
        throw e;
      } finally {
        process.exit = realExit;
      }
    });
  } catch (e) {
    if (isExecutionCount(e)) {
      this.execQueue.reset(200); // tslab's own way to drop what was queued behind a failure
      return failed(e);
    }
    if (e instanceof Object && e.name === "TaskCanceledError") return { status: "abort" };
    console.error("unexpected error:", e);
    return { status: "error", ...describe(e) };
  }
};

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
  );
  if (content.status === "error") {
    const { ename, evalue, traceback } = content;
    send(this.iopub, "error", { ename, evalue, traceback });
  }
  send(sock, "execute_reply", content);
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
