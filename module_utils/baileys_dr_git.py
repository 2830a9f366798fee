# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Git for the baileys-dr modules: one runner for every git command, and ref name checks.

Every command goes through GitRunner.run, so unit tests replace _execute and
assert the exact argv. Names that reach argv are checked first with the rules
of git-check-ref-format, plus no leading "-", so that nothing a caller passes
can be read by git as an option.
"""

from __future__ import annotations

import os
import re

# Environment of every git command: messages in English (they are reported), never a prompt,
# and no optional lock or index refresh written by read-only commands (check mode changes nothing).
GIT_ENV = {"LC_ALL": "C", "LANGUAGE": "C", "GIT_TERMINAL_PROMPT": "0", "GIT_OPTIONAL_LOCKS": "0"}

_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")
HEX_OBJECT = re.compile(r"[0-9a-f]{7,64}\Z")


class GitError(Exception):
    """A git command or a check failed; the message names what and where."""

    def __init__(self, msg, **details):
        super().__init__(msg)
        self.details = details


def ref_name_problem(name):
    """Why name cannot be a branch or tag name (git-check-ref-format, no leading "-"), or None."""
    if not isinstance(name, str) or not name:
        return "it is empty"
    if name.startswith("-"):
        return "it starts with '-'"
    if name == "@":
        return "it is '@'"
    match = _FORBIDDEN.search(name)
    if match:
        return "it contains %r (no spaces, control characters, ~ ^ : ? * [ or \\)" % match.group()
    if ".." in name:
        return "it contains '..'"
    if "@{" in name:
        return "it contains '@{'"
    if name.startswith("/") or name.endswith("/") or "//" in name:
        return "it starts or ends with '/' or contains '//'"
    if name.endswith("."):
        return "it ends with '.'"
    for component in name.split("/"):
        if component.startswith("."):
            return "a component starts with '.'"
        if component.endswith(".lock"):
            return "a component ends with '.lock'"
    return None


def check_ref_name(name, what):
    problem = ref_name_problem(name)
    if problem:
        raise GitError("%s %r is not a valid git ref name: %s" % (what, name, problem))
    return name


class GitRunner:
    """Runs git in one repository through module.run_command.

    With safe_directory, every command gets -c safe.directory=<repo>, for a root-run task in a
    repository owned by the application's account (git refuses it otherwise, "dubious ownership").
    """

    def __init__(self, module, repo, safe_directory=False, git_path=None):
        self.module = module
        self.repo = repo
        self.safe_directory = safe_directory
        self.git = git_path or module.get_bin_path("git", required=True)

    def command(self, args):
        argv = [self.git]
        if self.safe_directory:
            argv += ["-c", "safe.directory=%s" % os.path.realpath(self.repo)]
        return argv + ["-C", self.repo] + list(args)

    def _execute(self, argv):
        return self.module.run_command(argv, environ_update=dict(GIT_ENV), expand_user_and_vars=False)

    def run(self, args, ok_codes=(0,), what=None):
        """(rc, stdout, stderr); raises GitError when rc is not in ok_codes."""
        argv = self.command(args)
        rc, out, err = self._execute(argv)
        if rc not in ok_codes:
            message = (err or out or "").strip()
            hint = ""
            if "dubious ownership" in message:
                hint = " (the repository belongs to another user: run the task as that user, or set safe_directory: true)"
            raise GitError("%s failed in %s (git %s, rc=%d): %s%s" % (
                what or "git", self.repo, " ".join(args), rc, message, hint), rc=rc, stderr=err)
        return rc, out, err

    # -- small queries shared by modules --------------------------------------------------------

    def head(self):
        """{ref: branch name or None when detached, commit: sha or None on an unborn branch}."""
        rc, out, _ = self.run(["symbolic-ref", "--quiet", "HEAD"], ok_codes=(0, 1), what="reading HEAD")
        ref = out.strip() if rc == 0 else None
        if ref is not None and ref.startswith("refs/heads/"):
            ref = ref[len("refs/heads/"):]
        rc, out, _ = self.run(["rev-parse", "--verify", "--quiet", "HEAD"], ok_codes=(0, 1), what="reading HEAD")
        return dict(ref=ref, commit=out.strip() if rc == 0 else None)

    def resolve(self, name, what):
        """Object id of name (a full ref name or an object expression), or None when it does not exist."""
        rc, out, _ = self.run(["rev-parse", "--verify", "--quiet", name], ok_codes=(0, 1), what=what)
        return out.strip() if rc == 0 and out.strip() else None
