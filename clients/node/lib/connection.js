'use strict';
// How connections come and go: one lazily made connection per slot, to the target the
// router picks (router.js), made again with a bounded, jittered backoff after a failure.
//
// A slot holds at most one Conn: a grpc-js channel and, on the pipelined transport, its Pipe.
// A call that finds its slot without a usable connection makes one, unless the last attempt
// failed and its backoff has not run out yet: then it fails at once with Unavailable, so an
// app whose store is down answers quickly instead of stalling every request for its whole
// timeout.

const grpc = require('@grpc/grpc-js');
const { SessionStore } = require('./proto');
const { Pipe } = require('./pipeline');
const { Code, Unavailable, InvalidArgument, fromServiceError } = require('./errors');
const { parseAddress } = require('./router');

/** The per-call deadline, by default (ms). */
const DEFAULT_TIMEOUT = 5000;
/** How long connecting and opening a stream may take, by default (ms, or the timeout if shorter). */
const DEFAULT_CONNECT_TIMEOUT = 1000;
/** Connections per client, by default. */
const DEFAULT_CONNECTIONS = 2;
/** Calls in flight per stream, by default: the server's own window per stream. */
const DEFAULT_MAX_IN_FLIGHT = 256;
/** The first wait after a failed connection attempt, by default (ms). */
const DEFAULT_RECONNECT_MIN = 50;
/** The longest wait between connection attempts, by default (ms). */
const DEFAULT_RECONNECT_MAX = 2000;
/**
 * HTTP/2 keepalive pings: a peer that vanished without closing the connection is noticed
 * within interval + timeout, and its connection made again.
 */
const KEEPALIVE_INTERVAL = 10000;
const KEEPALIVE_TIMEOUT = 5000;

/** The options with their defaults, checked: a setting that cannot work is named. */
function resolveOptions(address, options = {}) {
  const o = {
    token: options.token ?? null,
    ca: options.ca ?? null,
    cert: options.cert ?? null,
    key: options.key ?? null,
    serverName: options.serverName ?? null,
    timeout: options.timeout ?? DEFAULT_TIMEOUT,
    connectTimeout: options.connectTimeout ?? null,
    transport: options.transport ?? 'pipelined',
    connections: options.connections ?? DEFAULT_CONNECTIONS,
    maxInFlight: options.maxInFlight ?? DEFAULT_MAX_IN_FLIGHT,
    reconnectMin: options.reconnectMin ?? DEFAULT_RECONNECT_MIN,
    reconnectMax: options.reconnectMax ?? DEFAULT_RECONNECT_MAX,
  };
  const invalid = (m) => {
    throw new InvalidArgument(m);
  };
  const addresses = Array.isArray(address) ? address : typeof address === 'string' ? address.split(',') : [];
  if (addresses.length === 0) invalid('a sessiond address is empty: expected host:port or http(s)://host:port');
  let tls = o.ca !== null;
  const seeds = [];
  for (const a of addresses) {
    let parsed;
    try {
      parsed = parseAddress(a);
    } catch (err) {
      invalid(err.message);
    }
    tls = tls || parsed.tls;
    if (!seeds.includes(parsed.target)) seeds.push(parsed.target);
  }
  if (!['pipelined', 'unary'].includes(o.transport)) invalid("options.transport must be 'pipelined' or 'unary'");
  if (!Number.isInteger(o.connections) || o.connections < 1) invalid('options.connections must be at least 1');
  if (!Number.isInteger(o.maxInFlight) || o.maxInFlight < 1) invalid('options.maxInFlight must be at least 1');
  if (!(o.timeout > 0)) invalid('options.timeout must be more than zero');
  if (o.connectTimeout !== null && !(o.connectTimeout > 0)) invalid('options.connectTimeout must be more than zero');
  if (!(o.reconnectMin >= 0) || !(o.reconnectMax >= 0)) invalid('options.reconnectMin and reconnectMax must not be negative');
  if ((o.cert === null) !== (o.key === null)) invalid('options.cert and options.key go together (mutual TLS)');
  if (o.token !== null && !/^[\x20-\x7e]+$/.test(o.token)) invalid('options.token must be printable ASCII');
  o.connectTimeout = o.connectTimeout ?? Math.min(DEFAULT_CONNECT_TIMEOUT, o.timeout);
  o.seeds = seeds;
  o.tls = tls;
  return o;
}

/** The token's metadata, for every call and stream. */
function metadata(o) {
  const md = new grpc.Metadata();
  if (o.token !== null) md.set('authorization', `Bearer ${o.token}`);
  return md;
}

/** How long to wait after the `failures`-th failed attempt in a row, with jitter below it. */
function backoff(o, failures) {
  const max = Math.max(o.reconnectMax, o.reconnectMin);
  const full = Math.min(o.reconnectMin * 2 ** Math.min(failures - 1, 16), max);
  return full * (0.5 + Math.random() / 2);
}

function pem(value) {
  return value === null ? null : Buffer.from(value);
}

/** A channel to `target` of its own (no subchannel shared with other connections), with its stub. */
function stub(o, target) {
  const credentials = o.tls
    ? grpc.credentials.createSsl(pem(o.ca), pem(o.key), pem(o.cert))
    : grpc.credentials.createInsecure();
  const channelOptions = {
    'grpc.use_local_subchannel_pool': 1,
    'grpc.keepalive_time_ms': KEEPALIVE_INTERVAL,
    'grpc.keepalive_timeout_ms': KEEPALIVE_TIMEOUT,
    'grpc.keepalive_permit_without_calls': 1,
    // This client backs off itself (and a broken connection is replaced, not revived).
    'grpc.initial_reconnect_backoff_ms': Math.max(o.reconnectMin, 1),
    'grpc.max_reconnect_backoff_ms': Math.max(o.reconnectMax, 1),
  };
  if (o.serverName !== null) channelOptions['grpc.ssl_target_name_override'] = o.serverName;
  return new SessionStore(target, credentials, channelOptions);
}

/** One connection: a channel and, pipelined, its stream. */
class Conn {
  constructor(target, stub, pipe, leader) {
    /** Where it goes (host:port). */
    this.target = target;
    this.stub = stub;
    this.pipe = pipe;
    /** The leader its stream's response headers named, if any. */
    this.leader = leader;
    /** No new call should start here: it broke, or the leader is elsewhere. */
    this.stale = false;
    /** Calls running on it. */
    this.active = 0;
  }

  get usable() {
    return !this.stale && (this.pipe === null || this.pipe.open);
  }

  /** Runs `fn` as one of its calls: a retired connection closes when its last call is done. */
  async run(fn) {
    this.active += 1;
    try {
      return await fn();
    } finally {
      this.active -= 1;
      if (this.stale && this.active === 0) this.close();
    }
  }

  /** Lets the calls in flight finish, but starts no new one here; closes it once idle. */
  retire() {
    this.stale = true;
    if (this.active === 0) this.close();
  }

  close() {
    if (this.closed) return;
    this.closed = true;
    if (this.pipe) this.pipe.close();
    this.stub.close();
  }
}

/** No candidate answered: why, naming each one tried. */
class Unreachable extends Error {}

/** Codes of a stream that could not be opened because nothing answered in time. */
const UNREACHABLE_CODES = [Code.UNAVAILABLE, Code.UNKNOWN, Code.CANCELLED, Code.DEADLINE_EXCEEDED];

/**
 * Connects to the first candidate that answers; if it names another node as the leader,
 * moves there (once) when it can, keeping the first in case the leader cannot be reached.
 */
async function connect(shared) {
  const { router } = shared;
  const candidates = router.candidates();
  const errors = [];
  let fallback = null;
  let followed = false;
  for (let i = 0; i < candidates.length; i++) {
    const target = candidates[i];
    let conn;
    try {
      conn = await open(shared, target);
    } catch (err) {
      if (!(err instanceof Unreachable)) {
        // sessiond answered, and said no (a wrong token, say): no backoff helps that.
        if (fallback) return fallback;
        throw err;
      }
      router.unreachable(target);
      errors.push(`${target}: ${err.message}`);
      continue;
    }
    router.answered(target);
    const moved = conn.leader !== null && router.leaderSays(target, conn.leader);
    if (!moved || followed) {
      if (fallback && fallback !== conn) fallback.close();
      return conn;
    }
    // A follower: it would forward every call. Try the leader next, and nothing after it.
    followed = true;
    if (fallback) fallback.close();
    fallback = conn;
    candidates.splice(i + 1, candidates.length, router.leader);
  }
  if (fallback) return fallback;
  throw new Unreachable(errors.join('; '));
}

/** Opens one connection to `target`: its channel, and its stream when pipelined. */
async function open(shared, target) {
  const o = shared.options;
  const s = stub(o, target);
  try {
    if (o.transport === 'pipelined') {
      const pipe = await Pipe.open(s, metadata(o), o.maxInFlight, o.connectTimeout);
      return new Conn(target, s, pipe, pipe.leader);
    }
    await new Promise((resolve, reject) => {
      s.waitForReady(Date.now() + o.connectTimeout, (err) => (err ? reject(err) : resolve()));
    });
    return new Conn(target, s, null, null);
  } catch (err) {
    s.close();
    if (err.code === undefined || UNREACHABLE_CODES.includes(err.code)) {
      throw new Unreachable(err.details || err.message);
    }
    throw fromServiceError(err);
  }
}

/** One of the client's connections, made when first needed and again after it breaks. */
class Slot {
  constructor(shared) {
    this.shared = shared;
    this.current = null;
    this.connecting = null;
    this.failures = 0;
    this.retryAt = 0;
    this.lastError = '';
    this.connectsAtFailure = 0;
  }

  /** Its connection, if it has one that takes new calls. */
  usable() {
    if (this.current && !this.current.usable) {
      this.current.retire();
      this.current = null;
    }
    return this.current;
  }

  /** The slot's connection, made now if it has none (one attempt at a time). */
  async get() {
    const conn = this.usable();
    if (conn) return conn;
    if (!this.connecting) {
      this.connecting = this._connect().finally(() => {
        this.connecting = null;
      });
    }
    return this.connecting;
  }

  async _connect() {
    const shared = this.shared;
    const now = Date.now();
    // Another slot connected since this one failed: sessiond is back, try now.
    const back = shared.connects !== this.connectsAtFailure;
    if (this.retryAt > now && !back) {
      throw new Unavailable(
        `cannot reach sessiond (${this.lastError}); the next attempt is in ${Math.ceil(this.retryAt - now)} ms`,
      );
    }
    if (shared.closed) throw new Unavailable('the client is closed');
    let conn;
    try {
      conn = await connect(shared);
    } catch (err) {
      if (!(err instanceof Unreachable)) throw err;
      this.failures += 1;
      this.retryAt = Date.now() + backoff(shared.options, this.failures);
      this.lastError = err.message;
      this.connectsAtFailure = shared.connects;
      throw new Unavailable(`cannot reach sessiond (${err.message})`);
    }
    if (shared.closed) {
      conn.close();
      throw new Unavailable('the client is closed');
    }
    shared.connects += 1;
    this.failures = 0;
    this.retryAt = 0;
    this.current = conn;
    return conn;
  }

  close() {
    if (this.current) this.current.close();
    this.current = null;
  }
}

module.exports = {
  DEFAULT_TIMEOUT,
  DEFAULT_CONNECT_TIMEOUT,
  DEFAULT_CONNECTIONS,
  DEFAULT_MAX_IN_FLIGHT,
  DEFAULT_RECONNECT_MIN,
  DEFAULT_RECONNECT_MAX,
  resolveOptions,
  metadata,
  backoff,
  Slot,
  Conn,
};
