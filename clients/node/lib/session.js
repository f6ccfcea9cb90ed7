'use strict';
// The session of one request, as `req.session` shows it: express-session's API over
// sessiond, and what each method does there. The middleware (express.js) loads it, makes
// the request's state, and saves it before the response goes out.
//
// The request's state: the sessiond ID it holds now (`id`, null before Create), the ID its
// cookie named, the user sessiond has bound, what `userOf` said at load, and the baseline:
// each key's JSON as sessiond holds it, against which a save finds the changed keys.
// Operations on it run one at a time (`serial`), in the order the route asked for them.

const { Cookie } = require('./cookie');
const { Conflict, NotFound } = require('./errors');

/** sessiond refuses longer user agents; they are cut to this many bytes. */
const MAX_USER_AGENT_BYTES = 512;
/** How many times modify() reads and tries again after losing a compare-and-set. */
const MODIFY_ATTEMPTS = 64;
/** Where a Session keeps its request's state: a symbol, so it is never a data key. */
const STATE = Symbol('sessiond.state');

/** Passport's user, when it is a plain ID. */
function passportUser(session) {
  const user = session && session.passport && session.passport.user;
  return typeof user === 'string' || typeof user === 'number' ? String(user) : null;
}

/** Keys that are never attributes: the Session's own API, and what JSON objects must not hold. */
const RESERVED = new Set(['id', 'cookie', '__proto__', 'constructor']);

/**
 * The session of one request. Own enumerable properties are the data; everything else (id,
 * cookie, methods) is on the prototype or non-enumerable, so `Object.keys`, `for...in` and
 * Passport's `keepSessionInfo` merge see only the data.
 */
class Session {
  constructor(state) {
    Object.defineProperty(this, STATE, { value: state });
    Object.defineProperty(this, 'cookie', { value: state.cookie, writable: true, enumerable: false, configurable: true });
  }

  /** The sessiond ID ('' until the session exists in sessiond); read-only. */
  get id() {
    return this[STATE].id || '';
  }

  /** Moves the session to a fresh ID with no data (sessiond's Regenerate); the old ID is dead. */
  regenerate(cb) {
    return run(cb, () => serial(this[STATE], () => regenerate(this[STATE])));
  }

  /** Ends the session (sessiond's Destroy); `req.session` is unset, and the cookie cleared. */
  destroy(cb) {
    return run(cb, () => serial(this[STATE], () => destroy(this[STATE])));
  }

  /** Writes the changed keys now (and binds the user if `userOf` changed). */
  save(cb) {
    return run(cb, () => serial(this[STATE], () => save(this[STATE], true)));
  }

  /** Reads the session again from sessiond, dropping unsaved changes. */
  reload(cb) {
    return run(cb, () => serial(this[STATE], () => reload(this[STATE])));
  }

  /** Starts the cookie's maxAge over (sessiond slid the idle deadline when it was read). */
  touch() {
    this.cookie.resetMaxAge();
    return this;
  }

  /** As touch(). */
  resetMaxAge() {
    return this.touch();
  }

  /**
   * Compare-and-set on the stored attributes: calls `fn(attributes)` with the session's
   * data as sessiond has it now (parsed JSON) and writes what it returns (key -> value,
   * `undefined` removes the key) with Update's expected_version, reading again and calling
   * `fn` again on a conflict, so concurrent read-modify-writes in other processes are never
   * lost. Without a live session, creates one with the changes. Resolves with the data as
   * written; `req.session` shows it too, except keys this request changed and has not saved.
   */
  modify(fn) {
    return serial(this[STATE], () => modify(this[STATE], fn));
  }
}

const METHODS = new Set(Object.getOwnPropertyNames(Session.prototype));

function reserved(key) {
  return RESERVED.has(key) || METHODS.has(key);
}

/**
 * Calls `cb(err)` when given (express-session's style), else returns the promise. Code
 * written for express-session calls `req.session.save()` without a callback and without
 * awaiting it: its failure must not be an unhandled rejection that ends the process (the
 * response's own save still reports it).
 */
function run(cb, fn) {
  const p = fn();
  if (typeof cb !== 'function') {
    p.catch(() => {});
    return p;
  }
  p.then(
    () => cb(),
    (err) => cb(err),
  );
  return undefined;
}

/** Runs the request's session operations one at a time, in the order they were asked for. */
function serial(state, fn) {
  const p = state.busy.then(fn);
  state.busy = p.catch(() => {});
  return p;
}

function decode(buf) {
  try {
    return { ok: true, value: JSON.parse(Buffer.from(buf).toString('utf8')) };
  } catch {
    return { ok: false };
  }
}

/** The attributes that are JSON and not reserved names, parsed. */
function parsed(attributes) {
  const out = {};
  for (const [key, buf] of Object.entries(attributes)) {
    if (reserved(key)) continue;
    const v = decode(buf);
    if (v.ok) out[key] = v.value;
  }
  return out;
}

function defineKey(obj, key, value) {
  Object.defineProperty(obj, key, { value, writable: true, enumerable: true, configurable: true });
}

/** The data of the request's session as JSON, key by key (a value JSON cannot hold is absent). */
function snapshot(session) {
  const out = new Map();
  for (const key of Object.keys(session)) {
    if (reserved(key)) continue;
    const json = JSON.stringify(session[key]);
    if (json !== undefined) out.set(key, json);
  }
  return out;
}

/** The request's changes against what sessiond has: keys to set (JSON) and keys to remove. */
function changes(state) {
  const now = snapshot(state.req.session);
  const set = {};
  const remove = [];
  for (const [key, json] of now) if (state.baseline.get(key) !== json) set[key] = json;
  for (const key of state.baseline.keys()) if (!now.has(key)) remove.push(key);
  return { set, remove, now };
}

/** The current answer of userOf, as sessiond's user_id ('' for none). */
function userNow(state, session) {
  const u = state.opts.userOf(session);
  return u == null ? '' : String(u);
}

/**
 * `remote` is what sessiond has now: remember its ID, version and user, and show its data
 * in `req.session` for every key this request has not changed.
 */
function adopt(state, remote) {
  const session = state.req.session;
  const data = parsed(remote.attributes);
  const local = snapshot(session);
  for (const key of new Set([...state.baseline.keys(), ...Object.keys(data)])) {
    const dirty = local.get(key) !== state.baseline.get(key);
    if (dirty) continue;
    if (key in data) {
      defineKey(session, key, data[key]);
      state.baseline.set(key, JSON.stringify(data[key]));
    } else {
      delete session[key];
      state.baseline.delete(key);
    }
  }
  state.id = remote.id;
  state.remote = remote;
  state.userId = remote.userId;
}

/** What a new session is created with: the request's client and the configured timeouts. */
function createOptions(state, userId, attributes) {
  const { req, opts } = state;
  return {
    userId,
    attributes,
    ip: req.ip || (req.socket && req.socket.remoteAddress) || '',
    userAgent: truncate(req.get ? req.get('user-agent') : req.headers['user-agent']),
    idleTimeout: opts.idleTimeout,
    absoluteTimeout: opts.absoluteTimeout,
  };
}

function truncate(ua) {
  if (!ua) return '';
  const buf = Buffer.from(ua, 'utf8');
  if (buf.length <= MAX_USER_AGENT_BYTES) return ua;
  return buf.subarray(0, MAX_USER_AGENT_BYTES).toString('utf8').replace(/\uFFFD+$/, '');
}

/** A new session in sessiond holding `set` (JSON texts), bound to `userId`. */
async function create(state, userId, set) {
  const remote = await state.client.create(createOptions(state, userId, set));
  state.baseline = new Map(Object.entries(set));
  adopt(state, remote);
}

/**
 * Writes the request's changes. `explicit`: save() was called, which persists even an
 * unmodified new session (express-session's save always stores).
 */
async function save(state, explicit) {
  const session = state.req.session;
  if (!(session instanceof Session) || state.destroyed) return;
  const { set, remove } = changes(state);
  const user = userNow(state, session);
  const userChanged = user !== state.userAtLoad;
  const modified = Object.keys(set).length > 0 || remove.length > 0;
  if (!state.id) {
    const wanted = explicit || modified || (userChanged && user) || (state.opts.saveUninitialized && !state.gone);
    if (!wanted) return;
    await create(state, user, set);
    state.userAtLoad = user;
    state.saved = true;
    return;
  }
  if (userChanged && user !== state.userId) {
    try {
      adopt(state, await state.client.regenerate(state.id, { userId: user }));
    } catch (err) {
      if (!(err instanceof NotFound)) throw err;
      // The session ended meanwhile: the login starts a new session for the user.
      await create(state, user, set);
      state.userAtLoad = user;
      state.saved = true;
      return;
    }
  }
  state.userAtLoad = user;
  if (!modified) return;
  try {
    adopt(state, await state.client.update(state.id, { set, remove }));
  } catch (err) {
    if (!(err instanceof NotFound)) throw err;
    // Ended meanwhile: a new anonymous session carries this request's writes.
    await create(state, '', set);
    state.userAtLoad = '';
    state.saved = true;
    return;
  }
  for (const key of remove) state.baseline.delete(key);
  for (const [key, json] of Object.entries(set)) state.baseline.set(key, json);
  state.saved = true;
}

/** A blank Session for the request, in place of the current one (which keeps its data). */
function blank(state) {
  state.baseline = new Map();
  return fresh(state);
}

/** A new Session object with no data and a new cookie, in place of the request's one. */
function fresh(state) {
  state.cookie = new Cookie(state.opts.cookie);
  const session = new Session(state);
  state.req.session = session;
  state.userAtLoad = userNow(state, session);
  return session;
}

/**
 * Moves the session to a fresh ID now; the route then sees a blank session. In sessiond the
 * new ID carries the data until the save, which removes every key the route did not put
 * back: a key put back unchanged (Passport's keepSessionInfo) is not written again, so a
 * change another request made to it meanwhile is kept, and the move is one atomic step.
 */
async function regenerate(state) {
  const before = {
    session: state.req.session,
    id: state.id,
    remote: state.remote,
    userId: state.userId,
    userAtLoad: state.userAtLoad,
    cookie: state.cookie,
  };
  // The baseline stays: it is what sessiond holds under the new ID too.
  const session = fresh(state);
  if (!before.id) return;
  state.id = null;
  state.remote = null;
  try {
    const remote = await state.client.regenerate(before.id, { userId: userNow(state, session) });
    state.id = remote.id;
    state.remote = remote;
    state.userId = remote.userId;
    state.saved = true;
  } catch (err) {
    if (err instanceof NotFound) {
      // Ended meanwhile: the blank session is new, made in sessiond when it is saved.
      state.userId = '';
      state.baseline = new Map();
      return;
    }
    // Nothing moved (or nobody can tell): the request keeps the session it had.
    Object.assign(state, { id: before.id, remote: before.remote, userId: before.userId });
    Object.assign(state, { userAtLoad: before.userAtLoad, cookie: before.cookie });
    state.req.session = before.session;
    throw err;
  }
}

async function destroy(state) {
  if (state.req.session && state.req.session[STATE] === state) delete state.req.session;
  state.destroyed = true;
  const id = state.id;
  state.id = null;
  state.remote = null;
  if (id) await state.client.destroy(id);
  // The cookie named a session that this request ended (here, or by moving it to a new ID).
  if (state.cookieLive) state.clearCookie = true;
}

async function destroyAllForUser(state) {
  if (!state.id || !state.userId) return null;
  const n = await state.client.destroyUserSessions(state.userId);
  if (state.req.session && state.req.session[STATE] === state) delete state.req.session;
  state.destroyed = true;
  state.id = null;
  state.remote = null;
  if (state.cookieLive) state.clearCookie = true;
  return n;
}

async function reload(state) {
  if (!state.id) throw new NotFound('failed to load session: it is not in sessiond');
  let remote;
  try {
    remote = await state.client.get(state.id);
  } catch (err) {
    if (err instanceof NotFound) state.id = null;
    throw err;
  }
  const session = state.req.session;
  for (const key of Object.keys(session)) if (!reserved(key)) delete session[key];
  state.baseline = new Map();
  adopt(state, remote);
  state.userAtLoad = userNow(state, session);
}

function encodeChanges(result) {
  if (result == null || typeof result !== 'object') throw new TypeError('modify(fn): fn must return an object of changes');
  const set = {};
  const remove = [];
  for (const [key, value] of Object.entries(result)) {
    if (reserved(key)) throw new TypeError(`modify(fn): ${JSON.stringify(key)} is not a session key`);
    const json = value === undefined ? undefined : JSON.stringify(value);
    if (json === undefined) remove.push(key);
    else set[key] = json;
  }
  return { set, remove };
}

async function modify(state, fn) {
  if (state.destroyed) throw new NotFound('the session was destroyed in this request');
  if (!state.id) {
    // No session to race on: the changes join this request's own, and the session is made.
    const { set, remove } = encodeChanges(await fn({}));
    const session = state.req.session;
    for (const [key, json] of Object.entries(set)) defineKey(session, key, JSON.parse(json));
    for (const key of remove) delete session[key];
    await save(state, true);
    return parsed(state.remote.attributes);
  }
  let remote = state.remote;
  let lost;
  for (let i = 0; i < MODIFY_ATTEMPTS; i++) {
    const { set, remove } = encodeChanges(await fn(parsed(remote.attributes)));
    if (Object.keys(set).length === 0 && remove.length === 0) return parsed(remote.attributes);
    try {
      remote = await state.client.update(remote.id, { set, remove, expectedVersion: remote.version });
      adopt(state, remote);
      state.saved = true;
      return parsed(remote.attributes);
    } catch (err) {
      if (err instanceof NotFound) state.id = null;
      if (!(err instanceof Conflict)) throw err;
      lost = err;
    }
    try {
      remote = await state.client.get(remote.id);
    } catch (err) {
      if (err instanceof NotFound) state.id = null;
      throw err;
    }
    adopt(state, remote);
  }
  throw lost;
}

module.exports = {
  STATE,
  Session,
  passportUser,
  serial,
  save,
  blank,
  adopt,
  userNow,
  destroyAllForUser,
};
