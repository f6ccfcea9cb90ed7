'use strict';
// SessionClient: sessiond's operations as promise-returning methods, over a few connections
// that are made lazily, each carrying one Pipeline stream (or, with transport 'unary', one
// RPC per call). A call's life: its deadline, the connection it takes, and whether it may be
// sent again when that connection fails (call.rs in the Rust client is the model).

const { Slot, resolveOptions, metadata } = require('./connection');
const { Router, LEADER_HEADER } = require('./router');
const { Ended, NotSent } = require('./pipeline');
const proto = require('./proto');
const {
  Code,
  SessiondError,
  Unavailable,
  InvalidArgument,
  fromStatus,
  fromServiceError,
} = require('./errors');

/** The most times one call is sent or tried (a first time and two retries), within its deadline. */
const MAX_ATTEMPTS = 3;

/** Each operation's unary method, and the PipelineResponse field its answer comes in. */
const OPS = {
  create: ['Create', 'session'],
  get: ['Get', 'session'],
  touch: ['Touch', 'touch'],
  update: ['Update', 'session'],
  regenerate: ['Regenerate', 'session'],
  destroy: ['Destroy', 'destroy'],
  listUserSessions: ['ListUserSessions', 'listUserSessions'],
  destroyUserSessions: ['DestroyUserSessions', 'destroyUserSessions'],
  // Not in the Pipeline: always unary.
  getMany: ['GetMany', null],
  destroyAllSessions: ['DestroyAllSessions', null],
};

/** Whether sending the operation twice changes nothing a caller could tell. */
function retrySafe(name, request) {
  switch (name) {
    case 'get':
    case 'touch':
    case 'listUserSessions':
    case 'getMany':
      return true;
    case 'create':
    case 'update':
    case 'regenerate':
      return Boolean(request.idempotencyKey);
    default:
      return false;
  }
}

function clientInfo(ip, userAgent) {
  return ip || userAgent ? { ip: ip || '', userAgent: userAgent || '' } : undefined;
}

function checkId(id, name = 'id') {
  if (typeof id !== 'string') throw new InvalidArgument(`${name} must be a string`);
}

class SessionClient {
  /**
   * `address` is host:port, http://host:port or https://host:port, or several of them (an
   * array, or separated by commas): seeds tried in turn until one answers; once a reply names
   * the leader, new connections go there. Making a client never fails because sessiond is
   * down: the first call connects.
   */
  constructor(address, options = {}) {
    const o = resolveOptions(address, options);
    this._shared = { options: o, connects: 0, closed: false, router: new Router(o.seeds) };
    this._slots = Array.from({ length: o.connections }, () => new Slot(this._shared));
    this._next = 0;
  }

  /** Ends every connection; calls after this fail with Unavailable. */
  close() {
    this._shared.closed = true;
    for (const slot of this._slots) slot.close();
  }

  /** Starts a session under a fresh server-generated ID. */
  async create(options = {}) {
    const request = {
      userId: options.userId || '',
      attributes: proto.attributes(options.attributes, 'attributes'),
      client: clientInfo(options.ip, options.userAgent),
      idempotencyKey: options.idempotencyKey || '',
    };
    if (options.idleTimeout != null) request.idleTimeout = proto.duration(options.idleTimeout, 'idleTimeout');
    if (options.absoluteTimeout != null) {
      request.absoluteTimeout = proto.duration(options.absoluteTimeout, 'absoluteTimeout');
    }
    return proto.session(await this._call('create', request));
  }

  /** Reads a session, sliding its idle deadline unless `peek`. */
  async get(id, options = {}) {
    checkId(id);
    return proto.session(await this._call('get', { id, peek: Boolean(options.peek) }));
  }

  /** Slides the idle deadline without reading; resolves with the new deadline. */
  async touch(id) {
    checkId(id);
    return proto.toDate((await this._call('touch', { id })).expiresAt);
  }

  /** Sets and removes attributes in one step; `expectedVersion` makes it compare-and-set. */
  async update(id, options = {}) {
    checkId(id);
    const request = {
      id,
      set: proto.attributes(options.set, 'set'),
      remove: [...(options.remove || [])],
      idempotencyKey: options.idempotencyKey || '',
    };
    if (options.expectedVersion != null) request.expectedVersion = String(options.expectedVersion);
    return proto.session(await this._call('update', request));
  }

  /** Moves the session to a fresh ID (the old one is dead); `userId` binds a user ('' unbinds). */
  async regenerate(id, options = {}) {
    checkId(id);
    const request = {
      id,
      dropAttributes: Boolean(options.dropAttributes),
      idempotencyKey: options.idempotencyKey || '',
    };
    if (options.userId != null) request.userId = String(options.userId);
    return proto.session(await this._call('regenerate', request));
  }

  /** Ends one session; resolves with whether a live one was destroyed. */
  async destroy(id) {
    checkId(id);
    return (await this._call('destroy', { id })).existed;
  }

  /** The user's live sessions, oldest first (attributes only with `includeAttributes`). */
  async listUserSessions(userId, options = {}) {
    checkId(userId, 'userId');
    const r = await this._call('listUserSessions', {
      userId,
      includeAttributes: Boolean(options.includeAttributes),
    });
    return r.sessions.map(proto.session);
  }

  /** Ends all of the user's sessions but `exceptId`; resolves with how many ended. */
  async destroyUserSessions(userId, options = {}) {
    checkId(userId, 'userId');
    const r = await this._call('destroyUserSessions', { userId, exceptId: options.exceptId || '' });
    return r.destroyed;
  }

  /**
   * Reads many sessions in one call (unary: GetMany is not in the Pipeline): one result per
   * ID, in order, each `{ session }` or `{ error }` (NotFound, InvalidArgument, ...).
   */
  async getMany(ids, options = {}) {
    for (const id of ids) checkId(id, 'ids[]');
    const r = await this._call('getMany', { ids: [...ids], peek: Boolean(options.peek) });
    return r.results.map((x) =>
      x.result === 'session' ? { session: proto.session(x.session) } : { error: fromStatus(x.error.code, x.error.message) },
    );
  }

  /**
   * Ends every session of the caller's tenant (a leaked secret). `confirm` must be exactly
   * 'destroy all sessions'. Resolves with how many ended.
   */
  async destroyAllSessions(confirm) {
    return Number((await this._call('destroyAllSessions', { confirm: String(confirm) })).destroyed);
  }

  /** Runs one operation within the client's timeout: its answer, or its typed error. */
  async _call(name, request) {
    const { timeout } = this._shared.options;
    const controller = new AbortController();
    const timer = setTimeout(() => {
      controller.abort(
        new SessiondError(`no reply within the client's timeout (${timeout} ms)`, Code.DEADLINE_EXCEEDED),
      );
    }, timeout);
    try {
      return await Promise.race([
        this._attempts(name, request, controller.signal),
        new Promise((_, reject) => {
          controller.signal.addEventListener('abort', () => reject(controller.signal.reason), { once: true });
        }),
      ]);
    } finally {
      clearTimeout(timer);
    }
  }

  /** A connection: the next slot's, or, when it cannot connect now, any other that is up. */
  async _conn() {
    const slot = this._slots[this._next++ % this._slots.length];
    try {
      return await slot.get();
    } catch (err) {
      if (!(err instanceof Unavailable)) throw err;
      const other = this._slots.map((s) => s.usable()).find(Boolean);
      if (other) return other;
      throw err;
    }
  }

  async _attempts(name, request, signal) {
    const safe = retrySafe(name, request);
    let last = '';
    for (let attempt = 0; attempt < MAX_ATTEMPTS && !signal.aborted; attempt++) {
      const conn = await this._conn();
      if (conn.pipe === null || OPS[name][1] === null) {
        try {
          return await conn.run(() => unary(conn, name, request, this._shared, signal));
        } catch (err) {
          if (!(err instanceof Unavailable && safe)) throw err;
          last = err.details;
          continue;
        }
      }
      let r;
      try {
        r = await conn.run(() => conn.pipe.call({ [name]: request }, signal));
      } catch (err) {
        if (err instanceof NotSent) {
          conn.retire();
          last = 'the Pipeline stream had ended';
          continue;
        }
        if (err instanceof Ended) {
          conn.retire();
          const why = `the connection to sessiond broke with the call in flight (${err.message})`;
          if (safe || err.unapplied) {
            last = why;
            continue;
          }
          throw new Unavailable(`${why}: it may or may not have been applied`);
        }
        throw err;
      }
      if (r.result === 'error') {
        const e = r.error;
        const version = e.currentVersion != null && e.currentVersion !== '0' ? Number(e.currentVersion) : null;
        const error = fromStatus(e.code, e.message, e.code === Code.ABORTED ? version : null);
        if (error instanceof Unavailable && safe) {
          last = error.details;
          continue;
        }
        throw error;
      }
      if (r.result !== OPS[name][1]) {
        throw new SessiondError('sessiond answered with a reply of the wrong kind for the request', Code.INTERNAL);
      }
      return r[r.result];
    }
    throw new Unavailable(`gave up after ${MAX_ATTEMPTS} attempts; the last: ${last}`);
  }
}

/**
 * Runs the operation as its unary RPC. An UNAVAILABLE retires the connection, and so does a
 * reply naming another node as the leader: the next call makes a fresh one.
 */
function unary(conn, name, request, shared, signal) {
  return new Promise((resolve, reject) => {
    let headers = null;
    const follow = (md) => {
      const [leader] = md ? md.get(LEADER_HEADER) : [];
      if (leader !== undefined && shared.router.leaderSays(conn.target, String(leader))) conn.retire();
    };
    const call = conn.stub[OPS[name][0]](request, metadata(shared.options), (err, response) => {
      signal.removeEventListener('abort', onAbort);
      follow(err ? err.metadata : headers);
      if (!err) return resolve(response);
      const error = fromServiceError(err);
      if (error instanceof Unavailable) conn.retire();
      reject(error);
    });
    call.on('metadata', (md) => {
      headers = md;
    });
    const onAbort = () => call.cancel();
    signal.addEventListener('abort', onAbort, { once: true });
  });
}

module.exports = { SessionClient, retrySafe, MAX_ATTEMPTS };
