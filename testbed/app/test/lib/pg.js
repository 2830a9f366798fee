'use strict';
// A throwaway PostgreSQL cluster for the service's tests, made by the
// project's own testbed/pgcluster.py (the one the pytest suite and the demo
// use): initdb on a free port (never the service's 3011), the schema of
// testbed/schema.sql in the database "baileys", which each test copies
// (CREATE DATABASE ... TEMPLATE) so that tests never see each other's rows.

const { execFile } = require('node:child_process');
const crypto = require('node:crypto');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { promisify } = require('node:util');
const { APP_DIR } = require('./helpers');

const PGCLUSTER = path.resolve(APP_DIR, '..', 'pgcluster.py');
const run = promisify(execFile);

/**
 * Starts a cluster in a new temporary directory. Returns {info,
 * database(label) -> params, admin() -> connected superuser pg.Client,
 * destroy(): stops it and removes the directory}, or {skip: reason} when this
 * machine has no PostgreSQL server binaries.
 */
async function startCluster() {
  // traversable by the account the server runs as when started by root
  const base = fs.mkdtempSync(path.join(os.tmpdir(), 'bdr-app-pg-'));
  fs.chmodSync(base, 0o755);
  const password = crypto.randomBytes(12).toString('hex');
  const passwordFile = path.join(base, 'password');
  fs.writeFileSync(passwordFile, password, { mode: 0o600 });
  const dir = path.join(base, 'pg');
  let info;
  try {
    const { stdout } = await run('python3', [PGCLUSTER, 'start', '--dir', dir, '--password-file', passwordFile], { timeout: 120000 });
    info = JSON.parse(stdout);
  } catch (error) {
    const out = String(error.stdout || '');
    if (out.includes('no PostgreSQL server binaries')) {
      fs.rmSync(base, { recursive: true, force: true });
      return { skip: JSON.parse(out).msg };
    }
    throw new Error(`pgcluster.py start failed: ${out || error.message}`);
  }
  const { Client } = require('pg');
  const admin = async () => {
    // the superuser through the cluster's own socket directory (trusted)
    const client = new Client({ host: info.socket_dir, port: info.port, user: 'postgres', database: 'postgres' });
    await client.connect();
    return client;
  };
  let made = 0;
  return {
    info,
    /** A new database holding the schema (a copy of "baileys"): {host, port, database, user, password}. */
    async database(label = 'db') {
      const name = `t${++made}_${label.replace(/[^a-z0-9_]/g, '_')}`.slice(0, 60);
      const client = await admin();
      try {
        await client.query(`CREATE DATABASE "${name}" TEMPLATE baileys OWNER baileys`);
      } finally {
        await client.end();
      }
      return { host: '127.0.0.1', port: info.port, database: name, user: 'baileys', password };
    },
    admin,
    async destroy() {
      await run('python3', [PGCLUSTER, 'destroy', '--dir', dir], { timeout: 120000 });
      fs.rmSync(base, { recursive: true, force: true });
    },
  };
}

/** A connected pg.Client on db (the application's role). */
async function connect(db) {
  const { Client } = require('pg');
  const client = new Client({ ...db, application_name: 'baileys-dr-test' });
  await client.connect();
  return client;
}

/** The process environment naming db the way the service and tools/fixture.js read it. */
function pgEnvVars(db) {
  return { POSTGRES_HOST: db.host, POSTGRES_PORT: String(db.port), POSTGRES_DB: db.database, POSTGRES_USER: db.user, POSTGRES_PASSWORD: db.password };
}

/** Runs tools/fixture.js (seed-pg, pg-to-files) against db; returns its JSON output. */
async function fixture(db, args) {
  const { stdout } = await run(process.execPath, [path.join(APP_DIR, 'tools', 'fixture.js'), ...args], {
    env: { ...process.env, ...pgEnvVars(db) },
    timeout: 120000,
  });
  return JSON.parse(stdout);
}

module.exports = { startCluster, connect, pgEnvVars, fixture };
