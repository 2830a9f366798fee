"""Failback of changes real Baileys made on files (the test application's POST /simulate), read back by the application."""

from __future__ import annotations

import json
import subprocess
import urllib.request

import baileys_auth_export
import baileys_auth_import
from module_harness import run_module
# The application fixtures and helpers are those of the application's own digest tests.
from test_app_digest import TAG, app_repo, node_modules, postgres_env, python_digests, run_app  # noqa: F401
from test_export_app import load


def simulate(app, company, **request):
    body = json.dumps(dict(request, company=company)).encode("utf-8")
    req = urllib.request.Request("http://127.0.0.1:%d/simulate" % app.port, data=body, method="POST",
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.load(resp)


def test_keys_and_creds_baileys_wrote_on_files_come_back_with_the_digests_the_application_reports(
        db, db_params, app_repo, run_app, tmp_path):
    load(db)
    sessions = app_repo / "baileys_sessions"
    ok, exported = run_module(baileys_auth_export, dict(db_params, dest=str(sessions), keep_backup=False))
    assert ok, exported.get("msg")
    # The service on files (the emergency tag), changing the files through Baileys' own useMultiFileAuthState.
    subprocess.run(["git", "checkout", "-q", TAG], cwd=app_repo, check=True)
    app = run_app(app_repo, dict(postgres_env(db_params, use_db="false"), SESSIONS_DIR=str(sessions)))
    status, report = app.health()
    assert status == 200 and report["store"] == "files", report.get("errors")
    changes = {company: simulate(app, company, newKeys=11, consumePreKeys=2) for company in sorted(report["digests"])}
    for change in changes.values():
        assert len(change["written"]) == 11 and len(change["deleted"]) == 2 and change["creds_changed"]
        assert any("::" in w["id"] for w in change["written"]) and any("/" in w["id"] for w in change["written"])
    status, on_files = app.health()
    assert status == 200 and on_files["digests"] != exported["digests"]
    app.stop()

    ok, result = run_module(baileys_auth_import, dict(db_params, src=str(sessions), undo_dir=str(tmp_path / "undo"),
                                                       since=exported["snapshot_at"]))
    assert ok, result.get("msg")
    assert result["ambiguous_count"] == 0 and sorted(result["committed"]) == sorted(changes)
    for company, change in changes.items():
        counts = result["companies"][company]
        assert (counts["inserted"], counts["deleted"], counts["creds"]) == (11, 2, "updated")
    assert python_digests(db) == on_files["digests"] == result["digests"]
    with db.cursor() as cur:
        cur.execute("SELECT value::text FROM whatsapp_keys WHERE key_type = 'pre-key' AND updated_at > %s", (exported["snapshot_at"],))
        new_pre_keys = [r[0] for r in cur.fetchall()]
    db.rollback()
    assert new_pre_keys and all('"data": [' in v for v in new_pre_keys), "the application's own Buffer form"

    # The service back on PostgreSQL reads the same state.
    app = run_app(app_repo, postgres_env(db_params, use_db="true"))
    status, on_postgres = app.health()
    assert status == 200 and on_postgres["store"] == "postgres", on_postgres.get("errors")
    assert on_postgres["digests"] == on_files["digests"]
