"""The sessions tree without a database: hostile ids, file names, manifests, digest input, verification."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

import baileys_sessions_verify
from module_harness import run_module

from ansible.module_utils import baileys_dr_codec as codec
from ansible.module_utils import baileys_dr_testdata as testdata
from ansible.module_utils.baileys_dr_drift import drift_warning, swap_in_tree, tree_drift
from ansible.module_utils.baileys_dr_export import CompanyWriter
from ansible.module_utils.baileys_dr_files import make_dir
from ansible.module_utils.baileys_dr_manifests import (
    CompanyState, TreeMeta, top_manifest_document, validate_top_manifest,
)
from ansible.module_utils.baileys_dr_refresh import Refresher
from ansible.module_utils.baileys_dr_snapshot import hostile_rows_sql
from ansible.module_utils.baileys_dr_tree import (
    HEADER_LINE, IN_PROGRESS_NAME, KIND, MAX_SHOWN, DigestLines, HostileInputError, ManifestError, SessionsError,
    UnknownKeyTypeError, check_company_id, checked_key_file_name, creds_line, encode_json, file_content, iso, key_line,
    utc_now,
)
from ansible.module_utils.baileys_dr_verify import DRIFT_SHOWN, verify_tree


# -- hostile input -----------------------------------------------------------------------------


@pytest.mark.parametrize("company_id", ["../evil", "a/b", "", "x" * 51, "has space", "new\nline", "é", ".", "a.b"])
def test_company_ids_outside_the_applications_pattern_are_refused(company_id):
    with pytest.raises(HostileInputError) as err:
        check_company_id(company_id)
    assert repr(company_id) in str(err.value)


@pytest.mark.parametrize("company_id", ["company00001", "A-b_9", "x" * 50])
def test_company_ids_of_the_application_are_accepted(company_id):
    assert check_company_id(company_id) == company_id


def test_unknown_key_types_are_refused_naming_company_type_and_id():
    with pytest.raises(UnknownKeyTypeError) as err:
        checked_key_file_name("c1", "evil-type", "k1")
    assert "c1" in str(err.value) and "'evil-type'" in str(err.value) and "'k1'" in str(err.value)


@pytest.mark.parametrize("key_id", ["a\x00b", "a\nb", "a\rb", "\x1b[31m", "tab\there", "c1\x85"])
def test_key_ids_with_control_characters_are_refused_and_shown_escaped(key_id):
    with pytest.raises(HostileInputError) as err:
        checked_key_file_name("c1", "session", key_id)
    message = str(err.value)
    assert repr(key_id) in message and "control" in message
    assert not any(ch in message for ch in "\x00\n\r\x1b\x85"), "control characters must be visible, not raw"


@pytest.mark.parametrize("key_id", [".", ".."])
def test_dot_ids_are_refused(key_id):
    with pytest.raises(HostileInputError):
        checked_key_file_name("c1", "pre-key", key_id)


def test_ids_whose_file_name_exceeds_255_bytes_are_refused():
    ok = "é" * 116  # 232 bytes + "session-" + ".json" = 245
    assert len(checked_key_file_name("c1", "session", ok).encode()) <= 255
    with pytest.raises(HostileInputError) as err:
        checked_key_file_name("c1", "session", "é" * 125)
    assert "bytes" in str(err.value)


@pytest.mark.parametrize("key_id, name", [
    ("../x", "pre-key-..__x.json"),
    ("/etc/passwd", "pre-key-__etc__passwd.json"),
    ("120363@g.us::4917::2", "pre-key-120363@g.us--4917--2.json"),
])
def test_slashes_and_colons_stay_inside_the_company_directory(key_id, name):
    assert checked_key_file_name("c1", "pre-key", key_id) == name
    assert "/" not in name


def test_ids_becoming_the_same_file_name_both_ids_and_are_refused():
    writer = CompanyWriter("c1", None, None, "fail", False)
    assert writer.name_of("session", "a:b") == "session-a-b.json"
    with pytest.raises(HostileInputError) as err:
        writer.name_of("session", "a-b")
    message = str(err.value)
    assert "c1" in message and "'a:b'" in message and "'a-b'" in message and "session" in message


def test_a_sender_key_id_can_collide_with_a_sender_key_memory_file():
    writer = CompanyWriter("c1", None, None, "fail", False)
    writer.name_of("sender-key-memory", "123@g.us")
    with pytest.raises(HostileInputError) as err:
        writer.name_of("sender-key", "memory-123@g.us")
    assert "sender-key-memory" in str(err.value) and "'memory-123@g.us'" in str(err.value)


def test_unknown_types_can_be_skipped_and_are_counted():
    writer = CompanyWriter("c1", None, None, "skip", False)
    assert writer.name_of("future-type", "x") is None
    assert writer.skipped == 1 and writer.skipped_types == {"future-type"}


def test_the_server_side_precheck_matches_the_python_rules():
    """The SQL pre-check flags what checked_key_file_name refuses (types, control characters, dots, length)."""
    sql = hostile_rows_sql("", "fail")
    assert r"[\x01-\x1f\x7f-\x9f]" in sql and "'.', '..'" in sql and "> 255" in sql and "<> ALL" in sql
    assert "= ANY" in hostile_rows_sql("company_id = ANY(%(ids)s)", "skip")


# -- file contents and the digest ----------------------------------------------------------------------


def test_files_hold_buffers_in_baileys_base64_form_whichever_form_the_row_holds():
    value = {"private": {"type": "Buffer", "data": [1, 2, 3]}, "public": {"type": "Buffer", "data": "AQID"}}
    data = json.loads(file_content(value))
    assert data == {"private": {"type": "Buffer", "data": "AQID"}, "public": {"type": "Buffer", "data": "AQID"}}
    assert b" " not in file_content(value)


def test_app_state_sync_key_values_are_written_as_stored():
    value = {"keyData": "AQID", "timestamp": "1700000000000", "fingerprint": {"rawId": 1}}
    assert json.loads(file_content(value)) == value


def test_digest_lines_give_the_state_digest_of_the_codec():
    gen = next(testdata.generate("unit", 1, 120))
    creds = gen.creds()
    keys = sorted(((t, i, v) for t, i, v, *_ in gen.key_rows()), key=lambda k: codec.sort_key(k[0], k[1]))
    digest = DigestLines(creds_line(creds), keep=True)
    for key_type, key_id, value in keys:
        digest.add(key_type, key_id, key_line(key_type, key_id, value))
    assert digest.hexdigest() == codec.state_digest(creds, keys)
    assert hashlib.sha256(digest.data()).hexdigest() == digest.hexdigest(), "the digest lines file is the digest's input"


def test_digest_lines_refuse_keys_out_of_order():
    digest = DigestLines(creds_line(None))
    digest.add("session", "b", b"x\n")
    with pytest.raises(SessionsError):
        digest.add("session", "a", b"y\n")


# -- company manifests ------------------------------------------------------------------------------


def rows_of(company_rows):
    """(type, id, xmin, value text, md5) rows as the database returns them, in digest order."""
    out = []
    for key_type, key_id, value in sorted(company_rows, key=lambda r: codec.sort_key(r[0], r[1])):
        text = json.dumps(value)
        out.append((key_type, key_id, "7", text, hashlib.md5(text.encode()).hexdigest()))
    return out


def creds_row(creds):
    text = json.dumps(creds)
    return ("5", text, hashlib.md5(text.encode()).hexdigest())


def build_tree(root, companies, lines=True):
    """A sessions tree written with the exporter's own writers (no database): {company: (creds, [(type, id, value)])}."""
    previous = os.umask(0o077)
    os.mkdir(root, 0o700)
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    tree = TreeMeta(root_fd).open(create=True, lines=lines)
    entries = {}
    try:
        for company_id, (creds, keys) in companies.items():
            dir_fd = make_dir(root_fd, "company_" + company_id)
            writer = CompanyWriter(company_id, dir_fd, None, "fail", lines)
            writer.creds(creds_row(creds) if creds is not None else None)
            for row in rows_of(keys):
                writer.key(*row)
            os.close(dir_fd)
            sha = writer.meta(tree)
            entries[company_id] = {"digest": writer.digest.hexdigest(), "keys": writer.digest.keys,
                                   "files": len(writer.entry_lines), "manifest_sha256": sha, "fingerprint": "x"}
        now = iso(utc_now())
        top = top_manifest_document(1, {"kind": "postgres", "target": "t", "system_identifier": "1"}, entries, now, now, "live")
        with open(os.path.join(root, ".baileys-dr", "manifest.json"), "wb") as fh:
            fh.write(encode_json(top))
    finally:
        tree.close()
        os.close(root_fd)
        os.umask(previous)
    return root


CREDS = testdata.CompanyGenerator("tree", 1).creds()  # initAuthCreds' shape, Buffers in both forms
KEYS = [
    ("pre-key", "1", {"private": {"type": "Buffer", "data": [9, 9]}, "public": {"type": "Buffer", "data": "CQk="}}),
    ("session", "4917.0", {"_sessions": {}, "version": "v1"}),
    ("app-state-sync-key", "AAAA/Bx=", {"keyData": "AQID", "timestamp": "1700000000000"}),
    ("sender-key", "120363@g.us::4917::0", [{"senderKeyId": 1}]),
]


@pytest.fixture
def tree(tmp_path):
    return build_tree(str(tmp_path / "baileys_sessions"), {"c1": (CREDS, KEYS), "c2": (None, KEYS[:1])})


def test_company_manifest_is_json_with_one_file_per_line_and_original_ids(tree):
    path = os.path.join(tree, ".baileys-dr", "companies", "c1.json")
    data = open(path, "rb").read()
    document = json.loads(data)
    assert document["company_id"] == "c1" and document["keys"] == 4
    assert document["files"]["app-state-sync-key-AAAA__Bx=.json"]["id"] == "AAAA/Bx="
    assert document["files"]["sender-key-120363@g.us--4917--0.json"]["id"] == "120363@g.us::4917::0"
    assert document["files"]["creds.json"] == dict(document["files"]["creds.json"], type="creds")
    assert len(data.split(b"\n")) == len(document["files"]) + 3
    content = open(os.path.join(tree, "company_c1", "pre-key-1.json"), "rb").read()
    assert document["files"]["pre-key-1.json"]["sha256"] == hashlib.sha256(content).hexdigest()


def test_company_state_reads_back_what_was_written(tree):
    manifest, lines, rows = company_files(tree, "c1")
    state = CompanyState("c1", manifest, lines, rows)
    assert state.has_creds and state.keys == 4 and len(state.key_lines) == 4 and len(state.key_entry_lines) == 4
    ordered = sorted(KEYS, key=lambda k: codec.sort_key(k[0], k[1]))
    assert [state.entry(n)[1]["id"] for n in range(4)] == [k[1] for k in ordered]
    assert state.rows == ["%s\t%s\t7" % (k[0], k[1]) for k in ordered]
    assert state.creds_entry()["type"] == "creds"
    for bad in ((manifest, lines + b"[\"x\"]\n", rows), (json.dumps(json.loads(manifest)).encode(), lines, rows),
                (manifest, lines, rows + b"\nx"), (manifest.replace(b'"keys":4', b'"keys":3'), lines, rows)):
        with pytest.raises(ManifestError):
            CompanyState("c1", *bad)


def company_files(tree, company_id):
    meta = os.path.join(tree, ".baileys-dr")
    return (open(os.path.join(meta, "companies", company_id + ".json"), "rb").read(),
            open(os.path.join(meta, "digest-lines", company_id + ".lines"), "rb").read(),
            open(os.path.join(meta, "digest-lines", company_id + ".rows"), "rb").read())


def test_splicing_a_company_gives_the_digest_of_a_fresh_write(tree, tmp_path):
    """Insert, replace and delete by splicing lines equals writing the new state from scratch."""
    state = CompanyState("c1", *company_files(tree, "c1"))
    new_keys = [KEYS[0], ("session", "4917.0", {"_sessions": {"x": 1}, "version": "v2"}), KEYS[3],
                ("identity-key", "4917.1", {"type": "Buffer", "data": [5]}), ("pre-key", "0", {"a": 1})]
    index = {state.entry(n)[1]["id"]: n for n in range(state.keys)}
    replaced = {index["4917.0"]: (b"E", key_line("session", "4917.0", new_keys[1][2]))}
    removed = {index["AAAA/Bx="]}
    inserts = []
    for key_type, key_id, value in (new_keys[3], new_keys[4]):
        inserts.append((state.position_of(key_type, key_id), codec.sort_key(key_type, key_id), b"E",
                        key_line(key_type, key_id, value)))
    _entries, key_lines = Refresher._splice(state, replaced, removed, inserts)
    digest = hashlib.sha256(b"".join([HEADER_LINE, state.creds_line] + key_lines)).hexdigest()
    assert digest == codec.state_digest(CREDS, new_keys)


def test_top_manifest_validation_refuses_foreign_documents():
    for document in ({}, {"format": 2, "kind": KIND, "companies": {}, "generation": 1},
                     {"format": 1, "kind": KIND, "companies": {"../x": {}}, "generation": 1},
                     {"format": 1, "kind": KIND, "companies": {"c": {"digest": "d"}}, "generation": 1}):
        with pytest.raises(ManifestError):
            validate_top_manifest(document)


# -- verification ---------------------------------------------------------------------------------


def verify(path, **kwargs):
    return verify_tree(path, **kwargs)


def test_an_intact_tree_verifies_and_its_digests_recompute_from_the_files(tree):
    result = verify(tree, recompute_digests=True)
    assert result["verified"], result["problems"]
    assert result["digests"]["c1"] == codec.state_digest(CREDS, KEYS)
    assert result["digests"]["c2"] == codec.state_digest(None, KEYS[:1])
    assert result["counts"]["files"] == 6 and result["counts"]["keys"] == 5
    assert result["generation"] == 1 and result["source"]["system_identifier"] == "1"


def test_a_modified_file_is_named(tree):
    with open(os.path.join(tree, "company_c1", "pre-key-1.json"), "a") as fh:
        fh.write(" ")
    result = verify(tree)
    assert not result["verified"]
    assert any("c1" in p and "pre-key-1.json" in p for p in result["problems"])
    assert result["counts"]["mismatched_files"] == 1


def test_a_missing_file_is_named(tree):
    os.unlink(os.path.join(tree, "company_c1", "creds.json"))
    result = verify(tree)
    assert not result["verified"] and any("creds.json is missing" in p for p in result["problems"])


def test_extra_files_and_directories_are_reported_and_allowed_on_request(tree):
    open(os.path.join(tree, "company_c1", "pre-key-99.json"), "w").write("{}")
    os.mkdir(os.path.join(tree, "company_c3"))
    result = verify(tree)
    assert not result["verified"]
    assert result["extra_files"] == ["company_c1/pre-key-99.json"] and result["extra_companies"] == ["company_c3"]
    allowed = verify(tree, allow_extra=True)
    assert allowed["verified"] and allowed["extra_files"] == ["company_c1/pre-key-99.json"]


def test_symbolic_links_are_refused_anywhere(tree, tmp_path):
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    target = os.path.join(tree, "company_c1", "pre-key-1.json")
    os.unlink(target)
    os.symlink(outside, target)
    result = verify(tree)
    assert not result["verified"] and any("symbolic link" in p for p in result["problems"])
    link = str(tmp_path / "link")
    os.symlink(tree, link)
    assert any("symbolic link" in p for p in verify(link)["problems"])


def test_a_half_refreshed_company_is_detected(tree):
    """A company manifest rewritten without the top manifest: its sha256 no longer matches."""
    path = os.path.join(tree, ".baileys-dr", "companies", "c2.json")
    data = open(path, "rb").read()
    open(path, "wb").write(data.replace(b'"keys":1', b'"keys":2'))
    result = verify(tree)
    assert not result["verified"] and any("c2" in p and "half-refreshed" in p for p in result["problems"])


def test_an_interrupted_refresh_marker_fails_verification(tree):
    open(os.path.join(tree, ".baileys-dr", IN_PROGRESS_NAME), "w").write("{}")
    result = verify(tree)
    assert not result["verified"] and any("interrupted" in p for p in result["problems"])


@pytest.mark.parametrize("content", [None, b"{", b'{"format": 1}'])
def test_a_missing_or_unusable_top_manifest_fails_verification(tree, content):
    path = os.path.join(tree, ".baileys-dr", "manifest.json")
    if content is None:
        os.unlink(path)
    else:
        open(path, "wb").write(content)
    result = verify(tree)
    assert not result["verified"] and "manifest.json" in result["problems"][0]


def test_wide_permissions_are_reported_without_failing(tree):
    os.chmod(os.path.join(tree, "company_c1", "pre-key-1.json"), 0o644)
    result = verify(tree)
    assert result["verified"]
    assert result["permissions"] == ["company_c1/pre-key-1.json has mode 0644 (expected 0600)"]


def test_recomputing_catches_a_file_whose_manifest_entry_was_forged_to_match(tree):
    """sha256 and size rewritten to the new bytes: only the digest shows the change."""
    name = "session-4917.0.json"
    data = json.dumps({"_sessions": {}, "version": "forged"}).encode()
    open(os.path.join(tree, "company_c1", name), "wb").write(data)
    companies = os.path.join(tree, ".baileys-dr", "companies", "c1.json")
    document = json.loads(open(companies, "rb").read())
    document["files"][name].update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    manifest = json.dumps(document).encode()
    open(companies, "wb").write(manifest)
    top_path = os.path.join(tree, ".baileys-dr", "manifest.json")
    top = json.loads(open(top_path).read())
    top["companies"]["c1"]["manifest_sha256"] = hashlib.sha256(manifest).hexdigest()
    open(top_path, "w").write(json.dumps(top))
    assert verify(tree)["verified"]
    result = verify(tree, recompute_digests=True)
    assert not result["verified"] and any("c1" in p and "digest" in p for p in result["problems"])


def test_the_verify_module_fails_unless_told_not_to_and_checks_age(tree):
    os.unlink(os.path.join(tree, "company_c2", "pre-key-1.json"))
    ok, result = run_module(baileys_sessions_verify, dict(path=tree))
    assert not ok and "does not verify" in result["msg"] and result["verified"] is False
    ok, result = run_module(baileys_sessions_verify, dict(path=tree, fail_on_problems=False), check_mode=True)
    assert ok and not result["changed"] and result["problem_count"] == 1
    os.unlink(os.path.join(tree, ".baileys-dr", "manifest.json"))
    ok, result = run_module(baileys_sessions_verify, dict(path=tree, fail_on_problems=False))
    assert ok and result["verified"] is False


def test_the_verify_module_rejects_a_stale_tree(tree):
    top_path = os.path.join(tree, ".baileys-dr", "manifest.json")
    top = json.loads(open(top_path).read())
    top["last_good_refresh"] = "2000-01-01T00:00:00Z"
    open(top_path, "w").write(json.dumps(top))
    ok, result = run_module(baileys_sessions_verify, dict(path=tree, max_age=900, fail_on_problems=False))
    assert ok and not result["verified"] and result["age_seconds"] > 900
    assert any("max_age" in p for p in result["problems"])


# -- drift: what a service running on the files did to the tree -------------------------------------


def service_writes(tree, company="c1"):
    """What Baileys does to a company directory while the service runs on files: one key created, one rewritten in
    place (plain writeFile: same inode, same size here, new content and mtime), one deleted (a consumed pre-key)."""
    directory = os.path.join(tree, "company_" + company)
    open(os.path.join(directory, "session-1.2.json"), "w").write('{"_sessions":{}}')
    path = os.path.join(directory, "pre-key-1.json")
    data = open(path, "rb").read()
    with open(path, "r+b") as fh:
        fh.write(data.replace(b"CQk=", b"AAA="))
    assert os.path.getsize(path) == len(data)
    os.unlink(os.path.join(directory, "session-4917.0.json"))
    return {"added": ["session-1.2.json"], "changed": ["pre-key-1.json"], "deleted": ["session-4917.0.json"]}


def test_a_tree_as_its_manifests_list_it_has_no_drift(tree):
    drift = tree_drift(tree)
    assert drift["clean"] and drift["manifest"] and (drift["added"], drift["changed"], drift["deleted"]) == (0, 0, 0)
    assert drift["companies"] == {} and drift["extra_companies"] == [] and drift["missing_companies"] == []


def test_files_added_rewritten_in_place_and_deleted_are_counted_and_named(tree):
    expected = service_writes(tree)
    drift = tree_drift(tree)
    assert not drift["clean"] and (drift["added"], drift["changed"], drift["deleted"]) == (1, 1, 1)
    assert list(drift["companies"]) == ["c1"]
    assert {kind: drift["companies"]["c1"][kind] for kind in expected} == expected
    assert drift["reason"] == ("1 file added (company_c1/session-1.2.json), 1 changed (company_c1/pre-key-1.json), "
                               "1 deleted (company_c1/session-4917.0.json)")


def test_a_tree_without_a_manifest_is_not_clean_and_says_so(tree):
    os.unlink(os.path.join(tree, ".baileys-dr", "manifest.json"))
    drift = tree_drift(tree)
    assert not drift["clean"] and not drift["manifest"] and "manifest" in drift["reason"]
    assert drift_warning(drift, "/kept") == (
        "the replaced tree does not match its manifests (%s): what a service wrote into it cannot be told (kept in /kept)"
        % drift["reason"])
    missing = tree_drift(os.path.join(os.path.dirname(tree), "nothing-here"))
    assert not missing["clean"] and "does not exist" in missing["reason"]


def test_a_new_company_directory_counts_its_files_as_added_and_a_vanished_one_its_files_as_deleted(tree):
    os.mkdir(os.path.join(tree, "company_c9"))
    for name in ("creds.json", "pre-key-1.json"):
        open(os.path.join(tree, "company_c9", name), "w").write("{}")
    os.rename(os.path.join(tree, "company_c2"), os.path.join(os.path.dirname(tree), "c2-elsewhere"))
    drift = tree_drift(tree)
    assert not drift["clean"] and drift["added"] == 2 and drift["deleted"] == 1 and drift["changed"] == 0  # c2: one key, no creds
    assert drift["extra_companies"] == ["company_c9"] and drift["missing_companies"] == ["c2"]
    assert "company_c9" in drift["reason"] and "c2" in drift["reason"]


def test_hostile_names_are_reported_escaped_and_never_followed(tree, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    for n in range(3):
        (outside / ("secret-%d.json" % n)).write_text("{}")
    directory = os.path.join(tree, "company_c1")
    open(os.path.join(directory, "evil\nname.json"), "w").write("{}")
    open(os.path.join(os.fsencode(directory), b"bad-\xff.json"), "w").write("{}")
    os.unlink(os.path.join(directory, "creds.json"))
    os.symlink(outside / "secret-0.json", os.path.join(directory, "creds.json"))
    os.mkdir(os.path.join(directory, "sub"))
    os.symlink(outside, os.path.join(directory, "linked-dir"))
    os.unlink(os.path.join(tree, "company_c2", "pre-key-1.json"))
    os.mkdir(os.path.join(tree, "company_c2", "pre-key-1.json"))
    os.symlink(outside, os.path.join(tree, "company_c7"))
    drift = tree_drift(tree)
    assert not drift["clean"]
    c1 = drift["companies"]["c1"]
    assert c1["changed"] == ["creds.json"] and c1["counts"]["added"] == 4
    assert sorted(c1["added"]) == sorted(["'evil\\nname.json'", "'bad-\\udcff.json'", "linked-dir", "sub"])
    assert drift["companies"]["c2"]["changed"] == ["pre-key-1.json"]
    assert drift["extra_companies"] == ["company_c7"] and drift["added"] == 5, "a symbolic link counts once, unfollowed"
    text = json.dumps(drift, ensure_ascii=False)
    text.encode("utf-8")  # no lone surrogate: the module's JSON can carry it
    assert "\n" not in drift["reason"] and "secret" not in text
    assert sorted(os.listdir(outside)) == ["secret-0.json", "secret-1.json", "secret-2.json"]


def test_drift_is_capped_per_company_and_in_companies_while_counting_everything(tmp_path):
    tree = build_tree(str(tmp_path / "many"), {"c%02d" % n: (CREDS, KEYS[:1]) for n in range(MAX_SHOWN + 5)}, lines=False)
    for n in range(MAX_SHOWN + 5):
        for k in range(DRIFT_SHOWN + 3):
            open(os.path.join(tree, "company_c%02d" % n, "session-%d.0.json" % k), "w").write("{}")
    drift = tree_drift(tree)
    assert drift["added"] == (MAX_SHOWN + 5) * (DRIFT_SHOWN + 3)
    assert drift["drifted_companies"] == MAX_SHOWN + 5 and len(drift["companies"]) == MAX_SHOWN
    assert all(len(entry["added"]) == DRIFT_SHOWN for entry in drift["companies"].values())
    assert drift["reason"].startswith("%d files added (company_c00/session-0.0.json, company_c00/session-1.0.json, "
                                      "company_c00/session-2.0.json, ...)" % drift["added"])


def test_swapping_in_keeps_a_drifted_tree_even_without_keep_backup_and_drops_a_clean_one(tree, tmp_path):
    parent = os.path.dirname(tree)
    service_writes(tree)
    first = build_tree(str(tmp_path / "first"), {"c1": (CREDS, KEYS)})
    swapped = swap_in_tree(first, tree, keep_backup=False, lock_timeout=5)
    kept = swapped["backup"]
    assert kept and os.path.isfile(os.path.join(kept, "company_c1", "session-1.2.json")), "the service's files survive"
    drift = swapped["replaced_drift"]
    assert (drift["added"], drift["changed"], drift["deleted"]) == (1, 1, 1)
    assert swapped["warning"] == ("the replaced tree held 2 files the service wrote that the database never received "
                                  "(1 added, 1 changed, and 1 deleted by it; kept in %s)" % kept)
    second = build_tree(str(tmp_path / "second"), {"c1": (CREDS, KEYS)})
    swapped = swap_in_tree(second, tree, keep_backup=False, lock_timeout=5)
    assert swapped["backup"] is None and swapped["replaced_drift"]["clean"] and swapped["warning"] is None
    assert sorted(n for n in os.listdir(parent) if n.startswith("baileys_sessions")) == ["baileys_sessions", os.path.basename(kept)]
