'use strict';
// Storefront demo: a cart and a login kept in sessiond, behind an Express app with Passport.
//
// It speaks the HTTP contract of the Rust (axum) and Flask storefronts, so all of them can
// run against one sessiond and share sessions through the same cookie:
//
//   POST /cart/items {"sku": "apple", "qty": 1}  -> {"cart": {"apple": 1}}
//   GET  /cart                                   -> {"cart": {...}, "user": "alice" | null}
//   POST /login {"user": "alice"}                -> {"user": "alice", "cart": {...}}
//   POST /logout                                 -> {"ok": true}
//   POST /logout-all                             -> {"destroyed": n}
//   GET  /devices                                -> {"devices": [{"ip", "user_agent", "last_seen", "current"}]}
//
// Sessions through sessiond-client's Express middleware: the cookie `__Host-sid` holds the
// session ID; each key of req.session is one attribute holding JSON, so the cart line
// `cart:<sku>` holds the quantity in decimal ASCII. Login and logout are Passport's
// `req.login` and `req.logout`, and the middleware binds the Passport user to the session's
// sessiond user_id through Regenerate (the old ID is dead after a login); the user shown is
// that user_id, so a login made by another storefront counts here too. A cookie whose
// session is gone gets 401 {"error": "session expired"} on every route and no Set-Cookie.
//
// Environment: SESSIOND_ADDR (host:port or http://host:port; default 127.0.0.1:7420),
// SESSIOND_TOKEN (a tenant's token), PORT (0 = ephemeral; default 8080),
// STOREFRONT_IDLE_TIMEOUT_SECONDS (idle timeout asked for at Create). Prints
// `listening on http://127.0.0.1:PORT` once it accepts connections; exits on SIGTERM.
//
// Run:  SESSIOND_ADDR=127.0.0.1:7420 PORT=8080 node examples/storefront-express/server.js

const express = require('express');
const passport = require('passport');
const { SessionClient, SessiondError, ResourceExhausted } = require('sessiond-client');
const { sessiond } = require('sessiond-client/express');

const CART_PREFIX = 'cart:';
const MAX_SKU_BYTES = 64;
const MAX_QTY = 1000;

/** The cart lines of a session's data, by SKU; a line that is not a whole number is skipped. */
function cartOf(data) {
  const cart = {};
  for (const key of Object.keys(data).sort()) {
    const qty = data[key];
    if (key.startsWith(CART_PREFIX) && Number.isSafeInteger(qty) && qty >= 0) {
      cart[key.slice(CART_PREFIX.length)] = qty;
    }
  }
  return cart;
}

/** `fn` as an error-first callback API, awaited. */
function promised(fn) {
  return new Promise((resolve, reject) => fn((err) => (err ? reject(err) : resolve())));
}

function createApp(client, { idleTimeoutMs } = {}) {
  const auth = new passport.Passport();
  // The Passport user is the username itself: the middleware binds it as sessiond's user_id.
  auth.serializeUser((user, done) => done(null, user));
  auth.deserializeUser((user, done) => done(null, user));

  const app = express();
  app.disable('x-powered-by');
  app.use(express.json());
  app.use(sessiond({ client, idleTimeout: idleTimeoutMs }));
  app.use(auth.initialize());
  app.use(auth.session());

  // A cookie whose session is gone: 401, and the cookie is left alone (a newer one may have
  // replaced it in the browser already).
  app.use((req, res, next) => {
    if (req.sessiond.gone) return res.status(401).json({ error: 'session expired' });
    next();
  });

  app.post('/cart/items', async (req, res) => {
    const { sku, qty } = req.body && typeof req.body === 'object' ? req.body : {};
    if (
      typeof sku !== 'string' ||
      Buffer.byteLength(sku, 'utf8') < 1 ||
      Buffer.byteLength(sku, 'utf8') > MAX_SKU_BYTES ||
      !Number.isInteger(qty) ||
      qty < 1 ||
      qty > MAX_QTY
    ) {
      return res.status(400).json({ error: `sku must be 1-${MAX_SKU_BYTES} bytes and qty 1-${MAX_QTY}` });
    }
    const key = CART_PREFIX + sku;
    // Compare-and-set on the line, again on conflict: concurrent adds are never lost.
    const written = await req.session.modify((data) => {
      const have = Number.isSafeInteger(data[key]) && data[key] >= 0 ? data[key] : 0;
      return { [key]: have + qty };
    });
    res.json({ cart: cartOf(written) });
  });

  app.get('/cart', (req, res) => {
    res.json({ cart: cartOf(req.session), user: req.sessiond.userId });
  });

  app.post('/login', async (req, res) => {
    const user = req.body && typeof req.body === 'object' ? req.body.user : undefined;
    if (typeof user !== 'string' || !user) return res.status(400).json({ error: 'user must not be empty' });
    // Passport regenerates the session (the old ID dead), keeps the cart (keepSessionInfo),
    // and saves: the middleware binds the new ID to `user` there.
    await promised((done) => req.login(user, { keepSessionInfo: true }, done));
    res.json({ user: req.sessiond.userId, cart: cartOf(req.session) });
  });

  app.post('/logout', async (req, res) => {
    if (req.sessionID) {
      await promised((done) => req.logout(done));
      await req.session.destroy();
    }
    res.json({ ok: true });
  });

  app.post('/logout-all', async (req, res) => {
    const destroyed = await req.sessiond.destroyAllForUser();
    if (destroyed === null) return res.status(401).json({ error: 'not logged in' });
    res.json({ destroyed });
  });

  app.get('/devices', async (req, res) => {
    const user = req.sessiond.userId;
    if (user === null) return res.status(401).json({ error: 'not logged in' });
    const sessions = await client.listUserSessions(user);
    res.json({
      devices: sessions.map((s) => ({
        ip: s.clientIp,
        user_agent: s.clientUserAgent,
        last_seen: s.lastAccessAt ? s.lastAccessAt.getTime() : null,
        current: s.id === req.sessionID,
      })),
    });
  });

  // As the other storefronts: a sessiond limit is 429 with its message, anything else 503.
  app.use((err, req, res, next) => {
    if (res.headersSent) return next(err);
    if (err instanceof ResourceExhausted) return res.status(429).json({ error: err.details });
    if (err instanceof SessiondError) {
      console.warn(`sessiond call failed: ${err.message}`);
      return res.status(503).json({ error: 'session store unavailable' });
    }
    if (err.type === 'entity.parse.failed') return res.status(400).json({ error: 'expected a JSON object' });
    console.error(err);
    res.status(500).json({ error: 'internal error' });
  });

  return app;
}

function main() {
  const env = (name) => process.env[name] || null; // empty = unset
  const addr = env('SESSIOND_ADDR') || '127.0.0.1:7420';
  const port = Number(env('PORT') || '8080');
  const idle = env('STOREFRONT_IDLE_TIMEOUT_SECONDS');
  const idleSeconds = idle === null ? null : Number(idle);
  if (idleSeconds !== null && !(idleSeconds > 0)) {
    console.error('STOREFRONT_IDLE_TIMEOUT_SECONDS must be positive');
    process.exit(2);
  }
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    console.error('PORT must be a port number (0 = ephemeral)');
    process.exit(2);
  }
  let client;
  try {
    client = new SessionClient(addr, { token: env('SESSIOND_TOKEN') });
  } catch (err) {
    console.error(`SESSIOND_ADDR or SESSIOND_TOKEN: ${err.details || err.message}`);
    process.exit(2);
  }
  const app = createApp(client, { idleTimeoutMs: idleSeconds === null ? undefined : idleSeconds * 1000 });
  const server = app.listen(port, '127.0.0.1', () => {
    process.stdout.write(`listening on http://127.0.0.1:${server.address().port}\n`);
  });
  const stop = () => {
    server.close(() => {
      client.close();
      process.exit(0);
    });
    server.closeAllConnections();
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

if (require.main === module) main();

module.exports = { createApp, cartOf };
