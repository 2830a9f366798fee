#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: baileys_git_tag
short_description: Verify the emergency git tag of the application, check it out, and restore the previous ref
description:
  - Proves that a tag exists in the application's repository and is what the failover expects, and
    fails otherwise. The replaced scripts ran C(git tag -l), which succeeds when the tag is missing;
    this module fails when the tag is missing, is lightweight while an annotated tag is required,
    points elsewhere than O(expected_commit), lacks the marker (O(marker_path), O(marker_regex)) at the
    tag, or when the work tree has modified tracked files.
  - V(checked_out) then checks the tag out (detached HEAD); V(restored) checks O(restore_ref) out
    again, a branch (HEAD attached to it) or a commit (detached), for the failback.
  - Git runs as the module's user (use C(become_user) with the account owning the repository). Run as
    root in a repository another account owns, git runs as that owner (C(setpriv)), so files checked
    out belong to it and nothing the repository configures runs as root; without C(setpriv), or when
    several accounts own the repository (work tree, C(.git), its config), the module refuses.
  - No git command runs a program the repository configures. Hooks (C(core.hooksPath=/dev/null)),
    C(core.fsmonitor), transports (a partial clone's lazy fetch) and submodules are off for every
    command. A filter driver (C(filter.<name>.smudge), C(clean), C(process)) defined in the
    repository's own configuration is refused when git would run it as another account than the
    repository's owner.
  - Untracked and ignored files (C(.env), C(node_modules), C(baileys_sessions)) are never touched
    nor counted as dirty.
  - Called C(git_tag_verify) before 0.4.0; the old name still works, with a warning naming the new one, until 0.5.0.
version_added: "0.1.0"
author: baileys-dr contributors
options:
  repo:
    description: Top directory of the application's work tree.
    type: path
    required: true
  tag:
    description:
      - The tag to verify, for example V(emergency-file-fallback-v1).
      - Checked with the rules of C(git check-ref-format) (no C(..), spaces, control characters,
        C(~^:?*[\\), no leading C(-)) before anything reaches git's command line.
      - Required with O(state=verified) and O(state=checked_out); with O(state=restored) it is
        optional and, when given, verified too (nothing is checked out for it).
    type: str
  state:
    description:
      - V(verified) only checks.
      - V(checked_out) checks, then checks out the commit of the tag, HEAD detached.
        Already there (detached at that commit) is no change.
      - V(restored) checks out O(restore_ref). Already there is no change.
    type: str
    choices: [verified, checked_out, restored]
    default: verified
  annotated:
    description: Refuse a lightweight tag (an annotated tag records who tagged, when and why).
    type: bool
    default: true
  expected_commit:
    description: The commit the tag must point at, full or abbreviated (at least 7 hexadecimal digits).
    type: str
  marker_path:
    description:
      - A file that must exist at the tag, relative to the top of the repository, for example
        V(src/stores/files.js). Read from the tag's commit (C(git cat-file blob <commit>:<path>)),
        not from the work tree.
    type: str
  marker_regex:
    description:
      - Python regular expression (multiline) the content of O(marker_path) at the tag must match,
        for example V(useMultiFileAuthState).
    type: str
  restore_ref:
    description:
      - With O(state=restored), what to check out. A branch name (C(refs/heads/) optional) attaches
        HEAD to that branch; otherwise a commit id (7 to 64 hexadecimal digits) detaches HEAD there.
      - Typically the C(head.ref) (or, when it is null, C(head.commit)) this module returned before
        the failover.
    type: str
  allow_dirty:
    description:
      - Accept tracked files with modifications (C(git status --porcelain --untracked-files=no) not
        empty). By default the module fails, listing up to 10 of them.
      - Even with it, git refuses a checkout that would overwrite them.
    type: bool
    default: false
  safe_directory:
    description:
      - Run every git command with C(-c safe.directory=<repo>), for a task run as another account
        than the repository's owner (git otherwise refuses it, reporting "dubious ownership").
      - Run as root, it is not needed: git runs as the repository's owner.
    type: bool
    default: false
attributes:
  check_mode:
    support: full
    details: Runs every check, reports whether a checkout would happen (C(changed), C(head_after)) and changes nothing.
  diff_mode:
    support: none
requirements:
  - git >= 2.26
  - setpriv (util-linux), when run as root in a repository another account owns
"""

EXAMPLES = r"""
- name: The emergency tag is there, annotated, on the reviewed commit, with the file auth store
  baileys_git_tag:
    repo: /srv/baileys
    tag: emergency-file-fallback-v1
    expected_commit: "{{ emergency_tag_commit }}"
    marker_path: src/stores/files.js
    marker_regex: useMultiFileAuthState
  become: true
  become_user: baileys
  register: tag_check

- name: Switch the application to the emergency version
  baileys_git_tag:
    repo: /srv/baileys
    tag: emergency-file-fallback-v1
    marker_path: src/stores/files.js
    marker_regex: useMultiFileAuthState
    state: checked_out
  become: true
  become_user: baileys
  register: switch

- name: Failback, back on the branch (or commit) that was checked out before
  baileys_git_tag:
    repo: /srv/baileys
    state: restored
    restore_ref: "{{ switch.head.ref or switch.head.commit }}"
  become: true
  become_user: baileys
"""

RETURN = r"""
tag_commit:
  description: The commit the tag points at (peeled).
  returned: when the tag was found
  type: str
  sample: 5d0c2bd1e0a6f1a6a9d1a3e5f0a7d9c1b2e3f4a5
tag_type:
  description: C(tag) for an annotated tag, C(commit) for a lightweight one.
  returned: when the tag was found
  type: str
tag_message:
  description: First line of the annotated tag's message (C(null) for a lightweight tag).
  returned: when the tag was found
  type: str
head:
  description: HEAD before the module ran; C(ref) is the branch name, or C(null) when HEAD was detached.
  returned: when the repository could be read
  type: dict
  sample: {ref: main, commit: 9a1f0c3e5b7d2a4c6e8f0a1b3c5d7e9f1a2b3c4d}
head_after:
  description: HEAD after the module ran (in check mode, what it would be).
  returned: when the repository could be read
  type: dict
  sample: {ref: null, commit: 5d0c2bd1e0a6f1a6a9d1a3e5f0a7d9c1b2e3f4a5}
dirty_paths:
  description: Up to 10 tracked files with modifications (C(git status --porcelain) lines).
  returned: when the work tree has some
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.baileys_dr_git import GitError, GitRunner, TagVerifier, git_tag_argument_spec
from ansible.module_utils.baileys_dr_renames import warn_if_renamed


def main():
    module = AnsibleModule(
        argument_spec=git_tag_argument_spec(),
        required_if=[
            ("state", "verified", ["tag"]),
            ("state", "checked_out", ["tag"]),
            ("state", "restored", ["restore_ref"]),
        ],
        required_by=dict(marker_regex="marker_path"),
        supports_check_mode=True,
    )
    warn_if_renamed(module)
    runner = GitRunner(module, module.params["repo"], safe_directory=module.params["safe_directory"])
    verifier = TagVerifier(module, runner)
    try:
        module.exit_json(**verifier.run())
    except GitError as exc:
        details = dict(verifier.result)
        details.pop("msg", None)
        module.fail_json(msg=str(exc), **details)


if __name__ == "__main__":
    main()
