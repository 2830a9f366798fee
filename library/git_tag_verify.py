#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: git_tag_verify
short_description: Verify the emergency git tag of the application, check it out, and restore the previous ref
description:
  - Proves that a tag exists in the application's repository and is what the failover expects, and
    fails otherwise. The replaced scripts ran C(git tag -l), which succeeds when the tag is missing;
    this module fails when the tag is missing, is lightweight while an annotated tag is required,
    points elsewhere than O(expected_commit), lacks the marker (O(marker_path), O(marker_regex)) at the
    tag, or when the work tree has modified tracked files.
  - V(checked_out) then checks the tag out (detached HEAD); V(restored) checks O(restore_ref) out
    again, a branch (HEAD attached to it) or a commit (detached), for the failback.
  - Git runs as the module's user (use C(become_user) with the account owning the repository).
    O(safe_directory) lets a root-run task work in a repository owned by another account.
  - Untracked and ignored files (C(.env), C(node_modules), C(baileys_sessions)) are never touched
    nor counted as dirty.
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
      - Run every git command with C(-c safe.directory=<repo>), for a task run as root in a
        repository owned by another account (git otherwise refuses it, reporting "dubious ownership").
      - Files checked out are then owned by root; prefer C(become_user) with the repository's owner.
    type: bool
    default: false
attributes:
  check_mode:
    support: full
    details: Runs every check, reports whether a checkout would happen (C(changed), C(head_after)) and changes nothing.
  diff_mode:
    support: none
requirements:
  - git >= 2.23
"""

EXAMPLES = r"""
- name: The emergency tag is there, annotated, on the reviewed commit, with the file auth store
  git_tag_verify:
    repo: /srv/baileys
    tag: emergency-file-fallback-v1
    expected_commit: "{{ emergency_tag_commit }}"
    marker_path: src/stores/files.js
    marker_regex: useMultiFileAuthState
  become: true
  become_user: baileys
  register: tag_check

- name: Switch the application to the emergency version
  git_tag_verify:
    repo: /srv/baileys
    tag: emergency-file-fallback-v1
    marker_path: src/stores/files.js
    marker_regex: useMultiFileAuthState
    state: checked_out
  become: true
  become_user: baileys
  register: switch

- name: Failback, back on the branch (or commit) that was checked out before
  git_tag_verify:
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

import os
import re

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.baileys_dr_git import HEX_OBJECT, GitError, GitRunner, check_ref_name

MAX_DIRTY_SHOWN = 10


class TagVerifier:
    def __init__(self, module, runner):
        self.module = module
        self.params = module.params
        self.git = runner
        self.repo = self.params["repo"]
        self.tag = self.params["tag"]
        self.result = dict(changed=False)

    # -- checks of the arguments (before any git command) ------------------------------------------

    def validate(self):
        params = self.params
        if self.tag is not None:
            check_ref_name(self.tag, "tag")
        if params["restore_ref"] is not None and params["state"] != "restored":
            raise GitError("restore_ref is only used with state: restored (state is %s)" % params["state"])
        if params["restore_ref"] is not None:
            ref = params["restore_ref"]
            if ref.startswith("refs/heads/"):
                ref = ref[len("refs/heads/"):]
            self.restore_ref = check_ref_name(ref, "restore_ref")
        expected = params["expected_commit"]
        if expected is not None:
            self.expected = expected.strip().lower()
            if not HEX_OBJECT.match(self.expected):
                raise GitError("expected_commit %r is not a commit id (7 to 64 hexadecimal digits)" % expected)
        path = params["marker_path"]
        if path is not None:
            path = path[2:] if path.startswith("./") else path
            parts = path.split("/")
            if not path or path.startswith("/") or ".." in parts or any(c in path for c in "\x00\n"):
                raise GitError("marker_path %r must be a relative path inside the repository" % params["marker_path"])
            self.marker_path = path
        if params["marker_regex"] is not None:
            try:
                self.marker_regex = re.compile(params["marker_regex"], re.MULTILINE)
            except re.error as exc:
                raise GitError("marker_regex %r is not a valid regular expression: %s" % (params["marker_regex"], exc))

    # -- the checks --------------------------------------------------------------------------------

    def where(self):
        return "tag %s in %s" % (self.tag, self.repo)

    def check_repository(self):
        if not os.path.isdir(self.repo):
            raise GitError("repo %s is not a directory" % self.repo)
        _, out, _ = self.git.run(["rev-parse", "--show-toplevel"], what="opening the repository")
        top = out.strip()
        # Without this, a directory that is not a repository inside another work tree would make
        # git act on the enclosing repository.
        if os.path.realpath(top) != os.path.realpath(self.repo):
            raise GitError("repo %s is not the top directory of a git work tree (git found %s)" % (self.repo, top))

    def verify_tag(self):
        oid = self.git.resolve("refs/tags/%s" % self.tag, what="looking up the tag")
        if oid is None:
            raise GitError("tag %s not found in %s" % (self.tag, self.repo))
        _, out, _ = self.git.run(["cat-file", "-t", oid], what="reading the %s" % self.where())
        kind = out.strip()
        self.result["tag_type"] = kind
        if kind == "commit" and self.params["annotated"]:
            raise GitError("%s is a lightweight tag; an annotated tag is required (annotated: true)" % self.where())
        commit = self.git.resolve("%s^{commit}" % oid, what="reading the %s" % self.where())
        if commit is None:
            raise GitError("%s does not point at a commit (it points at a %s)" % (self.where(), kind))
        self.result["tag_commit"] = commit
        self.result["tag_message"] = self.tag_message(oid) if kind == "tag" else None
        if self.params["expected_commit"] is not None and not commit.startswith(self.expected):
            raise GitError("%s points at %s, not at expected_commit %s (was the tag moved?)"
                           % (self.where(), commit, self.params["expected_commit"]))
        if self.params["marker_path"] is not None:
            self.verify_marker(commit)
        return commit

    def tag_message(self, oid):
        _, out, _ = self.git.run(["cat-file", "tag", oid], what="reading the %s" % self.where())
        _, _, message = out.partition("\n\n")
        for line in message.splitlines():
            if line.strip():
                return line.strip()
        return ""

    def verify_marker(self, commit):
        rc, content, err = self.git.run(["cat-file", "blob", "%s:%s" % (commit, self.marker_path)],
                                        ok_codes=(0, 128), what="reading the marker")
        if rc != 0:
            raise GitError("marker %s is absent at %s (commit %s): %s"
                           % (self.marker_path, self.where(), commit, err.strip()))
        if self.params["marker_regex"] is not None and not self.marker_regex.search(content):
            raise GitError("marker %s at %s (commit %s) does not match %r"
                           % (self.marker_path, self.where(), commit, self.params["marker_regex"]))

    def check_clean(self):
        _, out, _ = self.git.run(["status", "--porcelain", "--untracked-files=no"], what="reading the work tree status")
        dirty = [line for line in out.splitlines() if line.strip()]
        if not dirty:
            return
        self.result["dirty_paths"] = dirty[:MAX_DIRTY_SHOWN]
        if self.params["allow_dirty"]:
            return
        more = len(dirty) - MAX_DIRTY_SHOWN
        raise GitError("work tree of %s has %d modified tracked file(s): %s%s (commit or revert them, or set allow_dirty: true)"
                       % (self.repo, len(dirty), ", ".join(line[3:] for line in dirty[:MAX_DIRTY_SHOWN]),
                          " and %d more" % more if more > 0 else ""))

    def restore_target(self):
        """(branch or None, commit) that restore_ref names."""
        ref = self.restore_ref
        commit = self.git.resolve("refs/heads/%s" % ref, what="looking up restore_ref")
        if commit is not None:
            return ref, commit
        if HEX_OBJECT.match(ref.lower()):
            commit = self.git.resolve("%s^{commit}" % ref.lower(), what="looking up restore_ref")
            if commit is not None:
                return None, commit
        raise GitError("restore_ref %s is neither a branch nor a commit of %s" % (self.params["restore_ref"], self.repo))

    # -- the run -----------------------------------------------------------------------------------

    def run(self):
        self.validate()
        self.check_repository()
        state = self.params["state"]
        tag_commit = self.verify_tag() if self.tag is not None else None
        self.check_clean()
        head = self.git.head()
        self.result["head"] = head
        self.result["head_after"] = head
        if state == "checked_out":
            target = (None, tag_commit)
            checkout = ["checkout", "--quiet", "--detach", tag_commit]
        elif state == "restored":
            target = self.restore_target()
            if target[0] is not None:
                checkout = ["checkout", "--quiet", target[0], "--"]
            else:
                checkout = ["checkout", "--quiet", "--detach", target[1]]
        else:
            self.result["msg"] = "%s verified" % self.where()
            return self.result
        branch, commit = target
        wanted = dict(ref=branch, commit=commit)
        shown = "branch %s" % branch if branch else "commit %s (detached)" % commit
        if head == wanted:
            self.result["msg"] = "%s already checked out in %s" % (shown, self.repo)
            return self.result
        self.result["changed"] = True
        if self.module.check_mode:
            self.result["head_after"] = wanted
            self.result["msg"] = "would check out %s in %s" % (shown, self.repo)
            return self.result
        self.git.run(checkout, what="checking out %s" % shown)
        after = self.git.head()
        self.result["head_after"] = after
        if after != wanted:
            raise GitError("after checking out %s in %s, HEAD is %s" % (shown, self.repo, after))
        self.result["msg"] = "checked out %s in %s" % (shown, self.repo)
        return self.result


def main():
    module = AnsibleModule(
        argument_spec=dict(
            repo=dict(type="path", required=True),
            tag=dict(type="str"),
            state=dict(type="str", default="verified", choices=["verified", "checked_out", "restored"]),
            annotated=dict(type="bool", default=True),
            expected_commit=dict(type="str"),
            marker_path=dict(type="str"),
            marker_regex=dict(type="str"),
            restore_ref=dict(type="str"),
            allow_dirty=dict(type="bool", default=False),
            safe_directory=dict(type="bool", default=False),
        ),
        required_if=[
            ("state", "verified", ["tag"]),
            ("state", "checked_out", ["tag"]),
            ("state", "restored", ["restore_ref"]),
        ],
        required_by=dict(marker_regex="marker_path"),
        supports_check_mode=True,
    )
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
