"""docs/architecture.md's layout table names every file of the collection, so a newcomer finds each one's job there."""

from __future__ import annotations

import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def layout_paths():
    with open(os.path.join(ROOT, "docs", "architecture.md"), encoding="utf-8") as fh:
        text = fh.read()
    table = text[text.index("## Layout"):text.index("## Data paths")]
    return set(re.findall(r"`([^`]+)`", table))


def test_every_module_module_util_plugin_role_playbook_script_and_bench_file_is_in_the_layout_table():
    patterns = ["library/*.py", "module_utils/*.py", "plugins/*/*.py", "callback_plugins/*.py", "roles/*/library/*.py",
                "playbooks/*.yml", "scripts/*", "testbed/bin/*", "testbed/*.py", "bench/*.py", "bench/run", "roles/*"]
    files = {os.path.relpath(path, ROOT) for pattern in patterns for path in glob.glob(os.path.join(ROOT, pattern))}
    missing = sorted(files - layout_paths())
    assert not missing, "not in docs/architecture.md's layout table: %s" % ", ".join(missing)


def test_the_layout_table_names_no_file_that_is_gone():
    top = set(os.listdir(ROOT))
    gone = sorted(p for p in layout_paths() if re.match(r"^[\w./-]+$", p) and p.split("/")[0] in top
                  and not os.path.exists(os.path.join(ROOT, p.rstrip("/"))))
    assert not gone, "docs/architecture.md's layout table names missing files: %s" % ", ".join(gone)


def test_module_and_shared_code_names_follow_the_naming_rule():
    """docs/architecture.md, "Names": modules baileys_<object>, shared code baileys_dr_<job>; old names are links only."""
    modules = [os.path.basename(p)[:-3] for pattern in ("library/*.py", "roles/*/library/*.py")
               for p in glob.glob(os.path.join(ROOT, pattern)) if not os.path.islink(p)]
    assert modules
    assert [m for m in modules if not m.startswith("baileys_") or m.startswith("baileys_dr_")] == []
    shared = [os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "module_utils", "*.py"))]
    assert [m for m in shared if not m.startswith("baileys_dr_")] == []
