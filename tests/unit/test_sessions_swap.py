"""Swapping sessions trees: atomic promotion, rollback, nothing deleted."""

from __future__ import annotations

import os

import baileys_sessions_swap
from module_harness import run_module


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
