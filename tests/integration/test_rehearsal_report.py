"""The rehearsal's reports: JSON and JUnit XML a CI reads, and the RTO/RPO table an operator reads."""

from __future__ import annotations

import json
import os
import sys
import xml.etree.ElementTree as ET

from conftest import ROOT
from module_harness import run_module

sys.path.insert(0, os.path.join(ROOT, "roles", "baileys_rehearsal", "library"))
import baileys_rehearsal_report  # noqa: E402

T0 = 1795860000.0  # 2026-11-28T10:00:00Z
BASE = {"company00001": "a" * 64, "company00002": "b" * 64}


def phases(**overrides):
    listed = [
        {"id": "snapshot", "name": "refresh the standby copy", "kind": "snapshot", "status": "passed",
         "started": T0, "ended": T0 + 2.0, "digests": dict(BASE)},
        {"id": "failover_live", "name": "failover with PostgreSQL up (live export)", "kind": "failover", "status": "passed",
         "started": T0 + 2.0, "ready": T0 + 6.5, "ended": T0 + 7.0, "source": "live", "data_at": "2026-11-28T10:00:02.500Z"},
        {"id": "verify_live", "name": "verify on files", "kind": "verify", "status": "passed",
         "started": T0 + 7.0, "ended": T0 + 8.0, "digests": dict(BASE)},
        {"id": "failover_standby", "name": "failover with PostgreSQL down (standby copy)", "kind": "failover",
         "status": "passed", "started": T0 + 60.0, "ready": T0 + 64.0, "ended": T0 + 65.0, "source": "standby",
         "data_at": "2026-11-28T09:59:00+00:00"},
    ]
    for index, values in overrides.items():
        listed[int(index[1:])].update(values)
    return listed


def write(tmp_path, phase_list, baseline=BASE, check_mode=False, **args):
    params = dict(dest=str(tmp_path / "reports"), name="rehearsal-test", host="app1", phases=phase_list,
                  baseline_digests=baseline, rto_targets={"failover": 5})
    params.update(args)
    return run_module(baileys_rehearsal_report, params, check_mode=check_mode)


def test_rto_is_start_to_ready_and_rpo_the_age_of_the_data_each_failover_used(tmp_path):
    ok, result = write(tmp_path, phases())
    assert ok, result
    live, standby = (p for p in result["report"]["phases"] if p["kind"] == "failover")
    # The live export read the data after the failover began: nothing older was served.
    assert live["rto_seconds"] == 4.5 and live["seconds"] == 5.0 and live["rpo_seconds"] == 0.0
    # The standby copy was written at 09:59:00 and served from 10:01:00.
    assert standby["rto_seconds"] == 4.0 and standby["rpo_seconds"] == 120.0
    assert standby["data_at"] == "2026-11-28T09:59:00.000+00:00"
    assert result["report"]["rto_targets"]["failover"] == {"target_seconds": 5.0, "worst_seconds": 4.5, "met": True}


def test_rto_falls_back_to_the_end_of_the_phase_when_no_ready_time_is_known(tmp_path):
    ok, result = write(tmp_path, phases(p1={"ready": None}))
    live = result["report"]["phases"][1]
    assert live["rto_seconds"] == 5.0 and live["rto_measured_to"] == "end of phase"


def test_zero_loss_means_every_digest_equals_the_baseline(tmp_path):
    ok, result = write(tmp_path, phases())
    assert ok and result["passed"] and result["report"]["zero_loss"]
    changed = dict(BASE, company00002="c" * 64)
    ok, result = write(tmp_path, phases(p2={"digests": changed}))
    verify = result["report"]["phases"][2]
    assert verify["zero_loss"] is False and verify["digests_differ"] == ["company00002"]
    assert not result["report"]["zero_loss"]
    missing = {"company00001": "a" * 64}
    ok, result = write(tmp_path, phases(p2={"digests": missing}))
    assert result["report"]["phases"][2]["digests_differ"] == ["company00002"]


def test_both_reports_are_written_under_the_rehearsal_name_and_as_latest(tmp_path):
    ok, result = write(tmp_path, phases())
    assert ok
    reports = tmp_path / "reports"
    assert sorted(os.listdir(reports)) == ["rehearsal-latest.json", "rehearsal-latest.xml", "rehearsal-test.json", "rehearsal-test.xml"]
    assert (reports / "rehearsal-latest.json").read_bytes() == (reports / "rehearsal-test.json").read_bytes()
    assert json.loads((reports / "rehearsal-test.json").read_text())["phases"][1]["rto_seconds"] == 4.5
    assert result["json_path"] == str(reports / "rehearsal-test.json")


def test_junit_has_a_testcase_per_phase_with_the_failure_message_and_skipped_phases(tmp_path):
    listed = phases(p2={"status": "failed", "message": "at 'Compare': digests differ for company00002 <&> \x07bell"})
    listed[3] = {"id": "failover_standby", "name": "failover with PostgreSQL down (standby copy)", "kind": "failover",
                 "status": "skipped", "message": "not run: an earlier phase failed"}
    ok, result = write(tmp_path, listed)
    assert ok and not result["passed"]
    suites = ET.parse(tmp_path / "reports" / "rehearsal-test.xml").getroot()
    assert suites.get("tests") == "4" and suites.get("failures") == "1" and suites.get("skipped") == "1"
    cases = suites.findall("./testsuite/testcase")
    assert [c.get("name") for c in cases] == ["01 refresh the standby copy", "02 failover with PostgreSQL up (live export)",
                                             "03 verify on files", "04 failover with PostgreSQL down (standby copy)"]
    assert cases[1].findtext("system-out") .startswith("rto_seconds=4.5, rpo_seconds=")
    failure = cases[2].find("failure")
    assert failure.get("message") == "at 'Compare': digests differ for company00002 <&> ?bell"
    assert cases[3].find("skipped").get("message") == "not run: an earlier phase failed"
    assert float(cases[0].get("time")) == 2.0
    assert result["report"]["failed_phases"] == ["verify on files"]


def test_table_shows_each_phase_with_its_figures_and_the_verdict(tmp_path):
    ok, result = write(tmp_path, phases(p1={"ready": T0 + 8.0, "ended": T0 + 8.5}))
    table = result["table"]
    assert table[0].split() == ["#", "Phase", "Result", "Time", "s", "RTO", "s", "RPO", "s", "Source", "Armed", "Data", "as", "of",
                                "Writes", "Down", "s", "Lost", "Zero", "loss"]
    assert table[3].split()[-12:] == ["passed", "6.5", "6.0", "0.0", "live", "-", "2026-11-28", "10:00:02", "-", "-", "-", "-"]
    assert table[5].split()[-12:] == ["passed", "5.0", "4.0", "120.0", "standby", "-", "2026-11-28", "09:59:00", "-", "-", "-", "-"]
    assert table[2].split()[-2:] == ["-", "yes"]
    assert "failover RTO target 5.0 s: worst 6.0 s, MISSED" in table
    assert table[-1] == "rehearsal rehearsal-test: PASSED, zero loss proven by digests"
    ok, result = write(tmp_path, phases(p2={"status": "failed", "message": "boom"}))
    assert result["table"][4].split()[:5] == ["3", "verify", "on", "files", "FAILED"]
    assert result["table"][-1] == "rehearsal rehearsal-test: FAILED (verify on files)"


def test_check_mode_writes_nothing(tmp_path):
    ok, result = write(tmp_path, phases(), check_mode=True)
    assert ok and result["changed"] and result["table"]
    assert not (tmp_path / "reports").exists()


def test_bad_input_is_refused_naming_it(tmp_path):
    ok, result = write(tmp_path, phases(), name="../escape")
    assert not ok and "name '../escape'" in result["msg"]
    ok, result = write(tmp_path, phases(p1={"data_at": "yesterday"}))
    assert not ok and "data_at 'yesterday' is not an ISO 8601 time" in result["msg"]
    ok, result = write(tmp_path, phases(p0={"kind": "party"}))
    assert not ok and "phases[0] (refresh the standby copy): kind 'party'" in result["msg"]
    ok, result = write(tmp_path, phases(p2={"started": None}))
    assert not ok and "phases[2] (verify on files) has no started" in result["msg"]


def test_module_documents_itself_as_ansible_doc_reads_it():
    import yaml

    documentation = yaml.safe_load(baileys_rehearsal_report.DOCUMENTATION)
    yaml.safe_load(baileys_rehearsal_report.EXAMPLES)
    yaml.safe_load(baileys_rehearsal_report.RETURN)
    assert documentation["module"] == "baileys_rehearsal_report"
    assert set(documentation["options"]) == {"dest", "name", "host", "environment", "baseline_digests", "phases", "rto_targets"}
    assert {"check_mode", "diff_mode"} <= set(documentation["attributes"])


def test_the_writers_figures_show_per_phase_and_a_lost_write_fails_zero_loss(tmp_path):
    # With the writer, digests change during the rehearsal: the ledger's check is the proof, not the baseline.
    listed = phases(p1={"writes_acked": 41, "downtime_seconds": 2.25}, p2={"writes_lost": 0, "writes_checked": 55, "digests": {}})
    ok, result = write(tmp_path, listed, baseline={})
    assert ok and result["report"]["zero_loss"]
    failover = result["report"]["phases"][1]
    assert failover["writes_acked"] == 41 and failover["downtime_seconds"] == 2.25
    row = [line for line in result["table"] if failover["name"] in line][0]
    assert "41" in row.split() and "2.2" in row.split()
    assert result["report"]["writes"] == {"acknowledged": 41, "checked": 55, "lost": 0}
    assert "acknowledged writes lost: 0 of 55 (the writer's ledger" in "\n".join(result["table"])

    ok, result = write(tmp_path, phases(p2={"writes_lost": 3, "writes_checked": 55, "digests": {}}), baseline={})
    assert ok and not result["report"]["zero_loss"]
    row = [line for line in result["table"] if result["report"]["phases"][2]["name"] in line][0]
    assert row.split()[-2:] == ["3", "NO"]


def test_table_shows_whether_each_failover_ran_armed(tmp_path):
    ok, result = write(tmp_path, phases(p1={"armed": "True"}, p3={"armed": False}))
    assert ok, result
    live, standby = (p for p in result["report"]["phases"] if p["kind"] == "failover")
    assert live["armed"] is True and standby["armed"] is False
    # The last 12 cells: Result, Time, RTO, RPO, Source, Armed, Data as of (2), Writes, Down, Lost, Zero loss.
    assert result["table"][3].split()[-12:][4:6] == ["live", "yes"]
    assert result["table"][5].split()[-12:][4:6] == ["standby", "no"]
    assert "armed=True" in baileys_rehearsal_report.junit_xml(result["report"]).decode()
