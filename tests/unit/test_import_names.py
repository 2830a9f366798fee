"""Failback without a database: key types from file names, the type-aware reverse of fixFileName, file contents, undo files."""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import subprocess

import pytest

from conftest import ROOT

from ansible.module_utils import baileys_dr_codec as codec
from ansible.module_utils import baileys_dr_failback_errors as fb_errors
from ansible.module_utils import baileys_dr_reverse_names as reverse_names
from ansible.module_utils import baileys_dr_source_files as source_files
from ansible.module_utils import baileys_dr_undo as undo_files
from ansible.module_utils import baileys_dr_postgres as pg
from ansible.module_utils import baileys_dr_testdata as testdata


# -- the type of a file ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, expected", [
    ("sender-key-memory-120363@g.us.json", ("sender-key-memory", "120363@g.us")),
    ("sender-key-120363@g.us--4917--1.json", ("sender-key", "120363@g.us--4917--1")),
    ("app-state-sync-version-regular_high.json", ("app-state-sync-version", "regular_high")),
    ("app-state-sync-key-AAAA__w==.json", ("app-state-sync-key", "AAAA__w==")),
    ("pre-key-12.json", ("pre-key", "12")),
    ("identity-key-4917.1.json", ("identity-key", "4917.1")),
    ("lid-mapping-123_reverse.json", ("lid-mapping", "123_reverse")),
])
def test_the_type_is_the_longest_known_prefix(name, expected):
    assert reverse_names.parse_key_file_name(name) == expected


@pytest.mark.parametrize("name", ["creds.json.bak", "evil-type-1.json", "pre-key-.json", "pre-key-1.json.tmp", "pre-key1.json",
                                  ".DS_Store", "session.json", "manifest.json"])
def test_names_of_no_known_type_are_not_key_files(name):
    assert reverse_names.parse_key_file_name(name) is None


# -- ids from names ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key_type, name, key_id", [
    ("pre-key", "100001", "100001"),
    ("session", "4915550001.3", "4915550001.3"),
    ("session", "123456789012345_1.12", "123456789012345_1.12"),
    ("identity-key", "4917600000000.1", "4917600000000.1"),
    ("sender-key", "120363025814453019@g.us--491710600547--3", "120363025814453019@g.us::491710600547::3"),
    ("sender-key", "4917612345678-1600000000@g.us--123456789012345_1--0", "4917612345678-1600000000@g.us::123456789012345_1::0"),
    ("sender-key", "status@broadcast--4917--2", "status@broadcast::4917::2"),
    ("sender-key-memory", "4917612345678-1600000000@g.us", "4917612345678-1600000000@g.us"),
    ("app-state-sync-key", "AAAA__w==", "AAAA/w=="),
    ("app-state-sync-key", "AAb__cd+e", "AAb/cd+e"),
    ("app-state-sync-key", "____AAAA", "//AAAA"),
    ("lid-mapping", "4917600000000", "4917600000000"),
    ("lid-mapping", "123456789012345_reverse", "123456789012345_reverse"),
    ("app-state-sync-version", "critical_unblock_low", "critical_unblock_low"),
    ("tctoken", "4917@s.whatsapp.net", "4917@s.whatsapp.net"),
    ("device-list", "4917", "4917"),
])
def test_ids_are_recovered_by_the_shape_of_their_type(key_type, name, key_id):
    reverse = reverse_names.reverse_key_name(key_type, name)
    assert reverse.key_id == key_id and reverse.rule
    assert codec.fix_file_name(key_id) == name


@pytest.mark.parametrize("key_type, name, candidates", [
    ("session", "4917-3.1", ["4917-3.1", "4917:3.1"]),
    ("tctoken", "4917-0000@s.whatsapp.net", ["4917-0000@s.whatsapp.net", "4917:0000@s.whatsapp.net"]),
    ("device-list", "a__b", ["a__b", "a/b"]),
    ("tctoken", "a___b", ["a___b", "a_/b", "a/_b"]),
    ("sender-key-memory", "4917-3@s.whatsapp.net", ["4917-3@s.whatsapp.net", "4917:3@s.whatsapp.net"]),
    ("pre-key", "planted", ["planted"]),  # not an integer: no Baileys pre-key
    ("sender-key", "120363@g.us--4917", ["120363@g.us--4917", "120363@g.us-:4917", "120363@g.us:-4917", "120363@g.us::4917"]),
    ("sender-key", "a--b--c--1", None),
    ("app-state-sync-key", "AA-A", ["AA-A", "AA:A"]),
    ("app-state-sync-key", "AA___A", ["AA___A", "AA_/A", "AA/_A"]),
    ("lid-mapping", "4917-1", ["4917-1", "4917:1"]),
    ("session", "..__..__etc__passwd.0", None),
    ("app-state-sync-key", "AAb__cd+e==", ["AAb__cd+e==", "AAb/cd+e=="]),  # 10 characters: not base64 either way
])
def test_names_that_could_come_from_several_ids_are_ambiguous_with_their_candidates(key_type, name, candidates):
    reverse = reverse_names.reverse_key_name(key_type, name)
    assert reverse.key_id is None and reverse.reason
    if candidates is not None:
        assert reverse.candidates == candidates and reverse.candidate_count == len(candidates)
    assert all(codec.fix_file_name(c) == name for c in reverse.candidates)
    assert len(reverse.candidates) <= reverse_names.MAX_CANDIDATES <= reverse.candidate_count or len(reverse.candidates) == reverse.candidate_count


@pytest.mark.parametrize("name", ["a-b", "a__b", "a___b", "a____b", "x-y__z-", "--__--", "_-_-__"])
def test_preimages_are_exactly_the_ids_fixfilename_maps_to_the_name(name):
    found = reverse_names.preimages(name, limit=10 ** 6)
    assert len(found) == len(set(found)) == reverse_names.preimage_count(name)
    assert all(codec.fix_file_name(c) == name for c in found)
    # brute force over the alphabet of the name and its preimage characters
    import itertools
    alphabet = sorted(set(name) | {":", "/"})
    brute = {"".join(p) for n in range(len(name) + 1) for p in itertools.product(alphabet, repeat=n)
             if codec.fix_file_name("".join(p)) == name} if len(name) <= 6 else set(found)
    assert set(found) == brute


def generated_ids():
    """Every id the test data generator makes (all key types), plus odd ones."""
    ids = set()
    for gen in testdata.generate("names", 5, 400):
        for key_type, key_id, *_rest in gen.key_rows():
            ids.add((key_type, key_id))
    ids |= {("session", "4917:3.1"), ("app-state-sync-key", "AAb/cd+e=="), ("tctoken", "4917-0000@s.whatsapp.net"),
            ("sender-key-memory", "120363-1@g.us"), ("session", "../../etc/passwd.0"), ("sender-key", "a::b::c::1"),
            ("device-list", "x/y:z"), ("pre-key", "1:2")}
    return sorted(ids)


def outside_baileys_shapes(key_type, key_id):
    """Ids Baileys never makes, the assumptions of the rules: app-state-sync-key ids are base64, group JIDs hold no ':'."""
    if key_type == "app-state-sync-key":
        return codec.decode_base64(key_id) is None
    if key_type in ("sender-key", "sender-key-memory"):
        return ":" in key_id.split("::")[0]
    return False


def test_the_reverse_never_gives_a_wrong_id_for_ids_of_baileys_shapes():
    """For any id: its file name reverses to that id, or is ambiguous; another id only when the id breaks a shape rule."""
    rng = random.Random(7)
    pieces = ["4917", "-", ":", "/", "_", "__", "@g.us", ".", "1", "A", "=", "+", "::", "status@broadcast", "_reverse"]
    cases = generated_ids() + [(rng.choice(codec.KEY_TYPES), "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 8))))
                               for _ in range(20000)]
    resolved = 0
    for key_type, key_id in cases:
        name = codec.fix_file_name(key_id)
        reverse = reverse_names.reverse_key_name(key_type, name)
        if reverse.key_id is None:
            assert key_id in reverse.candidates or reverse.candidate_count > reverse_names.MAX_CANDIDATES
            continue
        assert codec.fix_file_name(reverse.key_id) == name
        if not outside_baileys_shapes(key_type, key_id):
            assert reverse.key_id == key_id, (key_type, key_id, reverse.key_id)
            resolved += 1
    assert resolved > 2000


def test_every_id_the_generator_makes_is_recovered():
    for gen in testdata.generate("names", 5, 400):
        for key_type, key_id, *_rest in gen.key_rows():
            assert reverse_names.reverse_key_name(key_type, codec.fix_file_name(key_id)).key_id == key_id, (key_type, key_id)


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_ids_python_recovers_are_the_ids_the_applications_reverse_gives():
    """The Node twin (testbed/app/src/digest.js, what the application reports as guessed) never disagrees on a recovered id."""
    names = [(t, codec.fix_file_name(i)) for t, i in generated_ids()]
    names += [("sender-key", "4917612345678-1600000000@g.us--123456789012345_1--0"), ("session", "4917-3.1"),
              ("app-state-sync-key", "AA___A"), ("sender-key", "a--b--c--1"), ("pre-key", "planted")]
    script = ("const d = require(process.argv[1]); const names = JSON.parse(require('fs').readFileSync(0, 'utf8'));"
              "process.stdout.write(JSON.stringify(names.map(([t, n]) => d.reverseFileName(t, n))));")
    out = subprocess.run(["node", "-e", script, os.path.join(ROOT, "testbed", "app", "src", "digest.js")],
                         input=json.dumps(names), capture_output=True, text=True, check=True).stdout
    for (key_type, name), node in zip(names, json.loads(out)):
        ours = reverse_names.reverse_key_name(key_type, name).key_id
        if ours is not None:
            assert not node["ambiguous"] and node["id"] == ours, (key_type, name, node)


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


# -- undo files -----------------------------------------------------------------------------------------------------


def header():
    return {"format": 1, "kind": undo_files.UNDO_KIND, "company_id": "company00001", "txid": 7, "txn_started_at": "2025-01-01 00:00:00+00"}


RECORDS = [{"table": "whatsapp_auth", "action": "updated", "creds": "{}", "created_at": "x", "updated_at": "y"},
           {"table": "whatsapp_keys", "action": "deleted", "key_type": "pre-key", "key_id": "1", "value": "{}",
            "created_at": "x", "updated_at": "y", "expires_at": None},
           {"table": "whatsapp_keys", "action": "inserted", "key_type": "session", "key_id": "4917.1"}]


def test_an_undo_file_is_gzip_json_lines_with_a_sha256_sidecar_and_reads_back(tmp_path):
    path = undo_files.write_undo_file(str(tmp_path), "company00001", header(), RECORDS)
    assert undo_files.UNDO_RE.match(os.path.basename(path))
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(path), os.path.basename(path) + ".sha256"]
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert undo_files.read_undo_file(path) == (header(), RECORDS)
    second = undo_files.write_undo_file(str(tmp_path), "company00001", header(), [])
    assert second != path and undo_files.read_undo_file(second) == (header(), [])


def test_a_damaged_or_truncated_undo_file_is_refused(tmp_path):
    path = undo_files.write_undo_file(str(tmp_path), "company00001", header(), RECORDS)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-9])
    with pytest.raises(fb_errors.FailbackError, match="checksum mismatch"):
        undo_files.read_undo_file(path)
    # A consistent sidecar does not make a file without its end record acceptable.
    body = gzip.compress(b"\n".join(json.dumps(x).encode() for x in [header()] + RECORDS) + b"\n")
    open(path, "wb").write(body)
    import hashlib
    open(path + ".sha256", "w").write("%s  %s\n" % (hashlib.sha256(body).hexdigest(), os.path.basename(path)))
    with pytest.raises(fb_errors.FailbackError, match="incomplete"):
        undo_files.read_undo_file(path)
    os.unlink(path + ".sha256")
    with pytest.raises(fb_errors.FailbackError, match="sidecar"):
        undo_files.read_undo_file(path)


# -- the \u escapes JSONB refuses, and the COPY stream of the staging table ----------------------------------------------


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


def test_copy_text_escapes_what_copy_text_format_reads_as_control():
    assert pg.copy_text('a\\b\tc\nd\re"') == 'a\\\\b\\tc\\nd\\re"'


def test_the_copy_stream_yields_every_line_in_chunks_of_at_most_the_size_asked():
    lines = ["%d\t%s\n" % (i, "é" * (i % 50)) for i in range(2000)]
    stream = pg.CopyStream(iter(lines))
    chunks = []
    while True:
        chunk = stream.read(1000)
        if not chunk:
            break
        assert len(chunk) <= 1000
        chunks.append(chunk)
    assert b"".join(chunks).decode("utf-8") == "".join(lines) and stream.error is None


def test_an_error_while_producing_copy_lines_ends_the_stream_and_is_kept_for_the_caller():
    def lines():
        yield "1\n"
        raise fb_errors.FileProblem("is not JSON")

    stream = pg.CopyStream(lines())
    assert stream.read(100) == b"1\n" and stream.read(100) == b""
    assert isinstance(stream.error, fb_errors.FileProblem)


def test_an_undo_file_written_by_the_writer_thread_reads_back(tmp_path):
    header = {"format": undo_files.UNDO_FORMAT, "kind": undo_files.UNDO_KIND, "company_id": "c1", "txid": 1}
    records = [{"table": "whatsapp_keys", "action": "inserted", "key_type": "pre-key", "key_id": str(i)} for i in range(2500)]
    path = undo_files.UndoWriter(str(tmp_path), "c1", header, records).wait()
    assert undo_files.read_undo_file(path) == (header, records)
    with pytest.raises(FileNotFoundError):
        undo_files.UndoWriter(str(tmp_path / "missing"), "c1", header, records).wait()
