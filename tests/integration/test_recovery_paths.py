"""The recovery paths of the switch, end to end on the embedded test bed: what the operator sees after a failover or a
failback that failed midway (docs/runbook.md, docs/reliability.md).

- a failover whose service, once started on files, reports other identities than the copied state (a failed
  post-start check): rolled back to PostgreSQL, sessions tree, .env and git ref as before, nothing of the database lost;
- a failback failed after the switch of .env and git (`switch_switched`): its imports undone (the database as at the
  failover's stop), .env and git ref of the file store back, the service restarted on files, no write lost;
- a failover failing while PostgreSQL is down: NOT rolled back onto it, the journal kept, and a re-run finishes it,
  the service serving the database's data.

The live-traffic proofs (rows 23-30 of docs/reliability.md) are test_switch_under_traffic.py's; those already cover a
failback aborted at `switch_copied` (before its .env and git switch) and runs killed between stop and start.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from faults_helpers import wait_until
from test_check_mode_playbooks import file_fingerprints
from test_switch_under_traffic import audited, lost_summary
from testbed_helpers import PlaybookRun, Writer, normal_testbed, testbed  # noqa: F401 - the module's test bed fixtures

from ansible.module_utils.baileys_dr_verify import verify_tree

SWITCH = "baileys_store_switch"
pytestmark = pytest.mark.usefixtures("normal_testbed")


def what_the_operator_sees(bed):
    """.env bytes, git ref, sessions tree and the store the service answers with."""
    return {"env": bed.env_file(), "git": bed.git_ref(),
            "sessions": file_fingerprints(bed.sessions) if os.path.isdir(bed.sessions) else None}


def said(run):
    """Everything the run printed about its failure: the final message and the switch's own result."""
    result = run.result(SWITCH) or {}
    return " ".join([run.final_message(), str(result.get("msg", "")), json.dumps(result.get("rollback", ""))])


def online(bed):
    instances = bed.instances()
    return instances and all(i["status"] == "online" for i in instances)


def test_a_failover_whose_service_reports_other_identities_after_the_start_is_rolled_back_with_nothing_lost(testbed):  # noqa: F811
    bed = testbed
    before = what_the_operator_sees(bed)
    digests = bed.database_digests()["digests"]
    # Held once .env and git are switched, the tree swapped and the service not started yet: the copied creds of one
    # company are then given another registrationId, as a tree damaged after the copy would be.
    process, log_path = bed.playbook_process("failover.yml", env={"BAILEYS_DR_TEST_PAUSE_AT": "switch_switched",
                                                                  "BAILEYS_DR_TEST_PAUSE_SECONDS": "20"})
    wait_until(lambda: ((bed.read_state() or {}).get("switch") or {}).get("phase") == "switched", timeout=300,
               what="the failover held after its switch of .env and git")
    company = sorted(digests)[0]
    creds_path = os.path.join(bed.sessions, "company_" + company, "creds.json")
    with open(creds_path, encoding="utf-8") as fh:
        creds = json.load(fh)
    creds["registrationId"] = (creds["registrationId"] + 1) % 16380 + 1
    with open(creds_path, "w", encoding="utf-8") as fh:
        json.dump(creds, fh, separators=(",", ":"))
    process.wait(timeout=600)
    with open(log_path, encoding="utf-8") as fh:
        run = PlaybookRun("failover.yml", process.returncode, fh.read(), log_path)

    assert run.returncode != 0, run.explain()
    text = said(run)
    assert "other identities than the copied state" in text and company in text, text
    assert "Rolled back: sessions, git ref, .env and the service are as before the stop (store postgres)" in text, text
    audited(bed, "failover", "rolled_back")
    health = bed.wait_serving("postgres")
    assert health["store"] == "postgres" and online(bed)
    assert what_the_operator_sees(bed) == before, "sessions tree, .env and git ref as before the failover"
    assert bed.database_digests()["digests"] == digests, "nothing of the database lost"
    assert bed.read_state() is None, "no failover in effect: nothing for a failback to restore"


def test_a_failback_failed_after_its_env_and_git_switch_undoes_its_imports_and_restarts_on_files_with_nothing_lost(
        testbed, tmp_path):  # noqa: F811
    bed = testbed
    on_postgres = what_the_operator_sees(bed)
    writer = Writer(bed, tmp_path / "ledger.jsonl").start()
    writer.wait_acks(3, after=time.time() - 1)
    failover = bed.playbook("failover.yml")
    assert failover.returncode == 0, failover.explain()
    at_stop = failover.result(SWITCH)["proof"]["digests"]
    bed.wait_serving("files", complete=False)
    # Writes on files: the failback then has rows to import, and to undo.
    writer.wait_acks(5, after=failover.ended(""))
    writer.stop()
    on_files = what_the_operator_sees(bed)
    assert on_files["env"] != on_postgres["env"], "the failover switched .env: restoring it is a real step"

    aborted = bed.playbook("failback.yml", env={"BAILEYS_DR_TEST_FAIL_AT": "switch_switched"})

    assert aborted.returncode != 0, aborted.explain()
    assert "fault injected at switch_switched" in aborted.final_message(), aborted.explain()
    assert "The database imports were undone." in aborted.final_message(), aborted.explain()
    (undo,) = [result for name, _, result, _, _ in aborted.tasks() if "Undo the imports" in name]
    assert undo["results"] and all(item["changed"] for item in undo["results"]), \
        "the imports of the writes on files were committed before the fault, and each was undone"
    audited(bed, "failback", "rolled_back")
    assert bed.database_digests()["digests"] == at_stop, "the database is back to its rows of the failover's stop"
    bed.wait_serving("files")
    assert online(bed)
    now = what_the_operator_sees(bed)
    assert (now["env"], now["git"]) == (on_files["env"], on_files["git"]), ".env and git ref of the file store again"
    status, report = writer.check("files")
    assert status == 0 and report["lost"] == 0, lost_summary(report)

    # The next failback succeeds: every write acknowledged on files reaches PostgreSQL.
    run = bed.playbook("failback.yml")
    assert run.returncode == 0, run.explain()
    bed.wait_serving("postgres")
    status, report = writer.check("postgres")
    assert status == 0 and report["lost"] == 0, lost_summary(report)
    assert (bed.env_file(), bed.git_ref()) == (on_postgres["env"], on_postgres["git"])


def test_a_failover_failing_while_postgresql_is_down_is_not_rolled_back_onto_it_and_a_rerun_finishes_it(testbed):  # noqa: F811
    bed = testbed
    refresh = bed.playbook("snapshot.yml")
    assert refresh.returncode == 0, refresh.explain()
    digests = bed.database_digests()["digests"]
    bed.stop_postgres()
    try:
        run = bed.playbook("failover.yml", {"baileys_failover_source": "standby"},
                           env={"BAILEYS_DR_TEST_FAIL_AT": "switch_switched"})
        assert run.returncode != 0, run.explain()
        text = said(run)
        assert "NOT ROLLED BACK: PostgreSQL does not answer" in text and "re-run failover.yml" in text, text
        assert "Rolled back" not in text, text
        assert not bed.cluster.running(), "the rollback never started PostgreSQL"
        assert ((bed.read_state() or {}).get("switch") or {}).get("phase") == "switched", "the journal is kept for the re-run"
        assert not online(bed), "left stopped: it failed before the start"
        # Nothing lost: the tree in place holds exactly the database's data at the stop (recomputed from the files).
        assert verify_tree(bed.sessions, recompute_digests=True)["digests"] == digests

        rerun = bed.playbook("failover.yml", {"baileys_failover_source": "standby"})
        assert rerun.returncode == 0, rerun.explain()
        assert rerun.result(SWITCH).get("resumed_from") == "switched", rerun.result(SWITCH)
        health = bed.wait_serving("files")
        assert online(bed)
        assert health["digests"] == digests and health["errors"] == [], "the service serves the database's data, nothing lost"
    finally:
        bed.start_postgres()


def test_in_a_fleet_one_host_refused_stops_no_other_host_and_the_summary_names_each(testbed, tmp_path):  # noqa: F811
    """Two application hosts fail over at once: the test bed's, and one whose application is missing (refused by its
    preflight). The refused host fails the run; the other switches to files with only its companies and stays there;
    the fleet summary (console, JSON, JUnit) names both outcomes. Then both fail back at once."""
    bed = testbed
    companies = sorted(bed.database_digests()["digests"])
    other = str(tmp_path / "app2")
    fleet = tmp_path / "fleet-hosts.yml"
    fleet.write_text(json.dumps({"all": {"children": {"baileys_app": {"hosts": {
        # inventory_dir is this file's directory for both hosts now: the PM2 the test bed's inventory finds through it.
        "localhost": {"baileys_dr_companies": companies, "baileys_dr_pm2_bin": bed.pm2},
        "app2": {"ansible_connection": "local", "ansible_python_interpreter": "{{ ansible_playbook_python }}",
                 "baileys_dr_pm2_bin": bed.pm2, "baileys_dr_health_port": 9,
                 "baileys_dr_companies": ["company-of-app2"], "baileys_dr_app_name": "baileys-app2-missing",
                 "baileys_dr_app_root": other + "/app", "baileys_dr_state_dir": other + "/state",
                 "baileys_dr_report_dir": other + "/reports", "baileys_dr_audit_log": other + "/audit.jsonl"}}}}}}))
    reports = tmp_path / "fleet-reports"

    run = bed.playbook("failover.yml", {"baileys_dr_fleet_report_dir": str(reports)}, args=("-i", str(fleet)))

    assert run.returncode != 0, "the refused host fails the run"
    assert "baileys-app2-missing" in run.final_message() or other in run.final_message(), run.explain()
    switch = run.result(SWITCH)
    assert switch and switch["store"] == "files" and sorted(switch["proof"]["digests"]) == companies, run.explain()
    bed.wait_serving("files", complete=False)
    assert (bed.read_state() or {}).get("switch", {}).get("phase") == "done", "the test bed's host was not rolled back"
    with open(reports / "failover-fleet-latest.json", encoding="utf-8") as fh:
        summary = json.load(fh)
    hosts = {h["host"]: h for h in summary["hosts"]}
    assert hosts["localhost"]["outcome"] == "ok" and hosts["app2"]["outcome"] == "refused", summary
    assert hosts["localhost"]["rto_seconds"] > 0 and 0 < hosts["localhost"]["downtime_seconds"] <= hosts["localhost"]["rto_seconds"]
    assert hosts["localhost"]["companies"] == len(companies) and hosts["localhost"]["scope"] == companies
    assert summary["failed_hosts"] == ["app2"]
    assert (reports / "failover-fleet-latest.xml").exists()
    printed = [result.get("msg", "") for name, _, result, _, _ in run.tasks() if name.endswith("Print the fleet summary")]
    assert printed and "failover of 2 hosts: 1 ok, 1 refused" in printed[-1], printed

    # Both fail back at once: the test bed's host imports only its companies, the other has nothing to fail back.
    back = bed.playbook("failback.yml", {"baileys_dr_fleet_report_dir": str(reports)}, args=("-i", str(fleet)))
    assert back.returncode == 0, back.explain()
    assert sorted(back.result("baileys_auth_import")["companies"]) == companies, back.explain()
    bed.wait_serving("postgres")
    with open(reports / "failback-fleet-latest.json", encoding="utf-8") as fh:
        summary = json.load(fh)
    assert {h["host"]: (h["outcome"], h["note"]) for h in summary["hosts"]} == {
        "localhost": ("ok", ""), "app2": ("ok", "nothing to do")}, summary
