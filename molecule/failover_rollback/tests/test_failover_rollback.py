"""After a failover whose code never became ready on files, the switch module rolled back: the service runs as
before, on PostgreSQL (which answered), on main, with every write the writer had acknowledged."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "shared"))

from verify_helpers import (  # noqa: E402
    APP_ROOT, SESSIONS, assert_no_acknowledged_write_lost, assert_quiet_digests_equal_the_store, assert_writer_saw_the_switch,
    database_digests, env_values, git_commit_of, git_head, pm2_process, readiness, writer_ledger, writer_result,
)

testinfra_hosts = ["ansible://baileys-dr-app"]


def test_no_write_acknowledged_before_the_stop_or_after_the_rollback_is_lost_from_postgresql(host):
    assert_no_acknowledged_write_lost(writer_result(host), "postgres")


def test_the_writer_measured_the_outage_of_the_failed_switch(host):
    assert_writer_saw_the_switch(writer_result(host))


def test_service_is_back_on_postgresql_with_the_databases_digests(host):
    assert_quiet_digests_equal_the_store(host, writer_result(host))
    assert database_digests() == writer_result(host)["quiet"]["store"]


def test_git_is_back_on_main(host):
    assert git_head(host) == git_commit_of(host, "main")
    assert host.run("su baileys -c 'git -C %s symbolic-ref --short HEAD'" % APP_ROOT).stdout.strip() == "main"


def test_env_has_its_values_from_before(host):
    values = env_values(host)
    assert values["USE_LEGACY_SUPABASE"] == "false"
    assert values["USE_DATABASE_AUTH_STATE"] == "true"
    assert values["USE_REPOSITORY_PATTERN"] == "true"


def test_the_promoted_tree_left_the_sessions_directory_and_is_the_standby_copy_again(host):
    # There was no sessions tree before the failover: there is none after the rollback. The broken build wrote nothing
    # into the promoted copy, so it is the standby copy again (not deleted, not set aside).
    assert not host.file(SESSIONS).exists
    assert host.file(SESSIONS + ".standby/.baileys-dr/manifest.json").exists
    assert host.run("ls -d %s.failed-*" % SESSIONS).rc != 0


# converge.yml: the writer writes to these two companies only, so the other two never change during the scenario.
WRITTEN = {"company00001", "company00002"}


def test_the_tree_the_rollback_left_holds_what_postgresql_held_at_the_stop(host):
    # The tree as an import reads it (converge, check mode), not as its manifest says.
    tree = json.loads(host.file("/root/molecule-rollback-tree-digests.json").content_string)
    database = database_digests()
    assert set(tree) == set(database) and len(tree) == 4
    # The situation: the writer wrote to two companies only, and was acknowledged again after the rollback.
    writer_requests = writer_ledger(host)
    assert {r["company"] for r in writer_requests} == WRITTEN
    assert writer_result(host)["stats"]["after_start"]["acknowledged"] > 0
    untouched = set(tree) - WRITTEN
    # Nothing wrote to those since the stop: PostgreSQL still holds what it held then, and so must the tree.
    assert {c: tree[c] for c in untouched} == {c: database[c] for c in untouched}
    # The written ones: PostgreSQL took writes after the rollback, which the tree (made at the stop) does not hold.
    assert all(tree[c] != database[c] for c in WRITTEN)
    # And the tree is whole as the failover's copy recorded it (no file lost, added or changed by the rollback).
    standby_manifest = json.loads(host.file(SESSIONS + ".standby/.baileys-dr/manifest.json").content_string)
    assert {c: v["digest"] for c, v in standby_manifest["companies"].items()} == tree


def test_service_is_online_and_ready_on_postgresql(host):
    process = pm2_process(host)
    assert process and process["pm2_env"]["status"] == "online"
    status, report = readiness(host)
    assert status == 200 and report["ready"], report["errors"]
    assert report["store"] == "postgres"
    assert report["digests"] == database_digests()


def test_the_rollback_is_audited(host):
    records = [json.loads(line) for line in host.file("/var/log/baileys-dr/audit.jsonl").content_string.splitlines()]
    assert records[-1]["operation"] == "failover" and records[-1]["outcome"] == "rolled_back"
    assert records[-1]["details"]["failed_step"] == "start"
