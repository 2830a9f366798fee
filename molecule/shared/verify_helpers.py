"""Helpers shared by the Molecule scenarios' testinfra tests."""

from __future__ import annotations

import json
import re
import os
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DB_CONTAINER = "baileys-dr-db"
APP_USER = "baileys"
APP_NAME = "baileys-whatsapp-service"


def import_module_utils():
    import ansible.module_utils

    path = os.path.join(ROOT, "module_utils")
    if path not in ansible.module_utils.__path__:
        ansible.module_utils.__path__.append(path)


def db_params():
    """Connection to the db container from the control node (its bridge address)."""
    address = subprocess.run(
        ["docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}", DB_CONTAINER],
        check=True, capture_output=True, text=True,
    ).stdout.split()[0]
    return {
        "login_host": address,
        "login_port": 5432,
        "login_user": "baileys",
        "login_db": "baileys",
        "login_password": os.environ.get("BAILEYS_DR_MOLECULE_DB_PASSWORD") or "molecule-only-db-password",
    }


def database_digests():
    """{company: digest} computed by Python from the database rows."""
    import_module_utils()
    from ansible.module_utils.baileys_dr_postgres import connect
    from ansible.module_utils.baileys_dr_store import company_digest, list_companies

    conn = connect(db_params())
    try:
        return {company: company_digest(conn, company)[0] for company in list_companies(conn)}
    finally:
        conn.close()


def readiness(host, port=3011, timeout=120):
    """/health once the application has settled: its key verification finished (digestsComplete) or found an
    error (ready false); the digests are partial before that."""
    deadline = time.monotonic() + timeout
    while True:
        result = host.run("curl -s -w '\\n%%{http_code}' http://127.0.0.1:%d/health" % port)
        body, _, status = result.stdout.rstrip().rpartition("\n")
        report = json.loads(body) if body else {}
        settled = not report.get("loading") and not report.get("verifying") and (
            report.get("digestsComplete") or not report.get("ready"))
        if settled or time.monotonic() > deadline:
            return int(status or 0), report
        time.sleep(0.5)


def pm2_process(host):
    out = host.run("su - %s -c 'pm2 jlist'" % APP_USER).stdout
    line = next((ln for ln in out.splitlines() if re.match(r"\s*\[\s*[{\]]", ln)), "[]")
    return next((p for p in json.loads(line) if p["name"] == APP_NAME), None)


APP_ROOT = "/srv/baileys-app"
SESSIONS = APP_ROOT + "/baileys_sessions"
STATE_FILE = "/var/lib/baileys-dr/failover-state.json"
TAG = "emergency-file-fallback-v1"


def as_app_user(host, command):
    return host.run("su %s -c %s" % (APP_USER, "'" + command.replace("'", "'\\''") + "'"))


def git_head(host):
    return as_app_user(host, "git -C %s rev-parse HEAD" % APP_ROOT).stdout.strip()


def git_commit_of(host, ref):
    return as_app_user(host, "git -C %s rev-parse %s^{commit}" % (APP_ROOT, ref)).stdout.strip()


def env_values(host):
    values = {}
    for line in host.file(APP_ROOT + "/.env").content_string.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def manifest(host):
    return json.loads(host.file(SESSIONS + "/.baileys-dr/manifest.json").content_string)


# The writer (testbed/bin/writer) in the switch scenarios: what converge kept (molecule/shared/tasks/writer_check.yml).
WRITER_RESULT = "/root/molecule-writer.json"
# molecule/shared/group_vars/all/writer.yml: acknowledged requests converge waited for on each side of the switch.
WRITER_ACKS_BEFORE = 10
WRITER_ACKS_AFTER = 3


def writer_result(host):
    return json.loads(host.file(WRITER_RESULT).content_string)


def epoch(iso):
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def assert_no_acknowledged_write_lost(result, store):
    """The ledger check passed on the store the service uses after the switch, over writes on both sides of it."""
    check = result["check"]
    assert result["store"] == check["store"] == store
    assert check["passed"] and check["lost"] == 0, (check.get("lost_examples"), check.get("problems"))
    assert check["writes_acked"] > 0 and check["keys_checked"] > 0 and check["creds_checked"] > 0
    stats = result["stats"]
    # Not vacuous: the writer was acknowledged before the service was stopped and again once it was ready.
    assert stats["before_stop"]["acknowledged"] >= WRITER_ACKS_BEFORE, stats["before_stop"]
    assert stats["after_start"]["acknowledged"] >= WRITER_ACKS_AFTER, stats["after_start"]
    assert check["acknowledged"] >= stats["before_stop"]["acknowledged"] + stats["after_start"]["acknowledged"]


def writer_downtime(result):
    """Seconds without an acknowledgment over the switch, as the writer saw it: the longest gap between two
    acknowledgments, or, when its run began with the service down, the time to its first acknowledgment."""
    downtime = result["stats"]["window"]["downtime"]
    return max(downtime["seconds"] or 0, downtime["head_seconds"] or 0)


def assert_writer_saw_the_switch(result):
    """The writer asked during the outage and measured it; a gap between acknowledgments spans the switch."""
    window, switch = result["stats"]["window"], result["switch"]
    assert window["failed"] >= 1, window
    assert 0 < writer_downtime(result) < 120, window["downtime"]
    downtime = window["downtime"]
    if downtime["head_seconds"]:
        # The run began with the service down (PostgreSQL stopped): it ended once the service was ready on files.
        assert epoch(window["from"]) + downtime["head_seconds"] >= switch["stop_began_at"]
    else:
        assert epoch(downtime["from"]) <= switch["ready_at"] and epoch(downtime["to"]) >= switch["stop_began_at"], (downtime, switch)


def assert_quiet_digests_equal_the_store(host, result):
    """At the quiet moment after the writer stopped, the service's digests equal the store's (computed by Python);
    nothing has changed them since (the idempotence run switches nothing)."""
    quiet = result["quiet"]
    assert quiet["service"] and quiet["service"] == quiet["store"]
    status, report = readiness(host)
    assert status == 200, report["errors"]
    assert report["store"] == result["store"]
    assert report["digests"] == quiet["service"]


def writer_ledger(host, path="/var/lib/baileys-dr/reports/molecule-writer.jsonl"):
    """The writer's request records (complete lines only)."""
    records = []
    for line in host.file(path).content_string.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("kind") == "request":
            records.append(record)
    return records
