# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The database side of an export: one REPEATABLE READ READ ONLY transaction over the auth-state store.

Company by company, keys through a server-side cursor in digest order, so memory follows the largest company, never
the table. The snapshot can be exported (pg_export_snapshot) so that other connections (threads, worker processes)
read exactly what it reads. Per-company aggregates of row versions (xmin) tell unchanged companies apart; they only
compare within one server lifetime (same_server_lifetime). Hostile rows are looked for on the server first.
"""

from __future__ import annotations

from ansible.module_utils.baileys_dr_codec import KEY_TYPES
from ansible.module_utils.baileys_dr_postgres import psycopg2
from ansible.module_utils.baileys_dr_tree import MAX_SHOWN, NAME_MAX, HostileInputError, checked_key_file_name, iso

FETCH_SIZE = 2000
XID_WINDOW = 2 ** 31

META_SQL = (
    "SELECT now(), (SELECT system_identifier FROM pg_control_system())::text, "
    "(SELECT timeline_id FROM pg_control_checkpoint()), pg_postmaster_start_time(), "
    "txid_snapshot_xmax(txid_current_snapshot()), current_setting('server_encoding'), txid_current_snapshot()::text"
)
STATS_SQL = (
    "SELECT company_id, coalesce(k.keys, 0), k.xmin_hash::text, a.xmin::text FROM "
    "(SELECT company_id, count(*) AS keys, sum(hashint8(xmin::text::bigint)) AS xmin_hash "
    "FROM whatsapp_keys {where} GROUP BY company_id) k "
    "FULL JOIN (SELECT company_id, xmin FROM whatsapp_auth {where}) a USING (company_id) "
    'ORDER BY company_id COLLATE "C"'
)
ESTIMATE_SQL = (
    "SELECT (SELECT coalesce(sum(octet_length(value::text)), 0) FROM whatsapp_keys {where}) + "
    "(SELECT coalesce(sum(octet_length(creds::text)), 0) FROM whatsapp_auth {where})"
)
CREDS_SQL = "SELECT xmin::text, creds::text, md5(creds::text) FROM whatsapp_auth WHERE company_id = %s"
KEYS_SQL = (
    "SELECT key_type, key_id, xmin::text, t, md5(t) FROM (SELECT key_type, key_id, xmin, value::text AS t "
    "FROM whatsapp_keys WHERE company_id = %s OFFSET 0) s ORDER BY key_type COLLATE \"C\", key_id COLLATE \"C\""
)
SIZE_SQL = (
    "SELECT coalesce(sum(pg_column_size(value)), 0), count(*), "
    "(SELECT count(*) FROM whatsapp_auth WHERE company_id = %s) FROM whatsapp_keys WHERE company_id = %s"
)
# Prepared by a standby refresh (prepare_refresh): a company's row versions as one text, the values of changed rows.
ROWS_SQL = (
    "PREPARE baileys_dr_rows(text, text[]) AS SELECT (SELECT string_agg(key_type || E'\\t' || key_id || E'\\t' || xmin::text{md5}, "
    "E'\\n' ORDER BY key_type COLLATE \"C\", key_id COLLATE \"C\") FROM whatsapp_keys WHERE company_id = $1 AND key_type = ANY($2)), "
    "a.xmin::text, a.creds::text, md5(a.creds::text) FROM (SELECT 1) one LEFT JOIN whatsapp_auth a ON a.company_id = $1"
)
VALUES_SQL = (
    "PREPARE baileys_dr_values(text, text[], text[]) AS SELECT key_type, key_id, xmin::text, value::text, md5(value::text) "
    "FROM whatsapp_keys WHERE company_id = $1 AND (key_type, key_id) IN (SELECT * FROM unnest($2, $3))"
)


class Snapshot:
    """One REPEATABLE READ READ ONLY transaction over the auth-state store; records the SQL it runs."""

    def __init__(self, conn, queries=None):
        self.conn = conn
        self.queries = [] if queries is None else queries
        conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
        conn.set_client_encoding("UTF8")
        self._cursor_serial = 0
        self.meta = None
        self.exported = None

    def _run(self, cur, sql, args=None):
        if sql not in self.queries:
            self.queries.append(sql)
        cur.execute(sql, args)

    def begin(self, target, export=False):
        """Start the transaction; with export, first try pg_export_snapshot() so that a second connection can share it."""
        if export:
            try:
                with self.conn.cursor() as cur:
                    self._run(cur, "SELECT pg_export_snapshot()")
                    self.exported = cur.fetchone()[0]
            except psycopg2.Error:
                # Not available (for example on some standby servers): one connection does all the reading.
                self.conn.rollback()
                self.exported = None
        with self.conn.cursor() as cur:
            self._run(cur, META_SQL)
            now, system_identifier, timeline, started, xid, encoding, txid_snapshot = cur.fetchone()
        self.meta = {
            "kind": "postgres",
            "target": target,
            "system_identifier": system_identifier,
            "snapshot_at": iso(now),
            "timeline_id": timeline,
            "postmaster_start_time": iso(started),
            "xid": int(xid),
            "server_encoding": encoding,
            # The transaction's whole snapshot (xmin:xmax:running xids): a later snapshot equal to it sees the same rows.
            "txid_snapshot": txid_snapshot,
        }
        return self.meta

    def attach(self, conn):
        """A second Snapshot on conn reading exactly what this one reads (SET TRANSACTION SNAPSHOT)."""
        other = Snapshot(conn, self.queries)
        with conn.cursor() as cur:
            other._run(cur, "SET TRANSACTION SNAPSHOT %s", (self.exported,))
        other.meta = self.meta
        return other

    @staticmethod
    def _where(companies):
        return ("WHERE company_id = ANY(%(ids)s)", {"ids": list(companies)}) if companies else ("", {})

    def company_stats(self, companies=None):
        """[(company_id, keys, fingerprint, has_creds)] of every company with creds or keys, in byte order."""
        where, args = self._where(companies)
        with self.conn.cursor() as cur:
            self._run(cur, STATS_SQL.format(where=where), args)
            rows = cur.fetchall()
        return [(cid, keys, "%d:%s:%s" % (keys, xmin_hash or "-", creds_xmin or "-"), creds_xmin is not None)
                for cid, keys, xmin_hash, creds_xmin in rows]

    def estimate_bytes(self, companies=None):
        where, args = self._where(companies)
        with self.conn.cursor() as cur:
            self._run(cur, ESTIMATE_SQL.format(where=where), args)
            return int(cur.fetchone()[0])

    def hostile_rows(self, companies, unknown_types):
        where, args = self._where(companies)
        args["types"] = list(KEY_TYPES)
        with self.conn.cursor() as cur:
            self._run(cur, hostile_rows_sql(where.replace("WHERE ", ""), unknown_types), args)
            return cur.fetchall()

    def creds(self, company_id):
        """(xmin, text, md5) of a company's creds row, or None."""
        with self.conn.cursor() as cur:
            self._run(cur, CREDS_SQL, (company_id,))
            return cur.fetchone()

    def _stream(self, sql, args):
        self._cursor_serial += 1
        cur = self.conn.cursor(name="baileys_dr_%d" % self._cursor_serial)
        cur.itersize = FETCH_SIZE
        try:
            self._run(cur, sql, args)
            while True:
                rows = cur.fetchmany(FETCH_SIZE)
                if not rows:
                    return
                yield from rows
        finally:
            cur.close()

    def keys(self, company_id):
        """(type, id, xmin, value text, md5) of a company's keys in digest order, streamed."""
        return self._stream(KEYS_SQL, (company_id,))


    def company_size(self, company_id):
        """(stored bytes, files) of a company, cheaply (no conversion to text)."""
        with self.conn.cursor() as cur:
            self._run(cur, SIZE_SQL, (company_id, company_id))
            size, keys, creds = cur.fetchone()
        return int(size), int(keys) + int(creds)


    def prepare_refresh(self, with_md5):
        with self.conn.cursor() as cur:
            self._run(cur, ROWS_SQL.format(md5=" || E'\\t' || md5(value::text)" if with_md5 else ""))
            self._run(cur, VALUES_SQL)

    def rows(self, company_id):
        """(row versions, creds row or None) of a company: "type TAB id TAB xmin[ TAB md5]" per key in digest order, one text."""
        with self.conn.cursor() as cur:
            self._run(cur, "EXECUTE baileys_dr_rows(%s, %s)", (company_id, list(KEY_TYPES)))
            text, xmin, creds, md5 = cur.fetchone()
        return text or "", (None if xmin is None else (xmin, creds, md5))

    def values(self, company_id, keys):
        """(type, id, xmin, value text, md5) of the given (type, id) keys of a company."""
        with self.conn.cursor() as cur:
            self._run(cur, "EXECUTE baileys_dr_values(%s, %s, %s)", (company_id, [k[0] for k in keys], [k[1] for k in keys]))
            return cur.fetchall()


def same_server_lifetime(old_source, meta):
    """True when xmins recorded under old_source still identify row versions now."""
    if not isinstance(old_source, dict):
        return False
    for field in ("system_identifier", "timeline_id", "postmaster_start_time"):
        if old_source.get(field) is None or old_source.get(field) != meta.get(field):
            return False
    old_xid = old_source.get("xid")
    return isinstance(old_xid, int) and 0 <= meta["xid"] - old_xid < XID_WINDOW


def hostile_rows_sql(where, unknown_types):
    """A cheap server-side pre-check for the hostile cases that need no per-company state."""
    name_len = "octet_length(key_type || '-' || replace(replace(key_id, '/', '__'), ':', '-') || '.json')"
    id_checks = r"(key_id ~ '[\x01-\x1f\x7f-\x9f]' OR key_id IN ('.', '..') OR %s > %d)" % (name_len, NAME_MAX)
    if unknown_types == "skip":
        predicate = "key_type = ANY(%(types)s) AND " + id_checks
    else:
        predicate = "key_type <> ALL(%(types)s) OR " + id_checks
    return (
        "SELECT company_id, key_type, key_id FROM whatsapp_keys WHERE %s(%s) "
        'ORDER BY company_id COLLATE "C", key_type COLLATE "C", key_id COLLATE "C" LIMIT %d'
        % ("%s AND " % where if where else "", predicate, MAX_SHOWN + 1)
    )


def hostile_error(rows, unknown_types):
    """HostileInputError for the pre-check's rows (at most MAX_SHOWN named)."""
    messages = []
    for company_id, key_type, key_id in rows[:MAX_SHOWN]:
        try:
            checked_key_file_name(company_id, key_type, key_id)
            messages.append("company %s: %s key id %r is refused" % (company_id, key_type, key_id))
        except HostileInputError as exc:
            messages.append(str(exc))
    more = " (and more)" if len(rows) > MAX_SHOWN else ""
    if unknown_types == "fail" and any(r[1] not in KEY_TYPES for r in rows):
        more += "; unknown_types=skip leaves keys of unknown types out"
    return HostileInputError("refusing to export hostile rows%s: %s" % (more, "; ".join(messages)))
