'use strict';
// File store: <SESSIONS_DIR>/company_<id>/, read with Baileys' own
// useMultiFileAuthState (this is the file-auth code of the emergency tag).
//
// Per company: creds.json is checked first (exists, parses, is an object):
// Baileys would otherwise silently start with fresh credentials. Then every
// "<type>-<name>.json" file is read back through state.keys.get(type, [id]),
// with the original id from the company's baileys-dr manifest
// (<SESSIONS_DIR>/.baileys-dr/companies/<id>.json, listed by the top manifest
// <SESSIONS_DIR>/.baileys-dr/manifest.json; docs/architecture.md) or, for
// older trees, from <SESSIONS_DIR>/manifest.json when it maps the file, else
// the type-aware reverse of fixFileName (reported as guessed).
// One company (and one company manifest) is held in memory at a time.

const crypto = require('node:crypto');
const fsp = require('node:fs/promises');
const path = require('node:path');
const digestLib = require('../digest');
const { COMPANY_ID_RE } = require('../config');
const { loadBaileys } = require('../baileys');

const { StateDigest, keyLine, keyFileName, parseKeyFileName, reverseFileName, sortKeys } = digestLib;

const READ_BATCH = 64; // ids per state.keys.get call, read concurrently by Baileys
const GUESSED_LISTED = 20; // guessed ids listed per company in /health (all are counted)

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

async function readCompany(baileys, companyId, dir, manifestFiles, result) {
  const credsError = await checkCreds(dir);
  if (credsError) {
    result.errors.push(`company ${companyId}: ${credsError}`);
    return;
  }
  const names = (await fsp.readdir(dir, { withFileTypes: true }))
    .filter((d) => d.isFile())
    .map((d) => d.name);
  const entries = keyEntries(names, manifestFiles, result, companyId);

  const { state } = await baileys.useMultiFileAuthState(dir);
  const creds = state.creds;
  if (hasUnrevivedBuffer(creds)) {
    result.errors.push(`company ${companyId}: creds.json holds byte-array Buffers, which this Baileys does not revive`);
    return;
  }
  if (!Number.isInteger(creds.registrationId)) {
    result.errors.push(`company ${companyId}: creds has no integer registrationId`);
    return;
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
    return;
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
}

/**
 * Loads every company directory. ctx: {isStopping(): bool, onCompany(id)}.
 * Returns {companies, errors, warnings}; throws on store-level failures.
 */
async function load(config, ctx = {}) {
  const result = { companies: [], errors: [], warnings: [] };
  const sessionsDir = config.sessionsDir;
  let info;
  try {
    info = await fsp.stat(sessionsDir);
  } catch (error) {
    result.errors.push(`sessions directory ${sessionsDir} is missing (${error.code || error.message})`);
    return result;
  }
  if (!info.isDirectory()) {
    result.errors.push(`sessions directory ${sessionsDir} is not a directory`);
    return result;
  }
  const baileys = await loadBaileys();
  const treeManifest = await readTreeManifest(sessionsDir, result.warnings);
  const manifest = await readManifest(sessionsDir, result.warnings);
  const dirents = await fsp.readdir(sessionsDir, { withFileTypes: true });
  const companyDirs = dirents
    .filter((d) => d.name.startsWith('company_'))
    .map((d) => d.name)
    .sort((a, b) => Buffer.compare(Buffer.from(a), Buffer.from(b)));
  for (const name of companyDirs) {
    if (ctx.isStopping && ctx.isStopping()) throw new Error('stopping');
    const companyId = name.slice('company_'.length);
    if (!COMPANY_ID_RE.test(companyId)) {
      result.errors.push(`sessions directory holds ${shown(name)}: invalid company id`);
      continue;
    }
    const dir = path.join(sessionsDir, name);
    const st = await fsp.stat(dir).catch(() => null);
    if (!st || !st.isDirectory()) {
      result.errors.push(`company ${companyId}: ${name} is not a directory`);
      continue;
    }
    const listed = treeManifest && Object.prototype.hasOwnProperty.call(treeManifest, companyId) ? treeManifest[companyId] : null;
    const manifestCompany = Object.prototype.hasOwnProperty.call(manifest, companyId) ? manifest[companyId] : null;
    const manifestFiles = (await readCompanyManifest(sessionsDir, companyId, listed, result.warnings)) ||
      (manifestCompany && typeof manifestCompany.files === 'object' ? manifestCompany.files : null);
    try {
      await readCompany(baileys, companyId, dir, manifestFiles, result);
    } catch (error) {
      result.errors.push(`company ${companyId}: ${error.message}`);
    }
    if (manifestCompany) delete manifest[companyId]; // a large manifest is freed as it is used
    if (ctx.onCompany) ctx.onCompany(companyId);
  }
  return result;
}

module.exports = { name: 'files', load, loadBaileys, checkCreds, readManifest, readTreeManifest, readCompanyManifest };
