'use strict';
// Test fixtures: a real sessiond on ephemeral loopback ports (SESSIOND_BIN, default
// <repo>/target/debug/sessiond), Express apps on port 0, a browser-like HTTP client with one
// cookie, and a TCP proxy that can refuse, hold or break connections.

const { spawn } = require('node:child_process');
const net = require('node:net');
const path = require('node:path');
const fs = require('node:fs');

const REPO = path.resolve(__dirname, '..', '..', '..');
/** How long a child process may take to say where it listens. */
const START_TIMEOUT = 60000;

function sessiondBin() {
  const bin = process.env.SESSIOND_BIN || path.join(REPO, 'target', 'debug', 'sessiond');
  if (!fs.existsSync(bin)) throw new Error(`sessiond binary not found at ${bin}: build it or set SESSIOND_BIN`);
  return bin;
}

/**
 * Starts `cmd args` and resolves with { proc, value, output } once a line of its stdout or
 * stderr contains `marker` (value: the word after it).
 */
function startProcess(cmd, args, { env, marker, cwd } = {}) {
  return new Promise((resolve, reject) => {
    const proc = spawn(cmd, args, { env: { ...process.env, ...env }, cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    const output = [];
    let found = false;
    const timer = setTimeout(() => {
      proc.kill('SIGKILL');
      reject(new Error(`${cmd} did not start:\n${output.join('')}`));
    }, START_TIMEOUT);
    const onData = (chunk) => {
      const text = chunk.toString();
      output.push(text);
      const at = text.indexOf(marker);
      if (!found && at >= 0) {
        found = true;
        clearTimeout(timer);
        resolve({ proc, value: text.slice(at + marker.length).split(/\s/)[0], output });
      }
    };
    proc.stdout.on('data', onData);
    proc.stderr.on('data', onData);
    proc.on('exit', (code) => {
      if (!found) {
        clearTimeout(timer);
        reject(new Error(`${cmd} exited with ${code} before it started:\n${output.join('')}`));
      }
    });
  });
}

/** Stops a child process and waits for it to exit. */
function stopProcess(proc, signal = 'SIGKILL') {
  if (proc.exitCode !== null || proc.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    proc.once('exit', () => resolve());
    proc.kill(signal);
  });
}

/** A sessiond on ephemeral ports: { addr, stop() }. */
async function startSessiond(...extra) {
  const args = ['--listen', '127.0.0.1:0', '--admin-listen', '127.0.0.1:0', '--no-persist', ...extra];
  const { proc, value } = await startProcess(sessiondBin(), args, { env: { RUST_LOG: 'info' }, marker: 'grpc=' });
  return { addr: value, proc, stop: () => stopProcess(proc) };
}

/** Serves `app` on 127.0.0.1:0: { url, close() }. */
function listen(app) {
  return new Promise((resolve) => {
    const server = app.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      resolve({
        url: `http://127.0.0.1:${port}`,
        close: () =>
          new Promise((done) => {
            server.closeAllConnections();
            server.close(() => done());
          }),
      });
    });
  });
}

/** A browser with one session cookie: sends it, and keeps what Set-Cookie says. */
class Browser {
  constructor(base, name = '__Host-sid') {
    this.base = base;
    this.name = name;
    this.cookie = null;
  }

  async request(method, path, body, headers = {}) {
    const h = { ...headers };
    if (this.cookie !== null) h.cookie = `${this.name}=${this.cookie}`;
    if (body !== undefined) h['content-type'] = 'application/json';
    const res = await fetch(this.base + path, {
      method,
      headers: h,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const setCookies = res.headers.getSetCookie();
    for (const line of setCookies) {
      const [pair] = line.split(';');
      const eq = pair.indexOf('=');
      if (pair.slice(0, eq) !== this.name) continue;
      const value = pair.slice(eq + 1);
      this.cookie = value === '' || /Max-Age=0/i.test(line) ? null : value;
    }
    const text = await res.text();
    let json;
    try {
      json = JSON.parse(text);
    } catch {
      json = undefined;
    }
    return { status: res.status, body: json, text, setCookies };
  }

  get(path, headers) {
    return this.request('GET', path, undefined, headers);
  }

  post(path, body = {}, headers) {
    return this.request('POST', path, body, headers);
  }
}

/**
 * A TCP proxy on 127.0.0.1:0 in front of `target` (host:port, or null: refuse every
 * connection). `hold()` keeps the server's bytes from the client; `breakAll()` cuts every
 * connection; `to(target)` points new connections elsewhere.
 */
async function startProxy(target = null) {
  const sockets = new Set();
  let holding = false;
  let clientBytes = 0;
  let waiters = [];
  const server = net.createServer((client) => {
    sockets.add(client);
    client.on('close', () => sockets.delete(client));
    client.on('error', () => {});
    if (proxy.target === null) {
      client.destroy();
      return;
    }
    const [host, port] = splitAddr(proxy.target);
    const upstream = net.connect(port, host);
    sockets.add(upstream);
    upstream.on('close', () => {
      sockets.delete(upstream);
      client.destroy();
    });
    upstream.on('error', () => client.destroy());
    client.on('close', () => upstream.destroy());
    client.on('data', (d) => {
      clientBytes += d.length;
      waiters = waiters.filter((w) => !w());
      upstream.write(d);
    });
    upstream.on('data', (d) => {
      if (!holding) client.write(d);
    });
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const proxy = {
    target,
    addr: `127.0.0.1:${server.address().port}`,
    to(t) {
      proxy.target = t;
    },
    hold() {
      holding = true;
      const at = clientBytes;
      // Resolves once the client has sent something since hold().
      return () =>
        new Promise((resolve) => {
          if (clientBytes > at) return resolve();
          waiters.push(() => {
            if (clientBytes > at) {
              resolve();
              return true;
            }
            return false;
          });
        });
    },
    release() {
      holding = false;
    },
    breakAll() {
      for (const s of sockets) s.destroy();
    },
    close() {
      proxy.breakAll();
      return new Promise((resolve) => server.close(() => resolve()));
    },
  };
  return proxy;
}

function splitAddr(addr) {
  const i = addr.lastIndexOf(':');
  return [addr.slice(0, i), Number(addr.slice(i + 1))];
}

module.exports = { REPO, startSessiond, startProcess, stopProcess, listen, Browser, startProxy };
