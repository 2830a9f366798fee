'use strict';
// The credentials cache file the real service keeps (seed review 2.2):
// written after each load from PostgreSQL as <app root>/.baileys-cache.json,
// {companyId: {creds, keys, timestamp}}, plain JSON.stringify, atomically
// (temp file + rename), mode 0600. baileys-dr's health reads it and a
// failover moves it aside. Needs node_modules and PostgreSQL for the service
// test (skipped, saying so, without them).

const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');

const log = require('../src/log');
const { CACHE_FILE, saveCredentialsCache } = require('../src/credentials-cache');
const { depsOption, tmpdir, configFor, postgresEnv, until, waitReady } = require('./lib/helpers');
const { startCluster, connect, fixture } = require('./lib/pg');

for (const level of ['info', 'warn', 'error']) log[level] = () => {};

const needDeps = depsOption();
let cluster = null;
let skipReason = needDeps.skip || null;

test.before(async () => {
  if (skipReason) return;
  const started = await startCluster();
  if (started.skip) skipReason = started.skip;
  else cluster = started;
});
test.after(async () => {
  if (cluster) await cluster.destroy();
});

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

test('the service on PostgreSQL writes every loaded company\'s creds into the cache after it is ready', { ...needDeps }, async (t) => {
  if (skipReason) return t.skip(skipReason);
  const db = await cluster.database('cache');
  await fixture(db, ['seed-pg', '--companies', '2', '--keys', '10', '--prefix', 'cache']);
  const root = tmpdir();
  const { createService } = require('../src/index');
  const service = createService({ config: configFor(root, postgresEnv(db)) });
  const port = await service.start();
  const client = await connect(db);
  try {
    const { status } = await waitReady(`http://127.0.0.1:${port}`);
    assert.equal(status, 200);
    const file = path.join(root, CACHE_FILE);
    const cache = await until('the credentials cache', () => fs.existsSync(file) && JSON.parse(fs.readFileSync(file, 'utf8')));
    const { rows } = await client.query('SELECT company_id, creds FROM whatsapp_auth ORDER BY 1');
    assert.deepEqual(Object.keys(cache).sort(), rows.map((r) => r.company_id));
    for (const row of rows) {
      assert.deepEqual(cache[row.company_id].creds, row.creds, 'the creds as PostgreSQL holds them (byte-array Buffers)');
      assert.ok(Number.isInteger(cache[row.company_id].timestamp));
    }
    assert.equal(fs.statSync(file).mode & 0o777, 0o600);
  } finally {
    await client.end();
    await service.stop('test');
  }
});
