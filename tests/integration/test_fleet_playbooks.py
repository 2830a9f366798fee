"""Fleet inventories (issue 18): failover.yml and failback.yml check the companies of every application host once,
before any host begins, and end with a fleet summary (console, JSON, JUnit XML) that names each host's outcome.

Cheap: hosts of a local inventory (ansible_connection=local) whose runs are refused before they touch anything; a
few seconds per playbook run, no test bed. One host without a list passes the check: every playbook test on
inventories/local (one host, no baileys_dr_companies) runs through it.
"""

from __future__ import annotations

import json
import os
import subprocess
import xml.etree.ElementTree as ET

import yaml

from conftest import ROOT
from testbed_helpers import PLAYBOOK_BIN, SCRUBBED, PlaybookRun

# What the refused runs would otherwise write on this machine: all below the test's directory.
HOST_VARS = ("baileys_dr_state_dir", "baileys_dr_app_root", "baileys_dr_report_dir", "baileys_dr_lock_dir",
             "baileys_dr_notify_state_dir")


def inventory(tmp_path, hosts):
    """A local inventory of application hosts {name: their baileys_dr_companies, or None for none}."""
    base = str(tmp_path)
    group_vars = {"ansible_connection": "local", "ansible_python_interpreter": "{{ ansible_playbook_python }}",
                  "baileys_dr_audit_log": base + "/audit-{{ inventory_hostname }}.jsonl",
                  "baileys_dr_controller_audit_log": base + "/controller-audit.jsonl", "baileys_dr_metrics_dir": "",
                  "baileys_dr_fleet_report_dir": base + "/fleet", "baileys_dr_db_port": 1}
    group_vars.update({name: "%s/%s-{{ inventory_hostname }}" % (base, name) for name in HOST_VARS})
    listed = {name: ({} if companies is None else {"baileys_dr_companies": companies}) for name, companies in hosts.items()}
    path = tmp_path / "hosts.yml"
    path.write_text(yaml.safe_dump({"all": {"children": {"baileys_app": {"vars": group_vars, "hosts": listed}}}}))
    return str(path)


def run_playbook(playbook, inventory_path, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith(SCRUBBED)}
    env.update(ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"), ANSIBLE_STDOUT_CALLBACK="ansible.posix.jsonl", ANSIBLE_NOCOLOR="1",
               PATH=os.path.dirname(PLAYBOOK_BIN) + os.pathsep + env.get("PATH", ""))
    done = subprocess.run([PLAYBOOK_BIN, "-i", inventory_path, os.path.join(ROOT, "playbooks", playbook), *args], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    return PlaybookRun(playbook, done.returncode, done.stdout, "(not kept)")


def began(run, role):
    """Whether any task of the operation's own role ran (its lock, its preflight): the check must come first."""
    return [name for name, event, _, _, _ in run.tasks() if name.startswith(role + " :") and event != "v2_runner_on_skipped"]


def fleet_report(tmp_path, operation):
    with open(tmp_path / "fleet" / ("%s-fleet-latest.json" % operation), encoding="utf-8") as fh:
        report = json.load(fh)
    suite = ET.parse(tmp_path / "fleet" / ("%s-fleet-latest.xml" % operation)).getroot().find("testsuite")
    return report, {case.get("name"): case for case in suite.findall("testcase")}


def test_a_company_claimed_by_two_hosts_is_refused_before_any_host_fails_over_naming_the_company_and_the_hosts(tmp_path):
    path = inventory(tmp_path, {"app1": ["acme", "beta"], "app2": ["beta", "gamma"], "app3": ["delta"]})
    run = run_playbook("failover.yml", path)
    assert run.returncode != 0, run.explain()
    message = run.final_message()
    assert "companies claimed by more than one host" in message and "beta by app1 and app2" in message, message
    assert "acme" not in message and "app3" not in message, "only the company claimed twice is named: " + message
    assert began(run, "baileys_failover") == [], "a host began its failover before the fleet check refused it"
    report, cases = fleet_report(tmp_path, "failover")
    assert {h["host"]: h["outcome"] for h in report["hosts"]} == {"app1": "refused", "app2": "refused", "app3": "refused"}
    assert all("beta by app1 and app2" in h["message"] for h in report["hosts"])
    assert [h["scope"] for h in report["hosts"]] == [["acme", "beta"], ["beta", "gamma"], ["delta"]]
    assert set(cases) == {"app1", "app2", "app3"} and all(case.find("failure") is not None for case in cases.values())


def test_a_host_without_companies_in_a_fleet_is_refused_naming_it_even_when_the_run_is_limited_to_another_host(tmp_path):
    path = inventory(tmp_path, {"app1": ["acme"], "app2": None, "app3": "all"})
    run = run_playbook("failback.yml", path, "--limit", "app1")
    assert run.returncode != 0, run.explain()
    message = run.final_message()
    assert "hosts without their own baileys_dr_companies in an inventory of 3 application hosts: app2, app3" in message, message
    assert began(run, "baileys_failback") == []
    report, _cases = fleet_report(tmp_path, "failback")
    assert [h["host"] for h in report["hosts"]] == ["app1"], "the summary lists the hosts of the run"


def test_a_canary_batch_that_fails_starts_no_later_batch_and_the_summary_says_which_hosts_did_not_run(tmp_path):
    # The canary app1 is refused by its own settings check (cheaply, before its role); app2 and app3 never start.
    path = inventory(tmp_path, {"app1": ["acme", "not an id"], "app2": ["beta"], "app3": ["gamma"]})
    run = run_playbook("failover.yml", path, "-e", json.dumps({"baileys_dr_fleet_batch": [1, "100%"]}))
    assert run.returncode != 0
    assert "baileys_dr_companies of app1 must be" in run.final_message(), run.explain()
    ran = {host for event in run.events if event.get("_event") == "v2_runner_on_ok" for host in event.get("hosts", {})}
    assert ran == {"app1"}, "only the canary host ran a task"
    report, cases = fleet_report(tmp_path, "failover")
    assert [(h["host"], h["outcome"]) for h in report["hosts"]] == [("app1", "refused"), ("app2", "not run"), ("app3", "not run")]
    assert report["not_run"] == ["app2", "app3"] and cases["app2"].find("skipped") is not None
