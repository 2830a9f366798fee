'use strict';
// The credentials cache file of the real service (seed review section 2.2,
// session-pool.js): every company's creds as last loaded from PostgreSQL,
// kept in <app root>/.baileys-cache.json so that the service can start on
// them while PostgreSQL is unreachable. As the service writes it: one object
// {companyId: {creds, keys: {_isCached: true}, timestamp}} (no version
// field), plain JSON.stringify (byte-array Buffers), a temp file renamed over
// the cache, mode 0600. baileys-dr's health reports it and a failover moves it
// aside (module_utils/baileys_dr_identity.py). This stand-in only writes it:
// it never starts on it (a store that cannot be read makes it not ready).

const fsp = require('node:fs/promises');
const path = require('node:path');

const CACHE_FILE = '.baileys-cache.json';
const CACHE_MODE = 0o600;

/** Writes creds (a Map companyId -> creds) as the cache of appRoot, atomically; returns its path. */
async function saveCredentialsCache(appRoot, creds, now = Date.now()) {
  const document = {};
  for (const [companyId, value] of creds) document[companyId] = { creds: value, keys: { _isCached: true }, timestamp: now };
  const target = path.join(appRoot, CACHE_FILE);
  const temp = `${target}.tmp-${process.pid}`;
  try {
    await fsp.writeFile(temp, JSON.stringify(document), { mode: CACHE_MODE });
    await fsp.chmod(temp, CACHE_MODE); // whatever the umask
    await fsp.rename(temp, target);
  } catch (error) {
    await fsp.rm(temp, { force: true });
    throw error;
  }
  return target;
}

module.exports = { CACHE_FILE, CACHE_MODE, saveCredentialsCache };
