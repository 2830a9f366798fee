"""baileys_auth_import (failback: files -> PostgreSQL, and its undo) against the throwaway PostgreSQL cluster."""

from __future__ import annotations

import datetime
import gzip
import hashlib
import json
import os
import shutil
import threading
import time

import pytest

import baileys_auth_export
import baileys_auth_import
from faults_helpers import wait_until
from module_harness import run_module

from ansible.module_utils import baileys_dr_codec as codec
from ansible.module_utils import baileys_dr_testdata as testdata
from ansible.module_utils.baileys_dr_tree import file_content
from ansible.module_utils.baileys_dr_store import company_digest, list_companies

# Ids fixFileName mangles (known to the manifest), both Buffer encodings, unicode.
ODD_KEYS = [
    ("company00001", "app-state-sync-key", "AAb/cd+e==", {"keyData": "AQID", "timestamp": "1700000000001",
                                                         "fingerprint": {"rawId": 1, "currentIndex": 0, "deviceIndexes": [0]}}),
    ("company00001", "sender-key", "120363025814453019@g.us::491710600547::3", [{"senderKeyId": 1, "senderChainKey": {
        "iteration": 0, "seed": {"type": "Buffer", "data": [1, 2, 3]}}, "senderSigningKey": {"public": {"type": "Buffer", "data": "AQID"}},
        "senderMessageKeys": []}]),
    ("company00001", "session", "../../etc/passwd.0", {"_sessions": {}, "version": "v1"}),
    ("company00001", "tctoken", "Ünïcødé \"quoted\" ✓@s.whatsapp.net", {"token": {"type": "Buffer", "data": [255, 0]}}),
    ("company00002", "lid-mapping", "123456789012345_reverse", "4917600000000"),
    ("company00002", "session", "4917:3.1", {"_sessions": {}, "version": "v1"}),
    ("company00002", "sender-key-memory", "120363-1@g.us", {"4917:1@s.whatsapp.net": True}),
    ("company00002", "identity-key", "4917600000000.1", {"type": "Buffer", "data": list(range(33))}),
]

KEY_COLUMNS = "company_id, key_type, key_id, value::text, created_at, updated_at, expires_at"


def execute(db, *statements):
    with db.cursor() as cur:
        for statement in statements:
            cur.execute(*statement) if isinstance(statement, tuple) else cur.execute(statement)
    db.commit()


def insert_keys(db, rows):
    execute(db, *[("INSERT INTO whatsapp_keys (company_id, key_type, key_id, value) VALUES (%s, %s, %s, %s)",
                   (c, t, i, json.dumps(v))) for c, t, i, v in rows])


def full_rows(db):
    """Every row of both tables, JSONB as text, with its timestamps."""
    with db.cursor() as cur:
        cur.execute("SELECT %s FROM whatsapp_keys ORDER BY company_id, key_type COLLATE \"C\", key_id COLLATE \"C\"" % KEY_COLUMNS)
        keys = cur.fetchall()
        cur.execute("SELECT company_id, creds::text, created_at, updated_at FROM whatsapp_auth ORDER BY company_id")
        auth = cur.fetchall()
    db.rollback()
    return {"keys": keys, "auth": auth}


def database_digests(db):
    digests = {company: company_digest(db, company)[0] for company in list_companies(db)}
    db.rollback()
    return digests


def row(db, company, key_type, key_id):
    with db.cursor() as cur:
        cur.execute("SELECT value::text, created_at, updated_at, expires_at, now() FROM whatsapp_keys "
                    "WHERE company_id = %s AND key_type = %s AND key_id = %s", (company, key_type, key_id))
        found = cur.fetchone()
    db.rollback()
    return found


def db_now(db):
    with db.cursor() as cur:
        cur.execute("SELECT now()")
        moment = cur.fetchone()[0]
    db.rollback()
    return moment


def files_digest(company_dir, manifest, new_ids):
    """The state digest of a company directory, computed without the module: ids from the export's manifest or given."""
    creds, keys = None, []
    for name in sorted(os.listdir(company_dir)):
        value = json.loads((company_dir / name).read_text("utf-8"))
        if name == "creds.json":
            creds = value
            continue
        entry = manifest["files"].get(name)
        key_type, key_id = (entry["type"], entry["id"]) if entry else new_ids[name]
        keys.append((key_type, key_id, value))
    return codec.state_digest(creds, keys)


@pytest.fixture
def sessions(tmp_path):
    root = tmp_path / "srv" / "baileys-app"
    root.mkdir(parents=True)
    return root / "baileys_sessions"


@pytest.fixture
def undo_dir(tmp_path):
    return tmp_path / "state" / "undo"


@pytest.fixture
def export(db_params, sessions):
    def run(**args):
        ok, result = run_module(baileys_auth_export, dict(db_params, dest=str(sessions), keep_backup=False, **args))
        assert ok, result.get("msg")
        return result
    return run


@pytest.fixture
def failback(db_params, sessions, undo_dir):
    def run(check_mode=False, **args):
        params = dict(db_params, src=str(sessions), undo_dir=str(undo_dir))
        params.update(args)
        return run_module(baileys_auth_import, params, check_mode=check_mode)
    return run


@pytest.fixture
def warned(monkeypatch):
    """What the module passed to module.warn (the harness's exit_json does not add them to the result)."""
    from ansible.module_utils import basic

    seen = []
    monkeypatch.setattr(basic.AnsibleModule, "warn", lambda self, msg, **kwargs: seen.append(msg))
    return seen


@pytest.fixture
def undo(db_params):
    def run(files, check_mode=False, **args):
        return run_module(baileys_auth_import, dict(db_params, mode="undo", undo_file=list(files), **args), check_mode=check_mode)
    return run


@pytest.fixture
def exported(db, export):
    """Three companies of every key type (odd ids included) exported live."""
    testdata.load(db, "failback", 3, 120)
    insert_keys(db, ODD_KEYS)
    return export()


def manifest_of(sessions, company):
    return json.loads((sessions / ".baileys-dr" / "companies" / (company + ".json")).read_text())


# New keys as Baileys would write them while on files: (type, id, value); file names through fixFileName.
NEW_KEYS = [
    ("session", "4915550001.3", {"_sessions": {"BQ==": {"registrationId": 7, "rootKey": {"type": "Buffer", "data": "AQIDBA=="}}}, "version": "v1"}),
    ("sender-key", "120363000000000001@g.us::4915550001::2", {"type": "Buffer", "data": "W3sic2VuZGVyS2V5SWQiOjF9XQ=="}),
    ("sender-key", "4915550001-1600000000@g.us::123456789012345_1::0", {"type": "Buffer", "data": "W10="}),
    ("app-state-sync-key", "AAAA/w==", {"keyData": "c2VjcmV0", "fingerprint": {"rawId": 5, "currentIndex": 0, "deviceIndexes": [0]},
                                        "timestamp": "1760000000000"}),
    ("pre-key", "100001", {"private": {"type": "Buffer", "data": "AAECAw=="}, "public": {"type": "Buffer", "data": "BAUGBw=="}}),
    ("lid-mapping", "987654321098765_reverse", "4915550001"),
    ("sender-key-memory", "120363000000000001@g.us", {"4915550001:2@s.whatsapp.net": True}),
]


def baileys_changes(sessions, company, manifest):
    """Change a company directory the way Baileys does: new key files, a consumed pre-key deleted, a session
    rewritten, creds.json rewritten. Returns {file name: (type, id)} of the new files."""
    directory = sessions / ("company_" + company)
    new_ids = {}
    for key_type, key_id, value in NEW_KEYS:
        name = codec.key_file_name(key_type, key_id)
        (directory / name).write_bytes(file_content(value))
        new_ids[name] = (key_type, key_id)
    pre_keys = sorted((n for n, e in manifest["files"].items() if e["type"] == "pre-key"), key=lambda n: int(manifest["files"][n]["id"]))
    os.unlink(directory / pre_keys[0])
    session = next(n for n, e in manifest["files"].items() if e["type"] == "session")
    (directory / session).write_bytes(file_content({"_sessions": {}, "version": "v2"}))
    creds = json.loads((directory / "creds.json").read_text())
    creds["nextPreKeyId"] = 100002
    creds["accountSyncCounter"] = creds.get("accountSyncCounter", 0) + 1
    (directory / "creds.json").write_bytes(file_content(creds))
    return new_ids, manifest["files"][pre_keys[0]]["id"], manifest["files"][session]["id"]


# -- the round trip -------------------------------------------------------------------------------------------


def test_a_round_trip_without_change_keeps_every_row_byte_for_byte_and_writes_nothing(db, exported, failback, undo_dir):
    before = full_rows(db)
    assert any('"data": "' in r[3] for r in before["keys"]), "the data holds base64 Buffers too (rows migrated from files)"
    assert any('"data": [' in r[3] for r in before["keys"]), "and the application's byte arrays"
    ok, result = failback()
    assert ok, result.get("msg")
    assert result["changed"] is False and result["committed"] == [] and result["undo_files"] == []
    assert {c: o["status"] for c, o in result["companies"].items()} == dict.fromkeys(exported["digests"], "unchanged")
    assert result["totals"] == {"inserted": 0, "updated": 0, "deleted": 0, "unchanged": 360 + len(ODD_KEYS), "kept": 0, "creds_changed": 0}
    assert full_rows(db) == before, "every row: JSONB text, created_at, updated_at, expires_at"
    assert result["digests"] == exported["digests"] == database_digests(db)
    assert not undo_dir.exists() or not list(undo_dir.iterdir())


def test_baileys_changes_are_imported_and_the_rows_hold_the_files_digest(db, exported, failback, sessions, undo_dir):
    manifest = manifest_of(sessions, "company00002")
    new_ids, consumed, rewritten = baileys_changes(sessions, "company00002", manifest)
    expected = files_digest(sessions / "company_company00002", manifest, new_ids)
    before = full_rows(db)
    untouched = row(db, "company00002", "lid-mapping", "123456789012345_reverse")
    started = db_now(db)
    ok, result = failback()
    assert ok, result.get("msg")
    company = result["companies"]["company00002"]
    assert company["status"] == "imported" and result["committed"] == ["company00002"]
    assert (company["inserted"], company["updated"], company["deleted"], company["creds"]) == (len(NEW_KEYS), 1, 1, "updated")
    assert result["companies"]["company00001"]["status"] == "unchanged"
    assert database_digests(db)["company00002"] == expected == result["digests"]["company00002"]
    # Every other row is as it was, byte for byte.
    others = [r for r in before["keys"] if r[0] != "company00002"]
    assert [r for r in full_rows(db)["keys"] if r[0] != "company00002"] == others
    assert row(db, "company00002", "lid-mapping", "123456789012345_reverse")[:4] == untouched[:4]
    assert row(db, "company00002", "pre-key", consumed) is None, "Baileys deleted the consumed pre-key"
    # New rows: original ids (reverse of fixFileName), the application's Buffer form, the application's expiry policy.
    for key_type, key_id, _value in NEW_KEYS:
        value, created, updated, expires, _now = row(db, "company00002", key_type, key_id)
        assert started < created == updated, "written in the import's transaction"
        assert expires == created + datetime.timedelta(days=testdata.expiry_days(key_type))
        if key_type == "app-state-sync-key":
            assert json.loads(value)["keyData"] == "c2VjcmV0", "as the file holds it"
        elif key_type not in ("lid-mapping", "sender-key-memory"):  # values without Buffers
            assert '"data": [' in value and '"data": "' not in value, value
    value, created, updated, expires, _now = row(db, "company00002", "session", rewritten)
    old = next(r for r in before["keys"] if r[:3] == ("company00002", "session", rewritten))
    assert json.loads(value) == {"_sessions": {}, "version": "v2"} and created == old[4] and updated > old[5] >= old[4]
    assert updated > started
    # The undo file saves what was replaced or deleted, and the inserted ids.
    (undo_file,) = result["undo_files"]
    assert os.path.dirname(undo_file) == str(undo_dir) and os.path.basename(undo_file).startswith("failback-company00002-")
    digest = hashlib.sha256(open(undo_file, "rb").read()).hexdigest()
    assert open(undo_file + ".sha256").read() == "%s  %s\n" % (digest, os.path.basename(undo_file))
    assert oct(os.stat(undo_file).st_mode & 0o777) == "0o600"
    with gzip.open(undo_file, "rt") as fh:
        lines = [json.loads(line) for line in fh]
    assert lines[0]["kind"] == "baileys-dr-failback-undo" and lines[0]["company_id"] == "company00002" and lines[-1]["end"]
    actions = [(r["action"], r.get("key_type", r["table"])) for r in lines[1:-1]]
    assert ("deleted", "pre-key") in actions and ("updated", "session") in actions and ("updated", "whatsapp_auth") in actions
    assert sum(1 for a in actions if a[0] == "inserted") == len(NEW_KEYS)
    # A second run finds nothing to do.
    ok, again = failback()
    assert ok and again["changed"] is False and again["undo_files"] == []


def test_import_then_undo_gives_back_identical_rows_and_undo_is_idempotent(db, exported, failback, undo, sessions):
    for company in ("company00001", "company00003"):
        baileys_changes(sessions, company, manifest_of(sessions, company))
    before = full_rows(db)
    ok, result = failback()
    assert ok and sorted(result["committed"]) == ["company00001", "company00003"], result.get("msg")
    assert full_rows(db) != before
    ok, undone = undo(result["undo_files"])
    assert ok, undone.get("msg")
    assert undone["changed"] and {o["status"] for o in undone["undo_files"].values()} == {"undone"}
    assert full_rows(db) == before, "JSONB text, created_at, updated_at, expires_at of every row, creds included"
    ok, again = undo(result["undo_files"])
    assert ok and again["changed"] is False and {o["status"] for o in again["undo_files"].values()} == {"already_undone"}
    assert full_rows(db) == before


def test_check_mode_reports_the_changes_and_conflicts_and_writes_nothing(db, exported, failback, sessions, undo_dir):
    manifest = manifest_of(sessions, "company00003")
    new_ids, _consumed, _rewritten = baileys_changes(sessions, "company00003", manifest)
    before = full_rows(db)
    ok, result = failback(check_mode=True)
    assert ok, result.get("msg")
    assert result["changed"] is True and result["committed"] == [] and result["undo_files"] == []
    company = result["companies"]["company00003"]
    assert company["status"] == "would_change"
    assert (company["inserted"], company["updated"], company["deleted"], company["creds_changed"]) == (len(NEW_KEYS), 1, 1, True)
    assert result["digests"]["company00003"] == files_digest(sessions / "company_company00003", manifest, new_ids)
    assert full_rows(db) == before and not undo_dir.exists()
    assert all("INSERT" not in q and "UPDATE" not in q and "DELETE" not in q for q in result["queries"])
    execute(db, "UPDATE whatsapp_keys SET value = '{\"late\": 1}' WHERE company_id = 'company00003' AND key_type = 'device-list'")
    ok, result = failback(check_mode=True, since=exported["snapshot_at"])
    assert not ok and result["conflict_count"] >= 1 and result["conflicts"][0]["company"] == "company00003"
    assert full_rows(db) != before  # only the UPDATE above
    ok, real = failback(force=True)
    assert ok, real.get("msg")


# -- the conflict guard ------------------------------------------------------------------------------------------


def test_rows_changed_after_since_refuse_the_company_unless_forced(db, exported, failback, sessions, warned):
    since = db_now(db).isoformat()
    time.sleep(0.01)
    execute(db, "UPDATE whatsapp_keys SET value = '{\"changed\": \"on postgres\"}' WHERE company_id = 'company00001' "
                "AND key_type = 'session' AND key_id = '../../etc/passwd.0'")
    before = full_rows(db)
    ok, result = failback(since=since)
    assert not ok and "company00001" in result["msg"] and "nothing was written" in result["msg"]
    assert result["conflict_count"] == 1
    (conflict,) = result["conflicts"]
    assert conflict["company"] == "company00001" and conflict["type"] == "session" and conflict["id"] == "../../etc/passwd.0"
    assert conflict["updated_at"] > since.replace("T", " ")[:19]
    assert result["companies"]["company00001"]["status"] == "refused"
    assert full_rows(db) == before
    ok, result = failback(since=since, force=True)
    assert ok and result["committed"] == ["company00001"], result.get("msg")
    assert json.loads(row(db, "company00001", "session", "../../etc/passwd.0")[0]) == {"_sessions": {}, "version": "v1"}
    with gzip.open(result["undo_files"][0], "rt") as fh:
        saved = [json.loads(line) for line in fh][1:-1]
    assert saved[0]["value"] == '{"changed": "on postgres"}', "the overwritten row is kept for undo"
    assert result["companies"]["company00001"]["reverted"] == 1 and "changed in PostgreSQL after the export" in warned[-1]
    assert "warnings" not in result, "warnings go through module.warn (a warnings key is deprecated in ansible-core 2.19)"


def test_a_row_changed_after_since_to_what_the_files_hold_is_not_a_conflict(db, exported, failback, sessions):
    since = db_now(db).isoformat()
    execute(db, "UPDATE whatsapp_keys SET value = value WHERE company_id = 'company00002' AND key_type = 'pre-key'")
    ok, result = failback(since=since)
    assert ok and result["conflict_count"] == 0 and result["changed"] is False, result.get("msg")


# -- refusals before any write -------------------------------------------------------------------------------------


def _bad_unknown_type(d):
    (d / "evil-type-1.json").write_text("{}")
    return "evil-type-1.json"


def _bad_json(d):
    name = next(n for n in os.listdir(d) if n.startswith("session-"))
    (d / name).write_text('{"_sessions": {')
    return name


def _bad_bom(d):
    name = next(n for n in os.listdir(d) if n.startswith("pre-key-"))
    (d / name).write_bytes(b"\xef\xbb\xbf" + (d / name).read_bytes())
    return name


def _bad_empty(d):
    name = next(n for n in os.listdir(d) if n.startswith("sender-key-memory-"))
    (d / name).write_bytes(b"")
    return name


def _bad_truncated_creds(d):
    data = (d / "creds.json").read_bytes()
    (d / "creds.json").write_bytes(data[: len(data) // 2])
    return "creds.json"


def _bad_missing_creds(d):
    os.unlink(d / "creds.json")
    return "creds.json"


def _bad_fresh_creds(d):
    (d / "creds.json").write_text('{"registered": false}')
    return "creds.json"


def _bad_symlink(d):
    name = next(n for n in os.listdir(d) if n.startswith("device-list-"))
    os.unlink(d / name)
    os.symlink("/etc/passwd", d / name)
    return name


def _bad_new_pre_key_with_nan(d):
    (d / "pre-key-777777.json").write_text('{"private": NaN}')
    return "pre-key-777777.json"


def _bad_new_session_with_nul(d):
    (d / "session-4917555.1.json").write_text('{"_sessions": {"a\\u0000b": {}}, "version": "v1"}')
    return "session-4917555.1.json"


def _bad_new_session_with_lone_surrogate(d):
    (d / "session-4917556.1.json").write_text('{"_sessions": {}, "version": "\\ud800"}')
    return "session-4917556.1.json"


@pytest.mark.parametrize("damage", [_bad_unknown_type, _bad_json, _bad_bom, _bad_empty, _bad_truncated_creds, _bad_missing_creds,
                                    _bad_fresh_creds, _bad_symlink, _bad_new_pre_key_with_nan, _bad_new_session_with_nul,
                                    _bad_new_session_with_lone_surrogate])
def test_a_bad_file_refuses_the_run_before_any_write_naming_company_and_file(db, exported, failback, sessions, undo_dir, damage):
    # company00001 has a real change; company00002 the bad file: the first pass refuses before company00001 is written.
    baileys_changes(sessions, "company00001", manifest_of(sessions, "company00001"))
    name = damage(sessions / "company_company00002")
    before = full_rows(db)
    ok, result = failback()
    assert not ok
    assert "company00002" in result["msg"] and name in result["msg"] and "nothing was written" in result["msg"], result["msg"]
    assert result["companies"]["company00002"]["status"] == "refused"
    assert result["companies"]["company00001"]["status"] == "not_attempted"
    assert full_rows(db) == before
    assert not undo_dir.exists() or not list(undo_dir.iterdir())


def test_with_continue_on_error_the_good_companies_are_imported(db, exported, failback, sessions):
    baileys_changes(sessions, "company00001", manifest_of(sessions, "company00001"))
    _bad_json(sessions / "company_company00002")
    before = [r for r in full_rows(db)["keys"] if r[0] == "company00002"]
    ok, result = failback(continue_on_error=True)
    assert not ok, "a company failed: the module still fails"
    assert result["committed"] == ["company00001"] and result["failed_companies"] == ["company00002"]
    assert "failback stopped: 1 companies committed (company00001)" in result["msg"]
    assert [r for r in full_rows(db)["keys"] if r[0] == "company00002"] == before


def test_a_company_manifest_not_matching_the_top_manifest_is_refused(db, exported, failback, sessions):
    path = sessions / ".baileys-dr" / "companies" / "company00003.json"
    path.write_bytes(path.read_bytes().replace(b'"keys":', b'"keys" :'))
    before = full_rows(db)
    ok, result = failback()
    assert not ok and "company00003" in result["msg"] and "checksum mismatch" in result["msg"]
    assert full_rows(db) == before


def test_a_missing_company_directory_is_refused_not_deleted(db, exported, failback, sessions):
    shutil.rmtree(sessions / "company_company00003")
    before = full_rows(db)
    ok, result = failback()
    assert not ok and "company00003" in result["msg"] and "directory" in result["msg"]
    assert full_rows(db) == before


def test_a_role_without_the_temporary_privilege_is_refused_before_any_write(db, pg_cluster, exported, failback, sessions,
                                                                            undo_dir):
    """The writes go through a temporary staging table: a role that cannot create one is told so up front."""
    baileys_changes(sessions, "company00001", manifest_of(sessions, "company00001"))
    before = full_rows(db)
    pg_cluster.psql("REVOKE TEMPORARY ON DATABASE baileys FROM PUBLIC; REVOKE TEMPORARY ON DATABASE baileys FROM baileys")
    try:
        ok, result = failback()
        ok_check, checked = failback(check_mode=True)
    finally:
        pg_cluster.psql("GRANT TEMPORARY ON DATABASE baileys TO PUBLIC; GRANT TEMPORARY ON DATABASE baileys TO baileys")
    assert not ok and "no TEMPORARY privilege" in result["msg"] and "nothing was written" in result["msg"], result["msg"]
    assert full_rows(db) == before and (not undo_dir.exists() or not list(undo_dir.iterdir()))
    assert ok_check and checked["companies"]["company00001"]["status"] == "would_change", "check mode writes nothing: no staging"


def test_a_tree_of_another_database_is_refused_unless_allowed(db, exported, failback, sessions):
    top = sessions / ".baileys-dr" / "manifest.json"
    document = json.loads(top.read_text())
    document["source"]["system_identifier"] = "1"
    top.write_text(json.dumps(document))
    ok, result = failback()
    assert not ok and "system identifier" in result["msg"]
    ok, result = failback(allow_other_database=True)
    assert ok, result.get("msg")


def test_an_unfinished_standby_refresh_is_refused(db, exported, failback, sessions):
    (sessions / ".baileys-dr" / "refresh-in-progress").write_text("{}")
    ok, result = failback()
    assert not ok and "refresh-in-progress" in result["msg"]


def test_an_older_tree_with_only_a_manifest_json_or_no_manifest_at_all(db, exported, failback, sessions):
    legacy = {"format": 1, "companies": {}}
    for company in exported["digests"]:
        files = manifest_of(sessions, company)["files"]
        legacy["companies"][company] = {"files": {n: {"type": e["type"], "id": e.get("id")} for n, e in files.items()}}
    shutil.rmtree(sessions / ".baileys-dr")
    (sessions / "manifest.json").write_text(json.dumps(legacy))
    before = full_rows(db)
    ok, result = failback()
    assert ok and result["manifest"] == "legacy" and result["changed"] is False, result.get("msg")
    assert result["digests"] == exported["digests"] and full_rows(db) == before, "no sha256: every row compared, none written"
    os.unlink(sessions / "manifest.json")
    ok, result = failback()
    assert not ok and "has no manifest" in result["msg"]
    ok, result = failback(require_manifest=False)
    assert not ok and result["ambiguous_count"] >= 1, "ids only the manifest knew cannot be told"
    ok, result = failback(require_manifest=False, ambiguous="skip")
    assert ok and result["changed"] is False and result["totals"]["kept"] == result["ambiguous_count"], result.get("msg")
    assert full_rows(db) == before


# -- ids of new files ---------------------------------------------------------------------------------------------------


def test_an_ambiguous_new_file_is_reported_and_refuses_the_company_unless_skipped(db, exported, failback, sessions):
    directory = sessions / "company_company00001"
    (directory / "session-4917-2.0.json").write_bytes(file_content({"_sessions": {}, "version": "v1"}))
    (directory / "pre-key-100001.json").write_bytes(file_content({"private": {"type": "Buffer", "data": "AQ=="}}))
    insert_keys(db, [("company00001", "session", "4917:2.0", {"_sessions": {"x": 1}, "version": "v1"})])
    before = full_rows(db)
    ok, result = failback()
    assert not ok and "company00001" in result["msg"] and "session-4917-2.0.json" in result["msg"]
    (entry,) = result["ambiguous"]
    assert entry["company"] == "company00001" and entry["file"] == "session-4917-2.0.json" and entry["type"] == "session"
    assert entry["candidates"] == ["4917-2.0", "4917:2.0"] and entry["candidate_count"] == 2
    assert entry["in_database"] == ["4917:2.0"]
    assert full_rows(db) == before
    ok, result = failback(ambiguous="skip")
    assert ok, result.get("msg")
    company = result["companies"]["company00001"]
    assert company["inserted"] == 1 and company["kept"] == 1 and company["deleted"] == 0
    assert row(db, "company00001", "session", "4917:2.0")[0] == '{"version": "v1", "_sessions": {"x": 1}}', "left as it was"
    assert row(db, "company00001", "pre-key", "100001") is not None


def test_a_company_created_while_on_files_is_imported_with_reverse_mapped_ids(db, exported, failback, sessions):
    directory = sessions / "company_newco"
    directory.mkdir(mode=0o700)
    creds = testdata.CompanyGenerator("newco", 1).creds()
    (directory / "creds.json").write_bytes(file_content(creds))
    new_ids = {}
    for key_type, key_id, value in NEW_KEYS:
        name = codec.key_file_name(key_type, key_id)
        (directory / name).write_bytes(file_content(value))
        new_ids[name] = (key_type, key_id)
    ok, result = failback()
    assert ok, result.get("msg")
    assert result["companies"]["newco"]["status"] == "imported" and result["companies"]["newco"]["creds"] == "inserted"
    assert database_digests(db)["newco"] == files_digest(directory, {"files": {}}, new_ids) == result["digests"]["newco"]
    with db.cursor() as cur:
        cur.execute("SELECT key_type, key_id FROM whatsapp_keys WHERE company_id = 'newco'")
        assert sorted(cur.fetchall()) == sorted((t, i) for t, i, _v in NEW_KEYS)
    db.rollback()


def test_buffers_are_written_in_base64_on_request(db, exported, failback, sessions):
    baileys_changes(sessions, "company00002", manifest_of(sessions, "company00002"))
    ok, result = failback(buffer_format="base64")
    assert ok, result.get("msg")
    assert row(db, "company00002", "pre-key", "100001")[0] == '{"public": {"data": "BAUGBw==", "type": "Buffer"}, ' \
                                                              '"private": {"data": "AAECAw==", "type": "Buffer"}}'


# -- failures mid-import: nothing of the company committed, a re-run completes ----------------------------------------


def test_a_connection_killed_mid_import_commits_nothing_of_that_company_and_a_rerun_completes(
        db, exported, failback, undo, sessions, undo_dir, tmp_path, monkeypatch):
    for company in ("company00001", "company00002", "company00003"):
        baileys_changes(sessions, company, manifest_of(sessions, company))
    before = full_rows(db)
    monkeypatch.setenv("BAILEYS_DR_TEST_PAUSE_AT", "import_company:2")
    monkeypatch.setenv("BAILEYS_DR_TEST_PAUSE_SECONDS", "3")
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(result=failback()))
    worker.start()

    def paused():
        with db.cursor() as cur:
            cur.execute("SELECT pid FROM pg_stat_activity WHERE application_name = 'baileys-dr-import' AND state = 'idle in transaction'")
            found = cur.fetchall()
        db.rollback()
        return len(found) == 1 and undo_dir.is_dir() and any(n.startswith("failback-company00002-") for n in os.listdir(undo_dir))

    wait_until(paused, what="the import paused inside company00002's transaction")
    # A copy of the undo file of the transaction about to die, to undo later.
    (name,) = [n for n in os.listdir(undo_dir) if n.startswith("failback-company00002-") and n.endswith(".gz")]
    shutil.copy(undo_dir / name, tmp_path / name)
    shutil.copy(undo_dir / (name + ".sha256"), tmp_path / (name + ".sha256"))
    execute(db, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'baileys-dr-import'")
    worker.join(60)
    ok, result = outcome["result"]
    assert not ok
    assert "company00002" in result["msg"] and "nothing of it was committed" in result["msg"], result["msg"]
    assert result["committed"] == ["company00001"] and result["not_attempted"] == ["company00003"]
    assert result["companies"]["company00002"]["status"] == "failed"
    after = full_rows(db)
    for company in ("company00002", "company00003"):
        assert [r for r in after["keys"] if r[0] == company] == [r for r in before["keys"] if r[0] == company]
        assert [r for r in after["auth"] if r[0] == company] == [r for r in before["auth"] if r[0] == company]
    assert not (undo_dir / name).exists(), "the undo file of a transaction that did not commit is removed"
    # Undoing the dead transaction's file changes nothing: it never committed.
    ok, undone = undo([str(tmp_path / name)])
    assert ok and undone["changed"] is False and undone["undo_files"][str(tmp_path / name)]["status"] == "nothing_to_undo"
    # The re-run completes; what company00001 committed is not a conflict (the rows equal the files).
    monkeypatch.delenv("BAILEYS_DR_TEST_PAUSE_AT")
    ok, rerun = failback()
    assert ok, rerun.get("msg")
    assert rerun["committed"] == ["company00002", "company00003"] and rerun["companies"]["company00001"]["status"] == "unchanged"
    assert rerun["digests"] == database_digests(db)


def test_an_injected_failure_before_the_commit_rolls_the_company_back(db, exported, failback, sessions, undo_dir, monkeypatch):
    baileys_changes(sessions, "company00001", manifest_of(sessions, "company00001"))
    before = full_rows(db)
    monkeypatch.setenv("BAILEYS_DR_TEST_FAIL_AT", "import_company:1")
    ok, result = failback()
    assert not ok and "company00001" in result["msg"] and "import_company:1" in result["msg"]
    assert result["committed"] == [] and full_rows(db) == before
    assert not list(undo_dir.iterdir())


def test_files_changed_while_importing_roll_the_company_back(db, exported, failback, sessions, undo_dir, monkeypatch):
    baileys_changes(sessions, "company00001", manifest_of(sessions, "company00001"))
    before = full_rows(db)
    monkeypatch.setenv("BAILEYS_DR_TEST_PAUSE_AT", "import_company:1")
    monkeypatch.setenv("BAILEYS_DR_TEST_PAUSE_SECONDS", "4")
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(result=failback()))
    worker.start()
    # The company's undo file is begun once its files are read and its transaction open: from then on until the
    # check after the pause, a change to its files is one made while it was imported.
    wait_until(lambda: undo_dir.is_dir() and any(n.startswith("failback-company00001-") for n in os.listdir(undo_dir)),
               what="the import inside company00001's transaction")
    assert worker.is_alive(), "the import is still paused"
    (sessions / "company_company00001" / "pre-key-100002.json").write_bytes(file_content({"private": {"type": "Buffer", "data": "AQ=="}}))
    worker.join(60)
    ok, result = outcome["result"]
    assert not ok and "changed while it was imported" in result["msg"] and "pre-key-100002.json" in result["msg"]
    assert full_rows(db) == before


def test_a_row_that_does_not_read_back_as_its_file_rolls_the_company_back(db, exported, failback, sessions, undo_dir):
    """The rows are proven equal to the files before the COMMIT: here a trigger of the database alters one inserted value."""
    baileys_changes(sessions, "company00001", manifest_of(sessions, "company00001"))
    before = full_rows(db)
    execute(db, "CREATE FUNCTION pytest_tamper() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "IF NEW.key_type = 'pre-key' AND NEW.key_id = '100001' THEN NEW.value = '{\"tampered\": true}'; END IF; "
                "RETURN NEW; END; $$",
                "CREATE TRIGGER pytest_tamper BEFORE INSERT ON whatsapp_keys FOR EACH ROW EXECUTE FUNCTION pytest_tamper()")
    try:
        ok, result = failback()
    finally:
        execute(db, "DROP TRIGGER pytest_tamper ON whatsapp_keys", "DROP FUNCTION pytest_tamper()")
    assert not ok and "company00001" in result["msg"] and "pre-key '100001' does not read back as its file" in result["msg"]
    assert "nothing of it was committed" in result["msg"]
    assert full_rows(db) == before and not list(undo_dir.iterdir())


def test_a_row_changed_by_the_database_on_update_rolls_the_company_back(db, exported, failback, sessions, undo_dir):
    """Updated rows too are proven equal to what was sent: a trigger altering an UPDATE is caught."""
    _, _, rewritten = baileys_changes(sessions, "company00001", manifest_of(sessions, "company00001"))
    before = full_rows(db)
    execute(db, "CREATE FUNCTION pytest_tamper() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "IF NEW.key_type = 'session' THEN NEW.value = '{\"tampered\": true}'; END IF; RETURN NEW; END; $$",
                "CREATE TRIGGER pytest_tamper BEFORE UPDATE ON whatsapp_keys FOR EACH ROW EXECUTE FUNCTION pytest_tamper()")
    try:
        ok, result = failback()
    finally:
        execute(db, "DROP TRIGGER pytest_tamper ON whatsapp_keys", "DROP FUNCTION pytest_tamper()")
    assert not ok and "session %r does not read back as its file" % rewritten in result["msg"], result["msg"]
    assert full_rows(db) == before and not list(undo_dir.iterdir())


def test_a_row_the_database_adds_during_the_writes_rolls_the_company_back(db, exported, failback, sessions, undo_dir):
    """The rows must be exactly the files' keys after the writes: a row a trigger adds is an extra one."""
    baileys_changes(sessions, "company00001", manifest_of(sessions, "company00001"))
    before = full_rows(db)
    execute(db, "CREATE FUNCTION pytest_extra() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "IF NEW.key_id = '100001' THEN INSERT INTO whatsapp_keys (company_id, key_type, key_id, value) "
                "VALUES (NEW.company_id, 'pre-key', '999999', '{}'); END IF; RETURN NULL; END; $$",
                "CREATE TRIGGER pytest_extra AFTER INSERT ON whatsapp_keys FOR EACH ROW EXECUTE FUNCTION pytest_extra()")
    try:
        ok, result = failback()
    finally:
        execute(db, "DROP TRIGGER pytest_extra ON whatsapp_keys", "DROP FUNCTION pytest_extra()")
    assert not ok and "not the files' keys (extra [('pre-key', '999999')]" in result["msg"], result["msg"]
    assert full_rows(db) == before and not list(undo_dir.iterdir())


def test_a_run_of_one_company_reads_its_files_once_unless_they_changed_between_the_passes(db, exported, failback, sessions,
                                                                                         monkeypatch):
    from ansible.module_utils import baileys_dr_failback as engine
    from ansible.module_utils import baileys_dr_source_files as source_files
    from ansible.module_utils import baileys_dr_source_tree as source_tree

    directory = sessions / "company_company00001"
    baileys_changes(sessions, "company00001", manifest_of(sessions, "company00001"))
    reads = []
    original_read = source_files.read_file_at
    monkeypatch.setattr(source_tree, "read_file_at", lambda dir_fd, name: reads.append(name) or original_read(dir_fd, name))
    ok, result = failback(companies=["company00001"])
    assert ok and result["committed"] == ["company00001"], result.get("msg")
    assert sorted(reads) == sorted(os.listdir(directory)), "the second pass uses the first pass's read"
    assert result["digests"]["company00001"] == database_digests(db)["company00001"]
    # A key Baileys writes between the passes: the second pass sees the directory changed and reads it again.
    (directory / "pre-key-200001.json").write_bytes(file_content({"private": {"type": "Buffer", "data": "AQ=="}}))
    original_writes = engine.Failback._writes

    def late_write(self, *args):
        (directory / "pre-key-200002.json").write_bytes(file_content({"private": {"type": "Buffer", "data": "Ag=="}}))
        return original_writes(self, *args)

    monkeypatch.setattr(engine.Failback, "_writes", late_write)
    reads.clear()
    ok, result = failback(companies=["company00001"])
    assert ok and result["companies"]["company00001"]["inserted"] == 2, result.get("msg")
    assert len(reads) == 2 * len(os.listdir(directory)) - 1
    assert row(db, "company00001", "pre-key", "200002") is not None
    assert result["digests"]["company00001"] == database_digests(db)["company00001"]


def test_an_unchanged_tree_into_an_empty_database_holds_the_exported_digests(db, exported, failback, undo, sessions, undo_dir):
    """The files are the export's byte for byte: every row is inserted and the digests are the manifest's, which the
    rows must then have."""
    before = full_rows(db)
    execute(db, "DELETE FROM whatsapp_keys", "DELETE FROM whatsapp_auth")
    ok, result = failback(buffer_format="base64")
    assert ok, result.get("msg")
    assert result["totals"]["inserted"] == len(before["keys"]) and result["totals"]["creds_changed"] == len(before["auth"])
    assert result["digests"] == exported["digests"] == database_digests(db)
    after = full_rows(db)
    assert [r[:3] for r in after["keys"]] == [r[:3] for r in before["keys"]]
    # Undo of an import into an empty database empties it again.
    ok, undone = undo(result["undo_files"])
    assert ok, undone.get("msg")
    assert full_rows(db) == {"keys": [], "auth": []}


# -- undo -------------------------------------------------------------------------------------------------------------


def test_undo_files_of_successive_failbacks_are_applied_newest_first_whatever_the_order_given(db, exported, failback, undo, sessions):
    before = full_rows(db)
    baileys_changes(sessions, "company00002", manifest_of(sessions, "company00002"))
    ok, first = failback()
    assert ok, first.get("msg")
    directory = sessions / "company_company00002"
    (directory / "pre-key-100001.json").write_bytes(file_content({"private": {"type": "Buffer", "data": "CQk="}}))
    (directory / "pre-key-100003.json").write_bytes(file_content({"private": {"type": "Buffer", "data": "CAg="}}))
    ok, second = failback(since=db_now(db).isoformat())  # a second failover and failback
    assert ok, second.get("msg")
    assert (second["companies"]["company00002"]["updated"], second["companies"]["company00002"]["inserted"]) == (1, 1)
    files = first["undo_files"] + second["undo_files"]
    ok, undone = undo(files)
    assert ok, undone.get("msg")
    assert undone["order"] == second["undo_files"] + first["undo_files"]
    assert full_rows(db) == before


def test_undo_refuses_rows_changed_after_the_failback_unless_forced(db, exported, failback, undo, sessions):
    baileys_changes(sessions, "company00001", manifest_of(sessions, "company00001"))
    ok, result = failback()
    assert ok, result.get("msg")
    execute(db, "UPDATE whatsapp_keys SET value = '{\"newer\": 1}' WHERE company_id = 'company00001' AND key_type = 'pre-key' "
                "AND key_id = '100001'")
    changed = full_rows(db)
    ok, undone = undo(result["undo_files"])
    assert not ok and "changed after the failback" in undone["msg"]
    assert undone["conflicts"][0]["type"] == "pre-key" and undone["conflicts"][0]["id"] == "100001"
    assert full_rows(db) == changed
    ok, undone = undo(result["undo_files"], force=True)
    assert ok and undone["changed"], undone.get("msg")
    assert row(db, "company00001", "pre-key", "100001") is None


def test_an_undo_file_that_does_not_match_its_checksum_is_refused(db, exported, failback, undo, sessions):
    baileys_changes(sessions, "company00001", manifest_of(sessions, "company00001"))
    ok, result = failback()
    (path,) = result["undo_files"]
    with open(path, "r+b") as fh:
        fh.seek(20)
        byte = fh.read(1)
        fh.seek(20)
        fh.write(bytes([byte[0] ^ 1]))
    changed = full_rows(db)
    ok, undone = undo([path])
    assert not ok and "checksum mismatch" in undone["msg"]
    assert full_rows(db) == changed


def test_undo_in_check_mode_writes_nothing(db, exported, failback, undo, sessions):
    baileys_changes(sessions, "company00003", manifest_of(sessions, "company00003"))
    ok, result = failback()
    changed = full_rows(db)
    ok, undone = undo(result["undo_files"], check_mode=True)
    assert ok and undone["changed"] and list(undone["undo_files"].values())[0]["status"] == "would_undo"
    assert full_rows(db) == changed


# -- secrets ------------------------------------------------------------------------------------------------------------


def test_no_secret_and_no_key_material_in_the_output(db, db_params, exported, failback, sessions):
    baileys_changes(sessions, "company00001", manifest_of(sessions, "company00001"))
    ok, result = failback()
    text = json.dumps(result)
    creds = json.loads((sessions / "company_company00001" / "creds.json").read_text())
    assert db_params["login_password"] not in text and creds["advSecretKey"] not in text and "c2VjcmV0" not in text
    ok, result = failback(login_password="s3cret-not-the-password")
    assert not ok and "s3cret-not-the-password" not in json.dumps(result)


def test_a_host_company_the_tree_does_not_hold_is_refused_by_name_or_left_out_with_missing_companies_skip(
        db, exported, failback):
    """A company listed for the host that has no data yet: the failover wrote no directory for it."""
    before = full_rows(db)
    ok, result = failback(companies=["company00001", "company09999"])
    assert not ok and "company09999" in result["msg"] and "missing_companies=skip" in result["msg"], result["msg"]
    ok, result = failback(companies=["company00001", "company09999"], missing_companies="skip")
    assert ok, result.get("msg")
    assert result["absent_companies"] == ["company09999"] and list(result["companies"]) == ["company00001"]
    assert full_rows(db) == before, "nothing changed: company00001 equals its files, the absent company is left alone"
