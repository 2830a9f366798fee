"""Failback under the writer's traffic: PostgreSQL holds every write the service acknowledged on files, before and
after the switch, and the service runs on it."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "shared"))

from verify_helpers import (  # noqa: E402
    STATE_FILE, assert_no_acknowledged_write_lost, assert_quiet_digests_equal_the_store, assert_writer_saw_the_switch,
    database_digests, db_params, env_values, git_commit_of, git_head, import_module_utils, writer_ledger, writer_result,
)

testinfra_hosts = ["ansible://baileys-dr-app"]


def files_state(host):
    return json.loads(host.file("/root/files-state-before-failback.json").content_string)


def rows(sql, *args):
    import_module_utils()
    from ansible.module_utils.baileys_dr_postgres import connect

    conn = connect(db_params())
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()
    finally:
        conn.close()


def test_no_write_acknowledged_on_files_before_or_after_the_switch_is_lost_from_postgresql(host):
    assert_no_acknowledged_write_lost(writer_result(host), "postgres")


def test_the_writer_measured_the_downtime_of_the_switch(host):
    assert_writer_saw_the_switch(writer_result(host))


def test_service_is_ready_on_postgresql_with_the_databases_digests(host):
    assert_quiet_digests_equal_the_store(host, writer_result(host))
    assert database_digests() == writer_result(host)["quiet"]["store"]


def test_keys_created_on_files_are_rows_with_their_original_ids_in_array_form(host):
    written = files_state(host)["simulated"]["written"]
    assert any("::" in k["id"] for k in written)
    # The writer consumes the oldest pre-keys: one it consumed since (acknowledged) is rightly gone.
    consumed = {(d["type"], d["id"]) for r in writer_ledger(host) if r.get("outcome") == "ack" and r["company"] == "company00001"
                for d in r["deleted"]}
    kept = [k for k in written if (k["type"], k["id"]) not in consumed]
    assert kept, "some key created on files outlived the writer: the test has rows to look at"
    buffers = 0
    for key in kept:
        found = rows("SELECT value::text FROM whatsapp_keys WHERE company_id = 'company00001' AND key_type = %s AND key_id = %s",
                     key["type"], key["id"])
        assert found, key
        if '"Buffer"' in found[0][0]:
            buffers += 1
            assert '"data": [' in found[0][0] and '"data": "' not in found[0][0], (key, found[0][0][:200])
    # The form is checked on real Buffers: at least one imported key holds one (every Signal key pair does).
    assert buffers > 0, "no imported key holds a Buffer: the array form was not checked"


def test_pre_keys_consumed_on_files_are_gone(host):
    deleted = files_state(host)["simulated"]["deleted"]
    # The situation exists: the service consumed a pre-key on files (converge asked /simulate for one).
    assert [k for k in deleted if k["type"] == "pre-key"], deleted
    for key in deleted:
        assert not rows("SELECT 1 FROM whatsapp_keys WHERE company_id = 'company00001' AND key_type = %s AND key_id = %s",
                        key["type"], key["id"])


def test_git_and_env_are_back_as_before_the_failover(host):
    assert git_head(host) == git_commit_of(host, "main")
    values = env_values(host)
    assert values["USE_DATABASE_AUTH_STATE"] == "true" and values["USE_REPOSITORY_PATTERN"] == "true"
    assert values["USE_LEGACY_SUPABASE"] == "false"


def test_failover_state_is_retired_and_undo_files_kept(host):
    assert not host.file(STATE_FILE).exists
    assert host.run("ls /var/lib/baileys-dr/failover-state.failed-back-*.json").rc == 0
    assert host.run("ls /var/lib/baileys-dr/undo/").stdout.strip() != ""
    records = [json.loads(line) for line in host.file("/var/log/baileys-dr/audit.jsonl").content_string.splitlines()]
    assert [r["operation"] for r in records if r["outcome"] == "ok"][-1] == "failback"


FAILBACK = (("operation", "failback"),)


def prom_samples(host, path):
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(host.file(path).content_string) for s in family.samples}


def test_metrics_count_the_keys_the_failback_imported_and_deleted(host):
    path = "/var/lib/baileys-dr/metrics/baileys_dr_failback.prom"
    assert host.file(path).mode == 0o644
    samples = prom_samples(host, path)
    simulated = files_state(host)["simulated"]
    assert samples[("baileys_dr_last_success_timestamp_seconds", FAILBACK)] > 1.7e9
    # New keys and the changed creds were written; the pre-keys consumed on files (by this request and the writer's)
    # deleted. The idempotence run imports nothing.
    assert samples[("baileys_dr_keys_imported_total", FAILBACK)] >= len(simulated["written"])
    assert samples[("baileys_dr_keys_deleted_total", FAILBACK)] >= len(simulated["deleted"])
    assert samples[("baileys_dr_runs_total", FAILBACK + (("outcome", "ok"),))] == 2
    # The failover of the same converge left its own file.
    assert host.file("/var/lib/baileys-dr/metrics/baileys_dr_failover.prom").exists


def test_audit_records_say_what_the_failback_did_without_secrets(host):
    audit = host.file("/var/log/baileys-dr/audit.jsonl")
    assert audit.mode == 0o600
    records = [json.loads(line) for line in audit.content_string.splitlines()]
    failback = [r for r in records if r["operation"] == "failback" and r["event"] == "run"]
    assert [r["outcome"] for r in failback] == ["ok", "ok"]
    assert failback[0]["details"]["figures"]["keys_imported"] >= len(files_state(host)["simulated"]["written"])
    assert failback[1]["details"]["nothing_to_do"] in (True, "True")
    password = os.environ.get("BAILEYS_DR_MOLECULE_DB_PASSWORD") or "molecule-only-db-password"
    assert password not in audit.content_string
