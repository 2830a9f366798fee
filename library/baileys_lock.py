#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: baileys_lock
short_description: Lease on the application host that keeps baileys-dr operations from running at once
description:
  - Takes, renews or releases the lease of one DR operation (failover, failback, rehearsal, snapshot, cleanup) in
    O(lock_dir) on the application host, so that runs from any control node (two operators, two AWX job containers)
    see each other.
  - One operation runs on a host at a time. A live lease of another run refuses the operation at once (or after
    waiting up to O(wait) seconds), in one line naming the holder (run id, AWX job, playbook, user, control node, pid,
    since when, expiry). The steps of one run share its leases (a rehearsal's failover, a cleanup's standby refresh).
  - A lease records the holder run (its run id, control node, the pid of its C(ansible-playbook) process, user,
    playbook, AWX job id), the operation, its start and its expiry, O(ttl) seconds after its last renewal. Each later
    call of the same run renews every lease the run holds on the host.
  - A lease is stale once it has expired (by the host's clock), or at once when the host can see that the holder's
    process is gone (the control node is the host itself, same boot and pid namespace). A stale lease is taken over
    with a warning naming its holder.
  - The holder is computed on the control node by the action plugin of the same name and given in O(holder).
  - Called C(baileys_dr_lock) before 0.4.0; the old name still works, with a warning naming the new one, until 0.5.0.
version_added: "0.1.0"
author: baileys-dr contributors
options:
  name:
    description: Lease name, for example C(failover-app1). Letters, digits, C(.), C(_) and C(-).
    type: str
    required: true
  state:
    description:
      - C(acquired) takes the lease (or renews it when this run holds it); C(renewed) extends it and fails when this
        run no longer holds it; C(released) removes it when this run holds it and leaves any other run's lease alone.
    type: str
    choices: [acquired, renewed, released]
    default: acquired
  lock_dir:
    description: Directory of the lease files on the application host (created 0755; a directory writable by group or others is refused).
    type: path
    default: /var/lib/baileys-dr/locks
  operation:
    description: What the holder is doing, shown to whoever finds the lease taken.
    type: str
    default: ""
  ttl:
    description: Seconds a lease lives after its last renewal. Long enough for the longest step of the operation.
    type: int
    default: 1800
  wait:
    description: Seconds to wait for a live lease of another run to go before refusing (0 refuses at once).
    type: int
    default: 0
  force:
    description: Take the lease even from a live holder (only when you know that run is gone).
    type: bool
    default: false
  holder:
    description:
      - The run, as the action plugin computes it on the control node (run_id, control_node, pid, start_ticks,
        boot_id, pidns, user, playbook, job_id).
      - Without it (the module run on its own), the run is the C(ansible-playbook) process above the module on the
        host; over a remote connection, where there is none, the module fails.
    type: dict
attributes:
  check_mode:
    support: full
    details: In check mode the leases are read and a live holder refuses as usual; nothing is written.
  diff_mode:
    support: none
notes:
  - Check-and-take is serialised by an flock on C(.guard) in O(lock_dir); lease files are written to an O_EXCL
    temporary file, fsynced and renamed, and never opened through a symlink.
  - Made by root under a parent directory another user owns, O(lock_dir) is given to that user, so runs that become
    root and runs as the application user share it.
"""

EXAMPLES = r"""
- name: Take the failover lease
  baileys_lock:
    name: failover-{{ inventory_hostname }}
    operation: failover
    lock_dir: /var/lib/baileys-dr/locks
    ttl: 1800

- name: Renew it before a long step (and stop if another run took it over)
  baileys_lock:
    name: failover-{{ inventory_hostname }}
    state: renewed

- name: Release it
  baileys_lock:
    name: failover-{{ inventory_hostname }}
    state: released
"""

RETURN = r"""
holder:
  description: The lease after the call (this run's when it acquired or renewed; on release, the lease that was found).
  returned: always
  type: dict
  sample: {run_id: 3f2a9c0d1e4b5a69, control_node: awx-job-42, pid: 4242, user: awx, playbook: failover.yml, job_id: "42", operation: failover, started: "2026-11-28T18:00:00Z", expires: "2026-11-28T18:30:00Z"}
stale_holder:
  description: The stale lease taken over (this name's when there was one).
  returned: when a stale lease was taken over
  type: dict
stale_holders:
  description: Every stale lease taken over, with its path and why it was stale.
  returned: when state is acquired
  type: list
  elements: dict
renewed:
  description: Other leases of this run renewed by this call.
  returned: when state is acquired or renewed
  type: list
  elements: str
waited:
  description: Seconds spent waiting for a live holder to go.
  returned: when state is acquired
  type: float
path:
  description: Lease file.
  returned: always
  type: str
"""

import os

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.baileys_dr_lockfile import ARGUMENT_SPEC, Lease, LockError, holder_identity
from ansible.module_utils.baileys_dr_renames import warn_if_renamed


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    warn_if_renamed(module)
    params = module.params
    holder = params["holder"] or holder_identity(os.getppid(), os.getppid())
    if not holder.get("pid") and not params["holder"]:
        # Over a remote connection nothing above the module names the run: each task would be another run.
        module.fail_json(msg="baileys_lock cannot tell which run it serves: no holder was given and no ansible-playbook "
                             "process runs above the module on this host. Run it through its action plugin "
                             "(plugins/action/baileys_lock.py: ansible.cfg action_plugins, or a role's action_plugins)")
    try:
        lease = Lease(params["name"], params["lock_dir"], holder, operation=params["operation"], ttl=params["ttl"],
                      wait=params["wait"], force=params["force"], check_mode=module.check_mode)
        result = lease.run(params["state"])
    except LockError as exc:
        module.fail_json(msg=str(exc), **exc.fields)
    for warning in lease.warnings:
        module.warn(warning)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
