# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The failback's SQL (parameters by name; every statement recorded in `queries`) and its connection wrapper.
"""

from __future__ import annotations


from ansible.module_utils.baileys_dr_postgres import (
    CopyStream,
    psycopg2,
)
from ansible.module_utils.baileys_dr_failback_errors import FailbackError


BATCH = 1000
LOCK_NAME = "baileys-dr-import"

# -- SQL (parameters by name; every statement is recorded in `queries`) ----------------------
SESSION_SQL = "SET TIME ZONE 'UTC'; SET DateStyle = 'ISO, YMD'"
# One import or undo at a time per database; an import of listed companies (a fleet's host: companies given) excludes
# only what touches its companies: it holds the database's lock shared and one lock per company, so the hosts of a
# fleet fail back at once, while an import of every company, and an undo, hold the database's lock alone.
LOCK_SQL = "SELECT pg_try_advisory_lock(hashtext(%(name)s))"
LOCK_SHARED_SQL = "SELECT pg_try_advisory_lock_shared(hashtext(%(name)s))"
# Every company's lock tried (no row stops the others); the companies another session holds come back.
LOCK_COMPANIES_SQL = ("SELECT c FROM unnest(%(companies)s::text[]) AS c "
                      "WHERE NOT pg_try_advisory_lock(hashtext(%(name)s), hashtext(c))")
UNLOCK_ALL_SQL = "SELECT pg_advisory_unlock_all()"
META_SQL = ("SELECT (SELECT system_identifier FROM pg_control_system())::text, now()::text, pg_is_in_recovery(), "
            "current_setting('default_transaction_read_only') = 'on', has_database_privilege(current_database(), 'TEMPORARY')")
REFERENCED_SQL = "SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND confrelid = %(table)s::regclass"
READ_ONLY_SQL = "SET TRANSACTION READ ONLY"
# The transaction's xid also as the hashint8 of its 32-bit form (xmin::text::bigint of the rows it writes): the pass
# record's fingerprint of the company after the COMMIT is computed from it without a query per company.
TXN_SQL = "SELECT now()::text, txid_current(), hashint8(txid_current() % 4294967296)"
TXID_STATUS_SQL = "SELECT txid_status(%(txid)s)"
# "Changed after since" (the conflict guard) excludes row versions the earlier passes of this failback wrote: their
# xmin is one of those transactions' (exempt: 32-bit xids, often none). The row's xmin and hashint8(xmin) feed the
# company's fingerprint after the commit (FINGERPRINT_SQL's terms).
CHANGED_AFTER = "coalesce(updated_at > %(since)s::timestamptz, false) AND xmin::text::bigint <> ALL(%(exempt)s::bigint[])"
CREDS_STATE_SQL = (
    "SELECT md5(creds::text), updated_at::text, " + CHANGED_AFTER + ", xmin::text "
    "FROM whatsapp_auth WHERE company_id = %(company)s"
)
KEYS_STATE = (
    "SELECT key_type, key_id, md5(value::text), updated_at::text, " + CHANGED_AFTER + ", hashint8(xmin::text::bigint) "
    "FROM whatsapp_keys WHERE "
)
KEYS_STATE_SQL = KEYS_STATE + "company_id = %(company)s AND key_type = ANY(%(key_types)s)"
# The fingerprint of every company in one aggregate (the pass record's, and the delta pass's proof): Baileys keys
# counted, the sum of hashint8 over their row versions, the creds row's version. Any write gives a row a new xmin.
FINGERPRINT_SQL = (
    "SELECT company_id, coalesce(k.keys, 0), coalesce(k.xmin_hash, 0)::text, a.xmin::text FROM "
    "(SELECT company_id, count(*) AS keys, sum(hashint8(xmin::text::bigint)) AS xmin_hash FROM whatsapp_keys "
    "WHERE key_type = ANY(%(key_types)s) GROUP BY company_id) k "
    "FULL JOIN (SELECT company_id, xmin FROM whatsapp_auth) a USING (company_id)"
)
# One company's fingerprint (FINGERPRINT_SQL's columns), inside a transaction: a per-file delta checks that the rows are
# still the bulk pass's before it plans, and that after its writes they are those plus its own.
COMPANY_FINGERPRINT_SQL = (
    "SELECT k.keys, coalesce(k.xmin_hash, 0)::text, (SELECT xmin::text FROM whatsapp_auth WHERE company_id = %(company)s) "
    "FROM (SELECT count(*) AS keys, sum(hashint8(xmin::text::bigint)) AS xmin_hash FROM whatsapp_keys "
    "WHERE company_id = %(company)s AND key_type = ANY(%(key_types)s)) k"
)
# Row versions (xmin) mean something only on the timeline that wrote them, and only while fewer than 2^31 transactions
# passed (xid wraparound); txid_snapshot_xmax is the 64-bit next xid.
XID_STATE_SQL = "SELECT (SELECT timeline_id FROM pg_control_checkpoint()), txid_snapshot_xmax(txid_current_snapshot())"
SELECTED = "company_id = %(company)s AND (key_type, key_id) IN (SELECT * FROM unnest(%(types)s::text[], %(ids)s::text[]))"
KEYS_STATE_SELECTED_SQL = KEYS_STATE + SELECTED  # the rows of the given keys only (a delta pass per file)
VALUES_SQL = "SELECT key_type, key_id, value::text FROM whatsapp_keys WHERE " + SELECTED
CREDS_TEXT_SQL = "SELECT creds::text FROM whatsapp_auth WHERE company_id = %(company)s"
SAVE_KEYS_SQL = (
    "SELECT key_type, key_id, value::text, created_at::text, updated_at::text, expires_at::text, "
    "coalesce(updated_at > %(after)s::timestamptz, false) FROM whatsapp_keys WHERE " + SELECTED
)
SAVE_CREDS_SQL = (
    "SELECT creds::text, created_at::text, updated_at::text, coalesce(updated_at > %(after)s::timestamptz, false) "
    "FROM whatsapp_auth WHERE company_id = %(company)s"
)
DELETE_KEYS_SQL = "DELETE FROM whatsapp_keys WHERE " + SELECTED
INSERT_CREDS_SQL = "INSERT INTO whatsapp_auth (company_id, creds) VALUES (%(company)s, %(creds)s::jsonb)"
UPDATE_CREDS_SQL = "UPDATE whatsapp_auth SET creds = %(creds)s::jsonb WHERE company_id = %(company)s"
# The writes of a company go through a temporary staging table filled by one COPY (its rows vanish at the end of the
# transaction): one statement inserts, one updates, and the proof after the writes is a join on the server. Action
# 'i' insert, 'u' update, 'k' a key the files hold whose row is kept (v NULL): together the key set the rows must have.
STAGE = "pg_temp.baileys_dr_stage"
STAGE_SQL = ("CREATE TEMPORARY TABLE IF NOT EXISTS baileys_dr_stage (a \"char\" NOT NULL, t text NOT NULL, i text NOT NULL, "
             "v jsonb, d int) ON COMMIT DELETE ROWS")
TXN_STAGE_SQL = STAGE_SQL + "; " + TXN_SQL
STAGE_COPY_SQL = "COPY %s (a, t, i, v, d) FROM STDIN" % STAGE
INSERT_STAGED_SQL = (
    "INSERT INTO whatsapp_keys (company_id, key_type, key_id, value, expires_at) "
    "SELECT %%(company)s, t, i, v, now() + d * interval '1 day' FROM %s WHERE a = 'i'" % STAGE
)
UPDATE_STAGED_SQL = (
    "UPDATE whatsapp_keys k SET value = s.v, expires_at = now() + s.d * interval '1 day' FROM %s s "
    "WHERE s.a = 'u' AND k.company_id = %%(company)s AND k.key_type = s.t AND k.key_id = s.i" % STAGE
)
# After the writes: rows of the company that are not keys of the files (extra), keys of the files without a row
# (missing), written rows whose value is not, byte for byte, the JSONB of the text sent (differs; *<> compares the
# binary images of the values, cheaper than JSONB equality and stricter). At most three of each.
PROVE_WRITTEN_SQL = (
    "(SELECT CASE WHEN k.key_id IS NULL THEN 'missing' ELSE 'differs' END, s.t, s.i FROM %s s LEFT JOIN whatsapp_keys k "
    "ON k.company_id = %%(company)s AND k.key_type = s.t AND k.key_id = s.i "
    "LEFT JOIN LATERAL (SELECT k.value) AS row_value (v) ON true LEFT JOIN LATERAL (SELECT s.v) AS sent (v) ON true "
    "WHERE k.key_id IS NULL OR (s.a <> 'k' AND row_value *<> sent) LIMIT 3)" % STAGE
)
PROVE_STAGED_SQL = (
    "(SELECT 'extra', k.key_type, k.key_id FROM whatsapp_keys k WHERE k.company_id = %%(company)s "
    "AND k.key_type = ANY(%%(key_types)s) AND NOT EXISTS (SELECT 1 FROM %s s WHERE s.t = k.key_type AND s.i = k.key_id) "
    "LIMIT 3) UNION ALL " % STAGE + PROVE_WRITTEN_SQL
)
AMBIGUOUS_ROWS_SQL = (
    "SELECT key_id FROM whatsapp_keys WHERE company_id = %(company)s AND key_type = %(type)s "
    "AND replace(replace(key_id, '/', '__'), ':', '-') = %(name)s ORDER BY key_id COLLATE \"C\" LIMIT 10"
)
RESTORE_KEYS_SQL = (
    "INSERT INTO whatsapp_keys (company_id, key_type, key_id, value, created_at, updated_at, expires_at) "
    "SELECT %(company)s, u.t, u.i, u.v::jsonb, u.c::timestamptz, u.m::timestamptz, u.e::timestamptz "
    "FROM unnest(%(types)s::text[], %(ids)s::text[], %(values)s::text[], %(created)s::text[], %(updated)s::text[], "
    "%(expires)s::text[]) AS u(t, i, v, c, m, e)"
)
RESTORE_CREDS_SQL = (
    "INSERT INTO whatsapp_auth (company_id, creds, created_at, updated_at) "
    "VALUES (%(company)s, %(creds)s::jsonb, %(created)s::timestamptz, %(updated)s::timestamptz)"
)
RESTORE_CREDS_UPDATE_SQL = (
    "UPDATE whatsapp_auth SET creds = %(creds)s::jsonb, created_at = %(created)s::timestamptz WHERE company_id = %(company)s"
)
DELETE_CREDS_SQL = "DELETE FROM whatsapp_auth WHERE company_id = %(company)s"
# -- a delta pass's batches: the companies prepared per file (Prepared) planned and written DELTA_BATCH at a time, one
# transaction, one COPY, one proof and one fingerprint query per batch; every statement keyed by company.
DELTA_BATCH = 100
BATCH_MATCH = "k.company_id = s.c AND k.key_type = s.t AND k.key_id = s.i"
BATCH_ROWS = "unnest(%(companies)s::text[], %(types)s::text[], %(ids)s::text[]) AS s (c, t, i)"
# COMPANY_FINGERPRINT_SQL's columns for each company of the batch (the company first).
BATCH_FINGERPRINT_SQL = (
    "SELECT b.c, coalesce(k.keys, 0), coalesce(k.xmin_hash, 0)::text, a.xmin::text FROM unnest(%(batch)s::text[]) AS b (c) "
    "LEFT JOIN (SELECT company_id, count(*) AS keys, sum(hashint8(xmin::text::bigint)) AS xmin_hash FROM whatsapp_keys "
    "WHERE company_id = ANY(%(batch)s) AND key_type = ANY(%(key_types)s) GROUP BY company_id) k ON k.company_id = b.c "
    "LEFT JOIN whatsapp_auth a ON a.company_id = b.c"
)
# CHANGED_AFTER with each company's own exempt xids (pairs company, xid).
BATCH_EXEMPT = ("coalesce(%(table)s.updated_at > %%(since)s::timestamptz, false) AND %(table)s.xmin::text::bigint <> ALL("
                "ARRAY(SELECT e.x FROM unnest(%%(exempt_c)s::text[], %%(exempt_x)s::bigint[]) AS e (c, x) "
                "WHERE e.c = %(table)s.company_id))")
BATCH_KEYS_STATE_SQL = (
    "SELECT k.company_id, k.key_type, k.key_id, k.updated_at::text, " + BATCH_EXEMPT % {"table": "k"} + ", "
    "hashint8(k.xmin::text::bigint) FROM " + BATCH_ROWS + " JOIN whatsapp_keys k ON " + BATCH_MATCH
)
BATCH_CREDS_STATE_SQL = (
    "SELECT a.company_id, a.creds::text, a.updated_at::text, " + BATCH_EXEMPT % {"table": "a"} + " "
    "FROM whatsapp_auth a WHERE a.company_id = ANY(%(batch)s)"
)
# The rows a batch replaces, saved for the undo in its transaction, with their versions (pass 1 planned with them).
BATCH_SAVE_KEYS_SQL = (
    "SELECT k.company_id, k.key_type, k.key_id, k.value::text, k.created_at::text, k.updated_at::text, k.expires_at::text, "
    "hashint8(k.xmin::text::bigint) FROM " + BATCH_ROWS + " JOIN whatsapp_keys k ON " + BATCH_MATCH
)
BATCH_SAVE_CREDS_SQL = ("SELECT company_id, creds::text, created_at::text, updated_at::text, xmin::text FROM whatsapp_auth "
                        "WHERE company_id = ANY(%(batch)s)")
BATCH_DELETE_SQL = "DELETE FROM whatsapp_keys k USING " + BATCH_ROWS + " WHERE " + BATCH_MATCH
# The batch's staging table: STAGE's with the company in each row (c), every row written (v and d never NULL).
BATCH_STAGE = "pg_temp.baileys_dr_batch"
TXN_BATCH_SQL = ("CREATE TEMPORARY TABLE IF NOT EXISTS baileys_dr_batch (c text NOT NULL, a \"char\" NOT NULL, t text NOT NULL, "
                 "i text NOT NULL, v jsonb NOT NULL, d int NOT NULL) ON COMMIT DELETE ROWS; " + TXN_SQL)
BATCH_COPY_SQL = "COPY %s (c, a, t, i, v, d) FROM STDIN" % BATCH_STAGE
BATCH_WRITE_SQL = {
    "i": "INSERT INTO whatsapp_keys (company_id, key_type, key_id, value, expires_at) "
         "SELECT c, t, i, v, now() + d * interval '1 day' FROM %s WHERE a = 'i'" % BATCH_STAGE,
    "u": "UPDATE whatsapp_keys k SET value = s.v, expires_at = now() + s.d * interval '1 day' FROM %s s "
         "WHERE s.a = 'u' AND %s" % (BATCH_STAGE, BATCH_MATCH),
}
BATCH_CREDS_UPDATE_SQL = (
    "UPDATE whatsapp_auth a SET creds = u.v::jsonb FROM unnest(%(companies)s::text[], %(texts)s::text[]) AS u (c, v) "
    "WHERE a.company_id = u.c"
)
BATCH_CREDS_INSERT_SQL = (
    "INSERT INTO whatsapp_auth (company_id, creds) SELECT u.c, u.v::jsonb "
    "FROM unnest(%(companies)s::text[], %(texts)s::text[]) AS u (c, v)"
)
# PROVE_WRITTEN_SQL for every company of the batch: written rows missing or not byte for byte the JSONB sent.
BATCH_PROVE_SQL = (
    "SELECT s.c, CASE WHEN k.key_id IS NULL THEN 'missing' ELSE 'differs' END, s.t, s.i FROM %s s LEFT JOIN whatsapp_keys k "
    "ON " + BATCH_MATCH + " LEFT JOIN LATERAL (SELECT k.value) AS row_value (v) ON true "
    "LEFT JOIN LATERAL (SELECT s.v) AS sent (v) ON true "
    "WHERE k.key_id IS NULL OR row_value *<> sent LIMIT 100"
) % BATCH_STAGE
BATCH_CREDS_TEXT_SQL = "SELECT company_id, creds::text FROM whatsapp_auth WHERE company_id = ANY(%(batch)s)"
UNTOUCHED_SQL = (
    "SELECT count(*) FROM (SELECT company_id FROM whatsapp_auth UNION SELECT company_id FROM whatsapp_keys) c "
    "WHERE NOT company_id = ANY(%(ids)s)"
)


def chunks(items, size=BATCH):
    for start in range(0, len(items), size):
        yield items[start:start + size]


# -- the database ---------------------------------------------------------------------------------


class Database:
    """The module's connection: UTC, ISO dates, REPEATABLE READ; every statement recorded."""

    def __init__(self, connect, queries):
        self.connect = connect
        self.queries = queries
        self.conn = None
        self.locked = False

    def _record(self, sql):
        if sql not in self.queries:
            self.queries.append(sql)

    def open(self, lock):
        """lock: False, True (the database's lock alone) or the companies of an import of listed companies."""
        self.conn = self.connect()
        self.conn.set_session(isolation_level="REPEATABLE READ")
        self.conn.set_client_encoding("UTF8")
        self.execute(SESSION_SQL)
        if lock is True:
            if not self.one(LOCK_SQL, {"name": LOCK_NAME})[0]:
                self.conn.rollback()
                raise FailbackError("another baileys_auth_import (import or undo) holds its lock on this database")
            self.locked = True
        elif lock:
            if not self.one(LOCK_SHARED_SQL, {"name": LOCK_NAME})[0]:
                self.conn.rollback()
                raise FailbackError("another baileys_auth_import (an import of every company, or an undo) holds its lock on "
                                    "this database")
            busy = [row[0] for row in self.all(LOCK_COMPANIES_SQL, {"name": LOCK_NAME, "companies": list(lock)})]
            if busy:
                # Session locks outlive a rollback: the ones this run got are given back before it says no.
                self.execute(UNLOCK_ALL_SQL)
                self.conn.rollback()
                raise FailbackError("another baileys_auth_import holds the lock of %d of these companies on this database: %s"
                                    % (len(busy), ", ".join(sorted(busy)[:10]) + (", ..." if len(busy) > 10 else "")))
            self.locked = True
        self.conn.commit()
        return self

    def ensure(self, lock):
        if self.conn is None or self.conn.closed:
            self.close()
            self.open(lock)

    def close(self):
        if self.conn is not None:
            try:
                self.conn.close()
            except psycopg2.Error:
                pass
            self.conn = None

    def execute(self, sql, args=None):
        self._record(sql)
        with self.conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.rowcount

    def one(self, sql, args=None):
        self._record(sql)
        with self.conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchone()

    def all(self, sql, args=None):
        self._record(sql)
        with self.conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()

    def copy(self, sql, lines):
        """COPY ... FROM STDIN of the lines; the number of rows copied."""
        self._record(sql)
        stream = CopyStream(lines)
        with self.conn.cursor() as cur:
            cur.copy_expert(sql, stream)
            count = cur.rowcount
        if stream.error is not None:
            raise stream.error
        return count

    def selected(self, sql, company_id, keys, extra=None):
        """Rows of sql for the (type, id) keys of a company, in batches."""
        out = []
        for part in chunks(keys):
            args = {"company": company_id, "types": [k[0] for k in part], "ids": [k[1] for k in part]}
            args.update(extra or {})
            out.extend(self.all(sql, args))
        return out

    def rollback(self):
        if self.conn is not None and not self.conn.closed:
            try:
                self.conn.rollback()
            except psycopg2.Error:
                pass

    def meta(self):
        system_identifier, now, in_recovery, read_only, temporary = self.one(META_SQL)
        referenced = {t: self.one(REFERENCED_SQL, {"table": t})[0] > 0 for t in ("whatsapp_auth", "whatsapp_keys")}
        self.conn.commit()
        return {"system_identifier": system_identifier, "now": now, "referenced": referenced, "in_recovery": in_recovery,
                "read_only": read_only, "temporary": temporary}

    def txid_status(self, txid):
        """'committed', 'aborted', 'in progress' or None, asked on a fresh connection (this one may be gone)."""
        try:
            conn = self.connect()
        except Exception:  # noqa: BLE001 - the answer is then unknown
            return None
        try:
            self._record(TXID_STATUS_SQL)
            with conn.cursor() as cur:
                cur.execute(TXID_STATUS_SQL, {"txid": txid})
                return cur.fetchone()[0]
        except psycopg2.Error:
            return None
        finally:
            conn.close()


def read_only_reason(meta, target):
    """Why the database cannot take the writes, or None (a standby would only fail at its first write, obscurely)."""
    if meta.get("in_recovery"):
        return "PostgreSQL at %s is a read-only standby (pg_is_in_recovery() is true): run against the primary" % target
    if meta.get("read_only"):
        return "PostgreSQL at %s accepts only read-only transactions (default_transaction_read_only is on)" % target
    return None
