'use strict';
// The Express middleware against a real sessiond: Passport's login and logout, partial
// writes, compare-and-set, the cookie, the options, and sessiond down at start-up.

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const express = require('express');
const passport = require('passport');
const { Strategy: LocalStrategy } = require('passport-local');

const { SessionClient, NotFound } = require('sessiond-client');
const { sessiond } = require('sessiond-client/express');
const { startSessiond, listen, Browser, startProxy } = require('./helpers');

let daemon;
let client;
const closers = [];

before(async () => {
  daemon = await startSessiond();
  client = new SessionClient(daemon.addr);
});

after(async () => {
  for (const close of closers.reverse()) await close();
  client.close();
  await daemon.stop();
});

/** An app with the middleware (`options` on top of the shared client) and `routes`. */
async function serve(options, routes) {
  const app = express();
  app.use(express.json());
  const middleware = sessiond({ client, ...options });
  app.use(middleware);
  routes(app);
  const server = await listen(app);
  closers.push(server.close);
  return server;
}

/** Routes that set, read and remove keys. */
function dataRoutes(app) {
  app.post('/set', (req, res) => {
    Object.assign(req.session, req.body);
    res.json({ id: req.sessionID });
  });
  app.post('/unset/:key', (req, res) => {
    delete req.session[req.params.key];
    res.json({});
  });
  app.get('/data', (req, res) => {
    if (req.sessiond.gone) return res.status(401).json({ error: 'session expired' });
    res.json({ data: { ...req.session }, id: req.sessionID, user: req.sessiond.userId });
  });
  app.get('/noop', (req, res) => res.json({}));
  app.post('/save-and-forget', (req, res) => {
    Object.assign(req.session, req.body);
    req.session.save();
    res.json({});
  });
}

test('keys are stored as one attribute each, holding compact JSON, and only changes are written', async () => {
  const { url } = await serve({}, dataRoutes);
  const b = new Browser(url);
  const first = await b.post('/set', { cart: ['apple'], n: 1, nested: { a: null } });
  assert.equal(first.status, 200);
  assert.match(b.cookie, /^[A-Za-z0-9_-]{43}$/);
  // A new session's ID is '' in the handler: sessiond makes it when the session is saved.
  assert.equal(first.body.id, '');
  assert.equal((await b.get('/data')).body.id, b.cookie);
  let s = await client.get(b.cookie);
  assert.deepEqual(
    Object.fromEntries(Object.entries(s.attributes).map(([k, v]) => [k, v.toString()])),
    { cart: '["apple"]', n: '1', nested: '{"a":null}' },
  );
  assert.equal(s.version, 1);

  // Another writer changes `n`; this request changes only `cart`, so `n` survives.
  await client.update(b.cookie, { set: { n: '41' } });
  await b.post('/set', { cart: ['apple', 'pear'] });
  s = await client.get(b.cookie);
  assert.equal(s.attributes.n.toString(), '41');
  assert.equal(s.attributes.cart.toString(), '["apple","pear"]');

  // A request that changes nothing writes nothing.
  const version = s.version;
  const read = await b.get('/data');
  assert.deepEqual(read.body.data, { cart: ['apple', 'pear'], n: 41, nested: { a: null } });
  assert.deepEqual(read.setCookies, []);
  assert.equal((await client.get(b.cookie)).version, version);

  await b.post('/unset/nested');
  assert.equal((await client.get(b.cookie)).attributes.nested, undefined);
});

test('no cookie, no change: no session and no Set-Cookie (saveUninitialized is off)', async () => {
  const { url } = await serve({}, dataRoutes);
  const b = new Browser(url);
  const r = await b.get('/noop');
  assert.equal(r.status, 200);
  assert.deepEqual(r.setCookies, []);
});

test('saveUninitialized stores a new session even when unchanged', async () => {
  const { url } = await serve({ saveUninitialized: true }, dataRoutes);
  const b = new Browser(url);
  const r = await b.get('/noop');
  assert.equal(r.setCookies.length, 1);
  assert.equal((await client.get(b.cookie)).version, 1);
});

test('rolling sends the cookie on every response; otherwise only when the ID changes', async () => {
  const plain = new Browser((await serve({}, dataRoutes)).url);
  await plain.post('/set', { a: 1 });
  assert.deepEqual((await plain.get('/data')).setCookies, []);
  assert.deepEqual((await plain.post('/set', { a: 2 })).setCookies, []);

  const rolling = new Browser((await serve({ rolling: true, cookie: { maxAge: 60000 } }, dataRoutes)).url);
  await rolling.post('/set', { a: 1 });
  const again = await rolling.get('/data');
  assert.equal(again.setCookies.length, 1);
  assert.match(again.setCookies[0], /Max-Age=(59|60);/);
});

test('the cookie: defaults, options, and settings browsers would drop are refused', async () => {
  const defaults = new Browser((await serve({}, dataRoutes)).url);
  const [line] = (await defaults.post('/set', { a: 1 })).setCookies;
  assert.equal(line, `__Host-sid=${defaults.cookie}; Path=/; HttpOnly; Secure; SameSite=Lax`);

  const options = {
    name: 'sid',
    cookie: { domain: 'example.test', path: '/shop', secure: false, httpOnly: false, sameSite: 'strict', maxAge: 3600000 },
  };
  const { url } = await serve(options, (app) => {
    app.post('/shop/set', (req, res) => {
      req.session.a = 1;
      const c = req.session.cookie;
      res.json({ maxAge: c.maxAge, expires: c.expires, secure: c.secure, httpOnly: c.httpOnly, sameSite: c.sameSite, domain: c.domain });
    });
  });
  const b = new Browser(url, 'sid');
  const r = await b.post('/shop/set', {});
  assert.match(r.setCookies[0], /^sid=[A-Za-z0-9_-]{43}; Domain=example\.test; Path=\/shop; Expires=[^;]+ GMT; Max-Age=(3599|3600); SameSite=Strict$/);
  assert.ok(r.body.maxAge > 0 && r.body.maxAge <= 3600000);
  assert.ok(new Date(r.body.expires) > new Date());
  assert.deepEqual([r.body.secure, r.body.httpOnly, r.body.sameSite, r.body.domain], [false, false, 'strict', 'example.test']);
  // The cookie's maxAge is the new session's idle timeout.
  assert.equal((await client.get(b.cookie)).idleTimeout, 3600000);

  assert.throws(() => sessiond({ client, cookie: { domain: 'example.test' } }), /__Host- cookie must not have cookie.domain/);
  assert.throws(() => sessiond({ client, cookie: { secure: false } }), /__Host- cookie needs cookie.secure/);
  assert.throws(() => sessiond({ client, name: 'sid', cookie: { secure: false, sameSite: 'none' } }), /'none' needs cookie.secure/);
  assert.throws(() => sessiond({ client, store: {} }), /option store is not supported/);
});

test('concurrent requests writing different keys lose none', async () => {
  const { url } = await serve({}, dataRoutes);
  const b = new Browser(url);
  await b.post('/set', { start: true });
  const n = 24;
  await Promise.all(Array.from({ length: n }, (_, i) => b.post('/set', { [`k${i}`]: i })));
  const { body } = await b.get('/data');
  for (let i = 0; i < n; i++) assert.equal(body.data[`k${i}`], i);
});

test('modify is compare-and-set: concurrent adds to one counter all count', async () => {
  const { url } = await serve({}, (app) => {
    app.post('/add', async (req, res) => {
      const written = await req.session.modify((attrs) => ({ count: (attrs.count || 0) + 1 }));
      res.json({ count: written.count, seen: req.session.count });
    });
    dataRoutes(app);
  });
  const b = new Browser(url);
  const first = await b.post('/add');
  assert.deepEqual(first.body, { count: 1, seen: 1 });
  const n = 20;
  await Promise.all(Array.from({ length: n }, () => b.post('/add')));
  assert.equal((await b.get('/data')).body.data.count, n + 1);
});

test('reload, destroy and touch', async () => {
  const { url } = await serve({ cookie: { maxAge: 60000 } }, (app) => {
    dataRoutes(app);
    app.post('/reload', (req, res, next) => {
      req.session.unsaved = true;
      client.update(req.sessionID, { set: { outside: '"yes"' } }).then(() => {
        req.session.reload((err) => {
          if (err) return next(err);
          res.json({ data: { ...req.session } });
        });
      }, next);
    });
    app.post('/destroy', (req, res, next) => {
      const id = req.sessionID;
      req.session.destroy((err) => {
        if (err) return next(err);
        res.json({ destroyed: id.length, session: req.session === undefined ? null : 'still there' });
      });
    });
    app.post('/touch', (req, res) => {
      req.session.touch();
      res.json({});
    });
  });
  const b = new Browser(url);
  await b.post('/set', { a: 1 });
  const reloaded = await b.post('/reload');
  assert.deepEqual(reloaded.body.data, { a: 1, outside: 'yes' });

  assert.deepEqual((await b.get('/data')).setCookies, []);
  const touched = await b.post('/touch');
  assert.equal(touched.setCookies.length, 1);
  assert.match(touched.setCookies[0], /Max-Age=(59|60);/);

  const id = b.cookie;
  const destroyed = await b.post('/destroy');
  assert.deepEqual(destroyed.body, { destroyed: 43, session: null });
  assert.match(destroyed.setCookies[0], /^__Host-sid=; Path=\/; Expires=Thu, 01 Jan 1970 00:00:00 GMT; Max-Age=0/);
  assert.equal(b.cookie, null);
  await assert.rejects(client.get(id), NotFound);
});

test('a cookie naming a dead session: gone, no Set-Cookie, and a write starts a new session', async () => {
  const { url } = await serve({}, dataRoutes);
  const b = new Browser(url);
  await b.post('/set', { a: 1 });
  const dead = b.cookie;
  await client.destroy(dead);
  const r = await b.get('/data');
  assert.equal(r.status, 401);
  assert.deepEqual(r.setCookies, []);
  assert.equal(b.cookie, dead);
  const w = await b.post('/set', { b: 2 });
  assert.notEqual(b.cookie, dead);
  assert.equal(w.setCookies.length, 1);
  assert.deepEqual((await b.get('/data')).body.data, { b: 2 });
});

test('Passport local login and logout bind and unbind the user through Regenerate', async () => {
  const users = { alice: 'secret' };
  const pass = new passport.Passport();
  pass.use(
    new LocalStrategy((username, password, done) =>
      done(null, users[username] === password ? username : false),
    ),
  );
  pass.serializeUser((user, done) => done(null, user));
  pass.deserializeUser((id, done) => done(null, id));
  const { url } = await serve({}, (app) => {
    app.use(pass.initialize());
    app.use(pass.session());
    dataRoutes(app);
    app.post('/login', pass.authenticate('local', { keepSessionInfo: true }), (req, res) => {
      res.json({ user: req.user, bound: req.sessiond.userId, id: req.sessionID });
    });
    app.post('/logout', (req, res, next) => {
      req.logout((err) => (err ? next(err) : res.json({ bound: req.sessiond.userId })));
    });
    app.get('/me', (req, res) => {
      if (req.sessiond.gone) return res.status(401).json({ error: 'session expired' });
      res.json({ user: req.user || null, bound: req.sessiond.userId });
    });
  });

  const b = new Browser(url);
  await b.post('/set', { cart: ['apple'] });
  const anonymous = b.cookie;

  const wrong = await b.post('/login', { username: 'alice', password: 'nope' });
  assert.equal(wrong.status, 401);
  assert.equal(b.cookie, anonymous);

  const login = await b.post('/login', { username: 'alice', password: 'secret' });
  assert.equal(login.status, 200);
  assert.deepEqual([login.body.user, login.body.bound], ['alice', 'alice']);
  assert.notEqual(b.cookie, anonymous);
  assert.equal(login.body.id, b.cookie);
  // The fixation check: the pre-login ID is dead.
  await assert.rejects(client.get(anonymous), NotFound);
  const session = await client.get(b.cookie);
  assert.equal(session.userId, 'alice');
  assert.equal(session.attributes.cart.toString(), '["apple"]');
  assert.deepEqual(await client.listUserSessions('alice').then((l) => l.map((s) => s.id)), [b.cookie]);
  assert.deepEqual((await b.get('/me')).body, { user: 'alice', bound: 'alice' });

  // The pre-login cookie, replayed (a late request from another tab): gone, no Set-Cookie.
  const late = new Browser(url);
  late.cookie = anonymous;
  const replay = await late.get('/me');
  assert.equal(replay.status, 401);
  assert.deepEqual(replay.setCookies, []);

  const loggedIn = b.cookie;
  const logout = await b.post('/logout');
  assert.equal(logout.status, 200);
  assert.equal(logout.body.bound, null);
  assert.notEqual(b.cookie, loggedIn);
  await assert.rejects(client.get(loggedIn), NotFound);
  assert.equal((await client.get(b.cookie)).userId, '');
  assert.deepEqual(await client.listUserSessions('alice'), []);
  assert.deepEqual((await b.get('/me')).body, { user: null, bound: null });
});

test('a session bound elsewhere stays bound while userOf does not change', async () => {
  const { url } = await serve({}, dataRoutes);
  const s = await client.create({ userId: 'bob' });
  const b = new Browser(url);
  b.cookie = s.id;
  await b.post('/set', { theme: 'dark' });
  const now = await client.get(s.id);
  assert.equal(now.userId, 'bob');
  assert.equal(now.attributes.theme.toString(), '"dark"');
  assert.equal((await b.get('/data')).body.user, 'bob');
});

test('userOf maps the session to the bound user', async () => {
  const { url } = await serve({ userOf: (s) => s.account && s.account.name }, (app) => {
    dataRoutes(app);
    app.post('/as/:name', (req, res, next) => {
      req.session.account = { name: req.params.name };
      req.session.save((err) => (err ? next(err) : res.json({ bound: req.sessiond.userId })));
    });
  });
  const b = new Browser(url);
  await b.post('/set', { a: 1 });
  const before = b.cookie;
  const r = await b.post('/as/carol');
  assert.equal(r.body.bound, 'carol');
  assert.notEqual(b.cookie, before);
  assert.equal((await client.get(b.cookie)).userId, 'carol');
});

test('sessiond down at start-up: requests fail with 503, then work once it is up', async () => {
  // A proxy that refuses every connection stands for a sessiond that is not running yet;
  // its port is the app's, fixed from the start, so nothing else can take it meanwhile.
  const proxy = await startProxy(null);
  closers.push(() => proxy.close());
  const lazy = new SessionClient(proxy.addr, { reconnectMin: 0, reconnectMax: 0 });
  closers.push(async () => lazy.close());
  const { url } = await serve({ client: lazy }, dataRoutes);
  const b = new Browser(url);

  assert.deepEqual((await b.get('/noop')).status, 200);
  const down = await b.post('/set', { a: 1 });
  assert.equal(down.status, 503);
  assert.deepEqual(down.body, { error: 'session store unavailable' });
  assert.deepEqual(down.setCookies, []);
  // express-session code saves without a callback: its failure ends nothing but the response.
  assert.equal((await b.post('/save-and-forget', { a: 1 })).status, 503);

  proxy.to(daemon.addr);
  const up = await b.post('/set', { a: 1 });
  assert.equal(up.status, 200);
  assert.deepEqual((await b.get('/data')).body.data, { a: 1 });
});

test('a response written with writeHead and write waits for the save, and carries the cookie', async () => {
  const { url } = await serve({}, (app) => {
    dataRoutes(app);
    app.get('/stream', (req, res) => {
      req.session.streamed = true;
      res.writeHead(200, { 'content-type': 'text/plain' });
      res.write('a');
      res.write('b');
      res.end('c');
    });
  });
  const b = new Browser(url);
  const r = await b.get('/stream');
  assert.equal(r.text, 'abc');
  assert.equal(r.setCookies.length, 1);
  assert.deepEqual((await b.get('/data')).body.data, { streamed: true });
});

test('a save that fails answers 503 instead of the response', async () => {
  const { url } = await serve({}, (app) => {
    app.post('/big', (req, res) => {
      // Past the daemon's max_value_bytes (64 KiB): INVALID_ARGUMENT.
      req.session.big = 'x'.repeat(100 * 1024);
      res.json({ ok: true });
    });
  });
  const r = await new Browser(url).post('/big');
  assert.equal(r.status, 503);
  assert.deepEqual(r.body, { error: 'session store unavailable' });
  assert.deepEqual(r.setCookies, []);
});

test('regenerate gives a blank session: keys not put back are removed, keys put back unchanged keep a concurrent change', async () => {
  const { url } = await serve({}, (app) => {
    dataRoutes(app);
    app.post('/regenerate', async (req, res) => {
      const prev = { ...req.session };
      // Another request writes `cart` after this one loaded the session.
      await client.update(req.sessionID, { set: { cart: '5' } });
      await req.session.regenerate();
      if (req.body.keep) Object.assign(req.session, prev);
      res.json({ blank: Object.keys(prev).length > 0 });
    });
  });
  const b = new Browser(url);
  await b.post('/set', { cart: 1, note: 'n' });
  const first = b.cookie;
  await b.post('/regenerate', { keep: true });
  assert.notEqual(b.cookie, first);
  await assert.rejects(client.get(first), NotFound);
  assert.deepEqual((await b.get('/data')).body.data, { cart: 5, note: 'n' });

  const second = b.cookie;
  await b.post('/regenerate', { keep: false });
  assert.notEqual(b.cookie, second);
  assert.deepEqual((await b.get('/data')).body.data, {});
});
