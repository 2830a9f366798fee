#!/usr/bin/env node
'use strict';
// Test-data tool of the test application (not used by the service itself).
//
//   fixture.js seed-pg    --companies N [--keys K] [--prefix P]
//       creates N companies in PostgreSQL (POSTGRES_* variables, as the service
//       reads them; .env is not read): creds from Baileys' initAuthCreds() and
//       keys of every type, stored the way the application does (plain
//       JSON.stringify: byte-array Buffers). Prints {"digests": {...}}.
//   fixture.js pg-to-files --dest DIR [--no-manifest]
//       writes every company of PostgreSQL as a Baileys session tree, through
//       Baileys' own useMultiFileAuthState (BufferJSON.replacer, fixFileName),
//       plus DIR/manifest.json (unless --no-manifest). Prints digests.
//   fixture.js gen-files  --dest DIR --companies N [--keys K] [--no-manifest]
//       a large tree fast (same bytes Baileys would write, written directly).
//
// Every command prints the state digests it expects the service to report.

const fsp = require('node:fs/promises');
const path = require('node:path');
const crypto = require('node:crypto');
const digestLib = require('../src/digest');

const { keyFileName, stateDigest, bufferBytes } = digestLib;

const { loadBaileys } = require('../src/baileys');

/** Deterministic pseudo-random bytes (fast; key material need not be real here). */
function bytes(n, ...seed) {
  const out = Buffer.alloc(n);
  let block = crypto.createHash('sha256').update(seed.join('|')).digest();
  for (let i = 0; i < n; i += 32) {
    block.copy(out, i, 0, Math.min(32, n - i));
    block = crypto.createHash('sha256').update(block).digest();
  }
  return out;
}

/**
 * Keys of every type (live values, as Baileys holds them: Buffers, a proto
 * message for app-state-sync-key). count: how many keys in all (>= 12).
 */
function makeKeys(baileys, companyId, count = 12) {
  const { proto } = baileys;
  const keys = [];
  const user = String(4915550000000 + (parseInt(crypto.createHash('md5').update(companyId).digest('hex').slice(0, 6), 16) % 999999));
  const lid = String(100000000000000 + Number(user.slice(-9)));
  const b = (n, ...s) => bytes(n, companyId, ...s);
  const fixed = [
    { type: 'session', id: `${user}.0`, value: sessionValue(b, 0) },
    { type: 'session', id: `${lid}_1.2`, value: sessionValue(b, 1) },
    { type: 'sender-key', id: `120363${user}@g.us::${user}::0`, value: senderKeyValue(b, 0) },
    { type: 'sender-key', id: `${user}-1600000000@g.us::${lid}_1::3`, value: senderKeyValue(b, 1) },
    { type: 'sender-key-memory', id: `120363${user}@g.us`, value: { [`${user}:7@s.whatsapp.net`]: true, [`${lid}:2@lid`]: true } },
    {
      type: 'app-state-sync-key',
      // 0xfc 0xff... gives a '/' in the base64 id, so the file name holds '__'.
      id: Buffer.concat([Buffer.from([0, 0, 0, 0, 0xfb, 0xff]), b(2, 'asid')]).toString('base64'),
      value: proto.Message.AppStateSyncKeyData.fromObject({
        keyData: b(32, 'askd'),
        fingerprint: { rawId: b(4, 'fp').readUInt32BE(0), currentIndex: 1, deviceIndexes: [0, 1, 7] },
        timestamp: 1700000000000 + b(2, 'ts').readUInt16BE(0),
      }),
    },
    {
      type: 'app-state-sync-version',
      id: 'critical_block',
      value: { version: 3, hash: b(128, 'h'), indexValueMap: { [b(32, 'ivm').toString('base64')]: { valueMac: b(32, 'mac') } } },
    },
    { type: 'lid-mapping', id: user, value: lid },
    { type: 'lid-mapping', id: `${lid}_reverse`, value: user },
    { type: 'device-list', id: user, value: ['0', '7'] },
    { type: 'tctoken', id: `${user}@s.whatsapp.net`, value: { token: b(16, 'tc'), timestamp: '1700000000' } },
    { type: 'identity-key', id: `${user}.0`, value: Buffer.concat([Buffer.from([5]), b(32, 'ik')]) },
  ];
  keys.push(...fixed);
  for (let i = 1; keys.length < count; i++) {
    keys.push({ type: 'pre-key', id: String(i), value: { private: b(32, 'pk', i), public: Buffer.concat([Buffer.from([5]), b(32, 'pub', i)]) } });
  }
  return keys;
}

function sessionValue(b, n) {
  const base = b(33, 'base', n).toString('base64');
  return {
    _sessions: {
      [base]: {
        registrationId: b(2, 'rid', n).readUInt16BE(0),
        currentRatchet: {
          ephemeralKeyPair: { pubKey: b(33, 'ep', n).toString('base64'), privKey: b(32, 'es', n).toString('base64') },
          lastRemoteEphemeralKey: b(33, 'lr', n).toString('base64'),
          previousCounter: 0,
          rootKey: b(32, 'rk', n).toString('base64'),
        },
        indexInfo: { baseKey: base, baseKeyType: 1, closed: -1, used: 1700000000000, created: 1700000000000, remoteIdentityKey: b(33, 'ri', n).toString('base64') },
        _chains: { [b(33, 'ch', n).toString('base64')]: { chainKey: { counter: 0, key: b(32, 'ck', n).toString('base64') }, chainType: 2, messageKeys: {} } },
      },
    },
    version: 'v1',
  };
}

function senderKeyValue(b, n) {
  const record = [{
    senderKeyId: b(4, 'skid', n).readUInt32BE(0) >>> 1,
    senderChainKey: { iteration: 0, seed: b(32, 'seed', n).toString('base64') },
    senderSigningKey: { public: b(33, 'ssk', n).toString('base64') },
    senderMessageKeys: [],
  }];
  return Buffer.from(JSON.stringify(record), 'utf-8');
}

/** The JSON the application stores in PostgreSQL: plain JSON.stringify. */
function asStoredJson(value) {
  return JSON.stringify(value);
}

/** Turns JSON Buffer objects (either encoding) back into Buffers, as an exporter must. */
function reviveBuffers(value) {
  if (value === null || typeof value !== 'object') return value;
  const raw = bufferBytes(value);
  if (raw !== null) return Buffer.from(raw);
  if (Array.isArray(value)) return value.map(reviveBuffers);
  const out = {};
  for (const [k, v] of Object.entries(value)) out[k] = reviveBuffers(v);
  return out;
}

function pgClient() {
  const { Client } = require('pg');
  const e = process.env;
  return new Client({
    host: e.POSTGRES_HOST,
    port: e.POSTGRES_PORT ? Number(e.POSTGRES_PORT) : undefined,
    database: e.POSTGRES_DB,
    user: e.POSTGRES_USER,
    password: e.POSTGRES_PASSWORD,
    application_name: 'baileys-dr-fixture',
  });
}

async function seedPg(opts) {
  const baileys = await loadBaileys();
  const client = pgClient();
  await client.connect();
  const digests = {};
  try {
    for (let c = 1; c <= opts.companies; c++) {
      const companyId = `${opts.prefix}${c}`;
      const creds = baileys.initAuthCreds();
      const keys = makeKeys(baileys, companyId, opts.keys);
      const credsText = asStoredJson(creds);
      await client.query('BEGIN');
      await client.query(
        `INSERT INTO whatsapp_auth (company_id, creds) VALUES ($1, $2::jsonb)
         ON CONFLICT (company_id) DO UPDATE SET creds = EXCLUDED.creds`,
        [companyId, credsText],
      );
      await client.query('DELETE FROM whatsapp_keys WHERE company_id = $1', [companyId]);
      for (let i = 0; i < keys.length; i += 500) {
        const batch = keys.slice(i, i + 500);
        const params = [];
        const rows = batch.map((k, j) => {
          params.push(companyId, k.type, k.id, asStoredJson(k.value));
          const p = j * 4;
          const days = ['lid-mapping', 'pre-key', 'session', 'sender-key'].includes(k.type) ? 7 : 14;
          return `($${p + 1}, $${p + 2}, $${p + 3}, $${p + 4}::jsonb, now() + interval '${days} days')`;
        });
        await client.query(
          `INSERT INTO whatsapp_keys (company_id, key_type, key_id, value, expires_at) VALUES ${rows.join(',')}`,
          params,
        );
      }
      await client.query('COMMIT');
      digests[companyId] = stateDigest(JSON.parse(credsText), keys.map((k) => ({ type: k.type, id: k.id, value: JSON.parse(asStoredJson(k.value)) })));
    }
  } finally {
    await client.end();
  }
  return { digests };
}

async function writeManifest(dest, manifestCompanies) {
  const file = path.join(dest, 'manifest.json');
  await fsp.writeFile(file + '.tmp', JSON.stringify({ format: 1, companies: manifestCompanies }, null, 1));
  await fsp.rename(file + '.tmp', file);
}

async function fileEntry(dir, name, type, id) {
  const sha256 = crypto.createHash('sha256').update(await fsp.readFile(path.join(dir, name))).digest('hex');
  return type === 'creds' ? { type, sha256 } : { type, id, sha256 };
}

/** Exports PostgreSQL to a Baileys tree through useMultiFileAuthState itself. */
async function pgToFiles(opts) {
  const baileys = await loadBaileys();
  const client = pgClient();
  await client.connect();
  const manifest = {};
  const digests = {};
  try {
    const companies = await client.query('SELECT company_id, creds FROM whatsapp_auth ORDER BY company_id COLLATE "C"');
    for (const { company_id: companyId, creds } of companies.rows) {
      const dir = path.join(opts.dest, `company_${companyId}`);
      await fsp.rm(dir, { recursive: true, force: true });
      const { state, saveCreds } = await baileys.useMultiFileAuthState(dir);
      for (const name of Object.keys(state.creds)) delete state.creds[name];
      Object.assign(state.creds, reviveBuffers(creds));
      await saveCreds();
      const rows = await client.query(
        'SELECT key_type, key_id, value FROM whatsapp_keys WHERE company_id = $1 ORDER BY key_type COLLATE "C", key_id COLLATE "C"',
        [companyId],
      );
      const files = { 'creds.json': await fileEntry(dir, 'creds.json', 'creds') };
      const data = {};
      for (const row of rows.rows) {
        data[row.key_type] = data[row.key_type] || {};
        data[row.key_type][row.key_id] = reviveBuffers(row.value);
      }
      await state.keys.set(data);
      for (const row of rows.rows) {
        const name = keyFileName(row.key_type, row.key_id);
        files[name] = await fileEntry(dir, name, row.key_type, row.key_id);
      }
      manifest[companyId] = { files };
      digests[companyId] = stateDigest(creds, rows.rows.map((r) => ({ type: r.key_type, id: r.key_id, value: r.value })));
    }
  } finally {
    await client.end();
  }
  if (opts.manifest) await writeManifest(opts.dest, manifest);
  return { digests };
}

/** A large tree, written directly with BufferJSON.replacer and fixFileName. */
async function genFiles(opts) {
  const baileys = await loadBaileys();
  const { BufferJSON } = baileys;
  const manifest = {};
  const digests = {};
  await fsp.mkdir(opts.dest, { recursive: true });
  for (let c = 1; c <= opts.companies; c++) {
    const companyId = `${opts.prefix}${c}`;
    const dir = path.join(opts.dest, `company_${companyId}`);
    await fsp.mkdir(dir, { recursive: true });
    const creds = baileys.initAuthCreds();
    const keys = makeKeys(baileys, companyId, opts.keys);
    const files = {};
    const write = async (name, value, type, id) => {
      const text = JSON.stringify(value, BufferJSON.replacer);
      await fsp.writeFile(path.join(dir, name), text);
      if (opts.manifest) {
        const sha256 = crypto.createHash('sha256').update(text).digest('hex');
        files[name] = type === 'creds' ? { type, sha256 } : { type, id, sha256 };
      }
    };
    await write('creds.json', creds, 'creds');
    for (let i = 0; i < keys.length; i += 100) {
      await Promise.all(keys.slice(i, i + 100).map((k) => write(keyFileName(k.type, k.id), k.value, k.type, k.id)));
    }
    if (opts.manifest) manifest[companyId] = { files };
    digests[companyId] = stateDigest(JSON.parse(asStoredJson(creds)), keys.map((k) => ({ type: k.type, id: k.id, value: JSON.parse(asStoredJson(k.value)) })));
  }
  if (opts.manifest) await writeManifest(opts.dest, manifest);
  return { digests };
}

function parseArgs(argv) {
  const opts = { companies: 2, keys: 40, prefix: 'co', manifest: true, dest: null };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const next = () => {
      if (i + 1 >= argv.length) throw new Error(`${a} needs a value`);
      return argv[++i];
    };
    if (a === '--companies') opts.companies = Number(next());
    else if (a === '--keys') opts.keys = Number(next());
    else if (a === '--prefix') opts.prefix = next();
    else if (a === '--dest') opts.dest = path.resolve(next());
    else if (a === '--no-manifest') opts.manifest = false;
    else throw new Error(`unknown argument ${a}`);
  }
  if (!/^[A-Za-z0-9_-]{1,40}$/.test(opts.prefix)) throw new Error('--prefix must match [A-Za-z0-9_-]{1,40}');
  return opts;
}

async function main() {
  const [command, ...rest] = process.argv.slice(2);
  const opts = parseArgs(rest);
  let out;
  if (command === 'seed-pg') out = await seedPg(opts);
  else if (command === 'pg-to-files') {
    if (!opts.dest) throw new Error('--dest is required');
    out = await pgToFiles(opts);
  } else if (command === 'gen-files') {
    if (!opts.dest) throw new Error('--dest is required');
    out = await genFiles(opts);
  } else throw new Error('usage: fixture.js seed-pg|pg-to-files|gen-files [options] (see the head of this file)');
  process.stdout.write(JSON.stringify(out) + '\n');
}

if (require.main === module) {
  main().catch((error) => {
    process.stderr.write(`fixture.js: ${error.message}\n`);
    process.exit(1);
  });
}

module.exports = { makeKeys, asStoredJson, reviveBuffers, bytes, genFiles };
