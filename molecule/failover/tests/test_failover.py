"""Failover with PostgreSQL up, under the writer's traffic: the service runs on Baileys files that hold the stopped
database's state and every write acknowledged before and after the switch."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "shared"))

from verify_helpers import (  # noqa: E402
    SESSIONS, STATE_FILE, TAG, assert_no_acknowledged_write_lost, assert_quiet_digests_equal_the_store,
    assert_writer_saw_the_switch, database_digests, db_params, env_values, git_commit_of, git_head, manifest, pm2_process,
    writer_result,
)

testinfra_hosts = ["ansible://baileys-dr-app"]


def test_no_write_acknowledged_before_or_after_the_switch_is_lost_from_the_files(host):
    assert_no_acknowledged_write_lost(writer_result(host), "files")


def test_the_writer_measured_the_downtime_of_the_switch(host):
    assert_writer_saw_the_switch(writer_result(host))


def test_service_is_ready_on_file_sessions_with_the_digests_of_its_files(host):
    assert_quiet_digests_equal_the_store(host, writer_result(host))


def test_manifest_digests_equal_the_stopped_database(host):
    # The final copy was made from the stopped database, which nothing has written since (the service runs on files).
    assert {c: v["digest"] for c, v in manifest(host)["companies"].items()} == database_digests()


def test_service_runs_the_emergency_tag(host):
    assert git_head(host) == git_commit_of(host, TAG)
    assert pm2_process(host)["pm2_env"]["status"] == "online"


def test_env_selects_the_file_store_and_a_private_backup_was_kept(host):
    values = env_values(host)
    assert values["USE_LEGACY_SUPABASE"] == values["USE_DATABASE_AUTH_STATE"] == values["USE_REPOSITORY_PATTERN"] == "false"
    backups = host.run("find /srv/baileys-app -maxdepth 1 -name '.env*' ! -name .env -printf '%m %f\\n'").stdout.split("\n")
    assert any(line.startswith("600 ") for line in backups if line)


def test_session_files_are_private_to_the_app_user(host):
    # The files the failover wrote are 0600; those the service wrote since (the writer's) have the service's umask,
    # but no other user can reach them: every directory is 0700 and everything belongs to the app user.
    bad = host.run("find %s \\( -type f ! -perm 600 ! -newer %s/.baileys-dr/manifest.json \\) -o \\( -type d ! -perm 700 \\) "
                   "-o ! -user baileys" % (SESSIONS, SESSIONS)).stdout.strip()
    assert bad == ""
    assert host.run("find %s -name 'creds.json' | wc -l" % SESSIONS).stdout.strip() == "4"


def test_state_file_records_what_failback_restores(host):
    state_file = host.file(STATE_FILE)
    assert state_file.mode == 0o600 and state_file.user == "root"
    state = json.loads(state_file.content_string)
    assert state["git"]["ref"] == "main"
    assert state["env"]["USE_DATABASE_AUTH_STATE"] == {"present": True, "value": "true"}
    assert state["source"] == "live"


METRICS = "/var/lib/baileys-dr/metrics/baileys_dr_failover.prom"
FAILOVER = (("operation", "failover"),)


def prom_samples(host, path):
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(host.file(path).content_string) for s in family.samples}


def database_key_count():
    from verify_helpers import import_module_utils

    import_module_utils()
    from ansible.module_utils.baileys_dr_postgres import connect

    conn = connect(db_params())
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM whatsapp_keys")
            return cur.fetchone()[0]
    finally:
        conn.close()


def test_metrics_record_the_successful_failover_for_the_textfile_collector(host):
    prom = host.file(METRICS)
    assert prom.mode == 0o644
    samples = prom_samples(host, METRICS)
    assert samples[("baileys_dr_last_success_timestamp_seconds", FAILOVER)] > 1.7e9
    assert ("baileys_dr_last_failure_timestamp_seconds", FAILOVER) not in samples
    assert samples[("baileys_dr_last_run_duration_seconds", FAILOVER)] > 0
    # The converge exported keys (the role counts the files each pass reports written: the final copy's delta of the
    # writer's keys at least); the idempotence run (already on files) exported none.
    assert 0 < samples[("baileys_dr_keys_exported_total", FAILOVER)] <= database_key_count()
    assert samples[("baileys_dr_last_run_keys_exported", FAILOVER)] == 0
    # The last run found the failover in effect and covered no company.
    assert samples[("baileys_dr_last_run_companies", FAILOVER)] == 0
    # The check-mode run writes no metrics: converge and idempotence are the two runs.
    assert samples[("baileys_dr_runs_total", FAILOVER + (("outcome", "ok"),))] == 2
    assert samples[("baileys_dr_last_run_outcome", FAILOVER + (("outcome", "ok"),))] == 1
    assert samples[("baileys_dr_snapshot_age_seconds", FAILOVER)] >= 0


def test_audit_log_on_the_target_holds_one_private_record_per_real_run(host):
    audit = host.file("/var/log/baileys-dr/audit.jsonl")
    assert audit.mode == 0o600
    records = [json.loads(line) for line in audit.content_string.splitlines()]
    runs = [r for r in records if r["operation"] == "failover" and r["event"] == "run"]
    assert [r["outcome"] for r in runs] == ["ok", "ok"]
    first = runs[0]
    assert first["hosts"] == ["baileys-dr-app"] and first["user"] and first["duration_seconds"] > 0
    assert first["inputs"] == {"source": "live", "tag": TAG}
    assert 0 < first["details"]["figures"]["keys_exported"] <= database_key_count()
    assert first["details"]["figures"]["companies"] == 4
    password = os.environ.get("BAILEYS_DR_MOLECULE_DB_PASSWORD") or "molecule-only-db-password"
    assert password not in audit.content_string
