# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The single-run lock of the baileys-dr operations, shared by the module baileys_dr_lock and its action plugin.

The holder is the outermost ansible-playbook (or ansible-runner) process above the caller, identified by its pid,
its start time and the boot id: a lock whose holder is gone (killed, even with kill -9, or the machine rebooted) is
stale and is taken over. The module walks up from its parent, the action plugin (which runs inside the
ansible-playbook worker, with no module process) from itself: both find the same holder, so either can release
what the other took.
"""

from __future__ import annotations

import datetime
import fcntl
import getpass
import json
import os
import re

from ansible.module_utils.baileys_dr_fs import write_file_atomic

NAME_RE = re.compile(r"\A[A-Za-z0-9._-]{1,100}\Z")
RUNNERS = ("ansible-playbook", "ansible-runner", "ansible-navigator")

# The options of the module and of its action plugin (DOCUMENTATION in library/baileys_dr_lock.py).
ARGUMENT_SPEC = dict(
    name=dict(type="str", required=True),
    state=dict(type="str", default="acquired", choices=["acquired", "released"]),
    lock_dir=dict(type="path", default="~/.cache/baileys-dr/locks"),
    operation=dict(type="str", default=""),
    force=dict(type="bool", default=False),
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


def process_info(pid):
    """(parent pid, start ticks, argv) of a live process, or None."""
    stat = _read("/proc/%d/stat" % pid).decode("utf-8", "replace")
    if not stat:
        return None
    # The command name is in parentheses and may itself contain spaces or parentheses.
    fields = stat[stat.rindex(")") + 2:].split()
    argv = [a.decode("utf-8", "replace") for a in _read("/proc/%d/cmdline" % pid).split(b"\0") if a]
    return int(fields[1]), int(fields[19]), argv


def find_holder_process(start_pid, fallback_pid):
    """pid, start ticks and playbook of the outermost ansible-playbook/runner at or above start_pid; without one
    (an ad-hoc run), fallback_pid."""
    pid = start_pid
    found = None
    while pid > 1:
        info = process_info(pid)
        if info is None:
            break
        parent, ticks, argv = info
        if any(os.path.basename(a).startswith(RUNNERS) for a in argv[:3]):
            playbooks = [os.path.basename(a) for a in argv if a.endswith((".yml", ".yaml"))]
            found = (pid, ticks, playbooks[0] if playbooks else " ".join(argv[:3]))
        pid = parent
    if found is None:
        info = process_info(fallback_pid)
        found = (fallback_pid, info[1] if info else 0, "ad-hoc")
    return found


def holder_alive(holder):
    if holder.get("boot_id") != boot_id():
        return False
    info = process_info(int(holder.get("pid", 0)))
    return info is not None and info[1] == holder.get("start_ticks")


class Lock:
    """One named lock file; run() takes or releases it. LockError when a live run holds it."""

    def __init__(self, name, lock_dir, operation="", force=False, check_mode=False, start_pid=None, fallback_pid=None):
        if not NAME_RE.match(name):
            raise LockError("invalid lock name %r: use letters, digits, '.', '_' and '-'" % name)
        self.name = name
        self.operation = operation
        self.force = force
        self.check_mode = check_mode
        self.dir = os.path.expanduser(lock_dir)
        self.path = os.path.join(self.dir, name + ".lock")
        pid, ticks, playbook = find_holder_process(start_pid or os.getppid(), fallback_pid or os.getppid())
        self.me = {"pid": pid, "start_ticks": ticks, "boot_id": boot_id(), "user": getpass.getuser(),
                   "playbook": playbook, "operation": operation,
                   "since": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}

    def _current(self):
        raw = _read(self.path)
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return {"pid": 0, "unreadable": True}

    @staticmethod
    def _same(a, b):
        return bool(a) and all(a.get(k) == b.get(k) for k in ("pid", "start_ticks", "boot_id"))

    def run(self, state):
        if not self.check_mode:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
        guard = open(os.path.join(self.dir, ".guard"), "a") if not self.check_mode else None
        try:
            if guard:
                # Serialises check-and-take between two runs starting together.
                fcntl.flock(guard, fcntl.LOCK_EX)
            current = self._current()
            if state == "released":
                return self._release(current)
            return self._acquire(current)
        finally:
            if guard:
                guard.close()

    def _acquire(self, current):
        result = dict(changed=False, path=self.path, holder=self.me)
        if current and self._same(current, self.me):
            result["holder"] = current
            return result
        if current and holder_alive(current) and not self.force:
            raise LockError(
                "%s is already running: lock %s is held by pid %s (%s, %s) as %s since %s; "
                "wait for it, or pass force only if that run is gone"
                % (current.get("operation") or self.name, self.path, current.get("pid"),
                   current.get("playbook"), current.get("operation") or "operation unknown",
                   current.get("user"), current.get("since")),
                holder=current, path=self.path)
        if current:
            result["stale_holder"] = current
        result["changed"] = True
        if not self.check_mode:
            write_file_atomic(self.path, json.dumps(self.me).encode(), mode=0o600)
        return result

    def _release(self, current):
        result = dict(changed=False, path=self.path, holder=current or {})
        if current is None:
            return result
        if not self._same(current, self.me) and holder_alive(current) and not self.force:
            raise LockError("lock %s belongs to another live run (pid %s): not released" % (self.path, current.get("pid")),
                            holder=current, path=self.path)
        result["changed"] = True
        if not self.check_mode:
            os.unlink(self.path)
        return result
