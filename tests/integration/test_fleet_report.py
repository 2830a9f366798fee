"""The fleet summary of failover.yml and failback.yml (baileys_fleet_report): per host its outcome, RTO, downtime,
companies and acknowledged writes lost, as a table, a JSON report and a JUnit XML report (the rehearsal's writer)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import baileys_fleet_report
from module_harness import run_module

T0 = 1796648400.0  # 2026-12-07T13:00:00Z


def hosts():
    return [
        {"host": "app1", "outcome": "ok", "started_at": T0, "ended_at": T0 + 6.2, "rto_seconds": 5.1, "downtime_seconds": 1.4,
         "companies": "40", "scope": ["acme", "beta"], "writes_lost": "0"},
        {"host": "app2", "outcome": "rolled_back", "started_at": T0 + 0.1, "ended_at": T0 + 9.0, "failed_step": "identities",
         "message": "failover failed at step 'identities': the service on files reports other identities <&>", "scope": ["gamma"]},
        {"host": "app3", "outcome": "not run"},
    ]


def write(tmp_path, entries, check_mode=False):
    return run_module(baileys_fleet_report, dict(dest=str(tmp_path / "fleet"), name="failover-fleet-test", operation="failover",
                                                 hosts=entries), check_mode=check_mode)


def test_the_summary_names_each_hosts_outcome_rto_downtime_companies_and_writes_lost(tmp_path):
    ok, result = write(tmp_path, hosts())
    assert ok, result
    report = result["report"]
    assert not result["passed"] and report["failed_hosts"] == ["app2"] and report["not_run"] == ["app3"]
    assert report["outcomes"] == {"ok": 1, "rolled_back": 1, "not run": 1}
    assert report["seconds"] == 9.0 and report["worst_rto_seconds"] == 5.1 and report["worst_downtime_seconds"] == 1.4
    assert report["writes_lost"] == 0
    app1 = report["hosts"][0]
    assert (app1["companies"], app1["scope"], app1["seconds"]) == (40, ["acme", "beta"], 6.2)
    table = "\n".join(result["table"])
    assert table.splitlines()[0].split() == ["Host", "Outcome", "RTO", "s", "Down", "s", "Companies", "Writes", "lost", "Step", "/", "message"]
    assert "app1  ok" in table and "5.1" in table and "40 (2 listed)" in table
    assert "ROLLED_BACK" in table and "reports other identities" in table
    assert result["table"][-1].startswith("failover of 3 hosts: 1 not run, 1 ok, 1 rolled_back; wall time 9.0 s, worst RTO 5.1 s")


def test_json_and_junit_reports_are_written_under_the_run_name_and_as_latest(tmp_path):
    ok, result = write(tmp_path, hosts())
    assert ok
    fleet = tmp_path / "fleet"
    assert sorted(p.name for p in fleet.iterdir()) == ["failover-fleet-latest.json", "failover-fleet-latest.xml",
                                                       "failover-fleet-test.json", "failover-fleet-test.xml"]
    assert json.loads((fleet / "failover-fleet-latest.json").read_text())["hosts"][1]["failed_step"] == "identities"
    suites = ET.parse(fleet / "failover-fleet-test.xml").getroot()
    assert (suites.get("tests"), suites.get("failures"), suites.get("skipped")) == ("3", "1", "1")
    cases = {case.get("name"): case for case in suites.findall("./testsuite/testcase")}
    assert cases["app1"].find("failure") is None and "rto_seconds=5.1" in cases["app1"].findtext("system-out")
    failure = cases["app2"].find("failure")
    assert failure.get("type") == "HostRolledBack" and failure.get("message").endswith("other identities <&>")
    assert cases["app3"].find("skipped") is not None


def test_check_mode_writes_nothing(tmp_path):
    ok, result = write(tmp_path, hosts(), check_mode=True)
    assert ok and result["report"]["hosts"][0]["outcome"] == "ok"
    assert not (tmp_path / "fleet").exists()


def test_a_host_entry_without_a_name_or_with_a_bad_figure_is_refused(tmp_path):
    ok, result = write(tmp_path, [{"outcome": "ok"}])
    assert not ok and "host name" in result["msg"]
    ok, result = write(tmp_path, [{"host": "app1", "rto_seconds": "soon"}])
    assert not ok and "rto_seconds 'soon' is not a number" in result["msg"]
