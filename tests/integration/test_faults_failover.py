"""Faults around a failover run (issue 8, points 5 and 12): two runs at once, the .env rewrite killed.

Real processes: ansible-playbook runs for the lock (the holder is the
ansible-playbook process, killed with SIGKILL), the env_file module run as a
real module process and killed with SIGKILL in the middle of its write.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import ROOT
from faults_helpers import wait_until

PLAYBOOK_BIN = os.path.join(os.path.dirname(sys.executable), "ansible-playbook")


# -- 5. two failover runs at once -----------------------------------------------------------------------------------


def lock_task():
    """The failover role's own lock task, as preflight.yml has it."""
    with open(os.path.join(ROOT, "roles", "baileys_failover", "tasks", "preflight.yml"), encoding="utf-8") as fh:
        tasks = yaml.safe_load(fh)
    (task,) = [t for t in tasks if "baileys_dr_lock" in t]
    return task


@pytest.fixture
def failover_like_playbook(tmp_path):
    """A play with the failover role's lock task, then a step that takes `hold` seconds (the export, the restart...)."""
    path = tmp_path / "failover.yml"
    play = [{"name": "Fail over (the lock and a long step)", "hosts": "localhost", "gather_facts": False,
             "tasks": [lock_task(), {"name": "A long failover step", "ansible.builtin.command": "sleep {{ hold }}",
                                     "changed_when": False}]}]
    path.write_text(yaml.safe_dump(play, sort_keys=False))
    return path


def playbook(path, lock_dir, hold, action_plugin=False, **popen):
    """ansible-playbook on path; with action_plugin, the lock is taken by the action plugin the failover role ships
    (in the controller) instead of the module."""
    argv = [PLAYBOOK_BIN, "-i", "localhost,", "-c", "local", "-v", str(path),
            "-e", json.dumps({"baileys_dr_lock_dir": str(lock_dir), "hold": hold, "ansible_python_interpreter": sys.executable})]
    env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"), ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0")
    if action_plugin:
        env["ANSIBLE_ACTION_PLUGINS"] = os.path.join(ROOT, "roles", "baileys_failover", "action_plugins")
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


# The first run's lock taken by the module or by the action plugin; the other runs use the other one, so either
# refuses and takes over what the other took.
@pytest.mark.parametrize("first_by_action_plugin", [False, True], ids=["module-first", "action-plugin-first"])
def test_a_second_failover_fails_at_once_naming_the_holder_and_after_kill_9_a_new_run_proceeds(
        failover_like_playbook, tmp_path, first_by_action_plugin):
    lock_dir = tmp_path / "locks"
    lock_file = lock_dir / "failover-localhost.lock"
    first = playbook(failover_like_playbook, lock_dir, 300, action_plugin=first_by_action_plugin, start_new_session=True)
    try:
        wait_until(lambda: lock_file.exists() or first.poll() is not None, timeout=120, what="the first run to take the lock")
        assert first.poll() is None, first.stdout.read()
        holder = json.loads(lock_file.read_text())
        assert holder["pid"] == first.pid and holder["playbook"] == "failover.yml"

        started = time.monotonic()
        second = playbook(failover_like_playbook, lock_dir, 0, action_plugin=not first_by_action_plugin)
        out, _ = second.communicate(timeout=120)
        elapsed = time.monotonic() - started
        assert second.returncode != 0, out
        assert "lock %s is held by pid %d" % (lock_file, first.pid) in out and "failover.yml" in out, out
        assert "A long failover step" not in out, "the second run stops at the lock, before any step"
        assert elapsed < 60, "the second run waited %.0fs instead of failing at once" % elapsed
        assert first.poll() is None, "the first run goes on"
    finally:
        # kill -9 of the whole first run: ansible-playbook, its workers and the step; nothing gets to clean up.
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert json.loads(lock_file.read_text())["pid"] == first.pid, "the lock file of the killed run is still there"

    third = playbook(failover_like_playbook, lock_dir, 0, action_plugin=not first_by_action_plugin)
    out, _ = third.communicate(timeout=120)
    assert third.returncode == 0, out
    assert '"stale_holder"' in out or "stale_holder:" in out, out
    assert "pid: %d" % first.pid in out or '"pid": %d' % first.pid in out, out
    assert json.loads(lock_file.read_text())["pid"] == third.pid


# -- 12. the .env rewrite killed midway --------------------------------------------------------------------------------

MODULE_RUNNER = r"""
import sys
sys.path.insert(0, %(library)r)
import ansible.module_utils
ansible.module_utils.__path__.append(%(module_utils)r)
import runpy
runpy.run_path(%(module)r, run_name="__main__")
"""


def env_file_process(args_path, output=subprocess.DEVNULL):
    code = MODULE_RUNNER % {"library": os.path.join(ROOT, "library"), "module_utils": os.path.join(ROOT, "module_utils"),
                            "module": os.path.join(ROOT, "library", "env_file.py")}
    return subprocess.Popen([sys.executable, "-c", code, str(args_path)], stdout=output, stderr=output)


def staged(directory):
    return any(n.startswith("..env.tmp-") for n in os.listdir(directory))


def test_the_env_rewrite_killed_at_any_moment_leaves_the_old_file_or_the_new_one_never_a_mix(tmp_path):
    app = tmp_path / "app"
    app.mkdir()
    env = app / ".env"
    # Big enough (2 MiB) that the write and its fsync take a while: the kills land in the middle of it.
    old = "# production\nUSE_LEGACY_SUPABASE=false\nUSE_DATABASE_AUTH_STATE=true\nPOSTGRES_PASSWORD=old-pw\nPAD=%s\n" % ("o" * (2 << 20))
    env.write_text(old)
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": {"path": str(env), "values": {
        "USE_DATABASE_AUTH_STATE": "false", "PAD": "n" * (2 << 20)}}}))
    new = old.replace("USE_DATABASE_AUTH_STATE=true", "USE_DATABASE_AUTH_STATE=false").replace("o" * (2 << 20), "n" * (2 << 20))
    rng = random.Random(8)
    mid_write = 0
    for attempt in range(10):
        process = env_file_process(args)
        if attempt % 2 == 0:
            # Killed as soon as the new content is being written beside the file (polled without pause: it is short).
            deadline = time.monotonic() + 60
            while not staged(app) and process.poll() is None and time.monotonic() < deadline:
                pass
        else:
            time.sleep(rng.uniform(0, 0.6))
        if process.poll() is None:
            process.kill()
            mid_write += staged(app)
        process.wait()
        content = env.read_text()
        assert content in (old, new), "attempt %d left a mix" % attempt
        if content == new:
            env.write_text(old)
        for name in os.listdir(app):
            if name != ".env":
                os.unlink(app / name)  # a SIGKILL leaves its staged file; not what this test is about
    assert mid_write >= 4, "the kills must land during the write (%d did)" % mid_write
    process = env_file_process(args, output=subprocess.PIPE)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    result = json.loads(out)
    assert result["changed"] and env.read_text() == new and "old-pw" not in out.decode()
