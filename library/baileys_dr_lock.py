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
  - An action plugin of the same name (plugins/action/baileys_dr_lock.py, also shipped in the action_plugins
    of the roles that take a lock) does the same work inside the controller, with no module process (about
    0.3 s less per call); it always works on the control node, which is where the roles delegate this module.
    Lock files taken by one are released by the other.
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

import os

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.baileys_dr_lockfile import (  # noqa: F401 (process_info, boot_id: used by the tests)
    ARGUMENT_SPEC,
    Lock,
    LockError,
    boot_id,
    find_holder_process,
    holder_alive,
    process_info,
)


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    params = module.params
    try:
        lock = Lock(params["name"], params["lock_dir"], operation=params["operation"], force=params["force"],
                    check_mode=module.check_mode, start_pid=os.getppid(), fallback_pid=os.getppid())
        result = lock.run(params["state"])
    except LockError as exc:
        module.fail_json(msg=str(exc), **exc.fields)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
