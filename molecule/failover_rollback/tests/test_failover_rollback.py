"""After a failed failover the service runs exactly as before, on PostgreSQL, on main."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "shared"))

from verify_helpers import APP_ROOT, SESSIONS, database_digests, env_values, git_commit_of, git_head, readiness  # noqa: E402

testinfra_hosts = ["ansible://baileys-dr-app"]


def test_service_is_back_on_postgresql_with_the_databases_digests(host):
    status, report = readiness(host)
    assert status == 200, report["errors"]
    assert report["store"] == "postgres"
    assert report["digests"] == database_digests()


def test_git_is_back_on_main(host):
    assert git_head(host) == git_commit_of(host, "main")
    assert host.run("su baileys -c 'git -C %s symbolic-ref --short HEAD'" % APP_ROOT).stdout.strip() == "main"


def test_env_has_its_values_from_before(host):
    values = env_values(host)
    assert values["USE_LEGACY_SUPABASE"] == "false"
    assert values["USE_DATABASE_AUTH_STATE"] == "true"
    assert values["USE_REPOSITORY_PATTERN"] == "true"


def test_the_exported_tree_was_moved_aside_not_deleted(host):
    assert not host.file(SESSIONS).exists
    assert host.run("ls -d %s.failed-*" % SESSIONS).rc == 0


def test_the_rollback_is_audited(host):
    records = [json.loads(line) for line in host.file("/var/log/baileys-dr/audit.jsonl").content_string.splitlines()]
    assert records[-1]["operation"] == "failover" and records[-1]["outcome"] == "rolled_back"
    assert "Restart the service" in records[-1]["details"]["failed_step"]
