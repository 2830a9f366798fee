"""One key file of a failback's tree without a database: what Baileys or PostgreSQL could not take is refused, creds
have the fields initAuthCreds sets, values are written in the Buffer form asked."""

from __future__ import annotations

import json

import pytest

from ansible.module_utils import baileys_dr_codec as codec
from ansible.module_utils import baileys_dr_failback_errors as fb_errors
from ansible.module_utils import baileys_dr_source_files as source_files
from ansible.module_utils import baileys_dr_testdata as testdata


# -- file contents -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"\xef\xbb\xbf{}", "byte order mark"),
    (b'{"a": "\xff"}', "not UTF-8"),
    (b'{"private": {"type": "Buffer", "data": "AQ', "not JSON"),
    (b'{"x": NaN}', "not JSON"),
    (b'{"x": Infinity}', "not JSON"),
    (b'{"x": 1e400}', "not JSON"),
    (b'{"x": "a\\u0000b"}', "\\u0000"),
    (b'{"x": "\\ud800"}', "surrogate"),
    (b"{} {}", "not JSON"),
])
def test_files_baileys_could_not_read_or_postgresql_could_not_store_are_refused(data, reason):
    with pytest.raises(fb_errors.FileProblem) as err:
        source_files.parse_file(data)
    assert reason in str(err.value)


def test_creds_must_be_an_object_with_the_fields_initauthcreds_sets():
    for value in ([], {"registered": False}, {"noiseKey": {}, "signedIdentityKey": {}}):
        with pytest.raises(fb_errors.FileProblem):
            source_files.check_creds(value)
    source_files.check_creds(testdata.CompanyGenerator("c", 1).creds())


def test_written_values_hold_buffers_as_the_application_writes_them_unless_base64_is_asked():
    value = {"private": {"type": "Buffer", "data": "AQI="}, "n": 1, "u8": {"0": 5, "1": 6}}
    assert json.loads(source_files.stored_text("pre-key", value, "array")) == {"private": {"type": "Buffer", "data": [1, 2]}, "n": 1,
                                                                      "u8": {"type": "Buffer", "data": [5, 6]}}
    assert json.loads(source_files.stored_text("pre-key", value, "base64"))["private"] == {"type": "Buffer", "data": "AQI="}
    sync_key = {"keyData": "AQI=", "timestamp": "17", "extra": {"type": "Buffer", "data": "AQI="}}
    assert json.loads(source_files.stored_text("app-state-sync-key", sync_key, "array")) == sync_key, "as the file holds it"
    for key_type, _key_id, row_value, *_rest in testdata.CompanyGenerator("c", 2, keys=60).key_rows():
        assert codec.canonical_json(json.loads(source_files.stored_text(key_type, row_value, "array")), key_type) == \
            codec.canonical_json(row_value, key_type), "the digest cannot tell the forms apart"


# -- the \u escapes JSONB refuses ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, problem", [
    ('{"a": "x\\u0000y"}', "\\u0000"),
    ('{"x\\u0000": 1}', "\\u0000"),
    ('["\\udc00"]', "surrogate"),
    ('{"a": {"b": ["\\ud83d"]}}', "surrogate"),
])
def test_strings_jsonb_cannot_store_are_refused_wherever_they_are(text, problem):
    with pytest.raises(fb_errors.FileProblem, match=problem.replace("\\", "\\\\")):
        source_files.parse_file(text.encode("utf-8"))


@pytest.mark.parametrize("text", ['{"a": "\\\\u0000"}', '{"a": "\\ud83d\\ude00 \\u00e9"}', '{"a": "plain"}'])
def test_an_escaped_backslash_or_a_paired_surrogate_is_not_refused(text):
    assert source_files.parse_file(text.encode("utf-8")) == json.loads(text)
