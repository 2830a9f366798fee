"""One import per database, or per company for a fleet's host (issue 18): the hosts of a fleet sharing one PostgreSQL
fail back at once, each importing its own companies, while an import of the same company, of every company, or an undo
is still refused. Cheap: in-process module runs on three small companies of the throwaway cluster."""

from __future__ import annotations

import contextlib

from test_import import exported, export, failback, sessions, undo_dir  # noqa: F401 - fixtures

from ansible.module_utils.baileys_dr_failback_db import Database
from ansible.module_utils.baileys_dr_postgres import connect


@contextlib.contextmanager
def another_import(db_params, lock):
    """A session holding the locks another import would (lock: True for every company, or its companies)."""
    held = Database(lambda: connect(db_params), []).open(lock=lock)
    try:
        yield held
    finally:
        held.close()


def test_an_import_of_a_hosts_companies_runs_beside_another_hosts_import_and_is_refused_on_a_company_it_holds(
        db_params, exported, failback):
    with another_import(db_params, ["company00002"]):
        ok, result = failback(companies=["company00001", "company00003"])
        assert ok, result.get("msg")
        ok, result = failback(companies=["company00001", "company00002"])
        assert not ok and "holds the lock of 1 of these companies on this database: company00002" in result["msg"], result
        ok, result = failback()
        assert not ok and "holds its lock on this database" in result["msg"], result
    # The refused run gave back the locks it got: the company it did get is free again.
    with another_import(db_params, ["company00001"]):
        pass


def test_an_import_of_every_company_refuses_an_import_of_listed_companies(db_params, exported, failback):
    with another_import(db_params, True):
        ok, result = failback(companies=["company00001"])
        assert not ok and "an import of every company, or an undo" in result["msg"], result
