# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Baileys auth-state codec shared by every baileys-dr module.

Buffer encodings, Baileys' file naming, canonical JSON and the state digest
(docs/architecture.md, "The state digest (v1)"). The Node twin lives in
testbed/app/src/digest.js; both are tested against tests/vectors.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import json.encoder
import math
import re
import sys

COMPANY_ID_RE = re.compile(r"\A[A-Za-z0-9_-]{1,50}\Z")

# SignalDataTypeMap across Baileys v6.7 to v7 rc.
KEY_TYPES = (
    "pre-key",
    "session",
    "sender-key",
    "sender-key-memory",
    "app-state-sync-key",
    "app-state-sync-version",
    "lid-mapping",
    "device-list",
    "tctoken",
    "identity-key",
)

# Keys Baileys needs however old (DOMAIN.md section 2): cleanup never deletes them by default,
# health counts them apart.
PROTECTED_KEY_TYPES = ("pre-key", "app-state-sync-key", "app-state-sync-version", "identity-key", "lid-mapping")

# Baileys' tctoken rules (src/Utils/tc-token-utils.ts, Baileys 7.0.0-rc13 and rc14; docs/cleanup.md).
# TC_TOKEN_INDEX_KEY: a sentinel row under tctoken holding the JSON list of the JIDs Baileys' pruning walks.
# It has no timestamp (Baileys' own rule would call it expired): never delete it, never count it as a token.
TC_TOKEN_INDEX_KEY = "__index"
SENTINEL_KEYS = (("tctoken", TC_TOKEN_INDEX_KEY),)
# isTcTokenExpired: 4 buckets of 7 days; a timestamp before the start of the oldest bucket is expired.
TC_TOKEN_BUCKET_SECONDS = 604800
TC_TOKEN_NUM_BUCKETS = 4


def tctoken_cutoff(now_seconds):
    """isTcTokenExpired's cutoffTimestamp at now (epoch seconds): timestamps below it are expired."""
    current_bucket = int(now_seconds) // TC_TOKEN_BUCKET_SECONDS
    return (current_bucket - (TC_TOKEN_NUM_BUCKETS - 1)) * TC_TOKEN_BUCKET_SECONDS


def _tctoken_valid_sql(field, cutoff):
    """SQL: NOT isTcTokenExpired(field) for a jsonb field. A number is compared as is; a string as parseInt reads it
    (leading blanks, a sign, decimal digits). Strings parseInt could read otherwise (hex "0x..", odd leading characters
    before digits) and arrays (JavaScript compares [t] as t) count as valid: in doubt, a token is kept. Anything else
    (absent, null, a boolean, an object, a string without digits) is expired, as for Baileys."""
    text = "(%s #>> '{}')" % field
    return (
        "(CASE jsonb_typeof(%(f)s) WHEN 'number' THEN (%(f)s)::numeric >= %(c)s "
        "WHEN 'string' THEN CASE WHEN %(t)s ~ '^\\s*[+-]?0[xX][0-9a-fA-F]' THEN true "
        "WHEN %(t)s ~ '^\\s*[+-]?[0-9]' THEN substring(%(t)s from '^\\s*([+-]?[0-9]+)')::numeric >= %(c)s "
        "WHEN %(t)s ~ '[0-9]' THEN true ELSE false END WHEN 'array' THEN true ELSE false END)" % {"f": field, "t": text, "c": cutoff})


def tctoken_prunable_sql(value="k.value", cutoff="%(tc_cutoff)s"):
    """SQL: Baileys' pruneExpiredTcTokens (src/Socket/messages-recv.ts) would delete this tctoken row: it keeps a row
    with a non-empty token whose timestamp is not expired, or whose senderTimestamp is not expired. The caller
    excludes TC_TOKEN_INDEX_KEY. A token counts as non-empty in any stored Buffer form (array or base64 data)."""
    token = "%s -> 'token'" % value
    has_token = (
        "(CASE jsonb_typeof(%(t)s) WHEN 'object' THEN CASE jsonb_typeof(%(t)s -> 'data') "
        "WHEN 'array' THEN jsonb_array_length(%(t)s -> 'data') > 0 WHEN 'string' THEN (%(t)s ->> 'data') <> '' ELSE false END "
        "WHEN 'string' THEN (%(t)s #>> '{}') <> '' WHEN 'array' THEN jsonb_array_length(%(t)s) > 0 ELSE false END)" % {"t": token})
    keep_token = "(%s AND %s)" % (has_token, _tctoken_valid_sql("%s -> 'timestamp'" % value, cutoff))
    keep_sender = _tctoken_valid_sql("%s -> 'senderTimestamp'" % value, cutoff)
    return "(NOT %s AND NOT %s)" % (keep_token, keep_sender)


# Pre-keys: Baileys keeps every generated pre-key until WhatsApp consumes it (DOMAIN.md section 6), and uploads them in
# batches (creds.nextPreKeyId, the next id to generate; creds.firstUnuploadedPreKeyId, the first not yet uploaded). An
# account holds on the order of 800 uploaded at a time: more stored than this is worth a look, never a deletion.
PRE_KEYS_STORED_WARNING = 2000

DIGEST_HEADER = ["baileys-dr-state", 1]

# The application's expires_at policy (DOMAIN.md section 1): written rows get now() + this many days.
SHORT_LIVED_TYPES = frozenset(("lid-mapping", "pre-key", "session", "sender-key"))


def expiry_days(key_type):
    return 7 if key_type in SHORT_LIVED_TYPES else 14

_BASE64_RE = re.compile(r"\A(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}(?:==)?|[A-Za-z0-9+/]{3}=?)?\Z")
_DIGITS_RE = re.compile(r"\A-?[0-9]+\Z")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_ESCAPE_RE = re.compile('["\\\\\x00-\x1f\ud800-\udfff]')
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_INDEX_KEYS = {}


# What decoding or digesting one stored value can raise: JSON nested deeper than Python's recursion limit
# (PostgreSQL's JSONB and Node's JSON.parse accept far deeper), text that is not JSON or not UTF-8, a value too
# large for memory. Caught where a row's value is handled and reported naming the row, never as a traceback.
VALUE_ERRORS = (RecursionError, ValueError, UnicodeError, MemoryError)


def value_problem(exc):
    """Why a value could not be read, from one of VALUE_ERRORS, to follow "the value" or a file name: words for an
    operator, nothing of the value."""
    if isinstance(exc, RecursionError):
        return ("is nested too deeply to be read (arrays or objects inside each other, more levels than Python's "
                "limit of %d; no Baileys value comes near)" % sys.getrecursionlimit())
    if isinstance(exc, MemoryError):
        return "is too large to be held in memory"
    return "cannot be read (%s: %s)" % (type(exc).__name__, str(exc)[:200])


def key_name(key_type=None, key_id=None):
    """A key as messages name it (key_type None: the creds); the id quoted with its escapes: it may be hostile."""
    return "creds" if key_type is None else "%s key id %r" % (key_type, key_id)


def row_name(company_id, key_type=None, key_id=None):
    """A row as messages name it: company, then the key (key_name)."""
    company = company_id if isinstance(company_id, str) and COMPANY_ID_RE.match(company_id) else repr(company_id)
    return "company %s, %s" % (company, key_name(key_type, key_id))


# Deepest nesting of arrays and objects read from a file. Baileys' values are a few levels deep. Python's
# parser and the canonical form recurse once per level, against one recursion limit (1000) shared with the
# calls that lead there: a fixed limit well under it gives the same answer wherever a value is handled.
MAX_NESTING = 512
_NESTING_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|([\[\]{}])')


def nesting_problem(text):
    """None, or why JSON text nests arrays and objects deeper than MAX_NESTING (found without parsing it), to
    follow "the value" or a file name."""
    if text.count("[") + text.count("{") <= MAX_NESTING:
        return None
    depth = deepest = 0
    for match in _NESTING_TOKEN.finditer(text):
        bracket = match.group(1)
        if bracket is None:
            continue  # a string: brackets inside it do not count
        if bracket in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    if deepest <= MAX_NESTING:
        return None
    return ("nests arrays or objects %d levels deep; baileys-dr reads up to %d (no Baileys value comes near)"
            % (deepest, MAX_NESTING))


class Bytes(bytes):
    """Bytes that stand for a Node Buffer inside a decoded value."""


def decode_base64(text):
    """Standard base64 with optional padding, or None when it is not that."""
    if not _BASE64_RE.match(text):
        return None
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


def _byte_list(items):
    """bytes of a list of integral numbers 0-255 (JSON cannot tell 2 from 2.0), else None."""
    out = bytearray()
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, float)) or item != int(item) or not 0 <= item <= 255:
            return None
        out.append(int(item))
    return bytes(out)


def _index_keys(count):
    keys = _INDEX_KEYS.get(count)
    if keys is None:
        keys = _INDEX_KEYS[count] = [str(i) for i in range(count)]
    return keys


def buffer_bytes(value):
    """The bytes a JSON value stands for, or None when it is not a Buffer.

    Either {"type": "Buffer", "data": <byte array or base64>} with no other member,
    or a Uint8Array as plain JSON.stringify writes it: {"0": 12, "1": 34, ...}
    (keys exactly "0".."n-1", in any order: JavaScript enumerates them numerically,
    JSONB sorts them), which Baileys' reviver reads back as bytes.
    """
    if not isinstance(value, dict) or not value:
        return None
    if value.get("type") == "Buffer" and len(value) == 2 and "data" in value:
        data = value["data"]
        if isinstance(data, str):
            return decode_base64(data)
        if isinstance(data, list):
            return _byte_list(data)
        return None
    keys = _index_keys(len(value))
    if "0" in value and value.keys() == set(keys):
        return _byte_list(value[k] for k in keys)
    return None


# What Baileys needs of the creds to start a socket (initAuthCreds() in src/Utils/auth-utils.ts, AuthenticationCreds in
# src/Types/Auth.ts): the key pairs of the noise handshake, pairing and Signal identity, the signed pre-key, the
# registration id, the ADV secret and the pre-key counters. Every initAuthCreds() from 6.6 to 7.0.0-rc14 sets the same
# fields (6.x also set mobile-only ones that 7 dropped); no version added a required one, so the rule needs no version.
# Fields set after pairing, or that Baileys reads with a fallback (processedHistoryMessages || []), may be absent; when
# present they must have their shape. null counts as absent: Baileys reads them with ?. and JSON.stringify drops undefined.
CREDS_KEY_PAIRS = ("noiseKey", "pairingEphemeralKeyPair", "signedIdentityKey")
CREDS_INTEGERS = ("registrationId", "nextPreKeyId", "firstUnuploadedPreKeyId")


def _integer(value):
    # JSON cannot tell 2 from 2.0.
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value == int(value)


def _key_pair_problems(name, value):
    if not isinstance(value, dict):
        return ["%s is not a key pair ({public, private})" % name]
    return ["%s.%s is %s" % (name, half, "missing" if half not in value else "not a Buffer")
            for half in ("public", "private") if buffer_bytes(value.get(half)) is None]


def creds_shape_problems(creds):
    """What stops Baileys from starting a socket on a creds value, as texts naming fields ([] when nothing): Buffers in
    either JSON form pass. Nothing of the value is quoted (it holds private keys)."""
    if not isinstance(creds, dict):
        return ["the creds are not a JSON object"]
    problems = []
    for name in CREDS_KEY_PAIRS + ("signedPreKey", "advSecretKey") + CREDS_INTEGERS:
        if creds.get(name) is None:
            problems.append("%s is missing" % name)
        elif name in CREDS_KEY_PAIRS:
            problems += _key_pair_problems(name, creds[name])
    pre_key = creds.get("signedPreKey")
    if isinstance(pre_key, dict):
        problems += _key_pair_problems("signedPreKey.keyPair", pre_key.get("keyPair"))
        if buffer_bytes(pre_key.get("signature")) is None:
            problems.append("signedPreKey.signature is not a Buffer")
        if not _integer(pre_key.get("keyId")):
            problems.append("signedPreKey.keyId is not an integer")
    elif pre_key is not None:
        problems.append("signedPreKey is not an object ({keyPair, signature, keyId})")
    if creds.get("advSecretKey") is not None and not isinstance(creds["advSecretKey"], str):
        problems.append("advSecretKey is not a string")
    problems += ["%s is not an integer" % name for name in CREDS_INTEGERS if creds.get(name) is not None and not _integer(creds[name])]
    me = creds.get("me")
    if me is not None and not (isinstance(me, dict) and isinstance(me.get("id"), str)):
        problems.append("me has no id text")
    if creds.get("routingInfo") is not None and buffer_bytes(creds["routingInfo"]) is None:
        problems.append("routingInfo is not a Buffer")
    problems += ["%s is not a list" % name for name in ("processedHistoryMessages", "signalIdentities")
                 if creds.get(name) is not None and not isinstance(creds[name], list)]
    return problems


def revive(value):
    """Replace every JSON Buffer object (either encoding) by Bytes."""
    if isinstance(value, dict):
        raw = buffer_bytes(value)
        if raw is not None:
            return Bytes(raw)
        return {k: revive(v) for k, v in value.items()}
    if isinstance(value, list):
        return [revive(v) for v in value]
    return value


def _encode_tree(value, encode):
    if isinstance(value, bytes):
        return encode(value)
    if isinstance(value, dict):
        raw = buffer_bytes(value)
        if raw is not None:
            return encode(raw)
        return {k: _encode_tree(v, encode) for k, v in value.items()}
    if isinstance(value, list):
        return [_encode_tree(v, encode) for v in value]
    return value


# -- fast paths ------------------------------------------------------------------------------
# The exact walkers above define the forms; these give the same text with the C JSON encoder
# for plain JSON trees (dict, list, str, int, bool, None), which is what json.loads returns
# for almost every row. Anything else (floats, whose text differs from Number::toString; bytes,
# tuples or subclasses; lone surrogates, which the canonical form escapes) goes the exact way.

_PLAIN = frozenset((str, int, bool, type(None)))
_json_encoder = getattr(json.encoder, "c_make_encoder", None)


def _make_dumps(sort_keys):
    if _json_encoder is not None:
        encoder = _json_encoder(None, None, json.encoder.c_encode_basestring, None, ":", ",", sort_keys, False, True)
        return lambda value: "".join(encoder(value, 0))
    return json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, sort_keys=sort_keys).encode


_compact_dumps = _make_dumps(False)
_sorted_dumps = _make_dumps(True)


def _b64_text(raw):
    return binascii.b2a_base64(raw, newline=False).decode("ascii")


def _fast_byte_list(items):
    """_byte_list in C for the usual case (ints 0-255, no bool)."""
    try:
        raw = bytes(items)
    except (TypeError, ValueError):
        return _byte_list(items)
    if bool in set(map(type, items)):
        return None
    return raw


def _fast_buffer_bytes(value):
    """buffer_bytes of a dict."""
    if len(value) == 2 and value.get("type") == "Buffer" and "data" in value:
        data = value["data"]
        kind = type(data)
        if kind is str:
            return decode_base64(data)
        if kind is list:
            return _fast_byte_list(data)
        return None
    if "0" in value:
        keys = _index_keys(len(value))
        if value.keys() == set(keys):
            return _fast_byte_list([value[k] for k in keys])
    return None


def _fast_dict(value, odd):
    raw = _fast_buffer_bytes(value)
    if raw is not None:
        return _base64_buffer(raw)
    return _fast_items(value, value.items(), odd)


def _fast_list(value, odd):
    return _fast_items(value, enumerate(value), odd)


def _fast_items(value, items, odd):
    """value with its Buffers rewritten, copied only when one is (items: its (key or index, item) pairs)."""
    out = None
    for key, item in items:
        kind = type(item)
        if kind is dict:
            new = _fast_dict(item, odd)
        elif kind is list:
            new = _fast_list(item, odd)
        else:
            if kind not in _PLAIN:
                odd.append(kind)
            continue
        if new is not item:
            if out is None:
                out = value.copy()
            out[key] = new
    return value if out is None else out


def _plain_base64_form(value):
    """(to_base64_form(value) sharing unchanged parts with value, types met that are not plain JSON).

    The first is None when value itself is not a plain JSON type; the form is right whatever the
    second holds as long as it holds nothing but float.
    """
    odd = []
    kind = type(value)
    if kind is dict:
        value = _fast_dict(value, odd)
    elif kind is list:
        value = _fast_list(value, odd)
    elif kind not in _PLAIN:
        return None, [kind]
    return value, odd


def _base64_buffer(raw):
    return {"type": "Buffer", "data": _b64_text(raw)}


def _canonical_text(text):
    """text unless it holds a lone surrogate (the canonical form escapes those, the C encoder does not)."""
    if text.isascii() or not _SURROGATE_RE.search(text):
        return text
    return None


def to_base64_form(value):
    """Value with every Buffer in the form Baileys' BufferJSON.replacer writes (may share unchanged parts with value)."""
    plain, odd = _plain_base64_form(value)
    if plain is not None and all(kind is float for kind in odd):
        return plain
    return _encode_tree(value, _base64_buffer)


def to_array_form(value):
    """Value with every Buffer in the form the application's JSON.stringify writes."""
    return _encode_tree(value, lambda raw: {"type": "Buffer", "data": list(raw)})


def apply_type_rules(key_type, value, buffer=None):
    """Protobuf JSON form of app-state-sync-key values, as Baileys revives them.

    buffer makes the keyData Buffer from its bytes: Bytes by default, _base64_buffer on a plain base64 form.
    """
    if key_type != "app-state-sync-key" or not isinstance(value, dict):
        return value
    out = dict(value)
    key_data = out.get("keyData")
    if isinstance(key_data, str):
        raw = decode_base64(key_data)
        if raw is not None:
            out["keyData"] = (buffer or Bytes)(raw)
    timestamp = out.get("timestamp")
    if isinstance(timestamp, str) and _DIGITS_RE.match(timestamp):
        out["timestamp"] = int(timestamp)
    return out


def _escape(text):
    return '"' + _ESCAPE_RE.sub(lambda m: _ESCAPES.get(m.group(0)) or "\\u%04x" % ord(m.group(0)), text) + '"'


def _number(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        # JSON.stringify turns these into null; JSONB cannot hold them at all.
        return "null"
    if value.is_integer():
        return str(int(value))
    return _js_float(value)


def _js_float(value):
    """ECMAScript Number::toString of a non-integral float (both use the shortest round-trip digits)."""
    sign = "-" if value < 0 else ""
    mantissa, _, exponent = repr(abs(value)).partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = (whole + fraction).lstrip("0")
    point = len(whole) + int(exponent or 0) - (len(whole + fraction) - len((whole + fraction).lstrip("0")))
    digits = digits.rstrip("0")
    if 0 < point <= 21:
        return sign + digits[:point] + "." + digits[point:] if point < len(digits) else sign + digits + "0" * (point - len(digits))
    if -6 < point <= 0:
        return sign + "0." + "0" * -point + digits
    power = point - 1
    head = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    return "%s%se%s%d" % (sign, head, "+" if power > 0 else "-", abs(power))


def _canonical(value, out):
    if isinstance(value, bytes):
        out.append('{"data":"%s","type":"Buffer"}' % base64.b64encode(value).decode("ascii"))
    elif isinstance(value, dict):
        raw = buffer_bytes(value)
        if raw is not None:
            _canonical(Bytes(raw), out)
            return
        out.append("{")
        for index, name in enumerate(sorted(value, key=lambda k: k.encode("utf-8"))):
            if index:
                out.append(",")
            out.append(_escape(name))
            out.append(":")
            _canonical(value[name], out)
        out.append("}")
    elif isinstance(value, (list, tuple)):
        out.append("[")
        for index, item in enumerate(value):
            if index:
                out.append(",")
            _canonical(item, out)
        out.append("]")
    elif isinstance(value, str):
        out.append(_escape(value))
    elif value is None:
        out.append("null")
    elif isinstance(value, (int, float)):
        out.append(_number(value))
    else:
        raise TypeError("cannot canonicalise a value of type %s" % type(value).__name__)


def _exact_canonical(value):
    out = []
    _canonical(value, out)
    return "".join(out)


def canonical_json(value, key_type=None):
    """Canonical JSON text of a decoded JSON value (docs/architecture.md)."""
    plain, odd = _plain_base64_form(value)
    if plain is not None and not odd:
        # Buffers normalised, no float: sorted compact JSON is the canonical form (code point order
        # is UTF-8 byte order for every string without a lone surrogate, and those are sent back).
        text = _canonical_text(_sorted_dumps(apply_type_rules(key_type, plain, _base64_buffer)))
        if text is not None:
            return text
    return _exact_canonical(apply_type_rules(key_type, value))


def key_forms(key_type, key_id, value):
    """(file text, digest line text) of a key from one walk of its value.

    The file text is compact JSON of to_base64_form(value) (what Baileys' writeFile holds); the
    line is the canonical [type, id, value] line StateDigest.add hashes, without its newline.
    """
    plain, odd = _plain_base64_form(value)
    if plain is not None and not odd:
        line = _canonical_text(_sorted_dumps([key_type, key_id, apply_type_rules(key_type, plain, _base64_buffer)]))
        if line is not None:
            return _compact_dumps(plain), line
    return (_compact_dumps(to_base64_form(value)),
            _key_line(key_type, key_id, _exact_canonical(apply_type_rules(key_type, value))))


def _key_line(key_type, key_id, canonical_value):
    return "[%s,%s,%s]" % (_escape(key_type), _escape(key_id), canonical_value)


def key_line_text(key_type, key_id, value):
    """The canonical [type, id, value] line of a key, without its newline."""
    return _key_line(key_type, key_id, canonical_json(value, key_type))


def sort_key(key_type, key_id):
    """Order of keys in the digest: (type, id) as UTF-8 bytes, like COLLATE "C"."""
    return (key_type.encode("utf-8"), key_id.encode("utf-8"))


class DigestOrderError(ValueError):
    pass


class StateDigest:
    """Streaming state digest of one company.

    Keys must arrive sorted by sort_key(); a database query gets that order
    with ORDER BY key_type COLLATE "C", key_id COLLATE "C".
    """

    def __init__(self, creds):
        self._hash = hashlib.sha256()
        self._last = None
        self.keys = 0
        self._line(DIGEST_HEADER)
        self._hash.update(('["creds",%s]\n' % canonical_json(creds)).encode("utf-8"))

    def _line(self, parts):
        self._hash.update((canonical_json(parts) + "\n").encode("utf-8"))

    def add(self, key_type, key_id, value):
        position = sort_key(key_type, key_id)
        if self._last is not None and position <= self._last:
            raise DigestOrderError("key %s/%r is out of order or repeated" % (key_type, key_id))
        self._last = position
        self.keys += 1
        self._hash.update(
            ("[%s,%s,%s]\n" % (_escape(key_type), _escape(key_id), canonical_json(value, key_type))).encode("utf-8")
        )

    def hexdigest(self):
        return self._hash.hexdigest()


def state_digest(creds, keys):
    """Digest of a whole company: keys is an iterable of (type, id, value) in any order."""
    digest = StateDigest(creds)
    for key_type, key_id, value in sorted(keys, key=lambda k: sort_key(k[0], k[1])):
        digest.add(key_type, key_id, value)
    return digest.hexdigest()


def fix_file_name(key_id):
    """Baileys' fixFileName: every '/' becomes '__', then every ':' becomes '-'."""
    return key_id.replace("/", "__").replace(":", "-")


def key_file_name(key_type, key_id):
    """File name Baileys' useMultiFileAuthState uses for a key."""
    return "%s-%s.json" % (key_type, fix_file_name(key_id))
