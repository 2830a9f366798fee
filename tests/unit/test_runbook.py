"""docs/runbook.md: the four failure scenarios, and a variable reference that matches the roles."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import yaml

from conftest import ROOT

GEN = os.path.join(ROOT, "scripts", "gen-var-reference")
RUNBOOK = os.path.join(ROOT, "docs", "runbook.md")
BEGIN = "<!-- BEGIN GENERATED VARIABLE REFERENCE: scripts/gen-var-reference -->"
END = "<!-- END GENERATED VARIABLE REFERENCE -->"


def text():
    with open(RUNBOOK, encoding="utf-8") as fh:
        return fh.read()


def section(title):
    match = re.search(r"^## %s\n(.*?)(?=^## )" % re.escape(title), text(), re.S | re.M)
    assert match, "docs/runbook.md has no section '## %s'" % title
    return match.group(1)


def test_the_committed_variable_reference_is_up_to_date():
    run = subprocess.run([GEN, "--check"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr + "\nrun scripts/gen-var-reference and commit docs/runbook.md"


def test_a_stale_reference_is_detected_and_regenerated(tmp_path):
    copy = tmp_path / "runbook.md"
    shutil.copy(RUNBOOK, copy)
    stale = re.sub(r"^\| `baileys_failover_source` .*\n", "", copy.read_text(), flags=re.M)
    assert stale != copy.read_text()
    copy.write_text(stale)
    run = subprocess.run([GEN, "--check", "--doc", str(copy)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "stale" in run.stderr
    run = subprocess.run([GEN, "--doc", str(copy)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert copy.read_text() == text()


def test_the_generator_refuses_a_runbook_without_markers(tmp_path):
    copy = tmp_path / "runbook.md"
    copy.write_text(text().replace(END, ""))
    run = subprocess.run([GEN, "--doc", str(copy)], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "markers" in run.stderr


@pytest.mark.parametrize("role", sorted(os.listdir(os.path.join(ROOT, "roles"))))
def test_every_role_option_is_in_the_reference(role):
    reference = text().split(BEGIN, 1)[1].split(END, 1)[0]
    with open(os.path.join(ROOT, "roles", role, "meta", "argument_specs.yml"), encoding="utf-8") as fh:
        specs = yaml.safe_load(fh)["argument_specs"]
    assert "### `%s`" % role in reference
    for spec in specs.values():
        for name in spec.get("options") or {}:
            assert "| `%s` |" % name in reference, name


SCENARIOS = ["Scenario 1: database unreachable", "Scenario 2: corrupted data", "Scenario 3: accidental deletion",
             "Scenario 4: complete loss"]


@pytest.mark.parametrize("title", SCENARIOS)
def test_each_failure_scenario_has_shell_and_awx_commands(title):
    body = section(title)
    assert re.search(r"ansible-playbook -i inventories/production playbooks/\w+\.yml", body)
    assert re.search(r"awx (job_templates|workflow_job_templates) launch '", body)


def test_the_decision_tree_leads_to_every_scenario():
    tree = re.search(r"```mermaid\n(.*?)```", section("First: which scenario is it?"), re.S).group(1)
    assert tree.startswith("flowchart")
    for number in range(1, 5):
        assert "s%d[Scenario %d" % (number, number) in tree


def test_every_playbook_and_awx_template_the_runbook_names_exists():
    body = text()
    for playbook in set(re.findall(r"playbooks/(\w+)\.yml", body)):
        assert os.path.isfile(os.path.join(ROOT, "playbooks", playbook + ".yml")), playbook
    with open(os.path.join(ROOT, "awx", "settings", "controller.yml"), encoding="utf-8") as fh:
        settings = yaml.safe_load(fh)
    names = {t["name"] for t in settings["awx_job_templates"]} | {settings["awx_failover_workflow"]["name"]}
    names |= {s["name"] for s in settings["awx_schedules"]}
    for name in set(re.findall(r"'(baileys-dr [^']+)'", body)) | set(re.findall(r"`(baileys-dr [^`]+)`", body)):
        if name not in ("baileys-dr secrets", "baileys-dr production", "baileys-dr staging"):
            assert name in names, name
    play_vars = set()
    for name in os.listdir(os.path.join(ROOT, "playbooks")):
        with open(os.path.join(ROOT, "playbooks", name), encoding="utf-8") as fh:
            for play in yaml.safe_load(fh) or []:
                play_vars |= set(play.get("vars") or {})
    for variable in set(re.findall(r"-e (baileys_\w+)=", body)):
        assert "| `%s` |" % variable in body or variable in play_vars, variable
