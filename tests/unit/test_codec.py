"""The state digest and Buffer codec (module_utils/baileys_dr_codec.py)."""

from __future__ import annotations

import copy
import json
import os

import pytest

from ansible.module_utils import baileys_dr_codec as codec

VECTORS = os.path.join(os.path.dirname(__file__), "..", "vectors", "digest_vectors.json")


def load_vectors():
    with open(VECTORS, encoding="utf-8") as fh:
        return json.load(fh)["cases"]


def digest_of(creds, keys):
    return codec.state_digest(creds, [(k["type"], k["id"], k["value"]) for k in keys])


@pytest.mark.parametrize("case", load_vectors(), ids=lambda c: c["name"])
def test_digest_matches_shared_vector(case):
    assert digest_of(case["creds"], case["keys"]) == case["digest"]


def test_both_buffer_encodings_give_one_digest():
    cases = {c["name"]: c for c in load_vectors()}
    assert cases["creds only, array Buffers"]["digest"] == cases["creds only, base64 Buffers (same digest as array)"]["digest"]
    assert cases["every key type, array Buffers"]["digest"] == cases["every key type, base64 Buffers, proto-JSON app-state key (same digest)"]["digest"]


def _flip_first_byte(value):
    """Copy of value with the first Buffer byte it finds changed (None when it holds none)."""
    value = copy.deepcopy(value)
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict) and codec.buffer_bytes(node) is not None:
            raw = bytearray(codec.buffer_bytes(node))
            raw[0] ^= 1
            node["data"] = list(raw) if isinstance(node["data"], list) else codec.to_base64_form(bytes(raw))["data"]
            return value
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return None


def test_any_changed_byte_changes_the_digest():
    case = [c for c in load_vectors() if c["name"] == "every key type, array Buffers"][0]
    original = digest_of(case["creds"], case["keys"])
    changed_somewhere = 0
    for index, key in enumerate(case["keys"]):
        flipped = _flip_first_byte(key["value"])
        if flipped is None:
            continue
        keys = copy.deepcopy(case["keys"])
        keys[index]["value"] = flipped
        assert digest_of(case["creds"], keys) != original, key["type"]
        changed_somewhere += 1
    assert changed_somewhere >= 6
    assert digest_of(_flip_first_byte(case["creds"]), case["keys"]) != original


def test_missing_key_renamed_key_or_dropped_creds_change_the_digest():
    case = [c for c in load_vectors() if c["name"] == "every key type, array Buffers"][0]
    original = digest_of(case["creds"], case["keys"])
    assert digest_of(case["creds"], case["keys"][1:]) != original
    renamed = copy.deepcopy(case["keys"])
    renamed[0]["id"] += "x"
    assert digest_of(case["creds"], renamed) != original
    assert digest_of(None, case["keys"]) != original


def test_streaming_digest_refuses_unsorted_keys():
    digest = codec.StateDigest(None)
    digest.add("session", "b", 1)
    with pytest.raises(codec.DigestOrderError):
        digest.add("session", "a", 1)
    with pytest.raises(codec.DigestOrderError):
        digest.add("session", "b", 1)


def test_keys_sort_by_utf8_bytes_like_collate_c():
    ids = ["é", "z", "Z", "😀", "a:b", "a-b", "\uffff"]
    ordered = sorted(ids, key=lambda i: codec.sort_key("t", i))
    assert ordered == ["Z", "a-b", "a:b", "z", "é", "\uffff", "😀"]


def test_canonical_json_matches_json_stringify_rules():
    assert codec.canonical_json({"b": 1, "a": [True, None, 2.0, 1.5]}) == '{"a":[true,null,2,1.5],"b":1}'
    assert codec.canonical_json("q\"\\\n\u0001é😀") == '"q\\"\\\\\\n\\u0001é😀"'
    assert codec.canonical_json({"type": "Buffer", "data": [1, 2, 3]}) == '{"data":"AQID","type":"Buffer"}'
    assert codec.canonical_json({"type": "Buffer", "data": "AQID"}) == '{"data":"AQID","type":"Buffer"}'


def test_objects_that_only_look_like_buffers_stay_objects():
    not_buffers = [
        {"type": "Buffer", "data": [256]},
        {"type": "Buffer", "data": "not base64!"},
        {"type": "Buffer", "data": [1], "extra": 1},
        {"type": "buffer", "data": [1]},
    ]
    for value in not_buffers:
        assert codec.buffer_bytes(value) is None
        assert codec.canonical_json(value) == json.dumps(value, separators=(",", ":"), sort_keys=True)


def test_base64_and_array_forms_round_trip():
    value = {"k": {"type": "Buffer", "data": [0, 255, 7]}, "l": [{"type": "Buffer", "data": "AP8H"}], "s": "AP8H"}
    b64 = codec.to_base64_form(value)
    assert b64 == {"k": {"type": "Buffer", "data": "AP8H"}, "l": [{"type": "Buffer", "data": "AP8H"}], "s": "AP8H"}
    assert codec.to_array_form(b64) == {"k": {"type": "Buffer", "data": [0, 255, 7]}, "l": [{"type": "Buffer", "data": [0, 255, 7]}], "s": "AP8H"}
    assert codec.revive(value)["k"] == b"\x00\xff\x07"


def test_app_state_sync_key_proto_json_equals_buffer_form():
    proto_json = {"keyData": "AQID", "timestamp": "1700000000000", "fingerprint": {"rawId": 1}}
    buffers = {"keyData": {"type": "Buffer", "data": [1, 2, 3]}, "timestamp": 1700000000000, "fingerprint": {"rawId": 1}}
    assert codec.canonical_json(proto_json, "app-state-sync-key") == codec.canonical_json(buffers, "app-state-sync-key")
    # The rule is specific to that type: elsewhere a string stays a string.
    assert codec.canonical_json(proto_json, "session") != codec.canonical_json(buffers, "session")


@pytest.mark.parametrize("key_id, name", [
    ("120363@g.us::4915551234::0", "120363@g.us--4915551234--0"),
    ("AAAAAFx/Zw==", "AAAAAFx__Zw=="),
    ("a/b:c", "a__b-c"),
    ("4915551234.0", "4915551234.0"),
])
def test_file_names_follow_baileys_fixfilename(key_id, name):
    assert codec.fix_file_name(key_id) == name
    assert codec.key_file_name("sender-key", key_id) == "sender-key-%s.json" % name


def test_company_ids_outside_the_application_rule_are_rejected():
    for good in ("company00001", "A-b_9", "x" * 50):
        assert codec.COMPANY_ID_RE.match(good)
    for bad in ("", "x" * 51, "../etc", "a b", "a\n", "é", "1;DROP"):
        assert not codec.COMPANY_ID_RE.match(bad)


def test_uint8array_json_shape_is_bytes_like_baileys_reads_it():
    assert codec.buffer_bytes({"0": 1, "1": 2}) == b"\x01\x02"
    assert codec.buffer_bytes({"1": 2, "0": 1}) == b"\x01\x02"
    assert codec.buffer_bytes({"1": 1, "2": 2}) is None
    assert codec.buffer_bytes({"0": 256}) is None
    assert codec.to_base64_form({"k": {"0": 1, "1": 2}}) == {"k": {"type": "Buffer", "data": "AQI="}}


def test_numbers_print_as_javascript_prints_them():
    assert codec.canonical_json([1e-05, 1.5e-07, 0.1, -0.000001234, 1e21, 2.0]) == "[0.00001,1.5e-7,0.1,-0.000001234,1000000000000000000000,2]"
