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
//
// CompanyStates serves POST /simulate: after a change it gives the changed
// company's new state (digest, key count, identity) without a reload. It
// keeps, per company, the digest line of every key file (the digest's input,
// computed as the verification computes it), reads only the files the change
// named or that the directory listing shows as new, drops the ones gone, and
// hashes the company again: one company's sort and hash instead of a re-read
// of the store. Bounded (least recently changed companies dropped first).

const crypto = require('node:crypto');
const fs = require('node:fs');
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
// Key files a verification worker reads before it is replaced (tests lower
// it); bytes of digest lines CompanyStates keeps (about 0.5 MB a company of
// 1,500 keys).
const options = { recycleFiles: 100000, digestInputBytes: 64 * 1024 * 1024 };
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

/** {line} of a key whose value Baileys' keys.get returned (null: it could not read it), or {error}. */
function keyLineOf(baileys, companyId, entry, value) {
  if (value === null || value === undefined) {
    return { error: `company ${companyId}: key file ${shown(entry.file)} unreadable by Baileys (empty or not JSON)` };
  }
  if (entry.type === 'app-state-sync-key') {
    value = baileys.proto.Message.AppStateSyncKeyData.toObject(value, { longs: Number });
  } else if (hasUnrevivedBuffer(value)) {
    return { error: `company ${companyId}: key file ${shown(entry.file)} holds byte-array Buffers, which this Baileys does not revive` };
  }
  return { line: keyLine(entry.type, entry.id, value) };
}

/**
 * A verified company from its creds and its key entries ({file, type, id,
 * guessed, ambiguous, line}, in directory order); warns about ambiguous names.
 */
function companyResult(companyId, creds, entries, result) {
  const digest = new StateDigest(creds);
  for (const e of sortKeys(entries)) digest.addLine(e.type, e.id, e.line);
  const guessed = entries.filter((e) => e.guessed);
  for (const g of guessed.filter((e) => e.ambiguous).slice(0, GUESSED_LISTED)) {
    result.warnings.push(`company ${companyId}: ambiguous file name ${shown(g.file)}, read as ${g.type} id ${shown(g.id)}`);
  }
  return {
    id: companyId,
    digest: digest.hexdigest(),
    registrationId: creds.registrationId,
    keys: digest.keys,
    guessedCount: guessed.length,
    ambiguousCount: guessed.filter((e) => e.ambiguous).length,
    guessed: guessed.slice(0, GUESSED_LISTED).map((e) => ({ file: e.file, type: e.type, id: e.id, ambiguous: e.ambiguous })),
  };
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
        const read = keyLineOf(baileys, companyId, e, values[e.id]);
        if (read.error) companyErrors.push(read.error);
        else e.line = read.line;
      }
    }
  }
  if (companyErrors.length) {
    result.errors.push(...companyErrors);
    return entries.length;
  }
  result.companies.push(companyResult(companyId, creds, entries, result));
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

const hasOwn = (object, name) => object !== null && typeof object === 'object' && Object.prototype.hasOwnProperty.call(object, name);

/**
 * The manifest files of one company: its own manifest (.baileys-dr/companies,
 * checked against the top manifest's entry), else its entry of the older
 * manifest.json (oldManifest(): the companies map of that file), else null.
 */
async function companyManifestFiles(sessionsDir, companyId, treeManifest, oldManifest, warnings) {
  const listed = hasOwn(treeManifest, companyId) ? treeManifest[companyId] : null;
  const own = await readCompanyManifest(sessionsDir, companyId, listed, warnings);
  if (own) return own;
  const manifest = await oldManifest();
  const old = hasOwn(manifest, companyId) ? manifest[companyId] : null;
  return old && typeof old.files === 'object' ? old.files : null;
}

/**
 * Phase 2 (after ready): every key of every loaded company through Baileys,
 * and its digest. ctx: {isStopping(): bool, onResult({companies, errors,
 * warnings}), readCompany(companyId, read)}, onResult called once per company
 * (and once for the manifests' warnings) as soon as it is known. The service
 * changes companies meanwhile (POST /simulate): readCompany (optional) runs
 * read(), the worker's reading of one company, and returns its result, or
 * null when a change of that company makes it moot (the service's own state
 * of the company is newer; a read during a change may be torn). Returns
 * {workers: how many worker threads read the keys}. Throws on store-level failures.
 */
async function verify(config, loaded, ctx = {}) {
  const sessionsDir = config.sessionsDir;
  const report = (part) => ctx.onResult && ctx.onResult(part);
  const readCompanyOf = ctx.readCompany || ((companyId, read) => read());
  const warnings = [];
  const treeManifest = await readTreeManifest(sessionsDir, warnings);
  const manifest = await readManifest(sessionsDir, warnings);
  if (warnings.length) report({ companies: [], errors: [], warnings });
  const reader = new KeyReader();
  try {
    for (const { id: companyId } of loaded.companies) {
      if (ctx.isStopping && ctx.isStopping()) throw new Error('stopping');
      const own = [];
      const manifestFiles = await companyManifestFiles(sessionsDir, companyId, treeManifest, async () => manifest, own);
      if (hasOwn(manifest, companyId)) delete manifest[companyId]; // a large manifest is freed as it is used
      const job = { companyId, dir: path.join(sessionsDir, `company_${companyId}`), manifestFiles };
      const result = await readCompanyOf(companyId, async () => (await reader.read(job)).result);
      if (!result) continue;
      result.warnings.unshift(...own);
      report(result);
    }
  } finally {
    await reader.close();
  }
  return { workers: reader.used };
}

const turn = () => new Promise((resolve) => setImmediate(resolve));

/**
 * A file's value as Baileys' keys.get returns it (its readData: the file
 * through BufferJSON.reviver, null when it cannot be read or parsed; an
 * app-state-sync-key through AppStateSyncKeyData.fromObject), read directly:
 * useMultiFileAuthState would add a lock for the path to its never emptied Map.
 */
function readAsBaileys(baileys, file, type) {
  let value;
  try {
    value = JSON.parse(fs.readFileSync(file, 'utf8'), baileys.BufferJSON.reviver);
  } catch {
    value = null;
  }
  if (type === 'app-state-sync-key' && value) value = baileys.proto.Message.AppStateSyncKeyData.fromObject(value);
  return value;
}

/** The manifest entry of a file as the company's read entry holds it (see CompanyStates), or undefined. */
function manifestEntryOf(held, name) {
  const rec = held.recs.get(name);
  if (!rec) return held.absent.get(name);
  return rec.guessed ? rec.mapping : { type: rec.type, id: rec.id };
}

/**
 * The state of the companies POST /simulate changes, for the service's
 * /health and the request's answer (see the top of this file). Per company
 * it holds the key entries read so far ({file, type, id, guessed, ambiguous,
 * line}), the names that are no key file, and the manifest entries of files
 * not in the directory (a file the manifest maps may come back). Call
 * update() with one company at a time, while nothing else writes it.
 */
class CompanyStates {
  constructor(sessionsDir) {
    this.sessionsDir = sessionsDir;
    this.held = new Map(); // company id -> {recs, ignored, absent, bytes}, least recently used first
    this.bytes = 0;
  }

  clear() {
    this.held.clear();
    this.bytes = 0;
  }

  /** The next update() of the company reads it in full. */
  forget(companyId) {
    this._take(companyId);
  }

  _take(companyId) {
    const held = this.held.get(companyId);
    if (held) {
      this.held.delete(companyId);
      this.bytes -= held.bytes;
    }
    return held;
  }

  _keep(companyId, held) {
    held.bytes = 0;
    for (const rec of held.recs.values()) held.bytes += rec.line.length + 2 * rec.file.length + 100;
    if (held.bytes > options.digestInputBytes) return; // read in full at each change
    this.held.set(companyId, held);
    this.bytes += held.bytes;
    for (const [id, other] of this.held) {
      if (this.bytes <= options.digestInputBytes) break;
      this.held.delete(id);
      this.bytes -= other.bytes;
    }
  }

  /** What is known of a company not held: its manifest (every file it maps is "absent" until read). */
  async _start(companyId, result) {
    const absent = new Map();
    const manifestFiles = await companyManifestFiles(this.sessionsDir, companyId,
      await readTreeManifest(this.sessionsDir, result.warnings), () => readManifest(this.sessionsDir, result.warnings), result.warnings);
    if (manifestFiles !== null && typeof manifestFiles === 'object') {
      for (const name of Object.keys(manifestFiles)) absent.set(name, manifestFiles[name]);
    }
    return { recs: new Map(), ignored: new Set(), absent, bytes: 0 };
  }

  /** The company's creds as Baileys loads them, or null (an error is pushed). */
  async _creds(baileys, dir, companyId, result) {
    const credsError = await checkCreds(dir);
    if (credsError) {
      result.errors.push(`company ${companyId}: ${credsError}`);
      return null;
    }
    const creds = readAsBaileys(baileys, path.join(dir, 'creds.json'), 'creds');
    const problem = creds === null ? 'creds.json unreadable by Baileys' : credsProblem(creds);
    if (problem) {
      result.errors.push(`company ${companyId}: ${problem}`);
      return null;
    }
    return creds;
  }

  /**
   * The company's state after a change of the files named in changed (key
   * file names, those deleted included): {companies: [{id, digest, keys,
   * registrationId, me, guessedCount, ambiguousCount, guessed}], errors,
   * warnings}, as the verification would find it. Files the directory shows
   * that were never read (all of them for a company not held) are read; a
   * file changed in place without being named is not seen.
   */
  async update(companyId, changed = []) {
    const result = { companies: [], errors: [], warnings: [] };
    const dir = path.join(this.sessionsDir, `company_${companyId}`);
    const baileys = await loadBaileys();
    const held = this._take(companyId) || (await this._start(companyId, result));
    const creds = await this._creds(baileys, dir, companyId, result);
    if (!creds) return result;
    const names = (await fsp.readdir(dir, { withFileTypes: true })).filter((d) => d.isFile() && d.name !== 'creds.json').map((d) => d.name);
    const present = new Set(names);
    const named = new Set(changed);
    for (const name of [...held.recs.keys()]) {
      if (present.has(name)) continue;
      const entry = manifestEntryOf(held, name);
      if (entry !== undefined) held.absent.set(name, entry);
      held.recs.delete(name);
    }
    for (const name of [...held.ignored]) if (!present.has(name) || named.has(name)) held.ignored.delete(name);
    const toRead = names.filter((name) => named.has(name) || !(held.recs.has(name) || held.ignored.has(name)));
    for (let i = 0; i < toRead.length; i += READ_BATCH) {
      if (i) await turn(); // a company of many keys must not hold up the requests
      for (const name of toRead.slice(i, i + READ_BATCH)) {
        const entry = manifestEntryOf(held, name);
        const mapped = Object.create(null);
        if (entry !== undefined) mapped[name] = entry;
        const [e] = keyEntries([name], mapped, result, companyId);
        if (!e) {
          held.ignored.add(name);
          continue;
        }
        let read;
        try {
          read = keyLineOf(baileys, companyId, e, readAsBaileys(baileys, path.join(dir, name), e.type));
        } catch (error) {
          read = { error: `company ${companyId}: ${error.message}` };
        }
        if (read.error) {
          result.errors.push(read.error);
          continue;
        }
        e.line = read.line;
        if (e.guessed && entry !== undefined) e.mapping = entry; // an entry that does not name the file: kept for when it goes
        held.recs.set(name, e);
        held.absent.delete(name);
      }
    }
    if (result.errors.length) return result; // not held: the next change reads the company in full
    const entries = names.map((name) => held.recs.get(name)).filter(Boolean);
    result.companies.push({ ...companyResult(companyId, creds, entries, result), ...credsIdentity(creds) });
    this._keep(companyId, held);
    return result;
  }
}

/** The CompanyStates of a sessions directory (POST /simulate on files). */
function createCompanyStates(config) {
  return new CompanyStates(config.sessionsDir);
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

module.exports = {
  name: 'files',
  load,
  verify,
  createCompanyStates,
  options,
  loadBaileys,
  checkCreds,
  readManifest,
  readTreeManifest,
  readCompanyManifest,
};
