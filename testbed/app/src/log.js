'use strict';
// One JSON line per event on stdout. Never pass secrets in fields.

const SECRET_NAME = /pass(word)?|secret|token|dsn|credential/i;

function scrub(fields) {
  const out = {};
  for (const [name, value] of Object.entries(fields || {})) {
    if (SECRET_NAME.test(name)) continue;
    out[name] = value instanceof Error ? errorText(value) : value;
  }
  return out;
}

function errorText(error) {
  if (!error) return String(error);
  const code = error.code ? ` (${error.code})` : '';
  return `${error.message || String(error)}${code}`;
}

function log(level, event, fields) {
  const record = Object.assign({ time: new Date().toISOString(), level, event, pid: process.pid }, scrub(fields));
  try {
    process.stdout.write(JSON.stringify(record) + '\n');
  } catch {
    // stdout gone (EPIPE during shutdown): nothing useful left to do
  }
}

module.exports = {
  errorText,
  info: (event, fields) => log('info', event, fields),
  warn: (event, fields) => log('warn', event, fields),
  error: (event, fields) => log('error', event, fields),
};
