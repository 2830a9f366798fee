"""Cleanup on the containers: old rebuildable keys gone and archived, protected keys and creds intact."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "shared"))

from verify_helpers import db_params, import_module_utils  # noqa: E402

testinfra_hosts = ["ansible://baileys-dr-app"]
ARCHIVE_DIR = "/var/backups/baileys-dr/keys"
REBUILDABLE = ("session", "sender-key", "sender-key-memory", "device-list", "tctoken")
PROTECTED = ("pre-key", "app-state-sync-key", "app-state-sync-version", "identity-key", "lid-mapping")


def query(sql, args=None):
    import_module_utils()
    from ansible.module_utils.baileys_dr_postgres import connect

    conn = connect(db_params())
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()
    finally:
        conn.close()


def observed(host):
    return json.loads(host.file("/root/cleanup-observed.json").content_string)


def test_no_old_rebuildable_key_is_left_and_every_fresh_one_is():
    rows = query("SELECT count(*) FILTER (WHERE updated_at < now() - interval '30 days'), count(*) FROM whatsapp_keys "
                 "WHERE key_type = ANY(%s)", (list(REBUILDABLE),))
    assert rows[0][0] == 0 and rows[0][1] > 0


def test_protected_keys_and_creds_are_exactly_as_before(host):
    before = observed(host)["observed"]["before"]
    (md5, count), = query("SELECT md5(coalesce(string_agg(to_jsonb(k)::text, E'\\n' ORDER BY company_id, key_type, key_id), '')), "
                          "count(*) FROM whatsapp_keys k WHERE key_type = ANY(%s)", (list(PROTECTED),))
    assert (md5, count) == (before["protected_md5"], before["protected"])
    (auth_md5,), = query("SELECT md5(coalesce(string_agg(to_jsonb(a)::text, E'\\n' ORDER BY company_id), '')) FROM whatsapp_auth a")
    assert auth_md5 == before["auth_md5"]
    assert query("SELECT count(*) FROM whatsapp_keys")[0][0] == before["keys"] - before["candidates"]


def test_every_archive_is_private_and_verifies_against_its_sidecar(host):
    archive_dir = host.file(ARCHIVE_DIR)
    assert archive_dir.is_directory and archive_dir.mode == 0o700
    archives = sorted(a for a in archive_dir.listdir() if a.endswith(".jsonl.gz"))
    assert len(archives) == 2  # the first cleanup and the one after the restore; the idempotence run wrote none
    for name in archives:
        assert host.file("%s/%s" % (ARCHIVE_DIR, name)).mode == 0o600
        assert host.run("cd %s && sha256sum --check --strict %s.sha256" % (ARCHIVE_DIR, name)).rc == 0


def test_the_archive_holds_every_deleted_row_with_all_columns(host):
    first = observed(host)["first_archive"]
    lines = host.run("zcat %s" % first["path"]).stdout.rstrip("\n").split("\n")
    header = json.loads(lines[0])
    assert header["kind"] == "baileys-dr-keys-archive" and header["policy"]["protected_types"] == sorted(PROTECTED)
    rows = [json.loads(line) for line in lines[1:]]
    assert len(rows) == observed(host)["keys_deleted"] == first["rows"]
    assert {r["key_type"] for r in rows} <= set(REBUILDABLE)
    assert set(rows[0]) == {"company_id", "key_type", "key_id", "value", "created_at", "updated_at", "expires_at"}


def test_the_runs_are_in_the_audit_log(host):
    """The cleanup, the cleanup after the restore and the idempotence run; the check-mode run writes nothing."""
    records = [json.loads(line) for line in host.file("/var/log/baileys-dr/audit.jsonl").content_string.splitlines()]
    cleanups = [r for r in records if r["operation"] == "cleanup"]
    assert [r["outcome"] for r in cleanups] == ["ok", "ok", "ok"]
    assert sum(json.loads(cleanups[0]["details"]["deleted_by_type"]).values()) == observed(host)["keys_deleted"]
    assert json.loads(cleanups[-1]["details"]["deleted_by_type"]) == {}
