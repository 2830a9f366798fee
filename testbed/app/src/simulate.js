'use strict';
// POST /simulate: changes one company's auth state the way the live WhatsApp
// service does, on the store in use, with the same request and the same
// answer on both stores:
//
//   new keys (new ids, in no manifest)   files: state.keys.set({...}) of
//                                        Baileys' useMultiFileAuthState(dir)
//                                        (fixFileName, BufferJSON.replacer);
//                                        postgres: INSERT ... ON CONFLICT DO
//                                        UPDATE, plain JSON.stringify values
//   consumed pre-keys                    files: set to null (Baileys deletes
//                                        the files); postgres: DELETE
//   creds after a pre-key upload         files: saveCreds(); postgres: UPDATE
//   (getNextPreKeys: nextPreKeyId,       whatsapp_auth.creds
//   firstUnuploadedPreKeyId) and an app
//   state sync (accountSyncCounter + 1)
//
// What changes is planned by plan() from the seed and the company's state
// alone (its keys' Baileys file names and its creds), never from the company
// id or the store: equal states change equally, on files and on PostgreSQL.
// The failback must recover the new ids with the type-aware reverse of
// fixFileName: every id made here reverses unambiguously (session ids
// unchanged, sender-key "--" -> "::", app-state-sync-key "__" -> "/").
//
// The answer carries, per written key, the sha256 of its state-digest line as
// the store holds it (read back: the file Baileys wrote, the row PostgreSQL
// returned), and the sha256 of the creds line after the request.

const crypto = require('node:crypto');
const fsp = require('node:fs/promises');
const path = require('node:path');
const { COMPANY_ID_RE } = require('./config');
const { credsLine, keyFileName, keyLine, lineSha256, parseKeyFileName } = require('./digest');
const { credsIdentity } = require('./identity');
const { loadBaileys } = require('./baileys');

const MAX_COUNT = 1000;
const MAX_SEED_LENGTH = 200;
const DEFAULTS = Object.freeze({ newKeys: 3, consumePreKeys: 1, touchCreds: true, seed: 'baileys-dr-simulate' });
const FIELDS = new Set(['company', 'newKeys', 'consumePreKeys', 'touchCreds', 'seed']);
// The new keys cycle over these types; the first three are always there when newKeys >= 3.
const TYPE_CYCLE = Object.freeze(['session', 'sender-key', 'app-state-sync-key', 'pre-key', 'sender-key-memory']);
// Pre-key ids as Baileys makes them (a file name "pre-key-<id>.json" with another id is not counted).
const PRE_KEY_ID_RE = /^(0|[1-9][0-9]{0,14})$/;
// expires_at the application sets (../shared/DOMAIN.md section 1): 7 days for these types, 14 for the others.
const SHORT_LIVED_TYPES = new Set(['lid-mapping', 'pre-key', 'session', 'sender-key']);
// PKCS#8 DER prefix of an X25519 private key (RFC 8410), followed by the 32 raw bytes.
const X25519_PKCS8_PREFIX = Buffer.from('302e020100300506032b656e04220420', 'hex');

class SimulateError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function isPlainObject(value) {
  return value !== null && typeof value === 'object' && !Array.isArray(value);
}

function count(body, name) {
  if (!Object.prototype.hasOwnProperty.call(body, name)) return DEFAULTS[name];
  const value = body[name];
  if (!Number.isInteger(value) || value < 0 || value > MAX_COUNT) {
    throw new SimulateError(400, `${name} must be an integer from 0 to ${MAX_COUNT}`);
  }
  return value;
}

/** The validated request, or throws SimulateError(400). */
function parseRequest(body) {
  if (!isPlainObject(body)) throw new SimulateError(400, 'the body must be a JSON object');
  const unknown = Object.keys(body).filter((name) => !FIELDS.has(name));
  if (unknown.length) throw new SimulateError(400, `unknown field(s): ${unknown.map((n) => JSON.stringify(n)).join(', ')}`);
  if (typeof body.company !== 'string' || !COMPANY_ID_RE.test(body.company)) {
    throw new SimulateError(400, 'company must be a string matching ^[A-Za-z0-9_-]{1,50}$');
  }
  let touchCreds = DEFAULTS.touchCreds;
  if (Object.prototype.hasOwnProperty.call(body, 'touchCreds')) {
    if (typeof body.touchCreds !== 'boolean') throw new SimulateError(400, 'touchCreds must be true or false');
    touchCreds = body.touchCreds;
  }
  let seed = DEFAULTS.seed;
  if (Object.prototype.hasOwnProperty.call(body, 'seed')) {
    if (typeof body.seed !== 'string' || body.seed.length > MAX_SEED_LENGTH) {
      throw new SimulateError(400, `seed must be a string of at most ${MAX_SEED_LENGTH} characters`);
    }
    seed = body.seed;
  }
  return {
    company: body.company,
    newKeys: count(body, 'newKeys'),
    consumePreKeys: count(body, 'consumePreKeys'),
    touchCreds,
    seed,
  };
}

/** Deterministic pseudo-random bytes of (seed parts). */
function bytes(n, ...parts) {
  const out = Buffer.alloc(n);
  let block = crypto.createHash('sha256').update(JSON.stringify(parts)).digest();
  for (let i = 0; i < n; i += 32) {
    block.copy(out, i, 0, Math.min(32, n - i));
    block = crypto.createHash('sha256').update(block).digest();
  }
  return out;
}

/** A real Curve25519 key pair from 32 seed bytes, in Baileys' shape (Curve.generateKeyPair: public without the version byte). */
function keyPair(seedBytes) {
  const priv = Buffer.from(seedBytes);
  priv[0] &= 248;
  priv[31] &= 127;
  priv[31] |= 64;
  const key = crypto.createPrivateKey({ key: Buffer.concat([X25519_PKCS8_PREFIX, priv]), format: 'der', type: 'pkcs8' });
  const pub = Buffer.from(crypto.createPublicKey(key).export({ format: 'jwk' }).x, 'base64url');
  return { private: priv, public: pub };
}

const num = (buf) => buf.readUInt32BE(0);

/** A realistic id of a type (not pre-key), from the rng b. */
function makeId(type, b) {
  const user = String(4915550000 + (num(b(4, 'user')) % 10000));
  const device = num(b(4, 'device')) % 24;
  const group = `120363${String(num(b(4, 'group')) % 1e9).padStart(12, '0')}@g.us`;
  switch (type) {
    case 'session':
      return `${user}.${device}`; // signal address user.device
    case 'sender-key':
      return `${group}::${user}::${device}`; // file: group--user--device
    case 'sender-key-memory':
      return group;
    case 'app-state-sync-key': {
      // 6-byte key id as base64 (8 chars); bytes 4-5 are chosen so that the
      // 7th character is always '/' (file name "__").
      const r = b(4, 'asid');
      return Buffer.from([0, 0, r[0], r[1], (r[2] & 0xf0) | 0x0f, 0xc0 | (r[3] & 0x3f)]).toString('base64');
    }
    default:
      throw new Error(`no id shape for ${type}`);
  }
}

/** The live value (Buffers, a proto message) Baileys would hold for a key. */
function makeValue(baileys, type, id, b) {
  switch (type) {
    case 'pre-key':
      return keyPair(b(32, 'pre-key'));
    case 'session': {
      const base = b(33, 'base').toString('base64');
      return {
        _sessions: {
          [base]: {
            registrationId: b(2, 'rid').readUInt16BE(0) & 0x3fff,
            currentRatchet: {
              ephemeralKeyPair: { pubKey: b(33, 'ep').toString('base64'), privKey: b(32, 'es').toString('base64') },
              lastRemoteEphemeralKey: b(33, 'lr').toString('base64'),
              previousCounter: 0,
              rootKey: b(32, 'rk').toString('base64'),
            },
            indexInfo: { baseKey: base, baseKeyType: 1, closed: -1, used: 1760000000000, created: 1760000000000, remoteIdentityKey: b(33, 'ri').toString('base64') },
            _chains: { [b(33, 'ch').toString('base64')]: { chainKey: { counter: 0, key: b(32, 'ck').toString('base64') }, chainType: 2, messageKeys: {} } },
          },
        },
        version: 'v1',
      };
    }
    case 'sender-key': {
      // Baileys stores Buffer.from(JSON.stringify(SenderKeyRecord.serialize()))
      const record = [{
        senderKeyId: num(b(4, 'skid')) >>> 1,
        senderChainKey: { iteration: 0, seed: b(32, 'seed').toString('base64') },
        senderSigningKey: { public: b(33, 'ssk').toString('base64') },
        senderMessageKeys: [],
      }];
      return Buffer.from(JSON.stringify(record), 'utf-8');
    }
    case 'sender-key-memory': {
      const user = String(4915550000 + (num(b(4, 'member')) % 10000));
      return { [`${user}:${num(b(4, 'mdev')) % 24}@s.whatsapp.net`]: true };
    }
    case 'app-state-sync-key':
      return baileys.proto.Message.AppStateSyncKeyData.fromObject({
        keyData: b(32, 'keyData'),
        fingerprint: { rawId: num(b(4, 'rawId')), currentIndex: 0, deviceIndexes: [0] },
        timestamp: 1760000000000 + (num(b(4, 'ts')) % 86400000),
      });
    default:
      throw new Error(`no value shape for ${type}`);
  }
}

/**
 * What one request does to a company, from the seed and the company's state
 * alone: names, the Baileys file names of its keys (other names are ignored
 * unless they collide); creds, its creds (Baileys' object or the stored JSON:
 * only the pre-key counters are read). Returns {written: [{type, id, file,
 * value}], deleted: [{type, id, file}], updateCreds(creds)}: value is the live
 * value Baileys would hold; updateCreds changes creds in place as Baileys
 * would. Throws SimulateError(400) when there are too few pre-keys.
 */
function plan(baileys, request, names, creds) {
  const { company, seed } = request;
  const taken = new Set(names);
  const preKeyIds = [];
  for (const name of taken) {
    const parsed = parseKeyFileName(name);
    if (parsed && parsed.type === 'pre-key' && PRE_KEY_ID_RE.test(parsed.name)) preKeyIds.push(Number(parsed.name));
  }
  preKeyIds.sort((a, b) => a - b);
  if (preKeyIds.length < request.consumePreKeys) {
    throw new SimulateError(400, `company ${company} has ${preKeyIds.length} pre-key(s), cannot consume ${request.consumePreKeys}`);
  }
  // The oldest pre-keys are the ones peers consumed first.
  const deleted = preKeyIds.slice(0, request.consumePreKeys).map(String)
    .map((id) => ({ type: 'pre-key', id, file: keyFileName('pre-key', id) }));
  const maxPreKey = preKeyIds.length ? preKeyIds[preKeyIds.length - 1] : 0;

  // New keys (Baileys: generateOrGetPreKeys numbers new pre-keys from creds.nextPreKeyId).
  const nextPreKeyId = Number.isInteger(creds.nextPreKeyId) ? creds.nextPreKeyId : 1;
  let preKeyId = Math.max(maxPreKey + 1, nextPreKeyId);
  const written = [];
  for (let i = 0; i < request.newKeys; i++) {
    const type = TYPE_CYCLE[i % TYPE_CYCLE.length];
    let id;
    let file;
    for (let attempt = 0; ; attempt++) {
      id = type === 'pre-key' ? String(preKeyId++) : makeId(type, (n, ...parts) => bytes(n, seed, type, i, attempt, ...parts));
      file = keyFileName(type, id);
      if (!taken.has(file)) break;
    }
    taken.add(file);
    written.push({ type, id, file, value: makeValue(baileys, type, id, (n, ...parts) => bytes(n, seed, type, id, ...parts)) });
  }

  const lastPreKeyId = preKeyId - 1;
  // getNextPreKeys' update after an upload of every pre-key now stored, then
  // an app state sync (chats.js: accountSyncCounter + 1).
  const updateCreds = (target) => {
    const firstUnuploaded = Number.isInteger(target.firstUnuploadedPreKeyId) ? target.firstUnuploadedPreKeyId : 1;
    target.nextPreKeyId = Math.max(lastPreKeyId + 1, nextPreKeyId);
    target.firstUnuploadedPreKeyId = Math.max(firstUnuploaded, lastPreKeyId + 1);
    target.accountSyncCounter = (Number.isInteger(target.accountSyncCounter) ? target.accountSyncCounter : 0) + 1;
    // process-message.js: a shared app state key becomes myAppStateKeyId
    const appStateKey = written.filter((w) => w.type === 'app-state-sync-key').pop();
    if (appStateKey) target.myAppStateKeyId = appStateKey.id;
  };
  return { written, deleted, updateCreds };
}

/** An entry of the answer's `written`: the key and the sha256 of its digest line as stored. */
function writtenEntry(key, storedValue) {
  return { type: key.type, id: key.id, file: key.file, line_sha256: lineSha256(keyLine(key.type, key.id, storedValue)) };
}

async function exists(file) {
  try {
    await fsp.lstat(file);
    return true;
  } catch (error) {
    if (error.code === 'ENOENT') return false;
    throw error;
  }
}

/**
 * Runs one simulation on <sessionsDir>/company_<company> through Baileys.
 * request: the output of parseRequest; hooks.beforeWrite(), when given, is
 * called once right before Baileys writes anything (never when the request is
 * refused, nor when it changes nothing). Returns {answer: {company, written,
 * deleted, creds_changed, creds_sha256} (the caller adds the digest),
 * changedFiles: the key file names written or deleted}; throws SimulateError
 * (400 unknown company or too few pre-keys, 409 creds not loadable) or other
 * errors (500).
 */
async function simulateFiles(sessionsDir, request, hooks = {}) {
  const { company } = request;
  const dir = path.join(sessionsDir, `company_${company}`);
  const info = await fsp.stat(dir).catch(() => null);
  if (!info || !info.isDirectory()) throw new SimulateError(400, `company ${company} does not exist (no directory company_${company})`);
  // Baileys would silently start with fresh credentials (and saveCreds would write them).
  const credsError = await require('./stores/files').checkCreds(dir);
  if (credsError) throw new SimulateError(409, `company ${company}: ${credsError}; refusing to let Baileys replace it`);

  const names = (await fsp.readdir(dir, { withFileTypes: true })).filter((d) => d.isFile()).map((d) => d.name);
  const baileys = await loadBaileys();
  const credsFile = path.join(dir, 'creds.json');
  const credsBefore = await fsp.readFile(credsFile);
  const { state, saveCreds } = await baileys.useMultiFileAuthState(dir);
  if (!Number.isInteger(state.creds.registrationId)) throw new SimulateError(409, `company ${company}: creds has no integer registrationId`);
  const change = plan(baileys, request, names, state.creds);

  if (hooks.beforeWrite && (change.written.length || change.deleted.length || request.touchCreds)) hooks.beforeWrite();
  if (change.written.length) {
    const data = {};
    for (const w of change.written) (data[w.type] = data[w.type] || {})[w.id] = w.value;
    await state.keys.set(data);
  }
  if (change.deleted.length) await state.keys.set({ 'pre-key': Object.fromEntries(change.deleted.map((d) => [d.id, null])) });
  if (request.touchCreds) {
    change.updateCreds(state.creds);
    await saveCreds();
  }
  const credsAfter = await fsp.readFile(credsFile);

  // What Baileys did is checked, not assumed: the lines hashed are those of the files it wrote.
  const written = [];
  for (const w of change.written) {
    let text;
    try {
      text = await fsp.readFile(path.join(dir, w.file), 'utf8');
    } catch (error) {
      if (error.code === 'ENOENT') throw new Error(`Baileys did not write ${w.file}`);
      throw error;
    }
    written.push(writtenEntry(w, JSON.parse(text)));
  }
  for (const d of change.deleted) {
    if (await exists(path.join(dir, d.file))) throw new Error(`Baileys did not delete ${d.file}`);
  }
  const answer = {
    company,
    written,
    deleted: change.deleted,
    creds_changed: !credsBefore.equals(credsAfter),
    creds_sha256: lineSha256(credsLine(JSON.parse(credsAfter.toString('utf8')))),
  };
  return { answer, changedFiles: [...change.written, ...change.deleted].map((k) => k.file) };
}

// The application's batch upsert (../shared/DOMAIN.md section 1), one row per array element.
const UPSERT_KEYS = `
  INSERT INTO whatsapp_keys (company_id, key_type, key_id, value, expires_at)
  SELECT $1, k.key_type, k.key_id, k.value::jsonb, now() + make_interval(days => k.days)
    FROM unnest($2::text[], $3::text[], $4::text[], $5::int[]) AS k(key_type, key_id, value, days)
  ON CONFLICT (company_id, key_type, key_id) DO UPDATE
     SET value = EXCLUDED.value, expires_at = EXCLUDED.expires_at
  RETURNING key_type, key_id, value`;
const DELETE_PRE_KEYS = `
  DELETE FROM whatsapp_keys
   WHERE company_id = $1 AND key_type = 'pre-key' AND key_id = ANY($2::text[])
  RETURNING key_id`;

/** The simulation inside the caller's transaction: {answer, company: the service's view of it}. */
async function simulateInTransaction(client, baileys, request) {
  const { company } = request;
  // The row lock serialises requests on one company across processes (PM2 cluster mode).
  const auth = await client.query('SELECT creds FROM whatsapp_auth WHERE company_id = $1 FOR UPDATE', [company]);
  if (!auth.rows.length) throw new SimulateError(400, `company ${company} does not exist (no whatsapp_auth row)`);
  const creds = auth.rows[0].creds;
  const problem = require('./stores/postgres').credsProblem(creds);
  if (problem) throw new SimulateError(409, `company ${company}: ${problem}`);
  const keys = await client.query('SELECT key_type, key_id FROM whatsapp_keys WHERE company_id = $1', [company]);
  const names = keys.rows.map((row) => keyFileName(row.key_type, row.key_id));
  names.push('creds.json'); // as in a session directory: no key can be named so
  const change = plan(baileys, request, names, creds);

  const stored = new Map();
  if (change.written.length) {
    const { rows } = await client.query(UPSERT_KEYS, [
      company,
      change.written.map((w) => w.type),
      change.written.map((w) => w.id),
      change.written.map((w) => JSON.stringify(w.value)), // the application's form: byte-array Buffers
      change.written.map((w) => (SHORT_LIVED_TYPES.has(w.type) ? 7 : 14)),
    ]);
    for (const row of rows) stored.set(JSON.stringify([row.key_type, row.key_id]), row.value);
  }
  const written = change.written.map((w) => {
    const key = JSON.stringify([w.type, w.id]);
    if (!stored.has(key)) throw new Error(`PostgreSQL did not return the row of ${w.type} ${JSON.stringify(w.id)}`);
    return writtenEntry(w, stored.get(key));
  });
  if (change.deleted.length) {
    const { rowCount } = await client.query(DELETE_PRE_KEYS, [company, change.deleted.map((d) => d.id)]);
    if (rowCount !== change.deleted.length) throw new Error(`deleted ${rowCount} of ${change.deleted.length} consumed pre-key row(s)`);
  }
  let credsAfter = creds;
  if (request.touchCreds) {
    // the stored JSON changed as Baileys changes its creds object; Buffers keep the form they have
    const next = JSON.parse(JSON.stringify(creds));
    change.updateCreds(next);
    const { rows } = await client.query('UPDATE whatsapp_auth SET creds = $2::jsonb WHERE company_id = $1 RETURNING creds', [company, JSON.stringify(next)]);
    credsAfter = rows[0].creds;
  }
  // read back in the transaction: the digest of what the commit makes visible
  const { digest, keys: keyCount } = await require('./stores/postgres').digestCompany(client, company, credsAfter);
  const answer = {
    company,
    written,
    deleted: change.deleted,
    creds_changed: credsLine(creds) !== credsLine(credsAfter),
    creds_sha256: lineSha256(credsLine(credsAfter)),
    digest,
  };
  return { answer, company: { id: company, digest, keys: keyCount, ...credsIdentity(credsAfter) } };
}

/**
 * Runs one simulation on PostgreSQL in ONE transaction (all of it or none of
 * it), through a connection of pool. request: the output of parseRequest.
 * Returns {answer: {company, written, deleted, creds_changed, creds_sha256,
 * digest}, company: {id, digest, keys, registrationId, me}} once committed;
 * throws SimulateError (400 unknown company or too few pre-keys, 409 creds
 * unusable) or other errors (500), the transaction rolled back.
 */
async function simulatePostgres(pool, request) {
  const baileys = await loadBaileys(); // the proto of app-state-sync-key values
  const client = await pool.connect();
  let broken;
  try {
    await client.query('BEGIN');
    const out = await simulateInTransaction(client, baileys, request);
    await client.query('COMMIT');
    return out;
  } catch (error) {
    await client.query('ROLLBACK').catch((rollbackError) => {
      broken = rollbackError;
    });
    throw error;
  } finally {
    client.release(broken); // a connection that could not roll back is not reused
  }
}

module.exports = { DEFAULTS, MAX_COUNT, TYPE_CYCLE, SimulateError, parseRequest, plan, simulateFiles, simulatePostgres, keyPair };
