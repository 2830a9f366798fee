"""Failover with PostgreSQL up: the service runs on Baileys files holding exactly the database's state."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "shared"))

from verify_helpers import (  # noqa: E402
    SESSIONS, STATE_FILE, TAG, database_digests, env_values, git_commit_of, git_head, manifest, pm2_process, readiness,
)

testinfra_hosts = ["ansible://baileys-dr-app"]


def test_service_is_ready_on_file_sessions_with_the_databases_digests(host):
    status, report = readiness(host)
    assert status == 200, report["errors"]
    assert report["store"] == "files"
    assert report["digests"] == database_digests()


def test_manifest_digests_equal_the_database(host):
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
    bad = host.run("find %s \\( -type f ! -perm 600 \\) -o \\( -type d ! -perm 700 \\) -o ! -user baileys" % SESSIONS).stdout.strip()
    assert bad == ""
    assert host.run("find %s -name 'creds.json' | wc -l" % SESSIONS).stdout.strip() == "4"


def test_state_file_records_what_failback_restores(host):
    state_file = host.file(STATE_FILE)
    assert state_file.mode == 0o600 and state_file.user == "root"
    state = json.loads(state_file.content_string)
    assert state["git"]["ref"] == "main"
    assert state["env"]["USE_DATABASE_AUTH_STATE"] == {"present": True, "value": "true"}
    assert state["source"] == "live"
