#!/usr/bin/env python3
"""Regenerates digest_vectors.json: run only when the digest spec changes.

The digests are Python's; the Node twin (testbed/app/test/digest.test.js)
and tests/unit/test_digest.py check that both implementations agree with them.
"""
import base64
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "module_utils"))

from baileys_dr_codec import state_digest  # noqa: E402


def buf(raw, form):
    if form == "array":
        return {"type": "Buffer", "data": list(raw)}
    return {"type": "Buffer", "data": base64.b64encode(raw).decode("ascii")}


def creds(form):
    b = lambda n, seed: buf(bytes((seed * 7 + i * 13) % 256 for i in range(n)), form)  # noqa: E731
    return {
        "noiseKey": {"private": b(32, 1), "public": b(32, 2)},
        "pairingEphemeralKeyPair": {"private": b(32, 3), "public": b(32, 4)},
        "signedIdentityKey": {"private": b(32, 5), "public": b(32, 6)},
        "signedPreKey": {"keyPair": {"private": b(32, 7), "public": b(32, 8)}, "signature": b(64, 9), "keyId": 1},
        "registrationId": 4711,
        "advSecretKey": "c2VjcmV0LWtleS1ub3QtYS1idWZmZXI=",
        "processedHistoryMessages": [],
        "nextPreKeyId": 31,
        "firstUnuploadedPreKeyId": 31,
        "accountSyncCounter": 0,
        "accountSettings": {"unarchiveChats": False},
        "registered": True,
        "me": {"id": "4915551234:7@s.whatsapp.net", "name": "Zoë \"Ops\" \\ Ünïcode 😀"},
        "routingInfo": b(8, 10),
        "platform": "smba",
    }


def keys(form, sync_form):
    b = lambda n, seed: buf(bytes((seed * 11 + i) % 256 for i in range(n)), form)  # noqa: E731
    key_data = bytes(range(32))
    if sync_form == "proto-json":
        sync = {"keyData": base64.b64encode(key_data).decode(), "fingerprint": {"rawId": 7, "currentIndex": 1, "deviceIndexes": [0, 1]}, "timestamp": "1700000000000"}
    else:
        sync = {"keyData": buf(key_data, form), "fingerprint": {"rawId": 7, "currentIndex": 1, "deviceIndexes": [0, 1]}, "timestamp": 1700000000000}
    return [
        {"type": "session", "id": "4915551234.0", "value": {"_sessions": {"BQ==": {"registrationId": 99, "rootKey": "x"}}, "version": "v1"}},
        {"type": "pre-key", "id": "2", "value": {"private": b(32, 1), "public": b(33, 2)}},
        {"type": "pre-key", "id": "10", "value": {"private": b(32, 3), "public": b(33, 4)}},
        {"type": "sender-key", "id": "120363012345@g.us::4915551234::0", "value": [{"senderKeyId": 5, "senderChainKey": {"iteration": 0, "seed": b(32, 5)}}]},
        {"type": "sender-key-memory", "id": "120363012345@g.us", "value": {"4915551234:7@s.whatsapp.net": True}},
        {"type": "app-state-sync-key", "id": "AAAAAFx/Zw==", "value": sync},
        {"type": "app-state-sync-version", "id": "critical_block", "value": {"version": 3, "hash": b(128, 6), "indexValueMap": {"a/b==": {"valueMac": b(32, 7)}}}},
        {"type": "lid-mapping", "id": "4915551234", "value": "123456789012345"},
        {"type": "lid-mapping", "id": "123456789012345_reverse", "value": "4915551234"},
        {"type": "device-list", "id": "4915551234", "value": ["0", "7"]},
        {"type": "tctoken", "id": "4915551234@s.whatsapp.net", "value": {"token": b(16, 8), "timestamp": "1700000000"}},
        {"type": "identity-key", "id": "4915551234.0", "value": b(33, 9)},
        {"type": "session", "id": "ключ-😀:1", "value": {"note": "line\nbreak\ttab\u0001ctl", "ratio": 1.5, "whole": 2.0}},
    ]


def edge_keys(indexed):
    raw = [1, 2, 255]
    u8 = {str(i): b for i, b in enumerate(raw)} if indexed else {"type": "Buffer", "data": raw}
    return [{"type": "session", "id": "edge", "value": {
        "small": 1e-05, "tiny": 1.5e-07, "big": 1e21, "neg": -0.000001234, "plain": 0.1,
        "u8": u8, "floatbytes": {"type": "Buffer", "data": [2.0, 3.0]}, "lone": "a\ud800b",
        "numeric_keys_not_bytes": {"1": 1, "2": 2}}}]


def case(name, creds_value, key_list):
    digest = state_digest(creds_value, [(k["type"], k["id"], k["value"]) for k in key_list])
    return {"name": name, "creds": creds_value, "keys": key_list, "digest": digest}


def main():
    cases = [
        case("creds only, array Buffers", creds("array"), []),
        case("creds only, base64 Buffers (same digest as array)", creds("base64"), []),
        case("every key type, array Buffers", creds("array"), keys("array", "buffer")),
        case("every key type, base64 Buffers, proto-JSON app-state key (same digest)", creds("base64"), keys("base64", "proto-json")),
        case("every key type, reverse order (same digest)", creds("array"), list(reversed(keys("array", "buffer")))),
        case("no creds", None, keys("base64", "buffer")[:3]),
        case("one byte changed", creds("array"), [dict(keys("array", "buffer")[1], value={"private": buf(bytes(32), "array"), "public": buf(bytes(33), "array")})]),
        case("empty", None, []),
        case("edge numbers, lone surrogate, Uint8Array shape", None, edge_keys(indexed=True)),
        case("edge numbers, lone surrogate, Buffer form (same digest)", None, edge_keys(indexed=False)),
    ]
    with open(os.path.join(HERE, "digest_vectors.json"), "w", encoding="utf-8") as fh:
        json.dump({"spec": "docs/architecture.md#the-state-digest-v1", "cases": cases}, fh, indent=1)
        fh.write("\n")


if __name__ == "__main__":
    main()
