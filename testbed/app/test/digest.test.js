'use strict';
// The Node twin of the state digest against the shared vectors
// (tests/vectors/digest_vectors.json, digests made by the Python codec) and
// its own behaviour. Needs no node_modules.

const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const crypto = require('node:crypto');
const d = require('../src/digest');

const VECTORS = process.env.BAILEYS_DR_VECTORS || path.resolve(__dirname, '..', '..', '..', 'tests', 'vectors', 'digest_vectors.json');

test('shared vectors: the Node digest equals the Python digest', () => {
  assert.ok(fs.existsSync(VECTORS), `vectors file missing: ${VECTORS} (set BAILEYS_DR_VECTORS)`);
  const { cases } = JSON.parse(fs.readFileSync(VECTORS, 'utf8'));
  assert.ok(Array.isArray(cases) && cases.length > 0, 'no cases in the vectors file');
  for (const c of cases) {
    assert.equal(d.stateDigest(c.creds, c.keys), c.digest, `vector "${c.name}"`);
  }
});

const sample = () => ({
  creds: { registrationId: 7, noiseKey: { private: Buffer.from([1, 2, 3]), public: Buffer.from([4, 5, 6]) }, advSecretKey: 'c2VjcmV0' },
  keys: [
    { type: 'pre-key', id: '1', value: { private: Buffer.alloc(32, 1), public: Buffer.alloc(33, 2) } },
    { type: 'session', id: '4915551234.0', value: { _sessions: {}, version: 'v1' } },
    { type: 'sender-key', id: '120363@g.us::4915551234::0', value: Buffer.from('[{"senderKeyId":1}]') },
    { type: 'app-state-sync-key', id: 'AAAAAPv/AA==', value: { keyData: Buffer.alloc(32, 9), fingerprint: { rawId: 1, currentIndex: 0, deviceIndexes: [0] }, timestamp: 1700000000000 } },
  ],
});

/** The value with every Buffer in the given JSON form. */
function encoded(value, form) {
  return JSON.parse(JSON.stringify(value, function replacer(key, v) {
    const raw = this[key];
    if (raw instanceof Uint8Array) {
      return { type: 'Buffer', data: form === 'array' ? [...raw] : Buffer.from(raw).toString('base64') };
    }
    return v;
  }));
}

test('array Buffers, base64 Buffers (with or without padding) and Buffer instances give one digest', () => {
  const s = sample();
  const live = d.stateDigest(s.creds, s.keys);
  const arr = d.stateDigest(encoded(s.creds, 'array'), encoded(s.keys, 'array'));
  const b64 = d.stateDigest(encoded(s.creds, 'base64'), encoded(s.keys, 'base64'));
  assert.equal(arr, live);
  assert.equal(b64, live);
  const unpadded = JSON.parse(JSON.stringify(encoded(s.creds, 'base64')).replace(/=+"/g, '"'));
  assert.equal(d.stateDigest(unpadded, encoded(s.keys, 'base64')), live);
  const u8 = { ...s.creds, noiseKey: { private: new Uint8Array([1, 2, 3]), public: new Uint8Array([4, 5, 6]) } };
  assert.equal(d.stateDigest(u8, s.keys), live);
  // a Uint8Array view into a bigger buffer stands for its own bytes only
  const backing = new Uint8Array([9, 1, 2, 3, 9]);
  const view = { ...s.creds, noiseKey: { private: backing.subarray(1, 4), public: Buffer.from([4, 5, 6]) } };
  assert.equal(d.stateDigest(view, s.keys), live);
});

test('protobuf JSON form of app-state-sync-key (keyData base64, timestamp string) digests as the decoded form', () => {
  const s = sample();
  const live = d.stateDigest(s.creds, s.keys);
  const protoJson = s.keys.map((k) => (k.type === 'app-state-sync-key'
    ? { ...k, value: { keyData: k.value.keyData.toString('base64'), fingerprint: k.value.fingerprint, timestamp: String(k.value.timestamp) } }
    : k));
  assert.equal(d.stateDigest(s.creds, protoJson), live);
  // the rule is for that type only
  assert.notEqual(d.canonicalJson({ keyData: 'AAAA' }, 'session'), d.canonicalJson({ keyData: 'AAAA' }, 'app-state-sync-key'));
  assert.equal(d.canonicalJson({ timestamp: '0012' }, 'app-state-sync-key'), '{"timestamp":12}');
  assert.equal(d.canonicalJson({ timestamp: '99999999999999999999' }, 'app-state-sync-key'), '{"timestamp":99999999999999999999}');
});

test('any changed byte, id, type or creds changes the digest', () => {
  const s = sample();
  const base = d.stateDigest(s.creds, s.keys);
  const seen = new Set([base]);
  const buf = Buffer.alloc(32, 1);
  for (let i = 0; i < buf.length; i += 7) {
    const changed = Buffer.from(buf);
    changed[i] ^= 1;
    const keys = s.keys.map((k, j) => (j === 0 ? { ...k, value: { ...k.value, private: changed } } : k));
    const digest = d.stateDigest(s.creds, keys);
    assert.ok(!seen.has(digest), `byte ${i}`);
    seen.add(digest);
  }
  const variants = [
    d.stateDigest({ ...s.creds, registrationId: 8 }, s.keys),
    d.stateDigest(null, s.keys),
    d.stateDigest(s.creds, s.keys.slice(1)),
    d.stateDigest(s.creds, s.keys.map((k, j) => (j === 1 ? { ...k, id: '4915551234.1' } : k))),
    d.stateDigest(s.creds, s.keys.map((k, j) => (j === 1 ? { ...k, type: 'identity-key' } : k))),
    d.stateDigest(s.creds, s.keys.map((k, j) => (j === 3 ? { ...k, value: { ...k.value, extra: 1 } } : k))),
  ];
  for (const v of variants) {
    assert.ok(!seen.has(v));
    seen.add(v);
  }
});

test('key order does not matter; duplicates are refused', () => {
  const s = sample();
  const base = d.stateDigest(s.creds, s.keys);
  for (let round = 0; round < 20; round++) {
    const shuffled = [...s.keys].sort(() => crypto.randomInt(3) - 1);
    assert.equal(d.stateDigest(s.creds, shuffled), base);
  }
  assert.equal(d.stateDigest(s.creds, s.keys.map((k) => [k.type, k.id, k.value])), base);
  assert.throws(() => d.stateDigest(s.creds, [...s.keys, s.keys[0]]), d.DigestOrderError);
  const streaming = new d.StateDigest(s.creds);
  streaming.add('session', 'b', 1);
  assert.throws(() => streaming.add('session', 'a', 1), d.DigestOrderError);
});

test('keys sort by UTF-8 bytes, not UTF-16 code units; unicode ids work', () => {
  // U+FF5E (EF BD 9E in UTF-8) sorts before U+1F600 (F0 9F 98 80) in UTF-8,
  // but after it in UTF-16 (0xFF5E > 0xD83D).
  const a = { type: 'session', id: 'x\uff5e', value: 1 };
  const b = { type: 'session', id: 'x\u{1F600}', value: 2 };
  const expected = crypto.createHash('sha256').update(
    '["baileys-dr-state",1]\n["creds",null]\n' + `["session","x\uff5e",1]\n` + `["session","x\u{1F600}",2]\n`, 'utf8',
  ).digest('hex');
  assert.equal(d.stateDigest(null, [b, a]), expected);
  assert.equal(d.stateDigest(null, [a, b]), expected);
  const streaming = new d.StateDigest(null);
  streaming.add('session', 'x\uff5e', 1);
  streaming.add('session', 'x\u{1F600}', 2);
  assert.equal(streaming.hexdigest(), expected);
  // member names too
  assert.equal(d.canonicalJson({ '\u{1F600}': 1, '\uff5e': 2, B: 3, a: 4, '': 5 }), '{"":5,"B":3,"a":4,"\uff5e":2,"\u{1F600}":1}');
});

test('the line format is exactly the one of docs/architecture.md', () => {
  const expected = crypto.createHash('sha256').update(
    '["baileys-dr-state",1]\n' +
    '["creds",{"a":{"data":"AQI=","type":"Buffer"},"b":[1,"x"]}]\n' +
    '["pre-key","1",{"private":{"data":"","type":"Buffer"}}]\n',
    'utf8',
  ).digest('hex');
  const digest = d.stateDigest({ b: [1, 'x'], a: { type: 'Buffer', data: [1, 2] } }, [{ type: 'pre-key', id: '1', value: { private: { type: 'Buffer', data: '' } } }]);
  assert.equal(digest, expected);
});

test('canonical JSON: strings as JSON.stringify, numbers, non-Buffer look-alikes', () => {
  assert.equal(d.canonicalJson('q"\\\b\f\n\r\t\u0001\u001f\u007f\u2028é😀'), JSON.stringify('q"\\\b\f\n\r\t\u0001\u001f\u007f\u2028é😀'));
  assert.equal(d.canonicalJson('\u0001'), '"\\u0001"');
  assert.equal(d.canonicalJson('\ud800'), '"\\ud800"'); // lone surrogate, as JSON.stringify
  assert.equal(d.canonicalJson([1, 2.0, -0, 1.5, 0.1, 1e21, -3]), '[1,2,0,1.5,0.1,1000000000000000000000,-3]');
  assert.equal(d.canonicalJson([true, false, null]), '[true,false,null]');
  // not Buffers: an extra member, bytes out of range, non-integers, bad base64
  for (const v of [
    { type: 'Buffer', data: [1], x: 1 },
    { type: 'Buffer', data: [256] },
    { type: 'Buffer', data: [1.5] },
    { type: 'Buffer', data: [true] },
    { type: 'Buffer', data: 'A' },
    { type: 'Buffer', data: 'AA-_' },
    { type: 'Buffer', data: 'AA AA' },
    { type: 'Buffer' },
    { type: 'buffer', data: [1] },
  ]) {
    assert.equal(d.bufferBytes(v), null, JSON.stringify(v));
  }
  assert.equal(d.canonicalJson({ x: 1, type: 'Buffer', data: [1] }), '{"data":[1],"type":"Buffer","x":1}');
  assert.equal(d.canonicalJson({ type: 'Buffer', data: 'AQ' }), '{"data":"AQ==","type":"Buffer"}');
  assert.equal(d.canonicalJson({ type: 'Buffer', data: [] }), '{"data":"","type":"Buffer"}');
  // "__proto__" is an ordinary member name (JSON.parse makes it an own property)
  const proto = JSON.parse('{"__proto__":{"x":1},"keyData":"AAAA"}');
  assert.equal(d.canonicalJson(proto, 'app-state-sync-key'), '{"__proto__":{"x":1},"keyData":{"data":"AAAA","type":"Buffer"}}');
  // nested Buffers inside arrays and objects
  assert.equal(d.canonicalJson([{ k: { type: 'Buffer', data: [255] } }]), '[{"k":{"data":"/w==","type":"Buffer"}}]');
});

test('fixFileName is Baileys\'', () => {
  assert.equal(d.fixFileName('120363@g.us::4915551234::0'), '120363@g.us--4915551234--0');
  assert.equal(d.fixFileName('a/b/c:d'), 'a__b__c-d');
  assert.equal(d.keyFileName('app-state-sync-key', 'AAAAAPv/AA=='), 'app-state-sync-key-AAAAAPv__AA==.json');
});

test('parseKeyFileName takes the longest type', () => {
  assert.deepEqual(d.parseKeyFileName('sender-key-memory-120363@g.us.json'), { type: 'sender-key-memory', name: '120363@g.us' });
  assert.deepEqual(d.parseKeyFileName('sender-key-120363@g.us--1--0.json'), { type: 'sender-key', name: '120363@g.us--1--0' });
  assert.deepEqual(d.parseKeyFileName('pre-key-12.json'), { type: 'pre-key', name: '12' });
  assert.equal(d.parseKeyFileName('creds.json'), null);
  assert.equal(d.parseKeyFileName('pre-key-.json'), null);
  assert.equal(d.parseKeyFileName('unknown-1.json'), null);
  assert.equal(d.parseKeyFileName('pre-key-1.json.tmp'), null);
});

test('reverseFileName: type-aware, and fixFileName(id) always gives the name back', () => {
  const cases = [
    ['pre-key', '42', '42', false],
    ['session', '4915551234.0', '4915551234.0', false],
    ['session', '123456789012345_1.3', '123456789012345_1.3', false],
    ['identity-key', '4915551234.0', '4915551234.0', false],
    ['sender-key', '120363@g.us--4915551234--0', '120363@g.us::4915551234::0', false],
    ['sender-key', '4915551234-1600000000@g.us--12345_1--3', '4915551234-1600000000@g.us::12345_1::3', false],
    ['sender-key-memory', '4915551234-1600000000@g.us', '4915551234-1600000000@g.us', false],
    ['app-state-sync-key', 'AAAAAPv__AA==', 'AAAAAPv/AA==', false],
    ['app-state-sync-key', 'AAAAAFx__Zw', 'AAAAAFx/Zw', false],
    ['app-state-sync-version', 'critical_block', 'critical_block', false],
    ['app-state-sync-version', 'regular_high', 'regular_high', false],
    ['lid-mapping', '4915551234', '4915551234', false],
    ['lid-mapping', '123456789012345_reverse', '123456789012345_reverse', false],
    ['device-list', '4915551234', '4915551234', false],
    ['tctoken', '4915551234@s.whatsapp.net', '4915551234@s.whatsapp.net', false],
    // ambiguous: a '-' that may have been ':', '__' that may have been '/'
    ['session', 'ключ-😀-1', 'ключ-😀-1', true],
    ['sender-key', 'a--b', 'a--b', true],
    ['sender-key', 'g---u--0', 'g---u--0', true],
    ['app-state-sync-key', 'AA___A', 'AA___A', true],
    ['pre-key', 'x__y', 'x__y', true],
    ['tctoken', 'user-7@s.whatsapp.net', 'user-7@s.whatsapp.net', true],
  ];
  for (const [type, name, id, ambiguous] of cases) {
    assert.deepEqual(d.reverseFileName(type, name), { id, ambiguous }, `${type} ${name}`);
    assert.equal(d.fixFileName(d.reverseFileName(type, name).id), name, `round trip of ${type} ${name}`);
  }
  // a round trip through fixFileName for ids of the usual shapes
  for (const [type, id] of [['sender-key', '120363@g.us::4915551234::0'], ['app-state-sync-key', '+/+/AA=='], ['pre-key', '7']]) {
    assert.deepEqual(d.reverseFileName(type, d.fixFileName(id)), { id, ambiguous: false });
  }
});
