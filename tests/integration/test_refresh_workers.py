"""baileys_auth_export mode=standby: a refresh of many companies shared among worker processes (as the failover's final
copy of 1,000 companies runs it) writes what one process writes. Against the throwaway cluster, a few seconds."""

from __future__ import annotations

import json

import pytest

import baileys_auth_export
from faults_helpers import database_digests, execute
from module_harness import run_module
from test_export import tree_bytes

from ansible.module_utils import baileys_dr_refresh
from ansible.module_utils import baileys_dr_testdata as testdata
from ansible.module_utils.baileys_dr_verify import verify_tree

CHANGES = (
    "UPDATE whatsapp_keys SET value = value || '{\"longer\": \"by a few bytes\"}' WHERE company_id = 'company00001' "
    "AND key_type = 'session'",
    "UPDATE whatsapp_keys SET value = '{}' WHERE company_id = 'company00002' AND key_type = 'pre-key' AND key_id = '7'",
    "DELETE FROM whatsapp_keys WHERE company_id = 'company00003' AND key_type = 'pre-key' AND key_id IN ('1', '10')",
    "INSERT INTO whatsapp_keys (company_id, key_type, key_id, value) VALUES "
    "('company00003', 'pre-key', '0', '{\"k\": 0}'), ('company00004', 'tctoken', 'zz@s.whatsapp.net', '{\"t\": 1}')",
    "UPDATE whatsapp_auth SET creds = creds || '{\"accountSyncCounter\": 7}' WHERE company_id = 'company00002'",
    "DELETE FROM whatsapp_auth WHERE company_id = 'company00004'",
)


@pytest.fixture
def refresh(db_params):
    def run(dest, **args):
        ok, result = run_module(baileys_auth_export, dict(db_params, dest=str(dest), mode="standby", **args))
        assert ok, result.get("msg")
        return result
    return run


def test_a_refresh_shared_among_workers_writes_byte_for_byte_what_one_process_writes(db, refresh, tmp_path, monkeypatch):
    testdata.load(db, "refresh-workers", 5, 40)
    shared, alone = tmp_path / "shared.standby", tmp_path / "alone.standby"
    for dest in (shared, alone):
        assert refresh(dest)["initial_build"]
    execute(db, *CHANGES)
    monkeypatch.setattr(baileys_dr_refresh, "export_workers", lambda: 2)
    monkeypatch.setattr(baileys_dr_refresh, "PARALLEL_MIN_KEYS", 0)
    monkeypatch.setattr(baileys_dr_refresh, "REFRESH_PARALLEL_MIN_COMPANIES", 1)
    in_workers = refresh(shared)
    monkeypatch.setattr(baileys_dr_refresh, "REFRESH_PARALLEL_MIN_COMPANIES", 10 ** 9)
    by_one = refresh(alone)
    assert in_workers["workers"] == 2 and by_one["workers"] == 0
    counters = ("files_written", "files_deleted", "bytes_written", "rows_fetched", "companies_refreshed", "companies_skipped")
    assert {k: in_workers[k] for k in counters} == {k: by_one[k] for k in counters}
    assert in_workers["companies_refreshed"] == 4 and in_workers["files_deleted"] == 3, in_workers
    assert any("SET TRANSACTION SNAPSHOT" in q for q in in_workers["queries"])
    assert tree_bytes(shared) == tree_bytes(alone)
    tops = [json.loads((root / ".baileys-dr" / "manifest.json").read_text()) for root in (shared, alone)]
    assert tops[0]["companies"] == tops[1]["companies"] and tops[0]["counts"] == tops[1]["counts"]
    checked = verify_tree(str(shared), recompute_digests=True)
    assert checked["verified"] and checked["digests"] == database_digests(db) == in_workers["digests"], checked["problems"][:5]
