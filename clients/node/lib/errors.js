'use strict';
// Typed errors for sessiond's gRPC status codes, the same classes as the Rust and Python
// clients: NotFound, Conflict (with the session's current version), InvalidArgument,
// ResourceExhausted, Unauthenticated, Unavailable; any other code is a plain SessiondError.

const { status: Code } = require('@grpc/grpc-js');

/** Response metadata of an ABORTED version mismatch: the session's version, ASCII decimal. */
const CURRENT_VERSION_HEADER = 'sessiond-current-version';

/** The HTTP status an Express error handler (finalhandler) answers for a failed call. */
const HTTP_STATUS_UNAVAILABLE = 503;
const HTTP_STATUS_TOO_MANY = 429;

const NAMES = Object.fromEntries(Object.entries(Code).map(([name, n]) => [n, name]));

class SessiondError extends Error {
  constructor(message, code = Code.UNKNOWN) {
    super(message ? `${NAMES[code] || code}: ${message}` : NAMES[code] || String(code));
    this.name = new.target.name;
    /** The gRPC status code (a number, as `@grpc/grpc-js`'s `status`). */
    this.code = code;
    /** The server's message, which never holds a session ID. */
    this.details = message;
    // Express's final handler answers err.status: a failed store is 503 (a limit 429).
    this.status = HTTP_STATUS_UNAVAILABLE;
  }
}

class NotFound extends SessiondError {
  constructor(message) {
    super(message, Code.NOT_FOUND);
  }
}

const AT = /session is at (\d+)/;

class Conflict extends SessiondError {
  /**
   * `currentVersion`: the session's version now, from the `sessiond-current-version`
   * metadata (unary) or the Pipeline error's `current_version`, else from the message;
   * null if none says it. Also ABORTED for a request whose idempotency key is in use.
   */
  constructor(message, currentVersion = null) {
    super(message, Code.ABORTED);
    if (currentVersion == null) {
      const m = AT.exec(message || '');
      currentVersion = m ? Number(m[1]) : null;
    }
    this.currentVersion = currentVersion;
  }
}

class InvalidArgument extends SessiondError {
  constructor(message) {
    super(message, Code.INVALID_ARGUMENT);
  }
}

class ResourceExhausted extends SessiondError {
  constructor(message) {
    super(message, Code.RESOURCE_EXHAUSTED);
    this.status = HTTP_STATUS_TOO_MANY;
  }
}

class Unauthenticated extends SessiondError {
  constructor(message) {
    super(message, Code.UNAUTHENTICATED);
  }
}

class Unavailable extends SessiondError {
  constructor(message) {
    super(message, Code.UNAVAILABLE);
  }
}

const BY_CODE = {
  [Code.NOT_FOUND]: NotFound,
  [Code.INVALID_ARGUMENT]: InvalidArgument,
  [Code.RESOURCE_EXHAUSTED]: ResourceExhausted,
  [Code.UNAUTHENTICATED]: Unauthenticated,
  [Code.UNAVAILABLE]: Unavailable,
};

const DECIMAL = /^[0-9]{1,20}$/;

/** The typed error for a status code and message (and a conflict's version, if known). */
function fromStatus(code, message, currentVersion = null) {
  if (code === Code.ABORTED) return new Conflict(message, currentVersion);
  const Cls = BY_CODE[code];
  return Cls ? new Cls(message) : new SessiondError(message, code);
}

/** The typed error for a failed unary call (a grpc-js ServiceError). */
function fromServiceError(err) {
  let version = null;
  if (err.code === Code.ABORTED && err.metadata) {
    const [v] = err.metadata.get(CURRENT_VERSION_HEADER);
    const text = Buffer.isBuffer(v) ? v.toString('ascii') : v;
    if (typeof text === 'string' && DECIMAL.test(text)) version = Number(text);
  }
  const e = fromStatus(err.code ?? Code.UNKNOWN, err.details ?? err.message, version);
  e.cause = err;
  return e;
}

module.exports = {
  Code,
  CURRENT_VERSION_HEADER,
  SessiondError,
  NotFound,
  Conflict,
  InvalidArgument,
  ResourceExhausted,
  Unauthenticated,
  Unavailable,
  fromStatus,
  fromServiceError,
};
