"""The failover's proof after its final copy (baileys_store_switch, store=files, source=live): the standby copy is proven
equal to the stopped database without a second listing of what did not move, and still catches a file someone else
edited or removed after the bulk pass. Against the throwaway cluster; no service, no PM2 (the final copy and the proof
alone, a few seconds)."""

from __future__ import annotations

import os

import pytest

from faults_helpers import execute

from ansible.module_utils import baileys_dr_drift
from ansible.module_utils import baileys_dr_testdata as testdata
from ansible.module_utils.baileys_dr_postgres import connect, describe_target
from ansible.module_utils.baileys_dr_auth_export import auth_export_argument_spec, export_tree
from ansible.module_utils.baileys_dr_drift import prove_tree, tree_drift
from ansible.module_utils.baileys_dr_switch_failover import FailoverSwitch
from ansible.module_utils.baileys_dr_switch_parts import SwitchError, engine_params, manifest_mtime_ns


class Switch:
    """What FailoverSwitch reads of its StoreSwitch: params and the result it fills."""

    def __init__(self, standby_dir):
        self.params = {"standby_dir": standby_dir, "companies": None}
        self.result = {}


def standby_params(db_params, standby_dir):
    return engine_params(auth_export_argument_spec(), mode="standby", dest=standby_dir, **db_params)


def refresh(params, observe=None):
    return export_tree(params, lambda: connect(params, application_name="test-switch-proof"), describe_target(params), None,
                       False, observe=observe)


def final_copy_and_proof(params, standby_dir):
    """What FailoverSwitch._final_copy does with PostgreSQL up: the refresh, then the proof; returns the proof."""
    proven_ns = manifest_mtime_ns(standby_dir)
    observed = {}
    refresh(params, observed)
    switch = Switch(standby_dir)
    FailoverSwitch(switch)._prove_equal_to_database(params, observed["source"], proven_ns)
    return switch.result["proof"]


@pytest.fixture
def bulk_pass(db, db_params, tmp_path):
    """Three companies in the database and their standby copy as the failover's bulk pass leaves it; then a change the
    final copy has to bring (so that it rewrites the top manifest)."""
    testdata.load(db, "proof", 3, 30)
    standby = str(tmp_path / "baileys_sessions.standby")
    params = standby_params(db_params, standby)
    assert refresh(params)["initial_build"]
    execute(db, "UPDATE whatsapp_keys SET value = '{\"v\": 1}' WHERE company_id = 'company00001' AND key_type = 'session'")
    return params, standby


def a_key_file(standby, company):
    directory = os.path.join(standby, "company_" + company)
    return os.path.join(directory, sorted(n for n in os.listdir(directory) if n.startswith("pre-key"))[0])


def test_the_final_copy_of_an_unchanged_database_is_proven_without_reading_its_rows_again(bulk_pass):
    params, standby = bulk_pass
    proof = final_copy_and_proof(params, standby)
    assert proof["companies"] == 3 and proof["database"] == "unchanged since the copy's snapshot", proof


def test_a_key_file_edited_in_place_after_the_bulk_pass_is_caught_though_its_size_and_mtime_are_kept(bulk_pass):
    params, standby = bulk_pass
    path = a_key_file(standby, "company00002")  # a company the final copy leaves alone
    before = os.stat(path)
    with open(path, "r+b") as fh:
        data = fh.read()
        fh.seek(0)
        fh.write(data.replace(b"pre", b"PRE", 1) if b"pre" in data else data[::-1])
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # mtime set back: its ctime still tells
    assert os.stat(path).st_size == before.st_size
    with pytest.raises(SwitchError, match="company_company00002/%s" % os.path.basename(path)):
        final_copy_and_proof(params, standby)


def test_a_key_file_removed_after_the_bulk_pass_is_caught(bulk_pass):
    params, standby = bulk_pass
    path = a_key_file(standby, "company00003")
    os.unlink(path)
    with pytest.raises(SwitchError, match="1 file deleted"):
        final_copy_and_proof(params, standby)


def test_a_row_changed_after_the_final_copy_is_caught_by_the_fingerprints(db, bulk_pass):
    params, standby = bulk_pass
    proven_ns = manifest_mtime_ns(standby)
    observed = {}
    refresh(params, observed)
    execute(db, "UPDATE whatsapp_keys SET value = value WHERE company_id = 'company00003'")  # a writer outside the service
    switch = Switch(standby)
    with pytest.raises(SwitchError, match="company00003"):
        FailoverSwitch(switch)._prove_equal_to_database(params, observed["source"], proven_ns)


@pytest.fixture
def proof_workers(monkeypatch):
    """Any tree is walked by 2 worker processes, one company per task (the real threshold is 100 companies)."""
    monkeypatch.setattr(baileys_dr_drift, "PROOF_PARALLEL_MIN_COMPANIES", 1)
    monkeypatch.setattr(baileys_dr_drift, "PROOF_CHUNK_COMPANIES", 1)
    monkeypatch.setattr(baileys_dr_drift, "export_workers", lambda: 2)


def test_the_proof_walked_by_worker_processes_finds_what_one_process_finds(bulk_pass, proof_workers):
    params, standby = bulk_pass
    proven_ns = manifest_mtime_ns(standby)
    refresh(params)
    drift, beside = prove_tree(standby, proven_ns, beside=lambda: "ran beside")
    assert drift["clean"] and beside == "ran beside", drift["reason"]
    os.unlink(a_key_file(standby, "company00003"))
    with open(os.path.join(standby, "company_company00002", "stray.json"), "wb") as fh:
        fh.write(b"{}")
    os.mkdir(os.path.join(standby, "company_unknown"))
    with open(os.path.join(standby, "company_unknown", "creds.json"), "wb") as fh:
        fh.write(b"{}")
    drift, _ = prove_tree(standby, proven_ns)
    alone = tree_drift(standby)
    assert not drift["clean"] and (drift["added"], drift["deleted"], drift["drifted_companies"]) == (2, 1, 2) == (
        alone["added"], alone["deleted"], alone["drifted_companies"])
    assert drift["extra_companies"] == alone["extra_companies"] == ["company_unknown"]
    assert sorted(drift["companies"]) == ["company00002", "company00003"]
