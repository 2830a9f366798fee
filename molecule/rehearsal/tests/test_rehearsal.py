"""The rehearsal on the containers: every phase passed, the reports say so, and the test bed is back to normal."""

import json
import os
import sys
import xml.etree.ElementTree as ET

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "shared"))

from verify_helpers import STATE_FILE, database_digests, readiness  # noqa: E402

testinfra_hosts = ["ansible://baileys-dr-app"]
REPORTS = "/var/lib/baileys-dr/reports"
PHASES = [
    "refresh the standby copy", "failover with PostgreSQL up (live export)", "verify on files", "failback to PostgreSQL",
    "stop PostgreSQL", "failover with PostgreSQL down (standby copy)", "start PostgreSQL", "verify on files",
    "failback to PostgreSQL", "verify on PostgreSQL",
]


def report(host):
    return json.loads(host.file(REPORTS + "/rehearsal-latest.json").content_string)


def test_every_phase_passed_in_order_with_zero_loss(host):
    doc = report(host)
    assert [p["name"] for p in doc["phases"]] == PHASES
    assert [p["status"] for p in doc["phases"]] == ["passed"] * len(PHASES)
    assert doc["passed"] and doc["zero_loss"]
    assert all(p["zero_loss"] for p in doc["phases"] if p["kind"] in ("verify", "snapshot"))


def test_each_failover_reports_its_rto_and_the_age_of_its_data(host):
    failovers = [p for p in report(host)["phases"] if p["kind"] == "failover"]
    assert [p["source"] for p in failovers] == ["live", "standby"]
    for phase in failovers:
        assert 0 < phase["rto_seconds"] <= phase["seconds"]
        assert phase["rto_measured_to"] == "ready"
    live, standby = failovers
    assert live["rpo_seconds"] == 0
    # The standby copy was refreshed in phase 1, before the live failover and its failback.
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
