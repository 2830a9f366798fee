# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Git for the baileys-dr modules: one runner for every git command, and ref name checks.

Every command goes through GitRunner.run, so unit tests replace _execute and
assert the exact argv. Names that reach argv are checked first with the rules
of git-check-ref-format, plus no leading "-", so that nothing a caller passes
can be read by git as an option.

A repository configures programs git runs (hooks, core.fsmonitor, filter drivers, ...). Whoever owns
the repository chooses them, so git must never run them with more privilege than that owner: see
GitRunner.guard.
"""

from __future__ import annotations

import os
import pwd
import re

# Environment of every git command: messages in English (they are reported), never a prompt,
# and no optional lock or index refresh written by read-only commands (check mode changes nothing).
GIT_ENV = {"LC_ALL": "C", "LANGUAGE": "C", "GIT_TERMINAL_PROMPT": "0", "GIT_OPTIONAL_LOCKS": "0"}

# -c settings of every git command: the configuration keys that name a program which the commands
# these modules run (rev-parse, symbolic-ref, cat-file, status, checkout, config) could start.
# Command-line settings beat every configuration file, the repository's included.
#   core.hooksPath   no hook at all (post-checkout, reference-transaction, post-index-change, ...)
#   core.fsmonitor   no file-system monitor command (status and checkout start it)
#   protocol.allow   no transport: a partial clone fetches missing objects on checkout or cat-file,
#                    which would start core.sshCommand, core.gitProxy, a remote helper, credential.helper
#   submodule.recurse  checkout never enters a submodule (a repository with its own configuration)
# Filter drivers (filter.<name>.clean/smudge/process) have names git cannot disable as a class: guard()
# refuses a repository whose own configuration defines one when git would run it as another account.
# Keys not listed start programs only in commands these modules never run: core.editor,
# sequence.editor, core.pager and pager.* (no terminal; --no-pager too), diff.external and
# diff.<driver>.command/textconv (diff, log -p, cat-file --textconv), merge.<driver>.driver
# (merge, checkout -m), gpg.program (verify-tag), core.alternateRefsCommand and
# uploadpack.packObjectsHook (serving fetches), alias.* (builtins win over aliases).
# The system configuration (/etc/gitconfig) is root's, not the repository's: it stays read
# (GIT_CONFIG_NOSYSTEM would also drop an administrator's safe.directory entries).
PROGRAMS_OFF = (
    ("core.hooksPath", "/dev/null"),
    ("core.fsmonitor", "false"),
    ("protocol.allow", "never"),
    ("submodule.recurse", "false"),
)

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


def repository_owners(repo):
    """{uid: first path owned by it} over the work tree's top, its .git, the git directory a .git file
    names, the common directory of a linked work tree, and their config files: each owner chooses
    programs git runs there. Empty when repo is not a directory."""
    if not os.path.isdir(repo):
        return {}
    paths = [repo]
    gitdir = os.path.join(repo, ".git")
    if os.path.isfile(gitdir):
        paths.append(gitdir)
        gitdir = os.path.join(repo, _pointer(gitdir, "gitdir: "))
    for directory in (gitdir, os.path.join(gitdir, _pointer(os.path.join(gitdir, "commondir"), ""))):
        paths += [directory, os.path.join(directory, "config")]
    owners = {}
    for path in paths:
        try:
            owners.setdefault(os.stat(path).st_uid, path)
        except OSError:
            pass
    return owners


def _pointer(path, prefix):
    """The path a .git or commondir file holds ("." when it does not exist or is not one)."""
    try:
        with open(path, "rb") as handle:
            line = handle.read(4096).decode("utf-8", "replace").strip()
    except OSError:
        return "."
    return line[len(prefix):] if line.startswith(prefix) and len(line) > len(prefix) else "."


def account(uid):
    try:
        return "%s (uid %d)" % (pwd.getpwuid(uid).pw_name, uid)
    except KeyError:
        return "uid %d" % uid


class GitRunner:
    """Runs git in one repository through module.run_command.

    Every command runs with PROGRAMS_OFF and --no-pager. Before the first, guard() makes sure git runs
    the repository's programs with no more privilege than the repository's owner.

    With safe_directory, every command gets -c safe.directory=<repo>, for a task run by another
    account than the repository's owner (git refuses it otherwise, "dubious ownership").
    """

    def __init__(self, module, repo, safe_directory=False, git_path=None):
        self.module = module
        self.repo = repo
        self.safe_directory = safe_directory
        self.git = git_path or module.get_bin_path("git", required=True)
        self.owner = None  # passwd entry of the owner when the runner lowers root to it (setpriv)
        self.setpriv = None
        self.guarded = False

    def command(self, args):
        argv = [self.git, "--no-pager"]
        for key, value in PROGRAMS_OFF:
            argv += ["-c", "%s=%s" % (key, value)]
        if self.safe_directory:
            argv += ["-c", "safe.directory=%s" % os.path.realpath(self.repo)]
        argv += ["-C", self.repo] + list(args)
        if self.owner is not None:
            argv = [self.setpriv, "--reuid=%d" % self.owner.pw_uid, "--regid=%d" % self.owner.pw_gid,
                    "--init-groups", "--"] + argv
        return argv

    def _execute(self, argv):
        env = dict(GIT_ENV)
        if self.owner is not None:
            # The owner's own git configuration, never root's (which it may not even be allowed to read).
            home = self.owner.pw_dir
            env.update(HOME=home, XDG_CONFIG_HOME=os.path.join(home, ".config"), USER=self.owner.pw_name,
                       LOGNAME=self.owner.pw_name)
        return self.module.run_command(argv, environ_update=env, expand_user_and_vars=False)

    # -- who runs git ------------------------------------------------------------------------------

    def guard(self):
        """Before the first command: as root in a repository another account owns, git runs as that
        owner (unless the module's run_command already runs commands as another account); refused when
        it cannot, or when several accounts own the repository. Then, when git still runs as another
        account than a (non-root) owner, a filter driver the repository's own configuration defines is refused."""
        if self.guarded:
            return
        self.guarded = True
        owners = repository_owners(self.repo)
        runs_as = self._lower_root(owners)
        # Root's own configuration is no escalation for anyone: only other owners' filters count.
        others = sorted(uid for uid in owners if uid not in (runs_as, 0))
        if others:
            self._refuse_filters(runs_as, others[0])

    def _lower_root(self, owners):
        """The uid git commands will run as."""
        euid = os.geteuid()
        accounts = sorted(set(owners) - {0})
        if euid != 0 or not accounts:
            return euid
        if len(accounts) > 1:
            raise GitError("repo %s is owned by several accounts (%s): refusing to run git there as root, since "
                           "each could make git run a program" % (self.repo, ", ".join(
                               "%s owns %s" % (account(uid), owners[uid]) for uid in accounts)))
        owner = accounts[0]
        runs_as = self._commands_uid()
        if runs_as != 0:
            return runs_as
        try:
            entry = pwd.getpwuid(owner)
        except KeyError:
            entry = None
        setpriv = self.module.get_bin_path("setpriv")
        if entry is None or not setpriv:
            raise GitError("repo %s belongs to %s and the module runs as root, which cannot run git as that account "
                           "(%s): refusing, since git would run the programs the repository configures as root; "
                           "run the task as the repository's owner (become_user)"
                           % (self.repo, account(owner), "no such account on this host" if entry is None
                              else "setpriv, from util-linux, is not installed"))
        self.owner, self.setpriv = entry, setpriv
        return owner

    def _commands_uid(self):
        """The uid the module's commands run as: a module may already lower them (the switch runs git
        as the application's account). 0 when it cannot be told."""
        rc, out, _ = self.module.run_command(["id", "-u"], environ_update=dict(GIT_ENV), expand_user_and_vars=False)
        return int(out.strip()) if rc == 0 and out.strip().isdigit() else 0

    def _refuse_filters(self, runs_as, owner):
        _, out, _ = self.run(["config", "--show-scope", "--name-only", "--get-regexp",
                              r"^filter\..*\.(clean|smudge|process)$"], ok_codes=(0, 1), what="reading the filters")
        for line in out.splitlines():
            scope, _, key = line.partition("\t")
            if scope in ("local", "worktree"):
                raise GitError("repo %s defines the filter driver %s (%s configuration): refusing, since git would "
                               "run its program as %s, not as the repository's owner %s; run the task as the owner "
                               "(become_user)" % (self.repo, key.rsplit(".", 1)[0], scope, account(runs_as),
                                                  account(owner)))

    def run(self, args, ok_codes=(0,), what=None):
        """(rc, stdout, stderr); raises GitError when rc is not in ok_codes."""
        self.guard()
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


# -- the emergency tag: verified, checked out, and the previous ref restored -------------------------

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


def git_tag_argument_spec():
    """The options of baileys_git_tag (a new dict per call: AnsibleModule changes the one it gets)."""
    return dict(
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
    )
