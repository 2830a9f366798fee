# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The standby refresh (mode=standby): the tree kept equal to the database in place, writing only what changed.

Company by company (files, then the company's digest lines, then its manifest), then the file system is synced and
the top manifest rewritten, which lists the sha256 of every company manifest: a refresh that stops half-way leaves a
tree that verification rejects until the next good one.

Change detection (standby and the "unchanged" check of a live export) uses
PostgreSQL row versions: every INSERT or UPDATE gives the row a new xmin.
A per-company aggregate of xmins skips unchanged companies; inside a changed
company, only rows whose xmin moved are fetched, and a row whose
md5(value::text) equals the manifest's row_md5 is not rewritten. Row
versions only compare within one server lifetime (same system identifier,
timeline and postmaster start, xid distance < 2^31): otherwise (restart,
restore, other cluster) the refresh compares md5(value::text) of every row
instead, which is slower but needs no row-version history.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import json
import os
import threading
import time

from ansible.module_utils.baileys_dr_archive import Archiver
from ansible.module_utils.baileys_dr_codec import key_file_name, sort_key
from ansible.module_utils.baileys_dr_deletion_guard import DeletionGuard
from ansible.module_utils.baileys_dr_export import CompanyWriter, Exporter, identity_check, read_current_manifest
from ansible.module_utils.baileys_dr_files import (
    ParentLock, SpaceBudget, check_dest, estimate_tree_bytes, make_dir, open_dir, put_file, read_ahead, read_regular,
    remove_tree_at, replace_file, sync_filesystem, unlink_names, unlink_quiet,
)
from ansible.module_utils.baileys_dr_fs import write_file_atomic
from ansible.module_utils.baileys_dr_manifests import (
    CompanyState, TreeMeta, entry_line, load_top_manifest, top_manifest_document, write_company_meta,
)
from ansible.module_utils.baileys_dr_snapshot import Snapshot, hostile_error, same_server_lifetime
from ansible.module_utils.baileys_dr_tree import (
    COMPANIES_DIR, COMPANY_PREFIX, CREDS_FILE, FILE_MODE, HEADER_LINE, IN_PROGRESS_NAME, LINES_DIR, MANIFEST_NAME,
    MAX_SHOWN, META_DIR, REFUSED_NAME, TMP_PREFIX, ManifestError, RefreshRefused, SessionsError, age_of,
    check_company_id, checked_key_file_name, collision_error, creds_line, encode_json, encode_row, iso, sha256_bytes,
    test_hook, utc_now,
)
from ansible.module_utils.baileys_dr_workers import PARALLEL_MIN_KEYS, Workers, export_workers, in_thread

# Threads (each with its own connection on the exported snapshot) reading ahead during a standby refresh.
PREFETCH_THREADS = 2
# A standby refresh shares its work among worker processes from this many companies to refresh (and PARALLEL_MIN_KEYS keys).
REFRESH_PARALLEL_MIN_COMPANIES = 8


def may_collide(key_type, key_id):
    """False when no other id can give this key's file name (no ':' or '/', no '-' or '__', not a sender key)."""
    return key_type in ("sender-key", "sender-key-memory") or any(c in key_id for c in ":/-") or "__" in key_id


class CompanyEdit:
    """Changes to one company, decided (and validated) before anything is written."""

    def __init__(self):
        self.writes = []  # (name, key_type or None for creds, key_id, xmin, text, md5, old index or None)
        self.xmin_only = []  # (old index or None for creds, new xmin)
        self.deletes = []  # (old index or None for creds, file name)
        self.rows_text = None
        self.bytes = 0


class Refresher:
    """mode=standby: keeps a tree equal to the database, writing only what changed."""

    COUNTERS = ("files_written", "files_deleted", "bytes_written", "rows_fetched", "rows_unchanged_content",
                "companies_refreshed", "companies_rebuilt", "companies_skipped", "companies_added",
                "companies_removed", "skipped_keys")

    def __init__(self, params, connect, target, owner, check_mode):
        self.params = params
        self.connect = connect
        self.target = target
        self.owner = owner
        self.check_mode = check_mode
        self.space = None
        self._spare_readers = []  # Snapshots on extra connections, for the prefetch threads
        self._connections = []
        self._unlinker = None  # a thread removing deleted files while the next companies are written
        self._unlinking = []
        self.stats = dict.fromkeys(self.COUNTERS, 0)
        self.would = {"files_to_write": 0, "files_to_delete": 0, "companies_examined": 0, "companies_rebuilt": 0,
                      "per_company": {}}
        self._marker = None
        self.dest = None
        self.guard = DeletionGuard(params)
        self.source_meta = None  # what Snapshot.begin read of the server

    def run(self):
        started = time.monotonic()
        dest, exists = check_dest(self.params["dest"])
        parent = os.path.dirname(dest)
        with ParentLock(parent, exclusive=True, timeout=self.params["lock_timeout"]):
            current, why = read_current_manifest(dest, exists)
            if current is None:
                # First build (or an unusable tree): a complete export, staged and swapped in.
                exporter = Exporter(dict(self.params, force=True), self.connect, self.target, self.owner, self.check_mode)
                try:
                    result = exporter.run(locked=True)
                finally:
                    self.source_meta = exporter.source_meta
                result.update(initial_build=True, reason=why)
                if not self.check_mode:
                    top = self._top(dest)
                    result.update(last_good_refresh=top.get("last_good_refresh"), age_seconds=age_of(top))
            else:
                conn = self.connect()
                try:
                    result = self._refresh(conn, dest)
                finally:
                    conn.close()
                result["initial_build"] = False
            if not self.check_mode and self.params.get("archive_dir"):
                result.update(Archiver(dest, self.params["archive_dir"], self.params["archive_keep"],
                                       self.params["archive_every"], self.owner).run())
        result["duration_seconds"] = round(time.monotonic() - started, 3)
        if not (self.params["return_digests"] or result["companies"] <= 1000):
            result.pop("digests", None)
        return result

    @staticmethod
    def _top(dest):
        root_fd = open_dir(dest)
        try:
            return load_top_manifest(root_fd)[1]
        finally:
            os.close(root_fd)

    def _refresh(self, conn, dest):
        params = self.params
        self.dest = dest
        self.space = SpaceBudget(dest, params["space_margin"])
        root_fd = open_dir(dest)
        tree = TreeMeta(root_fd)
        try:
            _, top = load_top_manifest(root_fd)
            try:
                tree.open(create=not self.check_mode, owner=self.owner, lines=not self.check_mode)
            except FileNotFoundError:
                raise SessionsError("%s/%s of %s is incomplete: a run without check mode rebuilds it" % (META_DIR, COMPANIES_DIR, dest)) from None
            if tree.lines_fd is None:
                try:
                    tree.lines_fd = open_dir(LINES_DIR, tree.meta_fd)
                except FileNotFoundError:
                    pass
            snapshot = Snapshot(conn)
            meta = self.source_meta = snapshot.begin(self.target, export=True)
            filter_ids = params.get("companies") or None
            hostile_rows = self._hostile_rows(snapshot, filter_ids)
            stats = snapshot.company_stats(filter_ids)
            hostile = hostile_rows()
            for company_id, *_ in stats:
                check_company_id(company_id)
            if hostile:
                raise hostile_error(hostile, params["unknown_types"])
            fast = same_server_lifetime(top.get("source"), meta)
            interrupted = self._interrupted(tree)
            listed = {s[0] for s in stats}
            removed = sorted(set(top["companies"]) - listed, key=lambda c: c.encode("utf-8"))
            guard = self.guard.check(top, stats)
            if guard["refused"]:
                self._refuse(tree, top, meta, guard)
            extra, identity = identity_check(conn, params, dest, top, filter_ids, "refresh the standby copy %s" % dest)
            todo = {s[0] for s in stats if interrupted or not fast or top["companies"].get(s[0], {}).get("fingerprint") != s[2]}
            result = {"dest": dest, "manifest": os.path.join(dest, META_DIR, MANIFEST_NAME), "backup": None,
                      "snapshot_at": meta["snapshot_at"], "system_identifier": meta["system_identifier"],
                      "companies": len(stats), "keys": sum(s[1] for s in stats), "queries": snapshot.queries,
                      "row_versions_used": fast, "previous_refresh_interrupted": interrupted, "deletion_guard": guard,
                      "identity": identity, "baileys": extra["baileys"]}
            self._marker = None if self.check_mode else (tree, meta)
            companies = {}
            work = [(index, company_id, fingerprint) for index, (company_id, _k, fingerprint, _c) in enumerate(stats, 1)
                    if company_id in todo]
            for company_id, _keys, fingerprint, _creds in stats:
                if company_id not in todo:
                    companies[company_id] = dict(top["companies"][company_id], fingerprint=fingerprint)
                    self.stats["companies_skipped"] += 1
            workers = self._refresh_workers(snapshot, work, stats)
            if workers and self._in_workers(workers, snapshot, tree, top, work, fast, interrupted, companies):
                work = []
            result["workers"] = workers if not work else 0
            for (index, company_id, fingerprint), (state, edit, reason) in self._prefetching(snapshot, tree, top, work, fast, interrupted):
                if state is None:
                    companies[company_id] = self._rebuild(snapshot, tree, company_id, fingerprint, reason, index)
                elif self.check_mode:
                    self._count_would(company_id, edit)
                else:
                    companies[company_id] = self._update(tree, state, edit, company_id, fingerprint, index, strays=interrupted)
                test_hook("after_company:%d" % index)
            companies = {s[0]: companies.get(s[0]) for s in stats}
            if self.check_mode:
                self.would.update(companies_removed=len(removed), removed_companies=removed[: MAX_SHOWN * 5])
                changed = bool(self.would["files_to_write"] or self.would["files_to_delete"] or self.would["companies_rebuilt"]
                               or removed)
                result.update(changed=changed, files=0, bytes=0, generation=top["generation"], would_change=self.would,
                              last_good_refresh=top.get("last_good_refresh"), age_seconds=age_of(top),
                              companies_skipped=self.stats["companies_skipped"],
                              digests={c: e["digest"] for c, e in top["companies"].items()})
                return result
            for company_id in removed:
                self._ensure_marker()
                remove_tree_at(root_fd, COMPANY_PREFIX + company_id)
                for fd, name in ((tree.companies_fd, company_id + ".json"), (tree.lines_fd, company_id + ".lines"),
                                 (tree.lines_fd, company_id + ".rows")):
                    unlink_quiet(fd, name)
                self.stats["companies_removed"] += 1
            self._wait_unlinking()
            conn.rollback()
            sync_filesystem(root_fd, dest)
            test_hook("before_manifest")
            changed = interrupted or any(self.stats[k] for k in ("files_written", "files_deleted", "companies_rebuilt",
                                                                  "companies_removed"))
            now = iso(utc_now())
            generation = top["generation"] + 1 if changed else top["generation"]
            document = top_manifest_document(generation, meta, companies, now if changed else top.get("created_at"), now, "standby", extra)
            write_file_atomic(os.path.join(dest, META_DIR, MANIFEST_NAME), encode_json(document), mode=FILE_MODE,
                              owner=self.owner[0] if self.owner else None, group=self.owner[1] if self.owner else None)
            # A good refresh (forced or not) ends what a refused one recorded.
            if [name for name in (IN_PROGRESS_NAME, REFUSED_NAME) if unlink_quiet(tree.meta_fd, name)]:
                os.fsync(tree.meta_fd)
            result.update(self.stats)
            result.update(changed=changed, generation=generation, last_good_refresh=now, age_seconds=0.0,
                          files=self.stats["files_written"], bytes=self.stats["bytes_written"],
                          digests={c: e["digest"] for c, e in companies.items()})
            return result
        finally:
            if self._unlinker is not None:
                self._unlinker.shutdown(wait=True)
            for other in self._connections:
                other.close()
            tree.close()
            os.close(root_fd)

    def _refuse(self, tree, top, meta, guard):
        """Record the refusal beside the manifest (not in check mode) and fail: no file, manifest or archive is touched."""
        if not self.check_mode:
            replace_file(tree.meta_fd, REFUSED_NAME, encode_json(DeletionGuard.record(top, meta, guard)), self.owner, durable=True)
        raise RefreshRefused(DeletionGuard.refusal(self.dest, top, guard, recorded=not self.check_mode))

    def _hostile_rows(self, snapshot, filter_ids):
        """The hostile-row pre-check, on a second connection on the same snapshot when the server allows it, so
        that it runs while the main connection computes the statistics (each is a scan of the table)."""
        if not snapshot.exported:
            return lambda: snapshot.hostile_rows(filter_ids, self.params["unknown_types"])
        conn = self.connect()
        self._connections.append(conn)
        reader = snapshot.attach(conn)
        self._spare_readers.append(reader)  # then a prefetch thread's reader
        return in_thread(reader.hostile_rows, filter_ids, self.params["unknown_types"])

    def _unlink_later(self, dir_fd, names):
        if self._unlinker is None:
            self._unlinker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="baileys-dr-unlink")
        fd = os.dup(dir_fd)
        try:
            self._unlinking.append(self._unlinker.submit(unlink_names, fd, names))
        except BaseException:
            os.close(fd)
            raise

    def _wait_unlinking(self):
        """Deleted files are all gone before the file system is synced (then the top manifest written)."""
        while self._unlinking:
            self.stats["files_deleted"] += self._unlinking.pop(0).result()

    @staticmethod
    def _interrupted(tree):
        try:
            os.lstat(IN_PROGRESS_NAME, dir_fd=tree.meta_fd)
            return True
        except FileNotFoundError:
            return False

    def _ensure_marker(self):
        """Before the first change to the tree: a durable mark that a refresh is under way."""
        if self._marker is None:
            return
        tree, meta = self._marker
        self._marker = None
        data = encode_json({"started_at": iso(utc_now()), "pid": os.getpid(), "snapshot_at": meta["snapshot_at"]})
        replace_file(tree.meta_fd, IN_PROGRESS_NAME, data, self.owner, durable=True)

    # -- one company --
    def _prefetching(self, snapshot, tree, top, work, fast, interrupted):
        """Yield (work item, (state, edit, rebuild reason)) in order.

        A thread reads and hashes the next company's manifest files, fetches
        its row versions and changed rows and decides the edit (validating
        new ids), while the caller writes the current company. The thread has
        its own connection on the same exported snapshot when the server
        allows it, else it shares the caller's (same transaction either way).
        """
        if not work:
            return
        threads = PREFETCH_THREADS if snapshot.exported and len(work) > 1 else 1
        readers, connections, local = [], [], threading.local()
        lock = threading.Lock()
        if threads == 1:
            snapshot.prepare_refresh(with_md5=not fast)

        def reader_of_thread():
            reader = getattr(local, "reader", None)
            if reader is None:
                if threads == 1:
                    reader = snapshot
                else:
                    with lock:
                        reader = self._spare_readers.pop() if self._spare_readers else None
                    if reader is None:
                        conn = self.connect()
                        with lock:
                            connections.append(conn)
                        reader = snapshot.attach(conn)
                    reader.prepare_refresh(with_md5=not fast)
                local.reader = reader
            return reader

        def prepare(item):
            return self._prepare(reader_of_thread, tree, top, item, fast, interrupted)

        pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="baileys-dr-prefetch")
        try:
            pending = collections.deque()
            items = iter(work)
            for item in itertools.islice(items, 2 * threads):
                pending.append((item, pool.submit(prepare, item)))
            while pending:
                item, future = pending.popleft()
                prepared = future.result()
                following = next(items, None)
                if following is not None:
                    pending.append((following, pool.submit(prepare, following)))
                yield item, prepared
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            for conn in connections:
                conn.close()

    def _prepare(self, reader_of, tree, top, item, fast, interrupted):
        """(state, edit, None) of a work item, or (None, None, why it is rebuilt)."""
        _index, company_id, _fingerprint = item
        entry = top["companies"].get(company_id)
        if entry is None:
            return None, None, "new company"
        try:
            if tree.lines_fd is None:
                raise ManifestError("no digest lines")
            data = (read_regular(tree.companies_fd, company_id + ".json"),
                    read_regular(tree.lines_fd, company_id + ".lines"),
                    read_regular(tree.lines_fd, company_id + ".rows"))
            files = (data, tuple(sha256_bytes(d) for d in data))
            state = self._state(tree, company_id, None if interrupted else entry["manifest_sha256"], interrupted, files)
        except (OSError, ManifestError, SessionsError) as exc:
            return None, None, "no usable manifest: %s" % exc
        reader = reader_of()
        edit = self._diff(reader, state, company_id, fast, reader.rows(company_id))
        if not self.check_mode and edit.writes:
            try:
                dir_fd = open_dir(COMPANY_PREFIX + company_id, tree.root_fd)
            except (OSError, SessionsError):
                pass  # _update says what is wrong
            else:
                try:
                    read_ahead(dir_fd, [w[0] for w in edit.writes if w[6] is not None or w[1] is None])
                finally:
                    os.close(dir_fd)
        return state, edit, None

    # -- many companies: worker processes --
    def _refresh_workers(self, snapshot, work, stats):
        """Worker processes for this refresh's work (0: the parent does it, with its prefetch threads)."""
        if self.check_mode or not snapshot.exported or len(work) < REFRESH_PARALLEL_MIN_COMPANIES:
            return 0
        todo = {company_id for _index, company_id, _fingerprint in work}
        if sum(s[1] for s in stats if s[0] in todo) < PARALLEL_MIN_KEYS:
            return 0
        return min(export_workers(), len(work))

    def _in_workers(self, count, snapshot, tree, top, work, fast, interrupted, companies):
        """The work shared among count forked workers (Workers): each takes every count-th company and runs the
        pipeline a refresh runs alone (_prefetching: threads reading the next companies' state and changed rows on
        connections of their own to the exported snapshot while it writes), so that the JSON work, hashing, file
        I/O and the server's work use every core; results and counters are collected here. False when a worker
        could not connect (max_connections, say): nothing was written, the parent does the work instead."""
        self._ensure_marker()  # before the fork: the durable mark of a refresh under way
        shares = [work[k::count] for k in range(count)]

        def attach():
            # The parent's connections are never used in a worker: a reader of its own (rebuilds), and the prefetch
            # threads connect (the exported snapshot's id lets them attach).
            self._spare_readers = []
            conn = self.connect()
            try:
                reader = snapshot.attach(conn)
            except BaseException:
                conn.close()
                raise
            reader.exported = snapshot.exported
            # Each worker checks the space it takes as if every other took as much.
            self.space = SpaceBudget(self.dest, self.params["space_margin"] * count)
            return conn, reader

        def do(state, position):
            reader = state[1]
            before = dict(self.stats)
            done = {}
            for (index, company_id, fingerprint), (company_state, edit, reason) in self._prefetching(
                    reader, tree, top, shares[position], fast, interrupted):
                if company_state is None:
                    done[company_id] = self._rebuild(reader, tree, company_id, fingerprint, reason, index)
                else:
                    done[company_id] = self._update(tree, company_state, edit, company_id, fingerprint, index,
                                                    strays=interrupted)
                test_hook("after_company:%d" % index)
            self._wait_unlinking()
            return done, {k: self.stats[k] - before[k] for k in self.COUNTERS}, reader.queries

        def detach(state):
            if self._unlinker is not None:
                self._unlinker.shutdown(wait=True)
            try:
                state[0].rollback()
            finally:
                state[0].close()

        queries = snapshot.queries

        def accept(_position, result):
            done, counters, used = result
            companies.update(done)
            for name, value in counters.items():
                self.stats[name] += value
            queries.extend(q for q in used if q not in queries)

        with Workers(count, "a refresh worker") as pool:
            if not pool.start(attach, do, detach):
                return False
            pool.map(list(range(count)), accept)
            pool.finish()
        return True

    def _state(self, tree, company_id, expected_sha256, verify_files, files):
        (manifest_data, lines_data, rows_data), (manifest_sha256, lines_sha256, rows_sha256) = files
        if expected_sha256 is not None and manifest_sha256 != expected_sha256:
            raise ManifestError("its sha256 differs from the top manifest's")
        state = CompanyState(company_id, manifest_data, lines_data, rows_data, (lines_sha256, rows_sha256))
        if verify_files:
            # After an interrupted refresh only what the files prove is trusted.
            files = json.loads(manifest_data)["files"]
            dir_fd = open_dir(COMPANY_PREFIX + company_id, tree.root_fd)
            try:
                for name, spec in files.items():
                    content = read_regular(dir_fd, name)
                    if len(content) != spec.get("size") or sha256_bytes(content) != spec.get("sha256"):
                        raise SessionsError("%s does not match the manifest" % name)
                extra = [n for n in os.listdir(dir_fd) if n not in files and not n.startswith(TMP_PREFIX)]
                if extra:
                    raise SessionsError("files not in the manifest: %r" % extra[:3])
            finally:
                os.close(dir_fd)
        return state

    def _diff(self, snapshot, state, company_id, fast, database):
        """What changed in a company, validated (hostile ids, collisions) before anything is written.

        Row versions (or, without trustworthy xmins, versions and md5s) of the
        database and of the last refresh are compared as two sorted lists of
        text lines: only the lines that differ are looked at.
        """
        edit = CompanyEdit()
        new_text, row = database
        old_rows = state.rows if fast else state.md5_rows()
        old_text = state.rows_text if fast else "\n".join(old_rows)
        if new_text == old_text:
            edit.rows_text = state.rows_text
        else:
            new_rows = new_text.split("\n") if new_text else []
            edit.rows_text = new_text if fast else "\n".join(row.rsplit("\t", 1)[0] for row in new_rows)
            self._diff_rows(snapshot, state, company_id, fast, old_rows, new_rows, edit)
        old = state.creds_entry()
        if row is None:
            if old is not None:
                edit.deletes.append((None, CREDS_FILE))
        elif old is None or old.get("row_md5") != row[2]:
            edit.writes.append((CREDS_FILE, None, None, int(row[0]), row[1], row[2], None))
            edit.bytes += len(row[1])
        elif old.get("xmin") != int(row[0]):
            edit.xmin_only.append((None, int(row[0])))
        return edit

    def _diff_rows(self, snapshot, state, company_id, fast, old_rows, new_rows, edit):
        new_set, old_set = set(new_rows), set(old_rows)
        gone_set, came = old_set - new_set, new_set - old_set
        index = {row: n for n, row in enumerate(old_rows) if row in gone_set} if gone_set else {}
        gone_keys = {}
        for row, n in index.items():
            fields = row.split("\t")
            gone_keys[(fields[0], fields[1])] = (n, fields)
        fetch = []
        inserted = {}
        for row in came:
            fields = row.split("\t")
            key = (fields[0], fields[1])
            old = gone_keys.pop(key, None)
            if old is None:
                name = checked_key_file_name(company_id, key[0], key[1])
                other = inserted.get(name)
                if other is not None:
                    raise collision_error(company_id, name, other, key)
                inserted[name] = key
                fetch.append((key, None))
            elif not fast and fields[3] == old[1][3]:
                edit.xmin_only.append((old[0], int(fields[2])))
            else:
                fetch.append((key, old[0]))
        deleted = set()
        for key, (n, _fields) in gone_keys.items():
            name = key_file_name(*key)
            edit.deletes.append((n, name))
            deleted.add(name)
        if any(may_collide(*key) for key in inserted.values()):
            existing = state.file_names() - deleted
            for name, key in inserted.items():
                if name in existing:
                    other = next(row.split("\t")[:2] for row in state.rows if key_file_name(*row.split("\t")[:2]) == name)
                    raise collision_error(company_id, name, tuple(other), key)
        if not fetch:
            return
        values = {(t, i): (x, text, md5) for t, i, x, text, md5 in snapshot.values(company_id, [k for k, _ in fetch])}
        if len(values) != len(fetch):
            raise SessionsError("company %s: %d changed rows listed but %d read back in the same snapshot" % (company_id, len(fetch), len(values)))
        for key, n in fetch:
            xmin, text, md5 = values[key]
            if n is not None and state.entry(n)[1].get("row_md5") == md5:
                edit.xmin_only.append((n, int(xmin)))
                continue
            edit.writes.append((key_file_name(*key), key[0], key[1], int(xmin), text, md5, n))
            edit.bytes += len(text)

    def _count_would(self, company_id, edit):
        self.would["companies_examined"] += 1
        self.would["files_to_write"] += len(edit.writes)
        self.would["files_to_delete"] += len(edit.deletes)
        if (edit.writes or edit.deletes) and len(self.would["per_company"]) < MAX_SHOWN * 5:
            self.would["per_company"][company_id] = {"write": len(edit.writes), "delete": len(edit.deletes)}

    def _update(self, tree, state, edit, company_id, fingerprint, index, strays):
        if edit.writes:
            self.space.take(estimate_tree_bytes(edit.bytes, len(edit.writes), 4096), len(edit.writes))
        # Every changed value read and encoded before the first change: a value that cannot be leaves the company untouched.
        encoded = [encode_row(company_id, key_type, key_id, text) for _name, key_type, key_id, _xmin, text, _md5, _n in edit.writes]
        self._ensure_marker()
        replaced = {}  # old index -> (entry line, digest line or None to keep)
        inserts = []  # (position, sort key, entry line, digest line)
        creds_entry, creds_line_new = state.creds_entry_line, state.creds_line
        written = written_bytes = deleted = 0
        written_names = {w[0] for w in edit.writes}
        dir_fd = open_dir(COMPANY_PREFIX + company_id, tree.root_fd)
        try:
            for (name, key_type, key_id, xmin, _text, md5, n), (data, line) in zip(edit.writes, encoded):
                put_file(dir_fd, name, data, self.owner)
                written += 1
                written_bytes += len(data)
                if key_type is None:
                    entry = {"type": "creds", "sha256": sha256_bytes(data), "size": len(data), "xmin": xmin, "row_md5": md5}
                    creds_entry, creds_line_new = entry_line(CREDS_FILE, entry), line
                    continue
                entry = {"type": key_type, "id": key_id, "sha256": sha256_bytes(data), "size": len(data), "xmin": xmin, "row_md5": md5}
                if n is None:
                    inserts.append((state.position_of(key_type, key_id), sort_key(key_type, key_id), entry_line(name, entry), line))
                else:
                    replaced[n] = (entry_line(name, entry), line)
            for n, xmin in edit.xmin_only:
                if n is None:
                    creds_entry = entry_line(CREDS_FILE, dict(state.creds_entry(), xmin=xmin))
                else:
                    name, entry = state.entry(n)
                    replaced[n] = (entry_line(name, dict(entry, xmin=xmin)), None)
            removed = set()
            unlink = []
            for n, name in edit.deletes:
                if n is None:
                    creds_entry, creds_line_new = None, creds_line(None)
                else:
                    removed.add(n)
                if name not in written_names:  # a new key whose file has the name of a deleted one
                    unlink.append(name)
            if unlink and not strays:
                self._unlink_later(dir_fd, unlink)
            elif unlink:
                deleted += unlink_names(os.dup(dir_fd), unlink)
            if strays:
                keep = {key_file_name(*row.split("\t")[:2]) for row in edit.rows_text.split("\n")} if edit.rows_text else set()
                if creds_entry is not None:
                    keep.add(CREDS_FILE)
                deleted += self._remove_strays(dir_fd, keep)
        finally:
            os.close(dir_fd)
        entries, key_lines = self._splice(state, replaced, removed, inserts)
        lines_data = b"".join([HEADER_LINE, creds_line_new] + key_lines)
        if creds_entry is not None:
            entries.insert(0, creds_entry)
        test_hook("before_company_manifest:%d" % index)
        digest = sha256_bytes(lines_data)
        manifest_sha256 = write_company_meta(tree, company_id, digest, len(key_lines), entries, self.owner, lines_data,
                                             edit.rows_text, in_place=True)
        for counter, value in (("files_written", written), ("bytes_written", written_bytes), ("files_deleted", deleted),
                               ("rows_fetched", len(edit.writes) + len(edit.xmin_only)),
                               ("rows_unchanged_content", len(edit.xmin_only)), ("companies_refreshed", 1)):
            self.stats[counter] += value
        return {"digest": digest, "keys": len(key_lines), "files": len(entries),
                "manifest_sha256": manifest_sha256, "fingerprint": fingerprint}

    @staticmethod
    def _splice(state, replaced, removed, inserts):
        """New (entry lines, digest lines) of the keys: old slices copied, edits put in place."""
        events = [(n, 1, b"", n) for n in replaced] + [(n, 1, b"", n) for n in removed if n not in replaced]
        events += [(pos, 0, sk, i) for i, (pos, sk, _e, _l) in enumerate(inserts)]
        events.sort()
        entries, lines = [], []
        old_entries, old_lines = state.key_entry_lines, state.key_lines
        cursor = 0
        for pos, kind, _sk, ref in events:
            if pos > cursor:
                entries.extend(old_entries[cursor:pos])
                lines.extend(old_lines[cursor:pos])
                cursor = pos
            if kind == 0:
                entries.append(inserts[ref][2])
                lines.append(inserts[ref][3])
                continue
            if ref in replaced and ref not in removed:
                entry, line = replaced[ref]
                entries.append(entry)
                lines.append(old_lines[ref] if line is None else line)
            cursor = pos + 1
        entries.extend(old_entries[cursor:])
        lines.extend(old_lines[cursor:])
        return entries, lines

    @staticmethod
    def _remove_strays(dir_fd, keep):
        """Remove what the company's new manifest does not list (orphans of an interrupted run, temp files)."""
        removed = 0
        for name in os.listdir(dir_fd):
            if name not in keep:
                remove_tree_at(dir_fd, name)
                removed += 1
        return removed

    def _rebuild(self, snapshot, tree, company_id, fingerprint, reason, index):
        """The whole company written in place (new company, or no usable manifest, digest lines or row versions)."""
        size, files = snapshot.company_size(company_id)
        if self.check_mode:
            self.would["companies_rebuilt"] += 1
            self.would["files_to_write"] += files
            if len(self.would["per_company"]) < MAX_SHOWN * 5:
                self.would["per_company"][company_id] = {"write": files, "delete": 0, "rebuild": reason}
            return None
        self.space.take(estimate_tree_bytes(size, files, 4096), files)
        self._ensure_marker()
        name = COMPANY_PREFIX + company_id
        try:
            dir_fd = open_dir(name, tree.root_fd)
        except FileNotFoundError:
            dir_fd = make_dir(tree.root_fd, name, self.owner)
        try:
            writer = CompanyWriter(company_id, dir_fd, self.owner, self.params["unknown_types"], keep_lines=True, replace=True)
            writer.creds(snapshot.creds(company_id))
            rows = 0
            for row in snapshot.keys(company_id):
                rows += 1
                writer.key(*row)
            deleted = self._remove_strays(dir_fd, set(writer.names))
        finally:
            os.close(dir_fd)
        test_hook("before_company_manifest:%d" % index)
        manifest_sha256 = writer.meta(tree, in_place=True)
        for counter, value in (("files_written", writer.written), ("bytes_written", writer.bytes), ("files_deleted", deleted),
                               ("rows_fetched", rows), ("skipped_keys", writer.skipped), ("companies_rebuilt", 1),
                               ("companies_added", 1 if reason == "new company" else 0)):
            self.stats[counter] += value
        return {"digest": writer.digest.hexdigest(), "keys": writer.digest.keys, "files": len(writer.entry_lines),
                "manifest_sha256": manifest_sha256, "fingerprint": fingerprint}
