"""The codec's fast paths (C JSON encoder) give exactly the bytes of its reference walkers, or hand over to them."""

from __future__ import annotations

import base64
import json
import random

import pytest

from ansible.module_utils import baileys_dr_codec as codec
from ansible.module_utils.baileys_dr_manifests import entry_line, key_entry_line
from ansible.module_utils.baileys_dr_testdata import CompanyGenerator
from ansible.module_utils.baileys_dr_tree import creds_line, file_content, key_file_and_line, key_line


def reference_canonical(value, key_type=None):
    """The canonical text by the reference walker only (no fast path)."""
    return codec._exact_canonical(codec.apply_type_rules(key_type, value))


def reference_base64_form(value):
    return codec._encode_tree(value, lambda raw: {"type": "Buffer", "data": base64.b64encode(raw).decode("ascii")})


def reference_file(value):
    return json.dumps(reference_base64_form(value), separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def reference_line(key_type, key_id, value):
    return ("[%s,%s,%s]\n" % (codec._escape(key_type), codec._escape(key_id), reference_canonical(value, key_type))).encode("utf-8")


def outcome(function, *args):
    """The result of function, or the type of the exception it raises (both paths must fail alike)."""
    try:
        return function(*args)
    except Exception as exc:  # noqa: BLE001 - compared, not swallowed
        return type(exc)


# Strings the canonical form treats specially: escapes, controls, DEL, U+2028, non-BMP (UTF-8 order differs from
# UTF-16 order there), the BMP's last code points, and lone surrogates (escaped by the canonical form only).
TRICKY_STRINGS = ["", "a", "é", "\"q\"", "back\\slash", "\b\f\n\r\t", "\x00\x01\x1f", "\x7f", "\u2028\u2029", "\ud7ff",
                  "\ue000", "\uffff", "\U0001F600", "\U0010FFFF", "0", "1", "10", "type", "data", "Buffer", "AQID", "AQI",
                  "AQIDBA==", "AQIDBA", "not base64!"]
SURROGATES = ["\ud800", "x\udfff", "\udc00\ud800"]


def random_value(rng, depth=0, surrogates=False):
    strings = TRICKY_STRINGS + (SURROGATES if surrogates else [])
    roll = rng.random()
    if depth > 3 or roll < 0.35:
        return rng.choice([None, True, False, 0, -1, 255, 256, 2 ** 53 + 1, -(2 ** 70), 0.5, 2.0, -0.0, 1e21, 1.5e-7,
                           123.456, rng.choice(strings), rng.randrange(-1000, 1000)])
    if roll < 0.5:
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 6)))
        form = rng.randrange(6)
        if form == 0:
            return {"type": "Buffer", "data": list(raw)}
        if form == 1:
            return {"type": "Buffer", "data": base64.b64encode(raw).decode("ascii").rstrip("=" if rng.random() < 0.5 else "")}
        if form == 2 and raw:
            return {str(i): b for i, b in enumerate(raw)}
        if form == 3:
            # Almost Buffers: a bool, a float byte, an out-of-range byte, an extra member, a wrong index.
            data = list(raw) + [rng.choice([True, 2.0, 2.5, 256, -1, "1"])]
            return rng.choice([{"type": "Buffer", "data": data}, {str(i): b for i, b in enumerate(data)},
                               {"type": "Buffer", "data": list(raw), "x": 1}, {"1": 2}, {"0": 1, "2": 3},
                               {"type": "Buffer", "data": {"0": 1}}, {"type": "Buffer"}])
        return {"type": "Buffer", "data": [float(b) for b in raw]}
    if roll < 0.75:
        return [random_value(rng, depth + 1, surrogates) for _ in range(rng.randrange(0, 5))]
    return {rng.choice(strings) + rng.choice(["", "k", "\U0001F600"]): random_value(rng, depth + 1, surrogates)
            for _ in range(rng.randrange(0, 5))}


def random_cases(count, seed, surrogates=False):
    rng = random.Random(seed)
    for _ in range(count):
        key_type = rng.choice(codec.KEY_TYPES)
        value = random_value(rng, surrogates=surrogates)
        if key_type == "app-state-sync-key" and rng.random() < 0.7:
            value = {"keyData": rng.choice(["AQID", "AQI", "not base64", "", 5]), "timestamp": rng.choice(["17", "-3", "0012", "1.5", 17]),
                     "fingerprint": random_value(rng, 1), "extra": random_value(rng, 1)}
        yield key_type, rng.choice(TRICKY_STRINGS[:12] + ["4917:1.0", "a/b"]), value


def test_fast_paths_give_the_reference_bytes_for_random_json_values():
    for key_type, key_id, value in random_cases(3000, "fast-codec"):
        assert outcome(codec.canonical_json, value, key_type) == outcome(reference_canonical, value, key_type), value
        assert outcome(codec.canonical_json, value) == outcome(reference_canonical, value), value
        assert outcome(codec.to_base64_form, value) == outcome(reference_base64_form, value), value
        assert outcome(file_content, value) == outcome(reference_file, value), value
        assert outcome(key_line, key_type, key_id, value) == outcome(reference_line, key_type, key_id, value), value
        expected = (outcome(reference_file, value), outcome(reference_line, key_type, key_id, value))
        if not any(isinstance(part, type) for part in expected):
            assert key_file_and_line(key_type, key_id, value) == expected, value


def test_lone_surrogates_are_escaped_in_the_digest_and_fail_alike_elsewhere():
    checked = 0
    for key_type, key_id, value in random_cases(1500, "surrogates", surrogates=True):
        assert outcome(codec.canonical_json, value, key_type) == outcome(reference_canonical, value, key_type), value
        assert outcome(key_line, key_type, key_id, value) == outcome(reference_line, key_type, key_id, value), value
        assert outcome(file_content, value) == outcome(reference_file, value), value
        checked += "\\ud" in str(outcome(codec.canonical_json, value))
    assert checked >= 5, "the cases must hold escaped lone surrogates"
    assert codec.canonical_json(["\ud800", "x"]) == '["\\ud800","x"]'


def test_generated_company_values_take_the_fast_path_and_match_the_reference():
    generator = CompanyGenerator("fast", 1, keys=400)
    creds = generator.creds()
    assert creds_line(creds) == ("%s\n" % reference_canonical(["creds", creds])).encode("utf-8")
    for key_type, key_id, value, *_ in generator.key_rows():
        plain, odd = codec._plain_base64_form(value)
        assert plain is not None and not odd, "plain JSON: no fallback"
        assert key_file_and_line(key_type, key_id, value) == (reference_file(value), reference_line(key_type, key_id, value))


@pytest.mark.parametrize("value, canonical", [
    ({"b": 1, "a": 2.0, "c": 0.1}, '{"a":2,"b":1,"c":0.1}'),
    ({"x": 1e21, "y": 1.5e-7, "z": -0.0}, '{"x":1000000000000000000000,"y":1.5e-7,"z":0}'),
    ({"\U0001F600": 1, "\uffff": 2}, '{"\uffff":2,"\U0001F600":1}'),
    ({"0": 1.0, "1": 2}, '{"data":"AQI=","type":"Buffer"}'),
    ({"type": "Buffer", "data": [1, True]}, '{"data":[1,true],"type":"Buffer"}'),
    (codec.Bytes(b"\x01"), '{"data":"AQ==","type":"Buffer"}'),
    ((1, "a"), '[1,"a"]'),
])
def test_values_the_c_encoder_would_write_differently_go_the_exact_way(value, canonical):
    assert codec.canonical_json(value) == canonical == reference_canonical(value)


def test_the_fast_base64_form_leaves_its_input_alone():
    value = {"k": {"type": "Buffer", "data": [1, 2]}, "l": [{"0": 5}], "s": "x"}
    before = json.dumps(value)
    form = codec.to_base64_form(value)
    assert form == {"k": {"type": "Buffer", "data": "AQI="}, "l": [{"type": "Buffer", "data": "BQ=="}], "s": "x"}
    assert json.dumps(value) == before


def test_key_entry_lines_are_the_manifest_lines_json_would_write():
    for name, key_type, key_id in [("session-a.json", "session", "a"), ("tctoken-Ü \"q\".json", "tctoken", "Ü \"q\""),
                                   ("x\\y.json", "pre-key", "x\\y"), ("\u2028.json", "pre-key", "\u2028")]:
        entry = {"type": key_type, "id": key_id, "sha256": "ab" * 32, "size": 12, "xmin": 734, "row_md5": "0f" * 16}
        assert key_entry_line(name, key_type, key_id, "ab" * 32, 12, "734", "0f" * 16) == entry_line(name, entry)
