"""baileys_git_tag against real git repositories made in temporary directories."""

from __future__ import annotations

import os
import pathlib
import pwd
import shutil
import subprocess
import tempfile

import pytest

import baileys_git_tag
from module_harness import run_module

from ansible.module_utils.baileys_dr_git import git_tag_argument_spec

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAKE_APP_REPO = os.path.join(ROOT, "testbed", "bin", "make-app-repo")
TAG = "emergency-file-fallback-v1"
MARKER = dict(marker_path="src/stores/files.js", marker_regex="useMultiFileAuthState")

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")

GIT_ENV = dict(
    os.environ, GIT_CONFIG_GLOBAL="/dev/null", GIT_CONFIG_NOSYSTEM="1",
    GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.invalid",
    GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.invalid",
)


class Repo(type(pathlib.Path())):
    """A repository's path, with the commits it was made with as attributes."""


# The tests' own git: in any repository, never running one of its programs.
TEST_GIT = ["git", "-c", "safe.directory=*", "-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false"]


def git(repo, *args):
    return subprocess.run([*TEST_GIT, "-C", str(repo), "-c", "tag.gpgSign=false", "-c", "commit.gpgSign=false", *args],
                          check=True, capture_output=True, text=True, env=GIT_ENV).stdout.strip()


def commit_file(repo, path, content, message):
    full = os.path.join(repo, path)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    with open(full, "w") as fh:
        fh.write(content)
    git(repo, "add", path)
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path):
    """main with two commits; the annotated tag on the first, which has the file store."""
    return make_repo(tmp_path / "app")


def make_repo(where):
    path = Repo(where)
    subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True, env=GIT_ENV)
    first = commit_file(path, "src/stores/files.js", "const { useMultiFileAuthState } = require('baileys')\n", "files")
    git(path, "tag", "-a", TAG, "-m", "%s: file-auth emergency version\n\nbody" % TAG)
    git(path, "rm", "-q", "src/stores/files.js")
    git(path, "commit", "-q", "-m", "postgres only")
    path.first, path.main = first, git(path, "rev-parse", "HEAD")
    return path


@pytest.fixture
def app_repo(tmp_path):
    """The project's test application repository (testbed/bin/make-app-repo), with a broken tag."""
    dest = Repo(tmp_path / "baileys-app")
    out = subprocess.run([MAKE_APP_REPO, str(dest), "--broken-tag", "broken-build-v1"],
                         check=True, capture_output=True, text=True).stdout
    info = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    dest.main, dest.tag, dest.broken = info["MAIN_COMMIT"], info["TAG_COMMIT"], info["BROKEN_TAG_COMMIT"]
    return dest


def verify(repo, check_mode=False, **extra):
    args = dict(repo=str(repo), tag=TAG)
    args.update(extra)
    return run_module(baileys_git_tag, args, check_mode=check_mode)


def head_of(repo):
    branch = subprocess.run([*TEST_GIT, "-C", str(repo), "symbolic-ref", "--quiet", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or None
    return branch, git(repo, "rev-parse", "HEAD")


# -- verification ----------------------------------------------------------------------------


def test_an_annotated_tag_with_its_marker_on_the_expected_commit_is_verified(repo):
    ok, result = verify(repo, expected_commit=repo.first[:10], **MARKER)
    assert ok, result
    assert not result["changed"]
    assert (result["tag_commit"], result["tag_type"]) == (repo.first, "tag")
    assert result["tag_message"] == "%s: file-auth emergency version" % TAG
    assert result["head"] == result["head_after"] == {"ref": "main", "commit": repo.main}


def test_a_missing_tag_fails_where_git_tag_l_succeeded(repo):
    # What the replaced scripts relied on: exit status 0 and no output for a missing tag.
    listed = subprocess.run(["git", "-C", str(repo), "tag", "-l", "no-such-tag"], capture_output=True, text=True)
    assert listed.returncode == 0 and listed.stdout == ""
    ok, result = verify(repo, tag="no-such-tag")
    assert not ok
    assert result["msg"] == "tag no-such-tag not found in %s" % repo


def test_a_lightweight_tag_is_refused_unless_allowed(repo):
    git(repo, "tag", "light", repo.first)
    ok, result = verify(repo, tag="light")
    assert not ok and "lightweight" in result["msg"] and "light" in result["msg"]
    ok, result = verify(repo, tag="light", annotated=False, **MARKER)
    assert ok and result["tag_type"] == "commit" and result["tag_commit"] == repo.first


def test_a_moved_tag_fails_against_the_commit_it_had(repo):
    reviewed = git(repo, "rev-parse", TAG + "^{commit}")
    git(repo, "tag", "-f", "-a", TAG, "-m", "moved", repo.main)
    ok, result = verify(repo, expected_commit=reviewed)
    assert not ok and "not at expected_commit %s" % reviewed in result["msg"]
    assert result["tag_commit"] == repo.main


def test_the_marker_is_read_at_the_tag_not_in_the_work_tree(repo):
    # On main the file is gone; at the tag it is there: the check passes from main.
    assert not (repo / "src/stores/files.js").exists()
    ok, result = verify(repo, **MARKER)
    assert ok, result
    # A tag without the file store fails, even when the work tree has the file.
    git(repo, "tag", "-a", "no-files", "-m", "postgres only", repo.main)
    (repo / "src").mkdir(exist_ok=True)
    (repo / "src/stores").mkdir(exist_ok=True)
    (repo / "src/stores/files.js").write_text("useMultiFileAuthState\n")  # untracked copy
    ok, result = verify(repo, tag="no-files", **MARKER)
    assert not ok and "marker src/stores/files.js is absent at tag no-files" in result["msg"]


def test_a_marker_without_the_expected_call_fails(repo):
    git(repo, "checkout", "-q", "--detach", repo.first)
    commit = commit_file(repo, "src/stores/files.js", "module.exports = {}\n", "stub")
    git(repo, "tag", "-a", "stub", "-m", "stub")
    ok, result = verify(repo, tag="stub", **MARKER)
    assert not ok and "does not match" in result["msg"] and commit in result["msg"]


def test_a_dirty_work_tree_fails_but_untracked_and_ignored_files_do_not_count(repo):
    (repo / ".gitignore").write_text("node_modules/\n")
    git(repo, "add", ".gitignore")
    git(repo, "commit", "-q", "-m", "ignore")
    (repo / ".env").write_text("USE_LEGACY_SUPABASE=false\n")
    (repo / "node_modules").mkdir()
    (repo / "node_modules" / "x.js").write_text("x")
    (repo / "baileys_sessions" / "company_c1").mkdir(parents=True)
    (repo / "baileys_sessions" / "company_c1" / "creds.json").write_text("{}")
    ok, result = verify(repo, state="checked_out")
    assert ok, result
    git(repo, "checkout", "-q", "main")
    (repo / ".gitignore").write_text("changed\n")
    ok, result = verify(repo, state="checked_out")
    assert not ok and "modified tracked file(s): .gitignore" in result["msg"]
    assert head_of(repo) == ("main", git(repo, "rev-parse", "main"))


def test_check_mode_changes_nothing_not_even_the_index(repo):
    # A tracked file touched after the index was written: a plain "git status" would refresh the
    # index and write it back; with GIT_OPTIONAL_LOCKS=0 it must not.
    git(repo, "checkout", "-q", "main")
    commit_file(repo, "README", "x\n", "readme")
    repo.main = git(repo, "rev-parse", "HEAD")
    index = repo / ".git" / "index"
    os.utime(index, (1_000_000_000, 1_000_000_000))
    os.utime(repo / "README", None)
    (repo / "untracked").write_text("x")
    ok, result = verify(repo, check_mode=True, state="checked_out", **MARKER)
    assert ok and result["changed"]
    assert result["head_after"] == {"ref": None, "commit": repo.first}
    assert head_of(repo) == ("main", repo.main)
    assert os.stat(index).st_mtime == 1_000_000_000


def test_a_directory_that_is_not_a_repository_is_refused(tmp_path):
    (tmp_path / "plain").mkdir()
    ok, result = verify(tmp_path / "plain")
    assert not ok and "opening the repository failed" in result["msg"]
    ok, result = verify(tmp_path / "missing")
    assert not ok and "is not a directory" in result["msg"]


def test_a_subdirectory_of_a_work_tree_is_not_taken_for_the_repository(repo):
    (repo / "sub").mkdir()
    ok, result = verify(repo / "sub")
    assert not ok and "not the top directory" in result["msg"]


# -- a repository another account owns: its programs never run as root ------------------------

as_root = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                             reason="needs root to give the repository away")
NOBODY = 65534


@pytest.fixture
def shared():
    """A directory other accounts can enter (pytest's tmp_path has 0700 parents), with a markers/
    directory anyone can write: a program the repository configures leaves its uid there when it runs."""
    base = pathlib.Path(tempfile.mkdtemp(prefix="baileys-dr-git-"))
    os.chmod(base, 0o755)
    (base / "markers").mkdir()
    os.chmod(base / "markers", 0o1777)
    yield base
    shutil.rmtree(base)


def give_away(path, uid):
    gid = pwd.getpwuid(uid).pw_gid
    os.chown(path, uid, gid)
    for directory, subdirs, files in os.walk(path):
        for name in subdirs + files:
            os.lchown(os.path.join(directory, name), uid, gid)


def booby_trap(repo, markers):
    """A post-checkout and a reference-transaction hook and a core.fsmonitor command, each writing
    `id -u` into markers/<its name>."""
    for hook in ("post-checkout", "reference-transaction"):
        path = repo / ".git" / "hooks" / hook
        path.write_text("#!/bin/sh\nid -u > %s/%s\n" % (markers, hook))
        path.chmod(0o755)
    git(repo, "config", "core.fsmonitor", "id -u > %s/fsmonitor; false" % markers)


def ran(markers):
    """{program: uid it ran as} of the programs that ran."""
    return {path.name: path.read_text().strip() for path in markers.iterdir()}


@pytest.fixture
def foreign(shared):
    """The repository with the hooks and fsmonitor, owned by nobody."""
    path = make_repo(shared / "app")
    booby_trap(path, shared / "markers")
    give_away(path, NOBODY)
    path.markers = shared / "markers"
    return path


@as_root
def test_as_root_git_runs_neither_hooks_nor_fsmonitor_of_a_repository_another_account_owns(foreign):
    ok, result = verify(foreign, safe_directory=True, state="checked_out", **MARKER)
    assert ok, result
    assert result["head_after"] == {"ref": None, "commit": foreign.first}
    ok, result = run_module(baileys_git_tag, dict(repo=str(foreign), state="restored", restore_ref="main",
                                                 safe_directory=True))
    assert ok and result["changed"], result
    assert ran(foreign.markers) == {}
    # The checkout was made as the owner: no root-owned file left in the application's tree.
    ok, result = verify(foreign, state="checked_out", **MARKER)
    assert ok, result
    assert os.stat(foreign / "src/stores/files.js").st_uid == NOBODY
    assert ran(foreign.markers) == {}


@as_root
def test_as_root_a_filter_the_repository_configures_runs_as_its_owner_never_as_root(shared):
    path = make_repo(shared / "app")
    git(path, "checkout", "-q", "--detach")
    commit_file(path, ".gitattributes", "*.js filter=trap\n", "attributes")
    commit_file(path, "src/app.js", "start()\n", "app")
    git(path, "tag", "-a", "with-filter", "-m", "with filter")
    git(path, "config", "filter.trap.smudge", "id -u > %s/smudge; cat" % (shared / "markers"))
    git(path, "checkout", "-q", "main")
    give_away(path, NOBODY)
    ok, result = verify(path, tag="with-filter", state="checked_out", safe_directory=True)
    assert ok, result
    assert ran(shared / "markers") == {"smudge": str(NOBODY)}


@as_root
def test_as_root_without_setpriv_a_repository_of_another_account_is_refused(foreign, shared, monkeypatch):
    # Only git and id on PATH: root has no way to run git as the owner.
    bin_dir = shared / "bin"
    bin_dir.mkdir()
    for tool in ("git", "id"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    monkeypatch.setenv("PATH", str(bin_dir))
    ok, result = verify(foreign, safe_directory=True, state="checked_out", **MARKER)
    assert not ok
    assert result["msg"] == (
        "repo %s belongs to nobody (uid %d) and the module runs as root, which cannot run git as that account "
        "(setpriv, from util-linux, is not installed): refusing, since git would run the programs the "
        "repository configures as root; run the task as the repository's owner (become_user)" % (foreign, NOBODY))
    assert ran(foreign.markers) == {}
    assert head_of(foreign) == ("main", foreign.main)


@as_root
def test_as_root_a_repository_two_accounts_own_is_refused_naming_both(foreign):
    postgres = pwd.getpwnam("postgres")
    os.chown(foreign / ".git" / "config", postgres.pw_uid, postgres.pw_gid)
    ok, result = verify(foreign, safe_directory=True)
    assert not ok
    assert "owned by several accounts" in result["msg"]
    assert "postgres (uid %d) owns %s/.git/config" % (postgres.pw_uid, foreign) in result["msg"]
    assert "nobody (uid %d) owns %s" % (NOBODY, foreign) in result["msg"]
    assert ran(foreign.markers) == {}


def lowered_module(account, **params):
    """The calling module as the switch hands it to the git engine: commands run as account (setpriv)."""
    from module_harness import set_module_args
    from ansible.module_utils.basic import AnsibleModule
    from ansible.module_utils import baileys_dr_switch_parts as parts

    with set_module_args({}):
        module = AnsibleModule(argument_spec={})
    return parts.SubModule(module, parts.engine_params(git_tag_argument_spec(), **params),
                            parts.RunAs(account))


@as_root
def test_the_switch_runs_git_as_the_application_account_without_the_repository_s_programs(foreign):
    from ansible.module_utils.baileys_dr_git import GitRunner, TagVerifier

    sub = lowered_module("nobody", repo=str(foreign), tag=TAG, state="checked_out", **MARKER)
    result = TagVerifier(sub, GitRunner(sub, str(foreign))).run()
    assert result["changed"] and result["head_after"] == {"ref": None, "commit": foreign.first}
    assert os.stat(foreign / "src/stores/files.js").st_uid == NOBODY
    assert ran(foreign.markers) == {}


@as_root
def test_a_third_account_never_runs_a_filter_the_repository_configures(foreign):
    from ansible.module_utils.baileys_dr_git import GitError, GitRunner, TagVerifier

    git(foreign, "config", "filter.trap.smudge", "id -u > %s/smudge; cat" % foreign.markers)
    sub = lowered_module("postgres", repo=str(foreign), tag=TAG, state="checked_out", safe_directory=True)
    with pytest.raises(GitError) as refused:
        TagVerifier(sub, GitRunner(sub, str(foreign), safe_directory=True)).run()
    assert str(refused.value) == (
        "repo %s defines the filter driver filter.trap (local configuration): refusing, since git would run its "
        "program as postgres (uid %d), not as the repository's owner nobody (uid %d); run the task as the owner "
        "(become_user)" % (foreign, pwd.getpwnam("postgres").pw_uid, NOBODY))
    assert ran(foreign.markers) == {}
    assert head_of(foreign) == ("main", foreign.main)


# -- the test application: switch and switch back -----------------------------------------------


def test_the_application_repository_is_switched_to_the_tag_and_restored_to_main(app_repo):
    (app_repo / ".env").write_text("USE_LEGACY_SUPABASE=false\n")
    ok, switched = verify(app_repo, state="checked_out", expected_commit=app_repo.tag, **MARKER)
    assert ok, switched
    assert switched["changed"]
    assert switched["head"] == {"ref": "main", "commit": app_repo.main}
    assert switched["head_after"] == {"ref": None, "commit": app_repo.tag}
    assert head_of(app_repo) == (None, app_repo.tag)
    assert "useMultiFileAuthState" in (app_repo / "src/stores/files.js").read_text()

    ok, again = verify(app_repo, state="checked_out", expected_commit=app_repo.tag, **MARKER)
    assert ok and not again["changed"]

    ok, restored = run_module(baileys_git_tag, dict(repo=str(app_repo), state="restored",
                                                   restore_ref=switched["head"]["ref"]))
    assert ok and restored["changed"], restored
    assert restored["head_after"] == {"ref": "main", "commit": app_repo.main}
    assert head_of(app_repo) == ("main", app_repo.main)
    assert not (app_repo / "src/stores/files.js").exists()
    assert (app_repo / ".env").read_text() == "USE_LEGACY_SUPABASE=false\n"

    ok, again = run_module(baileys_git_tag, dict(repo=str(app_repo), state="restored", restore_ref="main"))
    assert ok and not again["changed"]


def test_restoring_a_detached_commit_of_the_application(app_repo):
    ok, result = verify(app_repo, tag="broken-build-v1", state="checked_out", **MARKER)
    assert ok and result["head_after"]["commit"] == app_repo.broken
    ok, result = run_module(baileys_git_tag, dict(repo=str(app_repo), state="restored", restore_ref=app_repo.tag[:12]))
    assert ok and result["changed"], result
    assert head_of(app_repo) == (None, app_repo.tag)


def test_the_broken_tag_is_not_taken_for_the_emergency_commit(app_repo):
    ok, result = verify(app_repo, tag="broken-build-v1", expected_commit=app_repo.tag, **MARKER)
    assert not ok and app_repo.broken in result["msg"]
    assert head_of(app_repo) == ("main", app_repo.main)
