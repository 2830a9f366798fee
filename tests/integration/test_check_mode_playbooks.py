"""`--check` of whole playbooks, as the runbook tells operators to run them: nothing changes, and the plan printed
names what the real run would change.

On the embedded test bed (testbed_helpers): snapshot.yml and cleanup.yml while the service serves on PostgreSQL,
schedule.yml on the control node, then failback.yml while a failover is in effect. "Nothing changes" is a fingerprint
of everything a run could touch: the database rows (updated_at included), every file below the test bed's directory
(the sessions tree, the standby copy, state and arming records, archives), .env, the git ref and work tree, the PM2
processes (pid, status, restarts), the store the service uses and, for schedule.yml, the crontab.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import stat
import subprocess
import textwrap

import pytest

from faults_helpers import full_rows
from testbed_helpers import testbed  # noqa: F401 - the module's test bed fixture

# The test bed's own output: written by the checks themselves, not by what they check.
NOT_FINGERPRINTED = ("postgres", "logs", "audit.jsonl", os.path.join("app", "node_modules"), os.path.join("app", ".git"))


def file_fingerprints(base):
    """{relative path: (type, mode, content digest or link target)} of everything below base (directories by mode only)."""
    found = {}
    for directory, dirs, files in os.walk(base):
        rel_dir = os.path.relpath(directory, base)
        dirs[:] = [d for d in dirs if os.path.normpath(os.path.join(rel_dir, d)) not in NOT_FINGERPRINTED]
        for name in dirs + files:
            path = os.path.join(directory, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if rel in NOT_FINGERPRINTED:
                continue
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                found[rel] = ("link", os.readlink(path))
            elif stat.S_ISREG(info.st_mode):
                with open(path, "rb") as fh:
                    found[rel] = ("file", stat.S_IMODE(info.st_mode), info.st_uid, hashlib.sha256(fh.read()).hexdigest())
            else:
                found[rel] = ("dir" if stat.S_ISDIR(info.st_mode) else "other", stat.S_IMODE(info.st_mode), info.st_uid)
    return found


def database_rows(bed):
    """Every row of the store with its timestamps: an upsert of an equal value still changes updated_at."""
    conn = bed.connect()
    try:
        rows = full_rows(conn)
    finally:
        conn.close()
    return {"keys": hashlib.sha256(repr(rows["keys"]).encode()).hexdigest(), "key_count": len(rows["keys"]),
            "auth": hashlib.sha256(repr(rows["auth"]).encode()).hexdigest()}


def world(bed):
    """What any of these playbooks could change, in one comparable value."""
    status, health = bed.health()
    return {
        "database": database_rows(bed),
        "files": file_fingerprints(bed.demo_dir),
        "env": hashlib.sha256(bed.env_file()).hexdigest(),
        "git": (bed.git_ref(), bed.git("status", "--porcelain", "--untracked-files=all")),
        "pm2": bed.instances(),
        "store": (status, (health or {}).get("store")),
    }


def assert_unchanged(before, after, run):
    for part in before:
        if part == "files":
            changed = sorted(p for p in set(before["files"]) | set(after["files"]) if before["files"].get(p) != after["files"].get(p))
            assert changed == [], "%s --check changed files: %s\n%s" % (run.name, changed[:20], run.explain())
        else:
            assert before[part] == after[part], "%s --check changed the %s\n%s" % (run.name, part, run.explain())


def check(bed, playbook, extra_vars=None, env=None):
    """playbook --check --diff on the test bed: (run, world before, world after), the run having succeeded."""
    before = world(bed)
    run = bed.playbook(playbook, extra_vars, env=env, args=("--check", "--diff"))
    assert run.returncode == 0, run.explain()
    after = world(bed)
    assert_unchanged(before, after, run)
    return run


def messages(run, task_part):
    """What the debug tasks named like task_part printed."""
    found = [result.get("msg") for name, event, result, _, _ in run.tasks() if task_part in name and event == "v2_runner_on_ok"]
    assert found, "%s printed no %r\n%s" % (run.name, task_part, run.explain())
    return found


def insert_key(bed, company, key_type, key_id, age_days):
    """A key last written age_days ago (INSERT sets updated_at as given: the trigger acts on UPDATE only)."""
    updated = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=age_days)
    conn = bed.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO whatsapp_keys (company_id, key_type, key_id, value, created_at, updated_at, expires_at) "
                        "VALUES (%s, %s, %s, %s, %s, %s, %s)",
                        (company, key_type, key_id, json.dumps({"k": {"type": "Buffer", "data": [1, 2]}}), updated, updated,
                         updated + datetime.timedelta(days=7)))
        conn.commit()
    finally:
        conn.close()


def scalar(bed, sql):
    conn = bed.connect()
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            (value,) = cur.fetchone()
        conn.rollback()
    finally:
        conn.close()
    return value


@pytest.fixture(scope="module")
def companies(testbed):  # noqa: F811
    conn = testbed.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT company_id FROM whatsapp_auth ORDER BY 1")
            found = [row[0] for row in cur.fetchall()]
        conn.rollback()
    finally:
        conn.close()
    assert len(found) >= 2, found
    return found


# -- while the service serves on PostgreSQL ------------------------------------------------------------------------


def test_snapshot_check_writes_nothing_and_names_the_files_a_refresh_would_write(testbed, companies):  # noqa: F811
    # The standby copy the real refresh keeps, then a key it does not hold yet.
    run = testbed.playbook("snapshot.yml")
    assert run.returncode == 0, run.explain()
    insert_key(testbed, companies[0], "session", "checkmode.0", age_days=0)
    run = check(testbed, "snapshot.yml")
    result = run.result("baileys_auth_export")
    assert result["changed"] is True, "the refresh would write the new key"
    plan = result["would_change"]
    assert plan["files_to_write"] == 1 and plan["files_to_delete"] == 0, plan
    assert plan["per_company"] == {companies[0]: {"write": 1, "delete": 0}}, "only the company with the new key: %s" % plan


def test_cleanup_check_deletes_nothing_and_names_the_keys_it_would_delete(testbed, companies):  # noqa: F811
    for n in range(3):
        insert_key(testbed, companies[1], "sender-key-memory", "old-%d" % n, age_days=90)
    run = check(testbed, "cleanup.yml")
    result = run.result("baileys_keys_cleanup")
    plan = result["plan"]
    # Counted apart from the module: sender-key-memory keys untouched for more than their 30 days of retention.
    old = scalar(testbed, "SELECT count(*) FROM whatsapp_keys WHERE key_type = 'sender-key-memory' "
                          "AND updated_at < now() - interval '30 days'")
    assert old >= 3 and plan["by_type"]["sender-key-memory"] == old, plan["by_type"]
    assert plan["by_company"][companies[1]]["sender-key-memory"] >= 3, plan["by_company"]
    assert result["check_mode"] and plan["keys"] == sum(plan["by_type"].values()) > 0, plan
    (summary,) = messages(run, "Show what was deleted")
    assert summary.startswith("would delete %d of " % plan["keys"]) and "'sender-key-memory': %d" % old in summary, summary


FAKE_CRONTAB = textwrap.dedent("""\
    #!/bin/sh
    # crontab(1) of one user, kept in $FAKE_CRONTAB_FILE: -l prints it, FILE replaces it, anything else is refused.
    case "$1" in
      -l) [ -f "$FAKE_CRONTAB_FILE" ] || { echo "no crontab for $(id -un)" >&2; exit 1; }; cat "$FAKE_CRONTAB_FILE" ;;
      -*) echo "fake crontab: unsupported $*" >&2; exit 2 ;;
      *) cat "$1" > "$FAKE_CRONTAB_FILE" ;;
    esac
""")


def test_schedule_check_installs_no_cron_entry_and_names_each_entry_it_would_install(testbed, tmp_path):  # noqa: F811
    """The control node's crontab is a stand-in crontab(1) on PATH: CI images have no cron, and a broken check mode
    must never install entries into the crontab of the machine running the tests."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "crontab").write_text(FAKE_CRONTAB)
    (bin_dir / "crontab").chmod(0o755)
    crontab = tmp_path / "crontab"
    crontab.write_text("# an entry of the operator's own\n17 4 * * * /usr/local/bin/backup\n")
    log_dir = tmp_path / "cron-logs"
    env = {"PATH": "%s%s%s" % (bin_dir, os.pathsep, testbed.env["PATH"]), "FAKE_CRONTAB_FILE": str(crontab)}
    before = crontab.read_bytes()

    run = check(testbed, "schedule.yml", {"baileys_schedule_log_dir": str(log_dir)}, env=env)

    assert crontab.read_bytes() == before, "check mode changed the crontab"
    assert not log_dir.exists(), "check mode created the log directory"
    (cron,) = [result for name, _, result, _, _ in run.tasks() if name == "Install or remove the cron entries"]
    would = {item["item"]["name"]: item for item in cron["results"]}
    assert sorted(would) == ["cleanup", "health", "snapshot"]
    for name, item in would.items():
        assert item["changed"], "%s: the plan says the entry would be installed" % name
        assert "playbooks/%s.yml" % name in json.dumps(item.get("diff")), "%s: the diff shows the entry's command" % name
    # The real run installs exactly what the plan said, and keeps the operator's own entry.
    run = testbed.playbook("schedule.yml", {"baileys_schedule_log_dir": str(log_dir)}, env=env)
    assert run.returncode == 0, run.explain()
    installed = crontab.read_text()
    assert "/usr/local/bin/backup" in installed
    assert all("#Ansible: baileys-dr %s" % name in installed for name in would), installed


# -- while a failover is in effect -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def failed_over(testbed):  # noqa: F811
    run = testbed.playbook("failover.yml")
    assert run.returncode == 0, run.explain()
    testbed.wait_serving("files")
    yield testbed
    testbed.back_to_normal()


def test_failback_check_imports_nothing_restarts_nothing_and_prints_the_plan(failed_over, companies):
    bed = failed_over
    state = bed.read_state()
    assert state, "a failover is in effect"
    run = check(bed, "failback.yml")
    (plan,) = messages(run, "Show the plan")
    text = "\n".join(plan)
    assert "import %s into " % bed.sessions in text, text
    assert "git: back to %s" % (state["git"].get("ref") or state["git"]["commit"]) in text, text
    assert ".env: " in text and "restored to their values before the failover" in text, text
    assert "restart baileys-whatsapp-service" in text, text
    assert bed.health()[1]["store"] == "files", "the service still serves on files"
    # The real failback then does what the plan said.
    run = bed.playbook("failback.yml")
    assert run.returncode == 0, run.explain()
    bed.wait_serving("postgres")
