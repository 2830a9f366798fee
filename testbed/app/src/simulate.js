'use strict';
// POST /simulate (file store only): changes one company's session directory
// the way the live WhatsApp service does while PostgreSQL is down, through
// Baileys' own code paths: the state of useMultiFileAuthState(dir), so file
// names go through Baileys' fixFileName and values through
// BufferJSON.replacer exactly as Baileys writes them.
//
//   state.keys.set({...})                  new keys (new ids, not in any manifest)
//   state.keys.set({'pre-key': {id: null}}) consumed pre-keys (Baileys deletes the files)
//   creds update + saveCreds()             as after a pre-key upload
//                                          (getNextPreKeys: nextPreKeyId,
//                                          firstUnuploadedPreKeyId) and an app
//                                          state sync (accountSyncCounter + 1)
//
// Everything is deterministic from the seed and the directory's contents
// (not from the company id: two equal directories change equally).
// The failback must recover the new ids with the type-aware reverse of
// fixFileName: every id made here reverses unambiguously (session ids
// unchanged, sender-key "--" -> "::", app-state-sync-key "__" -> "/").

const crypto = require('node:crypto');
const fsp = require('node:fs/promises');
const path = require('node:path');
const { COMPANY_ID_RE } = require('./config');
const { keyFileName, parseKeyFileName } = require('./digest');
const { loadBaileys } = require('./baileys');

const MAX_COUNT = 1000;
const MAX_SEED_LENGTH = 200;
const DEFAULTS = Object.freeze({ newKeys: 3, consumePreKeys: 1, touchCreds: true, seed: 'baileys-dr-simulate' });
const FIELDS = new Set(['company', 'newKeys', 'consumePreKeys', 'touchCreds', 'seed']);
// The new keys cycle over these types; the first three are always there when newKeys >= 3.
const TYPE_CYCLE = Object.freeze(['session', 'sender-key', 'app-state-sync-key', 'pre-key', 'sender-key-memory']);
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
 * Runs one simulation on <sessionsDir>/company_<company>. request: the output
 * of parseRequest. Returns {company, written, deleted, creds_changed}; throws
 * SimulateError (400 unknown company or too few pre-keys, 409 creds not
 * loadable) or other errors (500).
 */
async function simulate(sessionsDir, request) {
  const { company, seed } = request;
  const dir = path.join(sessionsDir, `company_${company}`);
  const info = await fsp.stat(dir).catch(() => null);
  if (!info || !info.isDirectory()) throw new SimulateError(400, `company ${company} does not exist (no directory company_${company})`);
  // Baileys would silently start with fresh credentials (and saveCreds would write them).
  const credsError = await require('./stores/files').checkCreds(dir);
  if (credsError) throw new SimulateError(409, `company ${company}: ${credsError}; refusing to let Baileys replace it`);

  const names = (await fsp.readdir(dir, { withFileTypes: true })).filter((d) => d.isFile()).map((d) => d.name);
  const taken = new Set(names);
  const preKeyIds = [];
  for (const name of names) {
    const parsed = parseKeyFileName(name);
    if (parsed && parsed.type === 'pre-key' && /^(0|[1-9][0-9]{0,14})$/.test(parsed.name)) preKeyIds.push(Number(parsed.name));
  }
  preKeyIds.sort((a, b) => a - b);
  if (preKeyIds.length < request.consumePreKeys) {
    throw new SimulateError(400, `company ${company} has ${preKeyIds.length} pre-key(s), cannot consume ${request.consumePreKeys}`);
  }
  // The oldest pre-keys are the ones peers consumed first.
  const consumed = preKeyIds.slice(0, request.consumePreKeys).map(String);
  const maxPreKey = preKeyIds.length ? preKeyIds[preKeyIds.length - 1] : 0;

  const baileys = await loadBaileys();
  const credsFile = path.join(dir, 'creds.json');
  const credsBefore = await fsp.readFile(credsFile);
  const { state, saveCreds } = await baileys.useMultiFileAuthState(dir);
  const creds = state.creds;
  if (!Number.isInteger(creds.registrationId)) throw new SimulateError(409, `company ${company}: creds has no integer registrationId`);

  // New keys (Baileys: generateOrGetPreKeys numbers new pre-keys from creds.nextPreKeyId).
  const nextPreKeyId = Number.isInteger(creds.nextPreKeyId) ? creds.nextPreKeyId : 1;
  let preKeyId = Math.max(maxPreKey + 1, nextPreKeyId);
  const data = {};
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
    (data[type] = data[type] || {})[id] = makeValue(baileys, type, id, (n, ...parts) => bytes(n, seed, type, id, ...parts));
    written.push({ type, id, file });
  }
  if (written.length) await state.keys.set(data);

  const deleted = consumed.map((id) => ({ type: 'pre-key', id, file: keyFileName('pre-key', id) }));
  if (deleted.length) await state.keys.set({ 'pre-key': Object.fromEntries(consumed.map((id) => [id, null])) });

  if (request.touchCreds) {
    // getNextPreKeys' update after an upload of every pre-key now stored, then
    // an app state sync (chats.js: accountSyncCounter + 1).
    const lastPreKeyId = preKeyId - 1;
    const firstUnuploaded = Number.isInteger(creds.firstUnuploadedPreKeyId) ? creds.firstUnuploadedPreKeyId : 1;
    creds.nextPreKeyId = Math.max(lastPreKeyId + 1, nextPreKeyId);
    creds.firstUnuploadedPreKeyId = Math.max(firstUnuploaded, lastPreKeyId + 1);
    creds.accountSyncCounter = (Number.isInteger(creds.accountSyncCounter) ? creds.accountSyncCounter : 0) + 1;
    // process-message.js: a shared app state key becomes myAppStateKeyId
    const appStateKey = written.filter((w) => w.type === 'app-state-sync-key').pop();
    if (appStateKey) creds.myAppStateKeyId = appStateKey.id;
    await saveCreds();
  }
  const credsAfter = await fsp.readFile(credsFile);

  // What Baileys did is checked, not assumed.
  for (const w of written) {
    if (!(await exists(path.join(dir, w.file)))) throw new Error(`Baileys did not write ${w.file}`);
  }
  for (const d of deleted) {
    if (await exists(path.join(dir, d.file))) throw new Error(`Baileys did not delete ${d.file}`);
  }
  return { company, written, deleted, creds_changed: !credsBefore.equals(credsAfter) };
}

module.exports = { DEFAULTS, MAX_COUNT, TYPE_CYCLE, SimulateError, parseRequest, simulate, keyPair };
