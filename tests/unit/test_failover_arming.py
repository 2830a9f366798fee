"""baileys_failover_arming on a real git repository, standby manifest and ecosystem file: a record written by a refresh
holds until the tag moves, the standby generation changes, the PM2 definition changes or it grows too old."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

import baileys_failover_arming
from module_harness import run_module

from ansible.module_utils.baileys_dr_arming import read_arming_state

TAG = "emergency-file-fallback-v1"
FLAGS = ["USE_LEGACY_SUPABASE", "USE_DATABASE_AUTH_STATE", "USE_REPOSITORY_PATTERN"]
GIT_ENV = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@x", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@x")


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env=GIT_ENV).stdout.strip()


def commit(repo, path, text, message):
    target = repo / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    git(repo, "add", path)
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def write_manifest(standby, generation):
    meta = standby / ".baileys-dr"
    meta.mkdir(parents=True, exist_ok=True)
    (meta / "manifest.json").write_text(json.dumps({"format": 1, "generation": generation, "snapshot_at": "2026-12-07T03:00:00Z",
                                                    "companies": {"acme": {"digest": "d" * 64, "fingerprint": "f"}}}))


@pytest.fixture
def host(tmp_path):
    """An application host: the app's repository with the annotated tag carrying the file-auth code, its .env and
    ecosystem file, a standby copy at generation 7."""
    app = tmp_path / "app"
    app.mkdir()
    git(app, "init", "-q", "-b", "main")
    commit(app, "src/stores/files.js", "const { useMultiFileAuthState } = require('baileys');\n", "file store")
    git(app, "tag", "-a", TAG, "-m", "file-auth emergency version")
    commit(app, "src/stores/files.js", "// PostgreSQL now\n", "postgres store")
    (app / ".gitignore").write_text(".env\necosystem.config.js\n")
    (app / ".env").write_text("USE_LEGACY_SUPABASE=false\nUSE_DATABASE_AUTH_STATE=true\nPOSTGRES_PASSWORD=hunter2hunter2\n")
    (app / "ecosystem.config.js").write_text("module.exports = {apps: [{name: 'baileys-whatsapp-service', script: 'src/index.js'}]};\n")
    standby = tmp_path / "baileys_sessions.standby"
    write_manifest(standby, 7)
    return tmp_path


def args(host, **extra):
    base = {"path": str(host / "state" / "failover-arming.json"), "app_root": str(host / "app"), "tag": TAG,
            "marker_path": "src/stores/files.js", "marker_regex": "useMultiFileAuthState", "app_name": "baileys-whatsapp-service",
            "pm2_bin": "/bin/true", "pm2_home": str(host / "pm2"), "store_flags": FLAGS,
            "standby_dir": str(host / "baileys_sessions.standby"), "sessions_dir": str(host / "app" / "baileys_sessions")}
    return dict(base, **extra)


def arm(host, **extra):
    ok, result = run_module(baileys_failover_arming, args(host, **extra))
    assert ok, result
    return result


def verify(host, **extra):
    ok, result = run_module(baileys_failover_arming, args(host, state="verify", **extra))
    assert ok, result
    return result


def test_a_refresh_arms_the_host_and_the_failover_confirms_the_record(host):
    written = arm(host, verified_generation=7)
    assert written["armed"] and written["problems"] == [] and written["changed"]
    record = json.loads((host / "state" / "failover-arming.json").read_text())
    assert record["tag"]["commit"] == git(host / "app", "rev-parse", TAG + "^{commit}")
    assert record["standby"]["generation"] == 7 and record["env_changes"]["USE_DATABASE_AUTH_STATE"] == {"from": "true", "to": "false"}
    assert record["env_changes"]["USE_REPOSITORY_PATTERN"] == {"from": None, "to": "false"}
    assert "hunter2" not in json.dumps(record), "no secret of .env in the record"
    assert oct(os.stat(host / "state" / "failover-arming.json").st_mode & 0o777) == "0o600"

    confirmed = verify(host)
    assert confirmed["armed"] and confirmed["reasons"] == [], confirmed
    assert confirmed["standby"]["generation"] == 7 and confirmed["standby"]["digests"] == {"acme": "d" * 64}
    assert confirmed["armed_since"] == record["armed_since"]


def test_armed_since_survives_refreshes_that_find_the_same_tag_and_pm2_definition(host):
    first = arm(host)["record"]
    path = host / "state" / "failover-arming.json"
    record = json.loads(path.read_text())
    record["armed_since"], record["armed_since_epoch"] = "2026-12-01T00:00:00Z", 1764547200.0
    path.write_text(json.dumps(record))
    write_manifest(host / "baileys_sessions.standby", 8)
    second = arm(host)["record"]
    assert first["armed"] and second["armed_since"] == "2026-12-01T00:00:00Z" and second["standby"]["generation"] == 8


def test_moved_tag_is_detected(host):
    arm(host)
    app = host / "app"
    commit(app, "src/stores/files.js", "const { useMultiFileAuthState } = require('baileys'); // v2\n", "other")
    git(app, "tag", "-f", "-a", TAG, "-m", "moved")
    result = verify(host)
    assert not result["armed"] and any("moved" in r for r in result["reasons"]), result
    assert "standby" not in result


def test_deleted_tag_is_detected(host):
    arm(host)
    git(host / "app", "tag", "-d", TAG)
    result = verify(host)
    assert not result["armed"] and any("nothing (deleted)" in r for r in result["reasons"]), result


def test_changed_manifest_generation_is_detected(host):
    arm(host)
    write_manifest(host / "baileys_sessions.standby", 8)
    result = verify(host)
    assert not result["armed"] and any("generation 8" in r and "generation 7" in r for r in result["reasons"]), result


def test_missing_standby_manifest_is_detected(host):
    arm(host)
    os.unlink(host / "baileys_sessions.standby" / ".baileys-dr" / "manifest.json")
    result = verify(host)
    assert not result["armed"] and any("no manifest" in r for r in result["reasons"]), result


def test_changed_pm2_definition_is_detected(host):
    arm(host)
    (host / "app" / "ecosystem.config.js").write_text("module.exports = {apps: [{name: 'baileys-whatsapp-service', instances: 2}]};\n")
    result = verify(host)
    assert not result["armed"] and any("PM2 definition" in r and "ecosystem_sha256" in r for r in result["reasons"]), result
    other_daemon = verify(host, pm2_home=str(host / "other-pm2"))
    assert any("pm2_home" in r for r in other_daemon["reasons"]), other_daemon


def test_too_old_record_is_detected(host):
    arm(host)
    path = host / "state" / "failover-arming.json"
    record = json.loads(path.read_text())
    record["checked_at_epoch"] = time.time() - 7200
    path.write_text(json.dumps(record))
    result = verify(host, max_age=3600)
    assert not result["armed"] and any("older than max_age 3600" in r for r in result["reasons"]), result
    assert read_arming_state(str(path), 3600)["armed"] is False


def test_missing_or_broken_record_is_not_armed_and_says_why(host):
    result = verify(host)
    assert not result["armed"] and "no arming record" in result["reasons"][0]
    (host / "state").mkdir()
    (host / "state" / "failover-arming.json").write_text("{not json")
    result = verify(host)
    assert not result["armed"] and "not JSON" in result["reasons"][0]


def test_a_refresh_that_finds_the_tag_without_the_file_auth_code_records_the_host_as_not_armed(host):
    written = arm(host, marker_regex="somethingElse")
    assert not written["armed"] and written["problems"][0].startswith("tag: marker"), written
    result = verify(host)
    assert not result["armed"] and "not ready" in result["reasons"][0] and "marker" in result["reasons"][0]
    state = read_arming_state(args(host)["path"], 3600)
    assert state["armed"] is False and state["problems"]


def test_check_mode_writes_nothing_and_shows_the_record(host):
    ok, result = run_module(baileys_failover_arming, dict(args(host), _ansible_diff=True), check_mode=True)
    assert ok and result["changed"] and result["armed"] and '"armed": true' in result["diff"]["after"]
    assert not (host / "state" / "failover-arming.json").exists()


def test_bad_tag_name_is_refused_naming_it(host):
    ok, result = run_module(baileys_failover_arming, args(host, tag="--upload-pack=x"))
    assert not ok and "tag" in result["msg"]


def test_health_reads_armed_and_since_when(host):
    arm(host)
    state = read_arming_state(args(host)["path"], 3600)
    assert state["armed"] and state["armed_since"] and state["problems"] == []


def test_health_samples_say_armed_and_since_when(host):
    from ansible.module_utils import baileys_dr_health as health

    arm(host)
    checker = health.DbHealth({"thresholds": {}, "protected_types": ["pre-key"]})
    checker.result.update(arming=read_arming_state(args(host)["path"], 3600))
    samples = {m["name"]: m["value"] for m in checker.metrics()}
    record = json.loads((host / "state" / "failover-arming.json").read_text())
    assert samples["baileys_dr_failover_armed"] == 1.0
    assert samples["baileys_dr_failover_armed_since_timestamp_seconds"] == record["armed_since_epoch"]


def test_the_confirmation_also_reads_the_switch_journal_and_the_services_store_in_the_same_run(host):
    import http.server
    import threading

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"store": "postgres", "ready": True, "pid": 42}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state = host / "state" / "failover-state.json"
    state.parent.mkdir(parents=True, exist_ok=True)
    try:
        arm(host)
        url = "http://127.0.0.1:%d/health" % server.server_address[1]
        result = verify(host, state_file=str(state), health_url=url)
        assert result["armed"] and result["service"] == {"answered": True, "store": "postgres", "ready": True}
        assert result["journal"] == {"readable": True, "exists": False, "operation": None, "phase": None}
        # An interrupted switch: its phase, never the .env values the state file keeps for the rollback.
        state.write_text(json.dumps({"env_before": {"POSTGRES_PASSWORD": "hunter2hunter2"},
                                     "switch": {"operation": "failover", "phase": "switched"}}))
        result = verify(host, state_file=str(state), health_url=url)
        assert result["journal"] == {"readable": True, "exists": True, "operation": "failover", "phase": "switched"}
        assert "hunter2hunter2" not in json.dumps(result)
        state.write_text("not json")
        assert verify(host, state_file=str(state))["journal"]["readable"] is False
    finally:
        server.shutdown()
        server.server_close()
    # Nothing answers any more: a service that is down says so, it is no error.
    assert verify(host, health_url=url)["service"] == {"answered": False, "store": None, "ready": False}


def test_the_failover_takes_its_lease_in_the_arming_run_and_a_live_holder_refuses_before_anything_is_read(host):
    """One module run before the switch: the lease is taken by the arming module's own run."""
    arm(host, verified_generation=7)
    lease = {"name": "failover-app1", "lock_dir": str(host / "locks"), "operation": "failover",
             "holder": {"run_id": "run-a", "control_node": "ops-laptop", "pid": 0, "user": "ops", "playbook": "failover.yml"}}
    confirmed = verify(host, lease=lease)
    assert confirmed["armed"] and confirmed["lease"]["holder"]["run_id"] == "run-a"
    assert json.loads((host / "locks" / "failover-app1.lease").read_text())["run_id"] == "run-a"
    other = dict(lease, holder=dict(lease["holder"], run_id="run-b"))
    ok, refused = run_module(baileys_failover_arming, args(host, state="verify", lease=other))
    assert not ok and refused["msg"].startswith("failover on this host refused: failover holds the lease")
    assert "run run-a" in refused["msg"] and "armed" not in refused


def test_the_confirmation_also_says_whether_postgresql_answers_without_leaking_the_password(host):
    arm(host)
    # Nothing listens on port 1: refused at once, as a stopped database is.
    result = verify(host, ping_database=True, login_host="127.0.0.1", login_port=1, login_user="baileys",
                    login_password="s3cret-pw-9931", login_db="baileys", connect_timeout=2)
    assert result["armed"], "the record still holds: only the database is gone"
    assert result["database"]["available"] is False
    assert "127.0.0.1" in result["database"]["problem"]
    assert "s3cret-pw-9931" not in json.dumps(result)
    assert "database" not in verify(host), "no connection unless asked"


def test_a_database_that_answers_is_available():
    from ansible.module_utils import baileys_dr_arming

    class Cursor:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def execute(self, sql):
            self.sql = sql

        def fetchone(self):
            return (1,)

    class Conn:
        closed = False

        def cursor(self):
            return Cursor()

        def close(self):
            Conn.closed = True

    seen = {}

    def connector(params, application_name, autocommit):
        seen.update(application_name=application_name, autocommit=autocommit, host=params["login_host"])
        return Conn()

    assert baileys_dr_arming.ping_database({"login_host": "db"}, connector=connector) == {"available": True, "problem": None}
    assert seen == {"application_name": "baileys-dr-failover-ping", "autocommit": True, "host": "db"} and Conn.closed
