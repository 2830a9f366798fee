'use strict';
// File store: <SESSIONS_DIR>/company_<id>/, read with Baileys' own
// useMultiFileAuthState (this is the file-auth code of the emergency tag).
//
// Two phases, like the real service (creds at start, keys on demand):
//
// load() makes the service ready: per company, creds.json is checked first
// (exists, parses, is an object: Baileys would otherwise silently start with
// fresh credentials), then loaded through useMultiFileAuthState (no byte-array
// Buffers, an integer registrationId). No key file is read.
//
// verify() is the background pass after ready: every "<type>-<name>.json"
// file is read back through state.keys.get(type, [id]) and the company's
// state digest computed, with the original id from the company's baileys-dr
// manifest (<SESSIONS_DIR>/.baileys-dr/companies/<id>.json, listed by the top
// manifest <SESSIONS_DIR>/.baileys-dr/manifest.json; docs/architecture.md) or,
// for older trees, from <SESSIONS_DIR>/manifest.json when it maps the file,
// else the type-aware reverse of fixFileName (reported as guessed). The keys
// are read in a worker thread, replaced every options.recycleFiles key files:
// useMultiFileAuthState keeps one mutex per file path it ever touched in a
// module-level Map that is never emptied (about 300 bytes a file), so one
// process reading 1.5M files would keep ~0.5 GB for nothing. One company
// (and one company manifest) is held in memory at a time.

const crypto = require('node:crypto');
const fsp = require('node:fs/promises');
const path = require('node:path');
const { Worker, isMainThread, parentPort, workerData } = require('node:worker_threads');
const digestLib = require('../digest');
const { COMPANY_ID_RE } = require('../config');
const { loadBaileys } = require('../baileys');
const { credsIdentity } = require('../identity');

const { StateDigest, keyLine, keyFileName, parseKeyFileName, reverseFileName, sortKeys } = digestLib;

const READ_BATCH = 64; // ids per state.keys.get call, read concurrently by Baileys
const GUESSED_LISTED = 20; // guessed ids listed per company in /health (all are counted)
const LOAD_CONCURRENCY = 8; // companies whose creds are read at once before ready
// Key files a verification worker reads before it is replaced (tests lower it).
const options = { recycleFiles: 100000 };
const WORKER_ROLE = 'baileys-dr-files-verify';

function shown(text) {
  const json = JSON.stringify(String(text));
  return json.length > 80 ? json.slice(0, 77) + '..."' : json;
}

/** The manifest's files of each company, or {} (a missing manifest is normal). */
async function readManifest(sessionsDir, warnings) {
  const file = path.join(sessionsDir, 'manifest.json');
  let text;
  try {
    text = await fsp.readFile(file, 'utf8');
  } catch (error) {
    if (error.code !== 'ENOENT') warnings.push(`manifest.json unreadable (${error.code || error.message}): ids will be guessed`);
    return {};
  }
  let manifest;
  try {
    manifest = JSON.parse(text);
  } catch (error) {
    warnings.push(`manifest.json is not JSON (${error.message}): ids will be guessed`);
    return {};
  }
  if (!manifest || manifest.format !== 1 || typeof manifest.companies !== 'object' || manifest.companies === null) {
    warnings.push('manifest.json has an unknown format (expected {"format": 1, "companies": {...}}): ids will be guessed');
    return {};
  }
  return manifest.companies;
}

/** The companies of <SESSIONS_DIR>/.baileys-dr/manifest.json (format 1), or null without one. */
async function readTreeManifest(sessionsDir, warnings) {
  let text;
  try {
    text = await fsp.readFile(path.join(sessionsDir, '.baileys-dr', 'manifest.json'), 'utf8');
  } catch (error) {
    if (error.code !== 'ENOENT') warnings.push(`.baileys-dr/manifest.json unreadable (${error.code || error.message})`);
    return null;
  }
  try {
    const manifest = JSON.parse(text);
    if (manifest && manifest.format === 1 && manifest.companies !== null && typeof manifest.companies === 'object') return manifest.companies;
  } catch (error) {
    warnings.push(`.baileys-dr/manifest.json is not JSON (${error.message})`);
    return null;
  }
  warnings.push('.baileys-dr/manifest.json has an unknown format (expected {"format": 1, "companies": {...}})');
  return null;
}

/** The files of one company's manifest (.baileys-dr/companies/<id>.json), or null. */
async function readCompanyManifest(sessionsDir, companyId, listed, warnings) {
  let data;
  try {
    data = await fsp.readFile(path.join(sessionsDir, '.baileys-dr', 'companies', `${companyId}.json`));
  } catch (error) {
    if (error.code !== 'ENOENT' || listed) {
      warnings.push(`company ${companyId}: its manifest is unreadable (${error.code || error.message}): ids will be guessed`);
    }
    return null;
  }
  if (listed && typeof listed.manifest_sha256 === 'string' &&
      crypto.createHash('sha256').update(data).digest('hex') !== listed.manifest_sha256) {
    warnings.push(`company ${companyId}: its manifest does not match the top manifest (tree not verified)`);
  }
  try {
    const manifest = JSON.parse(data.toString('utf8'));
    if (manifest && manifest.company_id === companyId && manifest.files !== null && typeof manifest.files === 'object') return manifest.files;
  } catch (error) {
    warnings.push(`company ${companyId}: its manifest is not JSON (${error.message}): ids will be guessed`);
    return null;
  }
  warnings.push(`company ${companyId}: its manifest has an unknown format: ids will be guessed`);
  return null;
}

/** A value still holding the byte-array Buffer form was not revived by Baileys (>= 7.0.0-rc.4 revives base64 only). */
function hasUnrevivedBuffer(value, depth = 0) {
  if (value === null || typeof value !== 'object' || value instanceof Uint8Array || depth > 64) return false;
  if (Array.isArray(value)) return value.some((v) => hasUnrevivedBuffer(v, depth + 1));
  if (value.type === 'Buffer' && Array.isArray(value.data)) return true;
  return Object.values(value).some((v) => hasUnrevivedBuffer(v, depth + 1));
}

/** What is wrong with creds as Baileys loaded them, or null. */
function credsProblem(creds) {
  if (hasUnrevivedBuffer(creds)) return 'creds.json holds byte-array Buffers, which this Baileys does not revive';
  if (!Number.isInteger(creds.registrationId)) return 'creds has no integer registrationId';
  return null;
}

/** Checks creds.json the way Baileys cannot: returns an error text or null. */
async function checkCreds(dir) {
  const file = path.join(dir, 'creds.json');
  let text;
  try {
    const info = await fsp.stat(file);
    if (!info.isFile()) return 'creds.json is not a regular file';
    text = await fsp.readFile(file, 'utf8');
  } catch (error) {
    return error.code === 'ENOENT' ? 'creds.json is missing' : `creds.json unreadable (${error.code || error.message})`;
  }
  let creds;
  try {
    creds = JSON.parse(text);
  } catch (error) {
    return `creds.json is not valid JSON (${text.length} bytes; ${error.message})`;
  }
  if (creds === null || typeof creds !== 'object' || Array.isArray(creds)) return 'creds.json is not a JSON object';
  return null;
}

function keyEntries(names, manifestFiles, result, companyId) {
  const entries = [];
  for (const name of names) {
    if (name === 'creds.json') continue;
    const mapped = manifestFiles && Object.prototype.hasOwnProperty.call(manifestFiles, name) ? manifestFiles[name] : null;
    if (mapped && typeof mapped.type === 'string' && typeof mapped.id === 'string' && keyFileName(mapped.type, mapped.id) === name) {
      entries.push({ file: name, type: mapped.type, id: mapped.id, guessed: false, ambiguous: false });
      continue;
    }
    if (mapped && mapped.type !== 'creds') {
      result.warnings.push(`company ${companyId}: manifest entry of ${shown(name)} does not name that file; id guessed`);
    }
    const parsed = parseKeyFileName(name);
    if (!parsed) {
      result.warnings.push(`company ${companyId}: ignored file ${shown(name)} (not a Baileys key file)`);
      continue;
    }
    const { id, ambiguous } = reverseFileName(parsed.type, parsed.name);
    entries.push({ file: name, type: parsed.type, id, guessed: true, ambiguous });
  }
  return entries;
}

/** Verifies one company (every key through Baileys, the digest). Returns how many key files it read. */
async function readCompany(baileys, companyId, dir, manifestFiles, result) {
  const credsError = await checkCreds(dir);
  if (credsError) {
    result.errors.push(`company ${companyId}: ${credsError}`);
    return 0;
  }
  const names = (await fsp.readdir(dir, { withFileTypes: true }))
    .filter((d) => d.isFile())
    .map((d) => d.name);
  const entries = keyEntries(names, manifestFiles, result, companyId);

  const { state } = await baileys.useMultiFileAuthState(dir);
  const creds = state.creds;
  const badCreds = credsProblem(creds);
  if (badCreds) {
    result.errors.push(`company ${companyId}: ${badCreds}`);
    return 0;
  }
  const AppStateSyncKeyData = baileys.proto.Message.AppStateSyncKeyData;
  const lines = [];
  const companyErrors = [];
  const byType = new Map();
  for (const e of entries) {
    if (!byType.has(e.type)) byType.set(e.type, []);
    byType.get(e.type).push(e);
  }
  for (const [type, list] of byType) {
    for (let i = 0; i < list.length; i += READ_BATCH) {
      const batch = list.slice(i, i + READ_BATCH);
      const values = await state.keys.get(type, batch.map((e) => e.id));
      for (const e of batch) {
        let value = values[e.id];
        if (value === null || value === undefined) {
          companyErrors.push(`company ${companyId}: key file ${shown(e.file)} unreadable by Baileys (empty or not JSON)`);
          continue;
        }
        if (type === 'app-state-sync-key') {
          value = AppStateSyncKeyData.toObject(value, { longs: Number });
        } else if (hasUnrevivedBuffer(value)) {
          companyErrors.push(`company ${companyId}: key file ${shown(e.file)} holds byte-array Buffers, which this Baileys does not revive`);
        }
        lines.push({ type, id: e.id, line: keyLine(type, e.id, value) });
      }
    }
  }
  if (companyErrors.length) {
    result.errors.push(...companyErrors);
    return entries.length;
  }
  const digest = new StateDigest(creds);
  for (const l of sortKeys(lines)) digest.addLine(l.type, l.id, l.line);
  const guessed = entries.filter((e) => e.guessed);
  for (const g of guessed.filter((e) => e.ambiguous).slice(0, GUESSED_LISTED)) {
    result.warnings.push(`company ${companyId}: ambiguous file name ${shown(g.file)}, read as ${g.type} id ${shown(g.id)}`);
  }
  result.companies.push({
    id: companyId,
    digest: digest.hexdigest(),
    registrationId: creds.registrationId,
    keys: digest.keys,
    guessedCount: guessed.length,
    ambiguousCount: guessed.filter((e) => e.ambiguous).length,
    guessed: guessed.slice(0, GUESSED_LISTED).map((e) => ({ file: e.file, type: e.type, id: e.id, ambiguous: e.ambiguous })),
  });
  return entries.length;
}

/** The sorted company_* names of the sessions directory, or null (an error is pushed). */
async function companyDirNames(sessionsDir, result) {
  let info;
  try {
    info = await fsp.stat(sessionsDir);
  } catch (error) {
    result.errors.push(`sessions directory ${sessionsDir} is missing (${error.code || error.message})`);
    return null;
  }
  if (!info.isDirectory()) {
    result.errors.push(`sessions directory ${sessionsDir} is not a directory`);
    return null;
  }
  const dirents = await fsp.readdir(sessionsDir, { withFileTypes: true });
  return dirents
    .filter((d) => d.name.startsWith('company_'))
    .map((d) => d.name)
    .sort((a, b) => Buffer.compare(Buffer.from(a), Buffer.from(b)));
}

/** Phase 1 for one company directory: {company} or {error}. */
async function loadCompanyCreds(baileys, sessionsDir, name) {
  const companyId = name.slice('company_'.length);
  if (!COMPANY_ID_RE.test(companyId)) return { error: `sessions directory holds ${shown(name)}: invalid company id` };
  const dir = path.join(sessionsDir, name);
  const st = await fsp.stat(dir).catch(() => null);
  if (!st || !st.isDirectory()) return { error: `company ${companyId}: ${name} is not a directory` };
  try {
    const credsError = await checkCreds(dir);
    if (credsError) return { error: `company ${companyId}: ${credsError}` };
    const { state } = await baileys.useMultiFileAuthState(dir);
    const problem = credsProblem(state.creds);
    if (problem) return { error: `company ${companyId}: ${problem}` };
    return { company: { id: companyId, ...credsIdentity(state.creds) } };
  } catch (error) {
    return { error: `company ${companyId}: ${error.message}` };
  }
}

/**
 * Phase 1 (ready): every company directory's creds through Baileys; no key
 * file is read. ctx: {isStopping(): bool, onCompany(id)}. Returns
 * {companies: [{id, registrationId, me}], errors, warnings} in company order;
 * throws on store-level failures.
 */
async function load(config, ctx = {}) {
  const result = { companies: [], errors: [], warnings: [] };
  const names = await companyDirNames(config.sessionsDir, result);
  if (names === null) return result;
  const baileys = await loadBaileys();
  const outcomes = new Array(names.length);
  let next = 0;
  // a few at a time: the reads wait on the disk, not on this thread
  const lane = async () => {
    while (next < names.length) {
      if (ctx.isStopping && ctx.isStopping()) throw new Error('stopping');
      const i = next++;
      outcomes[i] = await loadCompanyCreds(baileys, config.sessionsDir, names[i]);
      if (ctx.onCompany && outcomes[i].company) ctx.onCompany(outcomes[i].company.id);
    }
  };
  await Promise.all(Array.from({ length: Math.min(LOAD_CONCURRENCY, names.length) }, lane));
  for (const o of outcomes) {
    if (o.company) result.companies.push(o.company);
    else result.errors.push(o.error);
  }
  return result;
}

/**
 * The verification worker: a thread with its own Baileys (so its own
 * fileLocks Map), replaced after options.recycleFiles key files (loading
 * Baileys takes about a second: not started ahead, as two idle Baileys cost
 * more memory than the wait). One company at a time.
 */
class KeyReader {
  constructor() {
    this.slot = null; // {worker, pending, failed}
    this.filesRead = 0;
    this.used = 0; // workers started
  }

  _spawn() {
    const slot = { worker: new Worker(__filename, { workerData: { role: WORKER_ROLE } }), pending: null, failed: null };
    const fail = (error) => {
      slot.failed = slot.failed || error;
      const pending = slot.pending;
      slot.pending = null;
      if (pending) pending.reject(slot.failed);
    };
    slot.worker.on('message', (message) => {
      const pending = slot.pending;
      slot.pending = null;
      if (pending) pending.resolve(message);
    });
    slot.worker.on('error', (error) => fail(new Error(`verification worker failed: ${error.message}`)));
    slot.worker.on('exit', (code) => fail(new Error(`verification worker exited (code ${code})`)));
    this.used += 1;
    this.filesRead = 0;
    return slot;
  }

  /** {result: {companies, errors, warnings}, files} of one company, read by the worker. */
  async read(job) {
    if (this.slot && this.filesRead >= options.recycleFiles) await this.close();
    if (!this.slot) this.slot = this._spawn();
    const slot = this.slot;
    if (slot.failed) throw slot.failed;
    const message = await new Promise((resolve, reject) => {
      slot.pending = { resolve, reject };
      slot.worker.postMessage(job);
    });
    this.filesRead += message.files;
    return message;
  }

  async close() {
    const slot = this.slot;
    this.slot = null;
    if (slot) await slot.worker.terminate();
  }
}

/**
 * Phase 2 (after ready): every key of every loaded company through Baileys,
 * and its digest. ctx: {isStopping(): bool, onResult({companies, errors,
 * warnings})}, called once per company (and once for the manifests' warnings)
 * as soon as it is known. Returns {workers: how many worker threads read the
 * keys}. Throws on store-level failures.
 */
async function verify(config, loaded, ctx = {}) {
  const sessionsDir = config.sessionsDir;
  const report = (part) => ctx.onResult && ctx.onResult(part);
  const warnings = [];
  const treeManifest = await readTreeManifest(sessionsDir, warnings);
  const manifest = await readManifest(sessionsDir, warnings);
  if (warnings.length) report({ companies: [], errors: [], warnings });
  const reader = new KeyReader();
  try {
    for (const { id: companyId } of loaded.companies) {
      if (ctx.isStopping && ctx.isStopping()) throw new Error('stopping');
      const own = [];
      const listed = treeManifest && Object.prototype.hasOwnProperty.call(treeManifest, companyId) ? treeManifest[companyId] : null;
      const manifestCompany = Object.prototype.hasOwnProperty.call(manifest, companyId) ? manifest[companyId] : null;
      const manifestFiles = (await readCompanyManifest(sessionsDir, companyId, listed, own)) ||
        (manifestCompany && typeof manifestCompany.files === 'object' ? manifestCompany.files : null);
      if (manifestCompany) delete manifest[companyId]; // a large manifest is freed as it is used
      const { result } = await reader.read({ companyId, dir: path.join(sessionsDir, `company_${companyId}`), manifestFiles });
      result.warnings.unshift(...own);
      report(result);
    }
  } finally {
    await reader.close();
  }
  return { workers: reader.used };
}

/** The worker thread's side of KeyReader. */
function runWorker() {
  const baileysPromise = loadBaileys();
  parentPort.on('message', async ({ companyId, dir, manifestFiles }) => {
    const result = { companies: [], errors: [], warnings: [] };
    let files = 0;
    try {
      files = await readCompany(await baileysPromise, companyId, dir, manifestFiles, result);
    } catch (error) {
      result.errors.push(`company ${companyId}: ${error.message}`);
    }
    parentPort.postMessage({ result, files });
  });
}

if (!isMainThread && workerData && workerData.role === WORKER_ROLE) runWorker();

module.exports = { name: 'files', load, verify, options, loadBaileys, checkCreds, readManifest, readTreeManifest, readCompanyManifest };
