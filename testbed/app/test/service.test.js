'use strict';
// The service with the file store, read by the real Baileys
// (useMultiFileAuthState): digests equal to the ones of the PostgreSQL JSON
// form, creds and key-file failures, guessed ids, the health endpoint, ready
// on creds alone with the keys verified afterwards.
// Needs node_modules (testbed/bin/install-node-deps; link it as
// testbed/app/node_modules): skipped, saying so, without it.

const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

const log = require('../src/log');

let haveDeps = true;
try {
  require.resolve('baileys');
  require.resolve('pg');
  require.resolve('dotenv');
} catch {
  haveDeps = false;
}
const MISSING = 'node_modules missing: run testbed/bin/install-node-deps --link';
if (!haveDeps && process.env.BAILEYS_DR_REQUIRE_DEPS === '1') {
  test('node_modules are installed (BAILEYS_DR_REQUIRE_DEPS=1)', () => assert.fail(MISSING));
}
const needDeps = haveDeps ? {} : { skip: MISSING };
// src/config.js needs dotenv: loaded only by the tests that may run.
const loadConfig = (...args) => require('../src/config').loadConfig(...args);

// Keep the service's JSON log lines out of the test report.
for (const level of ['info', 'warn', 'error']) log[level] = () => {};

const made = [];
function tmpdir() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bdr-app-test-'));
  made.push(dir);
  return dir;
}
test.after(() => {
  for (const dir of made) fs.rmSync(dir, { recursive: true, force: true });
});

function filesConfig(root, extra = {}) {
  fs.writeFileSync(path.join(root, '.env'), 'USE_LEGACY_SUPABASE=false\nUSE_DATABASE_AUTH_STATE=false\nUSE_REPOSITORY_PATTERN=false\n');
  const config = loadConfig({ appRoot: root, env: {} });
  config.healthPort = 0;
  return Object.assign(config, extra);
}

/** Both phases of a store, as the service runs them: {ready: [ids loaded at ready], companies, errors, warnings}. */
async function loadAll(store, config) {
  const loaded = await store.load(config);
  const out = { ready: loaded.companies.map((c) => c.id), companies: [], errors: [...loaded.errors], warnings: [...loaded.warnings] };
  try {
    out.verify = await store.verify(config, loaded, {
      onResult: (part) => {
        out.companies.push(...part.companies);
        out.errors.push(...part.errors);
        out.warnings.push(...part.warnings);
      },
    });
  } finally {
    if (loaded.close) await loaded.close();
  }
  return out;
}

/** /health once the load and its verification are over (or nothing more will happen). */
// Deadlines, not iteration counts: a loaded 2-core CI machine is far slower than a laptop.
const SETTLE_DEADLINE_MS = 60000;

async function settled(base) {
  const deadline = Date.now() + SETTLE_DEADLINE_MS;
  while (Date.now() < deadline) {
    const res = await fetch(`${base}/health`);
    const h = await res.json();
    if (!h.loading && !h.verifying && (h.verifiedAt || h.errors.length)) return { status: res.status, h };
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error('the service never settled');
}

test('store selection follows the flags exactly', () => {
  const { selectStore } = require('../src/config');
  assert.equal(selectStore(undefined, undefined), 'supabase');
  assert.equal(selectStore('true', 'true'), 'supabase');
  assert.equal(selectStore('False', 'true'), 'supabase');
  assert.equal(selectStore('false', 'true'), 'postgres');
  assert.equal(selectStore('false', 'TRUE'), 'files');
  assert.equal(selectStore('false', undefined), 'files');
  assert.equal(selectStore('false', 'false'), 'files');
});

test('.env is read at the app root; the process environment wins, even when empty', { ...needDeps }, () => {
  const root = tmpdir();
  fs.writeFileSync(path.join(root, '.env'), [
    '# comment',
    'USE_LEGACY_SUPABASE=false',
    'USE_DATABASE_AUTH_STATE="true"',
    'POSTGRES_PASSWORD=s3cret',
    'HEALTH_PORT=3999',
    'SESSIONS_DIR=sessions',
  ].join('\n'));
  const fromFile = loadConfig({ appRoot: root, env: {} });
  assert.equal(fromFile.store, 'postgres');
  assert.equal(fromFile.healthPort, 3999);
  assert.equal(fromFile.sessionsDir, path.join(root, 'sessions'));
  assert.equal(fromFile.flags.USE_DATABASE_AUTH_STATE.source, '.env');
  const stale = loadConfig({ appRoot: root, env: { USE_DATABASE_AUTH_STATE: 'false', USE_LEGACY_SUPABASE: '' } });
  assert.equal(stale.store, 'supabase');
  assert.equal(stale.flags.USE_LEGACY_SUPABASE.source, 'environment');
  const fresh = loadConfig({ appRoot: tmpdir(), env: {} });
  assert.equal(fresh.store, 'supabase');
  assert.equal(fresh.healthPort, 3011);
  const { publicConfig } = require('../src/config');
  assert.ok(!JSON.stringify(publicConfig(fromFile)).includes('s3cret'));
});

test('file store: Baileys reads back what Baileys wrote; digests equal the PostgreSQL JSON form', { ...needDeps }, async () => {
  const baileys = await require('../src/baileys').loadBaileys();
  const { makeKeys, asStoredJson, genFiles } = require('../tools/fixture');
  const { stateDigest } = require('../src/digest');
  const files = require('../src/stores/files');
  const root = tmpdir();
  const sessions = path.join(root, 'baileys_sessions');

  // company A through Baileys' own writer (keys.set, saveCreds)
  const dir = path.join(sessions, 'company_A');
  const { state, saveCreds } = await baileys.useMultiFileAuthState(dir);
  await saveCreds();
  const keys = makeKeys(baileys, 'A', 30);
  const data = {};
  for (const k of keys) (data[k.type] = data[k.type] || {})[k.id] = k.value;
  await state.keys.set(data);
  const expectA = stateDigest(JSON.parse(asStoredJson(state.creds)), keys.map((k) => ({ type: k.type, id: k.id, value: JSON.parse(asStoredJson(k.value)) })));

  // companies co1..co3 written directly, with a manifest
  const gen = await genFiles({ dest: sessions, companies: 3, keys: 25, prefix: 'co', manifest: true });
  const result = await loadAll(files, filesConfig(root, { sessionsDir: sessions }));
  assert.deepEqual(result.errors, []);
  const got = Object.fromEntries(result.companies.map((c) => [c.id, c.digest]));
  assert.equal(got.A, expectA);
  for (const [id, digest] of Object.entries(gen.digests)) assert.equal(got[id], digest, id);
  const a = result.companies.find((c) => c.id === 'A');
  assert.equal(a.keys, 30);
  assert.equal(a.registrationId, state.creds.registrationId);
  assert.ok(a.guessedCount > 0, 'company A is not in the manifest: its ids are guessed');
  assert.equal(a.ambiguousCount, 0);
  assert.equal(result.companies.find((c) => c.id === 'co1').guessedCount, 0);

  // without the manifest, the guessed ids of these shapes are right
  fs.rmSync(path.join(sessions, 'manifest.json'));
  const again = await loadAll(files, filesConfig(root, { sessionsDir: sessions }));
  for (const [id, digest] of Object.entries(gen.digests)) assert.equal(again.companies.find((c) => c.id === id).digest, digest);
});

test('file store: a manifest keeps ids that file names cannot; without it the guess is reported', { ...needDeps }, async () => {
  const baileys = await require('../src/baileys').loadBaileys();
  const { stateDigest, keyFileName } = require('../src/digest');
  const files = require('../src/stores/files');
  const root = tmpdir();
  const sessions = path.join(root, 'baileys_sessions');
  const dir = path.join(sessions, 'company_X');
  const { state, saveCreds } = await baileys.useMultiFileAuthState(dir);
  await saveCreds();
  const id = 'ключ:😀/1';
  await state.keys.set({ session: { [id]: { v: 1 } } });
  const name = keyFileName('session', id);
  assert.ok(fs.existsSync(path.join(dir, name)));
  const expected = stateDigest(JSON.parse(JSON.stringify(state.creds)), [{ type: 'session', id, value: { v: 1 } }]);
  fs.writeFileSync(path.join(sessions, 'manifest.json'), JSON.stringify({ format: 1, companies: { X: { files: { [name]: { type: 'session', id, sha256: 'x' }, 'creds.json': { type: 'creds' } } } } }));
  const withManifest = await loadAll(files, filesConfig(root, { sessionsDir: sessions }));
  assert.equal(withManifest.companies[0].digest, expected);
  fs.rmSync(path.join(sessions, 'manifest.json'));
  const guessed = await loadAll(files, filesConfig(root, { sessionsDir: sessions }));
  assert.notEqual(guessed.companies[0].digest, expected);
  assert.equal(guessed.companies[0].ambiguousCount, 1);
  assert.ok(guessed.warnings.some((w) => w.includes('ambiguous')));
});

test('file store: missing, empty, corrupt or non-object creds.json make the company an error', { ...needDeps }, async () => {
  const files = require('../src/stores/files');
  const { genFiles } = require('../tools/fixture');
  const root = tmpdir();
  const sessions = path.join(root, 'baileys_sessions');
  await genFiles({ dest: sessions, companies: 6, keys: 13, prefix: 'c', manifest: false });
  fs.rmSync(path.join(sessions, 'company_c1', 'creds.json'));
  fs.writeFileSync(path.join(sessions, 'company_c2', 'creds.json'), '');
  const text = fs.readFileSync(path.join(sessions, 'company_c3', 'creds.json'), 'utf8');
  fs.writeFileSync(path.join(sessions, 'company_c3', 'creds.json'), text.slice(0, 100)); // truncated
  fs.writeFileSync(path.join(sessions, 'company_c4', 'creds.json'), 'null');
  fs.writeFileSync(path.join(sessions, 'company_c5', 'creds.json'), JSON.stringify(JSON.parse(text.replace(/"data":"[^"]*"/, '"data":[1,2,3]'))));
  const before = fs.readdirSync(path.join(sessions, 'company_c1'));
  const result = await loadAll(files, filesConfig(root, { sessionsDir: sessions }));
  assert.deepEqual(result.ready, ['c6'], 'creds are checked before ready');
  assert.deepEqual(result.companies.map((c) => c.id), ['c6']);
  const joined = result.errors.join('\n');
  assert.match(joined, /company c1: creds.json is missing/);
  assert.match(joined, /company c2: creds.json is not valid JSON/);
  assert.match(joined, /company c3: creds.json is not valid JSON/);
  assert.match(joined, /company c4: creds.json is not a JSON object/);
  assert.match(joined, /company c5: creds.json holds byte-array Buffers/);
  // Baileys was never given the chance to write fresh creds
  assert.deepEqual(fs.readdirSync(path.join(sessions, 'company_c1')), before);
});

test('file store: unreadable key files, bad company dirs and stray files', { ...needDeps }, async () => {
  const files = require('../src/stores/files');
  const { genFiles } = require('../tools/fixture');
  const root = tmpdir();
  const sessions = path.join(root, 'baileys_sessions');
  await genFiles({ dest: sessions, companies: 3, keys: 13, prefix: 'k', manifest: false });
  fs.writeFileSync(path.join(sessions, 'company_k1', 'pre-key-1.json'), '{"private":');
  fs.writeFileSync(path.join(sessions, 'company_k2', 'pre-key-1.json'), '{"private":{"type":"Buffer","data":[1]},"public":{"type":"Buffer","data":"AQ=="}}');
  fs.writeFileSync(path.join(sessions, 'company_k3', 'notes.txt'), 'x');
  fs.mkdirSync(path.join(sessions, 'company_bad.id'));
  fs.mkdirSync(path.join(sessions, 'lost+found'));
  const result = await loadAll(files, filesConfig(root, { sessionsDir: sessions }));
  assert.deepEqual(result.ready, ['k1', 'k2', 'k3'], 'key files are not read before ready');
  assert.deepEqual(result.companies.map((c) => c.id), ['k3']);
  const joined = result.errors.join('\n');
  assert.match(joined, /company k1: key file "pre-key-1.json" unreadable/);
  assert.match(joined, /company k2: key file "pre-key-1.json" holds byte-array Buffers/);
  assert.match(joined, /"company_bad.id": invalid company id/);
  assert.ok(result.warnings.some((w) => w.includes('notes.txt')));
  const missing = await loadAll(files, filesConfig(root, { sessionsDir: path.join(root, 'nope') }));
  assert.match(missing.errors[0], /sessions directory .* is missing/);
});

test('service: /health and /reload with the file store', { ...needDeps }, async () => {
  const { createService } = require('../src/index');
  const { genFiles } = require('../tools/fixture');
  const root = tmpdir();
  const sessions = path.join(root, 'baileys_sessions');
  const gen = await genFiles({ dest: sessions, companies: 2, keys: 20, prefix: 's', manifest: true });
  // "__proto__" is a valid company id: it must not vanish from the JSON maps
  fs.cpSync(path.join(sessions, 'company_s1'), path.join(sessions, 'company___proto__'), { recursive: true });
  const expected = JSON.parse(JSON.stringify(gen.digests));
  Object.defineProperty(expected, '__proto__', { value: gen.digests.s1, enumerable: true, configurable: true, writable: true });
  const service = createService({ config: filesConfig(root, { sessionsDir: sessions }) });
  const port = await service.start();
  try {
    const base = `http://127.0.0.1:${port}`;
    const { status, h } = await settled(base);
    assert.equal(status, 200);
    assert.equal(h.ready, true);
    assert.equal(h.digestsComplete, true);
    assert.equal(h.store, 'files');
    assert.equal(h.revision, null);
    assert.equal(h.companies, 3);
    assert.deepEqual(Object.entries(h.digests).sort(), Object.entries(expected).sort());
    assert.deepEqual(Object.keys(h.registrationIds).sort(), ['__proto__', 's1', 's2']);
    assert.deepEqual(h.errors, []);
    assert.equal(h.pid, process.pid);
    assert.ok(!Number.isNaN(Date.parse(h.startedAt)));

    // /reload answers after both phases: the digests are complete in its answer
    fs.cpSync(path.join(sessions, 'company_s1'), path.join(sessions, 'company_s3'), { recursive: true });
    let res = await fetch(`${base}/reload`, { method: 'POST' });
    assert.equal(res.status, 200);
    const reloaded = await res.json();
    assert.equal(reloaded.digestsComplete, true);
    assert.equal(reloaded.verifying, false);
    assert.equal(reloaded.digests.s3, gen.digests.s1);
    assert.ok(reloaded.readyAt > h.verifiedAt, 'a reload is a new load');
    fs.rmSync(path.join(sessions, 'company_s3'), { recursive: true });

    fs.writeFileSync(path.join(sessions, 'company_s2', 'creds.json'), '{');
    res = await fetch(`${base}/reload`, { method: 'POST' });
    assert.equal(res.status, 503);
    const after = await res.json();
    assert.equal(after.ready, false);
    assert.match(after.errors.join(), /company s2: creds.json is not valid JSON/);
    assert.equal(after.readyAt, null, 'this load never became ready');
    assert.equal((await fetch(`${base}/health`)).status, 503);
    assert.equal((await fetch(`${base}/reload`)).status, 405);
    assert.equal((await fetch(`${base}/other`)).status, 404);
  } finally {
    await service.stop('test');
  }
});

test('service: ready once the creds are loaded, before any key is read; the verification then finds a corrupt key file', { ...needDeps }, async () => {
  const { createService } = require('../src/index');
  const { genFiles } = require('../tools/fixture');
  const root = tmpdir();
  const sessions = path.join(root, 'baileys_sessions');
  const gen = await genFiles({ dest: sessions, companies: 12, keys: 400, prefix: 'v', manifest: true });
  const corrupt = path.join(sessions, 'company_v9', 'pre-key-5.json');
  const good = fs.readFileSync(corrupt);
  fs.writeFileSync(corrupt, '{"private":');
  const service = createService({ config: filesConfig(root, { sessionsDir: sessions }) });
  // what /health answers at the moment each phase ends (the log call is synchronous with it)
  const atEvent = {};
  const saved = { ...log };
  for (const level of ['info', 'error']) {
    log[level] = (event) => {
      if (event === 'load_finished' || event === 'verify_finished') atEvent[event] = atEvent[event] || service.health();
    };
  }
  const port = await service.start();
  try {
    const base = `http://127.0.0.1:${port}`;
    let first;
    const deadline = Date.now() + SETTLE_DEADLINE_MS;
    while (!first && Date.now() < deadline) {
      const res = await fetch(`${base}/health`);
      if (res.status === 200) first = await res.json();
      else await new Promise((r) => setTimeout(r, 5));
    }
    assert.ok(first, 'the service answered 200 with a corrupt key file: keys are not read before ready');
    assert.equal(first.ready, true);
    assert.equal(first.companies, 12);
    assert.equal(Object.keys(first.registrationIds).length, 12, 'every company\'s creds are loaded at ready');
    assert.equal(first.digestsComplete, false);
    assert.equal(first.verifiedAt, null);

    const atReady = atEvent.load_finished;
    assert.equal(atReady.ready, true);
    assert.ok(atReady.readyAt);
    assert.deepEqual(Object.keys(atReady.digests), [], 'no digest at ready: no key was read');
    assert.equal(atReady.digestsComplete, false);

    const { status, h } = await settled(base);
    assert.equal(status, 503);
    assert.equal(h.ready, false);
    assert.equal(h.digestsComplete, false);
    assert.deepEqual(h.errors, ['company v9: key file "pre-key-5.json" unreadable by Baileys (empty or not JSON)']);
    assert.equal(h.readyAt, atReady.readyAt);
    assert.ok(h.readyAt <= h.verifiedAt);
    assert.ok(Number.isInteger(h.verifyMs));
    // the companies the pass read are shown; v9 is not
    const expected = { ...gen.digests };
    delete expected.v9;
    assert.deepEqual({ ...h.digests }, expected);
    assert.equal(h.keys.v1, 400);
    assert.equal(atEvent.verify_finished.ready, false);

    // fixed: a reload answers once every digest is known
    fs.writeFileSync(corrupt, good);
    const res = await fetch(`${base}/reload`, { method: 'POST' });
    assert.equal(res.status, 200);
    const fixed = await res.json();
    assert.equal(fixed.digestsComplete, true);
    assert.deepEqual({ ...fixed.digests }, gen.digests);
    assert.ok(fixed.readyAt <= fixed.verifiedAt);
    assert.deepEqual(fixed.errors, []);
  } finally {
    Object.assign(log, saved);
    await service.stop('test');
  }
});

test('file store: the verification replaces its Baileys worker as it reads, with the same digests', { ...needDeps }, async () => {
  const files = require('../src/stores/files');
  const { genFiles } = require('../tools/fixture');
  const root = tmpdir();
  const sessions = path.join(root, 'baileys_sessions');
  const gen = await genFiles({ dest: sessions, companies: 3, keys: 25, prefix: 'w', manifest: true });
  const before = files.options.recycleFiles;
  files.options.recycleFiles = 20;
  try {
    const result = await loadAll(files, filesConfig(root, { sessionsDir: sessions }));
    assert.deepEqual(result.errors, []);
    assert.equal(result.verify.workers, 3, 'one worker per company at 20 files a worker');
    assert.deepEqual(Object.fromEntries(result.companies.map((c) => [c.id, c.digest])), gen.digests);
  } finally {
    files.options.recycleFiles = before;
  }
});

test('service: supabase and unavailable stores are not ready, and say why', { ...needDeps }, async () => {
  const { createService, resolveStore } = require('../src/index');
  const root = tmpdir();
  const config = loadConfig({ appRoot: root, env: {} });
  config.healthPort = 0;
  const service = createService({ config });
  const port = await service.start();
  try {
    const res = await fetch(`http://127.0.0.1:${port}/health`);
    assert.equal(res.status, 503);
    const h = await res.json();
    assert.equal(h.store, 'supabase');
    assert.match(h.errors.join(), /supabase" is not available/);
  } finally {
    await service.stop('test');
  }
  assert.match(resolveStore('nosuch').error, /store "nosuch" is not available at this revision/);
});
