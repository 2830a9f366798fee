"""baileys_env_file: dotenv keys set and removed in place, atomically, without leaking values."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess

import pytest

import baileys_env_file as env_file
from module_harness import run_module

from ansible.module_utils import basic
from ansible.module_utils import baileys_dr_dotenv as dotenv

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
APP_NODE_MODULES = os.path.join(ROOT, "testbed", "app", "node_modules")

SAMPLE = """\
# Baileys service
export NODE_ENV=production

USE_LEGACY_SUPABASE=true   # flipped by failover
USE_DATABASE_AUTH_STATE="true"
POSTGRES_PASSWORD='s3cr3t-pw'
# trailing comment
"""


@pytest.fixture
def envfile(tmp_path):
    path = tmp_path / ".env"
    path.write_text(SAMPLE)
    path.chmod(0o640)
    return path


@pytest.fixture
def warnings(monkeypatch):
    seen = []
    monkeypatch.setattr(basic.AnsibleModule, "warn", lambda self, msg, **kwargs: seen.append(msg))
    return seen


def run(args, check_mode=False, diff=False):
    args = dict(args)
    if diff:
        args["_ansible_diff"] = True
    return run_module(env_file, args, check_mode=check_mode)


def dotenv_parse(path):
    """What the application's dotenv reads from path (None when Node or dotenv is missing)."""
    node = shutil.which("node")
    if node is None or not os.path.isdir(os.path.join(APP_NODE_MODULES, "dotenv")):
        pytest.skip("node and the test application's dotenv are needed")
    script = "process.stdout.write(JSON.stringify(require('dotenv').parse(require('fs').readFileSync(process.argv[1]))))"
    out = subprocess.run([node, "-e", script, str(path)], check=True, capture_output=True, text=True,
                         env=dict(os.environ, NODE_PATH=APP_NODE_MODULES)).stdout
    return json.loads(out)


# -- editing in place ---------------------------------------------------------------------------


def test_setting_keys_keeps_comments_blank_lines_order_and_layout(envfile):
    ok, result = run(dict(path=str(envfile), values={"USE_LEGACY_SUPABASE": "false", "USE_DATABASE_AUTH_STATE": "false"}))
    assert ok and result["changed"], result
    assert result["changed_keys"] == ["USE_LEGACY_SUPABASE", "USE_DATABASE_AUTH_STATE"]
    assert envfile.read_text() == SAMPLE.replace(
        "USE_LEGACY_SUPABASE=true   #", "USE_LEGACY_SUPABASE=false   #").replace(
        'USE_DATABASE_AUTH_STATE="true"', 'USE_DATABASE_AUTH_STATE="false"')


def test_second_identical_run_reports_no_change_and_does_not_rewrite(envfile):
    args = dict(path=str(envfile), values={"USE_LEGACY_SUPABASE": "false", "NEW_KEY": "x y"})
    assert run(args)[1]["changed"]
    inode = os.stat(envfile).st_ino
    ok, result = run(args)
    assert ok and not result["changed"] and result["changed_keys"] == []
    assert os.stat(envfile).st_ino == inode


def test_a_value_already_set_under_other_quoting_is_left_alone(tmp_path):
    path = tmp_path / ".env"
    path.write_text("A='x'\nB=\"y\"\nC= z  \n")
    ok, result = run(dict(path=str(path), values={"A": "x", "B": "y", "C": "z"}))
    assert ok and not result["changed"]
    assert path.read_text() == "A='x'\nB=\"y\"\nC= z  \n"


def test_export_prefix_quote_style_and_inline_comment_survive_an_update(tmp_path):
    path = tmp_path / ".env"
    path.write_text("export A='old' # keep me\n  B = \"old\"\n")
    ok, _ = run(dict(path=str(path), values={"A": "new value", "B": "new"}))
    assert ok
    assert path.read_text() == "export A='new value' # keep me\n  B = \"new\"\n"


def test_new_keys_are_appended_in_order_unquoted_when_safe_else_quoted(envfile):
    values = {"PLAIN": "postgres://db:5432/x", "SPACED": "two words", "HASH": "a#b",
              "DQUOTE": 'say "hi"', "BACKSLASH": "C:\\dir", "EMPTY": ""}
    ok, _ = run(dict(path=str(envfile), values=values))
    assert ok
    assert envfile.read_text() == SAMPLE + (
        "PLAIN=postgres://db:5432/x\n"
        'SPACED="two words"\n'
        'HASH="a#b"\n'
        "DQUOTE='say \"hi\"'\n"
        "BACKSLASH='C:\\dir'\n"
        "EMPTY=\n"
    )


def test_quoting_keeps_values_exactly_as_dotenv_reads_them(tmp_path):
    values = {
        "PLAIN": "abc", "SPACES": "  padded  ", "HASH": "x # not a comment", "SINGLE": "it's",
        "DOUBLE": 'a "quoted" word', "BACKSLASH_N": "literal \\n stays", "MIXED": "it's \"both\"",
        "ALL_BUT_BACKTICK": "'\"\\", "EQUALS": "a=b=c", "DOLLAR": "$HOME", "UNICODE": "çà ü", "EMPTY": "",
        "LEADING_QUOTE": "'half", "TRAILING_QUOTE": 'half"',
    }
    path = tmp_path / ".env"
    ok, result = run(dict(path=str(path), create=True, values=values))
    assert ok, result
    assert dotenv_parse(path) == values
    assert env_file.DotenvDocument(path.read_text()).values() == values


@pytest.mark.parametrize("content", [
    b"# c\nA=1\nexport B = two words # comment\nC='single # kept'\nD=\"x\\ny\"\nE=`tick`\n"
    b"F=\"multi\nline\"\nG: colon\n  H=indented\nI=#empty\nJ=unterminated 'quote\nK=a'b'\nL=\n"
    b"M=\"\"\nN='  spaced  '\nA=last wins\nBAD KEY=x\nWIN=crlf\r\nO=1\r\nP=tail",
    b"\xef\xbb\xbfBOM=1\nEMPTY=\n\"taken by EMPTY\"\nCOLON:\nnext-line\nU=\"unterminated\nV=2\n",
    b"Q=\"x\\\"y\" # escaped quote stays\nR='x\\'y'\nS=\"a\"#c\nT=`a\nb`\nexport=3\nexportB=2\nA.B-C=1\n",
], ids=["common", "odd", "escapes"])
def test_files_are_read_the_way_dotenv_reads_them(tmp_path, content):
    path = tmp_path / ".env"
    path.write_bytes(content)
    expected = dotenv_parse(path)
    assert env_file.DotenvDocument(content.decode()).values() == expected
    assert len(expected) >= 5


def test_a_new_line_an_unterminated_quote_would_swallow_is_refused(tmp_path):
    path = tmp_path / ".env"
    path.write_text('X="abc\n')
    ok, result = run(dict(path=str(path), values={"B": "#tag"}))
    assert not ok and "dotenv would then read other values for B, X" in result["msg"]
    assert path.read_text() == 'X="abc\n'


def test_a_multi_line_value_is_replaced_as_a_whole(tmp_path):
    path = tmp_path / ".env"
    path.write_text('A=1\nCERT="line1\nline2"\nB=2\n')
    ok, _ = run(dict(path=str(path), values={"CERT": "one-line"}))
    assert ok
    assert path.read_text() == 'A=1\nCERT="one-line"\nB=2\n'


def test_crlf_line_endings_are_kept(tmp_path):
    path = tmp_path / ".env"
    path.write_bytes(b"A=1\r\nB=2\r\n")
    ok, _ = run(dict(path=str(path), values={"A": "10", "C": "3"}))
    assert ok
    assert path.read_bytes() == b"A=10\r\nB=2\r\nC=3\r\n"


def test_a_key_added_to_a_file_without_final_newline_gets_its_own_line_and_no_final_newline(tmp_path):
    path = tmp_path / ".env"
    path.write_text("A=1")
    ok, _ = run(dict(path=str(path), values={"B": "2"}))
    assert ok
    assert path.read_text() == "A=1\nB=2"
    assert env_file.DotenvDocument(path.read_text()).values() == {"A": "1", "B": "2"}


def previous_values(result):
    """The values argument that puts back what a return_previous run found."""
    return {key: old["value"] if old["present"] else None for key, old in result["previous"].items()}


@pytest.mark.parametrize("eol", [b"\n", b"\r\n"], ids=["LF", "CRLF"])
def test_set_then_restored_from_previous_gives_back_a_file_without_final_newline_byte_for_byte(tmp_path, eol):
    path = tmp_path / ".env"
    original = b"A=1" + eol + b"USE_DATABASE_AUTH_STATE=true"
    path.write_bytes(original)
    ok, switched = run(dict(path=str(path), return_previous=True, _ansible_no_log=True,
                            values={"USE_DATABASE_AUTH_STATE": "false"}))
    assert ok and switched["changed"]
    assert path.read_bytes() == b"A=1" + eol + b"USE_DATABASE_AUTH_STATE=false"
    ok, restored = run(dict(path=str(path), values=previous_values(switched)))
    assert ok and restored["changed"]
    assert path.read_bytes() == original


@pytest.mark.parametrize("original", [b"A=1", b"A=1\r\nB=2", b"A=1\n# last line, a comment", b"A=1\n", b"A=1\r\n"],
                         ids=["LF", "CRLF", "comment-last", "final-LF", "final-CRLF"])
def test_a_key_appended_then_removed_gives_back_the_original_bytes(tmp_path, original):
    path = tmp_path / ".env"
    path.write_bytes(original)
    ok, added = run(dict(path=str(path), return_previous=True, _ansible_no_log=True,
                         values={"USE_REPOSITORY_PATTERN": "false"}))
    assert ok and added["changed"]
    assert env_file.DotenvDocument(path.read_bytes().decode()).values()["USE_REPOSITORY_PATTERN"] == "false"
    ok, removed = run(dict(path=str(path), values=previous_values(added)))
    assert ok and removed["changed"]
    assert path.read_bytes() == original


def test_boolean_and_integer_values_are_written_as_the_application_compares_them(envfile):
    ok, _ = run(dict(path=str(envfile), values={"USE_LEGACY_SUPABASE": False, "HEALTH_PORT": 3011, "FLAG": True}))
    assert ok
    values = env_file.DotenvDocument(envfile.read_text()).values()
    assert (values["USE_LEGACY_SUPABASE"], values["HEALTH_PORT"], values["FLAG"]) == ("false", "3011", "true")


# -- removing, duplicates --------------------------------------------------------------------


def test_null_removes_the_key_with_its_inline_comment_and_nothing_else(envfile):
    ok, result = run(dict(path=str(envfile), values={"USE_LEGACY_SUPABASE": None, "NEVER_THERE": None}))
    assert ok and result["changed"] and result["changed_keys"] == ["USE_LEGACY_SUPABASE"]
    assert envfile.read_text() == SAMPLE.replace("USE_LEGACY_SUPABASE=true   # flipped by failover\n", "")


def test_removing_a_duplicated_key_removes_every_definition(tmp_path, warnings):
    path = tmp_path / ".env"
    path.write_text("A=1\nB=2\nA=3\n")
    ok, result = run(dict(path=str(path), values={"A": None}))
    assert ok and result["changed"]
    assert path.read_text() == "B=2\n"


def test_duplicated_key_updates_the_definition_dotenv_uses_and_warns(tmp_path, warnings):
    path = tmp_path / ".env"
    path.write_text("A=1\nB=2\nA=3\n")
    ok, result = run(dict(path=str(path), values={"A": "9"}))
    assert ok and result["duplicates"] == ["A"]
    assert path.read_text() == "A=1\nB=2\nA=9\n"
    assert len(warnings) == 1 and "A is defined 2 times" in warnings[0] and str(path) in warnings[0]


def test_removing_keys_from_a_missing_file_is_no_change(tmp_path):
    ok, result = run(dict(path=str(tmp_path / ".env"), values={"A": None}))
    assert ok and not result["changed"]
    assert not (tmp_path / ".env").exists()


# -- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["1ABC", "A-B", "A B", "export A", ""])
def test_invalid_key_name_fails_naming_the_key(envfile, key):
    ok, result = run(dict(path=str(envfile), values={key: "x"}))
    assert not ok
    assert repr(key) in result["msg"] and "[A-Za-z_][A-Za-z0-9_]*" in result["msg"]
    assert envfile.read_text() == SAMPLE


@pytest.mark.parametrize("value", ["two\nlines", "carriage\rreturn", "nul\x00byte"])
def test_value_with_a_line_break_is_refused_without_showing_it(envfile, value):
    ok, result = run(dict(path=str(envfile), values={"POSTGRES_PASSWORD": value}))
    assert not ok and "POSTGRES_PASSWORD" in result["msg"] and "line break" in result["msg"]
    assert value not in json.dumps(result)
    assert envfile.read_text() == SAMPLE


def test_value_dotenv_cannot_read_back_is_refused(envfile):
    ok, result = run(dict(path=str(envfile), values={"X": "'\"`\\"}))
    assert not ok and "X" in result["msg"]


def test_non_string_value_is_refused_naming_the_key(envfile):
    ok, result = run(dict(path=str(envfile), values={"X": ["a"]}))
    assert not ok and "value of X must be a string" in result["msg"]


def test_missing_file_is_an_error_unless_create(tmp_path):
    ok, result = run(dict(path=str(tmp_path / ".env"), values={"A": "1"}))
    assert not ok and "does not exist" in result["msg"] and "create: true" in result["msg"]


def test_a_directory_is_refused(tmp_path):
    ok, result = run(dict(path=str(tmp_path), values={"A": "1"}))
    assert not ok and "is a directory" in result["msg"]


# -- file attributes -------------------------------------------------------------------------


def test_create_makes_a_0600_file(tmp_path):
    path = tmp_path / "new.env"
    ok, result = run(dict(path=str(path), create=True, values={"A": "1"}))
    assert ok and result["changed"] and result["created"]
    assert path.read_text() == "A=1\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_an_existing_file_keeps_its_mode_and_owner(envfile):
    if os.geteuid() == 0:
        os.chown(envfile, 4242, 4343)
    before = os.stat(envfile)
    ok, _ = run(dict(path=str(envfile), values={"A": "1"}))
    assert ok
    after = os.stat(envfile)
    assert after.st_ino != before.st_ino  # replaced by rename, not rewritten in place
    assert (stat.S_IMODE(after.st_mode), after.st_uid, after.st_gid) == (0o640, before.st_uid, before.st_gid)


def test_mode_owner_and_group_are_applied_and_reported(envfile):
    ok, result = run(dict(path=str(envfile), mode="0600"))
    assert ok and result["changed"] and result["changed_keys"] == []
    assert stat.S_IMODE(os.stat(envfile).st_mode) == 0o600
    ok, result = run(dict(path=str(envfile), mode="0600"))
    assert ok and not result["changed"]
    if os.geteuid() == 0:
        ok, result = run(dict(path=str(envfile), owner="4242", group="4343"))
        assert ok and result["changed"]
        assert (os.stat(envfile).st_uid, os.stat(envfile).st_gid) == (4242, 4343)


def test_a_symlinked_env_file_is_edited_through_the_link(tmp_path):
    shared = tmp_path / "shared.env"
    shared.write_text("A=1\n")
    link = tmp_path / ".env"
    link.symlink_to(shared)
    ok, result = run(dict(path=str(link), values={"A": "2"}))
    assert ok and result["path"] == str(shared)
    assert link.is_symlink() and shared.read_text() == "A=2\n"


def test_state_absent_removes_the_file(envfile):
    ok, result = run(dict(path=str(envfile), state="absent"))
    assert ok and result["changed"] and not envfile.exists()
    ok, result = run(dict(path=str(envfile), state="absent"))
    assert ok and not result["changed"]


# -- check mode, diff, secrets ---------------------------------------------------------------


def test_check_mode_reports_the_change_and_writes_nothing(envfile):
    before = os.stat(envfile)
    ok, result = run(dict(path=str(envfile), values={"USE_LEGACY_SUPABASE": "false"}, backup=True, mode="0600"),
                     check_mode=True, diff=True)
    assert ok and result["changed"] and result["changed_keys"] == ["USE_LEGACY_SUPABASE"]
    assert "USE_LEGACY_SUPABASE=false" in result["diff"]["after"]
    assert "backup_file" not in result
    assert envfile.read_text() == SAMPLE
    after = os.stat(envfile)
    assert (after.st_ino, after.st_mtime_ns, after.st_mode) == (before.st_ino, before.st_mtime_ns, before.st_mode)
    assert sorted(os.listdir(envfile.parent)) == [".env"]


def test_check_mode_does_not_create_a_missing_file(tmp_path):
    ok, result = run(dict(path=str(tmp_path / ".env"), create=True, values={"A": "1"}), check_mode=True)
    assert ok and result["changed"] and result["created"]
    assert os.listdir(tmp_path) == []


def test_diff_shows_before_and_after_with_secret_values_masked(envfile):
    ok, result = run(dict(path=str(envfile), values={"POSTGRES_PASSWORD": "n3w-pw", "API_TOKEN": "tok",
                                                     "USE_LEGACY_SUPABASE": "false"}), diff=True)
    assert ok
    diff = result["diff"]
    assert "POSTGRES_PASSWORD='********'" not in diff["before"]
    assert "POSTGRES_PASSWORD=********" in diff["before"] and "POSTGRES_PASSWORD=********" in diff["after"]
    assert "API_TOKEN=********" in diff["after"]
    assert "USE_LEGACY_SUPABASE=true" in diff["before"] and "USE_LEGACY_SUPABASE=false" in diff["after"]
    assert "# Baileys service" in diff["after"]
    assert "POSTGRES_PASSWORD" in diff["after_header"] and "API_TOKEN" in diff["after_header"]


def test_secrets_never_appear_in_the_result(envfile):
    ok, result = run(dict(path=str(envfile), values={"POSTGRES_PASSWORD": "n3w-pw", "DATABASE_URL": "postgres://u:pw@h/db"},
                          backup=True), diff=True)
    assert ok
    dumped = json.dumps(result)
    for secret in ("n3w-pw", "s3cr3t-pw", "postgres://u:pw@h/db"):
        assert secret not in dumped
    assert result["invocation"]["module_args"]["values"] == {"POSTGRES_PASSWORD": "********", "DATABASE_URL": "********"}


def test_secret_keys_regex_is_configurable(envfile):
    ok, result = run(dict(path=str(envfile), values={"USE_LEGACY_SUPABASE": "false"}, secret_keys_regex="supabase"),
                     diff=True)
    assert ok
    assert "USE_LEGACY_SUPABASE=********" in result["diff"]["after"]
    assert "POSTGRES_PASSWORD='s3cr3t-pw'" in result["diff"]["after"]


def test_an_invalid_secret_regex_fails_without_showing_values(envfile):
    ok, result = run(dict(path=str(envfile), values={"POSTGRES_PASSWORD": "n3w-pw"}, secret_keys_regex="("))
    assert not ok and "secret_keys_regex" in result["msg"]
    assert "n3w-pw" not in json.dumps(result)


def test_return_previous_gives_what_was_there(envfile):
    ok, result = run(dict(path=str(envfile), return_previous=True, _ansible_no_log=True,
                          values={"USE_LEGACY_SUPABASE": "false", "USE_REPOSITORY_PATTERN": "false"}))
    assert ok
    assert result["previous"] == {"USE_LEGACY_SUPABASE": {"present": True, "value": "true"},
                                  "USE_REPOSITORY_PATTERN": {"present": False, "value": None}}


def test_return_previous_is_refused_on_a_task_without_no_log(envfile):
    ok, result = run(dict(path=str(envfile), return_previous=True, values={"POSTGRES_PASSWORD": "x"}))
    assert not ok and "no_log: true" in result["msg"]
    assert "s3cr3t-pw" not in json.dumps(result)
    assert envfile.read_text() == SAMPLE


def test_previous_values_restore_the_file_exactly(envfile):
    ok, switched = run(dict(path=str(envfile), return_previous=True, _ansible_no_log=True,
                            values={"USE_LEGACY_SUPABASE": "false", "USE_DATABASE_AUTH_STATE": "false",
                                    "USE_REPOSITORY_PATTERN": "false"}))
    assert ok and switched["changed"]
    ok, restored = run(dict(path=str(envfile), values=previous_values(switched)))
    assert ok and restored["changed"]
    assert envfile.read_text() == SAMPLE


def test_previous_is_not_returned_unless_asked(envfile):
    ok, result = run(dict(path=str(envfile), values={"A": "1"}))
    assert ok and "previous" not in result


# -- backup and crash safety -----------------------------------------------------------------


def test_backup_is_0600_beside_the_file_with_the_old_content(envfile):
    ok, result = run(dict(path=str(envfile), values={"A": "1"}, backup=True))
    assert ok and result["changed"]
    backup = result["backup_file"]
    assert os.path.dirname(backup) == str(envfile.parent) and backup.startswith(str(envfile) + ".")
    with open(backup) as fh:
        assert fh.read() == SAMPLE
    assert stat.S_IMODE(os.stat(backup).st_mode) == 0o600


def test_two_backups_in_the_same_second_by_one_process_keep_both_contents(envfile, monkeypatch):
    # A switch and its rollback write .env within a second, in one module process: the clock says the same second.
    from ansible.module_utils import baileys_dr_dotenv

    monkeypatch.setattr(baileys_dr_dotenv.time, "strftime", lambda fmt, t=None: "2026-12-07@04:00:00")
    ok, first = run(dict(path=str(envfile), values={"A": "1"}, backup=True))
    ok2, second = run(dict(path=str(envfile), values={"A": "2"}, backup=True))
    assert ok and ok2 and first["backup_file"] != second["backup_file"]
    assert second["backup_file"].endswith("~") and first["backup_file"].endswith("~")
    with open(first["backup_file"]) as fh:
        assert fh.read() == SAMPLE
    with open(second["backup_file"]) as fh:
        assert "A=1" in fh.read()


def test_no_backup_when_nothing_changes(envfile):
    ok, result = run(dict(path=str(envfile), values={"USE_LEGACY_SUPABASE": "true"}, backup=True))
    assert ok and not result["changed"] and "backup_file" not in result
    assert os.listdir(envfile.parent) == [".env"]


def test_a_write_failing_midway_leaves_the_file_intact_and_no_temp_file(envfile, monkeypatch):
    def half_then_disk_full(fd, data):
        os.write(fd, data[:len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dotenv, "write_all", half_then_disk_full)
    ok, result = run(dict(path=str(envfile), values={"USE_LEGACY_SUPABASE": "false", "BIG": "x" * 5000}))
    assert not ok and "unchanged" in result["msg"] and "No space left" in result["msg"]
    assert envfile.read_text() == SAMPLE
    assert os.listdir(envfile.parent) == [".env"]


@pytest.mark.parametrize("error", [OSError(5, "Input/output error"), Exception("Could not replace the file")],
                         ids=["os-error", "atomic-move-error"])
def test_a_failed_rename_leaves_the_file_intact(envfile, monkeypatch, error):
    def refuse(self, src, dest, **kwargs):
        raise error

    monkeypatch.setattr(basic.AnsibleModule, "atomic_move", refuse)
    ok, result = run(dict(path=str(envfile), values={"USE_LEGACY_SUPABASE": "false"}))
    assert not ok and "unchanged" in result["msg"]
    assert envfile.read_text() == SAMPLE
    assert os.listdir(envfile.parent) == [".env"]


def test_a_run_killed_in_the_middle_of_the_write_leaves_the_old_file(envfile):
    """SIGKILL after half the new content is written: no cleanup runs, the file is still whole."""
    pid = os.fork()
    if pid == 0:  # the child: run the module, die by SIGKILL half-way through the write
        try:
            def half_then_killed(fd, data):
                os.write(fd, data[:len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)

            dotenv.write_all = half_then_killed
            run(dict(path=str(envfile), values={"USE_LEGACY_SUPABASE": "false", "BIG": "y" * 100000}))
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert envfile.read_text() == SAMPLE
    leftovers = [name for name in os.listdir(envfile.parent) if name != ".env"]
    assert len(leftovers) == 1 and leftovers[0].startswith("..env.tmp-")
    assert stat.S_IMODE(os.stat(envfile.parent / leftovers[0]).st_mode) == 0o600
    # The next run is not disturbed by the leftover.
    ok, result = run(dict(path=str(envfile), values={"USE_LEGACY_SUPABASE": "false"}))
    assert ok and result["changed"]


# -- the record written before the change ------------------------------------------------------------


def test_record_of_the_previous_values_is_written_0600_in_a_new_0700_directory_before_the_change(envfile, tmp_path):
    record = tmp_path / "state" / "failover-state.json"
    ok, result = run(dict(path=str(envfile), values={"USE_LEGACY_SUPABASE": "false", "USE_REPOSITORY_PATTERN": "false"},
                          record_path=str(record), record_data={"format": 1, "source": "standby"}))
    assert ok and result["changed"] and result["file_changed"] and result["record_path"] == str(record)
    assert json.loads(record.read_text()) == {
        "format": 1, "source": "standby",
        "env": {"USE_LEGACY_SUPABASE": {"present": True, "value": "true"},
                "USE_REPOSITORY_PATTERN": {"present": False, "value": None}}}
    assert stat.S_IMODE(record.stat().st_mode) == 0o600 and stat.S_IMODE(record.parent.stat().st_mode) == 0o700
    assert "USE_LEGACY_SUPABASE=false" in envfile.read_text()
    # The values were in the record only: not in the result.
    assert "previous" not in result


def test_record_is_written_even_when_no_key_changes_and_the_file_is_left_alone(envfile, tmp_path):
    record = tmp_path / "record.json"
    before = envfile.read_text()
    ok, result = run(dict(path=str(envfile), values={"USE_LEGACY_SUPABASE": "true"}, record_path=str(record)))
    assert ok and result["changed"] and not result["file_changed"]
    assert json.loads(record.read_text())["env"] == {"USE_LEGACY_SUPABASE": {"present": True, "value": "true"}}
    assert envfile.read_text() == before


def test_record_in_check_mode_writes_nothing(envfile, tmp_path):
    record = tmp_path / "state" / "record.json"
    before = envfile.read_text()
    ok, result = run(dict(path=str(envfile), values={"USE_LEGACY_SUPABASE": "false"}, record_path=str(record)),
                     check_mode=True)
    assert ok and result["changed"] and result["file_changed"]
    assert not record.parent.exists() and envfile.read_text() == before


def test_refused_edit_writes_no_record(tmp_path):
    path = tmp_path / ".env"
    path.write_text('X="abc\n')
    record = tmp_path / "record.json"
    ok, result = run(dict(path=str(path), values={"B": "#tag"}, record_path=str(record)))
    assert not ok and "dotenv would then read other values" in result["msg"] and not record.exists()


def test_record_that_cannot_be_written_leaves_the_file_unchanged(envfile, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    before = envfile.read_text()
    ok, result = run(dict(path=str(envfile), values={"USE_LEGACY_SUPABASE": "false"},
                          record_path=str(blocker / "record.json")))
    assert not ok and "cannot write the record" in result["msg"] and "left unchanged" in result["msg"]
    assert envfile.read_text() == before
