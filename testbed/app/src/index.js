'use strict';
// baileys-whatsapp-service, test edition: a stand-in for the real WhatsApp
// service. It loads the Baileys auth state of every company from the store
// the .env selects and answers readiness on http://127.0.0.1:<HEALTH_PORT>/health.
// Like the real service, it is ready once every company's creds are loaded
// (keys are read on demand); then a background pass (the verification) reads
// every key and computes each company's state digest (docs/architecture.md).
// It never connects to WhatsApp. POST /simulate changes a company's state as
// the live service would, on either store (src/simulate.js, README.md).
// SIGINT/SIGTERM stop it gracefully: no new request is taken, the running
// /simulate finishes (its answer is sent), then it exits 0 within PM2's
// kill_timeout. It runs in PM2's fork and cluster modes alike.

const http = require('node:http');
const fs = require('node:fs');
const path = require('node:path');
const { execFileSync } = require('node:child_process');
const log = require('./log');
const { loadConfig, publicConfig } = require('./config');
const { saveCredentialsCache } = require('./credentials-cache');

const MAX_ERRORS_SHOWN = 200;
const MAX_BODY_BYTES = 64 * 1024;
const RETRY_MIN_MS = 1000;
const RETRY_MAX_MS = 30000;
// A stop waits this long for running requests and the load, then ends the
// PostgreSQL pool (STOP_POOL_MS) and flushes the log (STOP_FLUSH_MS): well
// inside PM2's kill_timeout (10 s).
const STOP_DRAIN_MS = 7000;
const STOP_POOL_MS = 1000;
const STOP_FLUSH_MS = 500;
// The stores POST /simulate writes to.
const SIMULATED_STORES = new Set(['files', 'postgres']);

function gitRevision(appRoot) {
  if (!fs.existsSync(path.join(appRoot, '.git'))) return null;
  try {
    // safe.directory: the repository may belong to another user than the service's
    const out = execFileSync('git', ['-c', `safe.directory=${appRoot}`, '-C', appRoot, 'rev-parse', 'HEAD'], { encoding: 'utf8', timeout: 5000, stdio: ['ignore', 'pipe', 'ignore'] });
    return /^[0-9a-f]{40,64}$/.test(out.trim()) ? out.trim() : null;
  } catch {
    return null;
  }
}

/** The store module for the selected store, or {error} when this revision has none. */
function resolveStore(store) {
  if (store === 'supabase') {
    return { error: 'store "supabase" is not available in the test application (set USE_LEGACY_SUPABASE=false)' };
  }
  try {
    return { module: require(`./stores/${store}`) };
  } catch (error) {
    if (error.code === 'MODULE_NOT_FOUND' && String(error.message).includes(`stores/${store}`)) {
      return { error: `store "${store}" is not available at this revision (src/stores/${store}.js is absent)` };
    }
    return { error: `store "${store}" failed to load: ${error.message}` };
  }
}

function capped(list) {
  if (list.length <= MAX_ERRORS_SHOWN) return list;
  return list.slice(0, MAX_ERRORS_SHOWN).concat([`... and ${list.length - MAX_ERRORS_SHOWN} more`]);
}

function createService(options = {}) {
  const config = options.config || loadConfig();
  const startedAt = new Date().toISOString();
  const revision = gitRevision(config.appRoot);
  // options.storeModule: a stand-in store for tests ({name, load(config, ctx)}; without
  // verify(), the companies load() returns are taken as verified, digests included)
  const selected = options.storeModule ? { module: options.storeModule } : resolveStore(config.store);
  const state = {
    loading: false,
    loadPromise: null, // the running load, both phases
    loadingPromise: null, // its phase 1 (to ready), which /simulate waits for
    result: null, // phase 1 of the last load: {companies: [{id, registrationId}], errors, warnings}
    storeError: null, // store-level failure of the last load or verification (connection, ...)
    loadedAt: null,
    loadMs: null,
    readyAt: null, // when the last load became ready (ISO), null if it did not
    verifying: false,
    verified: new Map(), // company id -> {id, digest, keys, registrationId, guessed...}, as the pass finds them
    touched: new Set(), // companies a /simulate changed since the last load began: the verification's view of them is older
    changes: new Map(), // files: company id -> how many /simulate began writing it since the last load began
    companyStates: null, // files: the state of the companies /simulate changed (src/stores/files.js CompanyStates)
    verifyErrors: [],
    verifyWarnings: [],
    verifiedAt: null,
    verifyMs: null,
    digestsComplete: false,
    loads: 0,
    stopping: false,
    stopPromise: null,
    requests: new Set(), // promises of the POST /simulate requests not answered yet
    pool: null, // PostgreSQL pool of POST /simulate, made on first use
    retryTimer: null,
    retryMs: RETRY_MIN_MS,
    signalledReady: false,
    simulating: null, // promise of the running POST /simulate (loads wait for it)
  };

  let announceStop;
  const stopAnnounced = new Promise((resolve) => {
    announceStop = resolve;
  });

  function errors() {
    const list = [...config.errors];
    if (selected.error) list.push(selected.error);
    if (state.storeError) list.push(state.storeError);
    if (state.result) list.push(...state.result.errors);
    list.push(...state.verifyErrors);
    return list;
  }

  function warnings() {
    return (state.result ? state.result.warnings : []).concat(state.verifyWarnings);
  }

  function isReady() {
    return !state.loading && state.result !== null && errors().length === 0;
  }

  function health() {
    const companies = state.result ? state.result.companies : [];
    // null-prototype maps: "__proto__" is a valid company id
    const digests = Object.create(null);
    const registrationIds = Object.create(null);
    const identities = Object.create(null);
    const keys = Object.create(null);
    const guessedIds = Object.create(null);
    for (const c of companies) {
      registrationIds[c.id] = c.registrationId;
      identities[c.id] = { registrationId: c.registrationId ?? null, me: c.me ?? null }; // as the store read the creds (src/identity.js)
      const v = state.verified.get(c.id);
      if (!v) continue; // not verified (yet): partial maps until digestsComplete
      digests[c.id] = v.digest;
      keys[c.id] = v.keys;
      if (v.guessedCount) guessedIds[c.id] = { count: v.guessedCount, ambiguous: v.ambiguousCount, listed: v.guessed };
    }
    return {
      ready: isReady(),
      store: config.store,
      revision,
      companies: companies.length,
      digests,
      registrationIds,
      identities,
      errors: capped(errors()),
      startedAt,
      pid: process.pid,
      loading: state.loading,
      loadedAt: state.loadedAt,
      loadMs: state.loadMs,
      readyAt: state.readyAt,
      verifying: state.verifying,
      digestsComplete: state.digestsComplete,
      verifiedAt: state.verifiedAt,
      verifyMs: state.verifyMs,
      keys,
      guessedIds,
      warnings: capped(warnings()),
      flags: config.flags,
      rssBytes: process.memoryUsage().rss,
    };
  }

  function scheduleRetry() {
    if (state.stopping || state.retryTimer) return;
    const delay = state.retryMs;
    state.retryMs = Math.min(state.retryMs * 2, RETRY_MAX_MS);
    log.info('reload_scheduled', { inMs: delay });
    state.retryTimer = setTimeout(() => {
      state.retryTimer = null;
      reload('retry');
    }, delay);
    state.retryTimer.unref();
  }

  const msSince = (started) => Number((process.hrtime.bigint() - started) / 1000000n);

  /** A load: phase 1 (ready: creds), then phase 2 (the verification: keys, digests). */
  async function runLoad(reason) {
    state.loading = true;
    state.readyAt = null;
    state.digestsComplete = false;
    state.loads += 1;
    state.touched = new Set();
    state.changes = new Map();
    if (state.companyStates) state.companyStates.clear(); // a load reads the store afresh
    state.loadingPromise = loadPhase(reason);
    const loaded = await state.loadingPromise;
    state.loadingPromise = null;
    try {
      if (loaded && !state.stopping) await verifyPhase(loaded);
    } finally {
      if (loaded && typeof loaded.close === 'function') await loaded.close();
    }
    if (state.storeError && !state.stopping) scheduleRetry();
  }

  /** The real service's credentials cache, after a load from PostgreSQL: never awaited, a failed save is only logged. */
  function saveCache(loaded) {
    const creds = loaded.credsForCache;
    if (!creds) return;
    delete loaded.credsForCache; // the creds are not kept beyond the save
    saveCredentialsCache(config.appRoot, creds).then(
      (file) => log.info('credentials_cache_saved', { file, companies: creds.size }),
      (error) => log.warn('credentials_cache_failed', { error: log.errorText(error) }),
    );
  }

  /** Phase 1: the store's load(). Returns what it loaded, or null on a store-level failure. */
  async function loadPhase(reason) {
    const started = process.hrtime.bigint();
    log.info('load_started', { store: config.store, reason, load: state.loads });
    let done = 0;
    let loaded = null;
    // Baileys, loaded alongside (the file store's load needs it anyway): like the real service,
    // ready with its library loaded, so the first /simulate does not wait for the import
    const library = canSimulate() ? require('./baileys').loadBaileys().catch(() => null) : null;
    try {
      loaded = await selected.module.load(config, {
        isStopping: () => state.stopping,
        onCompany: () => {
          done += 1;
          if (done % 100 === 0) log.info('load_progress', { companies: done });
        },
      });
      await library;
      saveCache(loaded);
      state.storeError = null;
      // a copy: a company /simulate creates is listed here, not in the list the verification goes through
      state.result = { companies: [...loaded.companies], errors: loaded.errors, warnings: loaded.warnings };
      state.verified = new Map();
      state.verifyErrors = [];
      state.verifyWarnings = [];
      state.verifiedAt = null;
      state.verifyMs = null;
    } catch (error) {
      state.storeError = `${config.store} store: ${log.errorText(error)}`;
      state.result = state.result || { companies: [], errors: [], warnings: [] };
    } finally {
      state.loading = false;
      state.loadedAt = new Date().toISOString();
      state.loadMs = msSince(started);
    }
    const ready = isReady();
    state.readyAt = ready ? state.loadedAt : null;
    const mem = process.memoryUsage();
    log[ready ? 'info' : 'error']('load_finished', {
      store: config.store,
      ready,
      companies: state.result.companies.length,
      errors: errors().slice(0, 20),
      errorCount: errors().length,
      warningCount: state.result.warnings.length,
      loadMs: state.loadMs,
      rssBytes: mem.rss,
      heapUsedBytes: mem.heapUsed,
    });
    if (ready && !state.signalledReady && typeof process.send === 'function') {
      state.signalledReady = true;
      process.send('ready'); // PM2 wait_ready: the service is up once the creds are loaded
    }
    return loaded;
  }

  /** Phase 2: the store's verify() over what loadPhase loaded; /health fills in as it goes. */
  async function verifyPhase(loaded) {
    const started = process.hrtime.bigint();
    state.verifying = true;
    log.info('verify_started', { store: config.store, companies: loaded.companies.length });
    const take = (part) => {
      for (const c of part.companies) {
        if (state.touched.has(c.id)) continue; // a /simulate changed it since: its state is newer
        state.verified.set(c.id, c);
        if (c.guessedCount) log.warn('ids_guessed', { company: c.id, count: c.guessedCount, ambiguous: c.ambiguousCount });
        if (state.verified.size % 100 === 0) log.info('verify_progress', { companies: state.verified.size });
      }
      for (const e of part.errors) {
        // the first 20 are logged as found; all are in /health and counted in verify_finished
        if (state.verifyErrors.length < 20) log.error('verify_error', { error: e });
        state.verifyErrors.push(e);
      }
      state.verifyWarnings.push(...part.warnings);
    };
    let details = null;
    try {
      if (typeof selected.module.verify === 'function') {
        details = await selected.module.verify(config, loaded, {
          isStopping: () => state.stopping,
          onResult: take,
          readCompany: verifiedUnlessChanged,
        });
      } else {
        take({ companies: loaded.companies, errors: [], warnings: [] });
      }
      state.retryMs = RETRY_MIN_MS;
    } catch (error) {
      state.storeError = `${config.store} store: ${log.errorText(error)}`;
    } finally {
      state.verifying = false;
      state.verifiedAt = new Date().toISOString();
      state.verifyMs = msSince(started);
    }
    state.digestsComplete = allVerified();
    const mem = process.memoryUsage();
    let keys = 0;
    for (const c of state.verified.values()) keys += c.keys;
    log[isReady() ? 'info' : 'error']('verify_finished', {
      store: config.store,
      ready: isReady(),
      digestsComplete: state.digestsComplete,
      companies: state.verified.size,
      keys,
      errors: errors().slice(0, 20),
      errorCount: errors().length,
      warningCount: warnings().length,
      verifyMs: state.verifyMs,
      rssBytes: mem.rss,
      heapUsedBytes: mem.heapUsed,
      ...(details || {}), // the store's own figures (files: workers)
    });
  }

  function reload(reason = 'reload') {
    if (selected.error || state.stopping) return Promise.resolve();
    // never read a company directory while /simulate is writing it
    if (state.simulating) return state.simulating.then(() => reload(reason), () => reload(reason));
    if (state.loadPromise) return state.loadPromise;
    if (state.retryTimer) {
      clearTimeout(state.retryTimer);
      state.retryTimer = null;
    }
    state.loadPromise = runLoad(reason).finally(() => {
      state.loadPromise = null;
    });
    return state.loadPromise;
  }

  function send(res, status, body) {
    const text = JSON.stringify(body);
    const headers = { 'content-type': 'application/json', 'cache-control': 'no-store', 'content-length': Buffer.byteLength(text) };
    if (state.stopping) headers.connection = 'close'; // no further request on this connection
    res.writeHead(status, headers);
    res.end(text);
  }

  /** The request body as JSON; throws {status, message}. */
  function readJsonBody(req) {
    return new Promise((resolve, reject) => {
      const chunks = [];
      let size = 0;
      let failed = false;
      req.on('data', (chunk) => {
        if (failed) return;
        size += chunk.length;
        if (size > MAX_BODY_BYTES) {
          failed = true;
          reject(Object.assign(new Error(`body larger than ${MAX_BODY_BYTES} bytes`), { status: 413 }));
          return;
        }
        chunks.push(chunk);
      });
      req.on('error', (error) => {
        if (!failed) reject(Object.assign(error, { status: 400 }));
        failed = true;
      });
      req.on('end', () => {
        if (failed) return;
        const text = Buffer.concat(chunks).toString('utf8');
        try {
          resolve(JSON.parse(text));
        } catch (error) {
          reject(Object.assign(new Error(`the body is not JSON (${error.message})`), { status: 400 }));
        }
      });
    });
  }

  /**
   * Files: the verification's read of one company (read()), unless a
   * /simulate changed it in this load (its state is newer), or began to while
   * it was read (the worker may have read it half written): then null, and
   * the /simulate's own read of the company stands (it always makes one).
   * Nothing waits: neither the request for the verification, nor the reverse.
   */
  async function verifiedUnlessChanged(companyId, read) {
    if (state.touched.has(companyId)) return null;
    const before = state.changes.get(companyId) || 0;
    const result = await read();
    return (state.changes.get(companyId) || 0) === before ? result : null;
  }

  /** Every loaded company verified, no error: /health's digests are the whole store's. */
  function allVerified() {
    return !state.storeError && state.verifyErrors.length === 0 &&
      state.result.companies.every((c) => state.verified.has(c.id));
  }

  /** The service's view of one company after a change it made: its identity, digest and key count. */
  function takeCompany(company) {
    const { id, digest, keys, registrationId, me } = company;
    const loaded = state.result.companies.find((c) => c.id === id);
    if (loaded) Object.assign(loaded, { registrationId, me });
    else state.result.companies.push({ id, registrationId, me }); // made after the load: loaded now
    state.verified.set(id, { ...company, guessed: company.guessed || [] });
    state.touched.add(id);
    // A change whose read ends after the verification pass (it skipped the company, being changed) completes the
    // digests the pass left incomplete.
    if (!state.loading && !state.verifying) state.digestsComplete = allVerified();
  }

  /** Warnings found after the verification (a change re-reading files), each listed once. */
  function addWarnings(list) {
    const known = new Set(warnings());
    for (const w of list) {
      if (!known.has(w)) state.verifyWarnings.push(w);
      known.add(w);
    }
  }

  function logSimulated(out) {
    log.info('simulated', {
      company: out.company,
      store: config.store,
      written: out.written.length,
      deleted: out.deleted.length,
      credsChanged: out.creds_changed,
    });
  }

  /**
   * Files: the company's state as its files are now (CompanyStates: the files
   * changedFiles names or that are new, not the whole company, nor any other
   * one), taken into /health; or its errors, which make it unverified and the
   * service not ready, as a reload would. Returns {company} or {errors}.
   */
  async function readChangedCompany(companyId, changedFiles) {
    if (!state.companyStates) state.companyStates = selected.module.createCompanyStates(config);
    const found = await state.companyStates.update(companyId, changedFiles);
    addWarnings(found.warnings);
    const company = found.companies[0];
    if (company && !found.errors.length) {
      takeCompany(company);
      return { company };
    }
    for (const e of found.errors) {
      if (state.verifyErrors.length < 20) log.error('verify_error', { error: e }); // as the verification logs them
      state.verifyErrors.push(e);
    }
    state.verified.delete(companyId);
    state.touched.add(companyId);
    state.digestsComplete = false;
    return { errors: found.errors.length ? found.errors : [`company ${companyId} was not read`] };
  }

  /** Files: the change through Baileys, then the company's new state (readChangedCompany). Returns [status, body]. */
  async function simulateOnFiles(request) {
    const { simulateFiles } = require('./simulate');
    const id = request.company;
    let began = false;
    const beforeWrite = () => {
      began = true;
      state.changes.set(id, (state.changes.get(id) || 0) + 1);
    };
    let done;
    try {
      done = await simulateFiles(config.sessionsDir, request, { beforeWrite });
    } catch (error) {
      if (began) {
        // cut short after Baileys began writing: /health follows the files as they are
        if (state.companyStates) state.companyStates.forget(id);
        await readChangedCompany(id, []).catch(() => {});
      }
      throw error;
    }
    const { answer, changedFiles } = done;
    logSimulated(answer);
    const { company, errors: found } = await readChangedCompany(id, changedFiles);
    if (!company) {
      return [500, { ...answer, digest: null, error: `company ${id} did not verify after the change: ${found[0]}`, errors: capped(errors()) }];
    }
    return [200, { ...answer, digest: company.digest }];
  }

  /** The store in use is one /simulate writes (a stand-in store of the tests is not, unless it says how). */
  function canSimulate() {
    if (!SIMULATED_STORES.has(config.store) || selected.error || !selected.module || selected.module.name !== config.store) return false;
    return typeof selected.module[config.store === 'files' ? 'createCompanyStates' : 'createPool'] === 'function';
  }

  function pgPool() {
    if (!state.pool) state.pool = selected.module.createPool(config);
    return state.pool;
  }

  const STOPPING = [503, { error: 'the service is stopping' }];

  /**
   * POST /simulate, when ready, on the file or the PostgreSQL store
   * (src/simulate.js), during the verification too (it does not wait for it).
   * Files: written through Baileys, then that company's new state is taken
   * from the files it changed. PostgreSQL: one transaction that also reads
   * back the digest. Either way /health takes that company's new digest and
   * identity at once. Returns [status, body].
   */
  async function handleSimulate(body) {
    const { parseRequest, simulatePostgres, SimulateError } = require('./simulate');
    let request;
    try {
      request = parseRequest(body);
    } catch (error) {
      if (error instanceof SimulateError) return [error.status, { error: error.message }];
      throw error;
    }
    if (!canSimulate()) {
      return [409, { error: `the store in use is "${config.store}"${selected.error ? ' (unavailable at this revision)' : ''}: /simulate needs the file or the PostgreSQL store` }];
    }
    // runs one at a time, and not before a load is ready (its verification may run meanwhile)
    const running = () => state.simulating || (state.loading && state.loadingPromise);
    while (running() && !state.stopping) {
      await Promise.race([running().catch(() => {}), stopAnnounced]);
    }
    // a request that has not started when the stop begins is refused: nothing of it is applied
    if (state.stopping) return STOPPING;
    if (!isReady()) return [409, { error: 'the service is not ready', errors: capped(errors()) }];
    let done;
    state.simulating = new Promise((resolve) => {
      done = resolve;
    });
    try {
      if (config.store === 'files') return await simulateOnFiles(request);
      const result = await simulatePostgres(pgPool(), request);
      logSimulated(result.answer);
      takeCompany(result.company);
      return [200, result.answer];
    } catch (error) {
      if (error instanceof SimulateError) return [error.status, { error: error.message }];
      log.error('simulate_failed', { company: request.company, store: config.store, error: log.errorText(error) });
      return [500, { error: `simulate failed: ${log.errorText(error)}` }];
    } finally {
      state.simulating = null;
      done();
    }
  }

  const server = http.createServer((req, res) => {
    const url = (req.url || '/').split('?')[0];
    if (url === '/simulate' && req.method === 'POST') {
      // a stop waits for every request it has not answered
      const answered = new Promise((resolve) => res.once('close', resolve));
      state.requests.add(answered);
      answered.then(() => state.requests.delete(answered));
      if (state.stopping) {
        req.resume();
        send(res, ...STOPPING);
        return;
      }
      log.info('simulate_requested', { remote: req.socket.remoteAddress });
      readJsonBody(req)
        .then(handleSimulate, (error) => [error.status || 400, { error: error.message }])
        .catch((error) => [500, { error: log.errorText(error) }])
        .then(([status, body]) => {
          if (status === 413) res.setHeader('connection', 'close');
          send(res, status, body);
        });
      return;
    }
    req.resume();
    if (url === '/health' && (req.method === 'GET' || req.method === 'HEAD')) {
      const h = health();
      send(res, h.ready ? 200 : 503, h);
    } else if (url === '/reload' && req.method === 'POST') {
      log.info('reload_requested', { remote: req.socket.remoteAddress });
      reload('http').then(() => {
        const h = health();
        send(res, h.ready ? 200 : 503, h);
      });
    } else if (url === '/health' || url === '/reload' || url === '/simulate') {
      send(res, 405, { error: 'method not allowed' });
    } else {
      send(res, 404, { error: 'not found' });
    }
  });

  function start() {
    log.info('service_starting', { revision, config: publicConfig(config), node: process.version });
    if (selected.error) log.error('store_unavailable', { store: config.store, error: selected.error });
    for (const e of config.errors) log.error('config_error', { error: e });
    return new Promise((resolve, reject) => {
      server.once('error', reject);
      server.listen(config.healthPort, '127.0.0.1', () => {
        server.off('error', reject);
        log.info('health_listening', { address: '127.0.0.1', port: server.address().port });
        resolve(server.address().port);
        reload('start');
      });
    });
  }

  /**
   * Graceful stop (idempotent: every call gets the same promise). New
   * connections are refused (in PM2 cluster mode the other instances take
   * them) and a request arriving on an open one gets 503; the POST /simulate
   * requests already taken are answered (a PostgreSQL transaction commits or
   * rolls back as a whole), the load ends; then the pool is closed. Bounded by
   * STOP_DRAIN_MS + STOP_POOL_MS.
   */
  function stop(signal) {
    if (!state.stopPromise) state.stopPromise = stopNow(signal);
    return state.stopPromise;
  }

  async function stopNow(signal) {
    state.stopping = true;
    announceStop();
    log.info('service_stopping', { signal, requests: state.requests.size });
    if (state.retryTimer) clearTimeout(state.retryTimer);
    server.close();
    server.closeIdleConnections();
    const timeout = (ms) => new Promise((resolve) => setTimeout(resolve, ms, false).unref());
    const pending = [...state.requests, state.loadPromise].filter(Boolean).map((p) => p.catch(() => {}));
    const drained = await Promise.race([Promise.all(pending).then(() => true), timeout(STOP_DRAIN_MS)]);
    server.closeAllConnections();
    if (state.pool) await Promise.race([state.pool.end().catch(() => {}), timeout(STOP_POOL_MS)]);
    log[drained ? 'info' : 'warn']('service_stopped', { signal, drained, requests: state.requests.size });
  }

  return { start, stop, reload, health, config, server, state };
}

/**
 * Exits once stdout has taken the last log lines: under PM2's cluster mode
 * stdout is PM2's asynchronous file stream, which a bare exit() cuts short.
 */
function exitFlushed(code) {
  setTimeout(() => process.exit(code), STOP_FLUSH_MS);
  process.stdout.write('', () => process.exit(code));
}

function main() {
  const service = createService();
  const onSignal = (signal) => {
    service.stop(signal).then(() => exitFlushed(0));
  };
  // on, not once: a repeated signal must not kill the process in the middle of the stop
  process.on('SIGINT', () => onSignal('SIGINT'));
  process.on('SIGTERM', () => onSignal('SIGTERM'));
  // PM2 (shutdown_with_message, e.g. on Windows or in some cluster set-ups) asks by message instead
  process.on('message', (message) => {
    if (message === 'shutdown') onSignal('shutdown');
  });
  process.on('unhandledRejection', (reason) => log.error('unhandled_rejection', { error: log.errorText(reason) }));
  process.on('uncaughtException', (error) => {
    log.error('uncaught_exception', { error: log.errorText(error), stack: String(error.stack || '').split('\n').slice(0, 8) });
    process.exit(1);
  });
  service.start().catch((error) => {
    log.error('service_failed', { error: log.errorText(error) });
    process.exit(1);
  });
}

if (require.main === module) main();

module.exports = { createService, resolveStore, gitRevision };
