'use strict';
// The state digest (v1), the Node twin of module_utils/baileys_dr_codec.py.
// Spec: docs/architecture.md, "The state digest (v1)". Both implementations
// are tested against tests/vectors/digest_vectors.json.
//
// No third-party dependency: this file must load without node_modules.

const crypto = require('node:crypto');

const DIGEST_HEADER = '["baileys-dr-state",1]';

// SignalDataTypeMap across Baileys v6.7 to v7 rc.
const KEY_TYPES = Object.freeze([
  'pre-key',
  'session',
  'sender-key',
  'sender-key-memory',
  'app-state-sync-key',
  'app-state-sync-version',
  'lid-mapping',
  'device-list',
  'tctoken',
  'identity-key',
]);

// Standard base64, padding optional (the same expression as the Python codec).
const BASE64_RE = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}(?:==)?|[A-Za-z0-9+/]{3}=?)?$/;
// protobuf's JSON form of an int64 (a leading '-' is accepted, as protobuf does).
const INT_STRING_RE = /^-?[0-9]+$/;

/** Bytes of a standard base64 string (padding optional), or null. */
function decodeBase64(text) {
  if (typeof text !== 'string' || !BASE64_RE.test(text)) return null;
  return Buffer.from(text, 'base64');
}

function isPlainObject(value) {
  return value !== null && typeof value === 'object' && !Array.isArray(value) && !(value instanceof Uint8Array);
}

/**
 * The bytes a value stands for, or null when it is not a Buffer:
 * a Buffer/Uint8Array instance, or an object {type: "Buffer", data} (and no
 * other member) whose data is an array of integers 0-255 or standard base64.
 */
function byteList(items) {
  for (const b of items) {
    if (typeof b !== 'number' || !Number.isInteger(b) || b < 0 || b > 255) return null;
  }
  return Buffer.from(items);
}

/**
 * A Uint8Array as plain JSON.stringify writes it: {"0": 12, "1": 34, ...}, keys
 * exactly "0".."n-1" (JavaScript enumerates integer keys in numeric order), which
 * Baileys' reviver reads back as bytes.
 */
function indexedBytes(value) {
  const names = Object.keys(value);
  if (names.length === 0) return null;
  for (let i = 0; i < names.length; i++) {
    if (names[i] !== String(i)) return null;
  }
  return byteList(names.map((name) => value[name]));
}

function bufferBytes(value) {
  if (value instanceof Uint8Array) return Buffer.from(value.buffer, value.byteOffset, value.byteLength);
  if (!isPlainObject(value)) return null;
  if (value.type !== 'Buffer') return indexedBytes(value);
  const names = Object.keys(value);
  if (names.length !== 2 || !Object.prototype.hasOwnProperty.call(value, 'data')) return null;
  const data = value.data;
  if (typeof data === 'string') return decodeBase64(data);
  if (Array.isArray(data)) return byteList(data);
  return null;
}

/** Protobuf JSON form of app-state-sync-key values (keyData base64, timestamp digits). */
function applyTypeRules(keyType, value) {
  if (keyType !== 'app-state-sync-key' || !isPlainObject(value) || bufferBytes(value) !== null) return value;
  const out = { ...value }; // spread defines an own "__proto__" member, Object.assign would not
  if (typeof out.keyData === 'string') {
    const raw = decodeBase64(out.keyData);
    if (raw !== null) out.keyData = raw;
  }
  if (typeof out.timestamp === 'string' && INT_STRING_RE.test(out.timestamp)) {
    out.timestamp = BigInt(out.timestamp);
  }
  return out;
}

function compareUtf8(a, b) {
  return Buffer.compare(Buffer.from(a, 'utf8'), Buffer.from(b, 'utf8'));
}

function formatNumber(value) {
  if (!Number.isFinite(value)) return 'null'; // JSON.stringify's rule; JSONB cannot hold these
  if (Number.isInteger(value)) {
    // "a float with an integral value as that integer": no exponent, ever.
    return Math.abs(value) < 1e21 ? String(value === 0 ? 0 : value) : BigInt(value).toString();
  }
  // Shortest round-trip form, as ECMAScript's Number::toString writes it.
  return String(value);
}

// A surrogate: UTF-16 code unit order differs from UTF-8 byte order only for names holding one.
const SURROGATE_RE = /[\uD800-\uDFFF]/;
const byCodeUnits = (a, b) => (a < b ? -1 : a > b ? 1 : 0);

/** Object member names sorted by their UTF-8 bytes. */
function sortedNames(names) {
  if (!names.some((name) => SURROGATE_RE.test(name))) return names.sort(byCodeUnits); // the common case, without encoding
  return names
    .map((name) => [Buffer.from(name, 'utf8'), name])
    .sort((a, b) => Buffer.compare(a[0], b[0]))
    .map((pair) => pair[1]);
}

function writeCanonical(value, out) {
  if (value === null || value === undefined) {
    out.push('null');
    return;
  }
  switch (typeof value) {
    case 'string':
      out.push(JSON.stringify(value));
      return;
    case 'boolean':
      out.push(value ? 'true' : 'false');
      return;
    case 'number':
      out.push(formatNumber(value));
      return;
    case 'bigint':
      out.push(value.toString());
      return;
    case 'object':
      break;
    default:
      throw new TypeError(`cannot canonicalise a value of type ${typeof value}`);
  }
  const raw = bufferBytes(value);
  if (raw !== null) {
    out.push('{"data":"', raw.toString('base64'), '","type":"Buffer"}');
    return;
  }
  if (Array.isArray(value)) {
    out.push('[');
    for (let i = 0; i < value.length; i++) {
      if (i) out.push(',');
      const item = value[i];
      writeCanonical(typeof item === 'function' ? null : item, out);
    }
    out.push(']');
    return;
  }
  if (typeof value.toJSON === 'function') {
    // e.g. a Date or a protobuf Long that slipped through: what JSON.stringify would see.
    writeCanonical(value.toJSON(), out);
    return;
  }
  const names = sortedNames(Object.keys(value).filter((name) => value[name] !== undefined && typeof value[name] !== 'function'));
  out.push('{');
  for (let i = 0; i < names.length; i++) {
    if (i) out.push(',');
    const name = names[i];
    out.push(JSON.stringify(name), ':');
    writeCanonical(value[name], out);
  }
  out.push('}');
}

/** Canonical JSON text of a value (keyType applies the app-state-sync-key rule). */
function canonicalJson(value, keyType) {
  const out = [];
  writeCanonical(applyTypeRules(keyType, value), out);
  return out.join('');
}

/** One digest line (without its newline) for a key. */
function keyLine(type, id, value) {
  return `[${JSON.stringify(type)},${JSON.stringify(id)},${canonicalJson(value, type)}]`;
}

/** The creds line of a digest (without its newline); null/undefined creds give `["creds",null]`. */
function credsLine(creds) {
  return `["creds",${canonicalJson(creds === undefined ? null : creds)}]`;
}

/** Hex sha256 of a digest line's UTF-8 (what POST /simulate reports per written key and for creds). */
function lineSha256(line) {
  return crypto.createHash('sha256').update(line, 'utf8').digest('hex');
}

class DigestOrderError extends Error {}

/**
 * Streaming digest of one company. Keys must arrive sorted by (type, id) as
 * UTF-8 bytes (PostgreSQL: ORDER BY key_type COLLATE "C", key_id COLLATE "C").
 * addLine() takes a line made by keyLine() for callers that sort lines themselves.
 */
class StateDigest {
  constructor(creds) {
    this._hash = crypto.createHash('sha256');
    this._last = null;
    this.keys = 0;
    this._hash.update(DIGEST_HEADER + '\n', 'utf8');
    this._hash.update(credsLine(creds) + '\n', 'utf8');
  }

  _checkOrder(type, id) {
    const position = [Buffer.from(type, 'utf8'), Buffer.from(id, 'utf8')];
    if (this._last !== null) {
      const c = Buffer.compare(this._last[0], position[0]) || Buffer.compare(this._last[1], position[1]);
      if (c >= 0) throw new DigestOrderError(`key ${type}/${JSON.stringify(id)} is out of order or repeated`);
    }
    this._last = position;
  }

  add(type, id, value) {
    this.addLine(type, id, keyLine(type, id, value));
  }

  addLine(type, id, line) {
    this._checkOrder(type, id);
    this.keys += 1;
    this._hash.update(line + '\n', 'utf8');
  }

  hexdigest() {
    return this._hash.digest('hex');
  }
}

function keyParts(key) {
  if (Array.isArray(key)) return { type: key[0], id: key[1], value: key[2] };
  return key;
}

/** Sorts entries [{type, id, ...}] in place by (type, id) as UTF-8 bytes. */
function sortKeys(entries) {
  const decorated = entries.map((e) => [Buffer.from(e.type, 'utf8'), Buffer.from(e.id, 'utf8'), e]);
  decorated.sort((a, b) => Buffer.compare(a[0], b[0]) || Buffer.compare(a[1], b[1]));
  return decorated.map((d) => d[2]);
}

/** Digest of one company: keys is an iterable of {type, id, value} (or [type, id, value]) in any order. */
function stateDigest(creds, keys) {
  const digest = new StateDigest(creds);
  const entries = [];
  for (const key of keys || []) {
    const { type, id, value } = keyParts(key);
    if (typeof type !== 'string' || typeof id !== 'string') throw new TypeError('key type and id must be strings');
    entries.push({ type, id, value });
  }
  for (const e of sortKeys(entries)) digest.add(e.type, e.id, e.value);
  return digest.hexdigest();
}

/** Baileys' fixFileName: every '/' becomes '__', then every ':' becomes '-'. */
function fixFileName(id) {
  return String(id).replace(/\//g, '__').replace(/:/g, '-');
}

/** File name useMultiFileAuthState uses for a key. */
function keyFileName(type, id) {
  return `${type}-${fixFileName(id)}.json`;
}

// Longest type first, so that "sender-key-memory-x" is not read as sender-key "memory-x".
const TYPES_BY_LENGTH = [...KEY_TYPES].sort((a, b) => b.length - a.length);

/** {type, name} of a key file name "<type>-<name>.json", or null (creds.json, unknown types). */
function parseKeyFileName(fileName) {
  if (!fileName.endsWith('.json')) return null;
  const stem = fileName.slice(0, -'.json'.length);
  for (const type of TYPES_BY_LENGTH) {
    if (stem.startsWith(type + '-') && stem.length > type.length + 1) {
      return { type, name: stem.slice(type.length + 1) };
    }
  }
  return null;
}

// Shapes of ids whose file names cannot come from any other id.
const PLAIN_SHAPES = {
  'pre-key': /^[0-9]+$/,
  session: /^[A-Za-z0-9_@.]+\.[0-9]+$/, // signal address user[_domain].device
  'identity-key': /^[A-Za-z0-9_@.]+\.[0-9]+$/,
  'lid-mapping': /^[0-9]+(?:_reverse)?$/,
  'device-list': /^[0-9]+$/,
  'sender-key-memory': /^[0-9-]+@[a-z.]+$/, // group jid, old groups have '-' in them
  tctoken: /^[0-9]+@[a-z.]+$/,
  'app-state-sync-version': /^[a-z_]+$/,
};
const JID_PART = /^[0-9A-Za-z_.@-]+$/;

/**
 * Type-aware best-effort reverse of fixFileName for the id part of a key file
 * name. Returns {id, ambiguous}; ambiguous is true when another id could
 * have produced the same name (a '-' that may have been ':', '__' that may
 * have been '/'), or the name has an unexpected shape. Whatever it returns,
 * fixFileName(id) === name, so Baileys reads the same file with that id.
 */
function reverseFileName(type, name) {
  const shape = PLAIN_SHAPES[type];
  if (shape && shape.test(name)) return { id: name, ambiguous: false };

  if (type === 'app-state-sync-key') {
    // base64 ids: '/' was written as '__'; base64 has no '_', '-' or ':'.
    if (/^[A-Za-z0-9+=_]*$/.test(name)) {
      const id = name.replace(/__/g, '/');
      if (!id.includes('_') && BASE64_RE.test(id)) return { id, ambiguous: false };
    }
  } else if (type === 'sender-key') {
    // group::user::device -> group--user--device; jids hold no ':' but old group ids hold '-'.
    const parts = name.split('--');
    if (
      parts.length === 3 &&
      parts.every((p) => p.length > 0 && JID_PART.test(p) && !p.startsWith('-') && !p.endsWith('-') && !p.includes('__')) &&
      /^[0-9]+$/.test(parts[2])
    ) {
      return { id: parts.join('::'), ambiguous: false };
    }
  }
  // Unknown shape: keep the name; it is ambiguous wherever fixFileName loses information.
  return { id: name, ambiguous: /-|__/.test(name) };
}

module.exports = {
  DIGEST_HEADER,
  KEY_TYPES,
  DigestOrderError,
  StateDigest,
  applyTypeRules,
  bufferBytes,
  canonicalJson,
  compareUtf8,
  credsLine,
  decodeBase64,
  fixFileName,
  keyFileName,
  keyLine,
  lineSha256,
  parseKeyFileName,
  reverseFileName,
  sortKeys,
  stateDigest,
};
