"""The baileys_dr_audit callback through real ansible-playbook runs: one JSON line per run and step, no secrets."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

ANSIBLE_PLAYBOOK = os.path.join(os.path.dirname(sys.executable), "ansible-playbook")
SECRET = "s3cr3t-value-do-not-leak"

PLAYBOOK = """
- name: A DR-like play
  hosts: app1
  gather_facts: false
  tasks:
    - name: Use a secret
      ansible.builtin.command: echo {{ db_password }}
      changed_when: true
      no_log: true

    - name: Say hello
      ansible.builtin.command: echo hello
      changed_when: false

    - name: Skip me
      ansible.builtin.debug:
        msg: never
      when: false

    - name: Fail quietly with a secret
      ansible.builtin.fail:
        msg: "cannot log in with {{ db_password }}"
      no_log: true
      ignore_errors: true

    - name: Fail loudly
      ansible.builtin.fail:
        msg: export broke at company00002
      when: fail_at_end | default(false) | bool
"""


@pytest.fixture
def run(tmp_path):
    (tmp_path / "playbook.yml").write_text(PLAYBOOK)
    (tmp_path / "inventory.yml").write_text(json.dumps({"all": {"hosts": {"app1": {
        "ansible_connection": "local", "ansible_python_interpreter": sys.executable}}}}))

    def runner(*args, env=None, log=None):
        environ = {k: v for k, v in os.environ.items() if k not in ("JOB_ID", "BAILEYS_DR_AUDIT_LOG")}
        environ.update(ANSIBLE_CALLBACKS_ENABLED="baileys_dr_audit",
                       ANSIBLE_CALLBACK_PLUGINS=os.path.join(ROOT, "callback_plugins"),
                       ANSIBLE_NOCOLOR="1", HOME=str(tmp_path / "home"), **(env or {}))
        if log:
            environ["BAILEYS_DR_AUDIT_LOG"] = str(log)
        command = [ANSIBLE_PLAYBOOK, "-i", str(tmp_path / "inventory.yml"), str(tmp_path / "playbook.yml"),
                   "-e", json.dumps({"db_password": SECRET})] + list(args)
        return subprocess.run(command, cwd=str(tmp_path), env=environ, capture_output=True, text=True, timeout=300)

    return runner


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_run_and_step_is_one_private_json_line_with_who_and_duration(run, tmp_path):
    log = tmp_path / "state" / "audit" / "audit.jsonl"
    result = run("-vvv", "-e", "awx_user_name=alice", env={"JOB_ID": "4242"}, log=log)
    assert result.returncode == 0, result.stdout[-2000:]
    found = records(log)
    assert [r["event"] for r in found] == ["playbook_start", "play_start"] + ["step"] * 5 + ["playbook_end"]
    assert {r["run_id"] for r in found} == {found[0]["run_id"]}
    assert all(r["job_id"] == "4242" and r["user"] and r["playbook"] == "playbook.yml" for r in found)
    assert found[1]["awx_user"] == "alice" and "db_password" in found[1]["extra_vars"]
    steps = {r["task"]: r for r in found if r["event"] == "step"}
    assert steps["Say hello"]["status"] == "ok" and steps["Say hello"]["duration_seconds"] >= 0
    assert steps["Say hello"]["host"] == "app1" and steps["Say hello"]["action"] == "ansible.builtin.command"
    assert steps["Skip me"]["status"] == "skipped"
    assert steps["Fail quietly with a secret"]["status"] == "ignored"
    end = found[-1]
    assert end["outcome"] == "ok" and end["hosts"] == ["app1"] and end["summary"]["app1"]["ignored"] == 1
    assert end["duration_seconds"] > 0
    assert oct(log.stat().st_mode & 0o777) == "0o600"
    assert oct(log.parent.stat().st_mode & 0o777) == "0o700"


def test_no_log_steps_leave_only_their_name_and_status_and_no_argument_is_ever_written(run, tmp_path):
    log = tmp_path / "audit.jsonl"
    result = run("-vvv", "-e", "fail_at_end=true", log=log)
    assert result.returncode == 2
    text = log.read_text()
    assert SECRET not in text
    steps = {r["task"]: r for r in records(log) if r["event"] == "step"}
    hidden = steps["Use a secret"]
    assert hidden["status"] == "changed" and hidden["no_log"] is True
    assert set(hidden) <= {"event", "task", "status", "host", "play", "no_log", "time", "run_id", "playbook", "user",
                           "job_id", "awx_user"}
    assert "msg" not in steps["Fail quietly with a secret"]
    # A failed step says why (its msg), the run says it failed.
    assert steps["Fail loudly"]["status"] == "failed" and steps["Fail loudly"]["msg"] == "export broke at company00002"
    assert records(log)[-1]["outcome"] == "failed"
    assert "echo" not in text  # arguments never appear


def test_the_default_path_is_under_the_users_state_directory(run, tmp_path):
    assert run().returncode == 0
    log = tmp_path / "home" / ".local" / "state" / "baileys-dr" / "audit.jsonl"
    assert records(log)[0]["event"] == "playbook_start"


def test_an_unwritable_log_warns_once_and_the_play_goes_on(run, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    result = run(log=blocker / "audit.jsonl")
    assert result.returncode == 0
    assert (result.stdout + result.stderr).count("baileys_dr_audit: cannot write the audit log") == 1
