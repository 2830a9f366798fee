#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: baileys_sessions_verify
short_description: Verify a Baileys sessions tree against its baileys-dr manifest
description:
  - Checks a tree written by M(baileys_auth_export) (docs/architecture.md, "The sessions tree and its manifest (format 1)");
    the top manifest C(.baileys-dr/manifest.json) is present and parsable, every company manifest has the sha256 the top
    manifest lists, every listed file exists with its size and sha256, and no refresh was left half-done
    (C(.baileys-dr/refresh-in-progress)).
  - Files in a company directory that the manifest does not list are reported in RV(extra_files), directories that are not
    companies of the manifest in RV(extra_companies); both are problems unless O(allow_extra).
  - Symbolic links are never followed; one anywhere in the tree is a problem.
  - Permissions other than 0600 for files and 0700 for directories are reported in RV(permissions) (not a problem).
  - With O(depth=structure), the top manifest and every company manifest are checked as above (sha256 chain, format,
    digests), and each company directory must hold exactly the files its manifest lists, each a regular file of the size
    listed (one directory listing per company, one C(lstat) per file). Only the files modified at or after the moment the
    top manifest was written (its own mtime) are read and hashed, because a service running on the files (Baileys writes in
    place with a plain C(writeFile)) gives each file it rewrites a new mtime; so a file changed in place after the manifest is a
    problem, in the words of O(depth=content). Missing, extra, renamed files, symbolic links and broken manifests are
    problems as with O(depth=content); a file changed in place whose mtime was set back before the manifest's is not seen.
    Seconds for a tree of a million files (the failover from the standby copy uses it); file permissions are not read
    (directories' are). The same rules give M(baileys_auth_export) and M(baileys_sessions_swap) their C(replaced_drift).
  - With O(recompute_digests), every file is parsed and each company's state digest is recomputed from the files (either
    Buffer encoding gives the same digest) and compared with the manifest.
  - Read-only. Waits for a running export or refresh of the same parent directory (shared C(flock)).
version_added: "0.1.0"
author: baileys-dr contributors
options:
  path:
    description: The sessions tree, for example C(/srv/baileys-app/baileys_sessions.standby).
    type: path
    required: true
    aliases: [dest]
  depth:
    description:
      - V(content) reads every file and compares its size and sha256 with the manifest.
      - V(structure) compares the company directories' listings and file sizes with the manifests, reading only the files
        modified since the top manifest was written (see above); it cannot be combined with O(recompute_digests).
    type: str
    choices: [content, structure]
    default: content
  recompute_digests:
    description: Recompute every company's digest from its files and compare it with the manifest (needs O(depth=content)).
    type: bool
    default: false
  allow_extra:
    description: Files and directories the manifest does not list are reported but are not problems.
    type: bool
    default: false
  fail_on_problems:
    description: Fail when the tree does not verify (the result still carries every field).
    type: bool
    default: true
  max_age:
    description: Seconds; a tree whose last good refresh (or creation) is older is a problem.
    type: int
  max_problems:
    description: Problems (and extra files, permission findings) listed at most; RV(problem_count) counts them all.
    type: int
    default: 100
  lock_timeout:
    description: Seconds to wait for a running export or refresh of the same parent directory.
    type: int
    default: 300
attributes:
  check_mode:
    support: full
    details: The module never changes anything.
  diff_mode:
    support: none
seealso:
  - module: baileys_auth_export
"""

EXAMPLES = r"""
- name: The standby copy is complete and intact
  baileys_sessions_verify:
    path: /srv/baileys-app/baileys_sessions.standby
    max_age: 1800
  register: standby

- name: Quick check before a failover (manifests and file listings, no file read)
  baileys_sessions_verify:
    path: /srv/baileys-app/baileys_sessions.standby
    depth: structure
  register: standby_structure

- name: Prove the exported files hold the database's state
  baileys_sessions_verify:
    path: /srv/baileys-app/baileys_sessions
    recompute_digests: true
    fail_on_problems: false
  register: exported
"""

RETURN = r"""
verified:
  description: Whether the tree matches its manifest (no problem found).
  returned: always
  type: bool
problems:
  description: What does not match, each naming the company and file (at most O(max_problems)).
  returned: always
  type: list
  elements: str
problem_count:
  description: Problems found (all of them).
  returned: always
  type: int
counts:
  description:
    - companies, files, bytes, keys, missing_files, mismatched_files, extra_files, extra_companies, permission_issues.
    - With O(depth=structure), bytes are the sizes the manifests list, mismatched_files counts files of another size or
      modified after the manifest with another sha256, and permission_issues counts directories only.
  returned: always
  type: dict
depth:
  description: The O(depth) the tree was verified at (V(content) or V(structure)).
  returned: always
  type: str
  sample: structure
extra_files:
  description: Files of company directories that the manifest does not list (C(company_<id>/<name>)).
  returned: always
  type: list
  elements: str
extra_companies:
  description: Entries of the tree that are not companies of the manifest.
  returned: always
  type: list
  elements: str
permissions:
  description: Files and directories with modes wider than 0600 and 0700.
  returned: always
  type: list
  elements: str
generation:
  description: Generation of the manifest.
  returned: when the manifest is readable
  type: int
created_at:
  description: When the generation was written.
  returned: when the manifest is readable
  type: str
last_good_refresh:
  description: Time of the last completed export or refresh.
  returned: when the manifest is readable
  type: str
age_seconds:
  description: Seconds since RV(last_good_refresh) (or RV(created_at)).
  returned: when the manifest is readable
  type: float
source:
  description: Where the data came from (kind, target, system_identifier, snapshot_at, ...).
  returned: when the manifest is readable
  type: dict
digests:
  description: State digest by company id, recomputed from the files with O(recompute_digests), else as the manifests list them.
  returned: always
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.baileys_dr_tree import SessionsError
from ansible.module_utils.baileys_dr_verify import verify_tree


class SessionsVerify:
    def __init__(self, module):
        self.module = module
        self.params = module.params

    def run(self):
        p = self.params
        result = verify_tree(p["path"], p["recompute_digests"], p["allow_extra"], p["max_problems"], p["lock_timeout"], p["depth"])
        if p["max_age"] is not None and result.get("age_seconds") is not None and result["age_seconds"] > p["max_age"]:
            result["problems"].append("the tree's last good refresh is %ds old (max_age %d)" % (result["age_seconds"], p["max_age"]))
            result["problem_count"] += 1
            result["verified"] = False
        result["changed"] = False
        return result


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", required=True, aliases=["dest"]),
            depth=dict(type="str", choices=["content", "structure"], default="content"),
            recompute_digests=dict(type="bool", default=False),
            allow_extra=dict(type="bool", default=False),
            fail_on_problems=dict(type="bool", default=True),
            max_age=dict(type="int"),
            max_problems=dict(type="int", default=100),
            lock_timeout=dict(type="int", default=300),
        ),
        supports_check_mode=True,
    )
    try:
        result = SessionsVerify(module).run()
    except (SessionsError, OSError) as exc:
        module.fail_json(msg="verifying %s failed: %s" % (module.params["path"], exc), verified=False)
    if not result["verified"] and module.params["fail_on_problems"]:
        shown = "; ".join(result["problems"][:5])
        module.fail_json(msg="%s does not verify (%d problems): %s" % (result["path"], result["problem_count"], shown), **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
