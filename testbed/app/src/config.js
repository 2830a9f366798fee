'use strict';
// Configuration from <app root>/.env and the process environment.
//
// dotenv's rule: a variable already in the process environment wins over
// .env (even when it is empty). This is the PM2 trap the DR project guards
// against, reproduced on purpose: `pm2 restart --update-env` keeps stale
// variables, and they beat a rewritten .env. /health reports where each
// store flag came from.

const fs = require('node:fs');
const path = require('node:path');

const APP_ROOT = path.resolve(__dirname, '..');
const COMPANY_ID_RE = /^[A-Za-z0-9_-]{1,50}$/;
const FLAGS = ['USE_LEGACY_SUPABASE', 'USE_DATABASE_AUTH_STATE', 'USE_REPOSITORY_PATTERN'];

function readEnvFile(file) {
  try {
    const text = fs.readFileSync(file);
    return { vars: require('dotenv').parse(text), error: null, present: true };
  } catch (error) {
    if (error.code === 'ENOENT') return { vars: {}, error: null, present: false };
    return { vars: {}, error: `cannot read ${file}: ${error.message}`, present: false };
  }
}

/** The store chosen by the flags (../shared/DOMAIN.md section 3). */
function selectStore(useLegacySupabase, useDatabaseAuthState) {
  if (useLegacySupabase !== 'false') return 'supabase';
  return useDatabaseAuthState === 'true' ? 'postgres' : 'files';
}

function parsePort(text, fallback) {
  if (text === undefined || text === '') return { port: fallback, error: null };
  if (!/^[0-9]{1,5}$/.test(text) || Number(text) < 1 || Number(text) > 65535) {
    return { port: fallback, error: `invalid port ${JSON.stringify(text)}` };
  }
  return { port: Number(text), error: null };
}

function loadConfig(options = {}) {
  const appRoot = options.appRoot || APP_ROOT;
  const env = options.env || process.env;
  const envFile = path.join(appRoot, '.env');
  const file = readEnvFile(envFile);
  const errors = file.error ? [file.error] : [];

  const source = {};
  const get = (name) => {
    if (Object.prototype.hasOwnProperty.call(env, name)) {
      source[name] = 'environment';
      return env[name];
    }
    if (Object.prototype.hasOwnProperty.call(file.vars, name)) {
      source[name] = '.env';
      return file.vars[name];
    }
    source[name] = 'default';
    return undefined;
  };

  const flags = {};
  for (const name of FLAGS) {
    const value = get(name);
    flags[name] = { value: value === undefined ? null : value, source: source[name] };
  }

  const health = parsePort(get('HEALTH_PORT'), 3011);
  if (health.error) errors.push(`HEALTH_PORT: ${health.error}`);
  const pgPort = parsePort(get('POSTGRES_PORT'), 5432);
  if (pgPort.error) errors.push(`POSTGRES_PORT: ${pgPort.error}`);

  const sessionsDir = get('SESSIONS_DIR');
  return {
    appRoot,
    envFile,
    envFilePresent: file.present,
    store: selectStore(flags.USE_LEGACY_SUPABASE.value, flags.USE_DATABASE_AUTH_STATE.value),
    flags,
    healthPort: health.port,
    sessionsDir: sessionsDir ? path.resolve(appRoot, sessionsDir) : path.join(appRoot, 'baileys_sessions'),
    postgres: {
      host: get('POSTGRES_HOST') || 'localhost',
      port: pgPort.port,
      database: get('POSTGRES_DB') || undefined,
      user: get('POSTGRES_USER') || undefined,
      // Kept out of every log line and of /health.
      password: get('POSTGRES_PASSWORD'),
    },
    errors,
  };
}

/** The configuration without secrets, for logs and /health. */
function publicConfig(config) {
  return {
    store: config.store,
    flags: config.flags,
    envFilePresent: config.envFilePresent,
    healthPort: config.healthPort,
    sessionsDir: config.sessionsDir,
    postgres: { host: config.postgres.host, port: config.postgres.port, database: config.postgres.database || null, user: config.postgres.user || null },
  };
}

module.exports = { APP_ROOT, COMPANY_ID_RE, FLAGS, loadConfig, publicConfig, selectStore };
