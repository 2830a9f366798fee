"""Each company's identity across every copy (issue 17): fresh creds (Baileys' own initAuthCreds(): a new registrationId,
no me) written over registered ones, on PostgreSQL and on files, are reported by health as critical and refused by the
copies of failover (standby refresh, export into the files tree), failback (import), unless forced for that company."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess

import pytest

import baileys_auth_export
import baileys_auth_import
import baileys_db_health
from module_harness import run_module
from test_db_health_real import health_playbook  # noqa: F401

from ansible.module_utils import baileys_dr_codec as codec
from ansible.module_utils import baileys_dr_testdata as testdata
from ansible.module_utils.baileys_dr_identity import CACHE_FILE, KEY_HASH_SHOWN, creds_identity, set_cache_aside

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
APP = os.path.join(ROOT, "testbed", "app")
QUIET = {"latency_p95_seconds": {"warning": 30, "critical": 60}, "connections_ratio": {"warning": 0.99, "critical": 1},
         "companies_without_keys": {"warning": None}}
COMPANIES = ("acme", "bravo")


def fresh_creds():
    """What a store that fell back to initAuthCreds() writes: Baileys' own fresh creds, as JSON.stringify gives them."""
    script = "require('./src/baileys').loadBaileys().then(b => process.stdout.write(JSON.stringify(b.initAuthCreds())))"
    done = subprocess.run(["node", "-e", script], cwd=APP, capture_output=True, text=True, timeout=120, check=True)
    creds = json.loads(done.stdout)
    assert "me" not in creds and isinstance(creds["registrationId"], int)
    return creds


@pytest.fixture(scope="module")
def fresh():
    return [fresh_creds(), fresh_creds()]


@pytest.fixture
def app_root(tmp_path):
    """An application root with the test application's installed Baileys package.json."""
    root = tmp_path / "srv" / "baileys-app"
    (root / "node_modules" / "baileys").mkdir(parents=True)
    shutil.copy(os.path.join(APP, "node_modules", "baileys", "package.json"), root / "node_modules" / "baileys" / "package.json")
    return root


def seed(db):
    """Two registered companies with Baileys-shaped creds (initAuthCreds' field types, me, account) and keys."""
    with db.cursor() as cur:
        for index, company_id in enumerate(COMPANIES):
            gen = testdata.CompanyGenerator("identity", index, keys=30)
            creds = gen.creds()
            if "me" not in creds:  # the generator leaves about one company in ten unpaired
                creds["me"] = {"id": "49155500%02d:3@s.whatsapp.net" % index, "name": "Co %d" % index}
            cur.execute("INSERT INTO whatsapp_auth (company_id, creds) VALUES (%s, %s)", (company_id, json.dumps(creds)))
            for key_type, key_id, value, *_times in gen.key_rows():
                cur.execute("INSERT INTO whatsapp_keys (company_id, key_type, key_id, value) VALUES (%s, %s, %s, %s)",
                            (company_id, key_type, key_id, json.dumps(value)))
    db.commit()


def db_creds(db, company_id):
    with db.cursor() as cur:
        cur.execute("SELECT creds::text FROM whatsapp_auth WHERE company_id = %s", (company_id,))
        text = cur.fetchone()[0]
    db.rollback()
    return json.loads(text)


def overwrite_db_creds(db, company_id, creds):
    with db.cursor() as cur:
        cur.execute("UPDATE whatsapp_auth SET creds = %s WHERE company_id = %s", (json.dumps(creds), company_id))
    db.commit()


def overwrite_file_creds(tree, company_id, creds):
    """As useMultiFileAuthState's saveCreds writes it: BufferJSON.replacer (base64 Buffers), in place."""
    with open(os.path.join(tree, "company_" + company_id, "creds.json"), "w") as handle:
        handle.write(json.dumps(codec.to_base64_form(creds), separators=(",", ":")))


def export(db_params, dest, **args):
    return run_module(baileys_auth_export, dict(db_params, dest=str(dest), **args))


def manifest(tree):
    with open(os.path.join(tree, ".baileys-dr", "manifest.json"), "rb") as handle:
        return handle.read()


def assert_names_both_identities(msg, company_id, old, new):
    assert "company %s" % company_id in msg
    for ident in (old, new):
        assert "registrationId %s" % ident["registrationId"] in msg
        assert ident["identity_key_sha256"][:KEY_HASH_SHOWN] in msg
    assert old["me"] in msg and "none (unregistered)" in msg


def assert_no_secret(msg, creds_list):
    for creds in creds_list:
        for field in ("noiseKey", "signedIdentityKey", "pairingEphemeralKeyPair"):
            raw = codec.buffer_bytes(creds[field]["private"])
            for shown in (raw.hex(), json.dumps(list(raw))[1:-1], codec.to_base64_form(creds[field]["private"])["data"]):
                assert shown not in msg
        assert creds["advSecretKey"] not in msg


# -- the record ------------------------------------------------------------------------------------


def test_every_snapshot_records_each_companys_identity_and_the_baileys_version(db, db_params, app_root):
    seed(db)
    for mode, dest in (("live", app_root / "baileys_sessions"), ("standby", app_root / "baileys_sessions.standby")):
        ok, result = export(db_params, dest, mode=mode)
        assert ok, result.get("msg")
        top = json.loads(manifest(dest))
        for company_id in COMPANIES:
            creds = db_creds(db, company_id)
            public = codec.buffer_bytes(creds["signedIdentityKey"]["public"])
            assert top["identities"][company_id] == {"registrationId": creds["registrationId"], "me": creds["me"]["id"],
                                                     "identity_key_sha256": hashlib.sha256(public).hexdigest()}
        assert top["baileys"] == {"package": "baileys", "version": "7.0.0-rc14", "source": "node_modules/baileys/package.json",
                                  "types_unknown": {}}
        assert result["baileys"]["version"] == "7.0.0-rc14"
        text = manifest(dest).decode()
        assert_no_secret(text, [db_creds(db, c) for c in COMPANIES])


def test_key_types_the_applications_baileys_does_not_know_are_refused_by_name(db, db_params, app_root):
    seed(db)
    package = app_root / "node_modules" / "baileys" / "package.json"
    package.write_text(json.dumps(dict(json.loads(package.read_text()), version="6.7.18")))
    sessions = app_root / "baileys_sessions"
    ok, result = export(db_params, sessions)
    assert not ok
    msg = result["msg"]
    assert "Baileys 6.7.18 (node_modules/baileys/package.json) does not know" in msg
    assert "lid-mapping (" in msg and "tctoken (" in msg and "session" not in msg.split("know:")[1].split(".")[0]
    assert not sessions.exists()
    ok, result = export(db_params, sessions, unknown_types="skip")
    assert ok, result.get("msg")
    assert set(result["baileys"]["types_unknown"]) == {"lid-mapping", "device-list", "tctoken", "identity-key"}
    assert json.loads(manifest(sessions))["baileys"]["version"] == "6.7.18"


# -- failover: the copies of PostgreSQL into files -----------------------------------------------


def test_fresh_creds_in_postgres_are_refused_by_the_standby_refresh_and_nothing_is_written(db, db_params, app_root, fresh):
    seed(db)
    standby = app_root / "baileys_sessions.standby"
    ok, result = export(db_params, standby, mode="standby")
    assert ok, result.get("msg")
    before = manifest(standby)
    creds_before = (standby / "company_acme" / "creds.json").read_bytes()
    old = creds_identity(db_creds(db, "acme"))
    overwrite_db_creds(db, "acme", fresh[0])
    ok, result = export(db_params, standby, mode="standby")
    assert not ok
    msg = result["msg"]
    assert "refusing to refresh the standby copy" in msg and "registered credentials would be replaced by unregistered ones" in msg
    assert_names_both_identities(msg, "acme", old, creds_identity(fresh[0]))
    assert "company bravo" not in msg and "identity_force_companies=[acme]" in msg
    assert_no_secret(msg, [fresh[0], db_creds(db, "bravo")])
    assert manifest(standby) == before and (standby / "company_acme" / "creds.json").read_bytes() == creds_before
    # force=true (the deletion guard's override) is not the identity's.
    ok, result = export(db_params, standby, mode="standby", force=True)
    assert not ok and "company acme" in result["msg"]


def test_fresh_creds_in_postgres_are_refused_by_the_export_into_the_files_tree(db, db_params, app_root, fresh):
    seed(db)
    sessions = app_root / "baileys_sessions"
    ok, result = export(db_params, sessions)
    assert ok, result.get("msg")
    before = manifest(sessions)
    overwrite_db_creds(db, "bravo", fresh[1])
    ok, result = export(db_params, sessions)
    assert not ok
    assert "refusing to write the database into %s" % sessions in result["msg"] and "company bravo" in result["msg"]
    assert manifest(sessions) == before
    assert sorted(os.listdir(app_root)) == ["baileys_sessions", "node_modules"]  # no staging, no backup left


def test_another_registered_identity_is_refused_too(db, db_params, app_root):
    seed(db)
    sessions = app_root / "baileys_sessions"
    assert export(db_params, sessions)[0]
    other = testdata.CompanyGenerator("another-phone", 7).creds()
    other["me"] = {"id": "4917699999:2@s.whatsapp.net"}
    overwrite_db_creds(db, "acme", other)
    ok, result = export(db_params, sessions)
    assert not ok and "one identity would be replaced by another" in result["msg"]
    assert "4917699999:2@s.whatsapp.net" in result["msg"]


def test_forcing_a_company_lets_its_new_identity_through_for_that_company_only(db, db_params, app_root, fresh):
    seed(db)
    standby = app_root / "baileys_sessions.standby"
    assert export(db_params, standby, mode="standby")[0]
    overwrite_db_creds(db, "acme", fresh[0])
    overwrite_db_creds(db, "bravo", fresh[1])
    ok, result = export(db_params, standby, mode="standby", identity_force_companies=["acme"])
    assert not ok
    assert "company bravo" in result["msg"] and "company acme" not in result["msg"]
    ok, result = export(db_params, standby, mode="standby", identity_force_companies=["acme", "bravo"])
    assert ok, result.get("msg")
    assert sorted(result["identity"]["forced"]) == ["acme", "bravo"]
    top = json.loads(manifest(standby))
    assert top["identities"]["acme"]["registrationId"] == fresh[0]["registrationId"] and top["identities"]["acme"]["me"] is None
    # Once copied, the next refresh has nothing to refuse.
    ok, result = export(db_params, standby, mode="standby")
    assert ok, result.get("msg")


def test_an_invalid_forced_company_id_is_refused_by_name(db, db_params, app_root):
    seed(db)
    ok, result = export(db_params, app_root / "baileys_sessions", identity_force_companies=["../etc"])
    assert not ok and "'../etc'" in result["msg"]


# -- failback: the import of files into PostgreSQL -------------------------------------------------


@pytest.fixture
def failback(db_params, app_root, tmp_path):
    undo = tmp_path / "undo"
    undo.mkdir()

    def run(check_mode=False, **args):
        params = dict(db_params, src=str(app_root / "baileys_sessions"), undo_dir=str(undo))
        params.update(args)
        return run_module(baileys_auth_import, params, check_mode=check_mode)
    return run


def rows(db):
    with db.cursor() as cur:
        cur.execute("SELECT company_id, creds::text, updated_at FROM whatsapp_auth ORDER BY 1")
        auth = cur.fetchall()
        cur.execute("SELECT count(*), max(updated_at) FROM whatsapp_keys")
        keys = cur.fetchone()
    db.rollback()
    return auth, keys


def test_fresh_creds_in_the_files_are_refused_by_the_import_and_nothing_is_written(db, db_params, app_root, fresh, failback):
    seed(db)
    sessions = app_root / "baileys_sessions"
    assert export(db_params, sessions)[0]
    old = creds_identity(db_creds(db, "acme"))
    overwrite_file_creds(str(sessions), "acme", fresh[0])
    before = rows(db)
    for check_mode in (True, False):
        ok, result = failback(check_mode=check_mode)
        assert not ok
        assert "registered credentials would be replaced by unregistered ones" in result["msg"]
        assert_names_both_identities(result["msg"], "acme", old, creds_identity(fresh[0]))
        assert_no_secret(result["msg"], [fresh[0]])
        assert rows(db) == before


def test_forcing_the_import_for_a_company_writes_its_new_identity_and_refuses_the_others(db, db_params, app_root, fresh, failback):
    seed(db)
    sessions = app_root / "baileys_sessions"
    assert export(db_params, sessions)[0]
    overwrite_file_creds(str(sessions), "acme", fresh[0])
    overwrite_file_creds(str(sessions), "bravo", fresh[1])
    before = rows(db)
    ok, result = failback(identity_force_companies=["acme"])
    assert not ok and "company bravo" in result["msg"] and "company acme:" not in result["msg"].split("failback")[-1].split("bravo")[0]
    assert rows(db) == before  # one company refused: the run writes nothing (continue_on_error is off)
    ok, result = failback(identity_force_companies=["acme"], continue_on_error=True)
    assert not ok
    assert creds_identity(db_creds(db, "acme")) == creds_identity(fresh[0])
    assert creds_identity(db_creds(db, "bravo")) != creds_identity(fresh[1])
    ok, result = failback(identity_force_companies=["bravo"])
    assert ok, result.get("msg")
    assert creds_identity(db_creds(db, "bravo")) == creds_identity(fresh[1])


# -- health --------------------------------------------------------------------------------------------


def health(db_params, **args):
    ok, result = run_module(baileys_db_health, dict(db_params, thresholds=QUIET, **args))
    assert ok, result
    return result


def test_health_reports_fresh_creds_in_postgres_since_the_last_snapshot_as_critical(db, db_params, app_root, fresh):
    seed(db)
    standby = app_root / "baileys_sessions.standby"
    assert export(db_params, standby, mode="standby")[0]
    result = health(db_params, standby_dir=str(standby))
    assert result["checks"]["identity"]["status"] == "healthy", result["checks"]["identity"]
    old = creds_identity(db_creds(db, "acme"))
    overwrite_db_creds(db, "acme", fresh[0])
    result = health(db_params, standby_dir=str(standby))
    check = result["checks"]["identity"]
    assert check["status"] == "critical" and result["status"] == "critical" and check["value"] == 1
    assert_names_both_identities(check["message"], "acme", old, creds_identity(fresh[0]))
    assert result["identity"]["changed"][0]["kind"] == "unregistered" and result["identity"]["changed"][0]["where"] == "the database"


def test_health_reports_fresh_creds_in_the_files_since_their_snapshot_as_critical(db, db_params, app_root, fresh):
    seed(db)
    sessions = app_root / "baileys_sessions"
    assert export(db_params, sessions)[0]
    assert health(db_params, sessions_dir=str(sessions))["checks"]["identity"]["status"] == "healthy"
    overwrite_file_creds(str(sessions), "bravo", fresh[1])
    result = health(db_params, sessions_dir=str(sessions))
    check = result["checks"]["identity"]
    assert check["status"] == "critical" and "company bravo: the sessions tree has registrationId %d" % fresh[1]["registrationId"] in check["message"]


def test_health_yml_fails_on_a_company_whose_identity_changed_and_reports_the_cache(db, db_params, app_root, fresh,
                                                                                    health_playbook):  # noqa: F811
    seed(db)
    standby, sessions = app_root / "baileys_sessions.standby", app_root / "baileys_sessions"
    assert export(db_params, standby, mode="standby")[0]
    assert export(db_params, sessions)[0]
    overwrite_db_creds(db, "acme", fresh[0])
    write_cache(app_root, {"acme": db_creds(db, "acme")})
    rc, out, paths = health_playbook("-e", json.dumps({"baileys_dr_app_root": str(app_root)}))
    assert rc != 0, out  # critical fails the play by default, after the reports are written
    report = json.loads(paths["report"].read_text())
    assert report["checks"]["identity"]["status"] == "critical" and "company acme" in report["checks"]["identity"]["message"]
    assert report["checks"]["credentials_cache"]["status"] == "healthy"
    assert report["identity"]["credentials_cache"]["companies"]["acme"]["equal"] is True
    assert fresh[0]["advSecretKey"] not in paths["report"].read_text()


# -- the application's credentials cache ---------------------------------------------------------------


def write_cache(app_root, companies, mode=0o600):
    """As the service writes it (session-pool.js): {company: {creds, keys, timestamp}}, plain JSON.stringify."""
    path = app_root / CACHE_FILE
    path.write_text(json.dumps({c: {"creds": creds, "keys": {"_isCached": True}, "timestamp": 1765000000000}
                                for c, creds in companies.items()}))
    os.chmod(path, mode)
    return path


def test_health_reports_the_credentials_cache_presence_age_mode_and_identities(db, db_params, app_root, fresh):
    seed(db)
    result = health(db_params, app_root=str(app_root))
    assert result["checks"]["credentials_cache"]["status"] == "healthy"
    assert result["identity"]["credentials_cache"]["present"] is False
    write_cache(app_root, {"acme": db_creds(db, "acme"), "bravo": db_creds(db, "bravo")})
    result = health(db_params, app_root=str(app_root))
    cache = result["identity"]["credentials_cache"]
    assert cache["present"] and cache["mode"] == "0600" and cache["mode_ok"] and 0 <= cache["age_seconds"] < 600
    assert cache["differ"] == [] and cache["companies"]["acme"]["equal"]
    assert result["checks"]["credentials_cache"]["status"] == "healthy"
    write_cache(app_root, {"acme": fresh[0], "bravo": db_creds(db, "bravo")}, mode=0o644)
    result = health(db_params, app_root=str(app_root))
    cache = result["identity"]["credentials_cache"]
    assert cache["mode"] == "0644" and not cache["mode_ok"] and cache["differ"] == ["acme"]
    check = result["checks"]["credentials_cache"]
    assert check["status"] == "warning" and "not 0600" in check["message"] and "acme" in check["message"]
    assert_no_secret(json.dumps(result), [fresh[0]])


def test_a_failover_moves_the_credentials_cache_aside_and_names_it(app_root):
    assert set_cache_aside(str(app_root)) is None
    path = write_cache(app_root, {"acme": {"registrationId": 1}})
    data = path.read_bytes()
    warned = []
    moved = set_cache_aside(str(app_root), warned.append)
    assert not path.exists() and moved["path"] == str(path)
    assert os.path.dirname(moved["moved_to"]) == str(app_root)
    assert os.path.basename(moved["moved_to"]).startswith(CACHE_FILE + ".set-aside-")
    with open(moved["moved_to"], "rb") as handle:
        assert handle.read() == data
    assert oct(os.stat(moved["moved_to"]).st_mode & 0o777) == oct(0o600)
    assert moved["moved_to"] in warned[0]
