#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: baileys_sessions_swap
short_description: Swap a prepared Baileys sessions tree into place, or put the previous one back
description:
  - Makes O(src) (a standby copy or a staged export) the live sessions tree O(dest) with one atomic
    C(renameat2(RENAME_EXCHANGE)); the tree it replaces is kept at O(backup) for rollback.
  - With O(state=restored), puts O(backup) back as O(dest); the tree it replaces is kept beside it
    (C(<dest>.failed-<timestamp>)) so that nothing is ever deleted. Without O(backup) (there was no
    tree before), O(dest) is only moved aside.
  - The cost of the swap is independent of the number of keys: the trees are renamed, not copied.
  - The replaced tree is then compared with its own manifests (the rules of M(baileys_sessions_verify) O(depth=structure),
    one directory listing per company, one C(lstat) per file, the sha256 of files modified after the manifest). When a
    service running on the files added, rewrote or deleted files in it, RV(replaced_drift) counts them and the module
    warns that the tree holds files the database never received, naming where it is kept. Every replaced tree is kept.
version_added: "0.1.0"
author: baileys-dr contributors
options:
  dest:
    description: The live sessions tree, for example C(/srv/baileys-app/baileys_sessions).
    type: path
    required: true
  src:
    description: The tree to make live (O(state=promoted)). Must be on the file system of O(dest).
    type: path
  backup:
    description:
      - Where the replaced live tree goes (O(state=promoted)), or the tree to put back (O(state=restored)).
      - Default for O(state=promoted) C(<dest>.before-<UTC timestamp>).
    type: path
  state:
    description: C(promoted) makes O(src) live; C(restored) makes O(backup) live again.
    type: str
    choices: [promoted, restored]
    default: promoted
  lock_timeout:
    description: Seconds to wait for a running export, refresh or verification of the same trees.
    type: int
    default: 300
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
"""

EXAMPLES = r"""
- name: Make the verified standby copy live
  baileys_sessions_swap:
    src: /srv/baileys-app/baileys_sessions.standby
    dest: /srv/baileys-app/baileys_sessions
  register: swap

- name: Roll back
  baileys_sessions_swap:
    dest: /srv/baileys-app/baileys_sessions
    backup: "{{ swap.backup }}"
    state: restored
"""

RETURN = r"""
backup:
  description: Where the replaced tree now is (null when O(dest) did not exist).
  returned: always
  type: str
dest:
  description: The live tree.
  returned: always
  type: str
replaced_drift:
  description:
    - How the replaced tree (now at RV(backup)) differs from its own manifests, null when there was no tree. In check mode, the
      tree that would be replaced.
    - C(clean) (bool), C(manifest) (a top manifest was read), C(added), C(changed), C(deleted) (files), C(companies) (per drifted
      company, the first file names of each kind), C(extra_companies), C(missing_companies), C(problems) (manifest problems),
      C(reason) (one line). A tree without a manifest is not clean.
  returned: always
  type: dict
  sample: {"clean": false, "manifest": true, "added": 1, "changed": 1, "deleted": 1, "reason": "3 files ..."}
"""

import datetime
import os

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.baileys_dr_drift import drift_warning, swap_in_tree, tree_drift
from ansible.module_utils.baileys_dr_files import ParentLock
from ansible.module_utils.baileys_dr_tree import SessionsError


def _stamp():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


class SessionsSwap:
    def __init__(self, module):
        self.module = module
        self.dest = os.path.abspath(module.params["dest"])
        self.src = module.params["src"] and os.path.abspath(module.params["src"])
        self.backup = module.params["backup"] and os.path.abspath(module.params["backup"])

    def _check_dir(self, path, what):
        if os.path.islink(path):
            self.module.fail_json(msg="%s %s is a symbolic link: refusing to swap it" % (what, path))
        if not os.path.isdir(path):
            self.module.fail_json(msg="%s %s does not exist or is not a directory" % (what, path))
        if os.stat(path).st_dev != os.stat(os.path.dirname(self.dest)).st_dev:
            self.module.fail_json(msg="%s %s is not on the file system of %s: a swap must be a rename" % (what, path, self.dest))

    def _move_aside(self):
        if not os.path.lexists(self.dest):
            return dict(changed=False, dest=self.dest, backup=None, replaced_drift=None)
        aside = "%s.failed-%s" % (self.dest, _stamp())
        if self.module.check_mode:
            return dict(changed=True, dest=self.dest, backup=aside, replaced_drift=self._drift_of_dest())
        with ParentLock(os.path.dirname(self.dest), timeout=self.module.params["lock_timeout"]):
            os.rename(self.dest, aside)
            drift = tree_drift(aside)
        self._warn(drift, aside)
        return dict(changed=True, dest=self.dest, backup=aside, replaced_drift=drift)

    def _drift_of_dest(self):
        if not os.path.isdir(self.dest) or os.path.islink(self.dest):
            return None
        return tree_drift(self.dest, lock_timeout=self.module.params["lock_timeout"])

    def _warn(self, drift, kept):
        warning = drift_warning(drift, kept)
        if warning:
            self.module.warn(warning)

    def run(self):
        state = self.module.params["state"]
        if state == "promoted":
            if not self.src:
                self.module.fail_json(msg="state=promoted needs src")
            self._check_dir(self.src, "src")
            incoming, backup = self.src, self.backup or "%s.before-%s" % (self.dest, _stamp())
        elif not self.backup:
            return self._move_aside()
        else:
            self._check_dir(self.backup, "backup")
            incoming, backup = self.backup, "%s.failed-%s" % (self.dest, _stamp())
        if os.path.lexists(self.dest) and os.path.islink(self.dest):
            self.module.fail_json(msg="dest %s is a symbolic link: refusing to swap it" % self.dest)
        if os.path.lexists(backup):
            self.module.fail_json(msg="%s already exists: refusing to overwrite a kept tree" % backup)
        if self.module.check_mode:
            return dict(changed=True, dest=self.dest, backup=backup if os.path.exists(self.dest) else None,
                        replaced_drift=self._drift_of_dest())
        # The lock the export, refresh and verification take: no swap under a running refresh.
        swapped = swap_in_tree(incoming, self.dest, backup, lock_timeout=self.module.params["lock_timeout"])
        self._warn(swapped["replaced_drift"], swapped["backup"])
        return dict(changed=True, dest=self.dest, backup=swapped["backup"], replaced_drift=swapped["replaced_drift"])


def main():
    module = AnsibleModule(
        argument_spec=dict(
            dest=dict(type="path", required=True),
            src=dict(type="path"),
            backup=dict(type="path"),
            state=dict(type="str", default="promoted", choices=["promoted", "restored"]),
            lock_timeout=dict(type="int", default=300),
        ),
        supports_check_mode=True,
    )
    try:
        module.exit_json(**SessionsSwap(module).run())
    except SessionsError as exc:
        module.fail_json(msg=str(exc))


if __name__ == "__main__":
    main()
