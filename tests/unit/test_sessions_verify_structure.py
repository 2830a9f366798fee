"""baileys_sessions_verify depth=structure: manifests and directory listings only, no session file read."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

import baileys_sessions_verify
from module_harness import run_module
from test_sessions_tree import CREDS, KEYS, build_tree

from ansible.module_utils import baileys_dr_manifests, baileys_dr_verify
from ansible.module_utils.baileys_dr_files import read_regular
from ansible.module_utils.baileys_dr_tree import IN_PROGRESS_NAME, SessionsError
from ansible.module_utils.baileys_dr_verify import verify_tree

# An id whose file name JSON escapes in the manifest ('"' and '\'): its company is read by the JSON parser.
ODD_KEYS = KEYS + [("session", 'quote"back\\slash.0', {"_sessions": {}})]


@pytest.fixture
def tree(tmp_path):
    return build_tree(str(tmp_path / "baileys_sessions"), {"c1": (CREDS, KEYS), "c2": (None, KEYS[:1]), "c3": (CREDS, ODD_KEYS)})


def verify(path, **kwargs):
    return verify_tree(path, **kwargs)


def company_file(tree, company, name):
    return os.path.join(tree, "company_" + company, name)


def rewrite_company_manifest(tree, company, data):
    """Replace a company manifest and record its new sha256 in the top manifest (a consistent, forged chain)."""
    with open(os.path.join(tree, ".baileys-dr", "companies", company + ".json"), "wb") as fh:
        fh.write(data)
    top_path = os.path.join(tree, ".baileys-dr", "manifest.json")
    top = json.loads(open(top_path, "rb").read())
    top["companies"][company]["manifest_sha256"] = hashlib.sha256(data).hexdigest()
    open(top_path, "w").write(json.dumps(top))


def test_an_intact_tree_verifies_at_both_depths_with_the_same_counts_and_digests(tree):
    content = verify(tree)
    structure = verify(tree, depth="structure")
    assert content["verified"] and structure["verified"], structure["problems"]
    assert structure["depth"] == "structure" and content["depth"] == "content"
    assert structure["digests"] == content["digests"] and set(structure["digests"]) == {"c1", "c2", "c3"}
    for field in ("companies", "files", "bytes", "keys"):
        assert structure["counts"][field] == content["counts"][field], field


def manifest_mtime_ns(tree):
    return os.stat(os.path.join(tree, ".baileys-dr", "manifest.json")).st_mtime_ns


def set_mtime(path, mtime_ns):
    os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)


def rewrite_in_place(path):
    """What Baileys' plain writeFile does to a key it updates: same inode, same size here, new content and mtime."""
    data = open(path, "rb").read()
    assert b"CQk=" in data
    inode = os.stat(path).st_ino
    with open(path, "r+b") as fh:
        fh.write(data.replace(b"CQk=", b"AAA="))
    assert os.stat(path).st_ino == inode and os.path.getsize(path) == len(data)


def test_a_file_the_service_rewrote_in_place_after_the_manifest_is_caught_by_the_structure_depth(tree):
    rewrite_in_place(company_file(tree, "c1", "pre-key-1.json"))
    structure = verify(tree, depth="structure")
    content = verify(tree)
    assert not structure["verified"] and structure["counts"]["mismatched_files"] == 1
    assert structure["problems"] == content["problems"] == \
        ["company c1: pre-key-1.json differs from its manifest (size %d, expected %d)" % ((os.path.getsize(company_file(tree, "c1", "pre-key-1.json")),) * 2)]


def test_only_files_modified_since_the_manifest_are_read_at_the_structure_depth(tree, monkeypatch):
    before = manifest_mtime_ns(tree) - 10 ** 9
    for company in ("c1", "c2", "c3"):
        for name in os.listdir(os.path.join(tree, "company_" + company)):
            set_mtime(company_file(tree, company, name), before)
    manifests = {"manifest.json", "c1.json", "c2.json", "c3.json"}
    reads = []
    for module in (baileys_dr_verify, baileys_dr_manifests):  # the verifier's reads, and read_json_at's (the top manifest)
        monkeypatch.setattr(module, "read_regular", lambda dir_fd, name, *a: reads.append(name) or read_regular(dir_fd, name, *a))
    assert verify(tree, depth="structure")["verified"]
    assert set(reads) == manifests, "no session file written before its manifest is read"
    rewrite_in_place(company_file(tree, "c2", "pre-key-1.json"))
    reads.clear()
    assert not verify(tree, depth="structure")["verified"]
    assert [name for name in reads if name not in manifests] == ["pre-key-1.json"], "only the file modified since"


def test_a_file_changed_in_place_with_its_mtime_set_back_is_only_caught_by_the_content_depth(tree):
    path = company_file(tree, "c1", "pre-key-1.json")
    rewrite_in_place(path)
    set_mtime(path, manifest_mtime_ns(tree) - 10 ** 9)
    assert verify(tree, depth="structure")["verified"], "structure reads only files modified since the manifest"
    content = verify(tree)
    assert not content["verified"] and content["counts"]["mismatched_files"] == 1
    assert any("c1" in p and "pre-key-1.json" in p for p in content["problems"])


def _changed_in_place(tree):
    rewrite_in_place(company_file(tree, "c3", "pre-key-1.json"))
    return "company c3: pre-key-1.json differs from its manifest"


def _resized_with_an_old_mtime(tree):
    """A size that differs is seen from the lstat alone, whatever the mtime says."""
    path = company_file(tree, "c1", "creds.json")
    mtime = os.stat(path).st_mtime_ns
    with open(path, "ab") as fh:
        fh.write(b" ")
    set_mtime(path, mtime)
    return "company c1: creds.json differs from its manifest (size"


def _missing(tree):
    os.unlink(company_file(tree, "c1", "creds.json"))
    return "company c1: creds.json is missing"


def _extra(tree):
    open(company_file(tree, "c2", "pre-key-99.json"), "w").write("{}")
    return "company c2: pre-key-99.json is not in the manifest"


def _renamed(tree):
    os.rename(company_file(tree, "c1", "session-4917.0.json"), company_file(tree, "c1", "session-4917.1.json"))
    return "company c1: session-4917.0.json is missing"


def _symlink(tree):
    target = company_file(tree, "c1", "pre-key-1.json")
    os.unlink(target)
    os.symlink(os.path.join(os.path.dirname(tree), "elsewhere.json"), target)
    return "company c1: pre-key-1.json is a symbolic link: refused"


def _directory(tree):
    target = company_file(tree, "c2", "pre-key-1.json")
    os.unlink(target)
    os.mkdir(target)
    return "company c2: pre-key-1.json is not a regular file"


def _odd_name_missing(tree):
    os.unlink(company_file(tree, "c3", 'session-quote"back\\slash.0.json'))
    return "company c3: session-quote\"back\\slash.0.json is missing"


def _garbled_manifest(tree):
    path = os.path.join(tree, ".baileys-dr", "companies", "c2.json")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-5])
    return "company c2: manifest unreadable"


def _half_refreshed_manifest(tree):
    path = os.path.join(tree, ".baileys-dr", "companies", "c2.json")
    data = open(path, "rb").read()
    open(path, "wb").write(data.replace(b'"keys":1', b'"keys":2'))
    return "company c2: its manifest's sha256 differs from the top manifest's"


def _missing_manifest(tree):
    os.unlink(os.path.join(tree, ".baileys-dr", "companies", "c1.json"))
    return "company c1: its manifest is missing"


def _broken_top_manifest(tree):
    open(os.path.join(tree, ".baileys-dr", "manifest.json"), "wb").write(b'{"format": 1')
    return ".baileys-dr/manifest.json"


def _interrupted(tree):
    open(os.path.join(tree, ".baileys-dr", IN_PROGRESS_NAME), "w").write("{}")
    return "a refresh was interrupted"


@pytest.mark.parametrize("damage", [_changed_in_place, _resized_with_an_old_mtime, _missing, _extra, _renamed, _symlink, _directory, _odd_name_missing, _garbled_manifest,
                                    _half_refreshed_manifest, _missing_manifest, _broken_top_manifest, _interrupted])
def test_structure_catches_what_changes_names_types_or_manifests_as_content_does(tree, damage):
    expected = damage(tree)
    structure = verify(tree, depth="structure")
    content = verify(tree)
    assert not structure["verified"] and any(expected in p for p in structure["problems"]), structure["problems"]
    assert structure["problems"] == content["problems"] or damage in (_symlink, _directory), \
        "the same problems, in the same words, at both depths"
    assert structure["problem_count"] == content["problem_count"]


def test_extra_files_are_allowed_on_request_at_the_structure_depth(tree):
    _extra(tree)
    result = verify(tree, depth="structure", allow_extra=True)
    assert result["verified"] and result["extra_files"] == ["company_c2/pre-key-99.json"]


def test_a_manifest_that_is_valid_json_in_another_layout_is_still_compared_name_by_name(tree):
    path = os.path.join(tree, ".baileys-dr", "companies", "c1.json")
    rewrite_company_manifest(tree, "c1", json.dumps(json.loads(open(path, "rb").read()), indent=2).encode())
    assert verify(tree, depth="structure")["verified"]
    _renamed(tree)
    result = verify(tree, depth="structure")
    assert not result["verified"] and "company c1: session-4917.0.json is missing" in result["problems"]


def test_a_manifest_entry_forged_into_the_chain_is_checked_like_at_the_content_depth(tree):
    """Consistent sha256 chain, but an entry that does not name the file of its key: the JSON validation speaks."""
    path = os.path.join(tree, ".baileys-dr", "companies", "c2.json")
    document = json.loads(open(path, "rb").read())
    document["files"]["pre-key-1.json"]["id"] = "2"
    rewrite_company_manifest(tree, "c2", json.dumps(document, indent=1).encode())
    structure = verify(tree, depth="structure")
    assert not structure["verified"] and structure["problems"] == verify(tree)["problems"]


def test_recompute_digests_needs_the_content_depth(tree):
    with pytest.raises(SessionsError, match="recompute_digests.*depth=content"):
        verify(tree, depth="structure", recompute_digests=True)
    ok, result = run_module(baileys_sessions_verify, dict(path=tree, depth="structure", recompute_digests=True))
    assert not ok and "recompute_digests" in result["msg"] and "depth=content" in result["msg"]


def test_the_verify_module_takes_depth_and_returns_it(tree):
    ok, result = run_module(baileys_sessions_verify, dict(path=tree, depth="structure"))
    assert ok and result["verified"] and result["depth"] == "structure" and result["changed"] is False
    _missing(tree)
    ok, result = run_module(baileys_sessions_verify, dict(path=tree, depth="structure"))
    assert not ok and "creds.json is missing" in result["msg"] and result["depth"] == "structure"
    ok, result = run_module(baileys_sessions_verify, dict(path=tree, depth="deep"))
    assert not ok and "depth" in result["msg"]


@pytest.mark.parametrize("body", [b"garbage", b'"pre-key-1.json"\n', b'"pre-key-1.json":{"size":84},\n"creds.json":{"size":1}\n'])
def test_a_broken_manifest_with_a_consistent_chain_is_refused_at_both_depths(tree, body):
    path = os.path.join(tree, ".baileys-dr", "companies", "c2.json")
    header = open(path, "rb").read().split(b"\n", 1)[0]
    rewrite_company_manifest(tree, "c2", header + b"\n" + body + b"}}\n")
    structure = verify(tree, depth="structure")
    assert not structure["verified"] and structure["problems"] == verify(tree)["problems"]
