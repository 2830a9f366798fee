"""baileys_git_tag with a scripted git: the exact commands, the refusals, check mode."""

from __future__ import annotations

import os

import pytest

import baileys_git_tag
from module_harness import run_module

from ansible.module_utils.baileys_dr_git import GitRunner, ref_name_problem

# Any existing directory will do (the module checks that repo is one): git itself is scripted,
# and a command the script does not know fails the test instead of running.
REPO = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))
# Every command: no pager, and none of the programs a repository can configure (hooks, fsmonitor,
# transports, submodules).
SAFE = ["/usr/bin/git", "--no-pager", "-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false",
        "-c", "protocol.allow=never", "-c", "submodule.recurse=false"]
GIT = SAFE + ["-C", REPO]
TAG = "emergency-file-fallback-v1"
TAG_OBJECT = "1" * 40
TAG_COMMIT = "c3f42ce0796ff26579453d99a1197e944b7772ec"
MAIN_COMMIT = "566008b9ee870577c2630aeb4245d891df1adbe4"
TAG_TEXT = ("object %s\ntype commit\ntag %s\ntagger t <t@x> 1762000000 +0000\n\n"
            "%s: file-auth emergency version\n\nLast revision with the file store.\n" % (TAG_COMMIT, TAG, TAG))
FILES_JS = "const { useMultiFileAuthState } = require('baileys');\n"


class ScriptedGit(GitRunner):
    """GitRunner whose commands are answered from a script and recorded with their full argv."""

    script = None

    def __init__(self, module, repo, safe_directory=False, git_path=None):
        super().__init__(module, repo, safe_directory=safe_directory, git_path="/usr/bin/git")
        self.calls = ScriptedGit.calls = []

    def _execute(self, argv):
        self.calls.append(argv)
        args = tuple(argv[argv.index("-C") + 2:])
        answers = self.script.get(args)
        if answers is None:
            raise AssertionError("unexpected git command: %r" % (argv,))
        return answers.pop(0) if len(answers) > 1 else answers[0]


@pytest.fixture
def git(monkeypatch):
    """Script of a repository at REPO (main checked out, the annotated tag, clean work tree)."""
    ScriptedGit.script = {
        ("rev-parse", "--show-toplevel"): [(0, REPO + "\n", "")],
        ("rev-parse", "--verify", "--quiet", "refs/tags/" + TAG): [(0, TAG_OBJECT + "\n", "")],
        ("cat-file", "-t", TAG_OBJECT): [(0, "tag\n", "")],
        ("rev-parse", "--verify", "--quiet", TAG_OBJECT + "^{commit}"): [(0, TAG_COMMIT + "\n", "")],
        ("cat-file", "tag", TAG_OBJECT): [(0, TAG_TEXT, "")],
        ("cat-file", "blob", TAG_COMMIT + ":src/stores/files.js"): [(0, FILES_JS, "")],
        ("status", "--porcelain", "--untracked-files=no"): [(0, "", "")],
        ("symbolic-ref", "--quiet", "HEAD"): [(0, "refs/heads/main\n", "")],
        ("rev-parse", "--verify", "--quiet", "HEAD"): [(0, MAIN_COMMIT + "\n", "")],
        ("checkout", "--quiet", "--detach", TAG_COMMIT): [(0, "", "")],
    }
    monkeypatch.setattr(baileys_git_tag, "GitRunner", ScriptedGit)
    return ScriptedGit


def args(**extra):
    base = dict(repo=REPO, tag=TAG)
    base.update(extra)
    return base


def commands(git):
    return [call[len(GIT):] for call in git.calls]


TAG_CHECKS = [
    ["rev-parse", "--show-toplevel"],
    ["rev-parse", "--verify", "--quiet", "refs/tags/" + TAG],
    ["cat-file", "-t", TAG_OBJECT],
    ["rev-parse", "--verify", "--quiet", TAG_OBJECT + "^{commit}"],
    ["cat-file", "tag", TAG_OBJECT],
]
STATUS = [["status", "--porcelain", "--untracked-files=no"]]
HEAD = [["symbolic-ref", "--quiet", "HEAD"], ["rev-parse", "--verify", "--quiet", "HEAD"]]
MARKER = [["cat-file", "blob", TAG_COMMIT + ":src/stores/files.js"]]


# -- verifying ---------------------------------------------------------------------------------


def test_verifying_runs_exactly_these_git_commands_and_reports_the_tag(git):
    ok, result = run_module(baileys_git_tag, args(marker_path="src/stores/files.js", marker_regex="useMultiFileAuthState"))
    assert ok, result
    assert git.calls == [GIT + c for c in TAG_CHECKS + MARKER + STATUS + HEAD]
    assert not result["changed"]
    assert result["tag_commit"] == TAG_COMMIT and result["tag_type"] == "tag"
    assert result["tag_message"] == TAG + ": file-auth emergency version"
    assert result["head"] == result["head_after"] == {"ref": "main", "commit": MAIN_COMMIT}


def test_a_missing_tag_fails_naming_the_tag_and_the_repository(git):
    git.script[("rev-parse", "--verify", "--quiet", "refs/tags/" + TAG)] = [(1, "", "")]
    ok, result = run_module(baileys_git_tag, args())
    assert not ok
    assert result["msg"] == "tag %s not found in %s" % (TAG, REPO)
    assert commands(git) == TAG_CHECKS[:2]


def test_a_lightweight_tag_is_refused_when_an_annotated_one_is_required(git):
    git.script[("cat-file", "-t", TAG_OBJECT)] = [(0, "commit\n", "")]
    ok, result = run_module(baileys_git_tag, args())
    assert not ok and "lightweight" in result["msg"] and TAG in result["msg"] and REPO in result["msg"]
    assert result["tag_type"] == "commit"


def test_a_lightweight_tag_is_accepted_with_annotated_false(git):
    git.script[("rev-parse", "--verify", "--quiet", "refs/tags/" + TAG)] = [(0, TAG_COMMIT + "\n", "")]
    git.script[("cat-file", "-t", TAG_COMMIT)] = [(0, "commit\n", "")]
    git.script[("rev-parse", "--verify", "--quiet", TAG_COMMIT + "^{commit}")] = [(0, TAG_COMMIT + "\n", "")]
    ok, result = run_module(baileys_git_tag, args(annotated=False))
    assert ok, result
    assert result["tag_type"] == "commit" and result["tag_message"] is None
    assert ["cat-file", "tag", TAG_COMMIT] not in commands(git)


def test_a_tag_on_something_else_than_a_commit_is_refused(git):
    git.script[("rev-parse", "--verify", "--quiet", TAG_OBJECT + "^{commit}")] = [(1, "", "")]
    ok, result = run_module(baileys_git_tag, args())
    assert not ok and "does not point at a commit" in result["msg"]


@pytest.mark.parametrize("expected", [TAG_COMMIT, TAG_COMMIT[:7], TAG_COMMIT[:12].upper()])
def test_the_tag_on_the_expected_commit_passes(git, expected):
    ok, result = run_module(baileys_git_tag, args(expected_commit=expected))
    assert ok, result


def test_a_moved_tag_fails_naming_both_commits(git):
    ok, result = run_module(baileys_git_tag, args(expected_commit=MAIN_COMMIT[:10]))
    assert not ok
    assert TAG_COMMIT in result["msg"] and MAIN_COMMIT[:10] in result["msg"] and "moved" in result["msg"]
    assert result["tag_commit"] == TAG_COMMIT


@pytest.mark.parametrize("expected", ["abc", "xyz1234567", "HEAD", "-1234567"])
def test_expected_commit_that_is_not_a_commit_id_is_refused_before_running_git(git, expected):
    ok, result = run_module(baileys_git_tag, args(expected_commit=expected))
    assert not ok and "expected_commit" in result["msg"]
    assert git.calls == []


def test_a_marker_missing_at_the_tag_fails(git):
    git.script[("cat-file", "blob", TAG_COMMIT + ":src/stores/files.js")] = [
        (128, "", "fatal: path 'src/stores/files.js' does not exist in '%s'\n" % TAG_COMMIT)]
    ok, result = run_module(baileys_git_tag, args(marker_path="src/stores/files.js"))
    assert not ok
    assert "marker src/stores/files.js is absent" in result["msg"] and TAG in result["msg"]


def test_a_marker_that_does_not_match_fails(git):
    git.script[("cat-file", "blob", TAG_COMMIT + ":src/stores/files.js")] = [(0, "module.exports = {}\n", "")]
    ok, result = run_module(baileys_git_tag, args(marker_path="./src/stores/files.js", marker_regex="useMultiFileAuthState"))
    assert not ok and "does not match 'useMultiFileAuthState'" in result["msg"]


@pytest.mark.parametrize("path", ["/etc/passwd", "../outside", "src/../../x", ""])
def test_a_marker_path_outside_the_repository_is_refused(git, path):
    ok, result = run_module(baileys_git_tag, args(marker_path=path))
    assert not ok and "marker_path" in result["msg"]
    assert git.calls == []


def test_marker_regex_needs_marker_path(git):
    ok, result = run_module(baileys_git_tag, args(marker_regex="x"))
    assert not ok and "marker_path" in result["msg"]


# -- hostile names -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", [
    "--upload-pack=touch /tmp/pwned", "-x", "a..b", "with space", "tab\tname", "a~1", "a^", "a:b", "a?", "a*",
    "a[b", "a\\b", "a@{1}", "@", "/abs", "trail/", "a//b", "dot.", ".hidden", "x/.hidden", "x.lock", "x/y.lock",
    "nl\nname", "",
])
def test_a_hostile_or_invalid_tag_name_never_reaches_git(git, name):
    ok, result = run_module(baileys_git_tag, args(tag=name))
    assert not ok and "not a valid git ref name" in result["msg"]
    assert git.calls == []


@pytest.mark.parametrize("name", ["emergency-file-fallback-v1", "release/2025.11", "v1.0.0-rc.4", "a@b", "UPPER_case"])
def test_ordinary_tag_names_are_accepted(name):
    assert ref_name_problem(name) is None


def test_a_hostile_restore_ref_never_reaches_git(git):
    ok, result = run_module(baileys_git_tag, args(state="restored", restore_ref="--orphan=x"))
    assert not ok and "restore_ref" in result["msg"] and "not a valid git ref name" in result["msg"]
    assert git.calls == []


# -- dirty work tree ---------------------------------------------------------------------------


def test_a_dirty_work_tree_fails_listing_up_to_ten_paths(git):
    dirty = "".join(" M src/file%02d.js\n" % i for i in range(12))
    git.script[("status", "--porcelain", "--untracked-files=no")] = [(0, dirty, "")]
    ok, result = run_module(baileys_git_tag, args(state="checked_out"))
    assert not ok
    assert "12 modified tracked file(s)" in result["msg"] and "src/file09.js" in result["msg"]
    assert "src/file10.js" not in result["msg"] and "and 2 more" in result["msg"]
    assert len(result["dirty_paths"]) == 10
    assert ["checkout", "--quiet", "--detach", TAG_COMMIT] not in commands(git)


def test_allow_dirty_reports_the_modified_files_and_goes_on(git):
    git.script[("status", "--porcelain", "--untracked-files=no")] = [(0, " M package.json\n", "")]
    ok, result = run_module(baileys_git_tag, args(allow_dirty=True))
    assert ok and result["dirty_paths"] == [" M package.json"]


# -- checking out --------------------------------------------------------------------------------


def test_checking_out_detaches_head_at_the_tag_commit(git):
    git.script[("symbolic-ref", "--quiet", "HEAD")] = [(0, "refs/heads/main\n", ""), (1, "", "")]
    git.script[("rev-parse", "--verify", "--quiet", "HEAD")] = [(0, MAIN_COMMIT + "\n", ""), (0, TAG_COMMIT + "\n", "")]
    ok, result = run_module(baileys_git_tag, args(state="checked_out"))
    assert ok, result
    assert commands(git) == TAG_CHECKS + STATUS + HEAD + [["checkout", "--quiet", "--detach", TAG_COMMIT]] + HEAD
    assert result["changed"]
    assert result["head"] == {"ref": "main", "commit": MAIN_COMMIT}
    assert result["head_after"] == {"ref": None, "commit": TAG_COMMIT}


def test_already_detached_at_the_tag_is_no_change(git):
    git.script[("symbolic-ref", "--quiet", "HEAD")] = [(1, "", "")]
    git.script[("rev-parse", "--verify", "--quiet", "HEAD")] = [(0, TAG_COMMIT + "\n", "")]
    ok, result = run_module(baileys_git_tag, args(state="checked_out"))
    assert ok and not result["changed"]
    assert not any(c[0] == "checkout" for c in commands(git))


def test_check_mode_verifies_and_reports_the_checkout_without_doing_it(git):
    ok, result = run_module(baileys_git_tag, args(state="checked_out", marker_path="src/stores/files.js"), check_mode=True)
    assert ok and result["changed"]
    assert commands(git) == TAG_CHECKS + MARKER + STATUS + HEAD
    assert result["head_after"] == {"ref": None, "commit": TAG_COMMIT}
    assert "would check out" in result["msg"]


def test_check_mode_still_fails_on_a_missing_tag(git):
    git.script[("rev-parse", "--verify", "--quiet", "refs/tags/" + TAG)] = [(1, "", "")]
    ok, result = run_module(baileys_git_tag, args(state="checked_out"), check_mode=True)
    assert not ok and "not found" in result["msg"]


def test_a_failed_checkout_is_reported_with_git_s_message(git):
    git.script[("checkout", "--quiet", "--detach", TAG_COMMIT)] = [
        (1, "", "error: The following untracked working tree files would be overwritten by checkout:\n\tsrc/stores/files.js\n")]
    ok, result = run_module(baileys_git_tag, args(state="checked_out"))
    assert not ok and "would be overwritten" in result["msg"] and REPO in result["msg"]


def test_head_not_where_expected_after_checkout_fails(git):
    ok, result = run_module(baileys_git_tag, args(state="checked_out"))
    assert not ok and "HEAD is" in result["msg"]


# -- restoring -----------------------------------------------------------------------------------


def restore_script(git, head_before, head_after):
    git.script[("symbolic-ref", "--quiet", "HEAD")] = [head_before[0], head_after[0]]
    git.script[("rev-parse", "--verify", "--quiet", "HEAD")] = [head_before[1], head_after[1]]
    git.script[("rev-parse", "--verify", "--quiet", "refs/heads/main")] = [(0, MAIN_COMMIT + "\n", "")]
    git.script[("checkout", "--quiet", "main", "--")] = [(0, "", "")]


def test_restoring_a_branch_attaches_head_to_it_again(git):
    restore_script(git, ((1, "", ""), (0, TAG_COMMIT + "\n", "")), ((0, "refs/heads/main\n", ""), (0, MAIN_COMMIT + "\n", "")))
    ok, result = run_module(baileys_git_tag, dict(repo=REPO, state="restored", restore_ref="main"))
    assert ok, result
    assert commands(git) == [["rev-parse", "--show-toplevel"]] + STATUS + HEAD + [
        ["rev-parse", "--verify", "--quiet", "refs/heads/main"], ["checkout", "--quiet", "main", "--"]] + HEAD
    assert result["changed"] and result["head_after"] == {"ref": "main", "commit": MAIN_COMMIT}


def test_restoring_the_branch_already_checked_out_is_no_change(git):
    restore_script(git, ((0, "refs/heads/main\n", ""), (0, MAIN_COMMIT + "\n", "")), ((0, "refs/heads/main\n", ""), (0, MAIN_COMMIT + "\n", "")))
    ok, result = run_module(baileys_git_tag, dict(repo=REPO, state="restored", restore_ref="refs/heads/main"))
    assert ok and not result["changed"]
    assert ["checkout", "--quiet", "main", "--"] not in commands(git)


def test_restoring_a_commit_detaches_head_there(git):
    git.script[("symbolic-ref", "--quiet", "HEAD")] = [(0, "refs/heads/main\n", ""), (1, "", "")]
    git.script[("rev-parse", "--verify", "--quiet", "HEAD")] = [(0, MAIN_COMMIT + "\n", ""), (0, TAG_COMMIT + "\n", "")]
    git.script[("rev-parse", "--verify", "--quiet", "refs/heads/C3F42CE")] = [(1, "", "")]
    git.script[("rev-parse", "--verify", "--quiet", "c3f42ce^{commit}")] = [(0, TAG_COMMIT + "\n", "")]
    ok, result = run_module(baileys_git_tag, dict(repo=REPO, state="restored", restore_ref="C3F42CE"))
    assert ok, result
    assert commands(git)[-3:] == [["checkout", "--quiet", "--detach", TAG_COMMIT]] + HEAD
    assert result["head_after"] == {"ref": None, "commit": TAG_COMMIT}


def test_restoring_an_unknown_ref_fails_naming_it(git):
    git.script[("rev-parse", "--verify", "--quiet", "refs/heads/release")] = [(1, "", "")]
    ok, result = run_module(baileys_git_tag, dict(repo=REPO, state="restored", restore_ref="release"))
    assert not ok and result["msg"] == "restore_ref release is neither a branch nor a commit of %s" % REPO


def test_restoring_with_a_tag_verifies_the_tag_too(git):
    restore_script(git, ((1, "", ""), (0, TAG_COMMIT + "\n", "")), ((0, "refs/heads/main\n", ""), (0, MAIN_COMMIT + "\n", "")))
    ok, result = run_module(baileys_git_tag, args(state="restored", restore_ref="main"))
    assert ok and commands(git)[:len(TAG_CHECKS)] == TAG_CHECKS


def test_restore_ref_with_another_state_is_an_error(git):
    ok, result = run_module(baileys_git_tag, args(restore_ref="main"))
    assert not ok and "only used with state: restored" in result["msg"]


def test_tag_is_required_to_verify_or_check_out(git):
    ok, result = run_module(baileys_git_tag, dict(repo=REPO, state="checked_out"))
    assert not ok and "tag" in result["msg"]


# -- the repository ------------------------------------------------------------------------------


def test_a_repo_that_is_not_a_directory_fails_before_running_git(git, tmp_path):
    ok, result = run_module(baileys_git_tag, dict(repo=str(tmp_path / "missing"), tag=TAG))
    assert not ok and result["msg"] == "repo %s is not a directory" % (tmp_path / "missing")
    assert git.calls == []


def test_a_directory_inside_another_work_tree_is_refused(git):
    git.script[("rev-parse", "--show-toplevel")] = [(0, "/srv\n", "")]
    ok, result = run_module(baileys_git_tag, args())
    assert not ok and "not the top directory" in result["msg"] and "/srv" in result["msg"]
    assert commands(git) == [["rev-parse", "--show-toplevel"]]


def test_a_repository_of_another_user_suggests_safe_directory(git):
    git.script[("rev-parse", "--show-toplevel")] = [
        (128, "", "fatal: detected dubious ownership in repository at '/srv/app'\n")]
    ok, result = run_module(baileys_git_tag, args())
    assert not ok and "dubious ownership" in result["msg"] and "safe_directory: true" in result["msg"]


def test_safe_directory_passes_the_repository_to_every_git_command(git):
    ok, result = run_module(baileys_git_tag, args(safe_directory=True))
    assert ok, result
    assert git.calls and all(call[:len(SAFE) + 4] == SAFE + ["-c", "safe.directory=" + REPO, "-C", REPO]
                             for call in git.calls)


def test_the_runner_runs_git_without_prompts_locks_translations_or_the_repository_s_programs():
    class Module:
        def __init__(self):
            self.seen = []

        def run_command(self, argv, **kwargs):
            self.seen.append((argv, kwargs))
            return 0, "ok\n", ""

    module = Module()
    runner = GitRunner(module, "/srv/app", git_path="/usr/bin/git")
    assert runner.run(["status"]) == (0, "ok\n", "")
    argv, kwargs = module.seen[0]
    assert argv == SAFE + ["-C", "/srv/app", "status"]
    assert kwargs["environ_update"] == {"LC_ALL": "C", "LANGUAGE": "C", "GIT_TERMINAL_PROMPT": "0", "GIT_OPTIONAL_LOCKS": "0"}
