"""baileys_db_health against a real PostgreSQL: figures, statuses, and a sick server as a result, never a failure."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time

import baileys_db_health
import baileys_testdata
import pytest
import yaml
from conftest import ROOT
from module_harness import run_module

from ansible.module_utils.baileys_dr_codec import KEY_TYPES
from ansible.module_utils.baileys_dr_postgres import connect

# Thresholds no figure of a small test store reaches: a test sets only the one it is about.
QUIET = {
    "latency_p95_seconds": {"warning": 30, "critical": 60},
    "connections_ratio": {"warning": 0.99, "critical": 1},
    "waiting_locks": {"warning": 1000, "critical": 2000},
    "lock_wait_seconds": {"warning": 3600, "critical": 7200},
    "companies_without_keys": {"warning": None},
    "companies_keys_without_creds": {"warning": None},
}


def health(db_params, check_mode=False, **args):
    ok, result = run_module(baileys_db_health, dict(db_params, **args), check_mode=check_mode)
    assert ok, result
    assert result["changed"] is False
    return result


def seed(db_params, companies=2, keys_per_company=40):
    ok, result = run_module(baileys_testdata, dict(db_params, companies=companies, keys_per_company=keys_per_company))
    assert ok, result


def insert(db, sql, rows):
    with db.cursor() as cur:
        cur.executemany(sql, rows)
    db.commit()


def test_a_healthy_store_reports_every_figure(db, db_params):
    seed(db_params)
    result = health(db_params, thresholds=QUIET)
    assert result["reachable"] and result["status"] == "healthy", result["checks"]
    assert result["server"]["version"].startswith("15") and result["server"]["in_recovery"] is False
    assert result["keys"]["total"] == 80
    assert sum(result["keys"]["by_type"].values()) == 80
    assert set(result["keys"]["by_type"]) <= set(KEY_TYPES)
    assert sum(result["keys"]["age_buckets"].values()) == 80
    assert result["companies"]["total"] == 2 and result["companies"]["without_keys"] == 0
    assert result["companies"]["keys_without_creds"]["companies"] == 0
    assert set(result["tables"]) == {"whatsapp_auth", "whatsapp_keys"}
    keys_table = result["tables"]["whatsapp_keys"]
    assert keys_table["size_bytes"] > 0 and keys_table["indexes_size_bytes"] > 0
    assert "whatsapp_keys_pkey" in keys_table["indexes"]
    assert sum(keys_table["indexes"].values()) == keys_table["indexes_size_bytes"]
    assert result["connections"]["max_connections"] == 50
    assert any(c["application"] == "baileys-dr-health" and c["state"] == "active" for c in result["connections"]["by_application"])
    assert result["checks"]["role"]["value"] == "primary"


def test_latency_quantiles_are_present_and_ordered(db, db_params):
    seed(db_params, companies=1, keys_per_company=30)
    latency = health(db_params, probes=25)["latency"]
    assert latency["probes"] == 25 and latency["shape"] == "key lookup"
    assert 0 < latency["min_seconds"] <= latency["p50_seconds"] <= latency["p95_seconds"] <= latency["p99_seconds"] <= latency["max_seconds"]
    assert latency["min_seconds"] <= latency["avg_seconds"] <= latency["max_seconds"]


def test_the_probes_run_the_applications_key_lookup(db, db_params):
    seed(db_params, companies=1, keys_per_company=10)
    queries = health(db_params)["queries"]
    assert "SELECT value FROM whatsapp_keys WHERE company_id = $1 AND key_type = $2 AND key_id = $3" in queries
    assert "SET default_transaction_read_only = on" in queries


def test_statuses_follow_the_thresholds(db, db_params):
    seed(db_params, companies=1, keys_per_company=10)
    assert health(db_params, thresholds=QUIET)["status"] == "healthy"
    warning = health(db_params, thresholds=dict(QUIET, latency_p95_seconds={"warning": 0, "critical": 60}))
    assert warning["checks"]["latency_p95_seconds"]["status"] == "warning"
    assert warning["status"] == "warning"
    critical = health(db_params, thresholds=dict(QUIET, connections_ratio={"warning": 0, "critical": 0}))
    assert critical["checks"]["connections_ratio"]["status"] == "critical"
    assert critical["status"] == "critical"
    assert critical["thresholds"]["connections_ratio"] == {"warning": 0, "critical": 0}
    # Levels merge over the defaults one by one.
    merged = health(db_params, thresholds={"latency_p95_seconds": {"warning": 0.2}})["thresholds"]
    assert merged["latency_p95_seconds"] == {"warning": 0.2, "critical": 0.5}
    assert merged["waiting_locks"] == {"warning": 5, "critical": 20}


def test_an_unreachable_server_is_critical_without_failing_the_task(db_params):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    result = health(dict(db_params, login_port=closed_port))
    assert result["reachable"] is False and result["status"] == "critical"
    assert result["checks"]["reachability"]["status"] == "critical"
    assert "127.0.0.1:%d" % closed_port in result["error"]
    samples = {(m["name"], tuple(sorted(m["labels"].items()))): m["value"] for m in result["metrics"]}
    assert samples[("baileys_dr_db_up", ())] == 0
    assert samples[("baileys_dr_health_status", (("check", "overall"),))] == 2
    assert db_params["login_password"] not in json.dumps(result)


def test_a_wrong_password_is_critical_and_never_echoed(db_params):
    secret = "wrong-secret-for-health"
    result = health(dict(db_params, login_password=secret))
    assert result["status"] == "critical" and result["reachable"] is False
    assert "password authentication failed" in result["error"]
    assert secret not in json.dumps(result)


def test_a_frozen_server_gives_critical_within_the_timeout_instead_of_hanging(db_params):
    """A listener that never answers stands for a stopped server (no statement_timeout is enforced there)."""
    with socket.socket() as frozen:
        frozen.bind(("127.0.0.1", 0))
        frozen.listen(1)
        started = time.monotonic()
        result = health(dict(db_params, login_port=frozen.getsockname()[1], connect_timeout=2))
        elapsed = time.monotonic() - started
    assert result["status"] == "critical" and result["reachable"] is False
    assert "within 2 s" in result["error"]
    assert elapsed < 10


def test_a_table_locked_by_a_migration_is_critical_not_a_hang(db, db_params):
    seed(db_params, companies=1, keys_per_company=10)
    locker = connect(db_params)
    try:
        with locker.cursor() as cur:
            cur.execute("LOCK TABLE whatsapp_keys IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        result = health(db_params, statement_timeout=500, connect_timeout=2, thresholds=QUIET)
        elapsed = time.monotonic() - started
    finally:
        locker.rollback()
        locker.close()
    assert result["reachable"] and result["status"] == "critical"
    assert "statement timeout" in result["errors"]["latency"]
    assert result["checks"]["latency"]["status"] == "critical"
    assert elapsed < 30


def test_companies_with_creds_but_no_keys_and_keys_without_creds_are_found(db, db_params):
    seed(db_params, companies=2, keys_per_company=10)
    insert(db, "INSERT INTO whatsapp_auth (company_id, creds) VALUES (%s, '{}')", [("lonely-1",), ("lonely-2",)])
    hostile = "evil\n\x1b[31mred"
    insert(db, "INSERT INTO whatsapp_keys (company_id, key_type, key_id, value) VALUES (%s, 'session', %s, '{}')",
           [("gone", "a"), ("gone", "b"), (hostile, "c")])
    result = health(db_params, thresholds={"latency_p95_seconds": {"warning": None, "critical": None}})
    companies = result["companies"]
    assert companies["total"] == 4 and companies["without_keys"] == 2
    assert companies["without_keys_sample"] == ["lonely-1", "lonely-2"]
    assert companies["keys_without_creds"]["companies"] == 2 and companies["keys_without_creds"]["keys"] == 3
    sample = {s["company_id"]: s["keys"] for s in companies["keys_without_creds"]["sample"]}
    assert sample["gone"] == 2
    assert sample[json.dumps(hostile)] == 1  # escaped, never raw control characters
    assert result["checks"]["companies_without_keys"]["status"] == "warning"
    assert "lonely-1" in result["checks"]["companies_without_keys"]["message"]
    assert result["checks"]["companies_keys_without_creds"]["status"] == "warning"
    limited = health(db_params, sample_size=1)["companies"]
    assert limited["without_keys_sample"] == ["lonely-1"] and len(limited["keys_without_creds"]["sample"]) == 1


def test_waiting_locks_are_detected_with_who_blocks_them(db, db_params):
    holder, waiter = connect(db_params), connect(db_params)
    blocked = threading.Thread(target=lambda: waiter.cursor().execute("SELECT pg_advisory_xact_lock(4242)"))
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(4242), pg_backend_pid()")
            holder_pid = cur.fetchone()[1]
        blocked.start()
        for _ in range(50):
            result = health(db_params, probes=1, thresholds=dict(QUIET, waiting_locks={"warning": 0, "critical": 10}))
            if result["locks"]["waiting"]:
                break
            time.sleep(0.1)
    finally:
        holder.rollback()
        blocked.join(10)
        waiter.rollback()
        holder.close()
        waiter.close()
    locks = result["locks"]
    assert locks["waiting"] == 1
    assert locks["sample"][0]["locktype"] == "advisory" and locks["sample"][0]["blocked_by"] == [holder_pid]
    assert locks["longest_wait_seconds"] >= 0
    assert result["checks"]["waiting_locks"]["status"] == "warning"


def test_expired_protected_and_age_buckets_are_counted_from_the_rows(db, db_params):
    insert(db, "INSERT INTO whatsapp_auth (company_id, creds) VALUES (%s, '{}')", [("c1",)])
    rows = [
        ("pre-key", "1", "now() - interval '2 hours'", "now() + interval '7 days'"),
        ("pre-key", "2", "now() - interval '3 days'", "now() - interval '1 day'"),
        ("session", "3", "now() - interval '10 days'", "now() - interval '3 days'"),
        ("identity-key", "4", "now() - interval '20 days'", "now() - interval '6 days'"),
        ("session", "5", "now() - interval '40 days'", "NULL"),
        ("not-a-baileys-type", "6", "now() - interval '40 days'", "NULL"),
    ]
    with db.cursor() as cur:
        for key_type, key_id, written, expires in rows:
            cur.execute("INSERT INTO whatsapp_keys (company_id, key_type, key_id, value, created_at, updated_at, expires_at) "
                        "VALUES ('c1', %%s, %%s, '{}', %s, %s, %s)" % (written, written, expires), (key_type, key_id))
    db.commit()
    result = health(db_params, thresholds={"expired_keys": {"warning": 2}})
    keys = result["keys"]
    assert keys["by_type"] == {"(unknown)": 1, "identity-key": 1, "pre-key": 2, "session": 2}
    assert keys["age_buckets"] == {"0-1d": 1, "1-7d": 1, "7-14d": 1, "14-30d": 1, "30d+": 2}
    assert keys["expired"] == 3 and keys["expired_protected"] == 2
    assert keys["protected"] == 3 and keys["unknown_types"] == 1
    assert result["checks"]["expired_keys"]["status"] == "warning"
    narrower = health(db_params, protected_types=["identity-key"])["keys"]
    assert narrower["protected"] == 1 and narrower["expired_protected"] == 1


def test_a_primary_is_critical_when_a_standby_is_expected(db, db_params):
    result = health(db_params, expected_role="standby")
    assert result["checks"]["role"]["status"] == "critical"
    assert health(db_params, expected_role="any")["checks"]["role"]["status"] == "healthy"


@pytest.fixture
def no_autovacuum(db):
    """Autovacuum must not remove the dead tuples a test counts."""
    with db.cursor() as cur:
        cur.execute("ALTER TABLE whatsapp_auth SET (autovacuum_enabled = false)")
    db.commit()
    yield
    db.rollback()
    with db.cursor() as cur:
        cur.execute("ALTER TABLE whatsapp_auth RESET (autovacuum_enabled)")
    db.commit()


def test_dead_tuples_rate_the_table_once_past_the_floor(db, db_params, no_autovacuum):
    insert(db, "INSERT INTO whatsapp_auth (company_id, creds) VALUES (%s, '{}')", [("c%d" % i,) for i in range(200)])
    with db.cursor() as cur:
        cur.execute("DELETE FROM whatsapp_auth WHERE company_id <> 'c1'")
        cur.execute("SELECT pg_stat_force_next_flush()")  # PostgreSQL 15 flushes table statistics when the backend idles
    db.commit()
    deadline = time.monotonic() + 15
    while True:  # the statistics collector reports dead tuples after a short delay
        result = health(db_params, dead_tuples_floor=100)
        if result["tables"]["whatsapp_auth"]["dead_tuples"] >= 199 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    auth = result["tables"]["whatsapp_auth"]
    assert auth["dead_tuples"] >= 199 and auth["dead_tuple_ratio"] > 0.9
    assert result["checks"]["dead_tuple_ratio"]["status"] == "critical"
    assert health(db_params)["checks"]["dead_tuple_ratio"]["status"] == "healthy"  # under the default floor of 1000


def test_metrics_are_prometheus_samples_in_base_units(db, db_params):
    seed(db_params, companies=1, keys_per_company=20)
    metrics = health(db_params, thresholds=QUIET)["metrics"]
    kinds = {}
    for sample in metrics:
        assert set(sample) == {"name", "type", "help", "value", "labels"}
        assert sample["name"].startswith("baileys_dr_") and sample["help"]
        assert sample["type"] in ("gauge", "counter")
        assert (sample["type"] == "counter") == sample["name"].endswith("_total")
        assert isinstance(sample["value"], float)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in sample["labels"].items())
        kinds.setdefault(sample["name"], (sample["type"], sample["help"]))
        assert kinds[sample["name"]] == (sample["type"], sample["help"]), "one type and help per name"
    by_name = {}
    for sample in metrics:
        by_name.setdefault(sample["name"], []).append(sample)
    assert by_name["baileys_dr_db_up"][0]["value"] == 1
    assert sorted(s["labels"]["quantile"] for s in by_name["baileys_dr_db_latency_seconds"]) == ["0.5", "0.95", "0.99"]
    assert sum(s["value"] for s in by_name["baileys_dr_keys"]) == 20
    assert {s["labels"]["bucket"] for s in by_name["baileys_dr_keys_age"]} == {"0-1d", "1-7d", "7-14d", "14-30d", "30d+"}
    assert {s["labels"]["table"] for s in by_name["baileys_dr_table_size_bytes"]} == {"whatsapp_auth", "whatsapp_keys"}
    overall = [s for s in by_name["baileys_dr_health_status"] if s["labels"]["check"] == "overall"]
    assert overall[0]["value"] == 0
    assert abs(by_name["baileys_dr_health_last_run_timestamp_seconds"][0]["value"] - time.time()) < 60


def test_check_mode_gives_the_same_read_only_result(db, db_params):
    seed(db_params, companies=1, keys_per_company=10)
    result = health(db_params, check_mode=True)
    assert result["reachable"] and result["keys"]["total"] == 10
    assert result["check_mode"] is True and health(db_params)["check_mode"] is False


@pytest.mark.parametrize("thresholds, message", [
    ({"latency": {"warning": 1}}, "unknown check 'latency'"),
    ({"waiting_locks": {"warning": 10, "critical": 5}}, "thresholds.waiting_locks: warning (10.0) is above critical (5.0)"),
    ({"waiting_locks": {"warning": "many"}}, "thresholds.waiting_locks.warning must be a number"),
    ({"waiting_locks": {"severe": 1}}, "unknown level 'severe'"),
    ({"waiting_locks": 3}, "thresholds.waiting_locks must be a dict"),
])
def test_bad_thresholds_fail_naming_the_input(db_params, thresholds, message):
    ok, result = run_module(baileys_db_health, dict(db_params, thresholds=thresholds))
    assert not ok and message in result["msg"]


# -- playbooks/health.yml on this machine (localhost against the throwaway cluster) --------------

ANSIBLE_PLAYBOOK = os.path.join(os.path.dirname(sys.executable), "ansible-playbook")


@pytest.fixture
def health_playbook(tmp_path, db_params, pg_cluster):
    """Run playbooks/health.yml on localhost with reports under tmp_path: (returncode, stdout, paths)."""
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(yaml.safe_dump({"all": {"children": {"baileys_app": {"hosts": {"localhost": {
        "ansible_connection": "local", "ansible_python_interpreter": sys.executable}}}}}}))
    paths = {"report": tmp_path / "reports" / "health.json", "metrics": tmp_path / "metrics" / "baileys_dr_db_health.prom"}
    settings = {
        "baileys_dr_db_host": "127.0.0.1", "baileys_dr_db_port": pg_cluster.port, "baileys_dr_db_name": "baileys",
        "baileys_dr_db_user": "baileys", "baileys_dr_db_password": pg_cluster.password,
        "baileys_dr_report_dir": str(tmp_path / "reports"), "baileys_dr_metrics_dir": str(tmp_path / "metrics"),
        "baileys_dr_audit_log": str(tmp_path / "audit" / "audit.jsonl"),
        "baileys_dr_controller_audit_log": str(tmp_path / "audit" / "controller.jsonl"),
        "baileys_dr_notify_state_dir": str(tmp_path / "notify"), "baileys_dr_environment": "test",
        "baileys_dr_report_install_client": False,
    }
    settings_file = tmp_path / "settings.yml"
    settings_file.write_text(yaml.safe_dump(settings))
    settings_file.chmod(0o600)
    environ = dict(os.environ, ANSIBLE_NOCOLOR="1", BAILEYS_DR_AUDIT_LOG=str(tmp_path / "audit" / "callback.jsonl"))

    def run(*args, thresholds=None):
        command = [ANSIBLE_PLAYBOOK, "-i", str(inventory), os.path.join(ROOT, "playbooks", "health.yml"),
                   "-e", "@" + str(settings_file), "-e", json.dumps({"baileys_health_thresholds": thresholds or QUIET})]
        done = subprocess.run(command + list(args), cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300)
        return done.returncode, done.stdout + done.stderr, paths

    return run


def prometheus_samples(path):
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(path.read_text()) for s in family.samples}


def test_the_playbook_writes_the_json_report_the_textfile_and_a_summary(db, db_params, health_playbook, pg_cluster):
    seed(db_params, companies=2, keys_per_company=15)
    rc, out, paths = health_playbook("-v")
    assert rc == 0, out
    report = json.loads(paths["report"].read_text())
    assert report["status"] == "healthy" and report["operation"] == "health" and report["fails_play"] is False
    assert report["keys"]["total"] == 30 and not {"metrics", "invocation", "check_mode"} & set(report)
    assert stat.S_IMODE(paths["report"].stat().st_mode) == 0o640
    samples = prometheus_samples(paths["metrics"])
    assert samples[("baileys_dr_db_up", ())] == 1
    assert samples[("baileys_dr_health_status", (("check", "overall"),))] == 0
    assert sum(v for (name, _), v in samples.items() if name == "baileys_dr_keys") == 30
    assert "CHECK" in out and "latency_p95_seconds" in out and "HEALTHY" in out
    assert pg_cluster.password not in out and pg_cluster.password not in paths["report"].read_text()


def test_a_critical_store_fails_the_play_only_after_the_reports_are_written(db, db_params, health_playbook):
    seed(db_params, companies=1, keys_per_company=5)
    critical = dict(QUIET, latency_p95_seconds={"warning": 0, "critical": 0})
    rc, out, paths = health_playbook(thresholds=critical)
    assert rc == 2, out
    assert "is CRITICAL" in out and "latency_p95_seconds critical" in out
    report = json.loads(paths["report"].read_text())
    assert report["status"] == "critical" and report["fails_play"] is True
    assert prometheus_samples(paths["metrics"])[("baileys_dr_health_status", (("check", "latency_p95_seconds"),))] == 2



def test_fail_on_warning_fails_a_warning_store_and_never_fails_nothing(db, db_params, health_playbook):
    warning = dict(QUIET, latency_p95_seconds={"warning": 0, "critical": 60})
    rc, out, paths = health_playbook("-e", "baileys_health_fail_on=warning", thresholds=warning)
    assert rc == 2 and "is WARNING" in out
    assert json.loads(paths["report"].read_text())["fails_play"] is True
    rc, out, paths = health_playbook("-e", "baileys_health_fail_on=never",
                                     thresholds=dict(QUIET, connections_ratio={"warning": 0, "critical": 0}))
    assert rc == 0, out
    assert json.loads(paths["report"].read_text())["status"] == "critical"


def test_check_mode_checks_but_writes_no_report(db, db_params, health_playbook):
    rc, out, paths = health_playbook("--check")
    assert rc == 0, out
    assert "check mode: no report written" in out
    assert not paths["report"].exists() and not paths["metrics"].exists()


def test_an_application_hosts_companies_scope_the_key_company_and_pre_key_figures(db, db_params):
    seed(db_params, companies=3, keys_per_company=40)
    with db.cursor() as cur:
        cur.execute("SELECT company_id FROM whatsapp_auth ORDER BY company_id")
        companies = [row[0] for row in cur.fetchall()]
    db.rollback()
    mine = companies[:2]
    result = health(db_params, thresholds=QUIET, companies=mine)
    assert result["keys"]["total"] == 80 and sum(result["keys"]["age_buckets"].values()) == 80
    assert result["companies"]["total"] == 2
    assert set(result["pre_keys"]["companies"]) <= set(mine)
    # The database's own figures stay the database's.
    assert set(result["tables"]) == {"whatsapp_auth", "whatsapp_keys"}
    assert health(db_params, thresholds=QUIET)["keys"]["total"] == 120
    ok, refused = run_module(baileys_db_health, dict(db_params, companies=["x'; DROP TABLE whatsapp_keys; --"]))
    assert not ok and "is not a company id" in refused["msg"]
