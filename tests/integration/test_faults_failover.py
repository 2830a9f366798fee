"""Faults around a failover run (issue 8, points 5 and 12): two runs at once, the .env rewrite killed.

Real processes: ansible-playbook runs for the lease (the holder is the
ansible-playbook process, killed with SIGKILL), the baileys_env_file module run as a
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


# -- 5. two failover runs at once (issue 18: the lease on the application host) ------------------------------------


def role_task(path):
    """The failover role's own lock task in tasks/<path> (the shared role's lock entry point), as the role has it."""
    with open(os.path.join(ROOT, "roles", "baileys_failover", "tasks", path), encoding="utf-8") as fh:
        tasks = yaml.safe_load(fh)
    (task,) = [t for t in tasks if t.get("ansible.builtin.import_role", {}).get("tasks_from") == "lock"]
    return task


@pytest.fixture
def failover_like_playbook(tmp_path):
    """A play with the failover role's lease task, then a step that takes `hold` seconds (the export, the restart...),
    then the role's release task."""
    path = tmp_path / "failover.yml"
    play = [{"name": "Fail over (the lease and a long step)", "hosts": "localhost", "gather_facts": False,
             "tasks": [role_task("preflight.yml"),
                       {"name": "A long failover step", "ansible.builtin.command": "sleep {{ hold }}", "changed_when": False},
                       role_task("audit.yml")]}]
    path.write_text(yaml.safe_dump(play, sort_keys=False))
    return path


def playbook(path, lock_dir, hold, wait=0, **popen):
    """ansible-playbook on path; the holder is named on the control node by the action plugin the shared role ships,
    as the role runs it."""
    argv = [PLAYBOOK_BIN, "-i", "localhost,", "-c", "local", "-v", str(path),
            "-e", json.dumps({"baileys_dr_lock_dir": str(lock_dir), "baileys_dr_lock_ttl": 600, "baileys_dr_lock_wait": wait,
                              # The role's own lease task (with the arming record in use, the arming module takes it).
                              "baileys_failover_use_arming": False, "hold": hold, "ansible_python_interpreter": sys.executable})]
    env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"), ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0")
    env["ANSIBLE_ACTION_PLUGINS"] = os.path.join(ROOT, "roles", "baileys_dr", "action_plugins")
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def one_line(out):
    """ansible-playbook's output with its line wrapping undone (a message may be folded over lines)."""
    return " ".join(out.split())


def test_a_second_failover_fails_at_once_naming_the_holder_and_after_kill_9_a_new_run_proceeds(
        failover_like_playbook, tmp_path):
    lock_dir = tmp_path / "locks"
    lease_file = lock_dir / "failover-localhost.lease"
    first = playbook(failover_like_playbook, lock_dir, 300, start_new_session=True)
    try:
        wait_until(lambda: lease_file.exists() or first.poll() is not None, timeout=120, what="the first run to take the lease")
        assert first.poll() is None, first.stdout.read()
        holder = json.loads(lease_file.read_text())
        assert holder["pid"] == first.pid and holder["playbook"] == "failover.yml" and holder["operation"] == "failover"

        started = time.monotonic()
        second = playbook(failover_like_playbook, lock_dir, 0)
        out, _ = second.communicate(timeout=120)
        elapsed = time.monotonic() - started
        assert second.returncode != 0, out
        assert ("failover on this host refused: failover holds the lease %s (run %s: failover.yml"
                % (lease_file, holder["run_id"])) in one_line(out), out
        assert "pid %d" % first.pid in one_line(out), out
        assert "A long failover step" not in out, "the second run stops at the lease, before any step"
        assert elapsed < 60, "the second run waited %.0fs instead of failing at once" % elapsed
        assert first.poll() is None, "the first run goes on"
    finally:
        # kill -9 of the whole first run: ansible-playbook, its workers and the step; nothing gets to clean up.
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert json.loads(lease_file.read_text())["pid"] == first.pid, "the lease file of the killed run is still there"

    # The lease has not expired, but this host is the control node: it sees the holder's process is gone.
    third = playbook(failover_like_playbook, lock_dir, 0)
    out, _ = third.communicate(timeout=120)
    assert third.returncode == 0, out
    assert "took over the stale failover lease %s (its process %d on this machine is gone) of run %s" % (
        lease_file, first.pid, holder["run_id"]) in one_line(out), out
    assert not lease_file.exists(), "the third run released its lease at its end"


def test_a_second_run_told_to_wait_takes_the_lease_once_the_first_releases_it(failover_like_playbook, tmp_path):
    lock_dir = tmp_path / "locks"
    lease_file = lock_dir / "failover-localhost.lease"
    first = playbook(failover_like_playbook, lock_dir, 3)
    wait_until(lambda: lease_file.exists() or first.poll() is not None, timeout=120, what="the first run to take the lease")
    second = playbook(failover_like_playbook, lock_dir, 0, wait=120)
    out_first, _ = first.communicate(timeout=120)
    out, _ = second.communicate(timeout=120)
    assert first.returncode == 0, out_first
    assert second.returncode == 0, out
    assert "took over" not in out, "the first run released its lease; nothing was stale"
    waited = [float(line.split()[-1]) for line in out.splitlines() if line.strip().startswith("waited:")]
    assert waited and waited[0] > 0.5, out


def test_a_stale_lease_of_a_killed_run_elsewhere_is_taken_over_once_expired_and_refuses_until_then(
        failover_like_playbook, tmp_path):
    """A run from another control node (an AWX job container) killed: the host cannot see its process, the expiry
    ends its lease."""
    lock_dir = tmp_path / "locks"
    lock_dir.mkdir(mode=0o755)
    lease_file = lock_dir / "snapshot-localhost.lease"
    now = time.time()
    lease = {"run_id": "0123456789abcdef", "control_node": "automation-job-42-x7k2p", "pid": 17, "start_ticks": 5,
             "boot_id": "another-machine", "pidns": "pid:[4026531836]", "user": "runner", "playbook": "snapshot.yml",
             "job_id": "42", "operation": "snapshot", "name": "snapshot-localhost", "ttl": 1800,
             "started_ts": now - 60, "started": "2026-12-07T12:00:00Z", "renewed_ts": now - 60,
             "expires_ts": now + 1740, "expires": "2026-12-07T12:30:00Z"}
    lease_file.write_text(json.dumps(lease))
    refused = playbook(failover_like_playbook, lock_dir, 0)
    out, _ = refused.communicate(timeout=120)
    assert refused.returncode != 0, out
    assert ("failover on this host refused: snapshot holds the lease %s (run 0123456789abcdef (AWX job 42): snapshot.yml "
            "by runner from control node automation-job-42-x7k2p pid 17, since 2026-12-07T12:00:00Z, lease expires "
            "2026-12-07T12:30:00Z)" % lease_file) in one_line(out), out

    lease_file.write_text(json.dumps(dict(lease, expires_ts=now - 1, expires="2026-12-07T12:30:00Z")))
    taker = playbook(failover_like_playbook, lock_dir, 0)
    out, _ = taker.communicate(timeout=120)
    assert taker.returncode == 0, out
    assert ("[WARNING]: took over the stale snapshot lease %s (expired at 2026-12-07T12:30:00Z) of run 0123456789abcdef "
            "(AWX job 42)" % lease_file) in one_line(out), out
    assert not lease_file.exists()


@pytest.mark.parametrize("operation", ["snapshot", "cleanup"])
def test_a_snapshot_or_cleanup_that_fails_gives_its_lease_back(tmp_path, operation):
    """From another control node only the expiry would end a failed run's lease: the failover that follows a refresh
    failed on an unreachable database would be refused for half an hour. The playbook's own lease tasks, its role
    replaced by a failing step."""
    with open(os.path.join(ROOT, "playbooks", operation + ".yml"), encoding="utf-8") as fh:
        plays = yaml.safe_load(fh)
    (guarded,) = [t for t in plays[0]["tasks"] if "block" in t]
    guarded["block"] = [{"name": "The refresh fails", "ansible.builtin.fail": {"msg": "PostgreSQL does not answer"}}]
    plays[0]["hosts"] = "localhost"
    path = tmp_path / (operation + ".yml")
    path.write_text(yaml.safe_dump(plays, sort_keys=False))
    lock_dir = tmp_path / "locks"
    run = playbook(path, lock_dir, 0)
    out, _ = run.communicate(timeout=120)
    assert run.returncode != 0 and "PostgreSQL does not answer" in out, out
    assert "Lock: %s released" % operation in out, out
    assert (lock_dir / ".guard").exists(), "the lease was taken"
    assert not (lock_dir / ("%s-localhost.lease" % operation)).exists(), "the failed run gave its lease back"


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
                            "module": os.path.join(ROOT, "library", "baileys_env_file.py")}
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
    mid_write = attempt = 0
    # Ten attempts, more until four kills landed mid-write (a loaded machine makes some polls late); none leaves a mix.
    while (attempt < 10 or mid_write < 4) and attempt < 40:
        attempt += 1
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
