"""baileys_prune on a real directory: what is kept, what goes, and that nothing outside a set is touched."""

from __future__ import annotations

import os
import time

import baileys_prune
from module_harness import run_module

DAY = 86400


def make(path, age_days, tree=False):
    if tree:
        os.makedirs(os.path.join(path, "company-1"))
        with open(os.path.join(path, "company-1", "creds.json"), "w") as handle:
            handle.write("{}")
    else:
        with open(path, "w") as handle:
            handle.write("x" * 10)
    stamp = time.time() - age_days * DAY
    os.utime(path, (stamp, stamp), follow_symlinks=False)
    return path


def prune(check_mode=False, **args):
    return run_module(baileys_prune, args, check_mode=check_mode)


def test_old_replaced_trees_beyond_the_last_ones_are_removed_and_young_ones_kept(tmp_path):
    app = tmp_path / "app"
    app.mkdir()
    ages = {"20261101T000000Z": 40, "20261102T000000Z": 30, "20261103T000000Z": 20, "20261201T000000Z": 3,
            "20261202T000000Z": 2}
    for stamp, age in ages.items():
        make(str(app / ("baileys_sessions.before-" + stamp)), age, tree=True)
    live = make(str(app / "baileys_sessions"), 50, tree=True)
    ok, result = prune(sets=[{"path": str(app), "pattern": "baileys_sessions.before-*"}], keep_last=2, keep_days=25)
    assert ok, result
    # The 2 newest are kept whatever their age, the 20-day one by keep_days; the 30 and 40 day ones go.
    assert sorted(os.path.basename(p) for p in result["removed"]) == [
        "baileys_sessions.before-20261101T000000Z", "baileys_sessions.before-20261102T000000Z"]
    assert result["kept"] == 3 and result["bytes_freed"] > 0 and result["changed"]
    assert sorted(os.listdir(app)) == ["baileys_sessions", "baileys_sessions.before-20261103T000000Z",
                                       "baileys_sessions.before-20261201T000000Z", "baileys_sessions.before-20261202T000000Z"]
    assert os.path.exists(os.path.join(live, "company-1", "creds.json"))
    ok, again = prune(sets=[{"path": str(app), "pattern": "baileys_sessions.before-*"}], keep_last=2, keep_days=25)
    assert ok and not again["changed"] and again["removed"] == []


def test_check_mode_lists_what_would_go_and_removes_nothing(tmp_path):
    for n in range(4):
        make(str(tmp_path / (".env.%d.2026-11-0%d@01:00:00~" % (n, n + 1))), 30 + n)
    before = sorted(os.listdir(tmp_path))
    ok, result = prune(check_mode=True, sets=[{"path": str(tmp_path), "pattern": ".env.*~"}], keep_last=1, keep_days=1)
    assert ok and result["changed"] and len(result["removed"]) == 3
    assert sorted(os.listdir(tmp_path)) == before


def test_a_rehearsals_files_go_together_and_names_outside_the_group_stay(tmp_path):
    for stamp, age in (("20261101T010000Z", 30), ("20261102T010000Z", 29), ("20261203T010000Z", 1)):
        for suffix in (".json", ".xml", "-writer.jsonl"):
            make(str(tmp_path / ("rehearsal-%s-localhost%s" % (stamp, suffix))), age)
    make(str(tmp_path / "health.json"), 90)
    make(str(tmp_path / "rehearsal-notes.txt"), 90)
    ok, result = prune(sets=[{"path": str(tmp_path), "pattern": "*", "group": r"\d{8}T\d{6}Z"}], keep_last=2, keep_days=7)
    assert ok, result
    assert sorted(os.path.basename(p) for p in result["removed"]) == [
        "rehearsal-20261101T010000Z-localhost-writer.jsonl", "rehearsal-20261101T010000Z-localhost.json",
        "rehearsal-20261101T010000Z-localhost.xml"]
    assert (tmp_path / "health.json").exists() and (tmp_path / "rehearsal-notes.txt").exists()


def test_links_are_removed_as_links_and_never_followed(tmp_path):
    outside = tmp_path / "outside"
    make(str(outside), 0, tree=True)
    app = tmp_path / "app"
    app.mkdir()
    os.symlink(str(outside), str(app / "baileys_sessions.before-20260101T000000Z"))
    os.utime(str(app / "baileys_sessions.before-20260101T000000Z"), (0, 0), follow_symlinks=False)
    tree = make(str(app / "baileys_sessions.before-20260102T000000Z"), 60, tree=True)
    os.symlink(str(outside), os.path.join(tree, "company-1", "escape"))
    os.utime(tree, (time.time() - 60 * DAY,) * 2)
    make(str(app / "baileys_sessions.before-20261201T000000Z"), 1, tree=True)
    ok, result = prune(sets=[{"path": str(app), "pattern": "baileys_sessions.before-*"}], keep_last=1, keep_days=7)
    assert ok and len(result["removed"]) == 2
    assert os.path.exists(os.path.join(str(outside), "company-1", "creds.json"))
    assert os.listdir(app) == ["baileys_sessions.before-20261201T000000Z"]


def test_settings_that_would_remove_everything_are_refused_naming_them(tmp_path):
    ok, result = prune(sets=[{"path": str(tmp_path), "pattern": "*.json"}], keep_last=0)
    assert not ok and "keep_last" in result["msg"]
    ok, result = prune(sets=[{"path": "/", "pattern": "*.json"}])
    assert not ok and "'/'" in result["msg"]
    ok, result = prune(sets=[{"path": str(tmp_path), "pattern": "*"}])
    assert not ok and "matches everything" in result["msg"]
    ok, result = prune(sets=[{"path": str(tmp_path), "pattern": "*", "group": "("}])
    assert not ok and "not a regular expression" in result["msg"]
    ok, result = prune(sets=[{"path": str(tmp_path / "missing"), "pattern": "*.json"}])
    assert ok and result == dict(result, removed=[], kept=0, changed=False)
