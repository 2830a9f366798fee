'use strict';
// PostgreSQL store: whatsapp_auth (creds) and whatsapp_keys (Signal keys),
// the schema of ../shared/DOMAIN.md section 1 (testbed/schema.sql).
//
// Two phases inside one REPEATABLE READ READ ONLY transaction (one snapshot
// for both, so the digests describe exactly what was loaded at ready):
// load() reads the whatsapp_auth rows (paged) and makes the service ready;
// verify() then reads every company's creds and keys in digest order (keyset
// pagination on key_type COLLATE "C", key_id COLLATE "C"), so memory holds
// one page of one company at a time, whatever the size of the table.

const { Client, Pool } = require('pg');
const { StateDigest } = require('../digest');
const { COMPANY_ID_RE } = require('../config');
const { credsIdentity } = require('../identity');

const PAGE_SIZE = 2000;
const COMPANY_PAGE_SIZE = 500;
// Rows digested between two turns of the event loop: the verification runs
// in the service's thread, and requests are answered meanwhile.
const ROWS_PER_TURN = 250;

const FIRST_KEYS = `
  SELECT key_type, key_id, value FROM whatsapp_keys
   WHERE company_id = $1
   ORDER BY key_type COLLATE "C", key_id COLLATE "C"
   LIMIT $2`;
const NEXT_KEYS = `
  SELECT key_type, key_id, value FROM whatsapp_keys
   WHERE company_id = $1
     AND (key_type COLLATE "C", key_id COLLATE "C") > ($2::text COLLATE "C", $3::text COLLATE "C")
   ORDER BY key_type COLLATE "C", key_id COLLATE "C"
   LIMIT $4`;
const FIRST_COMPANIES = `
  SELECT company_id, creds FROM whatsapp_auth ORDER BY company_id COLLATE "C" LIMIT $1`;
const NEXT_COMPANIES = `
  SELECT company_id, creds FROM whatsapp_auth
   WHERE company_id COLLATE "C" > $1::text COLLATE "C"
   ORDER BY company_id COLLATE "C" LIMIT $2`;
const ORPHAN_KEY_COMPANIES = `
  SELECT DISTINCT k.company_id FROM whatsapp_keys k
   WHERE NOT EXISTS (SELECT 1 FROM whatsapp_auth a WHERE a.company_id = k.company_id)
   ORDER BY 1 LIMIT 100`;

function shown(id) {
  const text = JSON.stringify(String(id));
  return text.length > 80 ? text.slice(0, 77) + '..."' : text;
}

/** whatsapp_auth rows {company_id, creds}, a page at a time. */
async function* authRows(client) {
  let last = null;
  for (;;) {
    const { rows } = last === null
      ? await client.query(FIRST_COMPANIES, [COMPANY_PAGE_SIZE])
      : await client.query(NEXT_COMPANIES, [last, COMPANY_PAGE_SIZE]);
    yield* rows;
    if (rows.length < COMPANY_PAGE_SIZE) return;
    last = rows[rows.length - 1].company_id;
  }
}

/** {digest, keys} of one company, its keys read with client (in the caller's transaction). */
async function digestCompany(client, companyId, creds) {
  const digest = new StateDigest(creds);
  let last = null;
  for (;;) {
    const { rows } = last === null
      ? await client.query(FIRST_KEYS, [companyId, PAGE_SIZE])
      : await client.query(NEXT_KEYS, [companyId, last.key_type, last.key_id, PAGE_SIZE]);
    for (let i = 0; i < rows.length; i++) {
      if (i > 0 && i % ROWS_PER_TURN === 0) await new Promise((resolve) => setImmediate(resolve));
      digest.add(rows[i].key_type, rows[i].key_id, rows[i].value);
    }
    if (rows.length < PAGE_SIZE) break;
    last = rows[rows.length - 1];
  }
  return { digest: digest.hexdigest(), keys: digest.keys };
}

/** What is wrong with a whatsapp_auth row's creds, or null. */
function credsProblem(creds) {
  if (creds === null || typeof creds !== 'object' || Array.isArray(creds)) return 'creds is not a JSON object';
  if (!Number.isInteger(creds.registrationId)) return 'creds has no integer registrationId';
  return null;
}

/** node-postgres options of the service's connections (the password is never logged). */
function connectionOptions(config) {
  const pg = config.postgres;
  return {
    host: pg.host,
    port: pg.port,
    database: pg.database,
    user: pg.user,
    password: pg.password,
    application_name: 'baileys-whatsapp-service',
    connectionTimeoutMillis: 10000,
  };
}

/**
 * The pool POST /simulate writes through (src/simulate.js): small, as one
 * request runs at a time per process. The caller ends it (pool.end()).
 */
function createPool(config) {
  const pool = new Pool({ ...connectionOptions(config), max: 2, statement_timeout: 60000 });
  // An idle connection error must not crash the process: the next request fails instead.
  pool.on('error', () => {});
  return pool;
}

/**
 * Phase 1 (ready): the whatsapp_auth rows. ctx: {isStopping(): bool,
 * onCompany(id)}. Returns {companies: [{id, registrationId, me}], errors,
 * warnings, close()}: the transaction stays open for verify(); close() ends
 * it (always call it). Throws on store-level failures (connection, missing tables).
 */
async function load(config, ctx = {}) {
  const client = new Client({ ...connectionOptions(config), statement_timeout: 120000 });
  // An idle connection error must not crash the process: the load fails instead.
  client.on('error', () => {});
  let closed = null;
  const close = () => {
    closed = closed || client.end().catch(() => {});
    return closed;
  };
  const result = { companies: [], errors: [], warnings: [] };
  const cached = new Map(); // the creds loaded, for the credentials cache (src/credentials-cache.js)
  try {
    await client.connect();
    await client.query('BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY');
    for await (const row of authRows(client)) {
      if (ctx.isStopping && ctx.isStopping()) throw new Error('stopping');
      const companyId = row.company_id;
      if (!COMPANY_ID_RE.test(companyId)) {
        result.errors.push(`whatsapp_auth: invalid company id ${shown(companyId)}`);
        continue;
      }
      const problem = credsProblem(row.creds);
      if (problem) {
        result.errors.push(`company ${companyId}: ${problem}`);
        continue;
      }
      result.companies.push({ id: companyId, ...credsIdentity(row.creds) });
      cached.set(companyId, row.creds);
      if (ctx.onCompany) ctx.onCompany(companyId);
    }
  } catch (error) {
    await close();
    throw error;
  }
  // not enumerable: /health and the logs never see the client
  Object.defineProperty(result, 'close', { value: close });
  Object.defineProperty(result, 'client', { value: client });
  Object.defineProperty(result, 'credsForCache', { value: cached, configurable: true });
  return result;
}

/**
 * Phase 2 (after ready), in load()'s transaction: every loaded company's
 * creds and keys, and its digest. ctx: {isStopping(): bool, onResult({companies,
 * errors, warnings})}, called once per company and once for the orphan keys.
 * Ends the transaction. Throws on store-level failures.
 */
async function verify(config, loaded, ctx = {}) {
  const client = loaded.client;
  const report = (part) => ctx.onResult && ctx.onResult(part);
  try {
    for (const { id: companyId } of loaded.companies) {
      if (ctx.isStopping && ctx.isStopping()) throw new Error('stopping');
      const { rows } = await client.query('SELECT creds FROM whatsapp_auth WHERE company_id = $1', [companyId]);
      const creds = rows.length ? rows[0].creds : null;
      const problem = credsProblem(creds);
      if (problem) {
        report({ companies: [], errors: [`company ${companyId}: ${problem}`], warnings: [] });
        continue;
      }
      const { digest, keys } = await digestCompany(client, companyId, creds);
      report({ companies: [{ id: companyId, digest, registrationId: creds.registrationId, keys, guessed: [] }], errors: [], warnings: [] });
    }
    const orphans = await client.query(ORPHAN_KEY_COMPANIES);
    report({
      companies: [],
      errors: [],
      warnings: orphans.rows.map((row) => `whatsapp_keys: keys of company ${shown(row.company_id)} which has no whatsapp_auth row (ignored)`),
    });
    await client.query('COMMIT');
  } finally {
    await loaded.close();
  }
}

module.exports = { name: 'postgres', load, verify, createPool, credsProblem, digestCompany };
