"""The container test bed: the application runs from PostgreSQL and holds exactly its state."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "shared"))

from verify_helpers import database_digests, pm2_process, readiness  # noqa: E402

testinfra_hosts = ["ansible://baileys-dr-app"]


def test_application_is_online_under_the_app_users_pm2(host):
    process = pm2_process(host)
    assert process is not None, "baileys-whatsapp-service is not in the PM2 list of user baileys"
    assert process["pm2_env"]["status"] == "online"


def test_application_is_ready_in_database_mode(host):
    status, report = readiness(host)
    assert status == 200, report
    assert report["ready"] is True
    assert report["store"] == "postgres"
    assert report["errors"] == []


def test_readiness_digests_equal_the_database_digests(host):
    _, report = readiness(host)
    expected = database_digests()
    assert len(expected) == 4
    assert report["digests"] == expected


def test_env_file_is_private_to_the_app_user(host):
    env = host.file("/srv/baileys-app/.env")
    assert env.user == "baileys"
    assert env.mode == 0o600


def test_application_runs_main_with_the_emergency_tag_available(host):
    git = "su baileys -c 'git -C /srv/baileys-app %s'"
    assert host.run(git % "rev-parse --abbrev-ref HEAD").stdout.strip() == "main"
    assert host.run(git % "cat-file -t emergency-file-fallback-v1").stdout.strip() == "tag"
