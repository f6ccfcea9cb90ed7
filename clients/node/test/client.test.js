'use strict';
// SessionClient against a real sessiond: every operation on both transports, the typed
// errors, pipelining, a broken stream's retries, the deadline, tokens and mutual TLS.

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { execFileSync } = require('node:child_process');

const {
  SessionClient,
  SessiondError,
  NotFound,
  Conflict,
  InvalidArgument,
  Unauthenticated,
  Unavailable,
  Code,
} = require('sessiond-client');
const { REPO, startSessiond, startProxy } = require('./helpers');

let daemon;
let dir;
const closers = [];

before(async () => {
  daemon = await startSessiond();
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sessiond-node-'));
});

after(async () => {
  for (const close of closers.reverse()) await close();
  await daemon.stop();
  fs.rmSync(dir, { recursive: true, force: true });
});

function open(addr, options) {
  const c = new SessionClient(addr, options);
  closers.push(async () => c.close());
  return c;
}

test('the client carries its own copy of the API, equal to proto/', () => {
  const ours = fs.readFileSync(path.join(__dirname, '..', 'proto', 'sessiond', 'v1', 'session_store.proto'), 'utf8');
  const theirs = fs.readFileSync(path.join(REPO, 'proto', 'sessiond', 'v1', 'session_store.proto'), 'utf8');
  assert.equal(ours, theirs, 'copy proto/sessiond/v1/session_store.proto to clients/node/proto/sessiond/v1/');
});

for (const transport of ['pipelined', 'unary']) {
  test(`every operation, and its typed errors (${transport})`, async () => {
    const c = open(daemon.addr, { transport });
    const s = await c.create({ attributes: { cart: 'apple' }, ip: '203.0.113.7', userAgent: 'Firefox', idleTimeout: 60000 });
    assert.match(s.id, /^[A-Za-z0-9_-]{43}$/);
    assert.equal(s.version, 1);
    assert.equal(s.userId, '');
    assert.equal(s.attributes.cart.toString(), 'apple');
    assert.deepEqual([s.clientIp, s.clientUserAgent, s.idleTimeout], ['203.0.113.7', 'Firefox', 60000]);
    assert.ok(s.expiresAt instanceof Date && s.expiresAt > s.createdAt);

    const u = await c.update(s.id, { set: { theme: Buffer.from('dark') }, remove: ['cart'], expectedVersion: 1 });
    assert.equal(u.version, 2);
    assert.deepEqual(Object.keys(u.attributes), ['theme']);

    // A lost compare-and-set: the version comes from the server's structured field (the
    // metadata, or the Pipeline error's current_version), not only from the message.
    const lost = await c.update(s.id, { set: { theme: 'light' }, expectedVersion: 1 }).catch((e) => e);
    assert.ok(lost instanceof Conflict);
    assert.equal(lost.code, Code.ABORTED);
    assert.equal(lost.currentVersion, 2);

    const peeked = await c.get(s.id, { peek: true });
    assert.equal(peeked.attributes.theme.toString(), 'dark');
    assert.ok((await c.touch(s.id)) instanceof Date);

    const r = await c.regenerate(s.id, { userId: 'alice' });
    assert.notEqual(r.id, s.id);
    assert.equal(r.userId, 'alice');
    await assert.rejects(c.get(s.id), NotFound);
    const listed = await c.listUserSessions('alice', { includeAttributes: true });
    assert.deepEqual(listed.map((l) => [l.id, l.attributes.theme.toString()]), [[r.id, 'dark']]);
    const other = await c.create({ userId: 'alice' });
    assert.equal(await c.destroyUserSessions('alice', { exceptId: other.id }), 1);
    assert.equal(await c.destroy(other.id), true);
    assert.equal(await c.destroy(other.id), false);

    const bad = await c.get('not an id').catch((e) => e);
    assert.ok(bad instanceof InvalidArgument && bad instanceof SessiondError);
    assert.equal(bad.status, 503);
    const missing = await c.update(s.id, { set: { a: 'b' } }).catch((e) => e);
    assert.ok(missing instanceof NotFound);
    assert.doesNotMatch(missing.message, new RegExp(s.id));
  });
}

test('a retried write with an idempotency key is applied once', async () => {
  const c = open(daemon.addr);
  const s = await c.create({});
  const key = crypto.randomUUID();
  const first = await c.update(s.id, { set: { a: '1' }, idempotencyKey: key });
  const again = await c.update(s.id, { set: { a: '1' }, idempotencyKey: key });
  assert.equal(first.version, 2);
  assert.equal(again.version, 2);
});

test('pipelining: many concurrent calls share one stream, with a bounded window', async () => {
  const c = open(daemon.addr, { connections: 1, maxInFlight: 8 });
  const s = await c.create({});
  const pipe = c._slots[0].current.pipe;
  const n = 300;
  const results = await Promise.all(
    Array.from({ length: n }, (_, i) => (i % 2 ? c.get(s.id) : c.update(s.id, { set: { [`k${i}`]: String(i) } }))),
  );
  assert.equal(results.length, n);
  assert.equal(c._slots[0].current.pipe, pipe, 'one stream carried every call');
  const final = await c.get(s.id);
  assert.equal(Object.keys(final.attributes).length, n / 2);
  assert.equal(final.version, 1 + n / 2);
});

test('a broken stream fails its calls in flight; reads and keyed writes are sent again', async () => {
  const proxy = await startProxy(daemon.addr);
  closers.push(() => proxy.close());
  const c = open(proxy.addr, { connections: 1, reconnectMin: 0, reconnectMax: 0 });
  const s = await c.create({});
  const sent = proxy.hold();
  const read = c.get(s.id);
  const keyed = c.update(s.id, { set: { keyed: '1' }, idempotencyKey: crypto.randomUUID() });
  const unkeyed = c.update(s.id, { set: { unkeyed: '1' } }).catch((e) => e);
  await sent();
  proxy.release();
  proxy.breakAll();

  assert.equal((await read).id, s.id);
  assert.equal((await keyed).attributes.keyed.toString(), '1');
  const failed = await unkeyed;
  assert.ok(failed instanceof Unavailable, String(failed));
  assert.match(failed.message, /may or may not have been applied/);
  // The connection was made again.
  assert.equal((await c.get(s.id)).id, s.id);
});

test('a call past its deadline fails with DEADLINE_EXCEEDED', async () => {
  const proxy = await startProxy(daemon.addr);
  closers.push(() => proxy.close());
  const c = open(proxy.addr, { connections: 1, timeout: 1000 });
  const s = await c.create({});
  proxy.hold();
  const late = await c.get(s.id).catch((e) => e);
  assert.ok(late instanceof SessiondError);
  assert.equal(late.code, Code.DEADLINE_EXCEEDED);
});

test('down at first: calls fail fast with Unavailable, and work once sessiond answers', async () => {
  const proxy = await startProxy(null);
  closers.push(() => proxy.close());
  const c = open(proxy.addr, { reconnectMin: 0, reconnectMax: 0 });
  await assert.rejects(c.create({}), Unavailable);
  proxy.to(daemon.addr);
  assert.equal((await c.create({})).version, 1);
});

test('several addresses: the seeds are tried in turn until one answers', async () => {
  const refusing = await startProxy(null);
  closers.push(() => refusing.close());
  for (const transport of ['pipelined', 'unary']) {
    const c = open(`${refusing.addr},${daemon.addr}`, { transport });
    assert.equal((await c.create({})).version, 1);
  }
});

test('options that cannot work are named', () => {
  assert.throws(() => new SessionClient(''), /address is empty/);
  assert.throws(() => new SessionClient('ftp://h:1'), /scheme must be http or https/);
  assert.throws(() => new SessionClient('h:1', { connections: 0 }), /connections must be at least 1/);
  assert.throws(() => new SessionClient('h:1', { cert: 'x' }), /cert and options.key go together/);
  assert.throws(() => new SessionClient('h:1', { transport: 'carrier pigeon' }), /transport/);
});

test('a tenant token: without it UNAUTHENTICATED, with it served; GetMany and DestroyAllSessions', async () => {
  const token = 'node-test-token';
  const config = path.join(dir, 'tenants.toml');
  const hash = crypto.createHash('sha256').update(token).digest('hex');
  fs.writeFileSync(config, `[[tenants]]\nname = "t"\ntoken_sha256 = "${hash}"\n`);
  const tenant = await startSessiond('--config', config);
  closers.push(() => tenant.stop());
  for (const transport of ['pipelined', 'unary']) {
    await assert.rejects(open(tenant.addr, { transport }).create({}), Unauthenticated);
    await assert.rejects(open(tenant.addr, { transport, token: 'wrong' }).create({}), Unauthenticated);
    assert.equal((await open(tenant.addr, { transport, token }).create({})).version, 1);
  }
  // The tenant's own daemon, so ending all its sessions touches no other test.
  const c = open(tenant.addr, { token });
  const live = await c.create({ attributes: { a: 'b' } });
  const dead = await c.create({});
  await c.destroy(dead.id);
  const many = await c.getMany([live.id, dead.id, 'bad'], { peek: true });
  assert.equal(many[0].session.attributes.a.toString(), 'b');
  assert.ok(many[1].error instanceof NotFound);
  assert.ok(many[2].error instanceof InvalidArgument);
  await assert.rejects(c.destroyAllSessions('yes'), InvalidArgument);
  assert.equal(await c.destroyAllSessions('destroy all sessions'), 3);
  await assert.rejects(c.get(live.id), NotFound);
});

test('mutual TLS: a CA to trust sessiond, and a client certificate', async () => {
  const ssl = (...args) => execFileSync('openssl', args, { cwd: dir, stdio: 'pipe' });
  ssl('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'ca.key', '-out', 'ca.pem', '-days', '1', '-subj', '/CN=test CA');
  for (const [name, ext] of [
    ['server', 'subjectAltName=IP:127.0.0.1,DNS:localhost'],
    ['client', 'extendedKeyUsage=clientAuth'],
  ]) {
    ssl('req', '-newkey', 'rsa:2048', '-nodes', '-keyout', `${name}.key`, '-out', `${name}.csr`, '-subj', `/CN=${name}`);
    fs.writeFileSync(path.join(dir, `${name}.ext`), `${ext}\n`);
    ssl('x509', '-req', '-in', `${name}.csr`, '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial', '-out', `${name}.pem`, '-days', '1', '-extfile', `${name}.ext`);
  }
  const config = path.join(dir, 'tls.toml');
  fs.writeFileSync(
    config,
    `tls_cert = "${path.join(dir, 'server.pem')}"\ntls_key = "${path.join(dir, 'server.key')}"\ntls_client_ca = "${path.join(dir, 'ca.pem')}"\n`,
  );
  const secure = await startSessiond('--config', config);
  closers.push(() => secure.stop());
  const read = (f) => fs.readFileSync(path.join(dir, f));
  // serverName: the certificate's DNS name (TLS sends no IP address as its server name).
  const c = open(secure.addr, { ca: read('ca.pem'), cert: read('client.pem'), key: read('client.key'), serverName: 'localhost' });
  assert.equal((await c.create({})).version, 1);
  // Without a client certificate the handshake is refused.
  await assert.rejects(open(secure.addr, { ca: read('ca.pem'), serverName: 'localhost', timeout: 2000 }).create({}), SessiondError);
});
