"""baileys_keys_cleanup without a database: policy validation, caps, age buckets, the archive format."""

from __future__ import annotations

import gzip
import json
import os

import pytest

import baileys_keys_cleanup
from module_harness import run_module

from ansible.module_utils.baileys_dr_cleanup import (
    DEFAULT_PROTECTED, DEFAULT_RETENTION, ArchiveWriter, CleanupError, bucket_sql, check_cap,
    iter_archive, parse_row, read_sidecar, validate_policy, verify_archive,
)
from ansible.module_utils.baileys_dr_ages import BUCKET_NAMES, bucket_of
from ansible.module_utils.baileys_dr_codec import KEY_TYPES

# Nothing listens there: a test that reaches the database fails with a connection error instead.
NO_DB = {"login_host": "127.0.0.1", "login_port": 1, "login_user": "x", "login_db": "x", "connect_timeout": 1}


# -- policy --------------------------------------------------------------------------------------


def test_default_policy_protects_what_baileys_needs_and_only_retains_rebuildable_types():
    assert set(DEFAULT_PROTECTED) == {"pre-key", "app-state-sync-key", "app-state-sync-version", "identity-key", "lid-mapping"}
    assert set(DEFAULT_RETENTION) == set(KEY_TYPES) - set(DEFAULT_PROTECTED)
    assert validate_policy(DEFAULT_RETENTION, DEFAULT_PROTECTED) == (DEFAULT_RETENTION, sorted(DEFAULT_PROTECTED))


def test_unknown_key_types_are_named_in_the_error():
    with pytest.raises(CleanupError) as exc:
        validate_policy({"sesion": 30, "session": 30}, ["pre-key", "prekey"])
    assert "retention names unknown key types: 'sesion'" in str(exc.value)
    assert "protected_types names unknown key types: 'prekey'" in str(exc.value)


def test_a_type_cannot_be_both_protected_and_retained():
    with pytest.raises(CleanupError, match="both protected and given a retention: pre-key"):
        validate_policy({"pre-key": 30}, DEFAULT_PROTECTED)


@pytest.mark.parametrize("days", [0, -3, "soon", 1.5])
def test_retention_must_be_whole_days_of_at_least_one(days):
    with pytest.raises(CleanupError, match="retention of 'session'"):
        validate_policy({"session": days}, [])


def test_retention_given_as_text_by_a_template_is_accepted():
    assert validate_policy({"session": "14"}, [])[0] == {"session": 14}


def test_hostile_company_ids_in_the_filter_are_refused():
    with pytest.raises(CleanupError, match="companies holds ids"):
        validate_policy({}, [], companies=["ok-1", "x' OR 1=1 --"])


def test_negative_expiry_grace_is_refused():
    with pytest.raises(CleanupError, match="expired_grace_days"):
        validate_policy({}, [], expired_grace_days=-1)


# -- caps ----------------------------------------------------------------------------------------


def test_a_plan_within_the_caps_is_allowed():
    assert check_cap({"a": {"session": 5}}, {"a": 10}, max_delete=5, max_delete_share=0.5) is None


def test_more_than_max_delete_is_refused_with_the_numbers():
    message = check_cap({"a": {"session": 6000}, "b": {"tctoken": 4001}}, {"a": 100000, "b": 100000}, 10000, 0.5)
    assert message.startswith("refusing to delete anything: it would delete 10001 keys, more than max_delete=10000")
    assert "Raise the limit" in message


def test_more_than_a_share_of_one_company_is_refused_naming_it():
    message = check_cap({"a": {"session": 3, "tctoken": 3}, "b": {"session": 1}}, {"a": 10, "b": 10}, 10000, 0.5)
    assert "max_delete_share=0.5 of the keys of 1 company: a: 6 of 10 keys (60.0%)" in message
    assert "b:" not in message


def test_a_long_list_of_companies_over_the_share_is_shortened():
    plan = {"c%03d" % i: {"session": 9} for i in range(30)}
    message = check_cap(plan, {c: 10 for c in plan}, 10000, 0.5)
    assert "of 30 companies" in message and "... and 10 more" in message


# -- age buckets ---------------------------------------------------------------------------------


@pytest.mark.parametrize("age,bucket", [
    (-2, "0-1d"), (0, "0-1d"), (0.99, "0-1d"), (1, "1-7d"), (6.99, "1-7d"), (7, "7-14d"), (13.9, "7-14d"),
    (14, "14-30d"), (29.99, "14-30d"), (30, "30d+"), (3650, "30d+"), (None, "unknown"),
])
def test_age_buckets_include_their_lower_bound(age, bucket):
    assert bucket_of(age) == bucket


def test_the_sql_buckets_have_the_same_names_and_bounds():
    sql = bucket_sql(ref="R", column="u")
    assert [part.split(" AS ")[1].strip('"') for part in sql.split(", count")] == list(BUCKET_NAMES)
    assert "u > R - interval '1 days') AS \"0-1d\"" in sql
    assert "u > R - interval '7 days' AND u <= R - interval '1 days'" in sql
    assert "u <= R - interval '30 days') AS \"30d+\"" in sql


# -- archive -------------------------------------------------------------------------------------


def write_archive(path, batches):
    writer = ArchiveWriter(str(path), {"format": 1, "kind": "baileys-dr-keys-archive", "table": "whatsapp_keys",
                                       "columns": ["company_id", "key_type", "key_id", "value"]})
    for batch in batches:
        writer.write_batch(batch)
    writer.close()
    return writer


ROW = '{"company_id":"a","key_type":"session","key_id":"1.0","value":{"x":"\u2028"}}'


def test_archive_is_gzip_json_lines_with_a_header_and_a_matching_sidecar(tmp_path):
    path = tmp_path / "keys.jsonl.gz"
    writer = write_archive(path, [[ROW, ROW.replace("1.0", "2.0")], [], [ROW.replace("1.0", "3.0")]])
    assert writer.rows == 3 and os.stat(path).st_mode & 0o777 == 0o600
    with gzip.open(path, "rt", newline="\n") as fh:  # one member per batch, read as one stream
        lines = fh.read().split("\n")
    assert json.loads(lines[0])["kind"] == "baileys-dr-keys-archive"
    assert lines[1] == ROW and lines[4] == ""
    assert open(str(path) + ".sha256").read() == "%s  keys.jsonl.gz\n" % writer.sha256
    assert verify_archive(str(path)) == writer.sha256
    items = list(iter_archive(str(path)))
    assert items[0][0] == 1 and items[0][1]["table"] == "whatsapp_keys"
    assert [parse_row(str(path), n, line)["key_id"] for n, line in items[1:]] == ["1.0", "2.0", "3.0"]


def test_the_sidecar_is_current_after_every_batch(tmp_path):
    """A run killed between batches leaves an archive that still verifies."""
    path = tmp_path / "keys.jsonl.gz"
    writer = ArchiveWriter(str(path), {"format": 1, "kind": "baileys-dr-keys-archive", "table": "whatsapp_keys", "columns": []})
    writer.write_batch([ROW])
    assert verify_archive(str(path)) == writer.sha256
    writer.write_batch([ROW])
    assert verify_archive(str(path)) == writer.sha256
    writer.close()


def test_an_archive_is_never_overwritten(tmp_path):
    path = tmp_path / "keys.jsonl.gz"
    write_archive(path, [[ROW]])
    with pytest.raises(FileExistsError):
        write_archive(path, [[ROW]])


def test_a_tampered_archive_or_sidecar_is_refused(tmp_path):
    path = tmp_path / "keys.jsonl.gz"
    write_archive(path, [[ROW]])
    with open(path, "ab") as fh:
        fh.write(gzip.compress(b"{}\n"))
    with pytest.raises(CleanupError, match="does not match its sidecar"):
        verify_archive(str(path))
    with open(str(path) + ".sha256", "w") as fh:
        fh.write("%s  other.jsonl.gz\n" % ("0" * 64))
    with pytest.raises(CleanupError, match="names 'other.jsonl.gz'"):
        read_sidecar(str(path))


def test_a_file_that_is_not_a_keys_archive_is_refused(tmp_path):
    path = tmp_path / "x.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"kind": "baileys-dr-sessions-archive", "format": 1}\n'))
    with pytest.raises(CleanupError, match="not a baileys-dr keys archive"):
        list(iter_archive(str(path)))


@pytest.mark.parametrize("line", ["not json", "[1]", '{"company_id": "a", "key_type": "session"}', '{"company_id": 1, "key_type": "s", "key_id": "x"}'])
def test_rows_without_a_primary_key_are_refused_with_their_line(line):
    with pytest.raises(CleanupError, match="a.gz line 7"):
        parse_row("a.gz", 7, line)


# -- module arguments ------------------------------------------------------------------------------


def test_bad_retention_is_refused_before_connecting():
    ok, result = run_module(baileys_keys_cleanup, dict(NO_DB, archive_dir="/tmp/x", retention={"sesion": 30}))
    assert not ok and "'sesion'" in result["msg"] and "connect" not in result["msg"]


@pytest.mark.parametrize("args,message", [
    ({"mode": "restore"}, "archive"),
    ({"archive_dir": "/tmp/x", "batch_size": 0}, "batch_size"),
    ({"archive_dir": "/tmp/x", "max_delete_share": 1.5}, "max_delete_share"),
    ({"archive_dir": "/tmp/x", "max_delete": -1}, "max_delete"),
    ({}, "archive_dir"),
])
def test_invalid_arguments_are_named(args, message):
    ok, result = run_module(baileys_keys_cleanup, dict(NO_DB, **args))
    assert not ok and message in result["msg"]


def test_connection_errors_never_show_the_password():
    ok, result = run_module(baileys_keys_cleanup, dict(NO_DB, archive_dir="/tmp/x", login_password="s3cr3t-pw"))
    assert not ok and "cannot connect" in result["msg"] and "s3cr3t-pw" not in json.dumps(result)


# -- Baileys' tctoken rules ----------------------------------------------------------------------


def test_tctoken_cutoff_is_the_start_of_the_oldest_of_four_weekly_buckets():
    from ansible.module_utils.baileys_dr_codec import TC_TOKEN_BUCKET_SECONDS as WEEK, tctoken_cutoff

    # isTcTokenExpired: (floor(now / 604800) - 3) * 604800, so the valid window is 21 to 28 days.
    assert tctoken_cutoff(10 * WEEK) == 7 * WEEK
    assert tctoken_cutoff(11 * WEEK - 1) == 7 * WEEK
    assert tctoken_cutoff(11 * WEEK) == 8 * WEEK
