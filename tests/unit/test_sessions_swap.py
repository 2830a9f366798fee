"""Swapping sessions trees: atomic promotion, rollback, nothing deleted."""

from __future__ import annotations

import os

import pytest

import baileys_sessions_swap
from module_harness import run_module
from test_sessions_tree import CREDS, KEYS, build_tree, service_writes

from ansible.module_utils import basic
from ansible.module_utils.baileys_dr_verify import verify_tree


def tree(path, marker):
    (path / "company_a").mkdir(parents=True)
    (path / "company_a" / "creds.json").write_text(marker)
    return path


def test_standby_becomes_live_and_the_old_tree_is_kept(tmp_path):
    live = tree(tmp_path / "baileys_sessions", "old")
    standby = tree(tmp_path / "baileys_sessions.standby", "new")
    ok, result = run_module(baileys_sessions_swap, dict(src=str(standby), dest=str(live)))
    assert ok and result["changed"]
    assert (live / "company_a" / "creds.json").read_text() == "new"
    assert not standby.exists()
    assert open(os.path.join(result["backup"], "company_a", "creds.json")).read() == "old"


def test_restore_puts_the_previous_tree_back_and_keeps_the_failed_one(tmp_path):
    live = tree(tmp_path / "baileys_sessions", "old")
    standby = tree(tmp_path / "standby", "new")
    _, promoted = run_module(baileys_sessions_swap, dict(src=str(standby), dest=str(live)))
    ok, restored = run_module(baileys_sessions_swap, dict(dest=str(live), backup=promoted["backup"], state="restored"))
    assert ok
    assert (live / "company_a" / "creds.json").read_text() == "old"
    assert open(os.path.join(restored["backup"], "company_a", "creds.json")).read() == "new"


def test_missing_live_tree_is_simply_created(tmp_path):
    standby = tree(tmp_path / "standby", "new")
    ok, result = run_module(baileys_sessions_swap, dict(src=str(standby), dest=str(tmp_path / "baileys_sessions")))
    assert ok and result["backup"] is None
    assert (tmp_path / "baileys_sessions" / "company_a" / "creds.json").read_text() == "new"


def test_symlinked_trees_are_refused(tmp_path):
    real = tree(tmp_path / "elsewhere", "x")
    os.symlink(real, tmp_path / "standby")
    live = tree(tmp_path / "baileys_sessions", "old")
    ok, result = run_module(baileys_sessions_swap, dict(src=str(tmp_path / "standby"), dest=str(live)))
    assert not ok and "symbolic link" in result["msg"]
    assert (live / "company_a" / "creds.json").read_text() == "old"


def test_check_mode_swaps_nothing(tmp_path):
    live = tree(tmp_path / "baileys_sessions", "old")
    standby = tree(tmp_path / "standby", "new")
    ok, result = run_module(baileys_sessions_swap, dict(src=str(standby), dest=str(live)), check_mode=True)
    assert ok and result["changed"]
    assert (live / "company_a" / "creds.json").read_text() == "old" and standby.exists()


def test_missing_source_is_a_clear_error(tmp_path):
    ok, result = run_module(baileys_sessions_swap, dict(src=str(tmp_path / "nope"), dest=str(tmp_path / "live")))
    assert not ok and "does not exist" in result["msg"]


def test_restore_without_a_previous_tree_moves_the_new_one_aside(tmp_path):
    live = tree(tmp_path / "baileys_sessions", "new")
    ok, result = run_module(baileys_sessions_swap, dict(dest=str(live), state="restored"))
    assert ok and result["changed"] and not live.exists()
    assert open(os.path.join(result["backup"], "company_a", "creds.json")).read() == "new"


# -- a replaced tree the service wrote into ------------------------------------------------------------


@pytest.fixture
def warnings(monkeypatch):
    seen = []
    monkeypatch.setattr(basic.AnsibleModule, "warn", lambda self, msg, **kwargs: seen.append(msg))
    return seen


def test_promoting_over_a_tree_the_service_wrote_into_keeps_it_counts_its_files_and_warns(tmp_path, warnings):
    live = build_tree(str(tmp_path / "baileys_sessions"), {"c1": (CREDS, KEYS)})
    service_writes(live)
    standby = build_tree(str(tmp_path / "baileys_sessions.standby"), {"c1": (CREDS, KEYS)})
    ok, result = run_module(baileys_sessions_swap, dict(src=standby, dest=live))
    assert ok and result["changed"]
    kept = result["backup"]
    assert os.path.isfile(os.path.join(kept, "company_c1", "session-1.2.json")), "what the service wrote is kept"
    drift = result["replaced_drift"]
    assert not drift["clean"] and (drift["added"], drift["changed"], drift["deleted"]) == (1, 1, 1)
    assert drift["companies"]["c1"]["changed"] == ["pre-key-1.json"]
    assert warnings == ["the replaced tree held 2 files the service wrote that the database never received "
                        "(1 added, 1 changed, and 1 deleted by it; kept in %s)" % kept]
    assert verify_tree(live, depth="structure")["verified"], "the standby copy is live"


def test_promoting_over_a_clean_tree_reports_it_clean_without_a_warning(tmp_path, warnings):
    live = build_tree(str(tmp_path / "baileys_sessions"), {"c1": (CREDS, KEYS)})
    standby = build_tree(str(tmp_path / "baileys_sessions.standby"), {"c1": (CREDS, KEYS[:1])})
    ok, result = run_module(baileys_sessions_swap, dict(src=standby, dest=live))
    assert ok and result["replaced_drift"]["clean"] and warnings == []
    assert os.path.isdir(result["backup"])


def test_check_mode_reports_the_drift_of_the_tree_it_would_replace_and_moves_nothing(tmp_path, warnings):
    live = build_tree(str(tmp_path / "baileys_sessions"), {"c1": (CREDS, KEYS)})
    service_writes(live)
    standby = build_tree(str(tmp_path / "standby"), {"c1": (CREDS, KEYS)})
    ok, result = run_module(baileys_sessions_swap, dict(src=standby, dest=live), check_mode=True)
    assert ok and result["changed"] and (result["replaced_drift"]["added"], result["replaced_drift"]["deleted"]) == (1, 1)
    assert os.path.isfile(os.path.join(live, "company_c1", "session-1.2.json")) and os.path.isdir(standby)


def test_rolling_back_over_a_tree_the_service_wrote_into_counts_it_too(tmp_path, warnings):
    live = build_tree(str(tmp_path / "baileys_sessions"), {"c1": (CREDS, KEYS)})
    standby = build_tree(str(tmp_path / "standby"), {"c1": (CREDS, KEYS)})
    _, promoted = run_module(baileys_sessions_swap, dict(src=standby, dest=live))
    service_writes(live)
    ok, restored = run_module(baileys_sessions_swap, dict(dest=live, backup=promoted["backup"], state="restored"))
    assert ok and restored["replaced_drift"]["added"] == 1 and ".failed-" in restored["backup"]
    assert len(warnings) == 1 and restored["backup"] in warnings[0]
