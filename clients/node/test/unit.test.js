'use strict';
// The parts that need no server: which calls are sent twice, the backoff, the cookie.

const { test } = require('node:test');
const assert = require('node:assert/strict');

const { retrySafe } = require('../lib/client');
const { backoff, resolveOptions } = require('../lib/connection');
const { Cookie, read } = require('../lib/cookie');
const { Metadata } = require('@grpc/grpc-js');
const { Conflict, Code } = require('sessiond-client');
const { fromServiceError, CURRENT_VERSION_HEADER } = require('../lib/errors');

test('only reads and writes with an idempotency key are sent twice', () => {
  for (const read of ['get', 'touch', 'listUserSessions']) assert.equal(retrySafe(read, {}), true);
  for (const write of ['create', 'update', 'regenerate']) {
    assert.equal(retrySafe(write, { idempotencyKey: '' }), false);
    assert.equal(retrySafe(write, { idempotencyKey: 'k' }), true);
  }
  assert.equal(retrySafe('destroy', {}), false);
  assert.equal(retrySafe('destroyUserSessions', {}), false);
});

test('backoff doubles up to its cap, jittered down by up to half', () => {
  const o = resolveOptions('h:1', { reconnectMin: 100, reconnectMax: 1000 });
  for (let i = 0; i < 100; i++) {
    const first = backoff(o, 1);
    assert.ok(first >= 50 && first <= 100);
    const third = backoff(o, 3);
    assert.ok(third >= 200 && third <= 400);
    const late = backoff(o, 40);
    assert.ok(late >= 500 && late <= 1000);
  }
});

test('addresses: host:port, http:// and https:// (TLS)', () => {
  assert.deepEqual([resolveOptions('h:1').target, resolveOptions('h:1').tls], ['h:1', false]);
  assert.deepEqual([resolveOptions('http://h:1/').target, resolveOptions('http://h:1/').tls], ['h:1', false]);
  assert.equal(resolveOptions('https://h:1').tls, true);
  assert.equal(resolveOptions('h:1', { ca: 'pem' }).tls, true);
});

test("a conflict's version from the message when the server sent no field", () => {
  assert.equal(new Conflict('version mismatch: expected 1, session is at 7').currentVersion, 7);
  assert.equal(new Conflict('whatever', 3).currentVersion, 3);
  assert.equal(new Conflict('idempotency key in use').currentVersion, null);
});

test('the cookie: maxAge and expires move together; reading a Cookie header', () => {
  const c = new Cookie({ path: '/', httpOnly: true, secure: true, sameSite: 'lax', maxAge: null });
  assert.equal(c.maxAge, null);
  assert.equal(c.serialize('sid', 'v'), 'sid=v; Path=/; HttpOnly; Secure; SameSite=Lax');
  c.maxAge = 10000;
  assert.ok(c.expires instanceof Date && c.maxAge > 0 && c.maxAge <= 10000);
  assert.equal(c.originalMaxAge, 10000);
  assert.match(c.serializeClear('sid'), /^sid=; Path=\/; Expires=Thu, 01 Jan 1970 00:00:00 GMT; Max-Age=0; HttpOnly/);
  assert.equal(read('a=1; __Host-sid=xyz; b=2', '__Host-sid'), 'xyz');
  assert.equal(read('a=1', '__Host-sid'), null);
});

test("a unary conflict's version comes from the sessiond-current-version metadata", () => {
  const metadata = new Metadata();
  metadata.set(CURRENT_VERSION_HEADER, '9');
  const err = fromServiceError({ code: Code.ABORTED, details: 'version mismatch: expected 1, session is at 2', metadata });
  assert.ok(err instanceof Conflict);
  assert.equal(err.currentVersion, 9);
});
