'use strict';
// PostgreSQL store: whatsapp_auth (creds) and whatsapp_keys (Signal keys),
// the schema of ../shared/DOMAIN.md section 1 (testbed/schema.sql).
//
// Reads inside one REPEATABLE READ READ ONLY transaction (one snapshot for
// every company), company by company, keys paged in digest order (keyset
// pagination on key_type COLLATE "C", key_id COLLATE "C"), so memory holds
// one page of one company at a time, whatever the size of the table.

const { Client } = require('pg');
const { StateDigest } = require('../digest');
const { COMPANY_ID_RE } = require('../config');

const PAGE_SIZE = 2000;
const COMPANY_PAGE_SIZE = 500;

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
  SELECT company_id FROM whatsapp_auth ORDER BY company_id COLLATE "C" LIMIT $1`;
const NEXT_COMPANIES = `
  SELECT company_id FROM whatsapp_auth
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

async function* companyIds(client) {
  let last = null;
  for (;;) {
    const { rows } = last === null
      ? await client.query(FIRST_COMPANIES, [COMPANY_PAGE_SIZE])
      : await client.query(NEXT_COMPANIES, [last, COMPANY_PAGE_SIZE]);
    for (const row of rows) yield row.company_id;
    if (rows.length < COMPANY_PAGE_SIZE) return;
    last = rows[rows.length - 1].company_id;
  }
}

async function digestCompany(client, companyId, creds) {
  const digest = new StateDigest(creds);
  let last = null;
  for (;;) {
    const { rows } = last === null
      ? await client.query(FIRST_KEYS, [companyId, PAGE_SIZE])
      : await client.query(NEXT_KEYS, [companyId, last.key_type, last.key_id, PAGE_SIZE]);
    for (const row of rows) digest.add(row.key_type, row.key_id, row.value);
    if (rows.length < PAGE_SIZE) break;
    last = rows[rows.length - 1];
  }
  return { digest: digest.hexdigest(), keys: digest.keys };
}

/**
 * Loads every company. ctx: {isStopping(): bool}. Returns
 * {companies: [{id, digest, registrationId, keys, guessed: []}], errors, warnings}.
 * Throws on store-level failures (connection, missing tables).
 */
async function load(config, ctx = {}) {
  const pg = config.postgres;
  const client = new Client({
    host: pg.host,
    port: pg.port,
    database: pg.database,
    user: pg.user,
    password: pg.password,
    application_name: 'baileys-whatsapp-service',
    connectionTimeoutMillis: 10000,
    statement_timeout: 120000,
  });
  // An idle connection error must not crash the process: the load fails instead.
  client.on('error', () => {});
  const result = { companies: [], errors: [], warnings: [] };
  await client.connect();
  try {
    await client.query('BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY');
    for await (const companyId of companyIds(client)) {
      if (ctx.isStopping && ctx.isStopping()) throw new Error('stopping');
      if (!COMPANY_ID_RE.test(companyId)) {
        result.errors.push(`whatsapp_auth: invalid company id ${shown(companyId)}`);
        continue;
      }
      const { rows } = await client.query('SELECT creds FROM whatsapp_auth WHERE company_id = $1', [companyId]);
      const creds = rows.length ? rows[0].creds : null;
      if (creds === null || typeof creds !== 'object' || Array.isArray(creds)) {
        result.errors.push(`company ${companyId}: creds is not a JSON object`);
        continue;
      }
      if (!Number.isInteger(creds.registrationId)) {
        result.errors.push(`company ${companyId}: creds has no integer registrationId`);
        continue;
      }
      const { digest, keys } = await digestCompany(client, companyId, creds);
      result.companies.push({ id: companyId, digest, registrationId: creds.registrationId, keys, guessed: [] });
      if (ctx.onCompany) ctx.onCompany(companyId);
    }
    const orphans = await client.query(ORPHAN_KEY_COMPANIES);
    for (const row of orphans.rows) {
      result.warnings.push(`whatsapp_keys: keys of company ${shown(row.company_id)} which has no whatsapp_auth row (ignored)`);
    }
    await client.query('COMMIT');
  } finally {
    await client.end().catch(() => {});
  }
  return result;
}

module.exports = { name: 'postgres', load };
