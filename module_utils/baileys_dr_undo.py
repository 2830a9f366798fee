# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Undo of a failback: undo files (the rows a failback replaced or deleted, the ids it inserted) written before
its COMMIT, and mode=undo putting them back, one transaction per file.

Format: docs/failback-undo.md.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import secrets
import threading
import time

from ansible.module_utils.baileys_dr_codec import (
    COMPANY_ID_RE,
)
from ansible.module_utils.baileys_dr_fs import HashingWriter, fsync_dir, write_file_atomic
from ansible.module_utils.baileys_dr_postgres import (
    DatabaseError,
    psycopg2,
)
from ansible.module_utils.baileys_dr_files import NEW_FILE_FLAGS
from ansible.module_utils.baileys_dr_tree import compact_stamp, encode_json, SessionsError, test_hook, utc_now
from ansible.module_utils.baileys_dr_failback_db import (
    BATCH,
    DELETE_CREDS_SQL,
    DELETE_KEYS_SQL,
    Database,
    READ_ONLY_SQL,
    RESTORE_CREDS_SQL,
    RESTORE_CREDS_UPDATE_SQL,
    RESTORE_KEYS_SQL,
    SAVE_CREDS_SQL,
    SAVE_KEYS_SQL,
    TXID_STATUS_SQL,
    chunks,
    read_only_reason,
)
from ansible.module_utils.baileys_dr_failback_errors import FailbackError
from ansible.module_utils.baileys_dr_source_files import dumps


UNDO_FORMAT = 1
UNDO_KIND = "baileys-dr-failback-undo"
UNDO_RE = re.compile(r"\Afailback-([A-Za-z0-9_-]{1,50})-(\d{8}T\d{6}Z)(?:-\d+)?\.jsonl\.gz\Z")

# -- undo files -------------------------------------------------------------------------------------


def write_undo_file(undo_dir, company_id, header, records):
    """<undo_dir>/failback-<company>-<UTC stamp>.jsonl.gz and its .sha256, both synced; returns the path."""
    name = _undo_name(undo_dir, company_id, compact_stamp(utc_now()), set())
    final = os.path.join(undo_dir, name)
    tmp = os.path.join(undo_dir, ".%s.tmp-%s" % (name, secrets.token_hex(4)))
    count = 0
    try:
        fd = os.open(tmp, NEW_FILE_FLAGS, 0o600)
        with os.fdopen(fd, "wb") as raw:
            hashing = HashingWriter(raw)
            with gzip.GzipFile(fileobj=hashing, mode="wb", compresslevel=6, mtime=0) as gz:
                gz.write(encode_json(header) + b"\n")
                batch = []
                for record in records:
                    batch.append(dumps(record))
                    count += 1
                    if len(batch) >= BATCH:
                        gz.write(("\n".join(batch) + "\n").encode("utf-8"))
                        batch = []
                if batch:
                    gz.write(("\n".join(batch) + "\n").encode("utf-8"))
                gz.write(encode_json({"end": True, "records": count}) + b"\n")
            raw.flush()
            os.fsync(raw.fileno())
        os.rename(tmp, final)
        tmp = None
        write_file_atomic(final + ".sha256", ("%s  %s\n" % (hashing.digest.hexdigest(), name)).encode("ascii"), mode=0o600)
    except BaseException:
        _remove_written(tmp, final)
        raise
    fsync_dir(undo_dir)
    return final


def _remove_written(tmp, final):
    """After an error: the temporary file, or the final one once renamed (tmp None)."""
    try:
        os.unlink(tmp if tmp is not None else final)
    except OSError:
        pass


def _undo_name(undo_dir, company_id, stamp, taken):
    base = "failback-%s-%s" % (company_id, stamp)
    name, serial = base + ".jsonl.gz", 1
    while name in taken or os.path.lexists(os.path.join(undo_dir, name)) or os.path.lexists(os.path.join(undo_dir, name + ".sha256")):
        serial += 1
        name = "%s-%d.jsonl.gz" % (base, serial)
    taken.add(name)
    return name


def _fsync_all(paths, threads=8):
    """fsync each file; a few at a time, so that the file system's journal commits them together."""
    def sync(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if len(paths) <= 1:
        for path in paths:
            sync(path)
        return
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=min(threads, len(paths))) as pool:
        list(pool.map(sync, paths))


def write_undo_files(undo_dir, items):
    """The undo files of a delta batch, one per company as write_undo_file writes it (same name, format and sidecar), but
    synced together: every file and sidecar written, fsynced, renamed, then the directory fsynced once. {company: path};
    nothing is left behind on an error (and nothing commits before this returns)."""
    if not items:
        return {}
    stamp, taken = compact_stamp(utc_now()), set()
    staged = []  # (tmp, final) of the files, then of the sidecars
    try:
        sidecars = []
        for company_id, header, records in items:
            name = _undo_name(undo_dir, company_id, stamp, taken)
            final = os.path.join(undo_dir, name)
            tmp = os.path.join(undo_dir, ".%s.tmp-%s" % (name, secrets.token_hex(4)))
            staged.append((tmp, final))
            fd = os.open(tmp, NEW_FILE_FLAGS, 0o600)
            with os.fdopen(fd, "wb") as raw:
                hashing = HashingWriter(raw)
                with gzip.GzipFile(fileobj=hashing, mode="wb", compresslevel=6, mtime=0) as gz:
                    body = [encode_json(header).decode("utf-8")]
                    body.extend(dumps(record) for record in records)
                    body.append(dumps({"end": True, "records": len(records)}))
                    gz.write(("\n".join(body) + "\n").encode("utf-8"))
            side_tmp = os.path.join(undo_dir, ".%s.sha256.tmp-%s" % (name, secrets.token_hex(4)))
            staged.append((side_tmp, final + ".sha256"))
            fd = os.open(side_tmp, NEW_FILE_FLAGS, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(("%s  %s\n" % (hashing.digest.hexdigest(), name)).encode("ascii"))
            sidecars.append((company_id, final))
        _fsync_all([tmp for tmp, _final in staged])
        for index, (tmp, final) in enumerate(staged):
            os.rename(tmp, final)
            staged[index] = (None, final)
        fsync_dir(undo_dir)
        return dict(sidecars)
    except BaseException:
        for tmp, final in staged:
            _remove_written(tmp, final)
        raise


class UndoWriter(threading.Thread):
    """write_undo_file in a thread (gzip and fsync release the GIL), so that the server's writes go on meanwhile; with
    write=write_undo_files, the undo files of a delta batch (args: undo_dir, items)."""

    def __init__(self, *args, write=write_undo_file):
        super().__init__(name="baileys-dr-undo-%s" % (args[1] if write is write_undo_file else "batch"), daemon=True)
        self.args, self.write = args, write
        self.path = None
        self.error = None
        self.start()

    def run(self):
        try:
            self.path = self.write(*self.args)
        except BaseException as exc:  # noqa: BLE001 - re-raised by wait()
            self.error = exc

    def wait(self):
        """The undo file's path once it is written and synced (a batch's: {company: path}); its error otherwise."""
        self.join()
        if self.error is not None:
            raise self.error
        return self.path


def remove_undo_file(path):
    for name in (path, path + ".sha256"):
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass
    fsync_dir(os.path.dirname(path))


def read_undo_file(path):
    """(header, records) of an undo file whose sha256 matches its sidecar; FailbackError otherwise."""
    name = os.path.basename(path)
    try:
        with open(path + ".sha256", "r", encoding="ascii") as fh:
            expected, _, listed = fh.read().strip().partition("  ")
    except (OSError, UnicodeDecodeError) as exc:
        raise FailbackError("undo file %s: its .sha256 sidecar is unreadable (%s)" % (path, exc)) from None
    if listed != name:
        raise FailbackError("undo file %s: its .sha256 sidecar names %r" % (path, listed))
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise FailbackError("undo file %s is unreadable (%s)" % (path, exc.strerror)) from None
    if digest.hexdigest() != expected:
        raise FailbackError("undo file %s: checksum mismatch (sha256 %s, the sidecar says %s)" % (path, digest.hexdigest(), expected))
    try:
        with gzip.open(path, "rb") as gz:
            lines = [json.loads(line) for line in gz]
    except (OSError, EOFError, ValueError) as exc:
        raise FailbackError("undo file %s is damaged (%s)" % (path, exc)) from None
    if len(lines) < 2 or not isinstance(lines[0], dict) or lines[0].get("kind") != UNDO_KIND or lines[0].get("format") != UNDO_FORMAT:
        raise FailbackError("undo file %s is not a format %d %s file" % (path, UNDO_FORMAT, UNDO_KIND))
    header, records, end = lines[0], lines[1:-1], lines[-1]
    if end != {"end": True, "records": len(records)}:
        raise FailbackError("undo file %s is incomplete (no end record for %d records)" % (path, len(records)))
    company_id = header.get("company_id")
    if not isinstance(company_id, str) or not COMPANY_ID_RE.match(company_id):
        raise FailbackError("undo file %s names an invalid company id %r" % (path, company_id))
    for record in records:
        if record.get("table") == "whatsapp_auth":
            ok = record.get("action") in ("updated", "inserted")
        else:
            ok = (record.get("table") == "whatsapp_keys" and record.get("action") in ("updated", "deleted", "inserted")
                  and isinstance(record.get("key_type"), str) and isinstance(record.get("key_id"), str))
        if not ok:
            raise FailbackError("undo file %s holds a record it cannot apply: %r" % (path, {k: record.get(k) for k in ("table", "action")}))
    return header, records


# -- undo ---------------------------------------------------------------------------------------------


class Undo:
    """mode=undo: the rows an undo file saved are put back, the ids the failback inserted deleted; one transaction per file."""

    def __init__(self, params, connect, target, check_mode):
        self.params = params
        self.check_mode = check_mode
        self.target = target
        self.queries = []
        self.db = Database(connect, self.queries)
        self.warnings = []

    def run(self):
        started = time.monotonic()
        paths = self.params.get("undo_file") or []
        if not paths:
            raise FailbackError("mode=undo needs undo_file (one or more undo files)")
        # Every file verified (sha256 sidecar, header) before the first write; newest failback first, as undo is a stack.
        headers = {}
        for path in paths:
            headers[path] = read_undo_file(path)[0]
        paths = sorted(dict.fromkeys(paths), key=lambda p: int(headers[p].get("txid") or 0), reverse=True)
        outcomes = {}
        try:
            self.db.open(lock=not self.check_mode)
            meta = self.db.meta()
            read_only = read_only_reason(meta, self.target)
            if read_only and not self.check_mode:
                raise FailbackError("%s; nothing was undone" % read_only)
            for index, path in enumerate(paths, 1):
                outcome = outcomes[path] = {"status": None, "company": None, "restored": 0, "deleted": 0, "already": 0,
                                            "creds": None, "conflicts": [], "error": None}
                try:
                    self.db.ensure(lock=not self.check_mode)
                    self._one(index, path, meta, outcome)
                except (SessionsError, psycopg2.Error, DatabaseError, OSError) as exc:
                    self.db.rollback()
                    text = exc.pgerror if isinstance(exc, psycopg2.Error) and exc.pgerror else str(exc)
                    outcome.update(status="refused" if outcome["status"] == "refused" else "failed",
                                   error="%s: %s" % (path, " ".join(str(text).split())))
                    if not self.params["continue_on_error"]:
                        break
                finally:
                    self.db.rollback()
        finally:
            self.db.close()
        failed = [p for p, o in outcomes.items() if o["status"] in ("failed", "refused")]
        return {"changed": any(o["status"] in ("undone", "would_undo") for o in outcomes.values()), "mode": "undo",
                "undo_files": outcomes, "order": paths, "failed_files": failed, "not_attempted": [p for p in paths if p not in outcomes],
                "conflicts": [dict(c, file=p) for p, o in outcomes.items() for c in o["conflicts"]][: self.params["max_report"]],
                "queries": self.queries, "warnings": self.warnings, "duration_seconds": round(time.monotonic() - started, 3)}

    def _one(self, index, path, meta, outcome):
        header, records = read_undo_file(path)
        company_id = outcome["company"] = header["company_id"]
        if header.get("system_identifier") != meta["system_identifier"] and not self.params["allow_other_database"]:
            raise FailbackError("the undo file was written for the database with system identifier %s, this one is %s"
                                % (header.get("system_identifier"), meta["system_identifier"]))
        db = self.db
        if self.check_mode:
            db.execute(READ_ONLY_SQL)
        state = None
        if header.get("system_identifier") == meta["system_identifier"]:
            # Transaction ids only mean something in the database that gave them.
            (state,) = db.one(TXID_STATUS_SQL, {"txid": header.get("txid")})
        if state == "aborted":
            outcome.update(status="nothing_to_undo", error=None)
            self.warnings.append("%s: the failback transaction of company %s never committed: nothing to undo" % (path, company_id))
            return
        if state == "in progress":
            raise FailbackError("the failback transaction of company %s is still running" % company_id)
        after = header["txn_started_at"]
        keys = [r for r in records if r["table"] == "whatsapp_keys"]
        current = {(t, i): (v, c, u, e, later) for t, i, v, c, u, e, later in db.selected(
            SAVE_KEYS_SQL, company_id, [(r["key_type"], r["key_id"]) for r in keys], {"after": after})}
        restore, delete, conflicts = [], [], []
        for record in keys:
            key = (record["key_type"], record["key_id"])
            now = current.get(key)
            if record["action"] == "inserted":
                if now is None:
                    outcome["already"] += 1
                    continue
                if now[4]:
                    conflicts.append({"type": key[0], "id": key[1], "updated_at": now[2], "why": "changed after the failback"})
                delete.append(key)
                continue
            saved = (record["value"], record["created_at"], record["updated_at"], record["expires_at"])
            if now is not None and now[:4] == saved:
                outcome["already"] += 1
                continue
            if record["action"] == "updated" and now is None:
                conflicts.append({"type": key[0], "id": key[1], "updated_at": None, "why": "deleted after the failback"})
            elif now is not None and now[4]:
                conflicts.append({"type": key[0], "id": key[1], "updated_at": now[2], "why": "changed after the failback"})
            restore.append(record)
        creds_record = next((r for r in records if r["table"] == "whatsapp_auth"), None)
        creds_action = None
        if creds_record is not None:
            now = db.one(SAVE_CREDS_SQL, {"company": company_id, "after": after})
            if creds_record["action"] == "inserted":
                if now is not None:
                    creds_action = "delete"
                    if now[3]:
                        conflicts.append({"type": "creds", "id": None, "updated_at": now[2], "why": "changed after the failback"})
            elif now is None or now[:3] != (creds_record["creds"], creds_record["created_at"], creds_record["updated_at"]):
                creds_action = "restore"
                if now is None:
                    conflicts.append({"type": "creds", "id": None, "updated_at": None, "why": "deleted after the failback"})
                elif now[3]:
                    conflicts.append({"type": "creds", "id": None, "updated_at": now[2], "why": "changed after the failback"})
        outcome.update(restored=len(restore), deleted=len(delete), creds=creds_action, conflicts=conflicts)
        if conflicts and not self.params["force"]:
            outcome["status"] = "refused"
            raise FailbackError("company %s: %d row(s) changed after the failback would be overwritten (first: %s %r); refused "
                                "(force=true undoes anyway)" % (company_id, len(conflicts), conflicts[0]["type"], conflicts[0]["id"]))
        if not (restore or delete or creds_action):
            outcome["status"] = "already_undone"
            return
        if self.check_mode:
            outcome["status"] = "would_undo"
            return
        self._apply(company_id, restore, delete, creds_record, creds_action, meta)
        # Proof: the rows are now exactly the saved ones, the inserted ones are gone.
        check = {(t, i): (v, c, u, e) for t, i, v, c, u, e, _l in db.selected(
            SAVE_KEYS_SQL, company_id, [(r["key_type"], r["key_id"]) for r in keys], {"after": after})}
        for record in keys:
            key = (record["key_type"], record["key_id"])
            expected = None if record["action"] == "inserted" else (record["value"], record["created_at"], record["updated_at"],
                                                                    record["expires_at"])
            if check.get(key) != expected:
                raise FailbackError("company %s: %s %r is not as saved after the undo: rolled back" % (company_id, key[0], key[1]))
        if creds_record is not None:
            now = db.one(SAVE_CREDS_SQL, {"company": company_id, "after": after})
            if creds_record["action"] == "inserted":
                ok = now is None
            else:
                ok = now is not None and now[0] == creds_record["creds"] and now[1] == creds_record["created_at"] and (
                    now[2] == creds_record["updated_at"] or meta["referenced"]["whatsapp_auth"])
            if not ok:
                raise FailbackError("company %s: the creds are not as saved after the undo: rolled back" % company_id)
        test_hook("undo_company:%d" % index)
        db.conn.commit()
        outcome["status"] = "undone"

    def _apply(self, company_id, restore, delete, creds_record, creds_action, meta):
        db = self.db
        keys = [(r["key_type"], r["key_id"]) for r in restore] + delete
        for part in chunks(keys):
            db.execute(DELETE_KEYS_SQL, {"company": company_id, "types": [k[0] for k in part], "ids": [k[1] for k in part]})
        for part in chunks(restore):
            db.execute(RESTORE_KEYS_SQL, {"company": company_id, "types": [r["key_type"] for r in part],
                                          "ids": [r["key_id"] for r in part], "values": [r["value"] for r in part],
                                          "created": [r["created_at"] for r in part], "updated": [r["updated_at"] for r in part],
                                          "expires": [r["expires_at"] for r in part]})
        if creds_action == "delete":
            db.execute(DELETE_CREDS_SQL, {"company": company_id})
        elif creds_action == "restore":
            args = {"company": company_id, "creds": creds_record["creds"], "created": creds_record["created_at"],
                    "updated": creds_record["updated_at"]}
            if meta["referenced"]["whatsapp_auth"]:
                # Other tables reference whatsapp_auth: no DELETE; updated_at is then set by the trigger.
                if db.execute(RESTORE_CREDS_UPDATE_SQL, args) != 1:
                    db.execute(RESTORE_CREDS_SQL, args)
                self.warnings.append("company %s: whatsapp_auth is referenced by foreign keys: creds restored by UPDATE "
                                     "(updated_at is the undo's time)" % company_id)
            else:
                db.execute(DELETE_CREDS_SQL, {"company": company_id})
                db.execute(RESTORE_CREDS_SQL, args)
