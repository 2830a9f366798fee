"""Failover with PostgreSQL down: the standby copy becomes the live tree and the service runs on it."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "shared"))

from verify_helpers import SESSIONS, STATE_FILE, manifest, readiness  # noqa: E402

testinfra_hosts = ["ansible://baileys-dr-app"]


def test_postgresql_is_really_down(host):
    assert host.run("pg_isready -h baileys-dr-db -p 5432").rc != 0


def test_service_is_ready_on_the_promoted_standby_with_its_manifest_digests(host):
    status, report = readiness(host)
    assert status == 200, report["errors"]
    assert report["store"] == "files"
    assert report["companies"] == 4
    assert report["digests"] == {c: v["digest"] for c, v in manifest(host)["companies"].items()}


def test_standby_was_moved_not_copied(host):
    assert not host.file(SESSIONS + ".standby").exists
    assert json.loads(host.file(STATE_FILE).content_string)["source"] == "standby"
