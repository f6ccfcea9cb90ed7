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
const { NotFound, InvalidArgument, SessiondError } = require('./errors');
const { Session, passportUser, serial, save, blank, adopt, userNow, destroyAllForUser } = require('./session');

/** express-session's default for an app that sets nothing: this repository's cookie. */
const DEFAULT_NAME = '__Host-sid';
/** A session ID as sessiond issues them: 43 chars of URL-safe base64. */
const ID_RE = /^[A-Za-z0-9_-]{43}$/;
/** The longest idle timeout the daemon takes by default (`max_idle_timeout`, 7 days). */
const MAX_IDLE_TIMEOUT = 7 * 24 * 3600 * 1000;

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
