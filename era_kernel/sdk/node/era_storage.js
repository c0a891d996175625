/**
 * era_storage: ERA's storage SDK for JavaScript (KV, D1, R2), no dependencies (Node's http).
 *
 * Same calls as ERA's SDK, all async: kv.set/get/delete/list, d1.query/exec,
 * r2.put/get/delete/list. HTTP to ERA_STORAGE_URL, authenticated with ERA_STORAGE_TOKEN
 * (a session's token) or else ERA_API_KEY, read at each call. CommonJS with named
 * exports, so both `require('era_storage')` and `import { kv } from 'era_storage'` work.
 * Failures throw StorageError (.status, .body); a missing key or object reads as null.
 */
'use strict';

class StorageError extends Error {
  constructor(message, status, body) {
    super(message);
    this.name = 'StorageError';
    this.status = status || 0;
    this.body = body;
  }
}

const CONNECT_RETRIES = [50, 100, 200, 400, 800, null]; // ms between attempts on a refused connection

function url(parts, query) {
  const base = (process.env.ERA_STORAGE_URL || 'http://localhost').replace(/\/+$/, '');
  let out = base + '/api/' + parts.map((p) => encodeURIComponent(String(p))).join('/');
  if (query) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(query)) if (v !== undefined && v !== null) q.set(k, String(v));
    out += '?' + q.toString();
  }
  return out;
}

// Node's http module, not fetch: fetch (undici) instantiates WebAssembly, which a kernel
// under an address-space limit (RLIMIT_AS, as sessions run) cannot reserve memory for.
function send(method, target, headers, payload) {
  const u = new URL(target);
  const lib = require(u.protocol === 'https:' ? 'https' : 'http');
  return new Promise((resolve, reject) => {
    const req = lib.request(u, { method, headers }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode, text: Buffer.concat(chunks).toString('utf-8') }));
      res.on('error', reject);
    });
    req.on('error', reject);
    if (payload !== undefined) req.write(payload);
    req.end();
  });
}

async function call(method, target, body, what) {
  const headers = {};
  const payload = body === undefined ? undefined : JSON.stringify(body);
  if (payload !== undefined) {
    headers['Content-Type'] = 'application/json';
    headers['Content-Length'] = Buffer.byteLength(payload);
  }
  const token = process.env.ERA_STORAGE_TOKEN || process.env.ERA_API_KEY;
  if (token) headers.Authorization = `Bearer ${token}`;
  let answer;
  for (const delay of CONNECT_RETRIES) {
    try {
      answer = await send(method, target, headers, payload);
      break;
    } catch (e) {
      // Right after a kernel starts, the listener in its sandbox may be a moment away.
      if (e.code !== 'ECONNREFUSED' || delay === null) throw e;
      await new Promise((resolve) => setTimeout(resolve, delay));
    }
  }
  const { status, text } = answer;
  let doc;
  try { doc = text ? JSON.parse(text) : null; } catch (e) { doc = { error: text.slice(0, 500) }; }
  if (status < 200 || status >= 300) {
    throw new StorageError(`${what} failed: ${(doc && doc.error) || 'HTTP ' + status}`, status, doc);
  }
  return doc;
}

async function orNull(promise) {
  try { return await promise; } catch (e) { if (e instanceof StorageError && e.status === 404) return null; throw e; }
}

const kv = {
  async set(namespace, key, value, metadata = null) {
    return !!(await call('PUT', url(['storage', 'kv', namespace, key]), { value, metadata }, 'KV set')).success;
  },
  async get(namespace, key) {
    const doc = await orNull(call('GET', url(['storage', 'kv', namespace, key]), undefined, 'KV get'));
    return doc === null ? null : doc.value;
  },
  async delete(namespace, key) {
    return !!(await call('DELETE', url(['storage', 'kv', namespace, key]), undefined, 'KV delete')).success;
  },
  async list(namespace, prefix = '', limit = 100, cursor = undefined) {
    const doc = await call('GET', url(['storage', 'kv', namespace], { prefix, limit, cursor }), undefined, 'KV list');
    return doc.keys || [];
  },
};

const d1 = {
  async query(namespace, sql, params = []) {
    const doc = await call('POST', url(['storage', 'd1', namespace, 'query']), { sql, params }, 'D1 query');
    return doc.results || [];
  },
  async exec(namespace, sql, params = []) {
    return call('POST', url(['storage', 'd1', namespace, 'exec']), { sql, params }, 'D1 exec');
  },
};

const r2 = {
  async put(namespace, key, content, metadata = null) {
    const bytes = typeof content === 'string' ? Buffer.from(content, 'utf-8') : Buffer.from(content);
    const body = { content: bytes.toString('base64'), metadata };
    return !!(await call('PUT', url(['storage', 'r2', namespace, key]), body, 'R2 put')).success;
  },
  async get(namespace, key) {
    const doc = await orNull(call('GET', url(['storage', 'r2', namespace, key]), undefined, 'R2 get'));
    return doc === null ? null : Buffer.from(doc.content || '', 'base64');
  },
  async delete(namespace, key) {
    return !!(await call('DELETE', url(['storage', 'r2', namespace, key]), undefined, 'R2 delete')).success;
  },
  async list(namespace, prefix = '', limit = 100, cursor = undefined) {
    const doc = await call('GET', url(['storage', 'r2', namespace], { prefix, limit, cursor }), undefined, 'R2 list');
    return doc.objects || [];
  },
};

exports.kv = kv;
exports.d1 = d1;
exports.r2 = r2;
exports.StorageError = StorageError;
