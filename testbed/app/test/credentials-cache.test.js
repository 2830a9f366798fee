'use strict';
// The credentials cache file the real service keeps (seed review 2.2):
// <app root>/.baileys-cache.json, {companyId: {creds, keys, timestamp}},
// plain JSON.stringify, atomically (temp file + rename), mode 0600.
// baileys-dr's health reads it and a failover moves it aside. The service
// writing it after a load from PostgreSQL: test/postgres.test.js.

const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');

const { CACHE_FILE, saveCredentialsCache } = require('../src/credentials-cache');
const { tmpdir } = require('./lib/helpers');

test('the cache is written whole, as JSON.stringify gives the creds, mode 0600 whatever the umask, no temp file left', async () => {
  const root = tmpdir();
  const creds = { registrationId: 4711, signedIdentityKey: { public: { type: 'Buffer', data: [1, 2, 3] } }, me: { id: '4915550000:1@s.whatsapp.net' } };
  const previous = process.umask(0);
  let file;
  try {
    file = await saveCredentialsCache(root, new Map([['acme', creds]]), 1765000000000);
  } finally {
    process.umask(previous);
  }
  assert.equal(file, path.join(root, CACHE_FILE));
  assert.equal(fs.statSync(file).mode & 0o777, 0o600);
  assert.deepEqual(JSON.parse(fs.readFileSync(file, 'utf8')), { acme: { creds, keys: { _isCached: true }, timestamp: 1765000000000 } });
  assert.deepEqual(fs.readdirSync(root), [CACHE_FILE]);
  await saveCredentialsCache(root, new Map([['bravo', creds]]));
  assert.deepEqual(Object.keys(JSON.parse(fs.readFileSync(file, 'utf8'))), ['bravo'], 'replaced, not merged');
});
