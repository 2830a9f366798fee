"""The rehearsal on the containers, with the writer on: every phase passed, no acknowledged write was lost, the
writer was acknowledged on both sides of every switch, the reports say so, and the test bed is back to normal."""

import json
import os
import sys
import xml.etree.ElementTree as ET

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "shared"))

from verify_helpers import STATE_FILE, WRITER_ACKS_AFTER, database_digests, epoch, readiness  # noqa: E402

testinfra_hosts = ["ansible://baileys-dr-app"]
REPORTS = "/var/lib/baileys-dr/reports"
# The rehearsal role's writer (baileys_rehearsal_writer_dir).
WRITER = "/var/lib/baileys-dr/writer/testbed/bin/writer"
# Requests acknowledged in a switch phase before its stop: its preflight and bulk pass while the service serves.
REHEARSAL_ACKS_BEFORE = 3
PHASES = [
    "refresh the standby copy", "failover with PostgreSQL up (live export)", "verify on files", "failback to PostgreSQL",
    "refresh the standby copy (writer paused)", "stop PostgreSQL", "failover with PostgreSQL down (standby copy)",
    "start PostgreSQL", "verify on files", "failback to PostgreSQL", "verify on PostgreSQL",
]


def report(host):
    return json.loads(host.file(REPORTS + "/rehearsal-latest.json").content_string)


def writer_stats(host, doc, start, end=None):
    """The writer's figures (testbed/bin/writer stats) of the rehearsal's ledger between two times."""
    argv = "python3 %s stats --ledger %s/%s-writer.jsonl --json --from %s" % (WRITER, REPORTS, doc["name"], start)
    result = host.run(argv + (" --to %s" % end if end else ""))
    assert result.rc == 0, result.stderr
    return json.loads(result.stdout)


def test_every_phase_passed_in_order_with_zero_loss(host):
    doc = report(host)
    assert [p["name"] for p in doc["phases"]] == PHASES
    assert [p["status"] for p in doc["phases"]] == ["passed"] * len(PHASES)
    assert doc["passed"] and doc["zero_loss"]


def test_every_verify_found_every_acknowledged_write_in_the_store(host):
    doc = report(host)
    verifies = [p for p in doc["phases"] if p["kind"] == "verify"]
    assert [p["writes_lost"] for p in verifies] == [0] * len(verifies)
    # Each check covers the whole ledger, which only grows.
    checked = [p["writes_checked"] for p in verifies]
    assert checked[0] > 0 and checked == sorted(checked)
    assert doc["writes"]["lost"] == 0 and doc["writes"]["checked"] == checked[-1]


def test_the_writer_was_acknowledged_before_and_after_every_switch(host):
    doc = report(host)
    phases = doc["phases"]
    for index, phase in enumerate(phases):
        if phase["kind"] not in ("failover", "failback"):
            continue
        ready = epoch(phase["started_at"]) + phase["rto_seconds"]
        # The writer stops at the next verify phase (a quiet moment to check the ledger).
        quiet = next(p["started_at"] for p in phases[index + 1:] if p["kind"] == "verify")
        assert writer_stats(host, doc, ready, quiet)["acknowledged"] >= WRITER_ACKS_AFTER, phase["name"]
        assert phase["downtime_seconds"] > 0, phase["name"]
        window = writer_stats(host, doc, phase["started_at"], phase["ended_at"])
        if window["downtime"]["head_seconds"]:
            # Began with PostgreSQL down (the failover from the standby copy): the writes before its stop are those
            # PostgreSQL acknowledged before the writer paused for the standby copy's last refresh.
            assert phase["source"] == "standby"
            paused = [p for p in phases[:index] if p["kind"] == "snapshot"][-1]
            previous = [p for p in phases[:index] if p["kind"] in ("failover", "failback")][-1]
            before = writer_stats(host, doc, epoch(previous["started_at"]) + previous["rto_seconds"], paused["started_at"])
        else:
            before = writer_stats(host, doc, phase["started_at"], window["downtime"]["from"])
        assert before["acknowledged"] >= REHEARSAL_ACKS_BEFORE, (phase["name"], before)


def test_each_failover_reports_its_rto_and_the_age_of_its_data(host):
    failovers = [p for p in report(host)["phases"] if p["kind"] == "failover"]
    assert [p["source"] for p in failovers] == ["live", "standby"]
    for phase in failovers:
        assert 0 < phase["rto_seconds"] <= phase["seconds"]
        assert phase["rto_measured_to"] == "ready"
    live, standby = failovers
    assert live["rpo_seconds"] == 0
    # The standby copy was last refreshed (writer paused) before PostgreSQL stopped, so before this failover began.
    assert standby["rpo_seconds"] > 0


def test_junit_report_has_one_passing_testcase_per_phase(host):
    suites = ET.fromstring(host.file(REPORTS + "/rehearsal-latest.xml").content_string)
    cases = suites.findall("./testsuite/testcase")
    assert [c.get("name").split(" ", 1)[1] for c in cases] == PHASES
    assert suites.get("failures") == "0" and suites.get("tests") == str(len(PHASES))
    assert not suites.findall(".//failure") and not suites.findall(".//skipped")


def test_service_is_back_on_postgresql_with_the_databases_state(host):
    status, doc = readiness(host)
    assert status == 200 and doc["store"] == "postgres"
    assert doc["digests"] == database_digests()
    assert not host.file(STATE_FILE).exists
