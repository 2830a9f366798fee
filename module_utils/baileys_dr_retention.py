# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What the playbooks leave on a host, pruned by retention: the engine of the baileys_prune module.

Every failover leaves the replaced sessions tree (`baileys_sessions.before-*`), every .env rewrite a backup
(`.env.<pid>.<time>~`), every rehearsal its reports. A set names a directory, a glob of entry names and optionally a
regular expression whose match (its first group when it has one) makes entries one run (a rehearsal's .json, .xml
and ledger). Per set, the keep_last newest runs are kept, and every run younger than keep_days; the rest is removed.
Only entries directly in the directory are looked at, a symbolic link is removed as a link (never followed), a tree
is removed without following a link inside it, and an entry whose name matches no group is never removed.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import stat
import time


class PruneError(Exception):
    pass


def prune_argument_spec():
    return dict(
        sets=dict(type="list", elements="dict", required=True, options=dict(
            path=dict(type="path", required=True),
            pattern=dict(type="str", required=True),
            group=dict(type="str"),
        )),
        keep_last=dict(type="int", default=5),
        keep_days=dict(type="float", default=14),
    )


def entry_size(path):
    """Bytes of a file, or of every file of a tree (links not followed)."""
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        return info.st_size
    total = 0
    for root, dirs, files in os.walk(path):
        for name in files + dirs:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


def remove_entry(path):
    """Remove a file, a link (not its target) or a tree (links inside removed as links)."""
    if stat.S_ISDIR(os.lstat(path).st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


class Pruner:
    def __init__(self, module):
        self.module = module
        self.params = module.params
        self.now = time.time()

    def validate(self):
        if self.params["keep_last"] < 1:
            raise PruneError("keep_last must be at least 1: the newest run is never removed")
        if self.params["keep_days"] < 0:
            raise PruneError("keep_days must be 0 or more")
        for entry in self.params["sets"]:
            path = entry["path"]
            if not os.path.isabs(path) or os.path.normpath(path) == "/":
                raise PruneError("sets: path %r must be an absolute directory other than /" % path)
            if entry["pattern"] in ("", "*", ".*") and not entry.get("group"):
                raise PruneError("sets: pattern %r for %s matches everything: give a narrower pattern or a group"
                                 % (entry["pattern"], path))
            if entry.get("group"):
                try:
                    re.compile(entry["group"])
                except re.error as exc:
                    raise PruneError("sets: group %r is not a regular expression: %s" % (entry["group"], exc)) from None

    def runs(self, entry):
        """{run key: [(name, mtime)]} of a set's directory; {} when it does not exist."""
        directory, group = entry["path"], re.compile(entry["group"]) if entry.get("group") else None
        runs = {}
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return runs
        except OSError as exc:
            raise PruneError("sets: %s cannot be listed: %s" % (directory, exc.strerror or exc)) from None
        for name in names:
            if not fnmatch.fnmatchcase(name, entry["pattern"]):
                continue
            key = name
            if group is not None:
                match = group.search(name)
                if not match:
                    continue
                key = match.group(1) if match.groups() else match.group(0)
            try:
                mtime = os.lstat(os.path.join(directory, name)).st_mtime
            except FileNotFoundError:
                continue
            runs.setdefault(key, []).append((name, mtime))
        return runs

    def doomed(self, runs):
        """Names of a set's runs to remove: beyond the keep_last newest runs and older than keep_days."""
        runs = sorted(runs.values(), key=lambda items: max(m for _n, m in items), reverse=True)
        limit = self.now - self.params["keep_days"] * 86400
        names = []
        for items in runs[self.params["keep_last"]:]:
            if max(m for _n, m in items) < limit:
                names += sorted(n for n, _m in items)
        return names

    def run(self):
        self.validate()
        removed, kept, freed = [], 0, 0
        for entry in self.params["sets"]:
            runs = self.runs(entry)
            doomed = self.doomed(runs)
            kept += sum(len(items) for items in runs.values()) - len(doomed)
            for name in doomed:
                path = os.path.join(entry["path"], name)
                try:
                    size = entry_size(path)
                    if not self.module.check_mode:
                        remove_entry(path)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    raise PruneError("%s cannot be removed: %s (removed before it: %d)"
                                     % (path, exc.strerror or exc, len(removed))) from None
                removed.append(path)
                freed += size
        return {"changed": bool(removed), "removed": removed, "kept": kept, "bytes_freed": freed}
