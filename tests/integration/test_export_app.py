"""The test application (real Baileys, file store of the emergency tag) reads trees written by baileys_auth_export."""

from __future__ import annotations

import json
import subprocess

import baileys_auth_export
from module_harness import run_module
# The application fixtures and helpers are those of the application's own digest tests.
from test_app_digest import TAG, app_repo, node_modules, postgres_env, python_digests, run_app  # noqa: F401

from ansible.module_utils import baileys_dr_testdata as testdata

# Ids whose file names Baileys' fixFileName cannot be reversed from: only the manifest keeps them.
ODD_KEYS = [
    ("company00001", "app-state-sync-key", "AAQ/x+y=", {"keyData": "AQIDBA==", "timestamp": "1700000000000",
                                                       "fingerprint": {"rawId": 7, "currentIndex": 1, "deviceIndexes": [0, 1]}}),
    ("company00001", "tctoken", "4917-0000@s.whatsapp.net", {"token": {"type": "Buffer", "data": [1, 2, 3]}, "timestamp": "5"}),
    ("company00002", "session", "4917:3.1", {"_sessions": {}, "version": "v1"}),
    ("company00002", "sender-key-memory", "120363-1@g.us", {"4917:1@s.whatsapp.net": True}),
]


def load(db):
    testdata.load(db, "appfiles", 3, 300)
    with db.cursor() as cur:
        for company_id, key_type, key_id, value in ODD_KEYS:
            cur.execute("INSERT INTO whatsapp_keys (company_id, key_type, key_id, value) VALUES (%s, %s, %s, %s)",
                        (company_id, key_type, key_id, json.dumps(value)))
    db.commit()


def read_with_baileys(app_repo, run_app, db_params, sessions_dir):
    subprocess.run(["git", "checkout", "-q", TAG], cwd=app_repo, check=True)
    env = dict(postgres_env(db_params, use_db="false"), SESSIONS_DIR=str(sessions_dir))
    return run_app(app_repo, env).health()


def test_baileys_reads_the_exported_tree_with_the_databases_digests_and_original_ids(db, db_params, app_repo, run_app):
    load(db)
    sessions = app_repo / "baileys_sessions"
    ok, result = run_module(baileys_auth_export, dict(db_params, dest=str(sessions), keep_backup=False))
    assert ok, result.get("msg")
    status, report = read_with_baileys(app_repo, run_app, db_params, sessions)
    assert status == 200, report["errors"][:5]
    assert report["store"] == "files" and report["companies"] == 3
    expected = python_digests(db)
    assert report["digests"] == expected == result["digests"]
    assert not report.get("guessedIds"), "every id comes from the company manifests, none is guessed"


def test_baileys_reads_a_refreshed_standby_tree_with_the_databases_digests(db, db_params, app_repo, run_app):
    load(db)
    standby = app_repo.parent / "baileys_sessions.standby"
    params = dict(db_params, dest=str(standby), mode="standby")
    assert run_module(baileys_auth_export, params)[0]
    with db.cursor() as cur:
        cur.execute("UPDATE whatsapp_keys SET value = '{\"_sessions\": {}, \"version\": \"v2\"}' WHERE key_type = 'session'")
        cur.execute("DELETE FROM whatsapp_keys WHERE key_type = 'pre-key' AND key_id IN ('1', '2')")
        cur.execute("UPDATE whatsapp_auth SET creds = creds || '{\"accountSyncCounter\": 9}'")
    db.commit()
    ok, result = run_module(baileys_auth_export, params)
    assert ok and result["files_written"] > 0 and result["files_deleted"] == 6
    status, report = read_with_baileys(app_repo, run_app, db_params, standby)
    assert status == 200, report["errors"][:5]
    assert report["digests"] == python_digests(db) == result["digests"]
    assert not report.get("guessedIds")
