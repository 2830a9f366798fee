# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The full export: the database's state as a complete new tree (mode=live, and a standby copy's first build).

The tree is written into a sibling staging directory, synced, then swapped in with renameat2(RENAME_EXCHANGE); the
replaced tree is kept (whatever keep_backup says when a service wrote into it). A large export is shared among worker
processes, each on its own connection to the exported snapshot. A dest that is no baileys-dr tree is refused. Nothing
is written when the manifest proves the database unchanged (row versions), or when the digests say so (DigestOnly).
CompanyWriter writes one company, here and in the standby refresh's rebuild of a company.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import shutil
import stat
import time

from ansible.module_utils.baileys_dr_codec import VALUE_ERRORS
from ansible.module_utils.baileys_dr_drift import swap_in_tree, tree_drift
from ansible.module_utils.baileys_dr_files import (
    ParentLock, check_dest, check_space, create_file, estimate_tree_bytes, free_space, make_dir, open_dir, put_file,
    sync_filesystem,
)
from ansible.module_utils.baileys_dr_identity import IdentityRefused, copy_guard
from ansible.module_utils.baileys_dr_manifests import (
    TreeMeta, entry_line, key_entry_line, load_top_manifest, top_manifest_document, write_company_meta,
)
from ansible.module_utils.baileys_dr_snapshot import Snapshot, hostile_error, same_server_lifetime
from ansible.module_utils.baileys_dr_tree import (
    COMPANY_PREFIX, CREDS_FILE, DIR_MODE, MANIFEST_NAME, MAX_SHOWN, META_DIR, DigestLines, ForeignTreeError,
    ManifestError, RefreshRefused, SessionsError, UnknownKeyTypeError, check_company_id, checked_key_file_name,
    collision_error, creds_line, encode_json, encode_row, iso, key_line, sha256_bytes, test_hook, utc_now, value_error,
)
from ansible.module_utils.baileys_dr_verify import shown_name
from ansible.module_utils.baileys_dr_workers import PARALLEL_MIN_KEYS, Workers, export_workers


def identity_check(conn, params, dest, top, companies, action):
    """Each company's identity in the database (in the snapshot's transaction), refused when it would replace another
    identity in dest, and key types the application's Baileys does not know (baileys_dr_identity.copy_guard).
    Returns (the manifest's extra fields, the identity guard's report)."""
    try:
        with conn.cursor() as cur:
            return copy_guard(cur, dest, top, companies, params, action)
    except IdentityRefused as exc:
        raise RefreshRefused(str(exc)) from None


class CompanyWriter:
    """Writes files into a company directory and builds its manifest entries and digest."""

    def __init__(self, company_id, dir_fd, owner, unknown_types, keep_lines, replace=False):
        self.company_id = company_id
        self.dir_fd = dir_fd
        self.owner = owner
        self.unknown_types = unknown_types
        self.keep_lines = keep_lines
        self.replace = replace
        self.names = {}  # file name -> (type, id)
        self.entry_lines = []
        self.rows = [] if keep_lines else None  # "type\tid\txmin" per key, digest order (standby)
        self.digest = None
        self.written = 0
        self.bytes = 0
        self.skipped = 0
        self.skipped_types = set()

    def _write(self, name, data):
        if self.dir_fd is None:
            return
        if self.replace:
            put_file(self.dir_fd, name, data, self.owner)
        else:
            create_file(self.dir_fd, name, data, self.owner)
        self.written += 1
        self.bytes += len(data)

    def creds(self, row):
        if row is None:
            self.digest = DigestLines(creds_line(None), self.keep_lines)
            return
        xmin, text, md5 = row
        data, line = encode_row(self.company_id, None, None, text)
        self._write(CREDS_FILE, data)
        self.names[CREDS_FILE] = ("creds", None)
        self.entry_lines.append(entry_line(CREDS_FILE, {"type": "creds", "sha256": sha256_bytes(data), "size": len(data),
                                                        "xmin": int(xmin), "row_md5": md5}))
        self.digest = DigestLines(line, self.keep_lines)

    def name_of(self, key_type, key_id):
        """The key's file name, None when skipped; raises on hostile input or a collision."""
        try:
            name = checked_key_file_name(self.company_id, key_type, key_id)
        except UnknownKeyTypeError:
            if self.unknown_types == "skip":
                self.skipped += 1
                self.skipped_types.add(key_type)
                return None
            raise
        other = self.names.get(name)
        if other is not None:
            raise collision_error(self.company_id, name, other, (key_type, key_id))
        self.names[name] = (key_type, key_id)
        return name

    def key(self, key_type, key_id, xmin, text, md5):
        name = self.name_of(key_type, key_id)
        if name is None:
            return
        if self.dir_fd is None:
            try:
                line = key_line(key_type, key_id, json.loads(text))
            except VALUE_ERRORS as exc:
                raise value_error(self.company_id, key_type, key_id, exc) from None
            self.digest.add(key_type, key_id, line)
            return
        data, line = encode_row(self.company_id, key_type, key_id, text)
        self.digest.add(key_type, key_id, line)
        self._write(name, data)
        self.entry_lines.append(key_entry_line(name, key_type, key_id, sha256_bytes(data), len(data), xmin, md5))
        if self.rows is not None:
            self.rows.append("%s\t%s\t%s" % (key_type, key_id, xmin))

    def meta(self, tree, in_place=False):
        """Write the company's digest lines and row versions (standby) and manifest; returns the manifest's sha256."""
        rows = "\n".join(self.rows) if self.rows is not None else None
        lines = self.digest.data() if self.digest.lines is not None else None
        return write_company_meta(tree, self.company_id, self.digest.hexdigest(), self.digest.keys, self.entry_lines,
                                  self.owner, lines, rows, in_place)


class FullExport:
    """A complete tree written into a fresh directory below parent_fd, then swapped in.

    With connect and an exported snapshot, a large export is shared among worker processes
    (export_workers()): each opens its own connection on the same snapshot and writes whole
    companies, so JSON work and file creation use every core; the parent collects each
    company's manifest entry in its place.
    """

    def __init__(self, snapshot, stats, owner, unknown_types, keep_lines, hook_prefix="", connect=None):
        self.snapshot = snapshot
        self.stats = stats
        self.owner = owner
        self.unknown_types = unknown_types
        self.keep_lines = keep_lines
        self.connect = connect
        self.companies = {}
        self.digests = {}
        self.totals = {"files": 0, "bytes": 0, "keys": 0, "skipped_keys": 0}
        self.skipped_types = set()
        self.without_creds = []
        self.workers_used = 0

    def write(self, root_fd):
        tree = TreeMeta(root_fd).open(create=True, owner=self.owner, lines=self.keep_lines)
        try:
            workers = self._workers()
            results = ExportWorkers(self, tree, workers).run() if workers > 1 else None
            self.workers_used = workers if results is not None else 0
            if results is None:
                results = {}
                for index, (company_id, _keys, fingerprint, _creds) in enumerate(self.stats):
                    results[index] = self._company(self.snapshot, tree, company_id, fingerprint)
                    test_hook("after_company:%d" % (index + 1))
        finally:
            tree.close()
        for index, (company_id, _keys, fingerprint, _creds) in enumerate(self.stats):
            self._add(company_id, results[index])

    def _workers(self):
        if self.connect is None or self.snapshot.exported is None or len(self.stats) < 2:
            return 0
        if sum(s[1] for s in self.stats) < PARALLEL_MIN_KEYS:
            return 0
        return min(export_workers(), len(self.stats))

    def _company(self, snapshot, tree, company_id, fingerprint):
        """Write one company; returns what the manifest and the result need of it (plain data, picklable)."""
        dir_fd = make_dir(tree.root_fd, COMPANY_PREFIX + company_id, self.owner)
        try:
            writer = CompanyWriter(company_id, dir_fd, self.owner, self.unknown_types, self.keep_lines)
            creds = snapshot.creds(company_id)
            writer.creds(creds)
            for key_type, key_id, xmin, text, md5 in snapshot.keys(company_id):
                writer.key(key_type, key_id, xmin, text, md5)
        finally:
            os.close(dir_fd)
        manifest_sha256 = writer.meta(tree)
        return {"entry": {"digest": writer.digest.hexdigest(), "keys": writer.digest.keys, "files": len(writer.entry_lines),
                          "manifest_sha256": manifest_sha256, "fingerprint": fingerprint},
                "files": writer.written, "bytes": writer.bytes, "skipped": writer.skipped,
                "skipped_types": sorted(writer.skipped_types), "without_creds": creds is None}

    def _add(self, company_id, result):
        entry = result["entry"]
        self.companies[company_id] = entry
        self.digests[company_id] = entry["digest"]
        if result["without_creds"]:
            self.without_creds.append(company_id)
        self.totals["files"] += result["files"]
        self.totals["bytes"] += result["bytes"]
        self.totals["keys"] += entry["keys"]
        self.totals["skipped_keys"] += result["skipped"]
        self.skipped_types.update(result["skipped_types"])


class ExportWorkers:
    """Forked workers (Workers) writing whole companies of one FullExport, each on its own connection to the exported
    snapshot; the parent collects each company's result. A worker that cannot connect makes the whole export run in the
    parent instead (run() returns None); any later failure kills every worker and is raised, so the caller removes the
    staging tree.
    """

    def __init__(self, export, tree, count):
        self.export = export
        self.tree = tree
        self.count = count

    def run(self):
        with Workers(self.count, "an export worker") as workers:
            if not workers.start(self._attach, self._company, self._detach):
                return None
            queries = self.export.snapshot.queries

            def accept(_index, result):
                queries.extend(q for q in result[1] if q not in queries)

            results = workers.map(list(range(len(self.export.stats))), accept)
            workers.finish()
        return {index: result for index, (result, _queries) in results.items()}

    def _attach(self):
        conn = self.export.connect()
        try:
            return conn, self.export.snapshot.attach(conn)
        except BaseException:
            conn.close()
            raise

    def _company(self, state, index):
        snapshot = state[1]
        company_id, _keys, fingerprint, _creds = self.export.stats[index]
        result = self.export._company(snapshot, self.tree, company_id, fingerprint)
        test_hook("after_company:%d" % (index + 1))
        return result, snapshot.queries

    @staticmethod
    def _detach(state):
        conn = state[0]
        try:
            conn.rollback()
        finally:
            conn.close()


class DigestOnly:
    """The digests a full export would give, computed without writing (check mode, unchanged check)."""

    def __init__(self, snapshot, unknown_types):
        self.snapshot = snapshot
        self.unknown_types = unknown_types

    def company(self, company_id):
        writer = CompanyWriter(company_id, None, None, self.unknown_types, False)
        writer.creds(self.snapshot.creds(company_id))
        for row in self.snapshot.keys(company_id):
            writer.key(*row)
        return writer.digest.hexdigest(), writer.digest.keys, writer.skipped


def staging_name(dest):
    return ".%s.staging-%s" % (os.path.basename(dest), secrets.token_hex(6))


def read_current_manifest(dest, exists):
    """(manifest or None, reason) of the tree at dest."""
    if not exists:
        return None, "dest does not exist"
    root_fd = open_dir(dest)
    try:
        return load_top_manifest(root_fd)[1], None
    except FileNotFoundError:
        return None, "dest has no manifest"
    except (ManifestError, SessionsError) as exc:
        return None, "the manifest of dest is unusable: %s" % exc
    finally:
        os.close(root_fd)


FOREIGN_SHOWN = 5


def refuse_foreign(dest, exists, replace_foreign):
    """Raise ForeignTreeError when dest is a non-empty directory without a baileys-dr top manifest (unless replace_foreign).

    Only a tree this project wrote (its .baileys-dr/manifest.json, even an unusable one) may be replaced by an
    export: anything else (an application directory given as dest by mistake, a tree another tool made) is
    refused before a connection is opened, naming dest and its first entries.
    """
    if not exists or replace_foreign:
        return
    root_fd = open_dir(dest)
    try:
        if has_top_manifest(root_fd):
            return
        with os.scandir(root_fd) as listing:
            entries = sorted(shown_name(entry.name) for entry in itertools.islice(listing, FOREIGN_SHOWN + 1))
    finally:
        os.close(root_fd)
    if not entries:
        return
    more = ", ..." if len(entries) > FOREIGN_SHOWN else ""
    raise ForeignTreeError(
        "dest %s is not a baileys-dr sessions tree (it has no %s/%s) and is not empty (%s%s): refusing to replace it. "
        "Give another dest, move it away, or set replace_foreign=true to replace it (it is then kept beside dest as "
        "%s.before-<UTC time>, never deleted)" % (dest, META_DIR, MANIFEST_NAME, ", ".join(entries[:FOREIGN_SHOWN]), more,
                                                    os.path.basename(dest)))


def has_top_manifest(root_fd):
    """True when the tree open at root_fd has a .baileys-dr/manifest.json regular file (no symbolic link followed)."""
    try:
        meta_fd = open_dir(META_DIR, root_fd)
    except (FileNotFoundError, SessionsError):
        return False
    try:
        return stat.S_ISREG(os.stat(MANIFEST_NAME, dir_fd=meta_fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False
    finally:
        os.close(meta_fd)


class Exporter:
    """mode=live: the database's state as a complete new tree, swapped in atomically."""

    def __init__(self, params, connect, target, owner, check_mode):
        self.params = params
        self.connect = connect
        self.target = target
        self.owner = owner
        self.check_mode = check_mode
        self.source_meta = None  # what Snapshot.begin read of the server

    def run(self, locked=False):
        started = time.monotonic()
        dest, exists = check_dest(self.params["dest"])
        parent = os.path.dirname(dest)
        backup_dir = self.params.get("backup_dir")
        if backup_dir:
            backup_dir = os.path.normpath(backup_dir)
            if not os.path.isdir(backup_dir) or os.path.islink(backup_dir):
                raise SessionsError("backup_dir %s is not a directory" % backup_dir)
            if os.stat(backup_dir).st_dev != os.stat(parent).st_dev:
                raise SessionsError("backup_dir %s is not on the file system of %s: the swap must be a rename" % (backup_dir, parent))
        if locked:
            return self._connected(dest, exists, parent, backup_dir, started)
        with ParentLock(parent, exclusive=True, timeout=self.params["lock_timeout"]):
            return self._connected(dest, exists, parent, backup_dir, started)

    def _connected(self, dest, exists, parent, backup_dir, started):
        refuse_foreign(dest, exists, self.params.get("replace_foreign"))
        conn = self.connect()
        try:
            result = self._run(conn, dest, exists, parent, backup_dir)
        finally:
            conn.close()
        result["duration_seconds"] = round(time.monotonic() - started, 3)
        if not (self.params["return_digests"] or result["companies"] <= 1000):
            result.pop("digests", None)
        return result

    def _run(self, conn, dest, exists, parent, backup_dir):
        params = self.params
        snapshot = Snapshot(conn)
        # Exported, so that worker processes can read the same snapshot (FullExport).
        meta = self.source_meta = snapshot.begin(self.target, export=not self.check_mode)
        filter_ids = params.get("companies") or None
        stats = snapshot.company_stats(filter_ids)
        for company_id, *_ in stats:
            check_company_id(company_id)
        hostile = snapshot.hostile_rows(filter_ids, params["unknown_types"])
        if hostile:
            raise hostile_error(hostile, params["unknown_types"])
        current, why = read_current_manifest(dest, exists)
        self.extra, identity = identity_check(conn, params, dest, current, filter_ids, "write the database into %s" % dest)
        result = {"dest": dest, "manifest": os.path.join(dest, META_DIR, MANIFEST_NAME), "snapshot_at": meta["snapshot_at"],
                  "system_identifier": meta["system_identifier"], "companies": len(stats), "keys": sum(s[1] for s in stats),
                  "backup": None, "files": 0, "bytes": 0, "queries": snapshot.queries,
                  "generation": current["generation"] if current else None, "identity": identity,
                  "baileys": self.extra["baileys"]}
        differs = self._differs(current, stats, meta)
        # The manifest speaks for the files only while nobody wrote into them: a service running on the files creates,
        # rewrites in place and deletes files the database never sees. Checked before any "nothing to do" (a run that
        # writes anyway compares the replaced tree after the swap, where it is kept).
        drift = tree_drift(dest) if exists and (self.check_mode or (differs is not True and not params["force"])) else None
        drifted = drift is not None and not drift["clean"]
        if differs is False and not params["force"] and not drifted:
            result.update(changed=False, differs=False, digests={c: e["digest"] for c, e in current["companies"].items()},
                          reason="the database holds what the manifest of dest lists (row versions unchanged) and so does the tree")
            return result
        files = sum(s[1] + (1 if s[3] else 0) for s in stats)
        estimated = estimate_tree_bytes(snapshot.estimate_bytes(filter_ids), files, free_space(parent)["block"])
        result["estimated_bytes"] = estimated
        check_space(parent, estimated, files, params["space_margin"])
        if self.check_mode or (differs is None and not params["force"]):
            # Digests from the rows, compared with the manifest before anything is written.
            report = self._compare(snapshot, stats, current)
            result.update(report)
            differs = report["differs"]
            if self.check_mode:
                result["changed"] = report["differs"] or bool(params["force"]) or drifted
                if result["changed"]:
                    result["would_write"] = {"companies": len(stats), "keys": result["keys"] - report["skipped_keys"],
                                             "files": files - report["skipped_keys"], "estimated_bytes": estimated}
                    result["rewrite_reason"] = self._rewrite_reason(why, differs, drift)
                result["replaced_drift"] = drift
                result["reason"] = why or (report["reason"] if differs or not drifted else result["rewrite_reason"])
                return result
            if not report["differs"] and not drifted:
                result["changed"] = False
                return result
        result.update(self._write(conn, snapshot, stats, meta, current, dest, parent, backup_dir))
        drift = result["replaced_drift"] or drift
        result["differs"] = differs is not False
        result["rewrite_reason"] = self._rewrite_reason(why, differs, drift)
        result["reason"] = why or ("the database differs from the manifest of dest" if differs is not False else result["rewrite_reason"])
        return result

    def _rewrite_reason(self, why, differs, drift):
        """Why dest is (or would be) written anew: one line naming the database's change, the tree's, or both."""
        parts = [why] if why else []
        if differs and not why:
            parts.append("the database differs from the manifest of dest")
        if drift is not None and drift["manifest"] and not drift["clean"]:
            parts.append("the service changed the tree since its manifest: %s" % drift["reason"])
        if not parts:
            parts.append("force" if self.params["force"] else "the database differs from the manifest of dest")
        return "; ".join(parts)

    def _write(self, conn, snapshot, stats, meta, current, dest, parent, backup_dir):
        params = self.params
        staging = os.path.join(parent, staging_name(dest))
        os.mkdir(staging, DIR_MODE)
        try:
            root_fd = open_dir(staging)
            try:
                if self.owner:
                    os.fchown(root_fd, *self.owner)
                export = FullExport(snapshot, stats, self.owner, params["unknown_types"], keep_lines=params["mode"] == "standby",
                                    connect=self.connect)
                export.write(root_fd)
                conn.rollback()
                generation = (current["generation"] + 1) if current else 1
                now = iso(utc_now())
                top = top_manifest_document(generation, meta, export.companies, now, now, params["mode"], self.extra)
                meta_fd = open_dir(META_DIR, root_fd)
                try:
                    create_file(meta_fd, MANIFEST_NAME, encode_json(top), self.owner)
                finally:
                    os.close(meta_fd)
                sync_filesystem(root_fd, staging)
            finally:
                os.close(root_fd)
            test_hook("before_swap")
            # The replaced tree is kept whatever keep_backup says when the service wrote into it (swap_in_tree).
            swapped = swap_in_tree(staging, dest, backup_dir=backup_dir, keep_backup=params["keep_backup"])
            staging = None
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
        return {"changed": True, "backup": swapped["backup"], "replaced_drift": swapped["replaced_drift"],
                "files": export.totals["files"],
                "bytes": export.totals["bytes"], "keys": export.totals["keys"], "skipped_keys": export.totals["skipped_keys"],
                "skipped_types": sorted(export.skipped_types), "generation": generation, "digests": export.digests,
                "companies_without_creds": export.without_creds[:MAX_SHOWN], "workers": export.workers_used}

    @staticmethod
    def _differs(current, stats, meta):
        """False when the manifest proves the database unchanged, True when it proves a change, None when it cannot tell."""
        if current is None:
            return True
        if set(current["companies"]) != {s[0] for s in stats}:
            return True
        if not same_server_lifetime(current.get("source"), meta):
            return None
        for company_id, _keys, fingerprint, _creds in stats:
            if current["companies"][company_id].get("fingerprint") != fingerprint:
                return None
        return False

    def _compare(self, snapshot, stats, current):
        """Every company's digest from the rows, compared with the manifest; nothing written."""
        digests, changed, skipped = {}, [], 0
        computer = DigestOnly(snapshot, self.params["unknown_types"])
        known = current["companies"] if current else {}
        for company_id, *_ in stats:
            digests[company_id], _keys, company_skipped = computer.company(company_id)
            skipped += company_skipped
            if known.get(company_id, {}).get("digest") != digests[company_id]:
                changed.append(company_id)
        removed = sorted(set(known) - set(digests), key=lambda c: c.encode("utf-8"))
        differs = current is None or bool(changed or removed)
        return {"differs": differs, "digests": digests, "skipped_keys": skipped, "companies_changed": len(changed),
                "companies_removed": len(removed), "changed_companies": changed[: MAX_SHOWN * 5],
                "removed_companies": removed[: MAX_SHOWN * 5],
                "reason": "the database differs from the manifest of dest" if differs
                else "the database has the digests the manifest of dest lists"}
