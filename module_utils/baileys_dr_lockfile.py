# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Leases of the baileys-dr operations, kept on the application host (the module baileys_lock and its action plugin).

One lease file per operation and host (``<lock_dir>/<name>.lease``, JSON) records the holder run: its run id, the
control node, the pid of the outermost ansible-playbook (or ansible-runner) process there, the operation, when it
started and when the lease expires. One baileys-dr operation runs on a host at a time: a live lease of another run
refuses every other operation (failover, failback, rehearsal, snapshot, cleanup all exclude each other); the steps of
one run (a rehearsal's failover, a cleanup's standby refresh) share it.

A lease is live until it expires (the host's own clock judges it, so the control node's clock does not matter), and
is renewed by every later call of the same run. Where the host can see the holder's process (the control node is the
host itself: same boot id and pid namespace) a lease whose process is gone is stale at once, as the control-node lock
was; from another machine (a throwaway AWX job container, another operator's laptop) only the expiry can tell. A stale
lease is taken over and named in a warning.

Check-and-take is serialised by an flock on ``<lock_dir>/.guard``; the lease itself is written to a temporary file
created with O_EXCL (mkstemp), fsynced, renamed over the lease and the directory fsynced. Files are opened without following
symlinks, and a lock directory writable by group or others is refused.

The action plugin computes the holder on the control node (holder_identity) and passes it to the module, which runs
on the application host (Lease).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import getpass
import hashlib
import json
import os
import re
import socket
import stat
import time

from ansible.module_utils.baileys_dr_fs import fsync_dir, write_file_atomic

NAME_RE = re.compile(r"\A[A-Za-z0-9._-]{1,100}\Z")
RUNNERS = ("ansible-playbook", "ansible-runner", "ansible-navigator")
SUFFIX = ".lease"
GUARD = ".guard"
# Seconds between two looks at a held lease while waiting for it.
POLL = 0.5

# The options of the module and of its action plugin (DOCUMENTATION in library/baileys_lock.py).
ARGUMENT_SPEC = dict(
    name=dict(type="str", required=True),
    state=dict(type="str", default="acquired", choices=["acquired", "renewed", "released"]),
    lock_dir=dict(type="path", default="/var/lib/baileys-dr/locks"),
    operation=dict(type="str", default=""),
    ttl=dict(type="int", default=1800),
    wait=dict(type="int", default=0),
    force=dict(type="bool", default=False),
    holder=dict(type="dict"),
)


class LockError(Exception):
    def __init__(self, msg, **fields):
        super().__init__(msg)
        self.fields = fields


def _read(path):
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def boot_id():
    return _read("/proc/sys/kernel/random/boot_id").decode().strip()


def pid_namespace():
    """The pid namespace of this process ('pid:[4026531836]'): pids mean the same only within one."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def process_info(pid):
    """(parent pid, start ticks, argv) of a live process, or None."""
    stat_line = _read("/proc/%d/stat" % pid).decode("utf-8", "replace")
    if not stat_line:
        return None
    # The command name is in parentheses and may itself contain spaces or parentheses.
    fields = stat_line[stat_line.rindex(")") + 2:].split()
    argv = [a.decode("utf-8", "replace") for a in _read("/proc/%d/cmdline" % pid).split(b"\0") if a]
    return int(fields[1]), int(fields[19]), argv


def find_holder_process(start_pid, fallback_pid):
    """pid, start ticks and playbook of the outermost ansible-playbook/runner at or above start_pid; without one
    (an ad-hoc run), fallback_pid with the playbook None."""
    pid = start_pid
    found = None
    playbook = None
    while pid > 1:
        info = process_info(pid)
        if info is None:
            break
        parent, ticks, argv = info
        if any(os.path.basename(a).startswith(RUNNERS) for a in argv[:3]):
            # The playbook from the ansible-playbook process (ansible-runner above it names none).
            playbooks = [os.path.basename(a) for a in argv if a.endswith((".yml", ".yaml"))]
            playbook = playbook or (playbooks[0] if playbooks else None)
            found = (pid, ticks, playbook or " ".join(os.path.basename(a) for a in argv[:3]))
        pid = parent
    if found is None:
        info = process_info(fallback_pid)
        found = (fallback_pid, info[1] if info else 0, None)
    return found


def _now_iso(ts):
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def holder_identity(start_pid, fallback_pid, environ=None, fallback_lives=False):
    """Who runs this: the outermost ansible-playbook process above start_pid on this machine (else fallback_pid, which
    lives as long as the run only when fallback_lives: the ad-hoc ansible process above an action plugin). The run id
    is the same for every task and host of one run, and differs between runs (it hashes the process's pid, start time,
    boot id and pid namespace)."""
    environ = os.environ if environ is None else environ
    pid, ticks, playbook = find_holder_process(start_pid, fallback_pid)
    boot, pidns = boot_id(), pid_namespace()
    run_id = hashlib.sha256(("%s|%s|%d|%d" % (boot, pidns, pid, ticks)).encode()).hexdigest()[:16]
    holder = {"run_id": run_id, "control_node": socket.gethostname(), "pid": pid, "start_ticks": ticks,
              "boot_id": boot, "pidns": pidns, "user": getpass.getuser(), "playbook": playbook or "ad-hoc",
              "job_id": str(environ.get("JOB_ID") or environ.get("AWX_JOB_ID") or "")}
    if playbook is None and not fallback_lives:
        # No ansible process above the caller (a module run by hand): nothing lives as long as the run, only the
        # expiry ends the lease.
        holder["pid"] = 0
    return holder


def ensure_state_dir(path, mode=0o755):
    """Create a state directory on the application host (leases, notification cooldowns). Made by root under a parent
    another user owns, it is given to that user, so runs that become root and runs as the application user share it.
    A directory that is a symlink, or that group or others could write, is refused (LockError)."""
    if not os.path.lexists(path):
        parent = os.path.dirname(path)
        os.makedirs(parent, mode=0o755, exist_ok=True)
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            pass
        else:
            owner = os.stat(parent).st_uid
            if os.geteuid() == 0 and owner != 0:
                os.chown(path, owner, -1)
    check_state_dir(path)


def check_state_dir(path, subject=None):
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise LockError("state directory %s is not a directory (a symlink or a file): refusing it" % path,
                        path=subject or path)
    if st.st_mode & 0o022:
        raise LockError("state directory %s is writable by group or others (mode %o): anyone could forge or remove "
                        "a file there; chmod go-w it" % (path, st.st_mode & 0o777), path=subject or path)


def describe(lease):
    """One line naming a lease's holder, for whoever finds it taken."""
    job = " (AWX job %s)" % lease["job_id"] if lease.get("job_id") else ""
    return ("run %s%s: %s by %s from control node %s pid %s, since %s, lease expires %s"
            % (lease.get("run_id", "?"), job, lease.get("playbook", "?"), lease.get("user", "?"),
               lease.get("control_node", "?"), lease.get("pid", "?"), lease.get("started", "?"), lease.get("expires", "?")))


class Lease:
    """The lease `name` in lock_dir for the run `holder`; run(state) takes, renews or releases it (LockError when a
    live lease of another run stands in the way, or the directory or a lease file cannot be trusted)."""

    def __init__(self, name, lock_dir, holder, operation="", ttl=1800, wait=0, force=False, check_mode=False,
                 clock=time.time, sleep=time.sleep):
        if not NAME_RE.match(name or ""):
            raise LockError("invalid lock name %r: use letters, digits, '.', '_' and '-'" % name)
        if ttl < 1:
            raise LockError("ttl must be at least 1 second, got %d" % ttl)
        if wait < 0:
            raise LockError("wait must be zero or positive, got %d" % wait)
        if not holder or not holder.get("run_id"):
            raise LockError("holder must name the run (run_id)")
        self.name = name
        self.dir = os.path.abspath(os.path.expanduser(lock_dir))
        self.path = os.path.join(self.dir, name + SUFFIX)
        self.holder = dict(holder)
        self.operation = operation or name
        self.ttl = ttl
        self.wait = wait
        self.force = force
        self.check_mode = check_mode
        self.clock = clock
        self.sleep = sleep
        self.local = (boot_id(), pid_namespace())
        self.warnings = []

    # -- the directory -------------------------------------------------------------------------------------------

    def _ensure_dir(self):
        ensure_state_dir(self.dir)
        self._check_dir()

    def _check_dir(self):
        check_state_dir(self.dir, self.path)

    def _guard(self):
        fd = os.open(os.path.join(self.dir, GUARD), os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    # -- lease files ---------------------------------------------------------------------------------------------

    def _load(self, path):
        """The lease at path, None when there is none; LockError naming a file no run could have written."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise LockError("lease file %s is a symlink: refusing it; remove it if no baileys-dr operation runs "
                                "on this host" % path, path=path)
            raise LockError("cannot read lease file %s as %s: %s" % (path, getpass.getuser(), exc.strerror), path=path)
        with os.fdopen(fd, "rb") as fh:
            raw = fh.read(65536)
        try:
            lease = json.loads(raw.decode("utf-8"))
            if not isinstance(lease, dict) or not lease.get("run_id") or not isinstance(lease.get("expires_ts"), (int, float)):
                raise ValueError("no run_id or expires_ts")
        except ValueError as exc:
            raise LockError("lease file %s is corrupt (%s): the holder cannot be told; remove it by hand once no "
                            "baileys-dr operation runs on this host" % (path, exc), path=path)
        return lease

    def _scan(self):
        """Every lease in the directory: {path: lease}."""
        leases = {}
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return leases
        for entry in sorted(names):
            if entry.endswith(SUFFIX) and not entry.startswith("."):
                path = os.path.join(self.dir, entry)
                lease = self._load(path)
                if lease is not None:
                    leases[path] = lease
        return leases

    def _write(self, path, lease):
        # mkstemp's O_EXCL temporary file, fsynced, renamed over the lease; the directory fsynced.
        write_file_atomic(path, json.dumps(lease, sort_keys=True).encode(), mode=0o644)

    def _unlink(self, path):
        os.unlink(path)
        fsync_dir(self.dir)

    # -- liveness ------------------------------------------------------------------------------------------------

    def _mine(self, lease):
        return lease.get("run_id") == self.holder["run_id"]

    def stale_reason(self, lease, now):
        """Why a lease no longer holds (expired, or its process gone where this host can see it), else None."""
        if lease["expires_ts"] <= now:
            return "expired at %s" % lease.get("expires", _now_iso(lease["expires_ts"]))
        if (lease.get("boot_id"), lease.get("pidns")) == self.local and self.local[0] and int(lease.get("pid") or 0) > 0:
            info = process_info(int(lease["pid"]))
            if info is None or info[1] != lease.get("start_ticks"):
                return "its process %s on this machine is gone" % lease["pid"]
        return None

    def _record(self, now, previous=None):
        lease = dict(self.holder)
        lease.update(name=self.name, operation=self.operation, ttl=self.ttl, renewed_ts=now, expires_ts=now + self.ttl,
                     expires=_now_iso(now + self.ttl), renewed=_now_iso(now))
        lease["started_ts"] = previous["started_ts"] if previous and "started_ts" in previous else now
        lease["started"] = _now_iso(lease["started_ts"])
        return lease

    # -- the operations ------------------------------------------------------------------------------------------

    def run(self, state):
        if state == "acquired":
            return self._acquire()
        if state == "renewed":
            return self._locked(self._renew)
        return self._locked(self._release)

    def _locked(self, step):
        if self.check_mode:
            return step()
        if not os.path.lexists(self.dir):
            return step()
        self._check_dir()
        fd = self._guard()
        try:
            return step()
        finally:
            os.close(fd)

    def _acquire(self):
        started = self.clock()
        try:
            if not self.check_mode:
                self._ensure_dir()
        except OSError as exc:
            raise LockError("cannot create lock directory %s as %s: %s" % (self.dir, getpass.getuser(), exc.strerror),
                            path=self.path)
        while True:
            try:
                result = self._locked(self._try_acquire)
            except OSError as exc:
                raise LockError("cannot take lease %s as %s: %s" % (self.path, getpass.getuser(), exc.strerror),
                                path=self.path)
            blocker = result.pop("blocker", None)
            if blocker is None:
                result["waited"] = round(self.clock() - started, 3)
                return result
            path, lease = blocker
            waited = self.clock() - started
            if waited >= self.wait:
                raise LockError(
                    "%s on this host refused: %s holds the lease %s (%s); %s"
                    % (self.operation, lease.get("operation", "an operation"), path, describe(lease),
                       "waited %d s; " % self.wait if self.wait else "")
                    + "if that run is gone, remove that file on this host (docs/runbook.md, \"A stale lease\")",
                    holder=lease, path=path, waited=round(waited, 3))
            self.sleep(min(POLL, max(0.0, self.wait - waited)))

    def _try_acquire(self):
        now = self.clock()
        leases = self._scan()
        others = [(p, lease) for p, lease in leases.items() if not self._mine(lease)]
        stale = []
        for path, lease in others:
            reason = self.stale_reason(lease, now)
            if reason is None and not self.force:
                return dict(blocker=(path, lease))
            stale.append((path, lease, reason or "forced"))
        result = dict(changed=False, path=self.path, stale_holders=[])
        for path, lease, reason in stale:
            self.warnings.append("took over the stale %s lease %s (%s) of %s"
                                 % (lease.get("operation", "?"), path, reason, describe(lease)))
            result["stale_holders"].append(dict(lease, path=path, reason=reason))
            if not self.check_mode and path != self.path:
                self._unlink(path)
        if result["stale_holders"]:
            result["changed"] = True
            # The lease this name had before (the one the roles read back as the stale holder).
            named = [s for s in result["stale_holders"] if s["path"] == self.path]
            result["stale_holder"] = named[0] if named else result["stale_holders"][0]
        mine = leases.get(self.path)
        if mine is None or not self._mine(mine):
            result["changed"] = True
        record = self._record(now, mine if mine is not None and self._mine(mine) else None)
        # Every lease of this run is renewed by each of its later steps.
        renewed = self._renew_mine(leases, now)
        if not self.check_mode:
            self._write(self.path, record)
        result.update(holder=record, renewed=renewed)
        return result

    def _renew_mine(self, leases, now):
        renewed = []
        for path, lease in leases.items():
            if self._mine(lease) and path != self.path:
                lease = dict(lease, renewed_ts=now, expires_ts=now + self.ttl, expires=_now_iso(now + self.ttl),
                             renewed=_now_iso(now))
                if not self.check_mode:
                    self._write(path, lease)
                renewed.append(path)
        return renewed

    def _renew(self):
        now = self.clock()
        leases = self._scan()
        mine = leases.get(self.path)
        if mine is None or not self._mine(mine):
            raise LockError(
                "this run (%s) no longer holds the lease %s: %s; stopping before a step another run may be doing"
                % (self.holder["run_id"], self.path,
                   "it is gone (removed by hand, or released)" if mine is None else "it was taken over by " + describe(mine)),
                holder=mine or {}, path=self.path)
        record = self._record(now, mine)
        renewed = self._renew_mine(leases, now)
        if not self.check_mode:
            self._write(self.path, record)
        return dict(changed=False, path=self.path, holder=record, renewed=renewed)

    def _release(self):
        current = self._load(self.path)
        result = dict(changed=False, path=self.path, holder=current or {})
        if current is None:
            return result
        if not self._mine(current):
            # Another run's (the one that refused this run, or took over this run's expired lease): left alone.
            return result
        result["changed"] = True
        if not self.check_mode:
            self._unlink(self.path)
        return result


# The lease option of another module (baileys_failover_arming takes the failover's lease in its own run: one module run
# less before the switch). The same keys as baileys_lock's options.
LEASE_OPTION = dict(type="dict", options=dict(
    name=dict(type="str", required=True),
    lock_dir=dict(type="path", default="/var/lib/baileys-dr/locks"),
    operation=dict(type="str", default=""),
    ttl=dict(type="int", default=1800),
    wait=dict(type="int", default=0),
    holder=dict(type="dict", required=True),
))


def take_lease(module, spec):
    """Take the lease spec (LEASE_OPTION) for module, or fail it naming the holder; the result of the take."""
    try:
        lease = Lease(spec["name"], spec["lock_dir"], spec["holder"], operation=spec["operation"], ttl=spec["ttl"],
                      wait=spec["wait"], check_mode=module.check_mode)
        result = lease.run("acquired")
    except LockError as exc:
        module.fail_json(msg=str(exc), lease=exc.fields)
    for warning in lease.warnings:
        module.warn(warning)
    return result
