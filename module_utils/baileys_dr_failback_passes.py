# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The two-pass failback: the delta pass's proof (directory signatures and row fingerprints against the bulk
pass's record), its batches of companies prepared per file, and the pass record it writes.
"""

from __future__ import annotations

import os
import time

from ansible.module_utils.baileys_dr_codec import (
    KEY_TYPES,
    expiry_days,
)
from ansible.module_utils.baileys_dr_fs import write_file_atomic
from ansible.module_utils.baileys_dr_identity import import_refusal
from ansible.module_utils import baileys_dr_passfiles as passfiles
from ansible.module_utils.baileys_dr_passfiles import RACY_NS
from ansible.module_utils.baileys_dr_postgres import (
    connection_lost,
    copy_text,
    psycopg2,
)
from ansible.module_utils.baileys_dr_files import open_dir
from ansible.module_utils.baileys_dr_tree import (
    COMPANY_PREFIX,
    CREDS_FILE,
    encode_json,
    iso,
    SessionsError,
    test_hook,
    utc_now,
)
from ansible.module_utils.baileys_dr_failback_company import CompanyPlan, new_outcome
from ansible.module_utils.baileys_dr_failback_db import (
    BATCH_COPY_SQL,
    BATCH_CREDS_INSERT_SQL,
    BATCH_CREDS_STATE_SQL,
    BATCH_CREDS_TEXT_SQL,
    BATCH_CREDS_UPDATE_SQL,
    BATCH_DELETE_SQL,
    BATCH_FINGERPRINT_SQL,
    BATCH_KEYS_STATE_SQL,
    BATCH_PROVE_SQL,
    BATCH_SAVE_CREDS_SQL,
    BATCH_SAVE_KEYS_SQL,
    BATCH_WRITE_SQL,
    DELTA_BATCH,
    FINGERPRINT_SQL,
    READ_ONLY_SQL,
    TXN_BATCH_SQL,
    XID_STATE_SQL,
    chunks,
)
from ansible.module_utils.baileys_dr_failback_errors import CompanyRefused, FailbackError, FileProblem
from ansible.module_utils.baileys_dr_pass_record import (
    MAX_RECORD_XIDS,
    PASS_FORMAT,
    PASS_KIND,
    XID_WRAP,
    fingerprint_text,
    load_pass_record,
    record_xids,
)
from ansible.module_utils.baileys_dr_source_files import database_line
from ansible.module_utils.baileys_dr_source_scan import ScanWorkers, directory_signature, scan_company
from ansible.module_utils.baileys_dr_undo import UNDO_FORMAT, UNDO_KIND, UndoWriter, remove_undo_file, write_undo_files


class _LeftOut(Exception):
    """Delta batch: companies ({company: why}) the batch leaves out (rolled back, done again without them)."""

    def __init__(self, reasons):
        super().__init__(", ".join(sorted(reasons)))
        self.reasons = reasons


class FailbackPasses:
    """Failback's bulk and delta passes (a mixin of Failback: self is the run)."""

    # -- two passes --
    def _prove_unchanged(self, src, companies, bad, outcomes):
        """Delta pass: the companies whose directory signature and rows' fingerprint are the pass record's are proven
        unchanged (status unchanged_proven, no file read); the others are returned, to be imported fully."""
        started = time.monotonic()
        path = self.params["delta_from"]
        record = load_pass_record(path)
        if record["tree"] != src:
            raise FailbackError("the pass record %s was written for the tree %s, not %s: refusing it (it proves the files of its "
                                "own tree only)" % (path, record["tree"], src))
        if record["system_identifier"] != self.meta["system_identifier"]:
            raise FailbackError("the pass record %s was written for the database with system identifier %s, this one is %s: "
                                "refusing it (row versions prove nothing in another database)"
                                % (path, record["system_identifier"], self.meta["system_identifier"]))
        candidates = [c for c in companies if c not in bad and (record["companies"].get(c) or {}).get("signature")
                      and record["companies"][c].get("fingerprint")]
        # A company whose pass files record allows it is prepared per file from the proof's own listing; its directory is
        # watched from before that listing (the check before its batch's COMMIT).
        per_file = not self.params.get("pass_record")
        eligible = {}
        if per_file:
            for company_id in candidates:
                entry = record["companies"][company_id]
                if entry.get("files") and entry.get("digest"):
                    eligible[company_id] = entry["signature"]
                    self.tree.bases[company_id] = {"path": path, "files": entry["files"], "digest": entry["digest"],
                                                   "fingerprint": entry["fingerprint"]}
            if eligible:
                self.watch = passfiles.DirectoryWatch(src)
                for company_id in eligible:
                    try:
                        dir_fd = open_dir(COMPANY_PREFIX + company_id, self.tree.root_fd)
                    except (OSError, SessionsError):
                        continue  # no watch: listed again before the COMMIT (the listing says what is wrong)
                    try:
                        self.watch.add(company_id, dir_fd)
                    finally:
                        os.close(dir_fd)
        # The listings (forked workers) and the aggregate query (the server) run at the same time.
        scan = ScanWorkers(self.tree.root_fd, candidates, self._prepare if eligible else None, eligible).start()
        try:
            fingerprints, timeline, next_xid = self._retrying("the fingerprint query", self._fingerprint_state)
        except BaseException:
            scan.reap()
            raise
        signatures = scan.results()
        for company_id in eligible:
            self.tree.bases.pop(company_id, None)  # set again below when the rows are still the bulk pass's
        # Row versions written on another timeline (a promoted standby, a point-in-time recovery) may reuse xids.
        same_lifetime = record.get("timeline_id") == timeline
        if not same_lifetime:
            self.warnings.append("the pass record %s is of timeline %s, the database is on timeline %s: no company is proven "
                                 "unchanged and the since guard exempts no row" % (path, record.get("timeline_id"), timeline))
        entries = record["companies"]
        for company_id, xids in record_xids(record).items():
            # Within 2^31 transactions (xid wraparound) of this server's history only.
            xids = sorted(x % XID_WRAP for x in xids if same_lifetime and 0 <= next_xid - x < (1 << 31))
            if xids:
                self.exempt[company_id] = xids
        deferred = set(record["deferred"])
        reasons, todo = {}, []
        for company_id in companies:
            entry = entries.get(company_id) or {}
            if company_id in bad:
                reason = "refused"
            elif company_id in deferred:
                reason = "deferred by the bulk pass"
            elif not entry:
                reason = "not in the pass record"
            elif not same_lifetime:
                reason = "another timeline"
            elif not entry.get("signature") or not entry.get("fingerprint"):
                reason = "not provable from the bulk pass"
                self._per_file_base(per_file, company_id, entry, fingerprints)
            elif signatures[company_id][0] != entry["signature"]:
                reason = "files changed" if signatures[company_id][1] is None else "files %s" % signatures[company_id][1]
                if signatures[company_id][1] is None:
                    self._per_file_base(per_file, company_id, entry, fingerprints)
                    if company_id in self.tree.bases and signatures[company_id][2] is not None:
                        # Prepared from the proof's listing: written in a batch, without reading the directory again
                        # (a company a batch leaves out is read whole).
                        self.prepared[company_id] = signatures[company_id][2]
                        self.tree.bases.pop(company_id)
            elif fingerprints.get(company_id) != entry["fingerprint"]:
                reason = "rows changed"
            else:
                outcomes[company_id].update(status="unchanged_proven", digest=entry.get("digest"))
                self.passed[company_id] = {k: entry.get(k) for k in ("signature", "fingerprint", "xid", "digest", "files")}
                continue
            reasons[reason] = reasons.get(reason, 0) + 1
            todo.append(company_id)
        self.delta = {"companies": len(companies), "unchanged_proven": len(companies) - len(todo), "imported": len(todo),
                      "not_proven": reasons, "from": path, "proof_seconds": round(time.monotonic() - started, 3),
                      "per_file_candidates": len(self.tree.bases) + len(self.prepared), "batched": len(self.prepared),
                      "watched": 0 if self.watch is None else len(self.watch.watched()),
                      "watch_off": None if self.watch is None else self.watch.why}
        return todo

    def _prepare(self, company_id, dir_fd, stats, observed_ns, signature):
        """ScanWorkers' prepare: SourceTree.prepare_changed with this run's options."""
        return self.tree.prepare_changed(company_id, dir_fd, stats, observed_ns, signature, self.params["ambiguous"],
                                         self.params["buffer_format"])

    # -- a delta pass's batches (the companies prepared per file) --
    def _delta_batches(self, companies, outcomes, index_of, write):
        """Pass 1 (write False): the prepared companies planned DELTA_BATCH at a time in read-only transactions; one
        whose rows are no longer the bulk pass's leaves the batches (self.prepared) for the per-company way, read whole.
        Pass 2: written, one transaction per batch; a company a batch cannot prove or whose files changed since their
        listing is left out (the batch is done again without it). Returns the companies left out, to be written alone."""
        alone = []
        stop = write and not self.params["continue_on_error"]
        for part in chunks(companies, DELTA_BATCH):
            members = list(part)
            while members:
                what = "a delta batch of %d companies (%s)" % (len(members), "writes" if write else "plan")
                if write:
                    left_out = self._retrying(what, lambda: self._write_batch(members, outcomes, index_of))
                else:
                    left_out = self._retrying(what, lambda: self._plan_batch(members, outcomes))
                if not left_out:
                    break
                for company_id in left_out:
                    self.left_out[company_id] = left_out[company_id]
                    self.prepared.pop(company_id, None)
                    self.batch_plans.pop(company_id, None)
                    outcomes[company_id].clear()
                    outcomes[company_id].update(new_outcome())
                alone.extend(sorted(left_out))
                members = [c for c in members if c not in left_out]
            if stop and any(outcomes[c]["status"] == "failed" for c in part):
                break
        return alone

    def _batch_fingerprints(self, members):
        rows = self.db.all(BATCH_FINGERPRINT_SQL, {"batch": list(members), "key_types": list(KEY_TYPES)})
        return {c: fingerprint_text(k, h, x) for c, k, h, x in rows}

    @staticmethod
    def _batch_keys(keys):
        return {"companies": [k[0] for k in keys], "types": [k[1] for k in keys], "ids": [k[2] for k in keys]}

    def _batch_state(self, members):
        """({(company, type, id): (updated_at, changed after since, hashint8(xmin))} of the rows the batch replaces or
        deletes, {company: (creds text, updated_at, changed after since)} of the creds it replaces)."""
        keys = [(c, e.key_type, e.key_id) for c in members for e in self.prepared[c].updates]
        keys += [(c,) + key for c in members for key in self.prepared[c].deletes]
        exempt = [(c, x) for c in members for x in self.exempt.get(c, [])]
        args = {"since": self.since, "exempt_c": [e[0] for e in exempt], "exempt_x": [e[1] for e in exempt]}
        states = {}
        for part in chunks(keys):
            for c, t, i, updated, after, xmin_hash in self.db.all(BATCH_KEYS_STATE_SQL, dict(args, **self._batch_keys(part))):
                states[(c, t, i)] = (updated, after, xmin_hash)
        creds = [c for c in members if self.prepared[c].creds == "updated"]
        creds_rows = {}
        if creds:
            for c, text, updated, after in self.db.all(BATCH_CREDS_STATE_SQL, dict(args, batch=creds)):
                creds_rows[c] = (text, updated, after)
        return states, creds_rows

    def _plan_batch(self, members, outcomes):
        """Pass 1 of a batch, read-only: each company planned from its prepared files and the rows they replace (their
        versions, the since guard) or the creds (the identity guard). Returns {company: why} of those whose rows are gone."""
        db = self.db
        # The rows were the bulk pass's at the proof (the aggregate, after the stop); the batch's transaction proves they
        # still are (_prove_batch) before its COMMIT.
        try:
            db.ensure(lock=self.lock)
            db.execute(READ_ONLY_SQL)
            states, creds_rows = self._batch_state(members)
        finally:
            db.rollback()
        stale = []
        for company_id in members:
            prepared, outcome = self.prepared[company_id], outcomes[company_id]
            plan = CompanyPlan()
            plan.proven = False
            plan.updates, plan.inserts, plan.deletes = list(prepared.updates), list(prepared.inserts), list(prepared.deletes)
            plan.unchanged, plan.creds, plan.creds_present = prepared.unchanged, prepared.creds, prepared.creds_present
            for key in [(e.key_type, e.key_id) for e in prepared.updates] + prepared.deletes:
                row = states.get((company_id,) + key)
                if row is None:
                    break  # a row the bulk pass left is gone: not the bulk pass's rows after all
                plan.row_hashes[key] = row[2]
                if row[1]:
                    plan.conflicts.append({"type": key[0], "id": key[1], "updated_at": row[0]})
            else:
                row = creds_rows.get(company_id)
                if prepared.creds != "updated" or row is not None:
                    self._plan_prepared(company_id, prepared, plan, row, outcome)
                    continue
            stale.append(company_id)
        return dict.fromkeys(stale, "its rows changed since the bulk pass")

    def _plan_prepared(self, company_id, prepared, plan, creds_row, outcome):
        outcome.update(read="changed_files", files_read=prepared.files_read, read_whole_because=None, ambiguous=0, _ambiguous=[])
        if creds_row is not None:
            # Before any write: fresh or other creds in the files never replace the registered ones of the database.
            refusal = import_refusal(company_id, creds_row[0], prepared.creds_value, self.params.get("identity_force_companies"))
            if refusal:
                self._record_plan(company_id, plan, outcome)
                outcome.update(status="refused", error="company %s: %s" % (company_id, refusal))
                return
            if creds_row[2]:
                plan.conflicts.append({"type": "creds", "id": None, "updated_at": creds_row[1]})
        plan.conflicts.sort(key=lambda c: c["updated_at"] or "")
        self._record_plan(company_id, plan, outcome)
        if plan.conflicts and not self.params["force"]:
            outcome.update(status="refused", error="company %s: %s" % (company_id, self._conflict_message(plan)))
            return
        self.batch_plans[company_id] = plan
        if self.check_mode:
            outcome.update(status="would_change" if plan.writes else "unchanged", digest=prepared.digest)
        else:
            outcome["status"] = "planned"

    def _write_batch(self, members, outcomes, index_of):
        """Pass 2 of a batch, one transaction: the undo files (synced while the server writes, before the COMMIT); the
        writes; the proof (the rows the bulk pass's and the plan's writes); the directories unchanged since their listing;
        COMMIT. Returns
        the companies left out (the transaction rolled back, to be done again without them), {company: why}; {} once committed or failed."""
        db = self.db
        undo, committing, txid = {}, False, None
        plans = {c: self.batch_plans[c] for c in members}
        writing = [c for c in members if plans[c].writes]
        try:
            db.ensure(lock=self.lock)
            for company_id in members:
                outcomes[company_id].update(status=None, error=None, undo_file=None, digest=None)
            txn_now, txid, xid_hash = db.one(TXN_BATCH_SQL)
            for company_id in writing:
                plans[company_id].written_by = (txid, xid_hash)
            saving = self._save_batch(writing, plans, txn_now, txid)
            try:
                self._apply_batch(writing, plans)
            finally:
                undo = saving.wait()
            unproven = self._prove_batch(members, plans)
            if unproven:
                raise _LeftOut(unproven)
            for company_id in members:  # the point after each company's writes, before its COMMIT: the batch's
                test_hook("import_company:%d" % index_of[company_id])
            changed = self._changed_since_listing(members)
            if changed:
                raise _LeftOut(changed)
            committing = True
            db.conn.commit()
        except _LeftOut as exc:
            db.rollback()
            for path in undo.values():
                remove_undo_file(path)
            for company_id, why in sorted(exc.reasons.items()):
                self.warnings.append("company %s: left out of its delta batch (%s): read whole and imported alone" % (company_id, why))
            return exc.reasons
        except (psycopg2.Error, SessionsError, OSError, FileProblem) as exc:
            lost = connection_lost(exc, db.conn)
            db.rollback()
            state = self._commit_state(txid) if committing and txid is not None else "aborted"
            if state != "committed":
                if state == "aborted":
                    for path in undo.values():
                        remove_undo_file(path)
                    undo = {}
                fate = "nothing of it was committed" if state == "aborted" else \
                    "whether the COMMIT took effect is unknown (txid %s: %s); its undo file is kept" % (txid, state)
                text = exc.pgerror if isinstance(exc, psycopg2.Error) and exc.pgerror else str(exc)
                kind = "the database" if isinstance(exc, psycopg2.Error) else "the import"
                for company_id in members:
                    outcomes[company_id].update(
                        status="failed", undo_file=undo.get(company_id), digest=None,
                        error="company %s: %s failed in its delta batch of %d companies: %s; %s"
                              % (company_id, kind, len(members), " ".join(str(text).split()), fate))
                if lost and state == "aborted" and self.two_pass:
                    raise  # retried on a new connection (_retrying): nothing of the batch was committed
                return {}
            self.warnings.append("a delta batch (%s): the COMMIT reported an error (%s) but the transaction committed"
                                 % (", ".join(members[:5]), exc))
        for company_id in members:
            outcomes[company_id].update(status="imported" if plans[company_id].writes else "unchanged",
                                        undo_file=undo.get(company_id), digest=self.prepared[company_id].digest)
        return {}

    def _save_batch(self, writing, plans, txn_now, txid):
        """The rows the batch's writes replace or delete, read, and its undo files (one per company, format 1) started
        in a thread (UndoWriter with write_undo_files)."""
        actions = {}
        for c in writing:
            actions.update(((c, e.key_type, e.key_id), "updated") for e in plans[c].updates)
            actions.update(((c,) + key, "deleted") for key in plans[c].deletes)
        saved = {c: [] for c in writing}
        moved = set()  # a row replaced or deleted is not the version pass 1 planned (and checked against since) with
        for part in chunks(sorted(actions)):
            for c, t, i, value, created, updated, expires, xmin_hash in self.db.all(BATCH_SAVE_KEYS_SQL, self._batch_keys(part)):
                saved[c].append({"table": "whatsapp_keys", "action": actions[(c, t, i)], "key_type": t, "key_id": i,
                                 "value": value, "created_at": created, "updated_at": updated, "expires_at": expires})
                if xmin_hash != plans[c].row_hashes.get((t, i)):
                    moved.add(c)
        moved.update(c for c in writing if len(saved[c]) != len(plans[c].updates) + len(plans[c].deletes))
        creds = {}
        replaced = [c for c in writing if plans[c].creds == "updated"]
        if replaced:
            for c, text, created, updated, xmin in self.db.all(BATCH_SAVE_CREDS_SQL, {"batch": replaced}):
                creds[c] = {"table": "whatsapp_auth", "action": "updated", "creds": text, "created_at": created, "updated_at": updated}
                if xmin != self.prepared[c].fingerprint.rsplit(":", 1)[1]:
                    moved.add(c)
            moved.update(c for c in replaced if c not in creds)
        if moved:
            raise _LeftOut(dict.fromkeys(sorted(moved), "its rows changed since the bulk pass"))
        items = []
        for c in writing:
            plan = plans[c]
            records = [creds[c]] if plan.creds == "updated" else [{"table": "whatsapp_auth", "action": "inserted"}] \
                if plan.creds == "inserted" else []
            records.extend(saved[c])
            records.extend({"table": "whatsapp_keys", "action": "inserted", "key_type": e.key_type, "key_id": e.key_id}
                           for e in plan.inserts)
            items.append((c, self._undo_header(c, plan, txn_now, txid), records))
        undo_dir = self.params["undo_dir"]
        os.makedirs(undo_dir, mode=0o700, exist_ok=True)
        return UndoWriter(undo_dir, items, write=write_undo_files)

    def _undo_header(self, company_id, plan, txn_now, txid):
        return {"format": UNDO_FORMAT, "kind": UNDO_KIND, "company_id": company_id, "created_at": iso(utc_now()),
                "txn_started_at": txn_now, "txid": int(txid), "system_identifier": self.meta["system_identifier"],
                "target": self.target, "source": {"path": self.tree.path, "manifest": self.tree.kind,
                                                  "generation": (self.tree.top or {}).get("generation")},
                "since": self.since, "counts": {"inserted": len(plan.inserts), "updated": len(plan.updates),
                                                "deleted": len(plan.deletes), "creds": plan.creds}}

    def _apply_batch(self, writing, plans):
        db = self.db
        deletes = [(c,) + key for c in writing for key in plans[c].deletes]
        deleted = sum(db.execute(BATCH_DELETE_SQL, self._batch_keys(part)) for part in chunks(deletes))
        if deleted != len(deletes):
            raise FailbackError("%d rows to delete but %d deleted" % (len(deletes), deleted))
        updates = sum(len(plans[c].updates) for c in writing)
        inserts = sum(len(plans[c].inserts) for c in writing)
        if updates or inserts:
            db.copy(BATCH_COPY_SQL, self._batch_lines(writing, plans))
        for action, count in (("u", updates), ("i", inserts)):
            done = db.execute(BATCH_WRITE_SQL[action]) if count else 0
            if done != count:
                raise FailbackError("%d rows to write but %d written" % (count, done))
        for action, sql in (("updated", BATCH_CREDS_UPDATE_SQL), ("inserted", BATCH_CREDS_INSERT_SQL)):
            companies = [c for c in writing if plans[c].creds == action]
            if companies and db.execute(sql, {"companies": companies, "texts": [self.prepared[c].creds_text for c in companies]}) \
                    != len(companies):
                raise FailbackError("the creds rows were not written")

    @staticmethod
    def _batch_lines(writing, plans):
        for c in writing:
            for action, entries in (("u", plans[c].updates), ("i", plans[c].inserts)):
                for e in entries:
                    yield "%s\t%s\t%s\t%s\t%s\t%d\n" % (copy_text(c), action, copy_text(e.key_type), copy_text(e.key_id),
                                                     copy_text(e.text), expiry_days(e.key_type))

    def _prove_batch(self, members, plans):
        """After the batch's writes, per company (_prove's checks): every written row is the JSONB of the text sent, the
        rows not written are the bulk pass's (the fingerprint, one query for the batch, is the recorded one less the rows
        replaced or deleted, plus the rows written), the creds read back as the files' (or the bulk pass's). {company: why
        not} of those that fail."""
        reasons = {}
        for c, kind, t, i in self.db.all(BATCH_PROVE_SQL):
            reasons.setdefault(c, "after the writes %s %r is %s" % (t, i, "missing" if kind == "missing" else "not what was sent"))
        now = self._batch_fingerprints(members)
        for c in members:
            expected = self._fingerprint_after(self.prepared[c].fingerprint, plans[c])
            if now.get(c) != expected:
                # One query for both: the rows were the bulk pass's in this transaction (as planned), and the writes are
                # the plan's (any other row, or a row the plan read with another version, gives another sum).
                reasons.setdefault(c, "its rows changed since the bulk pass")
        texts = dict(self.db.all(BATCH_CREDS_TEXT_SQL, {"batch": list(members)}))
        for c in members:
            try:
                same = database_line(None, None, texts.get(c)) == self.prepared[c].creds_line
            except CompanyRefused:
                same = False
            if not same:
                reasons.setdefault(c, "after the writes the creds do not read back as creds.json")
        return reasons

    def _changed_since_listing(self, members):
        """{company: why} of the companies whose directory changed since the listing their batch used: those the watch
        saw an event in (or could not watch) are listed again and compared with it."""
        suspects = self.watch.suspects(members) if self.watch is not None else set(members)
        changed = {}
        for company_id in sorted(suspects):
            signature, why = scan_company(self.tree.root_fd, company_id)
            if signature != self.prepared[company_id].signature:
                changed[company_id] = "its files changed after they were listed%s" % (" (directory %s)" % why if why else "")
        return changed

    def _per_file_base(self, per_file, company_id, entry, fingerprints):
        """A company whose files changed since the bulk pass but whose rows are still the bulk pass's: only its changed
        files are read (SourceTree.bases) when the bulk pass left its pass files record. (A bulk pass run again, with
        pass_record, reads every company whole.)"""
        if per_file and entry.get("files") and entry.get("digest") and entry.get("fingerprint") \
                and fingerprints.get(company_id) == entry["fingerprint"]:
            self.tree.bases[company_id] = {"path": self.params["delta_from"], "files": entry["files"], "digest": entry["digest"],
                                           "fingerprint": entry["fingerprint"]}

    def _fingerprint_state(self):
        """({company: fingerprint} of every company, timeline id, next 64-bit xid), one aggregate query."""
        args = {"key_types": list(KEY_TYPES)}
        fingerprints = {c: fingerprint_text(k, h, x) for c, k, h, x in self.db.all(FINGERPRINT_SQL, args)}
        timeline, next_xid = self.db.one(XID_STATE_SQL)
        self.db.rollback()
        self.fingerprints = fingerprints
        return fingerprints, timeline, int(next_xid)

    def _write_pass_record(self, src, companies, outcomes):
        """The pass record of this run, written atomically (0600, fsynced): what a delta pass may skip."""
        path = self.params["pass_record"]
        fingerprints, timeline, next_xid = self._retrying("the fingerprint query", self._fingerprint_state)
        entries = {}
        for company_id in companies:
            entry = self.passed.get(company_id)
            if entry is None:
                continue
            entry = dict(entry)
            if entry["signature"] is None:
                entry["unproven"] = "files written within %d ms of the listing (a same-size rewrite would keep the signature)" \
                                    % (RACY_NS // 1000000)
            if entry["fingerprint"] != fingerprints.get(company_id):
                # Rows changed after the company's read or COMMIT by another writer: the delta pass imports it again (and
                # its since guard sees the change).
                entry["fingerprint"] = None
                entry["unproven"] = "its rows changed in PostgreSQL after the import"
            entries[company_id] = entry
        xids = self._earlier_xids(src, timeline)
        for company_id, entry in entries.items():
            if entry["xid"] is not None:
                xids.setdefault(company_id, set()).add(entry["xid"])
        record = {"format": PASS_FORMAT, "kind": PASS_KIND, "created_at": iso(utc_now()), "tree": src,
                  "system_identifier": self.meta["system_identifier"], "timeline_id": timeline, "next_xid": next_xid,
                  "since": self.since, "companies": entries,
                  "deferred": [c for c in companies if outcomes[c]["status"] == "deferred"],
                  "xids": {c: sorted(v, reverse=True)[:MAX_RECORD_XIDS] for c, v in sorted(xids.items())}}
        try:
            write_file_atomic(path, encode_json(record) + b"\n", mode=0o600)
        except OSError as exc:
            raise FailbackError("the pass record %s cannot be written (%s); the companies committed stay committed"
                                % (path, exc.strerror or exc)) from None
        passfiles.remove_others(path, [c for c, entry in entries.items() if entry.get("files")])
        return path

    def _earlier_xids(self, src, timeline):
        """record_xids of the records of this failback's earlier passes: the one this run replaces at pass_record (a bulk
        pass run again) and the delta pass's delta_from, when of this tree, database and timeline. A pass run again
        finds the rows an earlier run wrote equal (no xid of its own): their row versions stay exempt."""
        xids = {}
        for path in dict.fromkeys(p for p in (self.params.get("delta_from"), self.params.get("pass_record")) if p):
            if not os.path.exists(path):
                continue
            try:
                record = load_pass_record(path)
            except FailbackError:
                continue  # replaced: an unusable record exempts nothing
            if (record["tree"], record["system_identifier"], record.get("timeline_id")) != (
                    src, self.meta["system_identifier"], timeline):
                continue
            for company_id, found in record_xids(record).items():
                xids.setdefault(company_id, set()).update(found)
        return xids

    def _pass_entry(self, files, fingerprint, xid, digest):
        if self.params.get("pass_record"):
            self.passed[files.company_id] = {"signature": directory_signature(files.before, files.observed_ns),
                                             "fingerprint": fingerprint, "xid": None if xid is None else int(xid),
                                             "digest": digest, "files": self._pass_files(files, digest)}

    def _pass_files(self, files, digest):
        """Write the company's pass files record (what lets the delta pass read only changed files); its sha256, or None
        (the delta pass then reads the company whole)."""
        if files.digest_data is None or digest is None:
            return None
        keys = [(key_type, key_id, files.keys[(key_type, key_id)].name) for key_type, key_id in files.digest_keys]
        data = passfiles.encode(files.company_id, keys, CREDS_FILE if files.creds is not None else None, files.before,
                                files.stats, files.observed_ns, files.digest_data)
        try:
            return passfiles.write(self.params["pass_record"], files.company_id, data)
        except OSError as exc:
            self.warnings.append("company %s: its pass files record cannot be written (%s): the delta pass reads it whole"
                                 % (files.company_id, exc.strerror or exc))
            return None

    def _deferral(self, files):
        """Why a company is left to the delta pass (changed_during_read=defer), or None."""
        if not self.defer:
            return None
        if files.changed:
            return "its files changed while they were read (%s)" % ", ".join(files.changed[:5])
        if files.problems and files.before:
            # A vanished or torn file may be a write caught half-way: look again at the listing taken before the read.
            try:
                changed = self.tree.unchanged_since_read(files, before=files.before)
            except (OSError, SessionsError):
                return None
            if changed:
                return "its files changed while they were read (%s)" % changed
        return None
