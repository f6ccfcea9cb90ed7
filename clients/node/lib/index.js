'use strict';
// sessiond-client: the client (SessionClient) and its typed errors. The Express middleware
// is the `sessiond-client/express` entry point.

const { SessionClient } = require('./client');
const errors = require('./errors');

module.exports = {
  SessionClient,
  SessiondError: errors.SessiondError,
  NotFound: errors.NotFound,
  Conflict: errors.Conflict,
  InvalidArgument: errors.InvalidArgument,
  ResourceExhausted: errors.ResourceExhausted,
  Unauthenticated: errors.Unauthenticated,
  Unavailable: errors.Unavailable,
  Code: errors.Code,
  CURRENT_VERSION_HEADER: errors.CURRENT_VERSION_HEADER,
};
