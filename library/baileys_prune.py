#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: baileys_prune
short_description: Remove old reports, .env backups and replaced sessions trees, by retention
description:
  - Every failover keeps the sessions tree it replaced (C(baileys_sessions.before-*)), every C(.env) rewrite a backup
    (C(.env.<pid>.<time>~)), every failover the credentials cache it set aside, every rehearsal its reports. This module removes the old ones of each set named in
    O(sets); per set, the O(keep_last) newest runs and every run younger than O(keep_days) days are kept.
  - A run is the entries whose names give the same key through the set's O(sets[].group) regular expression (a
    rehearsal's JSON, JUnit and ledger files), or one entry when the set has none. An entry whose name does not match
    the group is never removed.
  - Only entries directly in the set's directory are looked at. A symbolic link is removed as a link, never followed;
    a tree is removed with every link inside it left unfollowed.
  - The engine is C(module_utils/baileys_dr_retention.py).
  - Called C(baileys_dr_prune) before 0.4.0; the old name still works, with a warning naming the new one, until 0.5.0.
version_added: "0.2.0"
author: baileys-dr contributors
options:
  sets:
    description: What to prune.
    type: list
    elements: dict
    required: true
    suboptions:
      path:
        description: The directory holding the entries (absolute, not C(/)). A missing directory has nothing to prune.
        type: path
        required: true
      pattern:
        description: Shell glob of the entry names of the set (C(*) alone only with O(sets[].group)).
        type: str
        required: true
      group:
        description: Python regular expression searched in each name; its first group (or whole match) is the run key.
        type: str
  keep_last:
    description: Runs kept per set whatever their age, the newest first (at least 1).
    type: int
    default: 5
  keep_days:
    description: Runs younger than this many days (by the newest entry's modification time) are kept.
    type: float
    default: 14
attributes:
  check_mode:
    support: full
    details: Lists what would be removed, removes nothing.
  diff_mode:
    support: none
"""

EXAMPLES = r"""
- name: Prune the trees replaced by failovers (keep the last 3, and anything younger than a week)
  baileys_prune:
    sets:
      - path: /srv/baileys-app
        pattern: baileys_sessions.before-*
    keep_last: 3
    keep_days: 7

- name: Prune rehearsal reports, one run per timestamp
  baileys_prune:
    sets:
      - path: /var/lib/baileys-dr/reports
        pattern: rehearsal-*
        group: '\d{8}T\d{6}Z'
"""

RETURN = r"""
removed:
  description: Paths removed (in check mode, that would be removed).
  returned: always
  type: list
  elements: str
  sample: [/srv/baileys-app/baileys_sessions.before-20261101T031500123456Z]
kept:
  description: Entries of the sets left in place.
  returned: always
  type: int
bytes_freed:
  description: Bytes of the entries removed (or that would be).
  returned: always
  type: int
"""

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.baileys_dr_retention import PruneError, Pruner, prune_argument_spec
from ansible.module_utils.baileys_dr_renames import warn_if_renamed


def main():
    module = AnsibleModule(argument_spec=prune_argument_spec(), supports_check_mode=True)
    warn_if_renamed(module)
    try:
        result = Pruner(module).run()
    except PruneError as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
