'use strict';
// POST /simulate on the file store: the service changes a company's directory
// the way the live service does while PostgreSQL is down, through Baileys'
// useMultiFileAuthState (new keys outside the manifest, consumed pre-keys,
// creds after a pre-key upload), then /health reports the digest of the new
// state, computed over the reverse-mapped ids of the files not in the
// manifest. Refused on other stores and when not ready. (The PostgreSQL store
// and the equality of both answers: test/postgres.test.js.) Needs node_modules.

const test = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');

const log = require('../src/log');
const digestLib = require('../src/digest');

const { FILES_ENV, depsOption, tmpdir, configFor, until, waitReady, post } = require('./lib/helpers');

const needDeps = depsOption();

for (const level of ['info', 'warn', 'error']) log[level] = () => {};

/** Baileys' fixFileName, written out here so the test does not trust src/digest.js for it. */
const baileysName = (type, id) => `${type}-${id.replace(/\//g, '__').replace(/:/g, '-')}.json`;

/** sha256 of every file of a directory (a change detector). */
function snapshot(dir) {
  const out = {};
  for (const name of fs.readdirSync(dir).sort()) {
    out[name] = crypto.createHash('sha256').update(fs.readFileSync(path.join(dir, name))).digest('hex');
  }
  return out;
}

/**
 * Moves the fixture's manifest.json to the current layout
 * (.baileys-dr/manifest.json + .baileys-dr/companies/<id>.json), as an export writes it.
 */
function writeTreeManifest(sessions) {
  const old = JSON.parse(fs.readFileSync(path.join(sessions, 'manifest.json'), 'utf8'));
  const top = { format: 1, kind: 'baileys-dr-sessions', companies: {} };
  fs.mkdirSync(path.join(sessions, '.baileys-dr', 'companies'), { recursive: true });
  for (const [id, { files }] of Object.entries(old.companies)) {
    const text = JSON.stringify({ company_id: id, files });
    fs.writeFileSync(path.join(sessions, '.baileys-dr', 'companies', `${id}.json`), text);
    top.companies[id] = { manifest_sha256: crypto.createHash('sha256').update(text).digest('hex') };
  }
  fs.writeFileSync(path.join(sessions, '.baileys-dr', 'manifest.json'), JSON.stringify(top));
  fs.rmSync(path.join(sessions, 'manifest.json'));
}

/**
 * The state digest of a company directory, from its bytes alone: ids from the
 * company manifest when it maps the file, else the type-aware reverse of
 * fixFileName. Also returns the ids it had to reverse.
 */
function digestOfDirectory(sessions, company) {
  const dir = path.join(sessions, `company_${company}`);
  const manifestFile = path.join(sessions, '.baileys-dr', 'companies', `${company}.json`);
  const mapped = fs.existsSync(manifestFile) ? JSON.parse(fs.readFileSync(manifestFile, 'utf8')).files : {};
  const creds = JSON.parse(fs.readFileSync(path.join(dir, 'creds.json'), 'utf8'));
  const keys = [];
  const reversed = [];
  for (const name of fs.readdirSync(dir)) {
    if (name === 'creds.json') continue;
    const value = JSON.parse(fs.readFileSync(path.join(dir, name), 'utf8'));
    if (Object.prototype.hasOwnProperty.call(mapped, name)) {
      keys.push({ type: mapped[name].type, id: mapped[name].id, value });
      continue;
    }
    const parsed = digestLib.parseKeyFileName(name);
    assert.ok(parsed, `${name} is a key file`);
    const { id, ambiguous } = digestLib.reverseFileName(parsed.type, parsed.name);
    reversed.push({ type: parsed.type, id, file: name, ambiguous });
    keys.push({ type: parsed.type, id, value });
  }
  return { digest: digestLib.stateDigest(creds, keys), reversed };
}

async function filesService() {
  const { createService } = require('../src/index');
  const { genFiles } = require('../tools/fixture');
  const root = tmpdir();
  const sessions = path.join(root, 'baileys_sessions');
  await genFiles({ dest: sessions, companies: 2, keys: 20, prefix: 'f', manifest: true });
  writeTreeManifest(sessions);
  // f3: the same bytes as f2 (determinism), with the same manifest
  fs.cpSync(path.join(sessions, 'company_f2'), path.join(sessions, 'company_f3'), { recursive: true });
  const m2 = JSON.parse(fs.readFileSync(path.join(sessions, '.baileys-dr', 'companies', 'f2.json'), 'utf8'));
  fs.writeFileSync(path.join(sessions, '.baileys-dr', 'companies', 'f3.json'), JSON.stringify({ ...m2, company_id: 'f3' }));
  const service = createService({ config: configFor(root, FILES_ENV, { sessionsDir: sessions }) });
  const port = await service.start();
  const base = `http://127.0.0.1:${port}`;
  const { status, health } = await waitReady(base);
  assert.equal(status, 200, JSON.stringify(health.errors));
  return { service, base, sessions, health };
}

test('simulate: new keys through Baileys, consumed pre-keys, creds after an upload; /health has the digest of the files', { ...needDeps }, async () => {
  const { BufferJSON } = await require('../src/baileys').loadBaileys();
  const { service, base, sessions, health: before } = await filesService();
  try {
    const dir = path.join(sessions, 'company_f1');
    const credsBefore = JSON.parse(fs.readFileSync(path.join(dir, 'creds.json'), 'utf8'), BufferJSON.reviver);
    const preKeysBefore = fs.readdirSync(dir).filter((n) => /^pre-key-[0-9]+\.json$/.test(n)).map((n) => Number(n.slice(8, -5))).sort((a, b) => a - b);
    const maxPreKey = preKeysBefore[preKeysBefore.length - 1];
    assert.equal(before.digests.f1, digestOfDirectory(sessions, 'f1').digest);
    assert.equal(before.guessedIds.f1, undefined, 'the export mapped every file');

    const { status, body } = await post(base, { company: 'f1', newKeys: 7, consumePreKeys: 2, touchCreds: true, seed: 'outage-1' });
    assert.equal(status, 200, JSON.stringify(body));
    assert.deepEqual(Object.keys(body).sort(), ['company', 'creds_changed', 'creds_sha256', 'deleted', 'digest', 'written']);
    assert.equal(body.company, 'f1');

    // new keys: Baileys' names, base64 Buffers, the id shapes the failback must reverse
    assert.equal(body.written.length, 7);
    assert.deepEqual([...new Set(body.written.map((w) => w.type))].sort(), ['app-state-sync-key', 'pre-key', 'sender-key', 'sender-key-memory', 'session']);
    const byType = (t) => body.written.filter((w) => w.type === t);
    assert.match(byType('session')[0].id, /^[0-9]{10}\.[0-9]+$/);
    assert.match(byType('sender-key')[0].id, /^120363[0-9]{12}@g\.us::[0-9]{10}::[0-9]+$/);
    assert.ok(byType('app-state-sync-key').some((w) => w.id.includes('/')));
    for (const w of byType('pre-key')) assert.ok(Number(w.id) > maxPreKey, `new pre-key ${w.id} above ${maxPreKey}`);
    for (const w of body.written) {
      assert.equal(w.file, baileysName(w.type, w.id));
      const text = fs.readFileSync(path.join(dir, w.file), 'utf8');
      assert.doesNotMatch(text, /"data":\[/, 'Buffers are base64');
      assert.equal(w.line_sha256, digestLib.lineSha256(digestLib.keyLine(w.type, w.id, JSON.parse(text))), 'the hash of the line of the file as written');
      const value = JSON.parse(text, BufferJSON.reviver);
      if (w.type === 'pre-key') {
        assert.ok(Buffer.isBuffer(value.private) && value.private.length === 32);
        assert.ok(Buffer.isBuffer(value.public) && value.public.length === 32);
      }
      if (w.type === 'sender-key') assert.ok(Buffer.isBuffer(value));
      if (w.type === 'app-state-sync-key') assert.ok(typeof value.keyData === 'string' && value.fingerprint && value.timestamp);
    }
    assert.ok(byType('sender-key')[0].file.includes('--') && !byType('sender-key')[0].file.includes(':'));
    assert.ok(byType('app-state-sync-key')[0].file.includes('__') && !byType('app-state-sync-key')[0].file.includes('/'));

    // consumed pre-keys: the oldest, deleted by Baileys
    assert.deepEqual(body.deleted, preKeysBefore.slice(0, 2).map((id) => ({ type: 'pre-key', id: String(id), file: `pre-key-${id}.json` })));
    for (const d of body.deleted) assert.ok(!fs.existsSync(path.join(dir, d.file)), `${d.file} is gone`);

    // creds: still parses with Baileys' reviver, the pre-key counters advanced
    assert.equal(body.creds_changed, true);
    const credsText = fs.readFileSync(path.join(dir, 'creds.json'), 'utf8');
    const creds = JSON.parse(credsText, BufferJSON.reviver);
    assert.equal(creds.registrationId, credsBefore.registrationId);
    assert.equal(body.creds_sha256, digestLib.lineSha256(digestLib.credsLine(JSON.parse(credsText))));
    assert.ok(Buffer.isBuffer(creds.noiseKey.private));
    assert.deepEqual(creds.noiseKey, credsBefore.noiseKey);
    const lastNew = Math.max(...byType('pre-key').map((w) => Number(w.id)));
    assert.equal(creds.nextPreKeyId, lastNew + 1);
    assert.equal(creds.firstUnuploadedPreKeyId, lastNew + 1);
    assert.ok(creds.nextPreKeyId > credsBefore.nextPreKeyId);
    assert.equal(creds.accountSyncCounter, credsBefore.accountSyncCounter + 1);
    assert.equal(creds.myAppStateKeyId, byType('app-state-sync-key').pop().id);

    // the digest: changed, equal to /health's and to one computed from the directory alone
    assert.notEqual(body.digest, before.digests.f1);
    const res = await fetch(`${base}/health`);
    assert.equal(res.status, 200, 'new key files outside the manifest keep the service ready');
    const after = await res.json();
    assert.equal(after.digests.f1, body.digest);
    assert.equal(after.digests.f2, before.digests.f2);
    assert.equal(after.keys.f1, before.keys.f1 + 7 - 2);
    const independent = digestOfDirectory(sessions, 'f1');
    assert.equal(independent.digest, body.digest);
    // the new files are exactly the ones no manifest maps; their ids reverse unambiguously
    const key = (e) => `${e.type}\t${e.id}\t${e.file}`;
    assert.deepEqual(independent.reversed.map(key).sort(), body.written.map(key).sort());
    assert.ok(independent.reversed.every((r) => !r.ambiguous));
    // and the file store reports them as guessed, none ambiguous
    assert.equal(after.guessedIds.f1.count, 7);
    assert.equal(after.guessedIds.f1.ambiguous, 0);
    assert.deepEqual(after.guessedIds.f1.listed.map(key).sort(), body.written.map(key).sort());
    assert.deepEqual(after.warnings, []);

    // a second change on top of the first
    const again = await post(base, { company: 'f1', seed: 'outage-2' });
    assert.equal(again.status, 200, JSON.stringify(again.body));
    assert.deepEqual(again.body.written.map((w) => w.type), ['session', 'sender-key', 'app-state-sync-key']);
    assert.deepEqual(again.body.deleted.map((d) => d.id), [String(preKeysBefore[2])]);
    assert.notEqual(again.body.digest, body.digest);
    assert.equal(again.body.digest, digestOfDirectory(sessions, 'f1').digest);
    assert.equal(JSON.parse(fs.readFileSync(path.join(dir, 'creds.json'), 'utf8')).accountSyncCounter, credsBefore.accountSyncCounter + 2);
  } finally {
    await service.stop('test');
  }
});

test('simulate: deterministic from the seed and the directory; touchCreds false leaves creds.json alone', { ...needDeps }, async () => {
  const { service, base, sessions, health: before } = await filesService();
  try {
    assert.equal(before.digests.f2, before.digests.f3);
    const request = { newKeys: 9, consumePreKeys: 3, seed: 'same' };
    const a = await post(base, { company: 'f2', ...request });
    const b = await post(base, { company: 'f3', ...request });
    assert.equal(a.status, 200, JSON.stringify(a.body));
    assert.equal(b.status, 200, JSON.stringify(b.body));
    assert.deepEqual(b.body.written, a.body.written);
    assert.deepEqual(b.body.deleted, a.body.deleted);
    assert.equal(b.body.digest, a.body.digest);
    assert.deepEqual(snapshot(path.join(sessions, 'company_f3')), snapshot(path.join(sessions, 'company_f2')));
    const other = await post(base, { company: 'f3', ...request, seed: 'other' });
    assert.equal(other.status, 200);
    assert.notDeepEqual(other.body.written.filter((w) => w.type !== 'pre-key').map((w) => w.id), a.body.written.filter((w) => w.type !== 'pre-key').map((w) => w.id));

    // touchCreds false: keys change, creds.json does not
    const dir = path.join(sessions, 'company_f1');
    const credsBytes = fs.readFileSync(path.join(dir, 'creds.json'));
    const c = await post(base, { company: 'f1', touchCreds: false, newKeys: 1, consumePreKeys: 0 });
    assert.equal(c.status, 200, JSON.stringify(c.body));
    assert.equal(c.body.creds_changed, false);
    assert.deepEqual(c.body.deleted, []);
    assert.equal(c.body.written.length, 1);
    assert.ok(fs.readFileSync(path.join(dir, 'creds.json')).equals(credsBytes));
    assert.notEqual(c.body.digest, before.digests.f1);
    assert.equal(c.body.digest, digestOfDirectory(sessions, 'f1').digest);

    // nothing asked, nothing changed
    const snap = snapshot(dir);
    const none = await post(base, { company: 'f1', newKeys: 0, consumePreKeys: 0, touchCreds: false });
    assert.equal(none.status, 200);
    assert.deepEqual([none.body.written, none.body.deleted, none.body.creds_changed], [[], [], false]);
    assert.equal(none.body.digest, c.body.digest);
    assert.deepEqual(snapshot(dir), snap);
  } finally {
    await service.stop('test');
  }
});

test('simulate: bad requests are 400 and change nothing', { ...needDeps }, async () => {
  const { service, base, sessions } = await filesService();
  try {
    const snap = snapshot(path.join(sessions, 'company_f1'));
    const bad = [
      [{}, /company must be/],
      [{ company: '../f1' }, /company must be/],
      [{ company: 'f1.x' }, /company must be/],
      [{ company: 'x'.repeat(51) }, /company must be/],
      [{ company: 'nosuch' }, /company nosuch does not exist/],
      [{ company: 'f1', newKeys: -1 }, /newKeys must be an integer/],
      [{ company: 'f1', newKeys: 1.5 }, /newKeys must be an integer/],
      [{ company: 'f1', newKeys: '3' }, /newKeys must be an integer/],
      [{ company: 'f1', consumePreKeys: 1001 }, /consumePreKeys must be an integer/],
      [{ company: 'f1', consumePreKeys: 999 }, /has [0-9]+ pre-key\(s\), cannot consume 999/],
      [{ company: 'f1', touchCreds: 'yes' }, /touchCreds must be true or false/],
      [{ company: 'f1', seed: 7 }, /seed must be a string/],
      [{ company: 'f1', newkeys: 3 }, /unknown field\(s\): "newkeys"/],
      [['f1'], /JSON object/],
    ];
    for (const [body, message] of bad) {
      const res = await post(base, body);
      assert.equal(res.status, 400, JSON.stringify(body));
      assert.match(res.body.error, message, JSON.stringify(body));
    }
    const notJson = await post(base, '{"company": "f1"', true);
    assert.equal(notJson.status, 400);
    assert.match(notJson.body.error, /not JSON/);
    const huge = await post(base, { company: 'f1', seed: 'x'.repeat(70000) });
    assert.equal(huge.status, 413);
    assert.equal((await fetch(`${base}/simulate`)).status, 405);
    assert.deepEqual(snapshot(path.join(sessions, 'company_f1')), snap);
    assert.equal(fs.existsSync(path.join(sessions, 'company_nosuch')), false, 'Baileys was not asked to create a directory');
    assert.equal((await fetch(`${base}/health`)).status, 200);
  } finally {
    await service.stop('test');
  }
});

test('simulate: refused (409) on the supabase store, when not ready (database down, a corrupt creds.json), and when creds.json is broken', { ...needDeps }, async () => {
  const { createService } = require('../src/index');
  const { genFiles } = require('../tools/fixture');
  const root = tmpdir();
  const sessions = path.join(root, 'baileys_sessions');
  await genFiles({ dest: sessions, companies: 1, keys: 15, prefix: 'p', manifest: false });
  const snap = snapshot(path.join(sessions, 'company_p1'));
  const request = { company: 'p1' };

  // postgres mode, database down (nothing listens on the port): not ready
  const closed = await new Promise((resolve) => {
    const s = require('node:net').createServer().listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
  const pgEnv = `USE_LEGACY_SUPABASE=false\nUSE_DATABASE_AUTH_STATE=true\nPOSTGRES_HOST=127.0.0.1\nPOSTGRES_PORT=${closed}\nPOSTGRES_DB=x\nPOSTGRES_USER=x\n`;
  let service = createService({ config: configFor(root, pgEnv, { sessionsDir: sessions }) });
  let base = `http://127.0.0.1:${await service.start()}`;
  try {
    const { status } = await waitReady(base);
    assert.equal(status, 503);
    const res = await post(base, request);
    assert.equal(res.status, 409);
    assert.match(res.body.error, /not ready/);
    assert.match(res.body.errors.join(), /postgres store: /);
  } finally {
    await service.stop('test');
  }

  // supabase mode
  service = createService({ config: configFor(root, 'USE_LEGACY_SUPABASE=true\n', { sessionsDir: sessions }) });
  base = `http://127.0.0.1:${await service.start()}`;
  try {
    const res = await post(base, request);
    assert.equal(res.status, 409);
    assert.match(res.body.error, /store in use is "supabase"/);
  } finally {
    await service.stop('test');
  }

  // file mode, not ready (another company's creds.json is corrupt)
  fs.cpSync(path.join(sessions, 'company_p1'), path.join(sessions, 'company_p2'), { recursive: true });
  fs.writeFileSync(path.join(sessions, 'company_p2', 'creds.json'), '{"noiseKey":');
  service = createService({ config: configFor(root, FILES_ENV, { sessionsDir: sessions }) });
  base = `http://127.0.0.1:${await service.start()}`;
  try {
    assert.equal((await waitReady(base)).status, 503);
    const res = await post(base, request);
    assert.equal(res.status, 409);
    assert.match(res.body.error, /not ready/);
    assert.match(res.body.errors.join(), /company p2: creds.json is not valid JSON/);
    // ready again; then creds.json breaks after the load: Baileys must not replace it
    fs.rmSync(path.join(sessions, 'company_p2'), { recursive: true });
    assert.equal((await fetch(`${base}/reload`, { method: 'POST' })).status, 200);
    const good = fs.readFileSync(path.join(sessions, 'company_p1', 'creds.json'));
    fs.writeFileSync(path.join(sessions, 'company_p1', 'creds.json'), good.subarray(0, 50));
    const broken = await post(base, request);
    assert.equal(broken.status, 409);
    assert.match(broken.body.error, /company p1: creds.json is not valid JSON.*refusing/);
    assert.ok(fs.readFileSync(path.join(sessions, 'company_p1', 'creds.json')).equals(good.subarray(0, 50)));
    fs.writeFileSync(path.join(sessions, 'company_p1', 'creds.json'), good);
  } finally {
    await service.stop('test');
  }
  assert.deepEqual(snapshot(path.join(sessions, 'company_p1')), snap, 'no refused request changed the directory');
});

test('simulate: a stop during a request on files lets it finish, answered with the digest of the directory', { ...needDeps }, async () => {
  const { service, base, sessions, health: before } = await filesService();
  // stop at the moment Baileys has written the change, before the store is reloaded
  const saved = log.info;
  let stopping = null;
  log.info = (event) => {
    if (event === 'simulated' && !stopping) stopping = service.stop('test');
  };
  try {
    const res = await post(base, { company: 'f1', newKeys: 4, consumePreKeys: 1, seed: 'stop' });
    assert.ok(stopping, 'the stop began while the request was in flight');
    assert.equal(res.status, 200, JSON.stringify(res.body));
    assert.equal(res.body.written.length, 4);
    assert.notEqual(res.body.digest, before.digests.f1);
    assert.equal(res.body.digest, digestOfDirectory(sessions, 'f1').digest);
    await stopping;
    await assert.rejects(fetch(`${base}/health`), 'no request is taken after the stop');
  } finally {
    log.info = saved;
    await service.stop('test');
  }
});

/** /health's view of the companies that a full re-read must give again. */
const stateOf = (h) => ({ digests: h.digests, keys: h.keys, guessedIds: h.guessedIds, identities: h.identities, warnings: h.warnings });

test('simulate: the state kept per company after many changes equals a full re-read (consumed pre-keys, creds, files changed behind its back)', { ...needDeps }, async () => {
  const files = require('../src/stores/files');
  const { service, base, sessions } = await filesService();
  const budget = files.options.digestInputBytes;
  try {
    const keyFiles = (company) => fs.readdirSync(path.join(sessions, `company_${company}`)).filter((n) => n !== 'creds.json').length;
    const check = async (label, company, res) => {
      assert.equal(res.status, 200, `${label}: ${JSON.stringify(res.body)}`);
      assert.equal(res.body.digest, digestOfDirectory(sessions, company).digest, `${label}: the answer is the digest of the directory`);
      const h = await (await fetch(`${base}/health`)).json();
      assert.equal(h.digests[company], res.body.digest, `${label}: /health took it`);
      assert.equal(h.keys[company], keyFiles(company), `${label}: key count`);
    };
    const requests = [
      { newKeys: 7, consumePreKeys: 2, touchCreds: true },
      { newKeys: 0, consumePreKeys: 3, touchCreds: false },
      { newKeys: 4, consumePreKeys: 1, touchCreds: true },
      { newKeys: 1, consumePreKeys: 0, touchCreds: true },
      { newKeys: 9, consumePreKeys: 0, touchCreds: false },
      { newKeys: 0, consumePreKeys: 0, touchCreds: true },
      { newKeys: 5, consumePreKeys: 4, touchCreds: true },
    ];
    let n = 0;
    for (let round = 0; round < 3; round++) {
      for (const request of requests) {
        const company = ['f1', 'f2', 'f3'][n % 3];
        await check(`change ${n}`, company, await post(base, { company, ...request, seed: `many-${n}` }));
        n += 1;
      }
    }

    // changed behind the service's back (another instance, a person): a key file added, one removed
    const f1 = path.join(sessions, 'company_f1');
    const f2 = path.join(sessions, 'company_f2');
    const stranger = fs.readdirSync(f2).find((name) => name.startsWith('session-') && !fs.existsSync(path.join(f1, name)));
    fs.copyFileSync(path.join(f2, stranger), path.join(f1, stranger));
    fs.rmSync(path.join(f1, fs.readdirSync(f1).find((name) => name.startsWith('device-list-'))));
    await check('after outside changes', 'f1', await post(base, { company: 'f1', seed: 'outside' }));

    // a budget that holds one company: the others are read in full again, with the same result
    const sizes = [...service.state.companyStates.held.values()].map((held) => held.bytes);
    assert.equal(sizes.length, 3);
    files.options.digestInputBytes = 1.3 * Math.max(...sizes);
    assert.ok(2 * Math.min(...sizes) > files.options.digestInputBytes, 'two companies do not fit');
    for (const company of ['f2', 'f1', 'f3', 'f2']) await check(`small budget, ${company}`, company, await post(base, { company, seed: `budget-${n++}` }));
    assert.equal(service.state.companyStates.held.size, 1, 'one company held');

    // a reload reads the store in full: the same digests, key counts, guessed ids, identities and warnings
    const kept = await (await fetch(`${base}/health`)).json();
    assert.equal(kept.digestsComplete, true);
    const reloaded = await (await fetch(`${base}/reload`, { method: 'POST' })).json();
    assert.equal(reloaded.digestsComplete, true);
    assert.deepEqual(stateOf(kept), stateOf(reloaded));
    assert.ok(kept.guessedIds.f1.count > 20, 'many guessed ids, 20 listed');
  } finally {
    files.options.digestInputBytes = budget;
    await service.stop('test');
  }
});

test('simulate: answered during the verification of the keys, without waiting for it; digests complete afterwards', { ...needDeps }, async () => {
  const files = require('../src/stores/files');
  const { createService } = require('../src/index');
  const { genFiles } = require('../tools/fixture');
  const root = tmpdir();
  const sessions = path.join(root, 'baileys_sessions');
  await genFiles({ dest: sessions, companies: 6, keys: 16, prefix: 'v', manifest: true });
  // a slow verification: a new worker (which loads Baileys, about a second) for each company
  const recycle = files.options.recycleFiles;
  files.options.recycleFiles = 1;
  const service = createService({ config: configFor(root, FILES_ENV, { sessionsDir: sessions }) });
  const base = `http://127.0.0.1:${await service.start()}`;
  try {
    const ready = await until('ready', async () => {
      const res = await fetch(`${base}/health`);
      return res.status === 200 ? res.json() : null;
    });
    assert.equal(ready.digestsComplete, false, 'ready before the keys are verified');
    // v1: the company the verification reads first; v6: the one it reaches last
    for (const company of ['v1', 'v6', 'v1']) {
      const started = Date.now();
      const res = await post(base, { company, seed: `during-${company}-${started}` });
      const took = Date.now() - started;
      const h = await (await fetch(`${base}/health`)).json();
      assert.equal(res.status, 200, JSON.stringify(res.body));
      assert.ok(took < 2000, `answered in ${took} ms`);
      assert.equal(h.verifying, true, 'the verification was still running');
      assert.equal(h.digestsComplete, false);
      assert.equal(res.body.digest, digestOfDirectory(sessions, company).digest);
      assert.equal(h.digests[company], res.body.digest);
    }
    const { status, health } = await waitReady(base, 120000);
    assert.equal(status, 200, JSON.stringify(health.errors));
    assert.equal(health.digestsComplete, true);
    for (let i = 1; i <= 6; i++) assert.equal(health.digests[`v${i}`], digestOfDirectory(sessions, `v${i}`).digest, `v${i}`);
    assert.deepEqual(health.errors, []);
  } finally {
    files.options.recycleFiles = recycle;
    await service.stop('test');
  }
});

test('simulate: a company whose files no longer verify after a change is a 500 and makes the service not ready, as a reload would', { ...needDeps }, async () => {
  const { service, base, sessions } = await filesService();
  try {
    // broken after the verification, before any change of f2: its first change reads it in full
    const dir = path.join(sessions, 'company_f2');
    const broken = fs.readdirSync(dir).find((name) => name.startsWith('session-'));
    const good = fs.readFileSync(path.join(dir, broken));
    fs.writeFileSync(path.join(dir, broken), good.subarray(0, 20));
    const res = await post(base, { company: 'f2', seed: 'broken' });
    assert.equal(res.status, 500, JSON.stringify(res.body));
    assert.equal(res.body.digest, null);
    assert.equal(res.body.written.length, 3, 'what was written is still listed');
    assert.ok(res.body.error.startsWith('company f2 did not verify after the change: '), res.body.error);
    assert.ok(res.body.error.includes(`${broken}" unreadable by Baileys`), res.body.error);
    const h = await fetch(`${base}/health`);
    assert.equal(h.status, 503);
    const health = await h.json();
    assert.equal(health.digestsComplete, false);
    assert.equal(health.digests.f2, undefined);
    assert.ok(health.errors.some((e) => e.includes(broken)));
    assert.equal((await post(base, { company: 'f1' })).status, 409, 'not ready: refused');

    fs.writeFileSync(path.join(dir, broken), good);
    const reloaded = await fetch(`${base}/reload`, { method: 'POST' });
    assert.equal(reloaded.status, 200);
    assert.equal((await reloaded.json()).digests.f2, digestOfDirectory(sessions, 'f2').digest);
  } finally {
    await service.stop('test');
  }
});
