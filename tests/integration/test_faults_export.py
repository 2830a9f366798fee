"""Faults during an export (issue 8, points 1-3): the server killed, the server frozen, the disk full.

Each test injects the fault and checks three things: nothing is lost (the
previous tree is byte-for-byte intact, digests equal the database's), the
error names the cause, and a re-run succeeds.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest

import baileys_auth_export
from faults_helpers import (database_digests, execute, freeze, kill_server, listing, scratch, scratch_cluster,  # noqa: F401
                            thaw, tree_digests, wait_until)
from module_harness import run_module

from ansible.module_utils import baileys_dr_testdata as testdata
from ansible.module_utils.baileys_dr_tree import IN_PROGRESS_NAME, META_DIR
from ansible.module_utils.baileys_dr_verify import verify_tree


def export(params, dest, **args):
    return run_module(baileys_auth_export, dict(params, dest=str(dest), **args))


def in_background(function):
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(result=function()))
    worker.start()
    return worker, outcome


def staging_dirs(parent):
    return [name for name in os.listdir(parent) if ".staging-" in name]


# -- 1. PostgreSQL killed during the export ---------------------------------------------------------------------


def test_postgresql_killed_during_a_live_export_leaves_the_previous_tree_and_a_rerun_succeeds(scratch, tmp_path, monkeypatch):
    cluster, params, conn = scratch
    testdata.load(conn, "kill", 3, 40)
    sessions = tmp_path / "app" / "baileys_sessions"
    sessions.parent.mkdir()
    ok, first = export(params, sessions)
    assert ok, first.get("msg")
    before, before_digests = listing(sessions), database_digests(conn)
    execute(conn, "UPDATE whatsapp_keys SET value = '{\"v\": 2}' WHERE key_type = 'session'")
    after_change = database_digests(conn)
    conn.close()

    monkeypatch.setenv("BAILEYS_DR_TEST_PAUSE_AT", "after_company:1")
    monkeypatch.setenv("BAILEYS_DR_TEST_PAUSE_SECONDS", "4")
    worker, outcome = in_background(lambda: export(params, sessions))
    # The export has written its first company into a staging directory beside the live tree.
    wait_until(lambda: any(os.path.isdir(os.path.join(sessions.parent, s, "company_company00001"))
                           for s in staging_dirs(sessions.parent)), what="the first company in staging")
    kill_server(cluster)
    worker.join(60)
    ok, result = outcome["result"]

    assert not ok
    assert "server closed the connection" in result["msg"] and "127.0.0.1:%d/baileys" % cluster.port in result["msg"], result["msg"]
    assert params["login_password"] not in result["msg"]
    assert listing(sessions) == before, "the live tree is untouched"
    assert tree_digests(sessions) == before_digests
    assert staging_dirs(sessions.parent) == [], "no partial directory is left visible"
    assert sorted(os.listdir(sessions.parent)) == ["baileys_sessions"]

    monkeypatch.delenv("BAILEYS_DR_TEST_PAUSE_AT")
    cluster.start(cluster.password)
    cluster.wait_ready()
    ok, rerun = export(params, sessions, keep_backup=False)
    assert ok and rerun["changed"], rerun.get("msg")
    assert rerun["digests"] == after_change == tree_digests(sessions)


def test_postgresql_killed_during_a_standby_refresh_keeps_the_snapshots_and_the_next_refresh_repairs(scratch, tmp_path, monkeypatch):
    cluster, params, conn = scratch
    testdata.load(conn, "killsb", 3, 40)
    standby, archives = tmp_path / "app" / "baileys_sessions.standby", tmp_path / "archives"
    standby.parent.mkdir()
    archives.mkdir()
    ok, first = export(params, standby, mode="standby", archive_dir=str(archives))
    assert ok and first["archive"], first.get("msg")
    snapshots = listing(archives)
    execute(conn, "UPDATE whatsapp_keys SET value = '{\"v\": 3}' WHERE key_type = 'pre-key'")
    expected = database_digests(conn)
    conn.close()

    monkeypatch.setenv("BAILEYS_DR_TEST_PAUSE_AT", "after_company:1")
    monkeypatch.setenv("BAILEYS_DR_TEST_PAUSE_SECONDS", "4")
    worker, outcome = in_background(lambda: export(params, standby, mode="standby", archive_dir=str(archives)))
    wait_until(lambda: os.path.exists(standby / META_DIR / IN_PROGRESS_NAME), what="the refresh to start changing the tree")
    kill_server(cluster)
    worker.join(60)
    ok, result = outcome["result"]

    assert not ok and ("server closed the connection" in result["msg"] or "terminat" in result["msg"]), result.get("msg")
    assert listing(archives) == snapshots, "the generation archives (the snapshots) are untouched"
    checked = verify_tree(str(standby))
    assert not checked["verified"] and any(IN_PROGRESS_NAME in p for p in checked["problems"]), \
        "a half-refreshed standby is never taken for a finished generation"

    monkeypatch.delenv("BAILEYS_DR_TEST_PAUSE_AT")
    cluster.start(cluster.password)
    cluster.wait_ready()
    ok, rerun = export(params, standby, mode="standby", archive_dir=str(archives), archive_every=0)
    assert ok and rerun["previous_refresh_interrupted"], rerun.get("msg")
    assert rerun["digests"] == expected == tree_digests(standby)
    assert not os.path.exists(standby / META_DIR / IN_PROGRESS_NAME)


# -- 2. PostgreSQL frozen (what `docker pause` does) --------------------------------------------------------------


def test_a_frozen_server_fails_the_connection_within_connect_timeout(scratch, tmp_path):
    cluster, params, conn = scratch
    testdata.load(conn, "frozen", 1, 10)
    sessions = tmp_path / "baileys_sessions"
    ok, _ = export(params, sessions)
    before = listing(sessions)
    execute(conn, "UPDATE whatsapp_keys SET value = '{}' WHERE key_type = 'session'")
    conn.close()
    freeze(cluster)
    try:
        started = time.monotonic()
        ok, result = export(params, sessions, connect_timeout=2)
        elapsed = time.monotonic() - started
    finally:
        thaw(cluster)
    assert not ok
    assert "cannot connect to PostgreSQL at 127.0.0.1:%d/baileys" % cluster.port in result["msg"], result["msg"]
    assert "timeout expired" in result["msg"], result["msg"]
    assert 1.5 <= elapsed < 2 + 3, "connect_timeout=2 fired after %.1fs" % elapsed
    assert listing(sessions) == before
    ok, rerun = export(params, sessions, connect_timeout=2, keep_backup=False)
    assert ok and rerun["changed"], rerun.get("msg")


def test_a_statement_the_server_cannot_answer_fails_within_statement_timeout(scratch, tmp_path):
    """A table locked by another session (a stuck migration, VACUUM FULL): the read waits; statement_timeout ends it."""
    from ansible.module_utils.baileys_dr_postgres import connect

    cluster, params, conn = scratch
    testdata.load(conn, "stuck", 1, 10)
    sessions = tmp_path / "baileys_sessions"
    ok, _ = export(params, sessions)
    before = listing(sessions)
    blocker = connect(params)
    try:
        with blocker.cursor() as cur:
            cur.execute("LOCK TABLE whatsapp_keys IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        ok, result = export(params, sessions, statement_timeout=1500, force=True)
        elapsed = time.monotonic() - started
    finally:
        blocker.rollback()
        blocker.close()
    assert not ok
    assert "statement timeout" in result["msg"], result["msg"]
    assert elapsed < 1.5 + 3, "statement_timeout=1500 fired after %.1fs" % elapsed
    assert listing(sessions) == before and staging_dirs(tmp_path) == []
    ok, rerun = export(params, sessions, statement_timeout=1500, force=True, keep_backup=False)
    assert ok and rerun["changed"] and rerun["digests"] == database_digests(conn) == tree_digests(sessions)


def test_a_server_frozen_in_the_middle_of_an_export_fails_within_statement_timeout(scratch, tmp_path, monkeypatch):
    """statement_timeout is enforced by the server, which a frozen one never does: the client-side deadline
    (statement_timeout + connect_timeout without any answer) ends the wait, naming the server."""
    cluster, params, conn = scratch
    testdata.load(conn, "frozenmid", 2, 10)
    conn.close()
    sessions = tmp_path / "baileys_sessions"
    monkeypatch.setenv("BAILEYS_DR_TEST_PAUSE_AT", "after_company:1")
    monkeypatch.setenv("BAILEYS_DR_TEST_PAUSE_SECONDS", "2")
    worker, outcome = in_background(lambda: export(params, sessions, statement_timeout=1500, connect_timeout=2))
    wait_until(lambda: staging_dirs(tmp_path), what="the export to start writing")
    freeze(cluster)
    started = time.monotonic()
    try:
        # The pause (2 s), then one wait of 1.5 + 2 s without an answer, then some slack for a loaded machine.
        worker.join(2 + 1.5 + 2 + 4)
        elapsed = time.monotonic() - started
        frozen_for_good = worker.is_alive()
    finally:
        thaw(cluster)
    worker.join(60)
    assert not frozen_for_good, "the export was still waiting on the frozen server"
    ok, result = outcome["result"]
    assert not ok
    assert "no answer from PostgreSQL at 127.0.0.1:%d/baileys within 3.5 s (server frozen?)" % cluster.port in result["msg"], result["msg"]
    assert params["login_password"] not in result["msg"]
    assert elapsed >= 3.5, "the deadline fired after %.1fs, before statement_timeout + connect_timeout" % elapsed
    assert staging_dirs(tmp_path) == [] and not sessions.exists(), "no partial tree is left"
    ok, rerun = export(params, sessions, statement_timeout=1500, connect_timeout=2)
    assert ok and rerun["changed"], rerun.get("msg")


# -- 3. Disk full during the export -------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs as the application root (the parent of the sessions tree)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_disk_filling_up_during_the_export_fails_saying_so_and_leaves_the_old_tree(scratch, small_disk, monkeypatch):
    cluster, params, conn = scratch
    testdata.load(conn, "full", 2, 40)
    sessions = small_disk / "baileys_sessions"
    ok, first = export(params, sessions)
    assert ok, first.get("msg")
    before, before_digests = listing(sessions), database_digests(conn)
    execute(conn, "UPDATE whatsapp_keys SET value = '{\"v\": 4}' WHERE key_type = 'session'")
    expected = database_digests(conn)
    # The free-space check passes; then another writer (logs, a core dump) fills the disk while the export runs.
    monkeypatch.setenv("BAILEYS_DR_TEST_PAUSE_AT", "after_company:1")
    monkeypatch.setenv("BAILEYS_DR_TEST_PAUSE_SECONDS", "2")
    filler = small_disk / "filler"
    worker, outcome = in_background(lambda: export(params, sessions))
    wait_until(lambda: any(os.path.isdir(os.path.join(small_disk, s, "company_company00001")) for s in staging_dirs(small_disk)),
               what="the first company in staging")
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
        except OSError:
            pass
    worker.join(60)
    ok, result = outcome["result"]

    assert not ok
    assert "No space left on device" in result["msg"], result["msg"]
    assert listing(sessions) == before and tree_digests(sessions) == before_digests, "the previous files are intact"
    assert staging_dirs(small_disk) == [], "the temporary files are removed"
    assert sorted(os.listdir(small_disk)) == ["baileys_sessions", "filler"]

    os.unlink(filler)
    monkeypatch.delenv("BAILEYS_DR_TEST_PAUSE_AT")
    ok, rerun = export(params, sessions, keep_backup=False)
    assert ok and rerun["changed"], rerun.get("msg")
    assert rerun["digests"] == expected == tree_digests(sessions)
