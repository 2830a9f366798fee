"""baileys_auth_import with its companies shared among worker processes (each with its own connection, one
transaction per company), against the throwaway PostgreSQL cluster."""

from __future__ import annotations

import os
import threading
import time

import pytest

import baileys_auth_export
import baileys_auth_import
from faults_helpers import full_rows, refuse_worker_connections, wait_until
from module_harness import run_module
from test_export import worker_processes
from test_import import database_digests as digests
from test_import import failback, sessions, undo_dir  # noqa: F401 - the import tests' fixtures

from ansible.module_utils import baileys_dr_codec as codec
from ansible.module_utils import baileys_dr_testdata as testdata
from ansible.module_utils.baileys_dr_tree import file_content

COMPANIES = ["company%05d" % n for n in range(1, 6)]


@pytest.fixture
def workers(monkeypatch):
    """workers(n): an import of 2 companies or more uses n worker processes (the real threshold is 20,000 keys); n=0
    imports in the module's own process."""
    from ansible.module_utils import baileys_dr_failback as engine

    def use(count):
        monkeypatch.setattr(engine, "PARALLEL_MIN_KEYS", 0 if count else 10 ** 12)
        monkeypatch.setattr(engine, "export_workers", lambda: max(count, 1))
    return use


@pytest.fixture
def changed_tree(db, db_params, sessions):
    """Five companies exported, then changed on files the way Baileys does (a new key, a rewritten session, a consumed
    pre-key, creds rewritten), so that a failback inserts, updates and deletes in every company."""
    testdata.load(db, "workers", len(COMPANIES), 40)
    ok, result = run_module(baileys_auth_export, dict(db_params, dest=str(sessions), keep_backup=False))
    assert ok, result.get("msg")
    for company in COMPANIES:
        directory = sessions / ("company_" + company)
        names = sorted(os.listdir(directory))
        (directory / codec.key_file_name("pre-key", "900001")).write_bytes(file_content({"private": {"type": "Buffer", "data": "AQ=="}}))
        os.unlink(directory / next(n for n in names if n.startswith("pre-key-")))
        (directory / next(n for n in names if n.startswith("session-"))).write_bytes(file_content({"_sessions": {}, "version": company}))
    return result


def rows(db):
    """What a failback decides of the rows: every key and creds value (timestamps left out: they are the run's time)."""
    found = full_rows(db)
    return {"keys": [r[:4] for r in found["keys"]], "auth": [r[:2] for r in found["auth"]]}


def counts(result):
    """The per-company outcome without what differs between two runs by nature (undo file names)."""
    return {company: {k: v for k, v in outcome.items() if k != "undo_file"} for company, outcome in result["companies"].items()}


def undo_all(db_params, result):
    ok, undone = run_module(baileys_auth_import, dict(db_params, mode="undo", undo_file=result["undo_files"]))
    assert ok, undone.get("msg")


def test_an_import_in_workers_writes_what_one_process_writes(db, db_params, changed_tree, failback, workers):
    before = rows(db)
    workers(2)
    ok, parallel = failback()
    assert ok and parallel["workers"] == 2, parallel.get("msg")
    after_parallel = rows(db)
    assert after_parallel != before and parallel["committed"] == COMPANIES
    # Undo records written by the workers bring every row back.
    undo_all(db_params, parallel)
    assert rows(db) == before
    workers(0)
    ok, alone = failback()
    assert ok and alone["workers"] == 0, alone.get("msg")
    assert rows(db) == after_parallel
    assert counts(parallel) == counts(alone) and parallel["totals"] == alone["totals"]
    assert parallel["totals"]["inserted"] == len(COMPANIES) and parallel["totals"]["deleted"] == len(COMPANIES)
    assert parallel["digests"] == alone["digests"] == digests(db)
    assert set(parallel["queries"]) == set(alone["queries"])


def test_a_company_failing_in_a_worker_stops_the_run_and_leaves_every_company_committed_or_untouched(
        db, changed_tree, failback, workers, undo_dir, monkeypatch):
    """continue_on_error=false (the default): the first failed company stops the run; companies committed stay committed
    and are listed in committed (those another worker was writing at that moment finish), the others are not attempted.
    Each company is either entirely the files or entirely as it was."""
    before = rows(db)
    before_digests = digests(db)
    workers(2)
    # The first company's worker waits inside its transaction while the other worker fails the second company.
    monkeypatch.setenv("BAILEYS_DR_TEST_PAUSE_AT", "import_company:1")
    monkeypatch.setenv("BAILEYS_DR_TEST_PAUSE_SECONDS", "2")
    monkeypatch.setenv("BAILEYS_DR_TEST_FAIL_AT", "import_company:2")
    ok, result = failback()
    assert not ok and "company00002" in result["msg"] and "import_company:2" in result["msg"], result.get("msg")
    outcomes = result["companies"]
    assert outcomes["company00002"]["status"] == "failed" and result["failed_companies"] == ["company00002"]
    assert result["committed"] == ["company00001"], "the company in flight in the other worker finishes"
    assert result["not_attempted"] == COMPANIES[2:], "a failure stops the handing out of companies"
    now = digests(db)
    for company in COMPANIES:
        if company in result["committed"]:
            # The digest the module computed from the files, proven on the rows before the COMMIT.
            assert now[company] == result["digests"][company] and outcomes[company]["undo_file"], company
        else:
            assert now[company] == before_digests[company] and not outcomes[company]["undo_file"], company
    assert sorted(os.path.basename(p) for p in result["undo_files"]) == sorted(
        n for n in os.listdir(undo_dir) if n.endswith(".jsonl.gz")), "no undo file of a company that did not commit"
    assert rows(db) != before


def test_continue_on_error_imports_every_other_company_in_workers(db, changed_tree, failback, workers, monkeypatch):
    before_digests = digests(db)
    workers(2)
    monkeypatch.setenv("BAILEYS_DR_TEST_FAIL_AT", "import_company:3")
    ok, result = failback(continue_on_error=True)
    assert not ok and "company00003" in result["msg"], result.get("msg")
    assert result["committed"] == [c for c in COMPANIES if c != "company00003"] and result["not_attempted"] == []
    now = digests(db)
    assert now["company00003"] == before_digests["company00003"]
    assert all(now[c] == result["digests"][c] for c in result["committed"])


def test_a_worker_without_a_connection_leaves_the_import_to_the_module(db, changed_tree, failback, workers, monkeypatch):
    """A server at max_connections: the workers cannot connect, the module imports alone."""
    workers(2)
    refuse_worker_connections(monkeypatch, baileys_auth_import)
    ok, result = failback()
    assert ok and result["workers"] == 0 and result["committed"] == COMPANIES, result.get("msg")


def sleeping_worker():
    """The worker paused by the test hook (in time.sleep), the other one waiting on its pipe for a company."""
    for pid in worker_processes():
        try:
            with open("/proc/%d/wchan" % pid) as fh:
                if "nanosleep" in fh.read():
                    return pid
        except OSError:
            continue
    return None


def test_a_killed_worker_fails_its_company_only_and_nothing_of_it_is_committed(db, changed_tree, failback, workers, undo_dir,
                                                                            monkeypatch):
    """A worker killed inside a company's transaction: the server rolls the transaction back with its connection, the
    company is failed with a message saying so, the companies the other worker wrote are committed."""
    before_digests = digests(db)
    workers(2)
    monkeypatch.setenv("BAILEYS_DR_TEST_PAUSE_AT", "import_company:2")
    monkeypatch.setenv("BAILEYS_DR_TEST_PAUSE_SECONDS", "60")
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(result=failback()))
    runner.start()
    others = [c for c in COMPANIES if c != "company00002"]
    wait_until(lambda: all(d != before_digests[c] for c, d in digests(db).items() if c in others), timeout=60,
               what="every other company committed by the other worker")
    os.kill(wait_until(sleeping_worker, what="the worker paused inside company00002's transaction"), 9)
    runner.join(60)
    assert not runner.is_alive(), "the module noticed the killed worker"
    ok, result = outcome["result"]
    assert not ok and "company00002" in result["msg"] and "import worker" in result["msg"], result.get("msg")
    assert "nothing of it was committed" in result["msg"], "the server said its transaction aborted"
    assert result["committed"] == others and result["failed_companies"] == ["company00002"]
    assert not [n for n in os.listdir(undo_dir) if "company00002" in n], "the undo file of the aborted transaction is removed"
    assert wait_until(lambda: digests(db)["company00002"] == before_digests["company00002"],
                      what="company00002 rolled back by the server"), "nothing of the killed worker's company committed"
    assert worker_processes() == []


def test_a_bulk_pass_in_workers_records_every_company_and_the_delta_pass_proves_them(db, changed_tree, failback, workers,
                                                                                     sessions, tmp_path):
    """The pass record's entries come back from the workers: the delta pass, in workers too, proves every company
    unchanged without reading it, and a company changed since is imported again."""
    past = time.time_ns() - 60 * 10 ** 9
    for company in COMPANIES:  # no listing within the racy window of a write
        directory = sessions / ("company_" + company)
        for name in os.listdir(directory):
            os.utime(directory / name, ns=(past, past))
    workers(2)
    record = tmp_path / "failback-bulk.json"
    ok, bulk = failback(changed_during_read="defer", pass_record=str(record))
    assert ok and bulk["workers"] == 2 and bulk["committed"] == COMPANIES, bulk.get("msg")
    (sessions / "company_company00004" / codec.key_file_name("pre-key", "900002")).write_bytes(
        file_content({"private": {"type": "Buffer", "data": "Ag=="}}))
    ok, delta = failback(delta_from=str(record))
    assert ok, delta.get("msg")
    assert {c: o["status"] for c, o in delta["companies"].items()} == dict(
        {c: "unchanged_proven" for c in COMPANIES}, company00004="imported")
    assert delta["companies"]["company00004"]["inserted"] == 1 and delta["digests"]["company00004"] == digests(db)["company00004"]


def test_check_mode_in_workers_reports_what_one_process_reports_and_writes_nothing(db, changed_tree, failback, workers):
    before = rows(db)
    workers(2)
    ok, parallel = failback(check_mode=True)
    assert ok and parallel["workers"] == 2 and rows(db) == before, parallel.get("msg")
    workers(0)
    ok, alone = failback(check_mode=True)
    assert ok and alone["workers"] == 0, alone.get("msg")
    assert counts(parallel) == counts(alone) and parallel["digests"] == alone["digests"]
    assert {o["status"] for o in parallel["companies"].values()} == {"would_change"}
