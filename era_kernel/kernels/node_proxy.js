// HTTP_PROXY, HTTPS_PROXY and NO_PROXY for Node before 24, whose own fetch and http/https
// ignore them: a session whose network is ERA's egress proxy (its only way out is
// 127.0.0.1:3128 inside its sandbox, named by those variables) would reach nothing.
//
//   const proxy = require("./node_proxy.js");
//   proxy.refresh(undiciDir);  // at start, and before each cell (the variables may change)
//
// - fetch: Node's fetch is its bundled undici, which takes its dispatcher from a global
//   symbol that npm's undici (the same 6.x, installed beside tslab) sets too:
//   setGlobalDispatcher(new EnvHttpProxyAgent()) makes it read the variables.
// - http/https: every Agent's createConnection (the global agents and any other that
//   does not bring its own) opens a CONNECT tunnel through the proxy, unless NO_PROXY
//   names the host; https then speaks TLS inside the tunnel, with the agent's options.
// Nothing changes while no proxy variable is set (the host's network, or none), nor on
// Node 24+ with NODE_USE_ENV_PROXY=1, which does this itself.
"use strict";

const http = require("http");
const https = require("https");
const net = require("net");
const path = require("path");

const VARIABLES = ["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"];
const env = (name) => process.env[name.toLowerCase()] || process.env[name.toUpperCase()] || "";
const nodeDoesIt = () => Number(process.versions.node.split(".")[0]) >= 24 && process.env.NODE_USE_ENV_PROXY === "1";

let seen = null; // the variables the current set-up was made from
let current = null; // {http, https: URL or null, noProxy: string} while a proxy is set
let undici = null;
let directDispatcher; // what fetch used before ours (undefined: Node had not made one yet)
let patched = false;

function refresh(undiciDir) {
  const now = VARIABLES.map((name) => process.env[name] || "").join("\0");
  if (now === seen) return;
  seen = now;
  const httpProxy = proxyUrl(env("http_proxy"));
  const httpsProxy = proxyUrl(env("https_proxy")) || httpProxy; // as undici's EnvHttpProxyAgent
  current = (httpProxy || httpsProxy) && !nodeDoesIt() ? { http: httpProxy, https: httpsProxy, noProxy: env("no_proxy") } : null;
  if (current !== null && !patched) patchAgents();
  setFetchDispatcher(undiciDir);
}

function proxyUrl(text) {
  if (!text) return null;
  try {
    const url = new URL(text.includes("://") ? text : `http://${text}`);
    return url.protocol === "http:" ? url : null; // an https:// proxy: not spoken here
  } catch {
    return null;
  }
}

// ---- fetch -------------------------------------------------------------------------------
const DISPATCHER = Symbol.for("undici.globalDispatcher.1");

function setFetchDispatcher(undiciDir) {
  if (current === null && undici === null) return; // never proxied: fetch as Node has it
  try {
    undici = undici || require(path.join(undiciDir, "undici"));
  } catch (e) {
    process.stderr.write(`era: fetch will not use the proxy: undici is not installed beside tslab (${e.message})\n`);
    return;
  }
  const before = globalThis[DISPATCHER];
  if (directDispatcher === undefined && !(before instanceof undici.EnvHttpProxyAgent)) directDispatcher = before;
  // EnvHttpProxyAgent reads the variables when it is made (and NO_PROXY per request)
  const next = current !== null ? quietly(() => new undici.EnvHttpProxyAgent()) : directDispatcher || new undici.Agent();
  undici.setGlobalDispatcher(next);
  if (before instanceof undici.EnvHttpProxyAgent) before.close().catch(() => {}); // after its requests end
}

// undici warns that EnvHttpProxyAgent is experimental, on the cell's stderr: not the user's
function quietly(make) {
  const emitWarning = process.emitWarning;
  process.emitWarning = () => {};
  try {
    return make();
  } finally {
    process.emitWarning = emitWarning;
  }
}

// ---- http and https ----------------------------------------------------------------------
function bypassed(host, port) {
  const name = String(host).toLowerCase().replace(/^\[|\]$/g, "").replace(/\.$/, "");
  for (const item of current.noProxy.toLowerCase().split(/[\s,]+/).filter(Boolean)) {
    if (item === "*") return true;
    // "name", ".name", "*.name" (the name and every name below it), optionally ":port";
    // an IPv6 address in brackets when it has a port
    let entry = item;
    let entryPort = null;
    const withPort = /^(\[[^\]]+\]|[^:]+):(\d+)$/.exec(item);
    if (withPort) [entry, entryPort] = [withPort[1], Number(withPort[2])];
    entry = entry.replace(/^\[|\]$/g, "").replace(/^\*?\./, "");
    if (entryPort !== null && entryPort !== Number(port)) continue;
    if (name === entry || name.endsWith(`.${entry}`)) return true;
  }
  return false;
}

// A socket to host:port through the proxy's CONNECT; done(error) with the proxy's answer
// when it refuses (ERA's says "era: connection to NAME refused by policy: REASON").
function tunnel(proxy, host, port, done) {
  const authority = net.isIPv6(host) ? `[${host}]:${port}` : `${host}:${port}`;
  const headers = { host: authority };
  if (proxy.username) {
    const credentials = `${decodeURIComponent(proxy.username)}:${decodeURIComponent(proxy.password)}`;
    headers["proxy-authorization"] = `Basic ${Buffer.from(credentials).toString("base64")}`;
  }
  // createConnection and no agent: straight to the proxy, not through our patched agents
  const request = http.request({
    host: proxy.hostname.replace(/^\[|\]$/g, ""), port: Number(proxy.port) || 80, method: "CONNECT",
    path: authority, headers, createConnection: (options) => net.createConnection(options),
  });
  request.once("connect", (response, socket, head) => {
    if (response.statusCode !== 200) {
      socket.destroy();
      const error = new Error(`the proxy refused CONNECT ${authority}: ${response.statusCode} ${response.statusMessage}`);
      error.code = "ERR_PROXY_TUNNEL";
      return done(error);
    }
    if (head.length > 0) socket.unshift(head);
    done(null, socket);
  });
  request.once("error", done);
  request.end();
}

function patchAgents() {
  patched = true;
  const plain = http.Agent.prototype.createConnection; // net.createConnection
  const secure = https.Agent.prototype.createConnection; // tls.connect, with the agent's session cache
  const through = (direct, scheme) => function createConnection(options, callback) {
    const proxy = current && current[scheme];
    const host = options.host || options.hostname || "localhost";
    const port = Number(options.port) || (scheme === "https" ? 443 : 80);
    if (!proxy || options.socketPath || options.socket || bypassed(host, port)) {
      return direct.call(this, options, callback);
    }
    tunnel(proxy, host, port, (error, socket) => {
      if (error) return callback(error);
      if (scheme === "http") return callback(null, socket);
      try {
        callback(null, direct.call(this, { ...options, socket }));
      } catch (e) {
        socket.destroy();
        callback(e);
      }
    });
    return undefined; // the agent waits for the callback
  };
  http.Agent.prototype.createConnection = through(plain, "http");
  https.Agent.prototype.createConnection = through(secure, "https");
}

module.exports = { refresh };
