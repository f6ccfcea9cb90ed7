// Both entry points import as ES modules, with named exports.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SessionClient, Conflict, NotFound, Code } from 'sessiond-client';
import { sessiond } from 'sessiond-client/express';

test('named ES module imports', () => {
  assert.equal(typeof SessionClient, 'function');
  assert.ok(new Conflict('x', 2) instanceof Error);
  assert.equal(new NotFound('x').code, Code.NOT_FOUND);
  assert.equal(typeof sessiond, 'function');
});
