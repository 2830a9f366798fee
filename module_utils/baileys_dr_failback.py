# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Failback: a Baileys sessions tree back into the PostgreSQL auth-state store, and its undo.

Contract of the tree: docs/architecture.md ("The sessions tree and its
manifest (format 1)"); undo files: docs/failback-undo.md.

    files -> verified against the manifest (sha256), new files reverse-mapped
          -> per company, one REPEATABLE READ transaction:
             read rows (md5 of value::text) -> plan (insert, update, delete)
             -> conflict guard (rows changed after `since`)
             -> undo file (rows replaced or deleted, ids inserted), written and fsynced by a thread
                while the server does the writes below, waited for before anything else
             -> DELETE; COPY of the values to write (and of the ids of the other keys) into a temporary
                staging table; one UPDATE and one INSERT from it
             -> proof on the server: the rows are the staged keys, written values equal what was sent;
                the digest of the files (one canonical line per key, from the values parsed to write)
             -> the directory did not change meanwhile -> COMMIT

A run reads every company twice: a first pass, read-only, validates the
files and plans every company before anything is written (so a bad file in
the last company refuses the run before the first write), a second pass
does the writes company by company. In each pass a thread reads the next
company's directory while the current one is worked on: at most two
companies' files are held in memory. A large run shares both passes among
forked worker processes (baileys_dr_workers.Workers, the export's): each
takes whole companies on its own connection, and the per-company code
(_company, _write_company) is the same in a worker as in the module's process.

Reused: the codec (fixFileName, Buffer forms, canonical JSON through the
digest lines), the sessions tree readers and validators, the export's test
hooks, the application's expires_at policy (baileys_dr_codec.expiry_days).
"""

from __future__ import annotations

import os
import time

from ansible.module_utils.baileys_dr_passfiles import RACY_COARSE_NS
from ansible.module_utils.baileys_dr_postgres import (
    RETRY_DELAYS,
    DatabaseError,
    postgres_argument_spec,
    psycopg2,
    retry_on_disconnect,
)
from ansible.module_utils.baileys_dr_files import open_dir, ParentLock
from ansible.module_utils.baileys_dr_tree import iso, parse_iso, SessionsError
from ansible.module_utils.baileys_dr_workers import export_workers, PARALLEL_MIN_KEYS, Workers
from ansible.module_utils.baileys_dr_failback_company import FailbackCompany, new_outcome
from ansible.module_utils.baileys_dr_failback_db import Database, UNTOUCHED_SQL, read_only_reason
from ansible.module_utils.baileys_dr_failback_errors import FailbackError
from ansible.module_utils.baileys_dr_failback_passes import FailbackPasses
from ansible.module_utils.baileys_dr_source_files import check_src
from ansible.module_utils.baileys_dr_source_tree import CompanyReader, SourceTree
from ansible.module_utils.baileys_dr_undo import UNDO_RE, Undo, read_undo_file, remove_undo_file


class Failback(FailbackPasses, FailbackCompany):
    """mode=import: the files of a sessions tree become the rows of PostgreSQL, company by company."""

    def __init__(self, params, connect, target, check_mode):
        self.params = params
        self.connect = connect
        self.target = target
        self.check_mode = check_mode
        self.queries = []
        self.db = Database(connect, self.queries)
        self.meta = None
        self.tree = None
        self.since = None
        self.warnings = []
        self.defer = params.get("changed_during_read") == "defer"
        self.retries = []  # retry_on_disconnect's log
        # A bulk or delta pass retries a dropped connection; a single-pass import fails the company as it always did.
        self.two_pass = self.defer or bool(params.get("pass_record") or params.get("delta_from"))
        self.exempt = {}  # company -> 32-bit xids of the earlier passes' transactions (delta pass: no conflicts)
        self.passed = {}  # company -> pass record entry: committed or found equal by this run, or proven unchanged
        self.fingerprints = None  # {company: fingerprint} of the last aggregate
        self.delta = None
        self.lock = not check_mode  # the advisory lock: the module's connection holds it, a worker's never does
        self.workers_used = 0
        self.absent = []  # companies asked for that the tree does not hold (missing_companies=skip)
        # Delta pass: companies prepared per file from the proof's listing, written in batches (_delta_batches); their
        # plans (pass 1); the watch on their directories (the check before each batch's COMMIT).
        self.prepared = {}
        self.batch_plans = {}
        self.watch = None
        self.left_out = {}  # company -> why a batch left it out (it is read whole, alone)

    # -- the run --
    def run(self):
        started = time.monotonic()
        self.started_ns = time.time_ns()
        src, exists = check_src(self.params["src"])
        if not exists:
            raise FailbackError("src %s does not exist" % src)
        with ParentLock(os.path.dirname(src), exclusive=False, timeout=self.params["lock_timeout"]):
            root_fd = open_dir(src)
            try:
                self.tree = SourceTree(src, root_fd, self.params["require_manifest"]).open()
                try:
                    result = self._run(src)
                finally:
                    self.tree.close()
                    if self.watch is not None:
                        self.watch.close()
            finally:
                os.close(root_fd)
                self.db.close()
        result["duration_seconds"] = round(time.monotonic() - started, 3)
        if result["delta"] is not None:
            result["delta"]["seconds"] = result["duration_seconds"]
        return result

    def _retrying(self, what, action):
        """action() again on a new connection when the connection dropped (bounded backoff, logged in retries)."""
        return retry_on_disconnect(action, what, reconnect=lambda: self.db.ensure(lock=self.lock),
                                   conn=lambda: self.db.conn, delays=RETRY_DELAYS if self.two_pass else (), log=self.retries)

    def _since(self):
        since = self.params.get("since")
        if since:
            moment = parse_iso(since)
            if moment is None:
                raise FailbackError("since %r is not an ISO 8601 time" % since)
            return iso(moment), "option"
        snapshot = self.tree.source.get("snapshot_at")
        if snapshot and parse_iso(snapshot):
            return iso(parse_iso(snapshot)), "manifest source.snapshot_at"
        self.warnings.append("no since and no export snapshot time in the manifest: the conflict guard is off")
        return None, None

    def _run(self, src):
        params = self.params
        companies, bad, self.absent = self.tree.company_ids(params.get("companies"), params["missing_companies"])
        if self.lock and params.get("companies"):
            # Listed companies (a fleet's host): their own locks, beside the other hosts' imports.
            self.lock = sorted(set(params["companies"]))
        self.db.open(lock=self.lock)
        self.meta = self.db.meta()
        read_only = read_only_reason(self.meta, self.target)
        if read_only and not self.check_mode:
            raise FailbackError("%s; nothing was written" % read_only)
        if read_only:
            self.warnings.append(read_only)
        if not self.meta["temporary"] and not self.check_mode:
            # The writes go through a temporary staging table (one COPY): refused before anything is written.
            raise FailbackError("the role has no TEMPORARY privilege on the database at %s, which the import needs for its staging "
                                "table (GRANT TEMPORARY ON DATABASE ... TO the role); nothing was written" % self.target)
        source_id = self.tree.source.get("system_identifier")
        if source_id and source_id != self.meta["system_identifier"] and not params["allow_other_database"]:
            raise FailbackError(
                "the tree was exported from the database with system identifier %s, this one is %s: refusing to import into "
                "another database (allow_other_database=true to do it)" % (source_id, self.meta["system_identifier"]))
        self.since, since_from = self._since()
        outcomes = {c: new_outcome() for c in companies}
        for company_id, reason in bad.items():
            outcomes[company_id].update(status="refused", error=reason)
        todo = self._prove_unchanged(src, companies, bad, outcomes) if params.get("delta_from") else companies
        with Workers(self._workers([c for c in todo if c not in self.prepared], bad), "an import worker") as workers:
            if workers.count < 2 or not workers.start(self._attach_worker, self._worker_task, self._detach_worker):
                workers = None
            self.workers_used = 0 if workers is None else workers.count
            self._passes(todo, bad, outcomes, workers)
            if workers is not None:
                try:
                    workers.finish()
                except SessionsError as exc:
                    # Every company's outcome is in (a worker that ended badly after its last company changes none).
                    self.warnings.append(str(exc))
        record = None
        if params.get("pass_record") and not self.check_mode:
            record = self._write_pass_record(src, companies, outcomes)
        return self._result(src, companies, outcomes, since_from, record)

    def _passes(self, todo, bad, outcomes, workers):
        params = self.params
        index_of = {c: index for index, c in enumerate(todo, 1)}
        # Pass 1, read-only: every company checked and planned before the first write (the prepared ones in batches;
        # a prepared one whose rows moved since the proof goes the per-company way, read whole).
        if self.prepared:
            self._delta_batches([c for c in todo if c in self.prepared], outcomes, index_of, write=False)
        planned = [(index_of[c], c) for c in todo if c not in bad and c not in self.prepared]
        last = self._pass(planned, outcomes, workers, write=False)
        refused = [c for c in todo if outcomes[c]["status"] == "refused"]
        if not self.check_mode and not (refused and not params["continue_on_error"]):
            # Pass 2: the writes, one transaction per batch of prepared companies, then one per other company (and per
            # company a batch left out: read whole, alone).
            batched, alone = set(self.prepared), []
            if batched:
                alone = self._delta_batches([c for c in todo if c in batched and outcomes[c]["status"] == "planned"],
                                            outcomes, index_of, write=True)
            if any(outcomes[c]["status"] == "failed" for c in batched) and not params["continue_on_error"]:
                for company_id in todo:
                    if outcomes[company_id]["status"] in ("planned", None):
                        outcomes[company_id]["status"] = "not_attempted"
                return
            writes = [(index_of[c], c) for c in todo if c not in batched and outcomes[c]["status"] not in ("refused", "deferred")]
            writes += [(index_of[c], c) for c in alone]
            self._writes(writes, outcomes, None if alone else workers, None if alone else last)
        elif not self.check_mode:
            for company_id in todo:
                if outcomes[company_id]["status"] not in ("refused", "deferred"):
                    outcomes[company_id]["status"] = "not_attempted"

    def _writes(self, todo, outcomes, workers, reuse):
        """Pass 2: the writes, one transaction per company (_write_company)."""
        self._pass(todo, outcomes, workers, write=True, reuse=reuse)

    def _pass(self, todo, outcomes, workers, write, reuse=None):
        """One pass over the (index, company) pairs, in this process or shared among the workers; in pass 2 (write) the
        first failed or refused company stops it unless continue_on_error (the companies not begun: not_attempted).
        Returns the files read last (pass 1: used again when the single company of pass 2 is that one)."""
        stop = write and not self.params["continue_on_error"]
        if workers is not None:
            self._pass_in_workers(todo, outcomes, workers, write, stop)
            return None
        reader = CompanyReader(self.tree, [c for _i, c in todo], self.params["ambiguous"], reuse=reuse)
        try:
            for position, (index, company_id) in enumerate(todo):
                self._one(index, company_id, outcomes[company_id], reader, write)
                if stop and outcomes[company_id]["status"] in ("failed", "refused"):
                    for _later, later in todo[position + 1:]:
                        outcomes[later].update(status="not_attempted")
                    break
            return reader.last
        finally:
            reader.last = None if write else reader.last
            reader.close()

    def _one(self, index, company_id, outcome, reader, write):
        """One company of a pass: planned (pass 1) or written in its own transaction (pass 2), its outcome updated."""
        try:
            self._company(index, company_id, outcome, reader, write=write)
        except (psycopg2.Error, DatabaseError) as exc:
            if not write:
                raise
            if outcome["status"] != "failed":  # else _write_company said why (a dropped connection, retries spent)
                text = exc.pgerror if isinstance(exc, psycopg2.Error) and exc.pgerror else str(exc)
                outcome.update(status="failed", error="company %s: the database failed before its writes: %s; nothing of "
                                                      "it was committed" % (company_id, " ".join(str(text).split())))

    # -- worker processes (Workers, shared with the export): companies split among them, each on its own connection --
    def _workers(self, todo, bad):
        """How many worker processes share the passes: none below PARALLEL_MIN_KEYS keys (the manifest's counts) or 2
        companies, else one per usable CPU (export_workers(), the export's policy), at most one per company."""
        companies = [c for c in todo if c not in bad]
        if len(companies) < 2:
            return 0
        listed = self.tree.top["companies"] if self.tree.top is not None else self.tree.legacy or {}
        keys = 0
        for company_id in companies:
            entry = listed.get(company_id)
            entry = entry if isinstance(entry, dict) else {}
            count = entry.get("keys") if self.tree.top is not None else entry.get("files")
            # An estimate only (the manifest is checked where it is used): a count of another type counts as none.
            keys += count if isinstance(count, int) and not isinstance(count, bool) else len(count) if isinstance(count, dict) else 0
        if keys < PARALLEL_MIN_KEYS:
            return 0
        return min(export_workers(), len(companies))

    def _attach_worker(self):
        """In a forked worker: its own connection (without the advisory lock, which the module's connection holds) and
        its own logs, sent back with each company's outcome."""
        # The module's connection is the parent's session: kept referenced and never used here (closing it, or letting
        # it be collected, would end the parent's session on the server).
        self._parent_db = self.db
        self.lock = False
        self.queries, self.warnings, self.retries, self.passed = [], [], [], {}
        self.db = Database(self.connect, self.queries)
        self.db.open(lock=False)
        return {"last": None}

    def _worker_task(self, state, task):
        write, index, company_id, outcome = task
        reader = CompanyReader(self.tree, [company_id], self.params["ambiguous"], reuse=state["last"])
        try:
            self._one(index, company_id, outcome, reader, write)
        finally:
            state["last"] = None if write else reader.last
            reader.last = None
            reader.close()
        report = {"outcome": outcome, "passed": self.passed.pop(company_id, None), "warnings": self.warnings[:],
                  "retries": self.retries[:], "queries": self.queries[:]}
        del self.warnings[:], self.retries[:]
        return report

    def _lost_company(self, company_id, outcome, exc):
        """The outcome of a company whose worker ended (killed, say) while writing it. The COMMIT comes only after the
        undo file is written and synced: without an undo file of this run nothing committed; with one, its header names
        the transaction, whose fate the server tells (it rolls back the transaction of a connection that ended)."""
        undo, state = None, "aborted"
        undo_dir = self.params["undo_dir"]
        try:
            names = os.listdir(undo_dir)
        except OSError:
            names = []
        for name in names:
            match = UNDO_RE.match(name)
            path = os.path.join(undo_dir, name)
            # Written by this run (a file system with a coarse clock stamps up to RACY_COARSE_NS earlier).
            if match and match.group(1) == company_id and os.stat(path).st_mtime_ns >= self.started_ns - RACY_COARSE_NS:
                try:
                    header, _records = read_undo_file(path)
                except FailbackError:
                    continue  # not synced whole: written before any COMMIT could happen, never listed
                undo, state = path, self._commit_state(header["txid"])
        if state == "committed":
            self.warnings.append("company %s: its import worker ended after the COMMIT (%s); the server says the transaction "
                                 "committed" % (company_id, exc))
            outcome.update(status="imported", undo_file=undo)
            return
        if undo and state == "aborted":
            remove_undo_file(undo)
            undo = None
        fate = "nothing of it was committed" if state == "aborted" else \
            "whether its COMMIT took effect is unknown (%s); the undo file %s is kept" % (state, undo)
        outcome.update(status="failed", undo_file=undo, digest=None,
                       error="company %s: the import worker writing it ended: %s; %s" % (company_id, exc, fate))

    def _detach_worker(self, _state):
        self.db.rollback()
        self.db.close()

    def _pass_in_workers(self, todo, outcomes, workers, write, stop):
        tasks = [(write, index, company_id, outcomes[company_id]) for index, company_id in todo]

        def accept(position, report):
            company_id = todo[position][1]
            outcomes[company_id].clear()
            outcomes[company_id].update(report["outcome"])
            if report["passed"] is not None:
                self.passed[company_id] = report["passed"]
            self.warnings.extend(report["warnings"])
            self.retries.extend(report["retries"])
            self.queries.extend(q for q in report["queries"] if q not in self.queries)
            return not (stop and outcomes[company_id]["status"] in ("failed", "refused"))

        done = workers.map(tasks, accept, drain=True)
        for position, exc in sorted(workers.failures.items()):
            company_id = todo[position][1]
            if write:
                self._lost_company(company_id, outcomes[company_id], exc)
            else:
                outcomes[company_id].update(status="refused", error="company %s: the import worker planning it failed: %s; "
                                                                    "nothing was written" % (company_id, exc))
        for position, (_index, company_id) in enumerate(todo):
            if position not in done and position not in workers.failures:
                outcomes[company_id].update(status="not_attempted")
        if workers.failures and not write:
            raise FailbackError("an import worker failed while planning: nothing was written (%s)"
                                % "; ".join(outcomes[todo[p][1]]["error"] for p in sorted(workers.failures)))

    def _result(self, src, companies, outcomes, since_from, record=None):
        cap = self.params["max_report"]
        ambiguous, conflicts, refusals = [], [], []
        totals = dict.fromkeys(("inserted", "updated", "deleted", "unchanged", "kept"), 0)
        totals["creds_changed"] = 0
        for company_id in companies:
            outcome = outcomes[company_id]
            ambiguous.extend(outcome.pop("_ambiguous", []))
            conflicts.extend(outcome.pop("_conflicts", []))
            if outcome["status"] in ("refused", "failed"):
                refusals.append({"company": company_id, "status": outcome["status"], "error": outcome["error"]})
            for name in totals:
                totals[name] += int(outcome[name])
        reverted = [c for c in companies if outcomes[c]["reverted"]]
        if reverted:
            self.warnings.append(
                "%d row(s) of %d companies (%s) changed in PostgreSQL after the export but not in the files: the failback puts "
                "them back to the exported value the service used on files (counted as reverted)"
                % (sum(outcomes[c]["reverted"] for c in reverted), len(reverted), ", ".join(reverted[:10])))
        committed = [c for c in companies if outcomes[c]["status"] == "imported"]
        failed = [c for c in companies if outcomes[c]["status"] in ("refused", "failed")]
        result = {
            "changed": bool(committed) or (self.check_mode and any(outcomes[c]["status"] == "would_change" for c in companies)),
            "mode": "import",
            "src": src,
            "manifest": self.tree.kind,
            "generation": (self.tree.top or {}).get("generation"),
            "system_identifier": self.meta["system_identifier"],
            "since": self.since,
            "since_from": since_from,
            "companies": outcomes,
            "totals": totals,
            "committed": committed,
            "failed_companies": failed,
            "not_attempted": [c for c in companies if outcomes[c]["status"] == "not_attempted"],
            "errors": refusals[:cap],
            "undo_files": [outcomes[c]["undo_file"] for c in companies if outcomes[c]["undo_file"]],
            "ambiguous": ambiguous[:cap],
            "ambiguous_count": len(ambiguous),
            "conflicts": conflicts[:cap],
            "conflict_count": len(conflicts),
            "digests": {c: outcomes[c]["digest"] for c in companies if outcomes[c]["digest"]},
            "deferred": [c for c in companies if outcomes[c]["status"] == "deferred"],
            "absent_companies": self.absent,
            "workers": self.workers_used,
            "pass_record": record,
            "delta": self.delta,
            "retries": self.retries,
            "queries": self.queries,
            "warnings": self.warnings,
        }
        if self.fingerprints is not None:
            # The aggregate lists every company with creds or keys: no second scan of the tables.
            result["untouched_companies"] = len(set(self.fingerprints).difference(companies))
            return self._capped(result, companies)
        try:
            self.db.ensure(lock=False)
            result["untouched_companies"] = self.db.one(UNTOUCHED_SQL, {"ids": list(companies)})[0]
            self.db.rollback()
        except (psycopg2.Error, SessionsError, DatabaseError):
            result["untouched_companies"] = None
        return self._capped(result, companies)

    def _capped(self, result, companies):
        if len(companies) > 1000 and not self.params["return_digests"]:
            result.pop("digests")
        return result


def failback(params, connect, target, check_mode):
    """Entry point of baileys_auth_import."""
    previous = os.umask(0o077)
    try:
        if params["mode"] == "undo":
            return Undo(params, connect, target, check_mode).run()
        return Failback(params, connect, target, check_mode).run()
    finally:
        os.umask(previous)


def auth_import_argument_spec():
    """The options of baileys_auth_import, connection options included (a new dict per call)."""
    argument_spec = postgres_argument_spec()
    argument_spec.update(
        mode=dict(type="str", choices=["import", "undo"], default="import"),
        src=dict(type="path", aliases=["path"]),
        companies=dict(type="list", elements="str"),
        missing_companies=dict(type="str", choices=["fail", "skip"], default="fail"),
        undo_dir=dict(type="path"),
        undo_file=dict(type="list", elements="path", aliases=["undo_files"]),
        since=dict(type="str"),
        force=dict(type="bool", default=False),
        ambiguous=dict(type="str", choices=["fail", "skip"], default="fail"),
        buffer_format=dict(type="str", choices=["array", "base64"], default="array"),
        continue_on_error=dict(type="bool", default=False),
        allow_other_database=dict(type="bool", default=False),
        require_manifest=dict(type="bool", default=True),
        max_report=dict(type="int", default=100),
        return_digests=dict(type="bool", default=False),
        lock_timeout=dict(type="int", default=300),
        changed_during_read=dict(type="str", choices=["refuse", "defer"], default="refuse"),
        pass_record=dict(type="path"),
        delta_from=dict(type="path"),
        identity_force_companies=dict(type="list", elements="str", default=[]),
    )
    return argument_spec


def import_failure(result, check_mode=False):
    """Why an import or undo run counts as failed (the module fails with it), or None."""
    if result["mode"] == "undo":
        failed = [result["undo_files"][p]["error"] for p in result["failed_files"]]
        return "undo failed: %s" % "; ".join(failed[:5]) if failed else None
    if not result["failed_companies"]:
        return None
    errors = "; ".join(e["error"] for e in result["errors"][:5])
    if not result["committed"]:
        head = "failback refused, nothing was written" if not check_mode else "failback would be refused"
    else:
        head = "failback stopped: %d companies committed (%s)" % (len(result["committed"]), ", ".join(result["committed"][:20]))
    tail = " (%d companies not attempted)" % len(result["not_attempted"]) if result["not_attempted"] else ""
    return "%s: %s%s" % (head, errors, tail)
