"""The load generator against the real test application: no acknowledged write lost, and a lost one named."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request

import writer
from conftest import ROOT
from faults_helpers import wait_until
# The application fixtures are those of the application's own digest tests.
from test_app_digest import TAG, app_repo, node_modules, postgres_env, run_app  # noqa: F401

from ansible.module_utils import baileys_dr_testdata as testdata

WRITER = os.path.join(ROOT, "testbed", "bin", "writer")
FILES_ENV = {"USE_LEGACY_SUPABASE": "false", "USE_DATABASE_AUTH_STATE": "false", "USE_REPOSITORY_PATTERN": "false"}


def run_writer(*args, env=None):
    return subprocess.run([WRITER, *map(str, args)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, **(env or {})))


def requests(ledger):
    return [record for _, record in writer.requests_of(str(ledger))]


def acked_for(ledger, seconds):
    """Whether the ledger holds acknowledged requests spanning at least `seconds`."""
    acked = [r for r in requests(ledger) if r["outcome"] == "ack"] if ledger.exists() else []
    return len(acked) >= 2 and acked[-1]["done_at"] - acked[0]["done_at"] >= seconds


def start_writer(app, ledger, pid_file):
    started = run_writer("start", "--url", "http://127.0.0.1:%d" % app.port, "--ledger", ledger, "--pid-file", pid_file)
    assert started.returncode == 0, started.stderr
    pid = int(started.stdout.strip())
    assert int(pid_file.read_text()) == pid and writer.writer_process(pid) == str(ledger)
    assert requests(ledger), "start returns once the first request was attempted"
    return pid


def stop_writer(pid_file, pid):
    stopped = run_writer("stop", "--pid-file", pid_file)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.startswith("writer %d stopped (SIGTERM): " % pid) and "acknowledged" in stopped.stdout
    assert writer.writer_process(pid) is None and not pid_file.exists()


def check(ledger, *store):
    done = run_writer("check", "--ledger", ledger, *store, "--json")
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


def an_acknowledged_key(ledger):
    """(company, type, id) of a session an acknowledged request wrote (/simulate never deletes sessions)."""
    for record in requests(ledger):
        if record["outcome"] == "ack":
            for entry in record["written"]:
                if entry["type"] == "session":
                    return record["company"], entry["type"], entry["id"]
    raise AssertionError("no acknowledged session write in the ledger")


def start_files_app(app_repo, run_app):  # noqa: F811
    subprocess.run(["git", "checkout", "-q", TAG], cwd=app_repo, check=True)
    subprocess.run(["node", "tools/fixture.js", "gen-files", "--dest", "baileys_sessions", "--companies", "2", "--keys", "40"],
                   cwd=app_repo, check=True, capture_output=True)
    app = run_app(app_repo, FILES_ENV)
    status, report = app.health()
    assert status == 200 and report["store"] == "files", report["errors"][:5]
    return app


def test_no_acknowledged_write_is_lost_on_the_file_store_and_a_deleted_key_file_is_named(app_repo, run_app, tmp_path):  # noqa: F811
    app = start_files_app(app_repo, run_app)
    ledger, pid_file = tmp_path / "ledger.jsonl", tmp_path / "writer.pid"
    pid = start_writer(app, ledger, pid_file)
    wait_until(lambda: acked_for(ledger, 3), timeout=60, what="3 s of acknowledged writes")
    stop_writer(pid_file, pid)

    records = requests(ledger)
    assert len({r["seed"] for r in records}) == len(records), "every request has its own seed"
    assert {r["company"] for r in records} == {"co1", "co2"}, "the load is spread over the companies /health lists"
    sessions = app_repo / "baileys_sessions"
    status, report = check(ledger, "--store", "files", "--sessions", sessions)
    assert status == 0 and report["lost"] == 0 and report["ambiguous"] == 0, report
    assert report["unverified"] == 0, "every key and creds checked against the hash the service acknowledged"
    assert report["acknowledged"] >= 3 and report["writes_acked"] >= 4 * report["acknowledged"]
    assert report["deletes_acked"] == report["acknowledged"], "each request consumed one pre-key"

    company, key_type, key_id = an_acknowledged_key(ledger)
    (sessions / ("company_" + company) / writer.codec.key_file_name(key_type, key_id)).unlink()
    status, report = check(ledger, "--store", "files", "--sessions", sessions)
    assert status == 1 and report["lost"] == 1
    assert [(e["company"], e["type"], e["id"]) for e in report["lost_examples"]] == [(company, key_type, key_id)]


def test_the_writer_rides_out_a_stopped_service_and_measures_the_downtime(app_repo, run_app, tmp_path):  # noqa: F811
    app = start_files_app(app_repo, run_app)
    ledger, pid_file = tmp_path / "ledger.jsonl", tmp_path / "writer.pid"
    pid = start_writer(app, ledger, pid_file)
    wait_until(lambda: acked_for(ledger, 1), timeout=60, what="acknowledged writes")
    app.stop()
    stopped_at = time.time()
    wait_until(lambda: sum(r["outcome"] == "failed" and r["done_at"] > stopped_at for r in requests(ledger)) >= 3,
               timeout=60, what="requests refused while the service is down")
    app.proc = subprocess.Popen(["node", "src/index.js"], cwd=app_repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={k: v for k, v in os.environ.items() if not k.startswith(("PG", "POSTGRES_", "USE_"))})
    restarted_at = time.time()
    wait_until(lambda: sum(r["outcome"] == "ack" and r["done_at"] > restarted_at for r in requests(ledger)) >= 3,
               timeout=120, what="acknowledged writes after the restart")
    stop_writer(pid_file, pid)

    status, report = check(ledger, "--store", "files", "--sessions", app_repo / "baileys_sessions")
    assert status == 0 and report["lost"] == 0, report
    downtime = report["downtime"]
    assert downtime["seconds"] >= restarted_at - stopped_at - 0.5 and downtime["not_acknowledged_between"] >= 3
    window = run_writer("stats", "--ledger", ledger, "--from", stopped_at - 1, "--to", writer.iso(time.time()), "--json")
    assert window.returncode == 0 and json.loads(window.stdout)["downtime"] == downtime


def simulate_answers_on_postgres(app):
    body = json.dumps({"company": "wr00001", "newKeys": 0, "consumePreKeys": 0, "touchCreds": False, "seed": "probe"})
    request = urllib.request.Request("http://127.0.0.1:%d/simulate" % app.port, data=body.encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status == 200
    except urllib.error.HTTPError:
        return False


def test_no_acknowledged_write_is_lost_on_the_postgres_store_and_a_deleted_row_is_named(db, db_params, app_repo, run_app, tmp_path):  # noqa: F811
    testdata.load(db, "writer", 2, 40, prefix="wr")
    app = run_app(app_repo, postgres_env(db_params))
    status, report = app.health()
    assert status == 200 and report["store"] == "postgres", report["errors"][:5]
    assert simulate_answers_on_postgres(app), "POST /simulate answers on the PostgreSQL store"
    ledger, pid_file = tmp_path / "ledger.jsonl", tmp_path / "writer.pid"
    pid = start_writer(app, ledger, pid_file)
    wait_until(lambda: acked_for(ledger, 3), timeout=60, what="3 s of acknowledged writes")
    stop_writer(pid_file, pid)

    libpq = {"PGHOST": db_params["login_host"], "PGPORT": str(db_params["login_port"]), "PGUSER": db_params["login_user"],
             "PGPASSWORD": db_params["login_password"], "PGDATABASE": db_params["login_db"]}
    done = run_writer("check", "--ledger", ledger, "--store", "postgres", "--json", env=libpq)
    assert done.returncode in (0, 1), done.stderr
    report = json.loads(done.stdout)
    assert done.returncode == 0 and report["lost"] == 0 and report["unverified"] == 0, report
    assert report["acknowledged"] >= 3 and report["creds_checked"] == 2
    # One transaction a request: the writer keeps close to its default 5 requests/s (bound generous for a busy machine).
    assert report["stats"]["acks_per_second"] >= 3, report["stats"]

    company, key_type, key_id = an_acknowledged_key(ledger)
    with db.cursor() as cur:
        cur.execute("DELETE FROM whatsapp_keys WHERE company_id = %s AND key_type = %s AND key_id = %s", (company, key_type, key_id))
    db.commit()
    url = "postgresql://%s:%s@%s:%s/%s" % (db_params["login_user"], db_params["login_password"], db_params["login_host"],
                                          db_params["login_port"], db_params["login_db"])
    done = run_writer("check", "--ledger", ledger, "--store", "postgres", "--db-url", url)
    assert done.returncode == 1, done.stderr
    assert "LOST: company %s session %s: missing" % (company, json.dumps(key_id)) in done.stdout
    assert db_params["login_password"] not in done.stdout + done.stderr
