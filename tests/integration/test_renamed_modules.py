"""The module names 0.4.0 changed still work for one release: a playbook written for 0.3 runs, and says what to rename.

Real ansible-playbook runs through the project's ansible.cfg, so the links in library/ and plugins/action/ are found
the way an operator's playbook finds them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml
from conftest import ROOT
from testbed_helpers import PLAYBOOK_BIN

from ansible.module_utils.baileys_dr_renames import REMOVED_IN, RENAMED_MODULES


def run_playbook(tmp_path, tasks):
    path = tmp_path / "old_names.yml"
    path.write_text(yaml.safe_dump([{"name": "A 0.3 playbook", "hosts": "localhost", "gather_facts": False,
                                     "tasks": tasks}], sort_keys=False))
    env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_FORCE_COLOR="0")
    argv = [PLAYBOOK_BIN, "-i", "localhost,", "-c", "local", str(path),
            "-e", json.dumps({"ansible_python_interpreter": sys.executable})]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_a_playbook_using_the_old_module_names_still_works_and_is_told_each_new_name(tmp_path):
    env_path = tmp_path / "app.env"
    env_path.write_text("USE_DATABASE_AUTH_STATE=true\n")
    lock_dir = tmp_path / "locks"
    keep = tmp_path / "reports"
    keep.mkdir()
    tasks = [
        {"name": "Set a key with env_file", "env_file": {"path": str(env_path), "values": {"USE_DATABASE_AUTH_STATE": "false"}}},
        {"name": "Take a lease with baileys_dr_lock", "baileys_dr_lock": {"name": "failover-localhost", "lock_dir": str(lock_dir)}},
        {"name": "Release it", "baileys_dr_lock": {"name": "failover-localhost", "lock_dir": str(lock_dir), "state": "released"}},
        {"name": "Prune with baileys_dr_prune", "baileys_dr_prune": {
            "sets": [{"path": str(keep), "pattern": "*.json"}], "keep_last": 1, "keep_days": 1}},
    ]
    result = run_playbook(tmp_path, tasks)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert env_path.read_text() == "USE_DATABASE_AUTH_STATE=false\n"
    assert not any(lock_dir.glob("*.lease")), "the old lease name took and released its lease"
    said = " ".join(out.split())
    for old in ("env_file", "baileys_dr_lock", "baileys_dr_prune"):
        assert "the module %s is now called %s" % (old, RENAMED_MODULES[old]) in said, out
        assert REMOVED_IN in said


def test_the_new_names_run_without_a_deprecation_warning(tmp_path):
    env_path = tmp_path / "app.env"
    env_path.write_text("A=1\n")
    result = run_playbook(tmp_path, [
        {"name": "Set a key", "baileys_env_file": {"path": str(env_path), "values": {"A": "2"}}},
        {"name": "Take a lease", "baileys_lock": {"name": "x", "lock_dir": str(tmp_path / "locks"), "state": "acquired"}},
    ])
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert env_path.read_text() == "A=2\n"
    assert "is now called" not in out
