"""baileys_auth_export, mode=live, against the throwaway PostgreSQL cluster."""

from __future__ import annotations

import json
import os
import stat
import threading
import time

import pytest

import baileys_auth_export
from faults_helpers import refuse_worker_connections, wait_until
from module_harness import run_module

from ansible.module_utils import baileys_dr_testdata as testdata
from ansible.module_utils.baileys_dr_verify import verify_tree
from ansible.module_utils.baileys_dr_store import company_digest, list_companies

ODD_KEYS = [
    # (company, type, id, value): ids Baileys' fixFileName mangles, both Buffer encodings, unicode
    ("company00001", "app-state-sync-key", "AAb/cd+e==", {"keyData": "AQID", "timestamp": "1700000000001",
                                                         "fingerprint": {"rawId": 1, "currentIndex": 0, "deviceIndexes": [0]}}),
    ("company00001", "sender-key", "120363025814453019@g.us::491710600547::3", [{"senderKeyId": 1, "senderChainKey": {
        "iteration": 0, "seed": {"type": "Buffer", "data": [1, 2, 3]}}, "senderSigningKey": {"public": {"type": "Buffer", "data": "AQID"}},
        "senderMessageKeys": []}]),
    ("company00001", "session", "../../etc/passwd.0", {"_sessions": {}, "version": "v1"}),
    ("company00001", "tctoken", "Ünïcødé \"quoted\" ✓@s.whatsapp.net", {"token": {"type": "Buffer", "data": [255, 0]}}),
    ("company00002", "lid-mapping", "123456789012345_reverse", "4917600000000"),
    ("company00002", "identity-key", "4917600000000.1", {"type": "Buffer", "data": list(range(33))}),
    ("company00002", "device-list", "4917600000000", ["0", "12"]),
]


def insert_keys(db, rows):
    with db.cursor() as cur:
        for company_id, key_type, key_id, value in rows:
            cur.execute("INSERT INTO whatsapp_keys (company_id, key_type, key_id, value) VALUES (%s, %s, %s, %s)",
                        (company_id, key_type, key_id, json.dumps(value)))
    db.commit()


def database_digests(db):
    digests = {company: company_digest(db, company)[0] for company in list_companies(db)}
    db.rollback()
    return digests


def listing(path):
    """Every path below path (names, types, sizes, mtimes) for before/after comparisons."""
    found = {}
    for directory, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(directory, name)
            info = os.lstat(full)
            found[os.path.relpath(full, path)] = (stat.S_IFMT(info.st_mode), info.st_size, info.st_mtime_ns)
    return found


@pytest.fixture
def app_root(tmp_path):
    root = tmp_path / "srv" / "baileys-app"
    root.mkdir(parents=True)
    return root


@pytest.fixture
def export(db_params, app_root):
    def run(check_mode=False, **args):
        params = dict(db_params, dest=str(app_root / "baileys_sessions"))
        params.update(args)
        return run_module(baileys_auth_export, params, check_mode=check_mode)
    return run


def test_export_of_every_key_type_verifies_with_the_databases_digests(db, export, app_root):
    testdata.load(db, "export", 3, 200)
    insert_keys(db, ODD_KEYS)
    ok, result = export()
    assert ok, result.get("msg")
    assert result["changed"] and result["companies"] == 3 and result["keys"] == 600 + len(ODD_KEYS)
    assert result["files"] == 603 + len(ODD_KEYS) and result["backup"] is None
    expected = database_digests(db)
    assert result["digests"] == expected
    checked = verify_tree(str(app_root / "baileys_sessions"), recompute_digests=True)
    assert checked["verified"], checked["problems"][:5]
    assert checked["digests"] == expected and checked["counts"]["keys"] == 600 + len(ODD_KEYS)
    company = app_root / "baileys_sessions" / "company_company00001"
    assert (company / "app-state-sync-key-AAb__cd+e==.json").is_file()
    assert (company / "sender-key-120363025814453019@g.us--491710600547--3.json").is_file()
    assert (company / "session-..__..__etc__passwd.0.json").is_file()
    for path in company.iterdir():
        text = path.read_text()
        assert '"data":[' not in text, "%s holds a byte-array Buffer, unreadable by Baileys >= 7.0.0-rc.4" % path.name
        assert ": " not in text or path.name.startswith("tctoken"), "compact JSON"
    manifest = json.loads((app_root / "baileys_sessions" / ".baileys-dr" / "companies" / "company00001.json").read_text())
    assert manifest["files"]["app-state-sync-key-AAb__cd+e==.json"]["id"] == "AAb/cd+e=="
    assert json.loads((company / "app-state-sync-key-AAb__cd+e==.json").read_text())["keyData"] == "AQID", "as stored"


def test_the_manifest_records_the_source_snapshot(db, db_params, export, app_root):
    testdata.load(db, "export", 1, 20)
    ok, result = export()
    with db.cursor() as cur:
        cur.execute("SELECT system_identifier::text FROM pg_control_system()")
        system_identifier = cur.fetchone()[0]
    db.rollback()
    top = json.loads((app_root / "baileys_sessions" / ".baileys-dr" / "manifest.json").read_text())
    assert top["format"] == 1 and top["kind"] == "baileys-dr-sessions" and top["generation"] == 1
    assert top["source"]["kind"] == "postgres" and top["source"]["system_identifier"] == system_identifier
    assert top["source"]["target"] == "127.0.0.1:%d/baileys" % db_params["login_port"]
    assert top["source"]["snapshot_at"] == result["snapshot_at"] and result["system_identifier"] == system_identifier
    assert top["counts"] == {"companies": 1, "keys": 20, "files": 21}
    company = top["companies"]["company00001"]
    data = (app_root / "baileys_sessions" / ".baileys-dr" / "companies" / "company00001.json").read_bytes()
    import hashlib
    assert company["manifest_sha256"] == hashlib.sha256(data).hexdigest()
    assert any("pg_control_system" in q for q in result["queries"]) and all("%s" not in q or "company_id" in q for q in result["queries"])
    assert db_params["login_password"] not in json.dumps(result)


def test_a_second_export_without_change_writes_nothing(db, export, app_root):
    testdata.load(db, "export", 2, 50)
    export()
    before = listing(app_root)
    ok, result = export()
    assert ok and result["changed"] is False and result["differs"] is False
    assert result["digests"] == database_digests(db)
    assert listing(app_root) == before


def test_an_export_after_a_change_swaps_the_tree_and_keeps_the_old_one(db, export, app_root):
    testdata.load(db, "export", 2, 50)
    export()
    with db.cursor() as cur:
        cur.execute("UPDATE whatsapp_keys SET value = '{\"changed\": true}' WHERE company_id = 'company00002' AND key_type = 'session'")
    db.commit()
    ok, result = export()
    assert ok and result["changed"] and result["generation"] == 2
    backup = result["backup"]
    assert os.path.basename(backup).startswith("baileys_sessions.before-") and os.path.dirname(backup) == str(app_root)
    old = json.loads(open(os.path.join(backup, ".baileys-dr", "manifest.json")).read())
    assert old["generation"] == 1
    assert result["digests"] == database_digests(db)
    ok, result = export(force=True, keep_backup=False)
    assert ok and result["backup"] is None
    assert sorted(p.name for p in app_root.iterdir()) == ["baileys_sessions", os.path.basename(backup)]


def test_files_of_an_earlier_export_disappear(db, export, app_root):
    testdata.load(db, "export", 2, 30)
    export()
    sessions = app_root / "baileys_sessions"
    (sessions / "company_company00001" / "pre-key-planted.json").write_text("{}")
    with db.cursor() as cur:
        cur.execute("DELETE FROM whatsapp_keys WHERE company_id = 'company00001' AND key_type = 'pre-key' AND key_id = '1'")
        cur.execute("DELETE FROM whatsapp_keys WHERE company_id = 'company00002'")
        cur.execute("DELETE FROM whatsapp_auth WHERE company_id = 'company00002'")
    db.commit()
    ok, result = export(keep_backup=False)
    assert ok and result["changed"] and result["companies"] == 1
    assert not (sessions / "company_company00001" / "pre-key-planted.json").exists()
    assert not (sessions / "company_company00001" / "pre-key-1.json").exists()
    assert not (sessions / "company_company00002").exists()
    assert verify_tree(str(sessions))["verified"]


# -- a tree the service wrote into (it ran on the files) under an unchanged database -------------------------


@pytest.fixture
def warnings(monkeypatch):
    from ansible.module_utils import basic

    seen = []
    monkeypatch.setattr(basic.AnsibleModule, "warn", lambda self, msg, **kwargs: seen.append(msg))
    return seen


def service_writes(company):
    """What Baileys does while the service runs on the files: creates a key file, rewrites one in place (plain
    writeFile: same inode, same size here, new content, new mtime), deletes one (a consumed pre-key)."""
    keys = sorted(p.name for p in company.iterdir() if p.name.startswith("pre-key-"))
    rewritten, deleted = keys[0], keys[1]
    path = company / rewritten
    data = path.read_bytes()
    at = data.index(b'"data":"') + len(b'"data":"')
    inode = path.stat().st_ino
    with open(path, "r+b") as fh:
        fh.write(data[:at] + (b"B" if data[at:at + 1] == b"A" else b"A") + data[at + 1:])
    assert path.stat().st_ino == inode and path.stat().st_size == len(data)
    (company / deleted).unlink()
    (company / "session-1.2.json").write_text('{"_sessions":{},"version":"v1"}')
    return {"added": ["session-1.2.json"], "changed": [rewritten], "deleted": [deleted]}


def test_a_tree_the_service_changed_is_written_anew_under_an_unchanged_database_and_kept(db, export, app_root, warnings):
    testdata.load(db, "export", 2, 30)
    assert export()[0]
    sessions = app_root / "baileys_sessions"
    expected = service_writes(sessions / "company_company00001")
    before = listing(app_root)
    ok, checked = export(check_mode=True)
    assert ok and checked["changed"] and checked["differs"] is False, "the database did not change: the tree did"
    assert listing(app_root) == before and warnings == [], "check mode writes nothing"
    ok, result = export(keep_backup=False)
    assert ok and result["changed"] and result["differs"] is False and result["generation"] == 2
    for run in (checked, result):
        drift = run["replaced_drift"]
        assert (drift["added"], drift["changed"], drift["deleted"]) == (1, 1, 1) and not drift["clean"]
        assert {kind: drift["companies"]["company00001"][kind] for kind in expected} == expected
        assert run["rewrite_reason"] == (
            "the service changed the tree since its manifest: 1 file added (company_company00001/%s), "
            "1 changed (company_company00001/%s), 1 deleted (company_company00001/%s)"
            % (expected["added"][0], expected["changed"][0], expected["deleted"][0]))
    kept = result["backup"]
    assert kept and (app_root / kept / "company_company00001" / "session-1.2.json").is_file(), \
        "a tree the service wrote into is kept, keep_backup=false or not"
    assert warnings == ["the replaced tree held 2 files the service wrote that the database never received "
                        "(1 added, 1 changed, and 1 deleted by it; kept in %s)" % kept]
    assert not (sessions / "company_company00001" / "session-1.2.json").exists()
    checked = verify_tree(str(sessions), recompute_digests=True)
    assert checked["verified"] and checked["digests"] == database_digests(db) == result["digests"]
    ok, again = export()
    assert ok and again["changed"] is False, "the tree written anew is what its manifest lists"


def test_a_database_change_and_a_tree_change_are_both_named(db, export, app_root, warnings):
    testdata.load(db, "export", 2, 30)
    assert export()[0]
    service_writes(app_root / "baileys_sessions" / "company_company00002")
    with db.cursor() as cur:
        cur.execute("UPDATE whatsapp_keys SET value = '{\"changed\": true}' WHERE company_id = 'company00001' AND key_type = 'session'")
    db.commit()
    ok, result = export()
    assert ok and result["changed"] and result["differs"] is True
    assert result["rewrite_reason"].startswith("the database differs from the manifest of dest; the service changed the tree")
    assert "company_company00002/session-1.2.json" in result["rewrite_reason"]
    assert result["replaced_drift"]["added"] == 1 and len(warnings) == 1 and result["backup"] in warnings[0]


def test_a_clean_replaced_tree_is_dropped_without_keep_backup_and_reported_clean(db, export, app_root, warnings):
    testdata.load(db, "export", 1, 10)
    assert export()[0]
    ok, result = export(force=True, keep_backup=False)
    assert ok and result["backup"] is None and result["replaced_drift"]["clean"] and warnings == []
    assert result["rewrite_reason"] == "force"
    assert sorted(p.name for p in app_root.iterdir()) == ["baileys_sessions"]


def test_check_mode_reports_what_would_be_written_and_writes_nothing(db, export, app_root):
    testdata.load(db, "export", 2, 40)
    before = listing(app_root)
    ok, result = export(check_mode=True)
    assert ok and result["changed"] and result["differs"]
    assert result["would_write"]["files"] == 82 and result["would_write"]["estimated_bytes"] > 0
    assert result["digests"] == database_digests(db)
    assert listing(app_root) == before
    export()
    before = listing(app_root)
    with db.cursor() as cur:
        cur.execute("UPDATE whatsapp_auth SET creds = creds || '{\"accountSyncCounter\": 99}' WHERE company_id = 'company00001'")
    db.commit()
    ok, result = export(check_mode=True)
    assert ok and result["changed"] and result["changed_companies"] == ["company00001"]
    assert listing(app_root) == before


def test_files_are_0600_directories_0700_and_owned_as_asked(db, export, app_root):
    testdata.load(db, "export", 1, 20)
    owner = {} if os.geteuid() != 0 else {"owner": "nobody", "group": "nogroup" if _has_group("nogroup") else "nobody"}
    ok, result = export(**owner)
    assert ok, result.get("msg")
    for directory, dirs, files in os.walk(app_root / "baileys_sessions"):
        assert stat.S_IMODE(os.lstat(directory).st_mode) == 0o700
        for name in files:
            info = os.lstat(os.path.join(directory, name))
            assert stat.S_IMODE(info.st_mode) == 0o600, name
            if owner:
                import pwd
                assert info.st_uid == pwd.getpwnam("nobody").pw_uid


def _has_group(name):
    import grp
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def test_a_companies_filter_exports_only_those_companies(db, export, app_root):
    testdata.load(db, "export", 3, 20)
    ok, result = export(companies=["company00002"])
    assert ok and result["companies"] == 1 and list(result["digests"]) == ["company00002"]
    assert sorted(p.name for p in (app_root / "baileys_sessions").iterdir()) == [".baileys-dr", "company_company00002"]


# -- hostile input: refused, named, nothing written or swapped, nothing outside touched -----------------


@pytest.fixture
def exported_once(db, export, app_root):
    testdata.load(db, "export", 2, 20)
    ok, _ = export()
    assert ok
    return listing(app_root)


def refused(export, app_root, before, *expected, **args):
    ok, result = export(**args)
    assert not ok, "the export must be refused"
    for text in expected:
        assert text in result["msg"], (text, result["msg"])
    assert listing(app_root) == before, "nothing may be written, swapped or left behind"
    return result["msg"]


@pytest.mark.parametrize("company_id", ["../evil", "bad id", "x" * 51])
def test_a_hostile_company_id_is_refused(db, export, app_root, exported_once, company_id):
    with db.cursor() as cur:
        cur.execute("INSERT INTO whatsapp_auth (company_id, creds) VALUES (%s, '{}')", (company_id,))
    db.commit()
    refused(export, app_root, exported_once, repr(company_id))


def test_an_unknown_key_type_is_refused_or_skipped_on_request(db, export, app_root, exported_once):
    insert_keys(db, [("company00001", "evil-type", "k1", {"a": 1})])
    refused(export, app_root, exported_once, "'evil-type'", "company00001", "'k1'")
    ok, result = export(unknown_types="skip")
    assert ok and result["changed"] is False and result["skipped_keys"] == 1, "what can be exported is already there"
    ok, result = export(unknown_types="skip", force=True)
    assert ok and result["changed"] and result["skipped_keys"] == 1 and result["skipped_types"] == ["evil-type"]
    assert not any("evil" in p.name for p in (app_root / "baileys_sessions" / "company_company00001").iterdir())


@pytest.mark.parametrize("key_id", ["a\nb", "a\rb", "\x1b[2J", "c1\x85"])
def test_a_key_id_with_control_characters_is_refused(db, export, app_root, exported_once, key_id):
    insert_keys(db, [("company00002", "session", key_id, {})])
    msg = refused(export, app_root, exported_once, "company00002", "session", repr(key_id))
    assert "\n" not in msg and "\x1b" not in msg


@pytest.mark.parametrize("key_id", [".", ".."])
def test_a_dot_key_id_is_refused(db, export, app_root, exported_once, key_id):
    insert_keys(db, [("company00001", "pre-key", key_id, {})])
    refused(export, app_root, exported_once, "company00001", repr(key_id))


def test_a_key_id_giving_a_file_name_over_255_bytes_is_refused(db, export, app_root, exported_once):
    insert_keys(db, [("company00001", "session", "ü" * 130, {})])
    refused(export, app_root, exported_once, "company00001", "bytes")


def test_two_ids_becoming_one_file_are_refused_naming_both(db, export, app_root, exported_once):
    insert_keys(db, [("company00002", "session", "4917:1.0", {"a": 1}), ("company00002", "session", "4917-1.0", {"a": 2})])
    refused(export, app_root, exported_once, "company00002", "session", "'4917:1.0'", "'4917-1.0'")


def test_a_symbolic_link_as_dest_is_refused(db, export, app_root, tmp_path):
    testdata.load(db, "export", 1, 5)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, app_root / "baileys_sessions")
    ok, result = export()
    assert not ok and "symbolic link" in result["msg"]
    assert list(elsewhere.iterdir()) == []


def test_symbolic_links_inside_the_old_tree_are_never_followed(db, export, app_root, tmp_path):
    testdata.load(db, "export", 1, 5)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "creds.json").write_text("precious")
    sessions = app_root / "baileys_sessions"
    sessions.mkdir()
    os.symlink(outside, sessions / "company_company00001")
    ok, result = export(keep_backup=False, replace_foreign=True)  # a tree without a manifest: only replaced when asked
    assert ok, result.get("msg")
    assert (outside / "creds.json").read_text() == "precious" and sorted(os.listdir(outside)) == ["creds.json"]
    assert not (sessions / "company_company00001").is_symlink()


def test_not_enough_free_space_is_refused_before_writing(db, export, app_root):
    testdata.load(db, "export", 1, 20)
    ok, result = export(space_margin=1e12)
    assert not ok and "not enough free space" in result["msg"]
    assert list(app_root.iterdir()) == []


def test_a_wrong_password_is_never_shown(db, export, app_root, db_params):
    ok, result = export(login_password="s3cret-not-the-password")
    assert not ok and "s3cret-not-the-password" not in json.dumps(result)


def test_a_failure_before_the_swap_leaves_the_live_tree_and_no_staging(db, export, app_root, exported_once, monkeypatch):
    with db.cursor() as cur:
        cur.execute("UPDATE whatsapp_keys SET value = '{}' WHERE company_id = 'company00001'")
    db.commit()
    monkeypatch.setenv("BAILEYS_DR_TEST_FAIL_AT", "before_swap")
    refused(export, app_root, exported_once, "before_swap")


def test_the_export_is_one_consistent_snapshot(db, db_params, export, app_root, monkeypatch):
    """Rows changed while the export runs (paused after the first company) are not in it."""
    testdata.load(db, "snap", 3, 30)
    expected = database_digests(db)
    monkeypatch.setenv("BAILEYS_DR_TEST_PAUSE_AT", "after_company:1")
    monkeypatch.setenv("BAILEYS_DR_TEST_PAUSE_SECONDS", "4")
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(result=export()))
    worker.start()
    # The first company staged means the snapshot is taken; the export then holds at its pause.
    wait_until(lambda: staged(app_root, "company00001"), what="the first company in the staging tree")
    assert worker.is_alive(), "the export is still paused after its first company"
    with db.cursor() as cur:
        cur.execute("UPDATE whatsapp_keys SET value = '{\"late\": 1}' WHERE company_id IN ('company00002', 'company00003')")
        cur.execute("DELETE FROM whatsapp_auth WHERE company_id = 'company00003'")
    db.commit()
    worker.join(60)
    ok, result = outcome["result"]
    assert ok and result["digests"] == expected
    assert verify_tree(str(app_root / "baileys_sessions"), recompute_digests=True)["digests"] == expected


# -- worker processes (a large full export is shared among them) ------------------------------------------------


@pytest.fixture
def parallel(monkeypatch):
    """Any export with 2 companies uses 2 workers (the real threshold is 20,000 keys)."""
    from ansible.module_utils import baileys_dr_export

    monkeypatch.setattr(baileys_dr_export, "PARALLEL_MIN_KEYS", 0)
    monkeypatch.setattr(baileys_dr_export, "export_workers", lambda: 2)
    return baileys_dr_export


def tree_bytes(path):
    """{relative path: bytes} of every file below path, the top manifest left out (it holds times)."""
    found = {}
    for directory, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(directory, name)
            if os.path.relpath(full, path) != os.path.join(".baileys-dr", "manifest.json"):
                with open(full, "rb") as fh:
                    found[os.path.relpath(full, path)] = fh.read()
    return found


def staged(app_root, company_id):
    """Whether the export wrote this company's creds.json into its staging tree (a sibling .<dest>.staging-<hex>)."""
    return any(os.path.basename(directory) == "company_" + company_id and "creds.json" in files and ".staging-" in directory
               for directory, _dirs, files in os.walk(str(app_root)))


def worker_processes():
    """Children of this process that are forks of it (live or not yet reaped)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():
            try:
                same = os.path.realpath("/proc/%s/exe" % entry) == os.path.realpath("/proc/self/exe")
            except OSError:
                same = False
            if same or fields[0] == "Z":
                found.append(int(entry))
    return found


def test_an_export_shared_among_workers_writes_the_tree_one_process_writes(db, export, app_root, tmp_path, parallel):
    testdata.load(db, "workers", 5, 60)
    insert_keys(db, ODD_KEYS)
    ok, result = export()
    assert ok, result.get("msg")
    assert result["workers"] == 2 and result["keys"] == 300 + len(ODD_KEYS) and result["files"] == 305 + len(ODD_KEYS)
    expected = database_digests(db)
    assert result["digests"] == expected
    checked = verify_tree(str(app_root / "baileys_sessions"), recompute_digests=True)
    assert checked["verified"] and checked["digests"] == expected, checked["problems"][:5]
    assert any("SET TRANSACTION SNAPSHOT" in q for q in result["queries"]) and any("key_id COLLATE" in q for q in result["queries"])

    parallel.PARALLEL_MIN_KEYS = 10 ** 9
    alone = tmp_path / "alone" / "baileys_sessions"
    alone.parent.mkdir()
    ok, single = export(dest=str(alone))
    assert ok and single["workers"] == 0 and single["digests"] == expected
    assert tree_bytes(alone) == tree_bytes(app_root / "baileys_sessions"), "same files, same manifests"
    tops = [json.loads((root / ".baileys-dr" / "manifest.json").read_text()) for root in (alone, app_root / "baileys_sessions")]
    assert list(tops[0]["companies"].items()) == list(tops[1]["companies"].items()) and tops[0]["counts"] == tops[1]["counts"]
    assert worker_processes() == []


def test_a_standby_build_is_shared_among_workers_too(db, export, app_root, parallel):
    testdata.load(db, "workers", 3, 40)
    ok, result = export(mode="standby")
    assert ok and result["initial_build"] and result["workers"] == 2, result.get("msg")
    checked = verify_tree(str(app_root / "baileys_sessions"), recompute_digests=True)
    assert checked["verified"] and checked["digests"] == database_digests(db) == result["digests"]
    with db.cursor() as cur:
        cur.execute("UPDATE whatsapp_keys SET value = '{\"v\": 1}' WHERE company_id = 'company00002' AND key_type = 'session'")
    db.commit()
    ok, refreshed = export(mode="standby")
    assert ok and not refreshed["initial_build"] and refreshed["digests"] == database_digests(db), refreshed.get("msg")


def test_a_failing_worker_fails_the_export_leaving_the_live_tree_no_staging_and_no_worker(db, export, app_root, exported_once,
                                                                                         parallel, monkeypatch):
    with db.cursor() as cur:
        cur.execute("UPDATE whatsapp_keys SET value = '{}' WHERE company_id = 'company00002'")
    db.commit()
    monkeypatch.setenv("BAILEYS_DR_TEST_FAIL_AT", "after_company:2")
    refused(export, app_root, exported_once, "fault injected at after_company:2")
    assert worker_processes() == []


def test_a_killed_worker_fails_the_export_leaving_the_live_tree_and_no_staging(db, export, app_root, exported_once, parallel,
                                                                              monkeypatch):
    with db.cursor() as cur:
        cur.execute("UPDATE whatsapp_keys SET value = '{}' WHERE company_id = 'company00001'")
    db.commit()
    monkeypatch.setenv("BAILEYS_DR_TEST_PAUSE_AT", "after_company:1")
    monkeypatch.setenv("BAILEYS_DR_TEST_PAUSE_SECONDS", "30")
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(result=export()))
    runner.start()
    # Killed before they attach, the workers would only make the module export alone (as at max_connections): wait
    # until one has staged the first company (both attached, the map running) and holds at its pause.
    wait_until(lambda: staged(app_root, "company00001") and len(worker_processes()) >= 2, what="both workers exporting")
    started = time.monotonic()
    for pid in worker_processes():
        os.kill(pid, 9)
    runner.join(25)
    assert not runner.is_alive() and time.monotonic() - started < 10, "the module noticed the dead worker"
    ok, result = outcome["result"]
    assert not ok and "export worker" in result["msg"] and "ended" in result["msg"], result["msg"]
    assert listing(app_root) == exported_once, "the live tree is untouched, the staging directory removed"
    assert worker_processes() == []


def test_workers_without_a_connection_leave_the_export_to_the_module(db, export, app_root, parallel, monkeypatch):
    """A server at max_connections: the workers cannot connect, the module exports alone."""
    testdata.load(db, "workers", 3, 20)
    refuse_worker_connections(monkeypatch, baileys_auth_export)
    ok, result = export()
    assert ok and result["workers"] == 0 and result["digests"] == database_digests(db), result.get("msg")
    assert worker_processes() == []


# -- a destination that is not a sessions tree: refused, unless asked ------------------------------------------------


def make_foreign(path):
    """An application directory given as dest by mistake: no .baileys-dr/manifest.json."""
    (path / "src").mkdir(parents=True)
    (path / "index.js").write_text("module.exports = require('./src');\n")
    (path / "src" / "data.txt").write_text("precious\n")


@pytest.mark.parametrize("mode", ["live", "standby"])
def test_an_export_over_a_directory_that_is_not_a_sessions_tree_is_refused_and_leaves_it_untouched(db, export, app_root, mode):
    """Observation 3 of issue 15: dest holding index.js and src/data.txt, no manifest, keep_backup=false. Before the check
    the export answered ok, changed=true, and dest was replaced by a sessions tree (index.js and src/ gone from dest; the
    issue saw them deleted, the drift check since moved them aside as baileys_sessions.before-<time>)."""
    testdata.load(db, "export", 1, 5)
    dest = app_root / "baileys_sessions"
    make_foreign(dest)
    before = listing(app_root)
    for check_mode in (True, False):
        ok, result = export(check_mode=check_mode, mode=mode, keep_backup=False)
        assert not ok, "a directory that is not ours is never replaced unasked"
        assert str(dest) in result["msg"] and "not a baileys-dr sessions tree" in result["msg"], result["msg"]
        assert "index.js" in result["msg"] and "src" in result["msg"] and "replace_foreign=true" in result["msg"]
        assert listing(app_root) == before, "nothing moved, written or deleted, no staging left"


def test_replace_foreign_replaces_it_and_keeps_what_was_there(db, export, app_root, warnings):
    testdata.load(db, "export", 1, 5)
    dest = app_root / "baileys_sessions"
    make_foreign(dest)
    ok, result = export(keep_backup=False, replace_foreign=True)
    assert ok and result["changed"], result.get("msg")
    backup = result["backup"]
    assert backup and open(os.path.join(backup, "src", "data.txt")).read() == "precious\n", "kept whatever keep_backup says"
    assert verify_tree(str(dest))["verified"]
    assert warnings, "the module warns that the replaced tree was kept"


def test_an_empty_directory_or_a_tree_of_ours_is_no_foreign_tree(db, export, app_root):
    testdata.load(db, "export", 1, 5)
    dest = app_root / "baileys_sessions"
    dest.mkdir()
    ok, result = export()
    assert ok and result["changed"], result.get("msg")
    (dest / ".baileys-dr" / "manifest.json").write_text("{not json")  # ours, damaged: replaced (and kept)
    ok, result = export()
    assert ok and result["changed"] and "unusable" in result["reason"], result.get("msg")


# -- a value that cannot be read or written: refused naming its row ---------------------------------------------------


DEEP = "[" * 3000 + "]" * 3000  # PostgreSQL's JSONB takes it; Python's JSON parser stops at its recursion limit


@pytest.mark.parametrize("where, named", [
    ("UPDATE whatsapp_keys SET value = %s::jsonb WHERE company_id = 'company00002' AND key_type = 'session' "
     "AND key_id = (SELECT min(key_id) FROM whatsapp_keys WHERE company_id = 'company00002' AND key_type = 'session')",
     ("company company00002, session key id '",)),
    ("UPDATE whatsapp_auth SET creds = %s::jsonb WHERE company_id = 'company00001'", ("company company00001, creds:",)),
])
@pytest.mark.parametrize("workers", [False, True])
def test_a_value_nested_too_deeply_is_refused_naming_its_row_and_nothing_is_swapped_in(db, export, app_root, exported_once,
                                                                                    where, named, workers, monkeypatch):
    """Observation 4 of issue 15: a session value of 3,000 nested arrays. Before, the export crashed with a traceback
    ("maximum recursion depth exceeded while decoding a JSON array") that named no row."""
    if workers:
        from ansible.module_utils import baileys_dr_export

        monkeypatch.setattr(baileys_dr_export, "PARALLEL_MIN_KEYS", 0)
        monkeypatch.setattr(baileys_dr_export, "export_workers", lambda: 2)
    with db.cursor() as cur:
        cur.execute(where, (DEEP,))
    db.commit()
    message = refused(export, app_root, exported_once, *named, "nested too deeply", "refusing to export it")
    assert "Traceback" not in message and len(message) < 1000
    assert worker_processes() == []


def test_a_value_nested_too_deeply_is_named_by_a_standby_build_and_refresh_which_leave_the_copy_as_it_was(db, export, app_root):
    testdata.load(db, "export", 2, 20)
    standby = app_root / "baileys_sessions.standby"
    insert_keys(db, [("company00002", "session", "deep.0", 0)])
    with db.cursor() as cur:
        cur.execute("UPDATE whatsapp_keys SET value = %s::jsonb WHERE key_id = 'deep.0'", (DEEP,))
    db.commit()
    ok, result = export(mode="standby", dest=str(standby))
    assert not ok and "company company00002, session key id 'deep.0': the value is nested too deeply" in result["msg"], result["msg"]
    assert list(app_root.iterdir()) == [], "no standby, no staging"
    with db.cursor() as cur:
        cur.execute("UPDATE whatsapp_keys SET value = '[1]' WHERE key_id = 'deep.0'")
    db.commit()
    ok, result = export(mode="standby", dest=str(standby))
    assert ok, result.get("msg")
    before = listing(app_root)
    with db.cursor() as cur:
        cur.execute("UPDATE whatsapp_keys SET value = %s::jsonb WHERE key_id = 'deep.0'", (DEEP,))
    db.commit()
    ok, result = export(mode="standby", dest=str(standby))
    assert not ok and "session key id 'deep.0'" in result["msg"] and "nested too deeply" in result["msg"], result["msg"]
    assert listing(app_root) == before, "the refresh stopped before it changed the company (or anything else)"
    assert verify_tree(str(standby))["verified"]

