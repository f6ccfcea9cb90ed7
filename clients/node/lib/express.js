'use strict';
// An Express middleware that keeps sessions in sessiond, with express-session's `req.session`
// API, so route code and Passport work unchanged:
//
//     app.use(sessiond({ address: '127.0.0.1:7420' }));
//
// - Only sessiond makes IDs. A request without a cookie gets a blank session that exists
//   only in memory; it is created in sessiond (`Create`) when it is saved with data (or
//   always, with `saveUninitialized`). A cookie naming a session sessiond does not know
//   (expired, ended, made up) is "gone": the request gets a blank session, the cookie is left
//   alone (it may be a late request from before a login in another tab, and clearing it would
//   delete the new one), and `req.sessiond.gone` is true so the app can answer 401.
// - Each top-level key of `req.session` is one sessiond attribute holding its value's compact
//   JSON. The cookie, the ID and the methods are not stored.
// - Writes are partial: at save() (explicit, or the one before the response goes out) the
//   JSON of each key is compared with what was loaded, and only the keys set, changed or
//   removed go out, as one `Update`. Two requests writing different keys never lose either.
//   A write whose session ended meanwhile is not dropped: a new session carries this
//   request's writes (not the dead session's data or user), and its cookie is set.
// - `regenerate()` is sessiond's `Regenerate` at once (the old ID is dead when the callback
//   runs), and the route sees a blank session, as with express-session. The keys it does not
//   put back are removed at the save; keys put back unchanged are not rewritten, so a
//   concurrent change to them (another tab's add to the cart) is not lost.
// - The user is bound where it changes. `userOf(session)` (default: Passport's
//   `session.passport.user`, when a string or a number) is read when the session is loaded;
//   when its answer differs at save() (Passport's `req.login` and `req.logout` both end in
//   save()), the session is first regenerated bound to the new answer (`''`, anonymous, for
//   null). `regenerate()` binds the user of a blank session, normally none. So a Passport
//   login is two `Regenerate`s (its `regenerate()`, then the binding at its `save()`) and
//   the pre-login ID is dead after the first; a logout is two as well. A session bound
//   elsewhere (the Flask or Django integration) stays bound while `userOf`'s answer does
//   not change.
// - `modify(fn)` is compare-and-set on the stored attributes, retried on conflict.
// - The response waits for the save: `res.writeHead`, `res.write` and `res.end` are held
//   until the session is written, so the cookie can name an ID sessiond has just made. A
//   save that fails answers 503 (429 for a sessiond limit) instead of the response, when
//   nothing has been sent yet.

const { SessionClient } = require('./client');
const { Cookie, validate, read } = require('./cookie');
const { Conflict, NotFound, InvalidArgument, SessiondError } = require('./errors');

/** express-session's default for an app that sets nothing: this repository's cookie. */
const DEFAULT_NAME = '__Host-sid';
/** sessiond refuses longer user agents; they are cut to this many bytes. */
const MAX_USER_AGENT_BYTES = 512;
/** A session ID as sessiond issues them: 43 chars of URL-safe base64. */
const ID_RE = /^[A-Za-z0-9_-]{43}$/;
/** How many times modify() reads and tries again after losing a compare-and-set. */
const MODIFY_ATTEMPTS = 64;
/** The longest idle timeout the daemon takes by default (`max_idle_timeout`, 7 days). */
const MAX_IDLE_TIMEOUT = 7 * 24 * 3600 * 1000;

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

/** Whether this response sends the session cookie, and which. */
function setCookie(state, res) {
  const { opts } = state;
  let value = null;
  if (state.id && !state.destroyed) {
    const cookie = state.req.session instanceof Session ? state.req.session.cookie : state.cookie;
    const send =
      state.id !== state.cookieId ||
      opts.rolling ||
      cookie.changed ||
      (cookie.expires != null && state.saved);
    if (send) value = cookie.serialize(opts.name, state.id);
  } else if (state.clearCookie) {
    value = state.cookie.serializeClear(opts.name);
  }
  if (value === null) return;
  const prev = res.getHeader('Set-Cookie');
  res.setHeader('Set-Cookie', prev === undefined ? value : [].concat(prev, value));
}

/** The request is answering: save, then set the cookie. */
async function commit(state, res) {
  await state.busy;
  await serial(state, () => save(state, false));
  if (!res.headersSent) setCookie(state, res);
}

/** The response instead of one whose session could not be saved. */
function failed(res, err) {
  if (res.headersSent) {
    res.destroy(err);
    return;
  }
  for (const name of res.getHeaderNames()) res.removeHeader(name);
  res.statusCode = err instanceof SessiondError ? err.status : 503;
  res.setHeader('Content-Type', 'application/json; charset=utf-8');
  const message = err instanceof SessiondError && err.status === 429 ? err.details : 'session store unavailable';
  res.end(JSON.stringify({ error: message }));
}

/** Holds writeHead, write and end until the session is saved, then lets them through. */
function holdResponse(state, res) {
  const original = { writeHead: res.writeHead, write: res.write, end: res.end };
  let held = null;
  const hold = (name) =>
    function (...args) {
      if (held === null) {
        held = [];
        commit(state, res).then(
          () => {
            Object.assign(res, original);
            for (const [n, a] of held) original[n].apply(res, a);
          },
          (err) => {
            Object.assign(res, original);
            failed(res, err);
          },
        ).catch((err) => res.destroy(err));
      }
      held.push([name, args]);
      return name === 'write' ? true : res;
    };
  res.writeHead = hold('writeHead');
  res.write = hold('write');
  res.end = hold('end');
}

/** The options with their defaults, checked. */
function resolve(options) {
  for (const name of ['store', 'genid']) {
    if (options[name] !== undefined) {
      throw new TypeError(`sessiond(): option ${name} is not supported: sessiond stores the sessions and makes the IDs`);
    }
  }
  const cookie = {
    path: '/',
    httpOnly: true,
    secure: true,
    sameSite: 'lax',
    domain: undefined,
    partitioned: false,
    maxAge: null,
    ...(options.cookie || {}),
  };
  const name = options.name ?? DEFAULT_NAME;
  validate(name, cookie);
  const idle = options.idleTimeout ?? (cookie.maxAge != null ? Math.min(cookie.maxAge, MAX_IDLE_TIMEOUT) : undefined);
  let client = options.client;
  if (!client) {
    if (!options.address) throw new TypeError('sessiond(): give options.client or options.address');
    client = new SessionClient(options.address, options.clientOptions || {});
  }
  return {
    client,
    name,
    cookie,
    rolling: Boolean(options.rolling),
    saveUninitialized: Boolean(options.saveUninitialized),
    idleTimeout: idle,
    absoluteTimeout: options.absoluteTimeout,
    userOf: options.userOf || passportUser,
  };
}

/** The session of a request whose cookie names `cookieId` (or none): loaded now. */
async function load(state, cookieId) {
  if (cookieId === null) return null;
  if (!ID_RE.test(cookieId)) return null;
  try {
    return await state.client.get(cookieId);
  } catch (err) {
    if (err instanceof NotFound || err instanceof InvalidArgument) return null;
    throw err;
  }
}

/** The middleware. */
function sessiond(options = {}) {
  const opts = resolve(options);
  const middleware = function sessiondSession(req, res, next) {
    if (req.session) return next();
    const cookieId = read(req.headers.cookie, opts.name);
    const state = {
      opts,
      client: opts.client,
      req,
      id: null,
      cookieId,
      cookieLive: false,
      remote: null,
      userId: '',
      userAtLoad: '',
      baseline: new Map(),
      cookie: null,
      busy: Promise.resolve(),
      gone: false,
      destroyed: false,
      clearCookie: false,
      saved: false,
    };
    load(state, cookieId).then(
      (remote) => {
        state.gone = cookieId !== null && remote === null;
        state.cookieLive = remote !== null;
        blank(state);
        if (remote) {
          state.baseline = new Map();
          adopt(state, remote);
          state.userAtLoad = userNow(state, req.session);
        }
        Object.defineProperty(req, 'sessionID', {
          get: () => state.id || '',
          set: () => {},
          configurable: true,
          enumerable: true,
        });
        req.sessiond = handle(state);
        holdResponse(state, res);
        next();
      },
      (err) => next(err),
    );
  };
  middleware.client = opts.client;
  return middleware;
}

/** `req.sessiond`: what sessiond says about the request's session, beyond express-session's API. */
function handle(state) {
  return Object.freeze({
    /** The client the middleware uses. */
    client: state.client,
    /** The request's cookie named a session sessiond does not have (expired or ended). */
    get gone() {
      return state.gone;
    },
    /** The user sessiond has the session bound to, or null (anonymous, or no session). */
    get userId() {
      return state.id && state.userId ? state.userId : null;
    },
    /** The session as sessiond last answered (expiresAt, version, ...), or null. */
    get remote() {
      return state.id ? state.remote : null;
    },
    /**
     * Ends every session of the bound user, this one included ("log out all my devices"),
     * as destroy() ends this one: resolves with how many ended, or null when no user is bound.
     */
    destroyAllForUser() {
      return serial(state, () => destroyAllForUser(state));
    },
  });
}

module.exports = { sessiond, Session, Cookie, passportUser, DEFAULT_NAME };
