"""A failover of one application host among several sharing one PostgreSQL (issue 18): the switch's proof compares
only the host's companies with the stopped database, since the other hosts' companies keep changing meanwhile.
Against the throwaway cluster; no service, no PM2 (the proof step of baileys_store_switch alone, a few seconds)."""

from __future__ import annotations

import pytest

import baileys_auth_export
from module_harness import run_module

from ansible.module_utils import baileys_dr_testdata as testdata
from ansible.module_utils.baileys_dr_auth_export import auth_export_argument_spec
from ansible.module_utils.baileys_dr_switch_failover import FailoverSwitch
from ansible.module_utils.baileys_dr_switch_parts import SwitchError, engine_params

MINE = ["company00001", "company00002"]


class Switch:
    """What FailoverSwitch reads of its StoreSwitch: params and the result it fills."""

    def __init__(self, standby_dir, companies):
        self.params = {"standby_dir": standby_dir, "companies": companies}
        self.result = {}


def prove(db_params, standby_dir, companies):
    params = engine_params(auth_export_argument_spec(), mode="standby", dest=standby_dir, companies=companies, **db_params)
    switch = Switch(standby_dir, companies)
    FailoverSwitch(switch)._prove_equal_to_database(params)
    return switch.result["proof"]


def test_the_proof_of_a_hosts_copy_ignores_the_other_hosts_companies_that_keep_changing(db, db_params, tmp_path):
    testdata.load(db, "fleet", 3, 20)
    standby = str(tmp_path / "baileys_sessions.standby")
    ok, result = run_module(baileys_auth_export, dict(db_params, mode="standby", dest=standby, companies=MINE))
    assert ok and result["companies"] == 2, result
    # Another host's company changes after this host's copy (its service still runs).
    with db.cursor() as cur:
        cur.execute("UPDATE whatsapp_keys SET value = value WHERE company_id = 'company00003'")
    db.commit()

    proof = prove(db_params, standby, MINE)
    assert proof["companies"] == 2 and sorted(proof["digests"]) == MINE

    # Unscoped, the same copy is refused: the other company is missing from it.
    with pytest.raises(SwitchError, match="company00003"):
        prove(db_params, standby, None)


def test_a_change_to_one_of_the_hosts_own_companies_after_its_copy_is_still_refused(db, db_params, tmp_path):
    testdata.load(db, "fleet", 3, 20)
    standby = str(tmp_path / "baileys_sessions.standby")
    ok, result = run_module(baileys_auth_export, dict(db_params, mode="standby", dest=standby, companies=MINE))
    assert ok, result
    with db.cursor() as cur:
        cur.execute("UPDATE whatsapp_keys SET value = value WHERE company_id = 'company00002'")
    db.commit()
    with pytest.raises(SwitchError, match="company00002"):
        prove(db_params, standby, MINE)
