'use strict';
// The Express storefront over HTTP, as a real process against a real sessiond: the contract's
// routes, the cookie, the fixation check, concurrent adds, the interop encoding, SIGTERM.

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

const { SessionClient, NotFound, ResourceExhausted } = require('sessiond-client');
const { startSessiond, startProcess, stopProcess, Browser, startProxy } = require('../../../clients/node/test/helpers');

const SERVER = path.join(__dirname, '..', 'server.js');

let daemon;
let client;
let store;
const closers = [];

/** The storefront as a process: { url, proc }. */
async function startStorefront(addr, env = {}) {
  const { proc, value } = await startProcess(process.execPath, [SERVER], {
    env: { SESSIOND_ADDR: addr, PORT: '0', SESSIOND_TOKEN: '', STOREFRONT_IDLE_TIMEOUT_SECONDS: '', ...env },
    marker: 'listening on ',
  });
  closers.push(() => stopProcess(proc));
  return { url: value, proc };
}

before(async () => {
  daemon = await startSessiond();
  client = new SessionClient(daemon.addr);
  store = await startStorefront(daemon.addr);
});

after(async () => {
  for (const close of closers.reverse()) await close();
  client.close();
  await daemon.stop();
});

test('a visitor fills a cart, logs in (the old ID dies), sees devices, logs out everywhere', async () => {
  const b = new Browser(store.url);
  const none = await b.get('/cart');
  assert.deepEqual(none.body, { cart: {}, user: null });
  assert.deepEqual(none.setCookies, []);

  const added = await b.post('/cart/items', { sku: 'apple', qty: 2 }, { 'user-agent': 'TestBrowser/1' });
  assert.equal(added.status, 200);
  assert.deepEqual(added.body, { cart: { apple: 2 } });
  assert.match(added.setCookies[0], /^__Host-sid=[A-Za-z0-9_-]{43}; Path=\/; HttpOnly; Secure; SameSite=Lax$/);
  await b.post('/cart/items', { sku: 'pear', qty: 1 });
  assert.deepEqual((await b.get('/cart')).body, { cart: { apple: 2, pear: 1 }, user: null });
  // The interop encoding: one attribute per line, a JSON integer in decimal ASCII.
  const stored = await client.get(b.cookie);
  assert.equal(stored.attributes['cart:apple'].toString(), '2');

  const anonymous = b.cookie;
  const login = await b.post('/login', { user: 'alice' });
  assert.deepEqual(login.body, { user: 'alice', cart: { apple: 2, pear: 1 } });
  assert.notEqual(b.cookie, anonymous);
  assert.equal(login.setCookies.length, 1);
  await assert.rejects(client.get(anonymous), NotFound);
  assert.equal((await client.get(b.cookie)).userId, 'alice');
  assert.deepEqual((await b.get('/cart')).body, { cart: { apple: 2, pear: 1 }, user: 'alice' });

  // The pre-login cookie, late from another tab: 401 on every route, and no Set-Cookie.
  const late = new Browser(store.url);
  late.cookie = anonymous;
  for (const [method, route, body] of [
    ['GET', '/cart'],
    ['POST', '/cart/items', { sku: 'x', qty: 1 }],
    ['POST', '/login', { user: 'mallory' }],
    ['POST', '/logout', {}],
    ['POST', '/logout-all', {}],
    ['GET', '/devices'],
  ]) {
    const r = await late.request(method, route, body);
    assert.equal(r.status, 401, `${method} ${route}`);
    assert.deepEqual(r.body, { error: 'session expired' });
    assert.deepEqual(r.setCookies, [], `${method} ${route}`);
  }

  const phone = new Browser(store.url);
  await phone.post('/login', { user: 'alice' }, { 'user-agent': 'Phone/2' });
  const devices = (await b.get('/devices')).body.devices;
  assert.equal(devices.length, 2);
  const mine = devices.find((d) => d.current);
  assert.equal(mine.ip, '127.0.0.1');
  assert.ok(Number.isInteger(mine.last_seen) && mine.last_seen > 0);
  assert.deepEqual(devices.map((d) => d.user_agent).sort(), ['Phone/2', 'TestBrowser/1']);

  const all = await phone.post('/logout-all');
  assert.deepEqual(all.body, { destroyed: 2 });
  assert.equal((await b.get('/cart')).status, 401);
});

test('concurrent adds from several tabs are all counted', async () => {
  const b = new Browser(store.url);
  await b.post('/cart/items', { sku: 'plum', qty: 1 });
  const tabs = 4;
  const each = 8;
  await Promise.all(
    Array.from({ length: tabs }, async () => {
      for (let i = 0; i < each; i++) assert.equal((await b.post('/cart/items', { sku: 'plum', qty: 1 })).status, 200);
    }),
  );
  assert.deepEqual((await b.get('/cart')).body.cart, { plum: 1 + tabs * each });
});

test('bad requests: 400 and 401 as the contract says', async () => {
  const b = new Browser(store.url);
  for (const body of [
    { sku: 'a', qty: true },
    { sku: 'a', qty: 0 },
    { sku: 'a', qty: 1001 },
    { sku: 'a', qty: 1.5 },
    { sku: '', qty: 1 },
    { sku: 'x'.repeat(65), qty: 1 },
    { qty: 1 },
  ]) {
    const r = await b.post('/cart/items', body);
    assert.equal(r.status, 400, JSON.stringify(body));
    assert.equal(typeof r.body.error, 'string');
  }
  assert.deepEqual((await b.post('/login', { user: '' })).body, { error: 'user must not be empty' });
  assert.deepEqual((await b.post('/logout-all')).body, { error: 'not logged in' });
  assert.equal((await b.get('/devices')).status, 401);
  assert.equal(b.cookie, null);
});

test('a session written by another storefront reads the same here', async () => {
  const s = await client.create({ userId: 'bob', attributes: { 'cart:kiwi': '3', _auth_user_id: '"7"' } });
  const b = new Browser(store.url);
  b.cookie = s.id;
  assert.deepEqual((await b.get('/cart')).body, { cart: { kiwi: 3 }, user: 'bob' });
  await b.post('/cart/items', { sku: 'kiwi', qty: 1 });
  const after = await client.get(s.id);
  assert.equal(after.userId, 'bob');
  assert.equal(after.attributes['cart:kiwi'].toString(), '4');
  assert.equal(after.attributes._auth_user_id.toString(), '"7"');
});

test('logout ends the session and clears the cookie', async () => {
  const b = new Browser(store.url);
  await b.post('/cart/items', { sku: 'fig', qty: 1 });
  await b.post('/login', { user: 'dora' });
  const id = b.cookie;
  const out = await b.post('/logout');
  assert.deepEqual(out.body, { ok: true });
  assert.equal(b.cookie, null);
  await assert.rejects(client.get(id), NotFound);
  assert.deepEqual(await client.listUserSessions('dora'), []);
});

test('sessiond unreachable: 503, no crash, and SIGTERM ends the process', async () => {
  const proxy = await startProxy(null);
  closers.push(() => proxy.close());
  const down = await startStorefront(proxy.addr);
  const r = await new Browser(down.url).post('/cart/items', { sku: 'a', qty: 1 });
  assert.equal(r.status, 503);
  assert.equal(typeof r.body.error, 'string');
  const exited = new Promise((resolve) => down.proc.once('exit', (code) => resolve(code)));
  down.proc.kill('SIGTERM');
  assert.equal(await exited, 0);
});

test('STOREFRONT_IDLE_TIMEOUT_SECONDS is the idle timeout of new sessions', async () => {
  const short = await startStorefront(daemon.addr, { STOREFRONT_IDLE_TIMEOUT_SECONDS: '120' });
  const b = new Browser(short.url);
  await b.post('/cart/items', { sku: 'a', qty: 1 });
  assert.equal((await client.get(b.cookie)).idleTimeout, 120000);
});

test('a sessiond limit is 429 with its message', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'storefront-express-'));
  closers.push(async () => fs.rmSync(dir, { recursive: true, force: true }));
  const config = path.join(dir, 'one-session.toml');
  fs.writeFileSync(config, 'max_sessions = 1\n');
  const small = await startSessiond('--config', config);
  closers.push(() => small.stop());
  const direct = new SessionClient(small.addr);
  closers.push(async () => direct.close());
  const front = await startStorefront(small.addr);

  assert.equal((await new Browser(front.url).post('/cart/items', { sku: 'a', qty: 1 })).status, 200);
  await assert.rejects(direct.create({}), ResourceExhausted);
  const refused = await new Browser(front.url).post('/cart/items', { sku: 'a', qty: 1 });
  assert.equal(refused.status, 429);
  assert.match(refused.body.error, /max_sessions/);
  assert.deepEqual(refused.setCookies, []);
});
