"""Leases on the application host: one operation per host, whatever control node runs it; a killed run's lease ends."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import tempfile

import pytest

import baileys_lock
from ansible.module_utils.baileys_dr_lockfile import Lease, LockError, boot_id, holder_identity, pid_namespace, process_info
from module_harness import run_module


def remote_holder(run_id, **extra):
    """A run on another control node (an AWX job container): the host cannot see its process."""
    holder = {"run_id": run_id, "control_node": "awx-job-%s" % run_id, "pid": 4242, "start_ticks": 1,
              "boot_id": "another-machine", "pidns": "pid:[1]", "user": "awx", "playbook": "failover.yml", "job_id": "42"}
    holder.update(extra)
    return holder


class Clock:
    def __init__(self, now=1_800_000_000.0):
        self.now = now

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def lease(tmp_path, run_id, name="failover-app1", operation="failover", clock=None, **kwargs):
    clock = clock or Clock()
    holder = kwargs.pop("holder", None) or remote_holder(run_id)
    return Lease(name, str(tmp_path / "locks"), holder, operation=operation, clock=clock, sleep=clock.sleep, **kwargs)


def read(tmp_path, name="failover-app1"):
    return json.loads((tmp_path / "locks" / (name + ".lease")).read_text())


def test_a_lease_records_its_run_and_expires_ttl_seconds_later(tmp_path):
    clock = Clock()
    result = lease(tmp_path, "run-a", clock=clock, ttl=600).run("acquired")
    assert result["changed"] and not result["stale_holders"]
    record = read(tmp_path)
    assert record["run_id"] == "run-a" and record["control_node"] == "awx-job-run-a" and record["pid"] == 4242
    assert record["operation"] == "failover" and record["job_id"] == "42"
    assert record["started_ts"] == clock.now and record["expires_ts"] == clock.now + 600
    assert oct((tmp_path / "locks").stat().st_mode & 0o777) == "0o755"


def test_later_steps_of_the_run_renew_every_lease_it_holds(tmp_path):
    clock = Clock()
    lease(tmp_path, "run-a", name="rehearsal-app1", operation="rehearsal", clock=clock, ttl=600).run("acquired")
    started = clock.now
    clock.now += 500
    # The rehearsal's failover phase: same run, another operation; it renews the rehearsal lease too.
    taken = lease(tmp_path, "run-a", clock=clock, ttl=600).run("acquired")
    assert taken["changed"] and taken["renewed"] == [str(tmp_path / "locks" / "rehearsal-app1.lease")]
    assert read(tmp_path, "rehearsal-app1")["expires_ts"] == clock.now + 600
    clock.now += 500
    renewed = lease(tmp_path, "run-a", clock=clock, ttl=600).run("renewed")
    assert not renewed["changed"]
    assert read(tmp_path)["expires_ts"] == clock.now + 600 and read(tmp_path)["started_ts"] == started + 500


def test_a_live_lease_of_another_run_refuses_in_one_line_naming_its_holder(tmp_path):
    clock = Clock()
    lease(tmp_path, "run-a", clock=clock).run("acquired")
    with pytest.raises(LockError) as refused:
        lease(tmp_path, "run-b", clock=clock).run("acquired")
    msg = str(refused.value)
    assert "\n" not in msg
    assert msg.startswith("failover on this host refused: failover holds the lease %s" % (tmp_path / "locks" / "failover-app1.lease"))
    for part in ("run run-a", "AWX job 42", "failover.yml", "control node awx-job-run-a", "pid 4242", "lease expires"):
        assert part in msg, part
    assert read(tmp_path)["run_id"] == "run-a"


def test_failover_and_failback_exclude_snapshot_and_cleanup_and_the_reverse(tmp_path):
    clock = Clock()
    lease(tmp_path, "run-a", name="snapshot-app1", operation="snapshot", clock=clock).run("acquired")
    for name, operation in (("failover-app1", "failover"), ("failback-app1", "failback"), ("cleanup-app1", "cleanup")):
        with pytest.raises(LockError, match="%s on this host refused: snapshot holds" % operation):
            lease(tmp_path, "run-b", name=name, operation=operation, clock=clock).run("acquired")
    lease(tmp_path, "run-a", name="snapshot-app1", clock=clock).run("released")
    lease(tmp_path, "run-b", name="failback-app1", operation="failback", clock=clock).run("acquired")
    for name, operation in (("snapshot-app1", "snapshot"), ("cleanup-app1", "cleanup"), ("failover-app1", "failover")):
        with pytest.raises(LockError, match="%s on this host refused: failback holds" % operation):
            lease(tmp_path, "run-c", name=name, operation=operation, clock=clock).run("acquired")


def test_the_taker_waits_up_to_wait_seconds_for_the_holder_to_go(tmp_path):
    clock = Clock()
    lease(tmp_path, "run-a", clock=clock).run("acquired")
    with pytest.raises(LockError, match="waited 5 s") as refused:
        lease(tmp_path, "run-b", clock=clock, wait=5).run("acquired")
    assert 5 <= refused.value.fields["waited"] < 6

    released = []

    def sleep(seconds):
        clock.now += seconds
        if clock.now >= 1_800_000_000.0 + 8 and not released:
            released.append(lease(tmp_path, "run-a", clock=clock).run("released"))

    waiter = Lease("failover-app1", str(tmp_path / "locks"), remote_holder("run-b"), operation="failover", wait=30,
                   clock=clock, sleep=sleep)
    taken = waiter.run("acquired")
    assert taken["changed"] and released and 2 < taken["waited"] < 30
    assert read(tmp_path)["run_id"] == "run-b"


def test_an_expired_lease_is_taken_over_with_a_warning_naming_the_old_holder(tmp_path):
    clock = Clock()
    lease(tmp_path, "run-a", clock=clock, ttl=60).run("acquired")
    clock.now += 61
    taker = lease(tmp_path, "run-b", clock=clock)
    result = taker.run("acquired")
    assert result["changed"] and result["stale_holder"]["run_id"] == "run-a"
    assert "expired at" in result["stale_holder"]["reason"]
    (warning,) = taker.warnings
    assert "took over the stale failover lease" in warning and "run run-a" in warning and "awx-job-run-a" in warning
    assert read(tmp_path)["run_id"] == "run-b"


def test_the_lease_of_a_killed_process_on_this_machine_is_stale_at_once(tmp_path):
    process = subprocess.Popen(["sleep", "60"])
    _, ticks, _ = process_info(process.pid)
    here = dict(boot_id=boot_id(), pidns=pid_namespace(), pid=process.pid, start_ticks=ticks)
    lease(tmp_path, "run-a", holder=remote_holder("run-a", **here)).run("acquired")
    try:
        with pytest.raises(LockError, match="run run-a"):
            lease(tmp_path, "run-b").run("acquired")
    finally:
        process.kill()
        process.wait()
    result = lease(tmp_path, "run-b").run("acquired")
    assert "process %d on this machine is gone" % process.pid in result["stale_holder"]["reason"]


def test_a_run_whose_lease_was_taken_over_stops_at_its_next_renewal(tmp_path):
    clock = Clock()
    lease(tmp_path, "run-a", clock=clock, ttl=60).run("acquired")
    clock.now += 61
    lease(tmp_path, "run-b", clock=clock).run("acquired")
    with pytest.raises(LockError, match="this run \\(run-a\\) no longer holds the lease .* taken over by run run-b"):
        lease(tmp_path, "run-a", clock=clock).run("renewed")
    # Its release leaves the new holder's lease alone.
    result = lease(tmp_path, "run-a", clock=clock).run("released")
    assert not result["changed"] and read(tmp_path)["run_id"] == "run-b"


def test_release_removes_only_this_runs_lease(tmp_path):
    lease(tmp_path, "run-a").run("acquired")
    assert lease(tmp_path, "run-a").run("released")["changed"]
    assert not (tmp_path / "locks" / "failover-app1.lease").exists()
    assert not lease(tmp_path, "run-a").run("released")["changed"]


def test_a_corrupt_lease_file_is_named_in_the_error(tmp_path):
    (tmp_path / "locks").mkdir(mode=0o755)
    (tmp_path / "locks" / "snapshot-app1.lease").write_text("{not json")
    with pytest.raises(LockError) as refused:
        lease(tmp_path, "run-a").run("acquired")
    assert "lease file %s is corrupt" % (tmp_path / "locks" / "snapshot-app1.lease") in str(refused.value)
    assert not (tmp_path / "locks" / "failover-app1.lease").exists()


def test_hostile_names_symlinks_and_open_directories_are_refused(tmp_path):
    with pytest.raises(LockError, match="invalid lock name"):
        lease(tmp_path, "run-a", name="../../etc/passwd")
    (tmp_path / "locks").mkdir(mode=0o755)
    target = tmp_path / "elsewhere"
    target.write_text("")
    (tmp_path / "locks" / "failover-app1.lease").symlink_to(target)
    with pytest.raises(LockError, match="is a symlink"):
        lease(tmp_path, "run-a").run("acquired")
    assert target.read_text() == ""
    (tmp_path / "locks" / "failover-app1.lease").unlink()
    os.chmod(tmp_path / "locks", 0o777)
    with pytest.raises(LockError, match="writable by group or others"):
        lease(tmp_path, "run-a").run("acquired")
    os.chmod(tmp_path / "locks", 0o755)
    (tmp_path / "other").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path / "other")
    with pytest.raises(LockError, match="not a directory"):
        Lease("failover-app1", str(tmp_path / "linked"), remote_holder("run-a")).run("acquired")


def test_check_mode_reads_and_refuses_but_never_writes(tmp_path):
    assert lease(tmp_path, "run-a", check_mode=True).run("acquired")["changed"]
    assert not (tmp_path / "locks").exists()
    lease(tmp_path, "run-a").run("acquired")
    with pytest.raises(LockError, match="run run-a"):
        lease(tmp_path, "run-b", check_mode=True).run("acquired")
    before = (tmp_path / "locks" / "failover-app1.lease").read_bytes()
    assert lease(tmp_path, "run-a", check_mode=True).run("released")["changed"]
    assert (tmp_path / "locks" / "failover-app1.lease").read_bytes() == before


def _take(args):
    lock_dir, run_id, start, results = args
    start.wait()
    try:
        Lease("failover-app1", lock_dir, remote_holder(run_id), operation="failover").run("acquired")
        results.put(run_id)
    except LockError:
        results.put(None)


def test_of_concurrent_takers_exactly_one_wins(tmp_path):
    context = multiprocessing.get_context("fork")
    start, results = context.Event(), context.Queue()
    takers = [context.Process(target=_take, args=((str(tmp_path / "locks"), "run-%d" % i, start, results),))
              for i in range(8)]
    for taker in takers:
        taker.start()
    start.set()
    outcomes = [results.get(timeout=30) for _ in takers]
    for taker in takers:
        taker.join(10)
    winners = [o for o in outcomes if o]
    assert len(winners) == 1, outcomes
    assert read(tmp_path)["run_id"] == winners[0]
    assert sorted(os.listdir(tmp_path / "locks")) == [".guard", "failover-app1.lease"]


def test_the_module_takes_and_releases_with_the_holder_of_the_action_plugin(tmp_path):
    holder = holder_identity(os.getpid(), os.getppid(), fallback_lives=True)
    args = dict(name="failover-app1", lock_dir=str(tmp_path / "locks"), operation="failover", holder=holder)
    ok, taken = run_module(baileys_lock, args)
    assert ok and taken["changed"] and taken["holder"]["run_id"] == holder["run_id"]
    ok, refused = run_module(baileys_lock, dict(args, holder=remote_holder("run-b")))
    assert not ok and "run %s" % holder["run_id"] in refused["msg"] and refused["path"].endswith("failover-app1.lease")
    ok, released = run_module(baileys_lock, dict(args, state="released"))
    assert ok and released["changed"]


def _take_as(args):
    uid, lock_dir, run_id, results = args
    os.setgid(uid)
    os.setuid(uid)
    try:
        Lease("snapshot-app1", lock_dir, remote_holder(run_id), operation="snapshot").run("acquired")
        results.put("taken")
    except LockError as exc:
        results.put(str(exc))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a run that becomes root, then one as the application user)")
def test_runs_that_become_root_and_runs_as_the_application_user_share_the_lease_directory(tmp_path):
    app_uid = 4321
    base = tempfile.mkdtemp(prefix="lease-users-")
    try:
        os.chmod(base, 0o755)
        state = os.path.join(base, "state")
        os.mkdir(state, 0o755)
        os.chown(state, app_uid, app_uid)
        lock_dir = os.path.join(state, "locks")
        root_run = Lease("failover-app1", lock_dir, remote_holder("run-root"), operation="failover")
        root_run.run("acquired")
        assert os.stat(lock_dir).st_uid == app_uid, "made by root under the user's directory, it is the user's"
        root_run.run("released")
        context = multiprocessing.get_context("fork")
        results = context.Queue()
        child = context.Process(target=_take_as, args=((app_uid, lock_dir, "run-app", results),))
        child.start()
        assert results.get(timeout=30) == "taken"
        child.join(10)
        with pytest.raises(LockError, match="snapshot holds the lease .*run run-app"):
            Lease("failover-app1", lock_dir, remote_holder("run-root-2"), operation="failover").run("acquired")
    finally:
        shutil.rmtree(base)
