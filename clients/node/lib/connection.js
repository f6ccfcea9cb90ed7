'use strict';
// Where calls go and how connections come and go: one lazily made connection per slot, made
// again with a bounded, jittered backoff after a failure.
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
  if (typeof address !== 'string' || !address.trim()) {
    invalid('a sessiond address is empty: expected host:port or http(s)://host:port');
  }
  let target = address.trim().replace(/\/+$/, '');
  let tls = o.ca !== null;
  const scheme = /^([a-z]+):\/\//i.exec(target);
  if (scheme) {
    if (scheme[1] === 'https') tls = true;
    else if (scheme[1] !== 'http') invalid(`sessiond address ${JSON.stringify(address)}: scheme must be http or https`);
    target = target.slice(scheme[0].length);
  }
  if (!/^[^\s/]+:\d+$/.test(target)) invalid(`sessiond address ${JSON.stringify(address)}: expected host:port`);
  if (!['pipelined', 'unary'].includes(o.transport)) invalid("options.transport must be 'pipelined' or 'unary'");
  if (!Number.isInteger(o.connections) || o.connections < 1) invalid('options.connections must be at least 1');
  if (!Number.isInteger(o.maxInFlight) || o.maxInFlight < 1) invalid('options.maxInFlight must be at least 1');
  if (!(o.timeout > 0)) invalid('options.timeout must be more than zero');
  if (o.connectTimeout !== null && !(o.connectTimeout > 0)) invalid('options.connectTimeout must be more than zero');
  if (!(o.reconnectMin >= 0) || !(o.reconnectMax >= 0)) invalid('options.reconnectMin and reconnectMax must not be negative');
  if ((o.cert === null) !== (o.key === null)) invalid('options.cert and options.key go together (mutual TLS)');
  if (o.token !== null && !/^[\x20-\x7e]+$/.test(o.token)) invalid('options.token must be printable ASCII');
  o.connectTimeout = o.connectTimeout ?? Math.min(DEFAULT_CONNECT_TIMEOUT, o.timeout);
  o.target = target;
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

/** A channel of its own (no subchannel shared with other connections), with its stub. */
function stub(o) {
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
  return new SessionStore(o.target, credentials, channelOptions);
}

/** One connection: a channel and, pipelined, its stream. */
class Conn {
  constructor(stub, pipe) {
    this.stub = stub;
    this.pipe = pipe;
    this.stale = false;
  }

  get usable() {
    return !this.stale && (this.pipe === null || this.pipe.open);
  }

  /** Lets the calls in flight finish, but starts no new one here; closes it once idle. */
  retire() {
    this.stale = true;
    if (this.pipe === null || !this.pipe.open || this.pipe.inFlight === 0) this.close();
  }

  close() {
    if (this.pipe) this.pipe.close();
    this.stub.close();
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
        `cannot reach sessiond (${this.lastError}); the next attempt is in ${this.retryAt - now} ms`,
      );
    }
    if (shared.closed) throw new Unavailable('the client is closed');
    const s = stub(shared.options);
    let pipe = null;
    try {
      if (shared.options.transport === 'pipelined') {
        pipe = await Pipe.open(s, metadata(shared.options), shared.options.maxInFlight, shared.options.connectTimeout);
      }
    } catch (err) {
      s.close();
      if (![Code.UNAVAILABLE, Code.UNKNOWN, Code.CANCELLED, Code.DEADLINE_EXCEEDED].includes(err.code)) {
        // sessiond answered, and said no (a wrong token, say): no backoff helps that.
        throw fromServiceError(err);
      }
      this.failures += 1;
      this.retryAt = Date.now() + backoff(shared.options, this.failures);
      this.lastError = `${shared.options.target}: ${err.details || err.message}`;
      this.connectsAtFailure = shared.connects;
      throw new Unavailable(`cannot reach sessiond (${this.lastError})`);
    }
    if (shared.closed) {
      s.close();
      if (pipe) pipe.close();
      throw new Unavailable('the client is closed');
    }
    shared.connects += 1;
    this.failures = 0;
    this.retryAt = 0;
    this.current = new Conn(s, pipe);
    return this.current;
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
