#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: baileys_dr_lock
short_description: Single-run lock for baileys-dr operations that a kill -9 cannot leave stale
description:
  - Takes or releases a named lock for one DR operation (failover, failback, snapshot, cleanup).
  - The holder is the C(ansible-playbook) (or C(ansible-runner)) process that runs the module, identified by
    its pid, its start time and the machine's boot id. A lock whose holder process no longer exists (killed,
    even with C(kill -9), or the machine rebooted) is stale and is taken over, and the result says so.
  - A live holder makes the module fail at once, naming the holder (pid, playbook, user, since when).
  - Run it on the control node (delegated to localhost); one control plane (a single control node, or AWX
    job templates without simultaneous runs) then serialises operations on an application host.
version_added: "0.1.0"
author: baileys-dr contributors
options:
  name:
    description: Lock name, for example C(failover-app1). Letters, digits, C(.), C(_) and C(-).
    type: str
    required: true
  state:
    description: C(acquired) takes the lock (or fails when a live run holds it); C(released) gives it back.
    type: str
    choices: [acquired, released]
    default: acquired
  lock_dir:
    description: Directory of the lock files (created 0700).
    type: path
    default: ~/.cache/baileys-dr/locks
  operation:
    description: What the holder is doing, shown to whoever finds the lock taken.
    type: str
    default: ""
  force:
    description: Take the lock even from a live holder (only when you know that run is gone).
    type: bool
    default: false
attributes:
  check_mode:
    support: full
    details: In check mode the lock is inspected, never written.
  diff_mode:
    support: none
notes:
  - The holder is found by walking up the module's parent processes to the outermost C(ansible-playbook)
    or C(ansible-runner) process; without one (an ad-hoc run) the module's parent process is the holder.
"""

EXAMPLES = r"""
- name: Take the failover lock
  baileys_dr_lock:
    name: failover-{{ inventory_hostname }}
    operation: failover
  delegate_to: localhost

- name: Release it
  baileys_dr_lock:
    name: failover-{{ inventory_hostname }}
    state: released
  delegate_to: localhost
"""

RETURN = r"""
holder:
  description: The holder recorded in the lock after the run (this run when it acquired).
  returned: always
  type: dict
  sample: {pid: 4242, start_ticks: 123456, boot_id: "...", user: root, playbook: failover.yml, since: "2026-11-28T18:00:00Z"}
stale_holder:
  description: The dead holder whose lock was taken over.
  returned: when a stale lock was broken
  type: dict
path:
  description: Lock file.
  returned: always
  type: str
"""

import datetime
import fcntl
import getpass
import json
import os
import re

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.baileys_dr_fs import write_file_atomic

_NAME_RE = re.compile(r"\A[A-Za-z0-9._-]{1,100}\Z")
_RUNNERS = ("ansible-playbook", "ansible-runner", "ansible-navigator")


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


def find_holder_process():
    """pid, start ticks and playbook of the outermost ansible-playbook/runner above us."""
    pid = os.getppid()
    found = None
    while pid > 1:
        info = process_info(pid)
        if info is None:
            break
        parent, ticks, argv = info
        if any(os.path.basename(a).startswith(_RUNNERS) for a in argv[:3]):
            playbooks = [os.path.basename(a) for a in argv if a.endswith((".yml", ".yaml"))]
            found = (pid, ticks, playbooks[0] if playbooks else " ".join(argv[:3]))
        pid = parent
    if found is None:
        pid = os.getppid()
        info = process_info(pid)
        found = (pid, info[1] if info else 0, "ad-hoc")
    return found


def holder_alive(holder):
    if holder.get("boot_id") != boot_id():
        return False
    info = process_info(int(holder.get("pid", 0)))
    return info is not None and info[1] == holder.get("start_ticks")


class Lock:
    def __init__(self, module):
        self.module = module
        self.params = module.params
        if not _NAME_RE.match(self.params["name"]):
            module.fail_json(msg="invalid lock name %r: use letters, digits, '.', '_' and '-'" % self.params["name"])
        self.dir = os.path.expanduser(self.params["lock_dir"])
        self.path = os.path.join(self.dir, self.params["name"] + ".lock")
        pid, ticks, playbook = find_holder_process()
        self.me = {"pid": pid, "start_ticks": ticks, "boot_id": boot_id(), "user": getpass.getuser(),
                   "playbook": playbook, "operation": self.params["operation"],
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

    def run(self):
        if not self.module.check_mode:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
        guard_path = os.path.join(self.dir, ".guard")
        guard = open(guard_path, "a") if not self.module.check_mode else None
        try:
            if guard:
                # Serialises check-and-take between two runs starting together.
                fcntl.flock(guard, fcntl.LOCK_EX)
            current = self._current()
            if self.params["state"] == "released":
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
        if current and holder_alive(current) and not self.params["force"]:
            self.module.fail_json(
                msg="%s is already running: lock %s is held by pid %s (%s, %s) as %s since %s; "
                    "wait for it, or pass force only if that run is gone"
                    % (current.get("operation") or self.params["name"], self.path, current.get("pid"),
                       current.get("playbook"), current.get("operation") or "operation unknown",
                       current.get("user"), current.get("since")),
                holder=current, path=self.path)
        if current:
            result["stale_holder"] = current
        result["changed"] = True
        if not self.module.check_mode:
            write_file_atomic(self.path, json.dumps(self.me).encode(), mode=0o600)
        return result

    def _release(self, current):
        result = dict(changed=False, path=self.path, holder=current or {})
        if current is None:
            return result
        if not self._same(current, self.me) and holder_alive(current) and not self.params["force"]:
            self.module.fail_json(msg="lock %s belongs to another live run (pid %s): not released" % (self.path, current.get("pid")),
                                  holder=current, path=self.path)
        result["changed"] = True
        if not self.module.check_mode:
            os.unlink(self.path)
        return result


def main():
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            state=dict(type="str", default="acquired", choices=["acquired", "released"]),
            lock_dir=dict(type="path", default="~/.cache/baileys-dr/locks"),
            operation=dict(type="str", default=""),
            force=dict(type="bool", default=False),
        ),
        supports_check_mode=True,
    )
    module.exit_json(**Lock(module).run())


if __name__ == "__main__":
    main()
