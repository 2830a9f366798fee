# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""One company of a failback, either pass: read, planned (insert, update, delete) against its rows, written in
one transaction with its undo, proven on the server.
"""

from __future__ import annotations

import hashlib
import os
import time

from ansible.module_utils.baileys_dr_codec import (
    KEY_TYPES,
    expiry_days,
    key_file_name,
    sort_key,
)
from ansible.module_utils.baileys_dr_identity import import_refusal
from ansible.module_utils import baileys_dr_passfiles as passfiles
from ansible.module_utils.baileys_dr_postgres import (
    RETRY_DELAYS,
    connection_lost,
    copy_text,
    psycopg2,
)
from ansible.module_utils.baileys_dr_tree import (
    creds_line,
    DigestLines,
    HEADER_LINE,
    iso,
    key_line,
    SessionsError,
    test_hook,
    utc_now,
)
from ansible.module_utils.baileys_dr_failback_db import (
    AMBIGUOUS_ROWS_SQL,
    COMPANY_FINGERPRINT_SQL,
    CREDS_STATE_SQL,
    CREDS_TEXT_SQL,
    DELETE_KEYS_SQL,
    INSERT_CREDS_SQL,
    INSERT_STAGED_SQL,
    KEYS_STATE_SELECTED_SQL,
    KEYS_STATE_SQL,
    PROVE_STAGED_SQL,
    PROVE_WRITTEN_SQL,
    READ_ONLY_SQL,
    SAVE_CREDS_SQL,
    SAVE_KEYS_SQL,
    STAGE_COPY_SQL,
    TXN_STAGE_SQL,
    UPDATE_CREDS_SQL,
    UPDATE_STAGED_SQL,
    VALUES_SQL,
    chunks,
)
from ansible.module_utils.baileys_dr_failback_errors import (
    BaseStale,
    CompanyRefused,
    Deferred,
    FailbackError,
    FileProblem,
)
from ansible.module_utils.baileys_dr_pass_record import XID_WRAP, fingerprint_text
from ansible.module_utils.baileys_dr_source_files import database_line, exported_array_text, stored_text
from ansible.module_utils.baileys_dr_undo import UNDO_FORMAT, UNDO_KIND, UndoWriter, remove_undo_file


# -- one company ------------------------------------------------------------------------------------


class CompanyPlan:
    """What a failback changes in one company's rows, decided before anything is written."""

    def __init__(self):
        self.inserts = []  # FileEntry
        self.updates = []  # FileEntry
        self.deletes = []  # (type, id)
        self.kept = []  # (type, id): rows of skipped ambiguous files, left as they are
        self.unchanged = 0
        self.reverted = 0  # updates back to the exported value: rows changed after the export, files untouched
        self.creds = None  # None, "inserted" or "updated"
        self.creds_present = False
        self.conflicts = []
        self.lines = {}  # (type, id) -> the file's digest line, computed while comparing
        self.proven = True  # every row equals the manifest's: the digest is the manifest's
        self.row_hashes = {}  # (type, id) -> hashint8(xmin) of every row read
        self.creds_xmin = None
        self.written_by = None  # (txid, hashint8 of its 32-bit xid) of the writing transaction

    def fingerprint(self, xid=None, xid_hash=None):
        """The company's fingerprint once the plan is committed by the transaction xid (whose hashint8 is xid_hash), or
        as read when nothing is written; no query: the rows read carry their hashint8(xmin)."""
        replaced = {(e.key_type, e.key_id) for e in self.updates}
        replaced.update(self.deletes)
        total = sum(h for key, h in self.row_hashes.items() if key not in replaced)
        if self.writes:
            total += (len(self.updates) + len(self.inserts)) * int(xid_hash)
        creds_xmin = str(int(xid) % XID_WRAP) if self.creds else self.creds_xmin
        return fingerprint_text(len(self.row_hashes) - len(self.deletes) + len(self.inserts), total, creds_xmin)

    @property
    def writes(self):
        return bool(self.inserts or self.updates or self.deletes or self.creds)

    def counts(self):
        return {"inserted": len(self.inserts), "updated": len(self.updates), "deleted": len(self.deletes),
                "unchanged": self.unchanged, "creds_changed": self.creds is not None, "creds": self.creds or
                ("unchanged" if self.creds_present else "absent"), "kept": len(self.kept), "conflicts": len(self.conflicts),
                "reverted": self.reverted}


def new_outcome():
    return {"status": None, "inserted": 0, "updated": 0, "deleted": 0, "unchanged": 0, "creds_changed": False, "creds": None,
            "kept": 0, "reverted": 0, "conflicts": 0, "ambiguous": 0, "undo_file": None, "digest": None, "error": None,
            "reason": None, "read": None, "files_read": 0,
            "read_whole_because": None}


class FailbackCompany:
    """Failback's work on one company (a mixin of Failback: self is the run)."""

    # -- one company, either pass --
    def _company(self, index, company_id, outcome, reader, write):
        files = self._read(company_id, outcome, lambda: reader.read(company_id))
        if files is None:
            return
        if files.whole_because is None and company_id in self.left_out:
            files.whole_because = self.left_out[company_id]
        try:
            self._company_files(index, company_id, outcome, files, write)
        except BaseStale:
            # The rows moved since the bulk pass (another writer): what the bulk pass read proves nothing, read it whole.
            self.tree.bases.pop(company_id, None)
            files = self._read(company_id, outcome, lambda: self.tree.read_company(company_id, self.params["ambiguous"]))
            if files is not None:
                files.whole_because = "its rows changed since the bulk pass"
                self._company_files(index, company_id, outcome, files, write)

    @staticmethod
    def _read(company_id, outcome, read):
        """The company's files (read()), or None with the outcome refused saying why."""
        try:
            return read()
        except CompanyRefused as exc:
            outcome.update(status="refused", error="company %s: %s" % (company_id, exc))
        except (OSError, SessionsError) as exc:
            outcome.update(status="refused", error="company %s: its files cannot be read: %s" % (company_id, exc))
        return None

    def _company_files(self, index, company_id, outcome, files, write):
        mode = self.params["ambiguous"]
        outcome["ambiguous"] = len(files.ambiguous)
        outcome["files_read"] = files.counts["files"]
        outcome["read"] = "changed_files" if files.base is not None else "whole"
        outcome["read_whole_because"] = files.whole_because
        if not write:
            if files.ambiguous:
                self._retrying("company %s (ambiguous files)" % company_id, lambda: self._ambiguous_hints(company_id, files))
            outcome["_ambiguous"] = files.ambiguous
        deferred = self._deferral(files)
        if deferred:
            outcome.update(status="deferred", reason="company %s: %s" % (company_id, deferred))
            return
        if files.problems:
            outcome.update(status="refused", error="company %s: refused before any write: %s" % (company_id, files.reasons()))
            return
        if files.ambiguous and mode == "fail":
            names = ", ".join(a["file"] for a in files.ambiguous[:5])
            outcome.update(status="refused", error="company %s: %d file(s) whose original id cannot be told for certain: %s "
                                                   "(see ambiguous; ambiguous=skip leaves them out)" % (company_id, len(files.ambiguous), names))
            return

        def attempt():
            # Done again on a new connection when the connection drops (the transaction never committed): the files read
            # stay the same, the check before the COMMIT still compares the directory with them.
            try:
                self.db.ensure(lock=self.lock)
                if write:
                    outcome.update(status=None, error=None, undo_file=None, digest=None)
                    self._write_company(index, company_id, files, outcome)
                else:
                    self._check_company(company_id, files, outcome)
            except CompanyRefused as exc:
                self.db.rollback()
                outcome.update(status="refused", error="company %s: %s" % (company_id, exc))
            finally:
                self.db.rollback()

        self._retrying("company %s (%s)" % (company_id, "writes" if write else "plan"), attempt)

    def _ambiguous_hints(self, company_id, files):
        for entry in files.ambiguous[: self.params["max_report"]]:
            stem = entry["file"][len(entry["type"]) + 1: -len(".json")]
            rows = self.db.all(AMBIGUOUS_ROWS_SQL, {"company": company_id, "type": entry["type"], "name": stem})
            entry["in_database"] = [r[0] for r in rows]
        self.db.rollback()

    def _check_company(self, company_id, files, outcome):
        """Pass 1 (and check mode): plan in a read-only transaction."""
        self.db.execute(READ_ONLY_SQL)
        plan = self._plan(company_id, files)
        self._record_plan(company_id, plan, outcome)
        if plan.conflicts and not self.params["force"]:
            raise CompanyRefused(self._conflict_message(plan))
        if self.check_mode:
            outcome["digest"] = self._digests(company_id, files, plan, written=False)
            outcome["status"] = "would_change" if plan.writes else "unchanged"
        else:
            outcome["status"] = "planned"

    @staticmethod
    def _conflict_message(plan):
        shown = ", ".join("%s %s (%s)" % (c["type"], repr(c["id"]) if c["id"] is not None else "", c["updated_at"]) for c in plan.conflicts[:5])
        return ("%d row(s) changed in PostgreSQL after since would be overwritten or deleted: %s%s; refused (force=true imports "
                "anyway, the rows are saved in the undo file)" % (len(plan.conflicts), shown, " ..." if len(plan.conflicts) > 5 else ""))

    def _record_plan(self, company_id, plan, outcome):
        outcome.update(plan.counts())
        outcome["_conflicts"] = [dict(c, company=company_id) for c in plan.conflicts]

    def _write_company(self, index, company_id, files, outcome):
        """Pass 2: plan again inside the writing transaction, save, write, prove, commit."""
        undo = None
        committing = False
        txid = None
        try:
            plan = self._plan(company_id, files)
            self._record_plan(company_id, plan, outcome)
            if plan.conflicts and not self.params["force"]:
                raise CompanyRefused(self._conflict_message(plan))
            if not plan.writes:
                outcome["digest"] = self._digests(company_id, files, plan, written=False)
                outcome["status"] = "unchanged"
                self._pass_entry(files, plan.fingerprint(), None, outcome["digest"])
                return
            txn_now, txid, xid_hash = self.db.one(TXN_STAGE_SQL)
            plan.written_by = (txid, xid_hash)
            # The undo file is written and synced while the server does the writes; nothing commits before it is durable.
            saving = self._save(company_id, files, plan, txn_now, txid)
            try:
                self._apply(company_id, files, plan)
            finally:
                undo = saving.wait()
            outcome["digest"] = self._digests(company_id, files, plan, written=True)
            test_hook("import_company:%d" % index)
            changed = self.tree.unchanged_since_read(files)
            if changed and self.defer:
                raise Deferred("its files changed while it was imported (%s)" % changed)
            if changed:
                raise FailbackError("its files changed while it was imported (%s): is the service still running on the files? "
                                    "Stop it and run again" % changed)
            committing = True
            self.db.conn.commit()
        except CompanyRefused:
            # Refused after the undo file was written (a row that cannot be read while proving): nothing commits.
            self.db.rollback()
            if undo:
                remove_undo_file(undo)
            raise
        except Deferred as exc:
            self.db.rollback()
            if undo:
                remove_undo_file(undo)
            outcome.update(status="deferred", reason="company %s: %s" % (company_id, exc), undo_file=None, digest=None)
            return
        except (psycopg2.Error, SessionsError, OSError, FileProblem) as exc:
            lost = connection_lost(exc, self.db.conn)
            self.db.rollback()
            state = self._commit_state(txid) if committing and txid is not None else "aborted"
            if state != "committed":
                fate = "nothing of it was committed" if state == "aborted" else \
                    "whether the COMMIT took effect is unknown (txid %s: %s); the undo file %s is kept" % (txid, state, undo)
                if undo and state == "aborted":
                    remove_undo_file(undo)
                    undo = None
                text = exc.pgerror if isinstance(exc, psycopg2.Error) and exc.pgerror else str(exc)
                kind = "the database" if isinstance(exc, psycopg2.Error) else "the import"
                outcome.update(status="failed", undo_file=undo, digest=None,
                               error="company %s: %s failed: %s; %s" % (company_id, kind, " ".join(str(text).split()), fate))
                if lost and state == "aborted" and self.two_pass:
                    raise  # retried on a new connection (_retrying): nothing of the company was committed
                return
            self.warnings.append("company %s: the COMMIT reported an error (%s) but the transaction committed" % (company_id, exc))
        outcome.update(status="imported", undo_file=undo)
        self._pass_entry(files, plan.fingerprint(txid, xid_hash), txid, outcome["digest"])

    def _commit_state(self, txid):
        """txid_status of a transaction whose COMMIT got no answer, asked again (bounded) while the server cannot tell."""
        state = None
        for delay in (0,) + RETRY_DELAYS:
            time.sleep(delay)
            state = self.db.txid_status(txid)
            if state not in (None, "in progress"):
                break
        return state

    # -- planning --
    def _plan(self, company_id, files):
        if files.base is not None:
            return self._plan_changed(company_id, files)
        db = self.db
        plan = CompanyPlan()
        args = self._plan_args(company_id)
        creds_row = db.one(CREDS_STATE_SQL, args)
        plan.creds_xmin = creds_row[3] if creds_row is not None else None
        rows = self._plan_keys(company_id, files, plan, db.all(KEYS_STATE_SQL, args))
        for key, row in sorted(rows.items(), key=lambda item: sort_key(*item[0])):
            plan.proven = False
            if key_file_name(*key) in files.skipped:
                plan.kept.append(key)
                continue
            self._plan_delete(plan, key, row)
        self._plan_creds(company_id, files, plan, creds_row)
        plan.conflicts.sort(key=lambda c: c["updated_at"] or "")
        return plan

    def _plan_changed(self, company_id, files):
        """Delta pass, per file: the rows are the bulk pass's (the company's fingerprint, in this transaction, else
        BaseStale), so only the keys of the files read and of the files gone are planned; the carried keys' rows stay."""
        db = self.db
        args = self._plan_args(company_id)
        if fingerprint_text(*db.one(COMPANY_FINGERPRINT_SQL, args)) != files.base.fingerprint:
            raise BaseStale()
        plan = CompanyPlan()
        plan.proven = False
        rows = self._plan_keys(company_id, files, plan, db.selected(KEYS_STATE_SELECTED_SQL, company_id,
                                                                    list(files.keys) + files.deleted, args))
        for key, row in sorted(rows.items(), key=lambda item: sort_key(*item[0])):
            self._plan_delete(plan, key, row)
        if files.creds_carried:
            plan.creds_present = True
        else:
            creds_row = db.one(CREDS_STATE_SQL, args)
            plan.creds_xmin = creds_row[3] if creds_row is not None else None
            self._plan_creds(company_id, files, plan, creds_row)
        plan.conflicts.sort(key=lambda c: c["updated_at"] or "")
        return plan

    def _plan_args(self, company_id):
        return {"company": company_id, "since": self.since, "key_types": list(KEY_TYPES), "exempt": self.exempt.get(company_id, [])}

    def _plan_keys(self, company_id, files, plan, state_rows):
        """Plan the keys of the files read against their rows (KEYS_STATE_SQL's); returns the rows no file named."""
        rows = {}
        for key_type, key_id, md5, updated, after, xmin_hash in state_rows:
            rows[(key_type, key_id)] = (md5, updated, after)
            plan.row_hashes[(key_type, key_id)] = xmin_hash
        compare = []
        for key, entry in files.keys.items():
            row = rows.pop(key, None)
            if row is None:
                plan.inserts.append(entry)
                plan.proven = False
            elif entry.same and entry.spec.get("row_md5") == row[0]:
                plan.unchanged += 1
            else:
                compare.append((key, entry, row))
                plan.proven = False
        if compare:
            texts = {(t, i): text for t, i, text in self.db.selected(VALUES_SQL, company_id, [c[0] for c in compare])}
            for key, entry, row in compare:
                try:
                    file_line = entry.line()
                except FileProblem as exc:
                    raise CompanyRefused("%s %s" % (entry.name, exc)) from None
                if database_line(key[0], key[1], texts[key]) == file_line:
                    plan.unchanged += 1
                else:
                    plan.updates.append(entry)
                    if entry.same:
                        plan.reverted += 1  # the exported file, a row changed after the export
                    if row[2]:
                        plan.conflicts.append({"type": key[0], "id": key[1], "updated_at": row[1]})
                plan.lines[key] = file_line
        return rows

    @staticmethod
    def _plan_delete(plan, key, row):
        plan.deletes.append(key)
        if row[2]:
            plan.conflicts.append({"type": key[0], "id": key[1], "updated_at": row[1]})

    def _plan_creds(self, company_id, files, plan, row):
        entry = files.creds
        plan.creds_present = entry is not None
        if entry is None:
            if row is not None:
                raise CompanyRefused("creds.json is missing but the database holds creds: refusing to delete the credentials")
            return
        if row is None:
            plan.creds = "inserted"
            plan.proven = False
            return
        if entry.same and entry.spec.get("row_md5") == row[0]:
            return
        plan.proven = False
        (text,) = self.db.one(CREDS_TEXT_SQL, {"company": company_id})
        try:
            differs = database_line(None, None, text) != entry.line()
        except FileProblem as exc:
            raise CompanyRefused("creds.json %s" % exc) from None
        if differs:
            # Before any write: fresh or other creds in the files never replace the registered ones of the database.
            refusal = import_refusal(company_id, text, entry.value(), self.params.get("identity_force_companies"))
            if refusal:
                raise CompanyRefused(refusal)
            plan.creds = "updated"
            if entry.same:
                plan.reverted += 1
            if row[2]:
                plan.conflicts.append({"type": "creds", "id": None, "updated_at": row[1]})

    # -- writing --
    def _save(self, company_id, files, plan, txn_now, txid):
        """Read the rows the writes replace or delete and start writing the undo file (rows replaced or deleted, ids
        inserted); an UndoWriter, whose wait() gives its path once written and synced."""
        records = []
        if plan.creds == "updated":
            creds, created, updated, _after = self.db.one(SAVE_CREDS_SQL, {"company": company_id, "after": txn_now})
            records.append({"table": "whatsapp_auth", "action": "updated", "creds": creds, "created_at": created, "updated_at": updated})
        elif plan.creds == "inserted":
            records.append({"table": "whatsapp_auth", "action": "inserted"})
        actions = {(e.key_type, e.key_id): "updated" for e in plan.updates}
        actions.update({key: "deleted" for key in plan.deletes})
        saved = self.db.selected(SAVE_KEYS_SQL, company_id, sorted(actions, key=lambda k: sort_key(*k)), {"after": txn_now})
        if len(saved) != len(actions):
            raise FailbackError("%d rows to save for undo but %d read back" % (len(actions), len(saved)))
        for key_type, key_id, value, created, updated, expires, _after in saved:
            records.append({"table": "whatsapp_keys", "action": actions[(key_type, key_id)], "key_type": key_type, "key_id": key_id,
                            "value": value, "created_at": created, "updated_at": updated, "expires_at": expires})
        for entry in plan.inserts:
            records.append({"table": "whatsapp_keys", "action": "inserted", "key_type": entry.key_type, "key_id": entry.key_id})
        header = {"format": UNDO_FORMAT, "kind": UNDO_KIND, "company_id": company_id, "created_at": iso(utc_now()),
                  "txn_started_at": txn_now, "txid": int(txid), "system_identifier": self.meta["system_identifier"],
                  "target": self.target, "source": {"path": self.tree.path, "manifest": self.tree.kind,
                                                    "generation": (self.tree.top or {}).get("generation")},
                  "since": self.since, "counts": {"inserted": len(plan.inserts), "updated": len(plan.updates),
                                                  "deleted": len(plan.deletes), "creds": plan.creds}}
        undo_dir = self.params["undo_dir"]
        os.makedirs(undo_dir, mode=0o700, exist_ok=True)
        return UndoWriter(undo_dir, company_id, header, records)

    def _apply(self, company_id, files, plan):
        db = self.db
        buffer_format = self.params["buffer_format"]
        deleted = 0
        for part in chunks(plan.deletes):
            deleted += db.execute(DELETE_KEYS_SQL, {"company": company_id, "types": [k[0] for k in part], "ids": [k[1] for k in part]})
        if deleted != len(plan.deletes):
            raise FailbackError("%d rows to delete but %d deleted" % (len(plan.deletes), deleted))
        db.copy(STAGE_COPY_SQL, self._stage_lines(company_id, files, plan, buffer_format))
        for sql, entries in ((UPDATE_STAGED_SQL, plan.updates), (INSERT_STAGED_SQL, plan.inserts)):
            done = db.execute(sql, {"company": company_id}) if entries else 0
            if done != len(entries):
                raise FailbackError("%d rows to write but %d written" % (len(entries), done))
        if plan.creds:
            text = stored_text(None, files.creds.value(), buffer_format)
            if db.execute(INSERT_CREDS_SQL if plan.creds == "inserted" else UPDATE_CREDS_SQL, {"company": company_id, "creds": text}) != 1:
                raise FailbackError("the creds row was not written")

    def _exported_digest(self, company_id, files, plan):
        """The manifest's digest when the company's files are exactly the exported ones (and no row is kept), else None."""
        if plan.kept or not files.as_exported:
            return None
        return self.tree.manifest_digest(company_id)

    def _stage_lines(self, company_id, files, plan, buffer_format):
        """COPY lines of the staging table: rows to write (text and digest line from the same parsed value, the line
        only when the digest needs it), then the keys whose rows stay as they are."""
        lines = None if self._exported_digest(company_id, files, plan) else plan.lines
        rewrite = buffer_format == "array"
        for action, entries in (("u", plan.updates), ("i", plan.inserts)):
            for entry in entries:
                key_type, key_id = key = entry.key_type, entry.key_id
                text = None
                if rewrite and entry.same and not entry.parsed and key_type != "app-state-sync-key" and (lines is None or key in lines):
                    text = exported_array_text(entry.data)  # an exported file whose line is not needed: no parse
                if text is None:
                    value = entry.value()
                    if lines is not None and key not in lines:
                        lines[key] = key_line(key_type, key_id, value)
                    text = stored_text(key_type, value, buffer_format)
                yield "%s\t%s\t%s\t%s\t%d\n" % (action, copy_text(key_type), copy_text(key_id), copy_text(text), expiry_days(key_type))
        if files.base is not None:
            return  # per file: the carried rows are proven by the fingerprint (_prove), not staged
        written = {(e.key_type, e.key_id) for e in plan.updates}
        written.update((e.key_type, e.key_id) for e in plan.inserts)
        for key_type, key_id in list(files.keys) + plan.kept:
            if (key_type, key_id) not in written:
                yield "k\t%s\t%s\t\\N\t\\N\n" % (copy_text(key_type), copy_text(key_id))

    def _digests(self, company_id, files, plan, written):
        """The state digest of the company's files, which the rows will hold (check mode) or now hold (proven after the writes).

        When the files are exactly the exported ones (every manifest file present with its sha256, no other), their
        digest is the manifest's and no line is computed. Otherwise lines come from the files, one per key, computed
        once (while comparing, or from the value parsed to write it); rows of skipped ambiguous files from the database. After the writes the proof (_prove) is: the rows are exactly
        the files' keys, every written row is the JSONB of the text written, which is the file's value with its Buffers in
        the row form (the codec's canonical form is the same for both), and the creds read back equal to creds.json;
        every other row was proven equal to its file before (manifest sha256 and row_md5, or the canonical comparison)
        in this same transaction.
        """
        if files.base is not None:
            return self._spliced_digest(company_id, files, plan, written)
        # A bulk pass that writes a pass record keeps every line: the delta pass splices its changed lines into them.
        keep = bool(self.params.get("pass_record")) and not self.check_mode and not plan.kept and not files.skipped
        manifest_digest = self.tree.manifest_digest(company_id)
        if plan.proven and not plan.writes and manifest_digest and not keep:
            return manifest_digest
        exported = None if keep else self._exported_digest(company_id, files, plan)
        try:
            file_creds = creds_line(None) if files.creds is None else files.creds.line()
            if exported:
                # The files are the export's, byte for byte: their digest is the one the export computed from them.
                if written:
                    self._prove(company_id, files, plan, file_creds)
                return exported
            kept = {}
            if plan.kept:
                kept = {(t, i): database_line(t, i, text) for t, i, text in self.db.selected(VALUES_SQL, company_id, plan.kept)}
            expected = DigestLines(file_creds, keep=keep)
            ordered = sorted(list(files.keys) + plan.kept, key=lambda k: sort_key(*k))
            for key in ordered:
                expected.add(key[0], key[1], kept[key] if key in kept else self._file_line(files, plan, key))
        except FileProblem as exc:
            raise CompanyRefused("a file the manifest proves cannot be read back: %s" % exc) from None
        if written:
            self._prove(company_id, files, plan, file_creds)
        if keep:
            files.digest_keys, files.digest_data = ordered, expected.data()
        return expected.hexdigest()

    def _spliced_digest(self, company_id, files, plan, written):
        """Delta pass, per file: the digest of the recorded lines of the carried keys with the lines of the files read
        spliced in (the files gone left out): the digest a full read of the directory gives."""
        base = files.base
        try:
            if files.creds_carried:
                file_creds = base.creds_line
            else:
                file_creds = creds_line(None) if files.creds is None else files.creds.line()
            changed = {key: self._file_line(files, plan, key) for key in files.keys}
            lines = base.spliced(files.carried, changed)
        except FileProblem as exc:
            raise CompanyRefused("a file cannot be read back: %s" % exc) from None
        except passfiles.PassFilesError as exc:
            raise CompanyRefused(str(exc)) from None
        if written:
            self._prove(company_id, files, plan, file_creds)
        return hashlib.sha256(b"".join([HEADER_LINE, file_creds] + lines)).hexdigest()

    def _prove(self, company_id, files, plan, file_creds):
        """After the writes: the rows hold what the files hold (else the transaction is rolled back).

        On the server: the company's rows are exactly the staged keys (the files' and the kept ones), and every written
        row equals the JSONB of the text sent, whose digest line was computed from the same parsed value. No row is read
        back or canonicalised again.
        """
        found = {"extra": [], "missing": [], "differs": []}
        per_file = files.base is not None
        args = {"company": company_id, "key_types": list(KEY_TYPES)}
        for kind, key_type, key_id in self.db.all(PROVE_WRITTEN_SQL if per_file else PROVE_STAGED_SQL, args):
            found[kind].append((key_type, key_id))
        if per_file:
            # The rows not written are the bulk pass's, and no other row is there: the fingerprint is the recorded one
            # less the rows replaced or deleted, plus the rows this transaction wrote.
            expected = self._fingerprint_after(files.base.fingerprint, plan)
            now = fingerprint_text(*self.db.one(COMPANY_FINGERPRINT_SQL, args))
            if now != expected:
                raise FailbackError("after the writes the rows are not the bulk pass's and the files' changes (fingerprint %s, "
                                    "expected %s): rolled back" % (now, expected))
        if found["extra"] or found["missing"]:
            extra, missing = sorted(found["extra"]), sorted(found["missing"])
            raise FailbackError("after the writes the rows are not the files' keys (extra %r, missing %r): rolled back"
                                % (extra[:3], missing[:3]))
        if found["differs"]:
            key_type, key_id = min(found["differs"], key=lambda k: sort_key(*k))
            raise FailbackError("after the writes %s %r does not read back as its file: rolled back" % (key_type, key_id))
        row = self.db.one(CREDS_TEXT_SQL, {"company": company_id})
        if database_line(None, None, None if row is None else row[0]) != file_creds:
            raise FailbackError("after the writes the creds do not read back as creds.json: rolled back")

    @staticmethod
    def _fingerprint_after(recorded, plan):
        """The fingerprint a company with the recorded one has once plan is written (plan.written_by: txid, hashint8)."""
        keys, xmin_hash, creds_xmin = recorded.split(":")
        replaced = [(e.key_type, e.key_id) for e in plan.updates] + plan.deletes
        total = int(xmin_hash) - sum(int(plan.row_hashes[key]) for key in replaced)
        if plan.writes:
            txid, xid_hash = plan.written_by
            total += (len(plan.updates) + len(plan.inserts)) * int(xid_hash)
            if plan.creds:
                creds_xmin = str(int(txid) % XID_WRAP)
        return fingerprint_text(int(keys) - len(plan.deletes) + len(plan.inserts), total, None if creds_xmin == "-" else creds_xmin)

    @staticmethod
    def _file_line(files, plan, key):
        line = plan.lines.get(key)
        if line is None:
            line = plan.lines[key] = files.keys[key].line()
        return line
