// Compiled with `tsc --noEmit` (test/tsconfig.json): the declarations describe the API, and
// req.session / req.sessionID / req.sessiond are merged into Express's Request.
import express from 'express';
import { SessionClient, Conflict, NotFound, SessiondError } from 'sessiond-client';
import { sessiond } from 'sessiond-client/express';

declare module 'sessiond-client/express' {
  interface SessionData {
    views: number;
    cart: Record<string, number>;
    passport: { user?: string };
  }
}

const client = new SessionClient('127.0.0.1:7420', { token: 't', timeout: 2000, transport: 'pipelined' });
const app = express();
app.use(
  sessiond({
    client,
    rolling: true,
    saveUninitialized: false,
    cookie: { maxAge: 60_000, sameSite: 'strict', secure: true, httpOnly: true },
    userOf: (s) => s.passport?.user ?? null,
  }),
);

app.get('/', (req, res, next) => {
  const views: number = (req.session.views ?? 0) + 1;
  req.session.views = views;
  const id: string = req.sessionID;
  const expires: Date | null = req.session.cookie.expires;
  req.session.cookie.maxAge = 1000;
  req.session.touch();
  if (req.sessiond.gone) {
    res.status(401).json({ error: 'session expired' });
    return;
  }
  req.session.save((err) => {
    if (err) return next(err);
    res.json({ views, id, expires, user: req.sessiond.userId });
  });
});

app.post('/cart', async (req, res) => {
  const written = await req.session.modify((data) => ({
    cart: { ...(data.cart ?? {}), apple: (data.cart?.apple ?? 0) + 1 },
  }));
  res.json(written.cart);
});

app.post('/logout', async (req, res) => {
  await req.session.regenerate();
  await req.session.reload();
  await req.session.destroy();
  res.json({});
});

const seeded = new SessionClient(['db1:7420', 'https://db2:7420'], { ca: Buffer.from('pem') });
void seeded;

async function direct(): Promise<void> {
  const s = await client.create({ userId: 'alice', attributes: { a: 'b' }, idleTimeout: 60_000 });
  try {
    await client.update(s.id, { set: { a: Buffer.from('c') }, remove: ['x'], expectedVersion: s.version });
  } catch (e) {
    if (e instanceof Conflict) {
      const v: number | null = e.currentVersion;
      void v;
    } else if (e instanceof NotFound || e instanceof SessiondError) {
      const code: number = e.code;
      void code;
    }
  }
  const fresh = await client.regenerate(s.id, { userId: 'alice' });
  const n: number = await client.destroyUserSessions('alice', { exceptId: fresh.id });
  const list = await client.listUserSessions('alice');
  const existed: boolean = await client.destroy(list[0].id);
  const at: Date | null = await client.touch(fresh.id);
  const many = await client.getMany([fresh.id], { peek: true });
  for (const r of many) if ('session' in r) void r.session.expiresAt;
  const all: number = await client.destroyAllSessions('destroy all sessions');
  void [n, existed, at, all];
  client.close();
}
void direct;
