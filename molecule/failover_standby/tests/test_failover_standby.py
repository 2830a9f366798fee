"""Failover with PostgreSQL down, under the writer's traffic: the standby copy, refreshed with the writer paused right
before PostgreSQL stopped, becomes the live tree; the service runs on it and no acknowledged write is lost."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "shared"))

from verify_helpers import (  # noqa: E402
    SESSIONS, STATE_FILE, assert_no_acknowledged_write_lost, assert_writer_saw_the_switch, db_params, readiness,
    writer_result,
)

testinfra_hosts = ["ansible://baileys-dr-app"]


def test_postgresql_is_really_down(host):
    # pg_isready exits 2 when the server does not answer; a missing command (127) or a bad option (3) proves nothing.
    assert host.exists("pg_isready")
    assert host.run("pg_isready -h baileys-dr-db -p 5432").rc == 2
    # And a real client cannot connect from the control node (a connection error, not a query's).
    import psycopg2

    params = db_params()
    with pytest.raises(psycopg2.OperationalError, match="(?i)connect|refused|server"):
        psycopg2.connect(host=params["login_host"], port=params["login_port"], user=params["login_user"],
                         dbname=params["login_db"], password=params.get("login_password"), connect_timeout=5).close()


def test_no_write_acknowledged_on_postgresql_or_on_files_is_lost(host):
    # The writes PostgreSQL acknowledged before the pause reached the files through the standby copy; those after the
    # switch were written on files.
    assert_no_acknowledged_write_lost(writer_result(host), "files")


def test_the_writer_measured_the_outage_until_the_service_ran_on_files(host):
    result = writer_result(host)
    assert_writer_saw_the_switch(result)
    # Its second run began with PostgreSQL down: nothing was acknowledged until the service ran on files.
    assert result["stats"]["window"]["downtime"]["head_seconds"] > 0


# converge.yml: the writer's run after PostgreSQL stopped writes to these two companies only.
WRITTEN_AFTER_THE_STOP = {"company00001", "company00002"}


def ledger_runs_and_requests(host):
    """(the writer's runs, oldest first; its request records), from the ledger converge kept."""
    runs, requests = [], []
    for line in host.file("/var/lib/baileys-dr/reports/molecule-writer.jsonl").content_string.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        (runs if record.get("kind") == "run" else requests if record.get("kind") == "request" else []).append(record)
    return runs, requests


def test_the_store_holds_what_postgresql_held_at_the_stop_for_each_company_not_written_since(host):
    # Digests baileys_state_digest took from PostgreSQL after the last refresh, with the writer paused, before the stop.
    at_stop = json.loads(host.file("/root/molecule-db-digests-at-stop.json").content_string)
    assert len(at_stop) == 4
    # The situation: the writer's run since the stop wrote to two companies only, and was acknowledged on files.
    runs, requests = ledger_runs_and_requests(host)
    since_stop = runs[-1]
    assert set(since_stop["companies"]) == WRITTEN_AFTER_THE_STOP
    mine = [r for r in requests if r["run"] == since_stop["run"]]
    assert {r["company"] for r in mine} == WRITTEN_AFTER_THE_STOP
    assert {r["company"] for r in mine if r["outcome"] == "ack"} == WRITTEN_AFTER_THE_STOP
    # The store after the failover as the service read it (real Baileys on the files) at the quiet moment after the
    # writer stopped: the untouched companies exactly as PostgreSQL held them, the written ones changed since.
    service = writer_result(host)["quiet"]["service"]
    untouched = set(at_stop) - WRITTEN_AFTER_THE_STOP
    assert {c: service[c] for c in untouched} == {c: at_stop[c] for c in untouched}
    assert all(service[c] != at_stop[c] for c in WRITTEN_AFTER_THE_STOP)
    # And now (after the idempotence run), as the service reads them again.
    status, report = readiness(host)
    assert status == 200, report["errors"]
    assert {c: report["digests"][c] for c in untouched} == {c: at_stop[c] for c in untouched}


def test_service_is_ready_on_the_promoted_standby_with_the_digests_it_had_when_the_writer_stopped(host):
    status, report = readiness(host)
    assert status == 200, report["errors"]
    assert report["store"] == "files"
    assert report["companies"] == 4
    assert report["digests"] == writer_result(host)["quiet"]["service"]


def test_standby_was_moved_not_copied(host):
    assert not host.file(SESSIONS + ".standby").exists
    assert json.loads(host.file(STATE_FILE).content_string)["source"] == "standby"
