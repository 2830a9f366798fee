#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: baileys_notify_cooldown
short_description: Per-event cooldown of baileys-dr notifications, kept on disk
description:
  - Tells whether a notification event (for example operation, host and outcome) is due, and records that it was
    sent, so that the same event is not sent again within O(cooldown) seconds, across runs of any playbook.
  - One small JSON file per event in O(state_dir) (the event's sha256 names it, so a hostile event key never becomes a
    path); written atomically, 0600, in a directory that group and others cannot write (a symlink is refused).
  - Run it on the application host, whose state directory every control node shares (the roles keep it beside the
    leases of module baileys_lock); made by root under a directory the application user owns, it is given to that
    user.
  - O(state=recorded) also turns every entry of O(failures) into an Ansible warning, so that a notification that
    could not be sent is visible without failing the play.
version_added: "0.1.0"
author: baileys-dr contributors
options:
  event:
    description: The event key, for example C(failover|app1|failed).
    type: str
    required: true
  state:
    description:
      - C(checked) only reads (RV(due) tells whether to send); C(recorded) notes the event as sent now when O(sent) is
        true, and warns about O(failures).
    type: str
    choices: [checked, recorded]
    default: checked
  cooldown:
    description: Seconds during which the same event is not due again (0 sends every time).
    type: int
    default: 900
  state_dir:
    description: Directory of the cooldown files.
    type: path
    default: /var/lib/baileys-dr/notify
  sent:
    description: With O(state=recorded), whether at least one channel delivered the event (only then is it recorded).
    type: bool
    default: true
  failures:
    description: With O(state=recorded), channels that failed, as C(channel) and C(reason) (no URL, no token), each warned about.
    type: list
    elements: dict
    default: []
attributes:
  check_mode:
    support: full
    details: C(checked) works as usual; C(recorded) writes nothing.
  diff_mode:
    support: none
"""

EXAMPLES = r"""
- name: Is the event due?
  baileys_notify_cooldown:
    event: failover|{{ inventory_hostname }}|failed
    cooldown: 900
  register: due

- name: Record it once sent
  baileys_notify_cooldown:
    event: failover|{{ inventory_hostname }}|failed
    state: recorded
    failures: [{channel: webhook, reason: HTTP 500}]
"""

RETURN = r"""
due:
  description: Whether the event may be sent now (no record, or the cooldown has passed).
  returned: always
  type: bool
last_sent:
  description: When the event was last sent (Unix time), or null.
  returned: always
  type: float
remaining_seconds:
  description: Seconds until the event is due again (0 when due).
  returned: always
  type: float
path:
  description: The event's cooldown file.
  returned: always
  type: str
"""

import hashlib
import json
import os
import time

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.baileys_dr_fs import write_file_atomic
from ansible.module_utils.baileys_dr_lockfile import LockError, ensure_state_dir


class Cooldown:
    def __init__(self, module):
        self.module = module
        self.params = module.params
        if self.params["cooldown"] < 0:
            module.fail_json(msg="cooldown must be zero or positive, got %d" % self.params["cooldown"])
        self.dir = os.path.abspath(self.params["state_dir"])
        name = hashlib.sha256(self.params["event"].encode("utf-8")).hexdigest()[:32]
        self.path = os.path.join(self.dir, name + ".json")

    def _last_sent(self):
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, encoding="utf-8") as fh:
                return float(json.load(fh)["last_sent"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            # An unreadable record must not silence notifications: treat it as never sent.
            return None

    def run(self):
        now = time.time()
        last = self._last_sent()
        remaining = 0.0 if last is None else max(0.0, last + self.params["cooldown"] - now)
        result = dict(changed=False, path=self.path, last_sent=last, due=remaining == 0.0, remaining_seconds=round(remaining, 3))
        if self.params["state"] == "checked":
            return result
        for failure in self.params["failures"]:
            self.module.warn("notification of %s through %s failed: %s (the DR play goes on; audited)"
                             % (self.params["event"], failure.get("channel", "?"), failure.get("reason", "unknown")))
        if self.params["sent"]:
            result["changed"] = True
            if not self.module.check_mode:
                try:
                    ensure_state_dir(self.dir, mode=0o700)
                except LockError as exc:
                    self.module.fail_json(msg=str(exc), path=self.path)
                record = {"event": self.params["event"], "last_sent": now}
                write_file_atomic(self.path, json.dumps(record).encode("utf-8"), mode=0o600)
            result.update(last_sent=now, due=self.params["cooldown"] == 0, remaining_seconds=float(self.params["cooldown"]))
        return result


def main():
    module = AnsibleModule(
        argument_spec=dict(
            event=dict(type="str", required=True),
            state=dict(type="str", default="checked", choices=["checked", "recorded"]),
            cooldown=dict(type="int", default=900),
            state_dir=dict(type="path", default="/var/lib/baileys-dr/notify"),
            sent=dict(type="bool", default=True),
            failures=dict(type="list", elements="dict", default=[]),
        ),
        supports_check_mode=True,
    )
    module.exit_json(**Cooldown(module).run())


if __name__ == "__main__":
    main()
