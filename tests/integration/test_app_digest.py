"""The test application (real Baileys) and Python agree on every company's state."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request

import pytest

import baileys_auth_export
from conftest import ROOT
from module_harness import run_module
from pgcluster import free_port

from ansible.module_utils import baileys_dr_testdata as testdata
from ansible.module_utils.baileys_dr_store import company_digest, list_companies

TAG = "emergency-file-fallback-v1"


@pytest.fixture(scope="session")
def node_modules():
    path = os.environ.get("APP_NODE_MODULES")
    if not path:
        out = subprocess.run([os.path.join(ROOT, "testbed", "bin", "install-node-deps"), "--app-only"],
                             check=True, capture_output=True, text=True).stdout
        path = [ln.split("=", 1)[1] for ln in out.splitlines() if ln.startswith("APP_NODE_MODULES=")][0]
    return path


@pytest.fixture
def app_repo(tmp_path, node_modules):
    dest = tmp_path / "app"
    subprocess.run([os.path.join(ROOT, "testbed", "bin", "make-app-repo"), str(dest), "--node-modules", node_modules],
                   check=True, capture_output=True)
    return dest


class App:
    """The test application started directly with node (no PM2 needed here)."""

    def __init__(self, root, env):
        self.root = root
        self.port = free_port()
        lines = ["%s=%s" % item for item in dict(env, HEALTH_PORT=self.port).items()]
        (root / ".env").write_text("\n".join(lines) + "\n")
        clean_env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "POSTGRES_", "USE_"))}
        self.proc = subprocess.Popen(["node", "src/index.js"], cwd=root, env=clean_env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def health(self, timeout=180):
        """(status, report) once a load and its verification have finished (the digests are complete or
        an error is known), or the last answer at the timeout. Ready comes before the verification ends.
        A store unavailable at this revision is never loaded (no loadedAt): its error settles the answer."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            answer = None
            try:
                with urllib.request.urlopen("http://127.0.0.1:%d/health" % self.port, timeout=30) as resp:
                    answer = (resp.status, json.load(resp))
            except urllib.error.HTTPError as exc:  # a 503 (not ready) is an answer too
                answer = (exc.code, json.load(exc))
            except (urllib.error.URLError, ConnectionError):
                pass
            if answer:
                last = answer
                status, report = answer
                if not report.get("loading") and not report.get("verifying") and (
                        report.get("digestsComplete") or (status != 200 and (report.get("loadedAt") or report.get("errors")))):
                    return last
            assert self.proc.poll() is None, "the application exited with %s" % self.proc.returncode
            time.sleep(0.3)
        if last:
            return last
        raise AssertionError("no readiness answer within %ds" % timeout)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture
def run_app():
    started = []

    def start(root, env):
        app = App(root, env)
        started.append(app)
        return app

    yield start
    for app in started:
        app.stop()


def postgres_env(db_params, use_db="true"):
    return {
        "USE_LEGACY_SUPABASE": "false", "USE_DATABASE_AUTH_STATE": use_db, "USE_REPOSITORY_PATTERN": use_db,
        "POSTGRES_HOST": db_params["login_host"], "POSTGRES_PORT": db_params["login_port"],
        "POSTGRES_DB": db_params["login_db"], "POSTGRES_USER": db_params["login_user"],
        "POSTGRES_PASSWORD": db_params["login_password"],
    }


def python_digests(db):
    return {company: company_digest(db, company)[0] for company in list_companies(db)}


def write_baileys_files(db_params, sessions):
    """The database's state as Baileys' useMultiFileAuthState files, written by baileys_auth_export (with its manifests)."""
    ok, result = run_module(baileys_auth_export, dict(db_params, dest=str(sessions), keep_backup=False))
    assert ok, result.get("msg")
    return result


def test_node_and_python_digests_agree_on_1000_generated_companies(db, db_params, app_repo, run_app):
    testdata.load(db, "thousand", 1000, 12)
    app = run_app(app_repo, postgres_env(db_params))
    status, report = app.health()
    assert status == 200, report["errors"][:5]
    assert report["store"] == "postgres" and report["companies"] == 1000
    assert report["digestsComplete"] and report["readyAt"] <= report["verifiedAt"]
    assert report["digests"] == python_digests(db)


def test_baileys_reads_the_files_with_the_databases_digests(db, db_params, app_repo, run_app):
    testdata.load(db, "files", 3, 400)
    write_baileys_files(db_params, app_repo / "baileys_sessions")
    subprocess.run(["git", "checkout", "-q", TAG], cwd=app_repo, check=True)
    app = run_app(app_repo, postgres_env(db_params, use_db="false"))
    status, report = app.health()
    assert status == 200, report["errors"][:5]
    assert report["store"] == "files" and report["companies"] == 3
    assert report["digests"] == python_digests(db)


def test_missing_creds_make_the_application_not_ready_instead_of_fresh_creds(db, db_params, app_repo, run_app):
    testdata.load(db, "files", 2, 20)
    write_baileys_files(db_params, app_repo / "baileys_sessions")
    creds = app_repo / "baileys_sessions" / "company_company00002" / "creds.json"
    creds.unlink()
    subprocess.run(["git", "checkout", "-q", TAG], cwd=app_repo, check=True)
    app = run_app(app_repo, postgres_env(db_params, use_db="false"))
    status, report = app.health()
    assert status == 503 and report["ready"] is False
    assert any("company00002" in error for error in report["errors"])
    assert not creds.exists(), "Baileys must not have been allowed to create fresh creds"


def test_truncated_creds_make_the_application_not_ready(db, db_params, app_repo, run_app):
    testdata.load(db, "files", 1, 20)
    write_baileys_files(db_params, app_repo / "baileys_sessions")
    creds = app_repo / "baileys_sessions" / "company_company00001" / "creds.json"
    creds.write_text(creds.read_text()[:40])
    subprocess.run(["git", "checkout", "-q", TAG], cwd=app_repo, check=True)
    app = run_app(app_repo, postgres_env(db_params, use_db="false"))
    status, report = app.health()
    assert status == 503
    assert any("company00001" in error for error in report["errors"])


def test_file_store_is_unavailable_on_main(db_params, app_repo, run_app):
    shutil.rmtree(app_repo / "baileys_sessions", ignore_errors=True)
    app = run_app(app_repo, postgres_env(db_params, use_db="false"))
    status, report = app.health(timeout=60)
    assert status == 503 and report["store"] == "files"
    assert report["errors"]
