// Types for sessiond-client/express: the middleware, `req.session`, `req.sessionID` and
// `req.sessiond`, merged into Express's Request as @types/express-session does.

import type { RequestHandler } from 'express';
import type { SessionClient, ClientOptions, Session as StoredSession } from './index';

/**
 * The data of a session: declare your keys here, as with @types/express-session.
 *
 *     declare module 'sessiond-client/express' {
 *       interface SessionData { cart: Record<string, number> }
 *     }
 */
export interface SessionData {}

export interface CookieOptions {
  /** Milliseconds until the cookie expires; null (default): a browser-session cookie. */
  maxAge?: number | null;
  /** Default true. */
  secure?: boolean;
  /** Default true. */
  httpOnly?: boolean;
  /** Default 'lax'. */
  sameSite?: boolean | 'lax' | 'strict' | 'none';
  /** Default none (a `__Host-` cookie must have none). */
  domain?: string;
  /** Default '/'. */
  path?: string;
  /** Default false. */
  partitioned?: boolean;
}

export class Cookie {
  maxAge: number | null;
  expires: Date | null;
  readonly originalMaxAge: number | null;
  secure: boolean;
  httpOnly: boolean;
  sameSite: boolean | 'lax' | 'strict' | 'none';
  domain: string | undefined;
  path: string;
  partitioned: boolean;
  resetMaxAge(): void;
  serialize(name: string, value: string): string;
}

type Callback = (err?: any) => void;

export class Session {
  /** The sessiond ID ('' until the session exists in sessiond). */
  readonly id: string;
  /** Not stored: built from the options on each request. */
  cookie: Cookie;
  /** A fresh ID with no data (Regenerate); the old ID is dead. Without a callback, a promise. */
  regenerate(callback: Callback): void;
  regenerate(): Promise<void>;
  /** Ends the session (Destroy); `req.session` is unset and the cookie cleared. */
  destroy(callback: Callback): void;
  destroy(): Promise<void>;
  /** Writes the changed keys now, and binds the user if `userOf`'s answer changed. */
  save(callback: Callback): void;
  save(): Promise<void>;
  /** Reads the session again, dropping unsaved changes. */
  reload(callback: Callback): void;
  reload(): Promise<void>;
  /** Starts the cookie's maxAge over. */
  touch(): this;
  resetMaxAge(): this;
  /**
   * Compare-and-set on the stored data: `fn` gets the data as sessiond has it and returns
   * the keys to set (`undefined` removes one); retried on conflict.
   */
  modify(fn: (data: Partial<SessionData>) => Partial<SessionData> | Promise<Partial<SessionData>>): Promise<Partial<SessionData>>;
}

/** What sessiond says about the request's session, beyond express-session's API. */
export interface SessiondHandle {
  readonly client: SessionClient;
  /** The cookie named a session sessiond does not have (expired, ended): answer 401. */
  readonly gone: boolean;
  /** The user sessiond has the session bound to, or null. */
  readonly userId: string | null;
  /** The session as sessiond last answered, or null. */
  readonly remote: StoredSession | null;
  /** Ends every session of the bound user, this one included; how many, or null when none is bound. */
  destroyAllForUser(): Promise<number | null>;
}

export interface SessiondOptions {
  /** A client to use; or `address` (and `clientOptions`) to make one. */
  client?: SessionClient;
  address?: string;
  clientOptions?: ClientOptions;
  /** The cookie's name (default '__Host-sid'). */
  name?: string;
  cookie?: CookieOptions;
  /** Send the cookie on every response (default false). */
  rolling?: boolean;
  /** Store new sessions even when nothing was set (default false). */
  saveUninitialized?: boolean;
  /** Idle timeout of new sessions, ms (default: cookie.maxAge capped at 7 days, else the server's). */
  idleTimeout?: number;
  /** Absolute timeout of new sessions, ms (default: the server's). */
  absoluteTimeout?: number;
  /** The sessiond user of a session, or null (default: Passport's `passport.user` when a string or number). */
  userOf?: (session: Session & Partial<SessionData>) => string | number | null | undefined;
  /** Refused: sessiond stores the sessions. */
  store?: never;
  /** Refused: sessiond makes the IDs. */
  genid?: never;
  /** Ignored (IDs are unguessable server-generated values, not signed). */
  secret?: string | string[];
  /** Ignored: only changed keys are written. */
  resave?: boolean;
}

export interface SessiondMiddleware extends RequestHandler {
  client: SessionClient;
}

export function sessiond(options?: SessiondOptions): SessiondMiddleware;

/** The default `userOf`. */
export function passportUser(session: Partial<SessionData>): string | null;

export declare const DEFAULT_NAME: '__Host-sid';

declare global {
  namespace Express {
    interface Request {
      session: Session & Partial<SessionData>;
      /** '' until the session exists in sessiond. */
      sessionID: string;
      sessiond: SessiondHandle;
    }
  }
}
