"""Failover and failback under live traffic, at playbook level (issue 14 "Switching under live traffic", issue 21).

One embedded default test bed for the module (testbed_helpers.testbed: PostgreSQL, 2 companies x 300 keys, the
test application under a PM2 daemon of its own). Every test starts from the normal state (serving on PostgreSQL,
no failover in effect) and leaves it so: each failover is followed by a failback. The load generator
(testbed/bin/writer) writes through the service during every switch; after each switch, once the service
acknowledged writes on its new store, the writer is stopped (a quiet moment) and its ledger checked against the
store the service uses: every acknowledged write there with its value, every acknowledged delete absent.

Observation 5 of issue 14 (POST /simulate on PostgreSQL) is covered by the application's own tests:
testbed/app/test/postgres.test.js ("postgres: /simulate writes as the application does ...").
Test-only hooks (BAILEYS_DR_TEST_PAUSE_AT / _FAIL_AT) pause or fail a module at a named point: docs/reliability.md.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest

from faults_helpers import listing, wait_until
from pgcluster import free_port
from testbed_helpers import PlaybookRun, Writer, descendants, kill_run, testbed  # noqa: F401 (testbed: the fixture)

SWITCH = "baileys_store_switch"
ROLLBACK_WORDS = ("Rolled back", "ROLLBACK", "NOT ROLLED BACK")
CLUSTER_ECOSYSTEM = """'use strict';
// Test: the service in PM2 cluster mode, two instances sharing the port.
module.exports = {
  apps: [{
    name: 'baileys-whatsapp-service', script: 'src/index.js', cwd: __dirname, exec_mode: 'cluster', instances: 2,
    autorestart: true, wait_ready: true, listen_timeout: 10000, kill_timeout: 10000, min_uptime: 5000,
    max_restarts: 10, restart_delay: 1000, merge_logs: true, env: { NODE_ENV: 'production' },
  }],
};
"""


@pytest.fixture(autouse=True)
def normal_state(testbed):  # noqa: F811
    """Serving on PostgreSQL, no failover in effect, no writer running (whatever a failed test left)."""
    testbed.back_to_normal()
    yield testbed


def hooks(point, seconds=None, fail=False, until=None):
    """The environment of a test-only hook: pause (for seconds, or until the file `until` exists) or fail at point."""
    if fail:
        return {"BAILEYS_DR_TEST_FAIL_AT": point}
    return dict({"BAILEYS_DR_TEST_PAUSE_AT": point, "BAILEYS_DR_TEST_PAUSE_SECONDS": str(seconds)},
                **({"BAILEYS_DR_TEST_PAUSE_UNTIL": str(until)} if until else {}))


def lost_summary(report):
    return "%d lost, %d acknowledged, problems %s, e.g. %s" % (
        report["lost"], report["acknowledged"], report["problems"], report["lost_examples"][:5])


def writes_landed(bed, writer, store, since, sessions=None):
    """After a switch: the service ready on store, at least 3 writes acknowledged there after `since`, then the writer
    stopped and its whole ledger checked against store. The check's report."""
    bed.wait_serving(store, complete=False)
    writer.wait_acks(3, after=since)
    writer.stop()
    status, report = writer.check(store, sessions)
    assert status == 0 and report["lost"] == 0, lost_summary(report)
    return report


def under_writes(bed, writer, playbook, store, extra_vars=None, env=None):
    """playbook with the writer on; it must succeed, and no acknowledged write may be lost in store."""
    if not writer.running():
        writer.start()
        writer.wait_acks(3, after=time.time() - 1)
    run = bed.playbook(playbook, extra_vars, env)
    assert run.returncode == 0, run.explain()
    writes_landed(bed, writer, store, since=run.ended(""))
    return run


def no_rollback(run):
    result = run.result(SWITCH)
    assert result and "rollback" not in result and not result.get("failed"), run.explain()
    said = " ".join(str(v) for v in (result.get("msg"), result.get("warnings"))) + run.output
    assert not [word for word in ROLLBACK_WORDS if word in said], run.explain()
    return result


def audited(bed, operation, outcome):
    record = bed.audit_records(operation)[-1]
    assert record["outcome"] == outcome, record
    return record


def fail_back(bed, writer, env=None):
    """The failback that puts the test bed back to normal, under writes: nothing acknowledged lost in PostgreSQL."""
    run = under_writes(bed, writer, "failback.yml", "postgres", env=env)
    audited(bed, "failback", "ok")
    assert bed.read_state() is None, "the failover state is retired"
    return run


# -- issue 14, what was seen -------------------------------------------------------------------------------------------


def test_failover_from_the_standby_with_postgresql_stopped_loses_no_acknowledged_write_and_never_rolls_back_onto_it(
        testbed, tmp_path):  # noqa: F811
    bed = testbed
    writer = Writer(bed, tmp_path / "ledger.jsonl").start()
    writer.wait_acks(5, after=time.time() - 1)
    # The standby refreshed with the writer paused, right before the outage: writes after it are the RPO by design.
    writer.stop()
    refresh = bed.playbook("snapshot.yml")
    assert refresh.returncode == 0, refresh.explain()
    bed.stop_postgres()
    writer.start()  # requests fail until the service runs on files

    run = bed.playbook("failover.yml", {"baileys_failover_source": "standby"})
    assert run.returncode == 0, run.explain()
    result = no_rollback(run)
    assert result["store"] == "files" and run.result("baileys_auth_export") is None, "no export from a stopped database"
    record = audited(bed, "failover", "ok")
    assert record["inputs"]["source"] == "standby"
    assert not bed.cluster.running(), "PostgreSQL stays stopped: nothing rolled back onto it"
    assert bed.read_state()["source"] == "standby"
    writes_landed(bed, writer, "files", since=run.ended(""))

    bed.start_postgres()
    fail_back(bed, writer)


def test_failover_with_postgresql_up_loses_no_acknowledged_write(testbed, tmp_path):  # noqa: F811
    bed = testbed
    writer = Writer(bed, tmp_path / "ledger.jsonl")
    run = under_writes(bed, writer, "failover.yml", "files")
    result = no_rollback(run)
    assert result["store"] == "files" and result["identities"]["differ"] == []
    assert [step["step"] for step in result["steps"]] == ["stopped", "copied", "swapped", "switched", "ready"]
    assert audited(bed, "failover", "ok")["inputs"]["source"] == "live"
    fail_back(bed, writer)


def test_failback_while_the_service_writes_files_succeeds_and_loses_no_acknowledged_write(testbed, tmp_path):  # noqa: F811
    bed = testbed
    writer = Writer(bed, tmp_path / "ledger.jsonl")
    under_writes(bed, writer, "failover.yml", "files")
    # The bulk import held on its first company for 3 s while the writer changes that company's files: what the
    # import once refused ("its files changed while it was imported") is now left to the delta pass.
    run = fail_back(bed, writer, env=hooks("import_company:1", 3))
    bulk = run.result("baileys_auth_import")
    assert bulk["deferred"], "the writer changed a company's files during its bulk import: %s" % bulk.get("companies")
    delta = no_rollback(run)["final_copy"]["delta"]
    assert delta["imported"] >= len(bulk["deferred"]), delta


def test_a_write_acknowledged_after_the_bulk_import_and_before_the_stop_is_in_postgresql(testbed, tmp_path):  # noqa: F811
    bed = testbed
    writer = Writer(bed, tmp_path / "ledger.jsonl")
    under_writes(bed, writer, "failover.yml", "files")
    # The critical section held for 3 s before its stop: the service acknowledges writes after the bulk pass ended.
    run = fail_back(bed, writer, env=hooks("switch_before_stop", 3))
    bulk_ended = run.ended("(bulk pass)")
    stop_began = no_rollback(run)["stop_began_at_epoch"]
    between = writer.acks(after=bulk_ended, before=stop_began)
    assert between, "no write was acknowledged between the bulk import (%.3f) and the stop (%.3f)" % (bulk_ended, stop_began)
    keys = {(r["company"], w["type"], w["id"]) for r in between for w in r["written"]}
    deleted = {(r["company"], d["type"], d["id"]) for r in writer.acks(after=bulk_ended) for d in r["deleted"]}
    conn = bed.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT company_id, key_type, key_id FROM whatsapp_keys")
            rows = set(cur.fetchall())
    finally:
        conn.close()
    missing = sorted(keys - deleted - rows)
    assert not missing, "acknowledged after the bulk import, missing in PostgreSQL: %s" % missing[:10]


# -- issue 21 ------------------------------------------------------------------------------------------------------------


def service_changes(requests):
    """(files added, files deleted, companies whose creds changed) that requests made to a tree of the database's keys:
    new ids written and not deleted again, ids of the database deleted."""
    written, deleted, creds = set(), set(), set()
    for request in requests:
        for entry in request["written"]:
            key = (request["company"], entry["type"], entry["id"])
            written.add(key)
            deleted.discard(key)
        for entry in request["deleted"]:
            key = (request["company"], entry["type"], entry["id"])
            if key in written:
                written.discard(key)
            else:
                deleted.add(key)
        if request.get("creds_changed"):
            creds.add(request["company"])
    return len(written), len(deleted), len(creds)


def test_a_live_failover_after_writes_on_files_and_an_aborted_failback_serves_the_database_and_counts_the_replaced_files(
        testbed, tmp_path):  # noqa: F811
    bed = testbed
    writer = Writer(bed, tmp_path / "ledger.jsonl")
    first = under_writes(bed, writer, "failover.yml", "files")
    at_stop = no_rollback(first)
    writer.start()
    writer.wait_acks(4, after=time.time())

    aborted = bed.playbook("failback.yml", env=hooks("switch_copied", fail=True))
    assert aborted.returncode != 0 and "fault injected at switch_copied" in aborted.final_message(), aborted.explain()
    assert "The database imports were undone." in aborted.final_message(), aborted.explain()
    audited(bed, "failback", "rolled_back")
    assert bed.database_digests()["digests"] == at_stop["proof"]["digests"], "the database is back to its rows of the stop"
    bed.wait_serving("files", complete=False)
    writer.wait_acks(3, after=aborted.ended(""))
    # A quiet moment: the tree the service wrote into is then exactly what the failover replaces.
    writer.stop()
    status, report = writer.check("files")
    assert status == 0, lost_summary(report)

    second = bed.playbook("failover.yml")
    assert second.returncode == 0, second.explain()
    result = no_rollback(second)
    after_stop = [r for r in writer.requests() if r["done_at"] > at_stop["stopped_at_epoch"]]
    on_files = [r for r in after_stop if r["outcome"] in ("ack", "applied")]
    added, deleted, creds = service_changes(on_files)
    # A request the writer got no answer to (a timeout on a loaded machine) may have been applied: it can add up to its
    # newKeys files, consume up to its consumePreKeys (a key of the database, or one an acknowledged request added) and
    # change the creds. Without one, the counts are exact.
    unanswered = [r.get("params") or {} for r in after_stop if r["outcome"] == "unanswered"]
    new = sum(p.get("newKeys", 1) for p in unanswered)
    consumed = sum(p.get("consumePreKeys", 1) for p in unanswered)
    touched = sum(1 for p in unanswered if p.get("touchCreds", True))
    drift = result["replaced_drift"]
    assert added - consumed <= drift["added"] <= added + new and deleted <= drift["deleted"] <= deleted + consumed \
        and creds <= drift["changed"] <= creds + touched, (drift, (added, deleted, creds), unanswered, on_files[-1])
    assert "the replaced tree held %d files the service wrote that the database never received" % (
        drift["added"] + drift["changed"]) in " ".join(result["warnings"])
    assert audited(bed, "failover", "ok")["details"]["replaced_drift"] == drift
    # Every write the service acknowledged on files is kept in the replaced tree.
    status, report = writer.check("files", sessions=result["sessions_backup"])
    assert status == 0 and report["lost"] == 0, lost_summary(report)

    health = bed.wait_serving("files")
    compared = bed.database_digests(expected=health["digests"])
    assert compared["mismatches"] == [] and len(compared["digests"]) == 2, compared
    assert health["errors"] == [] and not [w for w in health["warnings"] if "guess" in w], health["warnings"]
    assert all(g["count"] == 0 for g in health["guessedIds"].values()), health["guessedIds"]

    fail_back(bed, Writer(bed, tmp_path / "after.jsonl"))


# -- issue 14, fault matrix ----------------------------------------------------------------------------------------------


def test_a_service_instance_that_will_not_stop_makes_the_failover_refuse_before_copying_and_change_nothing(
        testbed, tmp_path):  # noqa: F811
    bed = testbed
    port = free_port()
    # A second copy of the service started by hand in the application's directory, outside PM2.
    stray = subprocess.Popen(["node", "src/index.js"], cwd=bed.app_root, env=bed.app_env(HEALTH_PORT=str(port)),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        bed.wait_serving("postgres", complete=False, url="http://127.0.0.1:%d/health" % port)
        writer = Writer(bed, tmp_path / "ledger.jsonl").start()
        writer.wait_acks(3, after=time.time() - 1)
        before = (bed.env_file(), bed.git_ref(), listing(bed.sessions))

        run = bed.playbook("failover.yml")
        assert run.returncode != 0, run.explain()
        said = run.final_message()
        assert "refusing to copy: the service is not completely stopped" in said, run.explain()
        assert "instance(s) outside PM2 run in %s: pid %d" % (bed.app_root, stray.pid) in said, said
        assert "nothing was copied or changed" in said and "the PM2 process was started again" in said, said
        assert run.result(SWITCH)["failed_step"] == "stop"
        audited(bed, "failover", "refused")
        assert (bed.env_file(), bed.git_ref(), listing(bed.sessions)) == before, ".env, git ref and sessions tree unchanged"
        assert bed.read_state() is None, "no failover state: nothing to fail back"
        assert stray.poll() is None, "the stray instance is not the tool's to kill"
        writes_landed(bed, writer, "postgres", since=run.ended(""))
    finally:
        stray.send_signal(signal.SIGTERM)
        try:
            stray.wait(timeout=30)
        except subprocess.TimeoutExpired:
            stray.kill()
            stray.wait()


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def journal_phase(bed, operation):
    state = bed.read_state() or {}
    switch = state.get("switch") or {}
    return switch.get("phase") if switch.get("operation") == operation else None


@pytest.fixture
def cluster_mode(testbed):  # noqa: F811
    """The service in PM2 cluster mode with two instances (a local ecosystem.config.js, hidden from git's status as an
    operator's local setting would be), then back in fork mode."""
    bed = testbed
    path = os.path.join(bed.app_root, "ecosystem.config.js")
    bed.git("update-index", "--skip-worktree", "ecosystem.config.js")
    try:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(CLUSTER_ECOSYSTEM)
        bed.pm2_command("delete", "baileys-whatsapp-service")
        bed.pm2_command("start", "ecosystem.config.js")
        wait_until(lambda: [i for i in bed.instances() if i["status"] == "online" and i["exec_mode"] == "cluster_mode"][1:],
                   timeout=120, what="two instances online in cluster mode")
        bed.wait_serving("postgres")
        yield bed
    finally:
        bed.git("update-index", "--no-skip-worktree", "ecosystem.config.js")
        bed.git("checkout", "--", "ecosystem.config.js")
        bed.pm2_command("delete", "baileys-whatsapp-service")
        bed.pm2_command("start", "ecosystem.config.js")


def test_pm2_cluster_mode_both_instances_are_stopped_before_the_final_copy_and_nothing_is_lost(cluster_mode, tmp_path):
    bed = cluster_mode
    writer = Writer(bed, tmp_path / "ledger.jsonl").start()
    writer.wait_acks(3, after=time.time() - 1)
    old = [i["pid"] for i in bed.instances()]
    assert len(old) == 2

    # Held right after the stop (journaled), before the final copy: what is still running then?
    process, log_path = bed.playbook_process("failover.yml", env=hooks("switch_stopped", 5))
    try:
        wait_until(lambda: journal_phase(bed, "failover") or process.poll() is not None, timeout=300, what="the failover's stop")
        at_copy = {"alive": [pid for pid in old if pid_alive(pid)], "answers": bed.health()[0]}
        process.wait(timeout=600)
    finally:
        if process.poll() is None:
            kill_run(process)
    with open(log_path, encoding="utf-8") as fh:
        run = PlaybookRun("failover.yml", process.returncode, fh.read(), log_path)
    assert run.returncode == 0, run.explain()
    assert at_copy == {"alive": [], "answers": None}, "both instances stopped before the final copy: %s" % at_copy
    result = no_rollback(run)
    assert result["steps"][0]["step"] == "stopped" and result["steps"][0]["instances"] == 2, result["steps"]
    writes_landed(bed, writer, "files", since=run.ended(""))
    new = bed.instances()
    assert len(new) == 2 and {i["exec_mode"] for i in new} == {"cluster_mode"} and not {i["pid"] for i in new} & set(old), new

    fail_back(bed, writer)
    assert len(bed.instances()) == 2


@pytest.mark.parametrize("phase", ["stopped", "switched"])
def test_a_failover_killed_between_the_stop_and_the_start_is_finished_by_the_next_run_with_nothing_lost(
        testbed, tmp_path, phase):  # noqa: F811
    bed = testbed
    writer = Writer(bed, tmp_path / "ledger.jsonl").start()
    writer.wait_acks(3, after=time.time() - 1)
    # Held at the phase (stopped: nothing copied yet; switched: tree swapped, .env and tag switched, not started).
    process, _ = bed.playbook_process("failover.yml", env=hooks("switch_" + phase, 600))
    try:
        wait_until(lambda: journal_phase(bed, "failover") == phase or process.poll() is not None, timeout=300,
                   what="the failover to reach phase %s" % phase)
        assert process.poll() is None, "the run ended before it could be killed"
    finally:
        kill_run(process)
    assert bed.health() == (None, None), "killed between the stop and the start: the service is down"

    run = bed.playbook("failover.yml")
    assert run.returncode == 0, run.explain()
    result = no_rollback(run)
    assert result["resumed_from"] == phase and result["store"] == "files"
    assert journal_phase(bed, "failover") == "done"
    writes_landed(bed, writer, "files", since=run.ended(""))
    fail_back(bed, writer)


def test_a_failover_whose_playbook_is_killed_while_its_module_runs_on_is_never_switched_twice_and_loses_nothing(
        testbed, tmp_path):  # noqa: F811
    bed = testbed
    writer = Writer(bed, tmp_path / "ledger.jsonl").start()
    writer.wait_acks(3, after=time.time() - 1)
    # Held after the stop until the re-run below has been refused (a loaded machine may take a minute for it).
    release = tmp_path / "release"
    process, _ = bed.playbook_process("failover.yml", env=hooks("switch_stopped", 900, until=release))
    try:
        wait_until(lambda: journal_phase(bed, "failover") == "stopped" or process.poll() is not None, timeout=300,
                   what="the failover's stop")
        module = descendants(process.pid)
        # kill -9 of the playbook's process group: Ansible's workers run in sessions of their own, so the module (held
        # 30 s after the stop) runs on, as it does on a target whose controller died.
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            kill_run(process)
    assert [pid for pid in module if pid_alive(pid)], "the module outlives its playbook"

    rerun = bed.playbook("failover.yml")
    assert rerun.returncode != 0, rerun.explain()
    said = rerun.final_message()
    assert [pid for pid in module if "another switch (pid %d) is still running" % pid in said], rerun.explain()
    assert "nothing was done" in said and rerun.result(SWITCH)["failed_step"] == "lock", said
    assert journal_phase(bed, "failover") == "stopped", "the re-run changed nothing while the first one runs"
    release.write_text("")

    wait_until(lambda: not [pid for pid in module if pid_alive(pid)], timeout=600, what="the first run's module to finish")
    assert journal_phase(bed, "failover") == "done"
    bed.wait_serving("files", complete=False)
    settled = time.time()
    again = bed.playbook("failover.yml")
    assert again.returncode == 0 and again.result(SWITCH) is None, again.explain()
    writes_landed(bed, writer, "files", since=settled)
    fail_back(bed, writer)


class BackendKiller(threading.Thread):
    """Drops the database connections of one module once: pg_terminate_backend of every backend whose application_name
    is `name` once one of them has been idle in its transaction for half a second (the pass held at a test hook)."""

    def __init__(self, bed, name):
        super().__init__(daemon=True)
        self.bed, self.name = bed, name
        self.killed = []
        self.done = threading.Event()

    def run(self):
        conn = self.bed.connect("baileys-dr-tests-killer")
        conn.autocommit = True  # pg_stat_activity is read once per transaction
        try:
            with conn.cursor() as cur:
                while not self.done.is_set() and not self.killed:
                    cur.execute("SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s "
                                "AND EXISTS (SELECT FROM pg_stat_activity WHERE application_name = %s "
                                "AND state = 'idle in transaction' AND state_change < clock_timestamp() - interval '0.5 s')",
                                (self.name, self.name))
                    self.killed = [pid for pid, terminated in cur.fetchall() if terminated]
                    self.done.wait(0.02)
        finally:
            conn.close()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.join(timeout=30)


def test_a_connection_dropped_once_in_the_final_copy_and_in_the_delta_import_is_retried_and_nothing_is_lost(
        testbed, tmp_path):  # noqa: F811
    bed = testbed
    writer = Writer(bed, tmp_path / "ledger.jsonl").start()
    writer.wait_acks(3, after=time.time() - 1)
    # Each pass held 2 s after its first company: the connection is open, in the pass's snapshot or transaction.
    with BackendKiller(bed, "baileys-dr-switch") as killer:
        run = bed.playbook("failover.yml", env=hooks("after_company:1", 2))
    assert run.returncode == 0, run.explain()
    assert killer.killed, "the final copy's connection was never seen"
    retries = no_rollback(run)["retries"]
    assert len(retries) == 1 and "final copy" in retries[0]["what"], retries
    writes_landed(bed, writer, "files", since=run.ended(""))

    writer.start()
    writer.wait_acks(3, after=time.time())
    with BackendKiller(bed, "baileys-dr-switch-import") as killer:
        run = fail_back(bed, writer, env=hooks("import_company:1", 2))
    assert killer.killed, "the delta import's connection was never seen"
    retries = no_rollback(run)["final_copy"]["retries"]
    assert len(retries) == 1, retries


# Gap found by this test: baileys_auth_export (the failover's bulk pass, a standby refresh) does not retry a dropped
# connection; the failover fails before the stop (nothing lost, the service still on PostgreSQL) with "invalid snapshot
# identifier" when the dropped connection was the one exporting the snapshot its readers import.
@pytest.mark.xfail(strict=True, reason="the failover's bulk pass (baileys_auth_export mode=standby) has no retry_on_disconnect")
def test_a_connection_dropped_once_in_the_failover_bulk_export_is_retried_and_nothing_is_lost(testbed, tmp_path):  # noqa: F811
    bed = testbed
    writer = Writer(bed, tmp_path / "ledger.jsonl").start()
    writer.wait_acks(3, after=time.time() - 1)
    with BackendKiller(bed, "baileys-dr-export") as killer:
        run = bed.playbook("failover.yml", env=hooks("after_company:1", 2))
    assert killer.killed, "the bulk export's connection was never seen"
    assert run.returncode == 0, run.explain()
    assert len(run.result("baileys_auth_export").get("retries") or []) == 1, run.result("baileys_auth_export")
    no_rollback(run)
    writes_landed(bed, writer, "files", since=run.ended(""))
    fail_back(bed, writer)


def test_a_connection_dropped_once_in_the_failback_bulk_import_is_retried_and_nothing_is_lost(testbed, tmp_path):  # noqa: F811
    bed = testbed
    writer = Writer(bed, tmp_path / "ledger.jsonl")
    under_writes(bed, writer, "failover.yml", "files")
    # During the failback, writes to the second company only: the first (changed on files), held with its rows written
    # when its connection drops, is not deferred for files changed meanwhile, so its transaction is retried.
    writer.companies = ["company00002"]
    writer.start()
    writer.wait_acks(3, after=time.time())
    with BackendKiller(bed, "baileys-dr-import") as killer:
        run = fail_back(bed, writer, env=hooks("import_company:1", 2))
    assert killer.killed, "the bulk import's connection was never seen"
    bulk = run.result("baileys_auth_import")
    assert len(bulk["retries"]) == 1 and "company00001" in bulk["retries"][0]["what"], bulk["retries"]
    no_rollback(run)
