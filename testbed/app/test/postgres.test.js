'use strict';
// The service on a real throwaway PostgreSQL (testbed/pgcluster.py):
// POST /simulate writes as the application does, in one transaction, and
// answers exactly as the file store does for the same state; /health shows
// each company's identity; a stop (SIGTERM) finishes the request it has
// taken and refuses the others; each load writes the credentials cache file
// (.baileys-cache.json). Needs node_modules and the PostgreSQL server
// binaries (skipped, saying so, without them).

const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const { spawn } = require('node:child_process');

const log = require('../src/log');
const { credsLine, keyLine, lineSha256, stateDigest } = require('../src/digest');
const { APP_DIR, FILES_ENV, depsOption, tmpdir, configFor, postgresEnv, until, waitReady, post, freePort } = require('./lib/helpers');
const { startCluster, connect, pgEnvVars, fixture } = require('./lib/pg');

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

/** Skips the running test when there is no cluster; else returns a fresh database. */
async function database(t, label) {
  if (skipReason) {
    t.skip(skipReason);
    return null;
  }
  return cluster.database(label);
}

/** Starts the service in this process: {service, base}. */
async function startService(config) {
  const { createService } = require('../src/index');
  const service = createService({ config });
  const port = await service.start();
  return { service, base: `http://127.0.0.1:${port}` };
}

function subdir(root, name) {
  const dir = path.join(root, name);
  fs.mkdirSync(dir, { recursive: true });
  return dir;
}

/** What PostgreSQL holds for a company, read independently of the service: rows, creds and their digest. */
async function dbState(client, company) {
  const auth = await client.query('SELECT creds, creds::text AS text FROM whatsapp_auth WHERE company_id = $1', [company]);
  const { rows } = await client.query(
    `SELECT key_type, key_id, value, value::text AS text, EXTRACT(EPOCH FROM expires_at - now()) / 86400 AS ttl_days
       FROM whatsapp_keys WHERE company_id = $1 ORDER BY key_type COLLATE "C", key_id COLLATE "C"`, [company]);
  const creds = auth.rows[0].creds;
  return {
    creds,
    credsText: auth.rows[0].text,
    rows,
    row: (type, id) => rows.find((r) => r.key_type === type && r.key_id === id),
    digest: stateDigest(creds, rows.map((r) => ({ type: r.key_type, id: r.key_id, value: r.value }))),
    snapshot: JSON.stringify([auth.rows[0].text, rows.map((r) => [r.key_type, r.key_id, r.text])]),
  };
}

/** Every acknowledged write of an answer is in the store with its value; the answer's hashes and digest are the store's. */
function assertAnswerHeld(state, body) {
  for (const w of body.written) {
    const row = state.row(w.type, w.id);
    assert.ok(row, `${w.type} ${w.id} is stored`);
    assert.equal(lineSha256(keyLine(w.type, w.id, row.value)), w.line_sha256, `line of ${w.type} ${w.id}`);
  }
  for (const d of body.deleted) assert.equal(state.row(d.type, d.id), undefined, `${d.type} ${d.id} is deleted`);
  assert.equal(lineSha256(credsLine(state.creds)), body.creds_sha256);
  assert.equal(state.digest, body.digest);
}

test('postgres and files answer /simulate alike for the same state: ids, line hashes, creds hash and digest', { ...needDeps }, async (t) => {
  const db = await database(t, 'alike');
  if (!db) return;
  await fixture(db, ['seed-pg', '--companies', '2', '--keys', '30', '--prefix', 'e']);
  const root = tmpdir();
  const sessions = path.join(root, 'files', 'baileys_sessions');
  await fixture(db, ['pg-to-files', '--dest', sessions]);
  const onPg = await startService(configFor(subdir(root, 'pg'), postgresEnv(db)));
  const onFiles = await startService(configFor(subdir(root, 'files'), FILES_ENV, { sessionsDir: sessions }));
  const client = await connect(db);
  try {
    const [pgBefore, filesBefore] = [(await waitReady(onPg.base)).health, (await waitReady(onFiles.base)).health];
    assert.equal(pgBefore.store, 'postgres');
    assert.equal(filesBefore.store, 'files');
    assert.deepEqual({ ...pgBefore.digests }, { ...filesBefore.digests }, 'the same state on both stores');

    const requests = [
      { company: 'e1', newKeys: 7, consumePreKeys: 2, seed: 'outage-1' },
      { company: 'e1', seed: 'outage-2' },
      { company: 'e2', newKeys: 11, consumePreKeys: 3, touchCreds: false, seed: 'outage-1' },
      { company: 'e2', newKeys: 0, consumePreKeys: 0, touchCreds: false },
    ];
    for (const request of requests) {
      const a = await post(onPg.base, request);
      const b = await post(onFiles.base, request);
      assert.equal(a.status, 200, JSON.stringify(a.body));
      assert.equal(b.status, 200, JSON.stringify(b.body));
      assert.deepEqual(Object.keys(a.body).sort(), ['company', 'creds_changed', 'creds_sha256', 'deleted', 'digest', 'written']);
      assert.deepEqual(a.body, b.body, `same answer for ${JSON.stringify(request)}`);
      for (const w of a.body.written) assert.match(w.line_sha256, /^[0-9a-f]{64}$/);
      assertAnswerHeld(await dbState(client, request.company), a.body);
    }
    const [pgAfter, filesAfter] = await Promise.all([onPg.base, onFiles.base].map(async (base) => (await fetch(`${base}/health`)).json()));
    assert.deepEqual({ ...pgAfter.digests }, { ...filesAfter.digests });
    assert.deepEqual({ ...pgAfter.keys }, { ...filesAfter.keys });
    assert.equal(pgAfter.keys.e1, pgBefore.keys.e1 + 7 + 3 - 2 - 1);
    assert.equal(pgAfter.ready, true);
  } finally {
    await client.end();
    await onPg.service.stop('test');
    await onFiles.service.stop('test');
  }
});

/**
 * Runs body({base, client, before}) against the service in this process on a
 * new database of `companies` seeded companies (prefix), once ready; before
 * is its /health then, client a connection of the test's own.
 */
async function withPostgresService(t, label, companies, prefix, body) {
  const db = await database(t, label);
  if (!db) return;
  await fixture(db, ['seed-pg', '--companies', String(companies), '--keys', '30', '--prefix', prefix]);
  const { service, base } = await startService(configFor(tmpdir(), postgresEnv(db)));
  const client = await connect(db);
  try {
    const { status, health: before } = await waitReady(base);
    assert.equal(status, 200, JSON.stringify(before.errors));
    await body({ base, client, before });
  } finally {
    await client.end();
    await service.stop('test');
  }
}

test('postgres: /simulate writes as the application does and /health follows without a reload', { ...needDeps }, async (t) => {
  await withPostgresService(t, 'form', 2, 'w', async ({ base, client, before }) => {
    const was = await dbState(client, 'w1');
    const other = await dbState(client, 'w2');
    assert.equal(before.digests.w1, was.digest);

    const res = await post(base, { company: 'w1', newKeys: 5, consumePreKeys: 2, seed: 'form' });
    assert.equal(res.status, 200, JSON.stringify(res.body));
    const body = res.body;
    const now = await dbState(client, 'w1');
    assertAnswerHeld(now, body);
    assert.equal(now.rows.length, was.rows.length + 5 - 2);

    // the values: plain JSON.stringify of Baileys' values, byte-array Buffers; expires_at by type
    const byType = (type) => body.written.filter((w) => w.type === type);
    assert.deepEqual(body.written.map((w) => w.type), ['session', 'sender-key', 'app-state-sync-key', 'pre-key', 'sender-key-memory']);
    const preKey = now.row('pre-key', byType('pre-key')[0].id);
    assert.equal(preKey.value.private.type, 'Buffer');
    assert.ok(Array.isArray(preKey.value.private.data) && preKey.value.private.data.length === 32);
    assert.ok(Array.isArray(now.row('sender-key', byType('sender-key')[0].id).value.data), 'a Buffer value in the array form');
    assert.equal(typeof now.row('app-state-sync-key', byType('app-state-sync-key')[0].id).value.keyData, 'string', 'a proto in its JSON form');
    for (const w of body.written) {
      const days = ['session', 'sender-key', 'pre-key'].includes(w.type) ? 7 : 14;
      assert.ok(Math.abs(Number(now.row(w.type, w.id).ttl_days) - days) < 0.01, `${w.type} expires in ${days} days`);
      assert.equal(w.file, `${w.type}-${w.id.replace(/\//g, '__').replace(/:/g, '-')}.json`);
    }
    // the oldest pre-keys are gone; the creds as after an upload
    const preKeys = was.rows.filter((r) => r.key_type === 'pre-key').map((r) => Number(r.key_id)).sort((a, b) => a - b);
    assert.deepEqual(body.deleted.map((d) => d.id), preKeys.slice(0, 2).map(String));
    assert.equal(body.creds_changed, true);
    assert.equal(now.creds.nextPreKeyId, Number(byType('pre-key')[0].id) + 1);
    assert.equal(now.creds.accountSyncCounter, was.creds.accountSyncCounter + 1);
    assert.equal(now.creds.myAppStateKeyId, byType('app-state-sync-key')[0].id);
    assert.equal(now.creds.registrationId, was.creds.registrationId);
    assert.deepEqual(now.creds.noiseKey, was.creds.noiseKey);
    assert.equal((await dbState(client, 'w2')).snapshot, other.snapshot, 'another company is untouched');

    // the service's own view took the change (no reload), and a reload agrees
    const h = await (await fetch(`${base}/health`)).json();
    assert.equal(h.ready, true);
    assert.equal(h.readyAt, before.readyAt, 'no reload');
    assert.equal(h.digests.w1, body.digest);
    assert.equal(h.keys.w1, before.keys.w1 + 5 - 2);
    assert.equal(h.digests.w2, before.digests.w2);
    const reloaded = await (await fetch(`${base}/reload`, { method: 'POST' })).json();
    assert.equal(reloaded.digests.w1, body.digest);
    assert.equal(reloaded.keys.w1, h.keys.w1);

    // bad requests change nothing
    const unknown = await post(base, { company: 'nosuch' });
    assert.equal(unknown.status, 400);
    assert.match(unknown.body.error, /company nosuch does not exist/);
    const tooMany = await post(base, { company: 'w1', consumePreKeys: 999 });
    assert.equal(tooMany.status, 400);
    assert.match(tooMany.body.error, /cannot consume 999/);
    assert.equal((await dbState(client, 'w1')).snapshot, now.snapshot);
  });
});

test('postgres: a request that fails in the middle leaves nothing (one transaction)', { ...needDeps }, async (t) => {
  await withPostgresService(t, 'atomic', 1, 'r', async ({ base, client, before }) => {
    const was = await dbState(client, 'r1');
    // A real failure between the key upserts and the creds update: PostgreSQL refuses the DELETE of a consumed pre-key.
    await client.query(`CREATE FUNCTION test_refuse_delete() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN RAISE EXCEPTION 'test: deletes refused'; END $$`);
    await client.query('CREATE TRIGGER test_refuse_delete BEFORE DELETE ON whatsapp_keys FOR EACH ROW EXECUTE FUNCTION test_refuse_delete()');
    const request = { company: 'r1', newKeys: 6, consumePreKeys: 2, seed: 'atomic' };
    const failed = await post(base, request);
    assert.equal(failed.status, 500);
    assert.match(failed.body.error, /deletes refused/);
    assert.equal((await dbState(client, 'r1')).snapshot, was.snapshot, 'no new key, no deleted pre-key, the same creds');
    const h = await (await fetch(`${base}/health`)).json();
    assert.equal(h.ready, true);
    assert.equal(h.digests.r1, before.digests.r1);

    await client.query('DROP TRIGGER test_refuse_delete ON whatsapp_keys');
    const retried = await post(base, request);
    assert.equal(retried.status, 200, JSON.stringify(retried.body));
    assertAnswerHeld(await dbState(client, 'r1'), retried.body);
    assert.equal(retried.body.written.length, 6);
  });
});

test('/health shows each company\'s identity (registrationId and creds.me) on postgres and on files', { ...needDeps }, async (t) => {
  const db = await database(t, 'identity');
  if (!db) return;
  await fixture(db, ['seed-pg', '--companies', '2', '--keys', '13', '--prefix', 'i']);
  const client = await connect(db);
  const root = tmpdir();
  const sessions = path.join(root, 'files', 'baileys_sessions');
  let onPg;
  let onFiles;
  try {
    const me = '4915550001234:7@s.whatsapp.net';
    await client.query(`UPDATE whatsapp_auth SET creds = jsonb_set(creds, '{me}', $1::jsonb) WHERE company_id = 'i1'`, [JSON.stringify({ id: me, name: 'Test' })]);
    const { rows } = await client.query("SELECT company_id, (creds->>'registrationId')::int AS rid FROM whatsapp_auth ORDER BY 1");
    const rid = Object.fromEntries(rows.map((r) => [r.company_id, r.rid]));
    const expected = { i1: { registrationId: rid.i1, me }, i2: { registrationId: rid.i2, me: null } };
    await fixture(db, ['pg-to-files', '--dest', sessions]);
    onPg = await startService(configFor(subdir(root, 'pg'), postgresEnv(db)));
    onFiles = await startService(configFor(subdir(root, 'files'), FILES_ENV, { sessionsDir: sessions }));
    for (const { base } of [onPg, onFiles]) {
      const { status, health } = await waitReady(base);
      assert.equal(status, 200);
      assert.deepEqual({ ...health.identities }, expected, health.store);
      assert.deepEqual({ ...health.registrationIds }, rid, 'registrationIds are kept as they were');
    }
    // a change keeps the identity
    assert.equal((await post(onPg.base, { company: 'i1' })).status, 200);
    assert.deepEqual((await (await fetch(`${onPg.base}/health`)).json()).identities.i1, expected.i1);
  } finally {
    await client.end();
    if (onPg) await onPg.service.stop('test');
    if (onFiles) await onFiles.service.stop('test');
  }
});

/** The service as its own process (node src/index.js), configured by the environment: {child, base, events, exited}. */
async function spawnService(db) {
  const port = await freePort();
  const child = spawn(process.execPath, [path.join(APP_DIR, 'src', 'index.js')], {
    cwd: APP_DIR,
    env: {
      ...process.env,
      ...pgEnvVars(db),
      USE_LEGACY_SUPABASE: 'false',
      USE_DATABASE_AUTH_STATE: 'true',
      USE_REPOSITORY_PATTERN: 'true',
      HEALTH_PORT: String(port),
      SESSIONS_DIR: tmpdir(),
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const events = [];
  let partial = '';
  child.stdout.on('data', (chunk) => {
    const lines = (partial + chunk.toString('utf8')).split('\n');
    partial = lines.pop();
    for (const line of lines) {
      try {
        events.push(JSON.parse(line));
      } catch {
        events.push({ event: 'unparsed', line });
      }
    }
  });
  let stderr = '';
  child.stderr.on('data', (chunk) => {
    stderr += chunk;
  });
  const exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal, stderr })));
  const base = `http://127.0.0.1:${port}`;
  await until('the service to listen', async () => fetch(`${base}/health`).then(() => true, () => false), 30000);
  return { child, base, events, exited };
}

/** How many of the service's connections wait on a lock (pg_stat_activity, from a connection outside any transaction). */
async function waitingOnLock(client) {
  const { rows } = await client.query(
    "SELECT count(*)::int AS n FROM pg_stat_activity WHERE application_name = 'baileys-whatsapp-service' AND wait_event_type = 'Lock'");
  return rows[0].n;
}

/**
 * Runs body({app, watcher, blockRequest}) against the service as its own
 * process on a new database of `companies` seeded companies (prefix), ready.
 * blockRequest(request) posts it once the lowest pre-key of its company is
 * locked by another transaction, and resolves when the request waits on that
 * lock: mid-transaction, its new keys written. The lock is held until
 * release() (or the end).
 */
async function withStoppableService(t, label, companies, prefix, body) {
  const db = await database(t, label);
  if (!db) return;
  await fixture(db, ['seed-pg', '--companies', String(companies), '--keys', '20', '--prefix', prefix]);
  const app = await spawnService(db);
  const locker = await connect(db);
  const watcher = await connect(db);
  const blockRequest = async (request) => {
    const { rows } = await locker.query(
      "SELECT key_id FROM whatsapp_keys WHERE company_id = $1 AND key_type = 'pre-key' ORDER BY key_id::bigint LIMIT 1", [request.company]);
    await locker.query('BEGIN');
    await locker.query("SELECT 1 FROM whatsapp_keys WHERE company_id = $1 AND key_type = 'pre-key' AND key_id = $2 FOR UPDATE", [request.company, rows[0].key_id]);
    const answer = post(app.base, request);
    answer.catch(() => {}); // awaited by the test, if at all
    await until('the request to wait on the locked pre-key', async () => (await waitingOnLock(watcher)) === 1);
    return { answer, release: () => locker.query('ROLLBACK') };
  };
  try {
    assert.equal((await waitReady(app.base)).status, 200);
    await body({ app, watcher, blockRequest });
  } finally {
    app.child.kill('SIGKILL');
    await locker.end().catch(() => {});
    await watcher.end();
  }
}

test('stop (SIGTERM): the request in flight commits and is answered, a queued one gets 503, the process exits 0', { ...needDeps }, async (t) => {
  await withStoppableService(t, 'stop', 2, 'g', async ({ app, watcher, blockRequest }) => {
    const g2 = await dbState(watcher, 'g2');
    const inFlight = await blockRequest({ company: 'g1', newKeys: 5, consumePreKeys: 1, seed: 'in-flight' });
    const queued = post(app.base, { company: 'g2', seed: 'queued' });
    await until('the second request to be taken', async () => app.events.filter((e) => e.event === 'simulate_requested').length === 2);

    const stoppedAt = Date.now();
    app.child.kill('SIGTERM');
    const refused = await queued;
    assert.equal(refused.status, 503);
    assert.match(refused.body.error, /stopping/);
    const late = await post(app.base, { company: 'g2', seed: 'late' }).then((r) => r.status, () => 'connection refused');
    assert.ok(late === 503 || late === 'connection refused', `a request after the stop is not taken (${late})`);

    await inFlight.release();
    const answered = await inFlight.answer;
    assert.equal(answered.status, 200, JSON.stringify(answered.body));
    const { code, signal, stderr } = await app.exited;
    assert.equal(code, 0, `exit code (signal ${signal}, stderr ${stderr})`);
    assert.ok(Date.now() - stoppedAt < 9000, 'well inside PM2\'s kill_timeout');
    assertAnswerHeld(await dbState(watcher, 'g1'), answered.body);
    assert.equal((await dbState(watcher, 'g2')).snapshot, g2.snapshot, 'nothing of the refused requests');
    const stopped = app.events.find((e) => e.event === 'service_stopped');
    assert.ok(stopped && stopped.drained === true, JSON.stringify(stopped));
  });
});

test('stop (SIGTERM): a request still blocked past the drain time is not answered and leaves nothing', { ...needDeps }, async (t) => {
  await withStoppableService(t, 'drain', 1, 'h', async ({ app, watcher, blockRequest }) => {
    const was = await dbState(watcher, 'h1');
    const inFlight = await blockRequest({ company: 'h1', newKeys: 5, consumePreKeys: 1, seed: 'cut' });
    const stoppedAt = Date.now();
    app.child.kill('SIGTERM');
    const { code } = await app.exited;
    assert.equal(code, 0);
    assert.ok(Date.now() - stoppedAt < 9500, 'the stop is bounded, inside PM2\'s kill_timeout');
    assert.notEqual(await inFlight.answer.then((r) => r.status, () => 'no answer'), 200, 'not acknowledged');
    await inFlight.release();
    // the server ends the orphaned transaction once it runs again: rolled back as a whole
    await until('the service\'s connections to end', async () => {
      const { rows } = await watcher.query("SELECT count(*)::int AS n FROM pg_stat_activity WHERE application_name = 'baileys-whatsapp-service'");
      return rows[0].n === 0;
    });
    assert.equal((await dbState(watcher, 'h1')).snapshot, was.snapshot, 'none of its new keys, its pre-key still there');
    assert.equal(app.events.find((e) => e.event === 'service_stopped').drained, false);
  });
});

test('the service on PostgreSQL writes every loaded company\'s creds into the cache after it is ready', { ...needDeps }, async (t) => {
  const db = await database(t, 'cache');
  if (!db) return;
  await fixture(db, ['seed-pg', '--companies', '2', '--keys', '10', '--prefix', 'cache']);
  const root = tmpdir();
  const { service, base } = await startService(configFor(root, postgresEnv(db)));
  const client = await connect(db);
  try {
    const { status } = await waitReady(base);
    assert.equal(status, 200);
    const file = path.join(root, '.baileys-cache.json');
    const cache = await until('the credentials cache (src/credentials-cache.js)', () => fs.existsSync(file) && JSON.parse(fs.readFileSync(file, 'utf8')));
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
