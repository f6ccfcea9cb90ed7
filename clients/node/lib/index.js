'use strict';
// sessiond-client: the client (SessionClient) and its typed errors. The Express middleware
// is the `sessiond-client/express` entry point.

const { SessionClient } = require('./client');
const {
  Code,
  CURRENT_VERSION_HEADER,
  SessiondError,
  NotFound,
  Conflict,
  InvalidArgument,
  ResourceExhausted,
  Unauthenticated,
  Unavailable,
} = require('./errors');

// Shorthand properties only, so that ESM's `import { ... } from 'sessiond-client'` sees them.
module.exports = {
  SessionClient,
  SessiondError,
  NotFound,
  Conflict,
  InvalidArgument,
  ResourceExhausted,
  Unauthenticated,
  Unavailable,
  Code,
  CURRENT_VERSION_HEADER,
};
