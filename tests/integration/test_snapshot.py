"""baileys_auth_export, mode=standby: the incremental refresh of a standby tree, against the throwaway cluster."""

from __future__ import annotations

import gzip
import hashlib
import json
import os

import pytest

import baileys_auth_export
from module_harness import run_module

from ansible.module_utils import baileys_dr_testdata as testdata
from ansible.module_utils.baileys_dr_tree import IN_PROGRESS_NAME
from ansible.module_utils.baileys_dr_verify import verify_tree
from ansible.module_utils.baileys_dr_store import company_digest, list_companies


def database_digests(db):
    digests = {company: company_digest(db, company)[0] for company in list_companies(db)}
    db.rollback()
    return digests


def execute(db, *statements):
    with db.cursor() as cur:
        for statement in statements:
            if isinstance(statement, tuple):
                cur.execute(*statement)
            else:
                cur.execute(statement)
    db.commit()


def listing(path):
    found = {}
    for directory, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(directory, name)
            info = os.lstat(full)
            found[os.path.relpath(full, path)] = (info.st_size, info.st_mtime_ns, info.st_ino)
    return found


@pytest.fixture
def standby_dir(tmp_path):
    root = tmp_path / "srv" / "baileys-app"
    root.mkdir(parents=True)
    return root / "baileys_sessions.standby"


@pytest.fixture
def refresh(db_params, standby_dir):
    def run(check_mode=False, **args):
        params = dict(db_params, dest=str(standby_dir), mode="standby")
        params.update(args)
        ok, result = run_module(baileys_auth_export, params, check_mode=check_mode)
        return ok, result
    return run


@pytest.fixture
def built(db, refresh, standby_dir):
    testdata.load(db, "standby", 3, 150)
    ok, result = refresh()
    assert ok and result["initial_build"] and result["changed"], result.get("msg")
    return result


def assert_verified_equal_to_database(db, standby_dir):
    checked = verify_tree(str(standby_dir), recompute_digests=True)
    assert checked["verified"], checked["problems"][:5]
    assert checked["digests"] == database_digests(db)
    return checked


def test_the_first_run_builds_the_whole_standby_tree(db, built, standby_dir):
    assert built["files"] == 453 and built["generation"] == 1 and built["last_good_refresh"]
    assert (standby_dir / ".baileys-dr" / "digest-lines" / "company00001.lines").is_file()
    assert_verified_equal_to_database(db, standby_dir)


def test_a_refresh_writes_only_what_changed(db, built, refresh, standby_dir):
    execute(db,
            "UPDATE whatsapp_keys SET value = '{\"v\": 2}' WHERE company_id = 'company00001' AND key_type = 'session' "
            "AND key_id IN (SELECT key_id FROM whatsapp_keys WHERE company_id = 'company00001' AND key_type = 'session' ORDER BY 1 LIMIT 5)",
            "INSERT INTO whatsapp_keys (company_id, key_type, key_id, value) VALUES "
            "('company00002', 'pre-key', '90001', '{\"k\": {\"type\": \"Buffer\", \"data\": [1, 2]}}'), "
            "('company00002', 'app-state-sync-key', 'AAAA/new', '{\"keyData\": \"AQID\", \"timestamp\": \"5\"}'), "
            "('company00002', 'sender-key', '1203@g.us::49::0', '[]')",
            "DELETE FROM whatsapp_keys WHERE company_id = 'company00003' AND key_type = 'pre-key' AND key_id IN ('1', '2')",
            "UPDATE whatsapp_auth SET creds = creds || '{\"accountSyncCounter\": 42}' WHERE company_id = 'company00003'")
    unchanged = standby_dir / "company_company00001" / "pre-key-3.json"
    before = os.lstat(unchanged)
    ok, result = refresh()
    assert ok, result.get("msg")
    assert result["changed"] and result["generation"] == 2 and result["row_versions_used"]
    assert result["files_written"] == 5 + 3 + 1 and result["files_deleted"] == 2
    assert result["companies_refreshed"] == 3 and result["companies_rebuilt"] == 0
    after = os.lstat(unchanged)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), "unchanged files are not rewritten"
    assert not (standby_dir / "company_company00003" / "pre-key-1.json").exists()
    assert json.loads((standby_dir / "company_company00002" / "pre-key-90001.json").read_text()) == {"k": {"type": "Buffer", "data": "AQI="}}
    assert_verified_equal_to_database(db, standby_dir)


def test_a_refresh_skips_unchanged_companies(db, built, refresh):
    execute(db, "UPDATE whatsapp_keys SET value = '{}' WHERE company_id = 'company00002' AND key_type = 'tctoken'")
    ok, result = refresh()
    assert ok and result["companies_skipped"] == 2 and result["companies_refreshed"] == 1


def test_a_refresh_without_change_writes_no_session_file_but_records_the_refresh(db, built, refresh, standby_dir):
    before = listing(standby_dir)
    ok, result = refresh()
    assert ok and result["changed"] is False and result["generation"] == 1
    assert result["companies_skipped"] == 3 and result["files_written"] == 0
    assert result["last_good_refresh"] > built["last_good_refresh"] and result["age_seconds"] == 0
    after = listing(standby_dir)
    top = (".baileys-dr", ".baileys-dr/manifest.json")  # the top manifest is replaced (a rename in .baileys-dr)
    assert {k: v for k, v in after.items() if k not in top} == {k: v for k, v in before.items() if k not in top}


def test_an_upsert_of_the_same_value_rewrites_no_file(db, built, refresh):
    execute(db, "UPDATE whatsapp_keys SET value = value WHERE company_id = 'company00001' AND key_type = 'pre-key'")
    ok, result = refresh()
    assert ok and result["files_written"] == 0 and result["rows_unchanged_content"] > 0 and result["changed"] is False


def test_check_mode_counts_files_to_write_and_delete_and_writes_nothing(db, built, refresh, standby_dir):
    execute(db, "UPDATE whatsapp_keys SET value = '{\"v\": 3}' WHERE company_id = 'company00001' AND key_type = 'device-list'",
            "DELETE FROM whatsapp_keys WHERE company_id = 'company00002' AND key_type = 'pre-key' AND key_id = '3'",
            "UPDATE whatsapp_keys SET value = value WHERE company_id = 'company00003'")
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM whatsapp_keys WHERE company_id = 'company00001' AND key_type = 'device-list'")
        device_lists = cur.fetchone()[0]
    db.rollback()
    before = listing(standby_dir.parent)
    ok, result = refresh(check_mode=True)
    assert ok and result["changed"]
    assert result["would_change"]["files_to_write"] == device_lists
    assert result["would_change"]["files_to_delete"] == 1
    assert listing(standby_dir.parent) == before


def test_companies_deleted_or_added_in_the_database_follow(db, built, refresh, standby_dir):
    """A company of 150 keys going is more than the deletion guard lets through unasked: force says it is meant."""
    execute(db, "DELETE FROM whatsapp_keys WHERE company_id = 'company00003'", "DELETE FROM whatsapp_auth WHERE company_id = 'company00003'")
    testdata.load(db, "standby", 1, 40, first=4)
    ok, result = refresh(force=True)
    assert ok and result["companies_removed"] == 1 and result["companies_added"] == 1
    assert result["deletion_guard"]["overridden"] and result["deletion_guard"]["keys_removed"] == 150
    assert not (standby_dir / "company_company00003").exists()
    assert not (standby_dir / ".baileys-dr" / "companies" / "company00003.json").exists()
    assert_verified_equal_to_database(db, standby_dir)


def test_after_a_server_restart_rows_are_compared_by_md5(db, built, refresh, standby_dir):
    """Row versions from another server lifetime are not trusted: md5(value::text) decides, with the same result."""
    top_path = standby_dir / ".baileys-dr" / "manifest.json"
    top = json.loads(top_path.read_text())
    top["source"]["postmaster_start_time"] = "2000-01-01T00:00:00Z"
    top_path.write_text(json.dumps(top))
    execute(db, "UPDATE whatsapp_keys SET value = '{\"v\": 4}' WHERE company_id = 'company00002' AND key_type = 'tctoken'")
    ok, result = refresh()
    assert ok and result["row_versions_used"] is False and result["companies_refreshed"] == 3
    assert result["files_written"] > 0
    assert_verified_equal_to_database(db, standby_dir)
    ok, again = refresh()
    assert ok and again["row_versions_used"] and again["companies_skipped"] == 3


@pytest.mark.parametrize("point", ["before_company_manifest:2", "before_manifest"])
def test_an_interrupted_refresh_is_detected_and_the_next_refresh_repairs_it(db, built, refresh, standby_dir, monkeypatch, point):
    execute(db, "UPDATE whatsapp_keys SET value = '{\"v\": 5}' WHERE key_type IN ('session', 'tctoken')",
            "DELETE FROM whatsapp_keys WHERE key_type = 'pre-key' AND key_id = '4'")
    monkeypatch.setenv("BAILEYS_DR_TEST_FAIL_AT", point)
    ok, result = refresh()
    assert not ok and point in result["msg"]
    checked = verify_tree(str(standby_dir))
    assert not checked["verified"]
    assert any("interrupted" in p for p in checked["problems"])
    assert any("company00001" in p or "company00002" in p for p in checked["problems"]), checked["problems"]
    monkeypatch.delenv("BAILEYS_DR_TEST_FAIL_AT")
    ok, result = refresh()
    assert ok and result["previous_refresh_interrupted"] and result["changed"]
    assert not (standby_dir / ".baileys-dr" / IN_PROGRESS_NAME).exists()
    assert_verified_equal_to_database(db, standby_dir)


def test_an_orphan_file_left_by_an_interrupted_refresh_is_removed(db, built, refresh, standby_dir, monkeypatch):
    execute(db, "INSERT INTO whatsapp_keys (company_id, key_type, key_id, value) VALUES ('company00001', 'pre-key', '777', '{}')")
    monkeypatch.setenv("BAILEYS_DR_TEST_FAIL_AT", "before_company_manifest:1")
    ok, _ = refresh()
    assert not ok and (standby_dir / "company_company00001" / "pre-key-777.json").exists()
    monkeypatch.delenv("BAILEYS_DR_TEST_FAIL_AT")
    execute(db, "DELETE FROM whatsapp_keys WHERE key_id = '777'")
    ok, result = refresh()
    assert ok and not (standby_dir / "company_company00001" / "pre-key-777.json").exists()
    assert_verified_equal_to_database(db, standby_dir)


def test_a_hostile_new_row_is_refused_and_nothing_is_written(db, built, refresh, standby_dir):
    execute(db, "INSERT INTO whatsapp_keys (company_id, key_type, key_id, value) VALUES "
                "('company00001', 'session', 'x:1.0', '{}'), ('company00001', 'session', 'x-1.0', '{}')")
    before = listing(standby_dir.parent)
    ok, result = refresh()
    assert not ok and "'x:1.0'" in result["msg"] and "'x-1.0'" in result["msg"] and "company00001" in result["msg"]
    assert listing(standby_dir.parent) == before
    assert verify_tree(str(standby_dir))["verified"], "the previous generation is intact"
    execute(db, "INSERT INTO whatsapp_keys (company_id, key_type, key_id, value) VALUES ('company00002', 'session', E'a\\nb', '{}')")
    ok, result = refresh()
    assert not ok and "'a\\nb'" in result["msg"]
    assert listing(standby_dir.parent) == before


def test_symbolic_links_planted_in_the_standby_are_not_followed(db, built, refresh, standby_dir, tmp_path):
    outside = tmp_path / "outside.json"
    outside.write_text("precious")
    target = standby_dir / "company_company00001" / "pre-key-1.json"
    target.unlink()
    os.symlink(outside, target)
    execute(db, "UPDATE whatsapp_keys SET value = '{\"v\": 6}' WHERE company_id = 'company00001' AND key_type = 'pre-key' AND key_id = '1'")
    ok, result = refresh()
    assert ok, result.get("msg")
    assert outside.read_text() == "precious" and not target.is_symlink()
    assert_verified_equal_to_database(db, standby_dir)
    elsewhere = tmp_path / "elsewhere"
    os.rename(standby_dir / "company_company00002", elsewhere)
    os.symlink(elsewhere, standby_dir / "company_company00002")
    execute(db, "UPDATE whatsapp_keys SET value = '{\"v\": 7}' WHERE company_id = 'company00002' AND key_type = 'pre-key'")
    before = listing(elsewhere)
    ok, result = refresh()
    assert not ok and "symbolic link" in result["msg"]
    assert listing(elsewhere) == before


def test_standby_files_are_0600_and_directories_0700(db, built, refresh, standby_dir):
    execute(db, "UPDATE whatsapp_keys SET value = '{}' WHERE company_id = 'company00001' AND key_type = 'session'")
    refresh()
    checked = verify_tree(str(standby_dir))
    assert checked["verified"] and checked["permissions"] == []


def test_archives_are_written_verified_and_rotated(db, built, refresh, tmp_path):
    archive_dir = tmp_path / "archives"
    archive_dir.mkdir()
    written = []
    for round_ in range(3):
        execute(db, ("UPDATE whatsapp_keys SET value = %s WHERE company_id = 'company00001' AND key_type = 'tctoken'",
                     (json.dumps({"round": round_}),)))
        ok, result = refresh(archive_dir=str(archive_dir), archive_keep=2, archive_every=0)
        assert ok and result["archive"], result.get("msg")
        written.append(result["archive"])
    names = sorted(os.listdir(archive_dir))
    assert len(names) == 4 and all(n.endswith((".jsonl.gz", ".jsonl.gz.sha256")) for n in names)
    assert set(result["archives"]) == set(written[-2:]) or len(result["archives"]) == 2
    newest = result["archive"]
    digest, name = open(newest + ".sha256").read().split()
    assert name == os.path.basename(newest) and hashlib.sha256(open(newest, "rb").read()).hexdigest() == digest
    with gzip.open(newest, "rt", encoding="utf-8") as fh:
        header = json.loads(fh.readline())
        lines = [json.loads(line) for line in fh]
    assert header["kind"] == "baileys-dr-sessions-archive" and header["manifest"]["generation"] == result["generation"]
    assert len(lines) == header["manifest"]["counts"]["files"]
    creds = [line for line in lines if line["company"] == "company00002" and line["name"] == "creds.json"][0]
    assert creds["type"] == "creds" and "id" not in creds
    assert json.loads(creds["content"]) == json.loads((tmp_path / "srv" / "baileys-app" / "baileys_sessions.standby" /
                                                       "company_company00002" / "creds.json").read_text())
    ok, result = refresh(archive_dir=str(archive_dir), archive_keep=2, archive_every=3600)
    assert ok and result["archive"] is None, "not due yet"


def tree_bytes(path):
    """{relative path: bytes} of every file of a tree but its top manifest (which holds times)."""
    found = {}
    for directory, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(directory, name)
            relative = os.path.relpath(full, path)
            if relative != os.path.join(".baileys-dr", "manifest.json"):
                found[relative] = open(full, "rb").read()
    return found


def test_a_refreshed_standby_is_byte_for_byte_what_a_fresh_build_writes(db, built, refresh, standby_dir):
    execute(db,
            "UPDATE whatsapp_keys SET value = value || '{\"longer\": \"by a few bytes\"}' WHERE company_id = 'company00001' "
            "AND key_type = 'session'",
            "UPDATE whatsapp_keys SET value = '{}' WHERE company_id = 'company00002' AND key_type = 'pre-key' AND key_id = '7'",
            "DELETE FROM whatsapp_keys WHERE company_id = 'company00003' AND key_type = 'pre-key' AND key_id IN ('1', '10')",
            "INSERT INTO whatsapp_keys (company_id, key_type, key_id, value) VALUES "
            "('company00003', 'pre-key', '0', '{\"k\": 0}'), ('company00003', 'tctoken', 'zz@s.whatsapp.net', '{\"t\": 1}')",
            "UPDATE whatsapp_auth SET creds = creds || '{\"accountSyncCounter\": 7}' WHERE company_id = 'company00002'")
    ok, first = refresh()
    assert ok and first["companies_refreshed"] == 3 and first["files_deleted"] == 2, first.get("msg")
    execute(db, "UPDATE whatsapp_keys SET value = '{\"v\": 9}' WHERE key_type = 'tctoken'",
            "DELETE FROM whatsapp_auth WHERE company_id = 'company00001'")
    ok, second = refresh()
    assert ok and second["files_deleted"] == 1, second.get("msg")
    fresh = standby_dir.parent / "fresh.standby"
    ok, build = refresh(dest=str(fresh))
    assert ok and build["initial_build"], build.get("msg")
    assert tree_bytes(standby_dir) == tree_bytes(fresh)
    refreshed, built_top = (json.loads((p / ".baileys-dr" / "manifest.json").read_text()) for p in (standby_dir, fresh))
    assert refreshed["companies"] == built_top["companies"] and refreshed["counts"] == built_top["counts"]


def test_a_key_deleted_while_another_takes_its_file_name_keeps_the_new_file(db, built, refresh, standby_dir):
    """fixFileName turns ':' into '-': the new id's file is the deleted id's file, written, never unlinked after."""
    execute(db, "INSERT INTO whatsapp_keys (company_id, key_type, key_id, value) VALUES ('company00001', 'session', 'ab:1.0', '{\"old\": 1}')")
    ok, result = refresh()
    assert ok, result.get("msg")
    execute(db, "DELETE FROM whatsapp_keys WHERE company_id = 'company00001' AND key_id = 'ab:1.0'",
            "INSERT INTO whatsapp_keys (company_id, key_type, key_id, value) VALUES ('company00001', 'session', 'ab-1.0', '{\"new\": 2}')")
    ok, result = refresh()
    assert ok and result["files_written"] == 1 and result["files_deleted"] == 0, result.get("msg")
    assert json.loads((standby_dir / "company_company00001" / "session-ab-1.0.json").read_text()) == {"new": 2}
    assert_verified_equal_to_database(db, standby_dir)


def test_free_space_is_asked_once_per_refresh_and_too_little_is_refused_before_any_change(db, built, refresh, standby_dir, monkeypatch):
    from ansible.module_utils import baileys_dr_files

    calls = []
    real_statvfs = os.statvfs
    monkeypatch.setattr(baileys_dr_files.os, "statvfs", lambda path: calls.append(path) or real_statvfs(path))
    execute(db, "UPDATE whatsapp_keys SET value = '{\"v\": 10}' WHERE key_type = 'session'")
    ok, result = refresh()
    assert ok and result["companies_refreshed"] == 3, result.get("msg")
    assert len(calls) == 1, "one statvfs for the whole run, each company's estimate taken from what it said"
    monkeypatch.setattr(baileys_dr_files, "free_space", lambda path: {"bytes": 4096, "inodes": None, "block": 4096})
    execute(db, "UPDATE whatsapp_keys SET value = '{\"v\": 11}' WHERE key_type = 'session'")
    before = listing(standby_dir.parent)
    ok, result = refresh()
    assert not ok and "not enough free space" in result["msg"]
    assert listing(standby_dir.parent) == before
    assert verify_tree(str(standby_dir))["verified"], "the previous generation is intact"


# -- the deletion guard: a refresh never copies a mass deletion into the standby unasked -------------------------


REFUSED = os.path.join(".baileys-dr", "refresh-refused.json")


@pytest.fixture
def archived(db, refresh, standby_dir, tmp_path):
    """A standby of 3 companies x 150 keys with its first generation archived (archive_keep=1: one more would rotate it out)."""
    testdata.load(db, "standby", 3, 150)
    archive_dir = tmp_path / "archives"
    archive_dir.mkdir()

    def run(**args):
        return refresh(archive_dir=str(archive_dir), archive_keep=1, archive_every=0, **args)
    ok, result = run()
    assert ok and result["initial_build"] and result["archive"], result.get("msg")
    return {"run": run, "archive_dir": archive_dir, "digests": database_digests(db), "archives": sorted(os.listdir(archive_dir))}


def assert_refused_and_unchanged(result, standby_dir, archived, *expected):
    """The refresh failed naming what it would remove, and the copy, its generation and its archives are as they were."""
    assert result.get("failed"), "the refresh must be refused"
    for text in expected:
        assert text in result["msg"], (text, result["msg"])
    assert "Nothing was changed" in result["msg"] and "force=true" in result["msg"]
    checked = verify_tree(str(standby_dir), recompute_digests=True)
    assert checked["verified"] and checked["generation"] == 1, checked["problems"][:5]
    assert checked["digests"] == archived["digests"], "the standby still holds the state before the deletion"
    assert sorted(os.listdir(archived["archive_dir"])) == archived["archives"], "no archive written, none pruned"
    record = json.loads((standby_dir / REFUSED).read_text())
    assert record["kind"] == "baileys-dr-refresh-refused" and record["generation"] == 1 and record["reasons"]
    return record


def test_a_truncated_key_table_does_not_empty_the_standby(db, archived, standby_dir):
    """Observation 1 of issue 15: before the guard, TRUNCATE whatsapp_keys then a refresh gave ok, changed=true,
    files_deleted=450, and the archived empty generation rotated the last good one out."""
    execute(db, "TRUNCATE whatsapp_keys")
    before = listing(standby_dir)
    for _ in range(2):  # every scheduled run refuses again: nothing accumulates, nothing rotates
        ok, result = archived["run"]()
        assert not ok
        assert_refused_and_unchanged(result, standby_dir, archived, str(standby_dir),
                                     "the database has no key at all while the copy holds 450 keys of 3 companies")
    unchanged = lambda found: {k: v for k, v in found.items() if k not in (REFUSED, ".baileys-dr")}  # noqa: E731
    assert REFUSED not in before and unchanged(listing(standby_dir)) == unchanged(before), "not a session file or manifest touched"


def test_a_truncated_auth_table_does_not_remove_every_company(db, archived, standby_dir):
    execute(db, "TRUNCATE whatsapp_keys, whatsapp_auth")
    ok, result = archived["run"]()
    assert not ok
    assert_refused_and_unchanged(result, standby_dir, archived, "the database has no company at all while the copy holds 3 companies")


def test_deleting_most_rows_is_refused_naming_the_counts_and_the_companies(db, archived, standby_dir):
    execute(db, "DELETE FROM whatsapp_keys WHERE company_id IN ('company00002', 'company00003') OR key_type = 'pre-key'")
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM whatsapp_keys")
        left = cur.fetchone()[0]
    db.rollback()
    ok, result = archived["run"]()
    assert not ok
    record = assert_refused_and_unchanged(
        result, standby_dir, archived, "it would delete %d of the copy's 450 keys" % (450 - left), "more than max_delete_share=0.1",
        "every key of 2 companies holding more than max_company_keys_removed=10 keys", "company00002: 150 keys",
        "company00003: 150 keys")
    assert record["counts"]["keys_removed"] == 450 - left and record["counts"]["companies_losing_all_keys"] == 2
    assert [c["company_id"] for c in record["companies"]] == ["company00002", "company00003"]
    assert not any(c["gone"] for c in record["companies"]), "their creds are still there"


def test_a_share_of_keys_over_the_limit_is_refused_even_when_no_company_goes(db, archived, standby_dir):
    execute(db, "DELETE FROM whatsapp_keys WHERE key_type = 'pre-key'")
    ok, result = archived["run"]()
    assert not ok
    record = assert_refused_and_unchanged(result, standby_dir, archived, "more than max_delete_share=0.1")
    assert "max_company_keys_removed" not in result["msg"] and record["counts"]["companies_losing_all_keys"] == 0


def test_a_deletion_within_the_limits_follows_and_reports_what_it_removed(db, archived, standby_dir):
    """A logout (a company of a few keys gone) and consumed pre-keys are ordinary refreshes."""
    testdata.load(db, "small", 1, 8, prefix="small")
    ok, result = archived["run"]()
    assert ok and result["deletion_guard"]["keys_removed"] == 0, result.get("msg")
    execute(db, "DELETE FROM whatsapp_keys WHERE company_id = 'small00001' OR (key_type = 'pre-key' AND key_id IN ('1', '2'))",
            "DELETE FROM whatsapp_auth WHERE company_id = 'small00001'")
    ok, result = archived["run"]()
    assert ok, result.get("msg")
    guard = result["deletion_guard"]
    assert guard["keys_removed"] == 8 + 6 and guard["reasons"] == [] and not guard["refused"] and not guard["overridden"]
    assert result["companies_removed"] == 1 and not (standby_dir / REFUSED).exists()
    assert_verified_equal_to_database(db, standby_dir)


@pytest.fixture
def warnings(monkeypatch):
    from ansible.module_utils import basic

    seen = []
    monkeypatch.setattr(basic.AnsibleModule, "warn", lambda self, msg, **kwargs: seen.append(msg))
    return seen


def test_force_accepts_the_deletion_for_one_run_and_clears_the_refusal(db, archived, standby_dir, warnings):
    execute(db, "DELETE FROM whatsapp_keys WHERE company_id = 'company00002'")
    ok, result = archived["run"]()
    assert not ok and (standby_dir / REFUSED).exists()
    ok, result = archived["run"](force=True)
    assert ok and result["changed"] and result["generation"] == 2, result.get("msg")
    assert result["deletion_guard"]["overridden"] and result["deletion_guard"]["keys_removed"] == 150
    assert any("force=true overrode the deletion guard" in w and "company00002: 150 keys" in w for w in warnings), warnings
    assert not (standby_dir / REFUSED).exists(), "a good refresh removes the refusal record"
    assert_verified_equal_to_database(db, standby_dir)
    ok, result = archived["run"]()
    assert ok and result["deletion_guard"]["reasons"] == [], "the next run compares with the accepted state"


def test_the_limits_are_options(db, archived, standby_dir):
    execute(db, "DELETE FROM whatsapp_keys WHERE company_id = 'company00002'")
    ok, result = archived["run"](max_delete_share=0.5, max_company_keys_removed=150)
    assert ok and not result["deletion_guard"]["overridden"] and result["deletion_guard"]["reasons"] == [], result.get("msg")


@pytest.mark.parametrize("args, named", [({"max_delete_share": 1.5}, "max_delete_share"),
                                          ({"max_delete_share": -0.1}, "max_delete_share"),
                                          ({"max_company_keys_removed": -1}, "max_company_keys_removed")])
def test_limits_out_of_range_are_refused_naming_the_option(db, archived, args, named):
    ok, result = archived["run"](**args)
    assert not ok and named in result["msg"]


def test_check_mode_reports_the_refusal_and_records_nothing(db, archived, standby_dir):
    execute(db, "TRUNCATE whatsapp_keys")
    before = listing(standby_dir.parent)
    ok, result = archived["run"](check_mode=True)
    assert not ok and "no key at all" in result["msg"] and "check mode: nothing recorded" in result["msg"]
    assert listing(standby_dir.parent) == before


def test_the_failover_passes_refuse_a_mass_deletion_with_the_switch_engines_defaults(db, db_params, archived, standby_dir):
    """baileys_store_switch runs this refresh as its final copy with engine_params(auth_export_argument_spec(), ...):
    the guard's defaults come with the spec, so a failover after a mass deletion does not copy it either."""
    from ansible.module_utils.baileys_dr_postgres import connect
    from ansible.module_utils.baileys_dr_auth_export import auth_export_argument_spec, export_tree
    from ansible.module_utils.baileys_dr_tree import RefreshRefused
    from ansible.module_utils.baileys_dr_switch_parts import engine_params

    params = engine_params(auth_export_argument_spec(), mode="standby", dest=str(standby_dir), return_digests=True,
                           lock_timeout=60, **db_params)
    assert params["max_delete_share"] == 0.1 and params["max_company_keys_removed"] == 10 and params["force"] is False
    execute(db, "DELETE FROM whatsapp_keys WHERE key_type <> 'session'")
    with pytest.raises(RefreshRefused, match="refusing to refresh the standby copy"):
        export_tree(params, lambda: connect(params), "test", None, False)
    assert verify_tree(str(standby_dir), recompute_digests=True)["digests"] == archived["digests"]


def test_health_reports_a_refused_refresh_as_critical_until_the_next_good_one(db, db_params, archived, standby_dir):
    import baileys_db_health

    def health():
        ok, result = run_module(baileys_db_health, dict(db_params, standby_dir=str(standby_dir), probes=1))
        assert ok, result.get("msg")
        return result["checks"]["standby_refresh"], result["status"]

    check, _ = health()
    assert check["status"] == "healthy" and check["value"] == 0 and "generation 1" in check["message"]
    execute(db, "CREATE TEMP TABLE saved AS SELECT * FROM whatsapp_keys WHERE company_id = 'company00001'",
            "DELETE FROM whatsapp_keys WHERE company_id = 'company00001'")
    ok, _ = archived["run"]()
    assert not ok
    before = listing(standby_dir)
    check, status = health()
    assert status == "critical" and check["status"] == "critical" and check["value"] == 1
    assert "refused" in check["message"] and "company00001: 150 keys" in check["message"] and "generation 1" in check["message"]
    assert listing(standby_dir) == before, "health only reads"
    execute(db, "INSERT INTO whatsapp_keys SELECT * FROM saved", "DROP TABLE saved")  # the rows are restored
    ok, result = archived["run"]()
    assert ok, result.get("msg")
    check, _ = health()
    assert check["status"] == "healthy" and not (standby_dir / REFUSED).exists()
