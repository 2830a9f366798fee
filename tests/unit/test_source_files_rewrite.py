"""The import writes an exported file's value without parsing it (exported_array_text): byte for byte the text the parse
gives, or nothing (the parse then does it)."""

from __future__ import annotations

import pytest

from ansible.module_utils import baileys_dr_testdata as testdata
from ansible.module_utils.baileys_dr_source_files import exported_array_text, parse_file, stored_text
from ansible.module_utils.baileys_dr_tree import file_content


def generated_values():
    for gen in testdata.generate("rewrite", 3, 400):
        yield "creds", gen.creds()
        for key_type, _key_id, value, *_times in gen.key_rows():
            yield key_type, value


def test_the_rewrite_of_every_generated_key_is_the_text_the_parse_writes():
    rewritten = 0
    for key_type, value in generated_values():
        if key_type in ("creds", "app-state-sync-key"):
            continue
        data = file_content(value)
        text = exported_array_text(data)
        if text is not None:
            rewritten += 1
            assert text == stored_text(key_type, parse_file(data), "array"), (key_type, data[:200])
    assert rewritten > 1000, "the rewrite covers the generated keys"


@pytest.mark.parametrize("data", [
    b'{"type":"Buffer","data":[1,2]}',  # the array form: left to the parse
    b'{"k":{"0":1,"1":2}}',  # a Uint8Array as JSON.stringify writes it
    b'{"data":"AQ==","type":"Buffer"}',  # members in another order
    b'{"k":{"type":"Buffer","data":"A"}}',  # not base64
    b'{"k":"Buffer"}',  # a "Buffer" that is no Buffer object
    b'{"k":"\\u0041-_","b":{"type":"Buffer","data":"-_8="}}',  # url-safe alphabet: not Baileys' base64
])
def test_forms_the_rewrite_does_not_cover_are_left_to_the_parse(data):
    assert exported_array_text(data) is None


def test_a_buffer_inside_a_string_is_not_rewritten():
    data = file_content({"note": '{"type":"Buffer","data":"AQ=="}', "key": {"type": "Buffer", "data": [1, 2, 3]}})
    assert exported_array_text(data) == stored_text("session", parse_file(data), "array")
    assert '"note":"{\\"type\\":\\"Buffer\\",\\"data\\":\\"AQ==\\"}"' in exported_array_text(data)
