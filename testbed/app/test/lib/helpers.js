'use strict';
// Helpers shared by the service's tests (not a test file itself: node --test
// runs it and finds no test). Nothing here starts anything by itself.

const test = require('node:test');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');

const APP_DIR = path.resolve(__dirname, '..', '..');
const FILES_ENV = 'USE_LEGACY_SUPABASE=false\nUSE_DATABASE_AUTH_STATE=false\n';

/** Whether node_modules are there ({} to run, {skip} otherwise; BAILEYS_DR_REQUIRE_DEPS=1 makes it a failure). */
function depsOption() {
  try {
    for (const name of ['baileys', 'pg', 'dotenv']) require.resolve(name);
    return {};
  } catch {
    const missing = 'node_modules missing: run testbed/bin/install-node-deps --link';
    if (process.env.BAILEYS_DR_REQUIRE_DEPS === '1') test('node_modules are installed (BAILEYS_DR_REQUIRE_DEPS=1)', () => require('node:assert').fail(missing));
    return { skip: missing };
  }
}

const made = [];
test.after(() => {
  for (const dir of made) fs.rmSync(dir, { recursive: true, force: true });
});
/** A temporary directory (mode 0755: another account may have to reach into it), removed after the file's tests. */
function tmpdir(prefix = 'bdr-app-test-') {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  fs.chmodSync(dir, 0o755);
  made.push(dir);
  return dir;
}

/** The service's configuration for an app root holding this .env text (health on a free port). */
function configFor(root, envText, extra = {}) {
  fs.writeFileSync(path.join(root, '.env'), envText);
  const config = require('../../src/config').loadConfig({ appRoot: root, env: {} });
  config.healthPort = 0;
  return Object.assign(config, extra);
}

/** .env text selecting the PostgreSQL store of db ({host, port, database, user, password}). */
function postgresEnv(db) {
  return [
    'USE_LEGACY_SUPABASE=false',
    'USE_DATABASE_AUTH_STATE=true',
    `POSTGRES_HOST=${db.host}`,
    `POSTGRES_PORT=${db.port}`,
    `POSTGRES_DB=${db.database}`,
    `POSTGRES_USER=${db.user}`,
    `POSTGRES_PASSWORD=${db.password}`,
    '',
  ].join('\n');
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Polls check() (async, truthy when done) until it is, or fails after timeoutMs saying what. */
async function until(what, check, timeoutMs = 30000, everyMs = 25) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(everyMs);
  }
}

/** /health once ready and verified (digests complete), or settled on an error: {status, health}. */
async function waitReady(base, timeoutMs = 30000) {
  return until(`${base}/health to settle`, async () => {
    const res = await fetch(`${base}/health`);
    const h = await res.json();
    if ((res.status === 200 && h.digestsComplete) || (!h.loading && !h.verifying && h.loadedAt && h.errors.length)) return { status: res.status, health: h };
    return null;
  }, timeoutMs);
}

/** POST /simulate: {status, body}. */
async function post(base, body, raw = false) {
  const res = await fetch(`${base}/simulate`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: raw ? body : JSON.stringify(body),
  });
  return { status: res.status, body: await res.json() };
}

/** A TCP port nothing listens on right now. */
function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer().once('error', reject).listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

module.exports = { APP_DIR, FILES_ENV, depsOption, tmpdir, configFor, postgresEnv, sleep, until, waitReady, post, freePort };
