'use strict';
// The service under the real PM2 in cluster mode (2 instances sharing the
// health port), on a real throwaway PostgreSQL: both instances get ready,
// concurrent POST /simulate on one company through both instances lose no
// update (the company's row lock serialises them), and `pm2 stop` stops both
// gracefully. Own PM2_HOME, killed at the end. Needs node_modules, PM2 (from
// testbed/bin/install-node-deps) and the PostgreSQL server binaries: skipped,
// saying so, without them.

const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const http = require('node:http');
const path = require('node:path');
const { execFile } = require('node:child_process');
const { promisify } = require('node:util');

const { APP_DIR, depsOption, tmpdir, until, freePort } = require('./lib/helpers');
const { startCluster, connect, pgEnvVars, fixture } = require('./lib/pg');
const { credsLine, keyLine, lineSha256 } = require('../src/digest');

const run = promisify(execFile);
const NAME = 'bdr-cluster-test';

/** PM2's binary as testbed/bin/install-node-deps caches it, or null. */
async function pm2Binary() {
  try {
    const { stdout } = await run(path.join(APP_DIR, '..', 'bin', 'install-node-deps'), ['--check', '--pm2-only'], { timeout: 60000 });
    const line = stdout.split('\n').find((l) => l.startsWith('PM2_BIN='));
    return line ? line.slice('PM2_BIN='.length) : null;
  } catch {
    return null;
  }
}

/** One request on a new connection (so that the cluster's round robin spreads them): {status, body}. */
function request(method, url, body) {
  return new Promise((resolve, reject) => {
    const req = http.request(url, { method, agent: false, headers: { 'content-type': 'application/json' } }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode, body: JSON.parse(Buffer.concat(chunks).toString('utf8')) }));
    });
    req.on('error', reject);
    req.end(body === undefined ? undefined : JSON.stringify(body));
  });
}

test('the ecosystem\'s default stays one instance in fork mode', () => {
  const [app] = require('../ecosystem.config.js').apps;
  assert.equal(app.exec_mode, 'fork');
  assert.equal(app.instances, 1);
  assert.ok(app.kill_timeout >= 10000, 'the graceful stop fits in kill_timeout');
});

test('PM2 cluster mode, 2 instances: both ready on one port, concurrent changes lose nothing, pm2 stop is graceful', { ...depsOption() }, async (t) => {
  const pm2Bin = await pm2Binary();
  if (!pm2Bin) {
    t.skip('PM2 is not installed: run testbed/bin/install-node-deps');
    return;
  }
  const cluster = await startCluster();
  if (cluster.skip) {
    t.skip(cluster.skip);
    return;
  }
  const work = tmpdir();
  const env = { ...process.env, PM2_HOME: path.join(work, 'pm2') };
  const pm2 = (...args) => run(pm2Bin, args, { env, timeout: 60000 });
  try {
    const db = await cluster.database('cluster');
    await fixture(db, ['seed-pg', '--companies', '1', '--keys', '30', '--prefix', 'k']);
    const port = await freePort();
    const [defaults] = require('../ecosystem.config.js').apps;
    const ecosystem = path.join(work, 'ecosystem.json');
    fs.writeFileSync(ecosystem, JSON.stringify({
      apps: [{
        ...defaults,
        name: NAME,
        script: path.join(APP_DIR, 'src', 'index.js'),
        cwd: APP_DIR,
        exec_mode: 'cluster',
        instances: 2,
        env: {
          ...pgEnvVars(db),
          USE_LEGACY_SUPABASE: 'false',
          USE_DATABASE_AUTH_STATE: 'true',
          USE_REPOSITORY_PATTERN: 'true',
          HEALTH_PORT: String(port),
          SESSIONS_DIR: path.join(work, 'sessions'),
        },
      }],
    }));
    await pm2('start', ecosystem);
    const base = `http://127.0.0.1:${port}`;

    // both instances answer on the one port, ready and verified
    const pids = new Set();
    await until('both instances to answer ready', async () => {
      const res = await request('GET', `${base}/health`).catch(() => null);
      if (res && res.status === 200 && res.body.digestsComplete) pids.add(res.body.pid);
      return pids.size === 2;
    }, 60000);
    const { stdout } = await pm2('jlist');
    const procs = JSON.parse(stdout.slice(stdout.indexOf('['))).filter((p) => p.name === NAME);
    assert.equal(procs.length, 2);
    for (const p of procs) {
      assert.equal(p.pm2_env.exec_mode, 'cluster_mode');
      assert.equal(p.pm2_env.status, 'online');
      assert.ok(pids.has(p.pid), `pid ${p.pid} answered /health`);
    }

    // concurrent changes of one company through both instances: serialised, none lost
    const client = await connect(db);
    try {
      const before = (await client.query("SELECT creds FROM whatsapp_auth WHERE company_id = 'k1'")).rows[0].creds;
      const simulate = (seed) => request('POST', `${base}/simulate`, { company: 'k1', newKeys: 4, seed });
      // one at a time first, so that both instances have Baileys loaded: then they run side by side
      const answers = [];
      for (let i = 0; i < 4; i++) answers.push(await simulate(`warm${i}`));
      answers.push(...await Promise.all(Array.from({ length: 12 }, (_, i) => simulate(`c${i}`))));
      for (const a of answers) assert.equal(a.status, 200, JSON.stringify(a.body));
      const creds = (await client.query("SELECT creds FROM whatsapp_auth WHERE company_id = 'k1'")).rows[0].creds;
      assert.equal(creds.accountSyncCounter, before.accountSyncCounter + 16, 'no lost creds update');
      const preKeys = answers.flatMap((a) => a.body.written.filter((w) => w.type === 'pre-key').map((w) => w.id));
      assert.equal(new Set(preKeys).size, 16, 'each request numbered its pre-key after the one before');
      assert.ok(answers.some((a) => a.body.creds_sha256 === lineSha256(credsLine(creds))), 'the last answer is the stored creds');
      const { rows } = await client.query("SELECT key_type, key_id, value FROM whatsapp_keys WHERE company_id = 'k1'");
      const held = new Set(rows.map((r) => lineSha256(keyLine(r.key_type, r.key_id, r.value))));
      for (const w of answers.flatMap((a) => a.body.written)) assert.ok(held.has(w.line_sha256), `${w.type} ${w.id} is stored with its value`);
    } finally {
      await client.end();
    }

    // pm2 stop: each instance stops gracefully
    await pm2('stop', NAME);
    const logs = fs.readdirSync(path.join(env.PM2_HOME, 'logs')).filter((f) => f.includes('-out'))
      .map((f) => fs.readFileSync(path.join(env.PM2_HOME, 'logs', f), 'utf8')).join('\n');
    const events = logs.split('\n').filter((l) => l.includes('{"time"')).map((l) => JSON.parse(l.slice(l.indexOf('{'))));
    assert.deepEqual(new Set(events.filter((e) => e.event === 'simulated').map((e) => e.pid)), pids, 'both instances changed the company');
    const stopped = events.filter((e) => e.event === 'service_stopped');
    assert.deepEqual(new Set(stopped.map((e) => e.pid)), pids);
    assert.ok(stopped.every((e) => e.drained === true));
  } finally {
    await pm2('kill').catch(() => {});
    await cluster.destroy();
  }
});
