"""docs/runbook.md "Scenario 3: accidental deletion", rehearsed: the refresh after a mass deletion refused and left the
standby copy as it was, health reported it critical, and the database restored from the copy (failover from the standby
copy, failback) holds every company's state as before the deletion."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "shared"))

from verify_helpers import SESSIONS, readiness  # noqa: E402

# This scenario's own containers (molecule.yml).
testinfra_hosts = ["ansible://baileys-dr-deletion-app"]

STANDBY = SESSIONS + ".standby"
RUNS = os.environ.get("BAILEYS_DR_DELETION_DIR") or os.path.join(os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY", ""),
                                                                   "accidental_deletion")


def kept(host, name):
    return json.loads(host.file("/root/molecule-%s.json" % name).content_string)


def run_output(name):
    """A run's output kept by converge, its line breaks and indentation folded (the output callback wraps messages)."""
    with open(os.path.join(RUNS, name + ".log"), encoding="utf-8") as handle:
        return " ".join(handle.read().split())


def test_the_refresh_after_the_deletion_left_the_standby_copy_as_it_was(host):
    before, after = kept(host, "before-deletion")["standby"], kept(host, "standby-after-refusal")
    assert after["generation"] == before["generation"]
    assert after["last_good_refresh"] == before["last_good_refresh"], "a refused refresh is no good refresh"
    assert {c: e["digest"] for c, e in after["companies"].items()} == {c: e["digest"] for c, e in before["companies"].items()}


def test_the_refusal_named_what_it_would_have_removed(host):
    record = kept(host, "refresh-refused")
    counts = record["counts"]
    assert counts["keys_in_copy"] == kept(host, "before-deletion")["standby"]["counts"]["keys"]
    assert counts["share"] > 0.7 and counts["keys_removed"] == counts["keys_in_copy"] - counts["keys_in_database"]
    assert any("more than max_delete_share=0.1" in reason for reason in record["reasons"])
    output = run_output("snapshot-refused")
    assert "Nothing was changed" in output and "baileys_snapshot_force=true" in output


def test_health_reported_the_refused_refresh_as_critical(host):
    report = kept(host, "health-after-deletion")
    check = report["checks"]["standby_refresh"]
    assert report["status"] == "critical" and check["status"] == "critical"
    assert "refused" in check["message"] and STANDBY in check["message"]


def test_postgresql_holds_every_company_as_before_the_deletion(host):
    before = kept(host, "before-deletion")["digests"]
    assert len(before) == 4 and kept(host, "after-restore")["digests"] == before


def test_the_service_runs_on_postgresql_with_those_digests(host):
    status, report = readiness(host)
    assert status == 200, report.get("errors")
    assert report["store"] == "postgres"
    assert report["digests"] == kept(host, "before-deletion")["digests"]


def test_the_standby_copy_was_built_again_and_health_is_clean(host):
    assert not host.file(STANDBY + "/.baileys-dr/refresh-refused.json").exists
    standby = json.loads(host.file(STANDBY + "/.baileys-dr/manifest.json").content_string)
    assert {c: e["digest"] for c, e in standby["companies"].items()} == kept(host, "before-deletion")["digests"]
    report = json.loads(host.file("/var/lib/baileys-dr/reports/health.json").content_string)
    assert report["checks"]["standby_refresh"]["status"] == "healthy"
