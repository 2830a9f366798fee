"""The single-run lock: one live holder, and no stale lock after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import baileys_dr_lock
from module_harness import run_module


def lock_args(tmp_path, **extra):
    return dict(name="failover-app1", lock_dir=str(tmp_path), operation="failover", **extra)


def write_holder(tmp_path, pid):
    _, ticks, _ = baileys_dr_lock.process_info(pid)
    holder = {"pid": pid, "start_ticks": ticks, "boot_id": baileys_dr_lock.boot_id(), "user": "ops",
              "playbook": "failover.yml", "operation": "failover", "since": "2026-11-28T03:00:00Z"}
    (tmp_path / "failover-app1.lock").write_text(json.dumps(holder))


def test_first_run_takes_the_lock_and_the_same_run_keeps_it(tmp_path):
    ok, first = run_module(baileys_dr_lock, lock_args(tmp_path))
    assert ok and first["changed"]
    assert oct((tmp_path / "failover-app1.lock").stat().st_mode & 0o777) == "0o600"
    ok, again = run_module(baileys_dr_lock, lock_args(tmp_path))
    assert ok and not again["changed"]


def test_second_run_fails_at_once_naming_the_live_holder(tmp_path):
    holder = subprocess.Popen(["sleep", "60"])
    try:
        write_holder(tmp_path, holder.pid)
        ok, result = run_module(baileys_dr_lock, lock_args(tmp_path))
        assert not ok
        assert "pid %d" % holder.pid in result["msg"] and "failover.yml" in result["msg"] and "ops" in result["msg"]
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_killed_run_is_taken_over(tmp_path):
    holder = subprocess.Popen(["sleep", "60"])
    write_holder(tmp_path, holder.pid)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    ok, result = run_module(baileys_dr_lock, lock_args(tmp_path))
    assert ok and result["changed"]
    assert result["stale_holder"]["pid"] == holder.pid


def test_check_mode_never_writes_the_lock(tmp_path):
    ok, result = run_module(baileys_dr_lock, lock_args(tmp_path), check_mode=True)
    assert ok and result["changed"]
    assert not (tmp_path / "failover-app1.lock").exists()


def test_release_removes_only_our_lock(tmp_path):
    run_module(baileys_dr_lock, lock_args(tmp_path))
    ok, result = run_module(baileys_dr_lock, lock_args(tmp_path, state="released"))
    assert ok and result["changed"]
    assert not (tmp_path / "failover-app1.lock").exists()
    holder = subprocess.Popen(["sleep", "60"])
    try:
        write_holder(tmp_path, holder.pid)
        ok, result = run_module(baileys_dr_lock, lock_args(tmp_path, state="released"))
        assert not ok and (tmp_path / "failover-app1.lock").exists()
    finally:
        holder.kill()
        holder.wait()


def test_hostile_lock_names_are_refused(tmp_path):
    ok, result = run_module(baileys_dr_lock, dict(lock_args(tmp_path), name="../../etc/passwd"))
    assert not ok and "invalid lock name" in result["msg"]
