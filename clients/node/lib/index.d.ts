// Types for sessiond-client: the client and its typed errors.

/** A session as sessiond returns it. */
export interface Session {
  /** 43 chars of URL-safe base64; opaque. */
  id: string;
  /** The bound user; '' = anonymous. */
  userId: string;
  /** The session's data, as bytes. */
  attributes: Record<string, Buffer>;
  /** 1 at creation, +1 on every Update and Regenerate: feed it back as `expectedVersion`. */
  version: number;
  createdAt: Date | null;
  lastAccessAt: Date | null;
  /** When the session dies: min(lastAccessAt + idleTimeout, absoluteExpiresAt). */
  expiresAt: Date | null;
  absoluteExpiresAt: Date | null;
  /** Milliseconds. */
  idleTimeout: number | null;
  clientIp: string;
  clientUserAgent: string;
}

/** A value to store: a string is stored as UTF-8. */
export type AttributeValue = string | Uint8Array;

export interface ClientOptions {
  /** A tenant's bearer token, sent as `authorization: Bearer ...`. */
  token?: string | null;
  /** PEM CA to verify sessiond's certificate with; set, the connection uses TLS (as `https://` does). */
  ca?: string | Buffer | null;
  /** PEM client certificate, for mutual TLS (with `key`). */
  cert?: string | Buffer | null;
  /** PEM client key, for mutual TLS (with `cert`). */
  key?: string | Buffer | null;
  /** The name in sessiond's certificate, if not the address's host. */
  serverName?: string | null;
  /** Per-call deadline in ms, covering connecting, waiting for a place and retrying (default 5000). */
  timeout?: number;
  /** How long connecting and opening a stream may take, in ms (default 1000, or `timeout` if shorter). */
  connectTimeout?: number | null;
  /** 'pipelined' (default): calls share each connection's one Pipeline stream; 'unary': one RPC per call. */
  transport?: 'pipelined' | 'unary';
  /** Connections calls are spread over, round-robin (default 2). */
  connections?: number;
  /** The most calls in flight on one stream (default 256); more wait for a place. */
  maxInFlight?: number;
  /** First wait in ms before connecting again after a failed attempt (default 50); doubles, jittered. */
  reconnectMin?: number;
  /** Longest wait in ms between connection attempts (default 2000). */
  reconnectMax?: number;
}

export interface CreateOptions {
  /** The user to bind; '' or absent: anonymous. */
  userId?: string;
  attributes?: Record<string, AttributeValue>;
  /** Milliseconds; absent: the server's default. */
  idleTimeout?: number;
  /** Milliseconds; absent: the server's default. */
  absoluteTimeout?: number;
  ip?: string;
  userAgent?: string;
  /** Makes a retry safe (and lets the client resend it after a broken connection). */
  idempotencyKey?: string;
}

export interface UpdateOptions {
  set?: Record<string, AttributeValue>;
  remove?: Iterable<string>;
  /** Compare-and-set: applies only at this version, else Conflict. */
  expectedVersion?: number;
  idempotencyKey?: string;
}

export interface RegenerateOptions {
  /** Bind this user ('' = anonymous); absent: keep the current one. */
  userId?: string | number;
  dropAttributes?: boolean;
  idempotencyKey?: string;
}

export class SessionClient {
  /**
   * `address`: host:port, http://host:port or https://host:port, or several (an array, or
   * comma-separated): seeds tried in turn; the leader once a reply names it. Never fails
   * because sessiond is down.
   */
  constructor(address: string | string[], options?: ClientOptions);
  create(options?: CreateOptions): Promise<Session>;
  get(id: string, options?: { peek?: boolean }): Promise<Session>;
  /** Resolves with the new deadline. */
  touch(id: string): Promise<Date | null>;
  update(id: string, options?: UpdateOptions): Promise<Session>;
  regenerate(id: string, options?: RegenerateOptions): Promise<Session>;
  /** Whether a live session was destroyed. */
  destroy(id: string): Promise<boolean>;
  listUserSessions(userId: string, options?: { includeAttributes?: boolean }): Promise<Session[]>;
  /** How many sessions ended. */
  destroyUserSessions(userId: string, options?: { exceptId?: string }): Promise<number>;
  /** One result per ID, in order (unary: GetMany is not in the Pipeline). */
  getMany(ids: Iterable<string>, options?: { peek?: boolean }): Promise<Array<{ session: Session } | { error: SessiondError }>>;
  /** Ends every session of the tenant; `confirm` must be 'destroy all sessions'. How many ended. */
  destroyAllSessions(confirm: 'destroy all sessions'): Promise<number>;
  close(): void;
}

/** gRPC status codes, as @grpc/grpc-js's `status`. */
export declare const Code: {
  readonly OK: 0;
  readonly CANCELLED: 1;
  readonly UNKNOWN: 2;
  readonly INVALID_ARGUMENT: 3;
  readonly DEADLINE_EXCEEDED: 4;
  readonly NOT_FOUND: 5;
  readonly ALREADY_EXISTS: 6;
  readonly PERMISSION_DENIED: 7;
  readonly RESOURCE_EXHAUSTED: 8;
  readonly FAILED_PRECONDITION: 9;
  readonly ABORTED: 10;
  readonly OUT_OF_RANGE: 11;
  readonly UNIMPLEMENTED: 12;
  readonly INTERNAL: 13;
  readonly UNAVAILABLE: 14;
  readonly DATA_LOSS: 15;
  readonly UNAUTHENTICATED: 16;
};

export declare const CURRENT_VERSION_HEADER: 'sessiond-current-version';

/** Any failed call. */
export class SessiondError extends Error {
  constructor(message: string, code?: number);
  /** The gRPC status code. */
  code: number;
  /** The server's message (never holds a session ID). */
  details: string;
  /** The HTTP status Express answers for it: 429 for ResourceExhausted, else 503. */
  status: number;
}
/** Unknown, expired or destroyed (indistinguishable). */
export class NotFound extends SessiondError {
  constructor(message: string);
}
/** ABORTED: a compare-and-set lost (or the idempotency key is in use). */
export class Conflict extends SessiondError {
  constructor(message: string, currentVersion?: number | null);
  /** The session's version now, when the server said it. */
  currentVersion: number | null;
}
export class InvalidArgument extends SessiondError {
  constructor(message: string);
}
export class ResourceExhausted extends SessiondError {
  constructor(message: string);
}
export class Unauthenticated extends SessiondError {
  constructor(message: string);
}
export class Unavailable extends SessiondError {
  constructor(message: string);
}
