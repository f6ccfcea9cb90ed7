'use strict';
// The parts that need no server: which calls are sent twice, the backoff, the cookie.

const { test } = require('node:test');
const assert = require('node:assert/strict');

const { retrySafe } = require('../lib/client');
const { backoff, resolveOptions } = require('../lib/connection');
const { Router } = require('../lib/router');
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

test('addresses: host:port, http:// and https:// (TLS), one or several', () => {
  assert.deepEqual(resolveOptions('h:1').seeds, ['h:1']);
  assert.equal(resolveOptions('h:1').tls, false);
  assert.deepEqual(resolveOptions('http://h:1/').seeds, ['h:1']);
  assert.equal(resolveOptions('https://h:1').tls, true);
  assert.equal(resolveOptions('h:1', { ca: 'pem' }).tls, true);
  assert.deepEqual(resolveOptions('a:1, http://b:2,a:1').seeds, ['a:1', 'b:2']);
  assert.deepEqual(resolveOptions(['a:1', 'b:2']).seeds, ['a:1', 'b:2']);
});

test('seeds are a fail-over list until a reply names the leader', () => {
  const r = new Router(['10.0.0.1:7420', '10.0.0.2:7420', '10.0.0.3:7420']);
  assert.deepEqual(r.candidates(), ['10.0.0.1:7420', '10.0.0.2:7420', '10.0.0.3:7420']);
  // The second seed answered: it comes first from now on.
  r.answered('10.0.0.2:7420');
  assert.equal(r.candidates()[0], '10.0.0.2:7420');
  // A follower names the leader: calls move there, and the seeds stay behind it.
  assert.equal(r.leaderSays('10.0.0.2:7420', '10.0.0.3:7420'), true);
  assert.deepEqual(r.candidates(), ['10.0.0.3:7420', '10.0.0.2:7420', '10.0.0.1:7420']);
  // The leader naming itself: nothing moves.
  assert.equal(r.leaderSays('10.0.0.3:7420', 'http://10.0.0.3:7420'), false);
  // It changes: follow it, even to an address that is no seed.
  assert.equal(r.leaderSays('10.0.0.3:7420', '10.0.0.9:7420'), true);
  assert.equal(r.candidates()[0], '10.0.0.9:7420');
  assert.equal(r.candidates().length, 4);
  // The leader cannot be reached: back to the seeds.
  r.unreachable('10.0.0.9:7420');
  assert.equal(r.leader, null);
  assert.equal(r.candidates()[0], '10.0.0.2:7420');
  // A header that is no address is ignored.
  assert.equal(r.leaderSays('10.0.0.2:7420', 'not an address\n'), false);
  assert.equal(r.leader, null);
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
