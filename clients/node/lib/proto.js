'use strict';
// The API's messages as this client hands them around: loads proto/ with proto-loader, and
// turns sessiond's messages into plain objects (Dates, milliseconds, Numbers) and back.

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

/** The client's own copy of proto/sessiond/v1/session_store.proto (a test keeps it equal). */
const PROTO_DIR = path.join(__dirname, '..', 'proto');

const definition = protoLoader.loadSync('sessiond/v1/session_store.proto', {
  includeDirs: [PROTO_DIR],
  keepCase: false,
  longs: String,
  enums: Number,
  defaults: true,
  oneofs: true,
});

/** The generated client constructor for sessiond.v1.SessionStore. */
const SessionStore = grpc.loadPackageDefinition(definition).sessiond.v1.SessionStore;

function toDate(ts) {
  if (!ts) return null;
  return new Date(Number(ts.seconds) * 1000 + Math.floor((ts.nanos || 0) / 1e6));
}

function toMs(duration) {
  if (!duration) return null;
  return Number(duration.seconds) * 1000 + Math.floor((duration.nanos || 0) / 1e6);
}

/** A protobuf Duration for a positive number of milliseconds. */
function duration(ms, name) {
  if (!Number.isFinite(ms) || ms <= 0) {
    throw new TypeError(`${name} must be a positive number of milliseconds`);
  }
  const seconds = Math.floor(ms / 1000);
  return { seconds: String(seconds), nanos: Math.round((ms - seconds * 1000) * 1e6) };
}

/** Attribute values go out as bytes: a Buffer or Uint8Array as is, a string as UTF-8. */
function attributes(map, name) {
  const out = {};
  for (const [key, value] of Object.entries(map || {})) {
    if (typeof value === 'string') out[key] = Buffer.from(value, 'utf8');
    else if (value instanceof Uint8Array) out[key] = Buffer.from(value);
    else throw new TypeError(`${name}[${JSON.stringify(key)}] must be a string or a Buffer`);
  }
  return out;
}

/** A Session message as the client returns it. */
function session(s) {
  return {
    id: s.id,
    userId: s.userId,
    attributes: { ...s.attributes },
    version: Number(s.version),
    createdAt: toDate(s.createdAt),
    lastAccessAt: toDate(s.lastAccessAt),
    expiresAt: toDate(s.expiresAt),
    absoluteExpiresAt: toDate(s.absoluteExpiresAt),
    idleTimeout: toMs(s.idleTimeout),
    clientIp: s.client ? s.client.ip : '',
    clientUserAgent: s.client ? s.client.userAgent : '',
  };
}

module.exports = { SessionStore, PROTO_DIR, duration, attributes, session, toDate };
