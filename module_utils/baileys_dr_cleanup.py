# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Type-aware retention of whatsapp_keys, archive before delete, and restore.

What may go: rows of a type named in the retention map (days since
updated_at), optionally also rows whose expires_at passed (off by default:
the application sets expires_at 7 or 14 days ahead on every write, so it is
no deletion signal). Protected types are never candidates; whatsapp_auth is
never read or written. tctoken rows follow Baileys' own rule instead of any
age (the codec's tctoken_prunable_sql: the rows Baileys' pruning would
delete, whatever updated_at), and its sentinel row __index is never a
candidate (SENTINEL_KEYS). Each candidate carries the rule that selected it.

Deletes run in short batches: one statement selects the next page of
candidates in primary-key order (keyset pagination), locks them with
SKIP LOCKED (a row the application is writing is left alone), re-checks the
age on the row version it locked and deletes; the rows RETURNING gives are
appended to the archive as one gzip member, the archive and its sha256
sidecar are synced, and only then the batch commits. A crash at any point
leaves an archive that verifies and holds every row deleted (plus perhaps
rows of the last batch that were not deleted, which a restore skips).

Archive (format 1): gzip (one member per batch) of JSON lines; a header
{"format": 1, "kind": "baileys-dr-keys-archive", "table": "whatsapp_keys",
"columns": [...], "created_at", "run_at", "source", "policy"}, then one
line per row, to_jsonb(row) as PostgreSQL writes it (every column; jsonb,
bytea and timestamps come back exactly through jsonb_populate_recordset).
Sidecar <archive>.sha256: "<hex>  <archive name>\\n".
"""

from __future__ import annotations

import datetime
import gzip
import hashlib
import json
import os
import time

from ansible.module_utils.baileys_dr_ages import BUCKET_NAMES, bucket_conditions
from ansible.module_utils.baileys_dr_codec import (
    COMPANY_ID_RE, KEY_TYPES, PROTECTED_KEY_TYPES, SENTINEL_KEYS, tctoken_cutoff, tctoken_prunable_sql,
)
from ansible.module_utils.baileys_dr_fs import fsync_dir, write_file_atomic
from ansible.module_utils.baileys_dr_tree import test_hook

TABLE = "whatsapp_keys"
ARCHIVE_KIND = "baileys-dr-keys-archive"
ARCHIVE_FORMAT = 1
PRIMARY_KEY = ("company_id", "key_type", "key_id")

DEFAULT_PROTECTED = PROTECTED_KEY_TYPES
# Rebuildable by the protocol at the cost of a renegotiation.
# tctoken's number is not used: a tctoken row goes when Baileys considers it expired (RULE_TCTOKEN), whatever its age.
DEFAULT_RETENTION = {"session": 30, "sender-key": 30, "sender-key-memory": 30, "device-list": 30, "tctoken": 30}
RULE_TCTOKEN = "tctoken-expired"


# One cleanup or restore per database at a time (pg_try_advisory_lock key: "bdrc").
ADVISORY_LOCK_KEY = 0x62647263


class CleanupError(Exception):
    """A refusal or failure whose message is safe to show."""

    def __init__(self, message, refused=False, details=None):
        super().__init__(message)
        self.refused = refused
        self.details = details or {}


# -- validation ---------------------------------------------------------------------------


def validate_policy(retention, protected_types, companies=None, expired_grace_days=None):
    """Check the maps; returns (retention, protected) normalised. Errors name every bad entry."""
    errors = []
    retention = dict(retention or {})
    protected = list(protected_types or [])
    unknown = sorted(t for t in retention if t not in KEY_TYPES)
    if unknown:
        errors.append("retention names unknown key types: %s (known: %s)" % (", ".join(map(repr, unknown)), ", ".join(KEY_TYPES)))
    unknown = sorted(set(t for t in protected if t not in KEY_TYPES))
    if unknown:
        errors.append("protected_types names unknown key types: %s (known: %s)" % (", ".join(map(repr, unknown)), ", ".join(KEY_TYPES)))
    both = sorted(set(retention) & set(protected))
    if both:
        errors.append("key types both protected and given a retention: %s (remove them from one of the two)" % ", ".join(both))
    for key_type, days in sorted(retention.items()):
        if isinstance(days, bool) or not isinstance(days, int):
            try:
                days = int(str(days), 10)
            except ValueError:
                errors.append("retention of %r must be a whole number of days, not %r" % (key_type, days))
                continue
            retention[key_type] = days
        if days < 1:
            errors.append("retention of %r must be at least 1 day, not %d" % (key_type, days))
    bad = [c for c in (companies or []) if not isinstance(c, str) or not COMPANY_ID_RE.match(c)]
    if bad:
        errors.append("companies holds ids that do not match [A-Za-z0-9_-]{1,50}: %s" % ", ".join(repr(c) for c in bad[:10]))
    if expired_grace_days is not None and expired_grace_days < 0:
        errors.append("expired_grace_days must be 0 or more, not %r" % (expired_grace_days,))
    if errors:
        raise CleanupError("; ".join(errors))
    return retention, sorted(set(protected))


def check_cap(plan_by_company, company_totals, max_delete, max_delete_share):
    """Refusal message (with the numbers) when the plan exceeds a cap, else None."""
    total = sum(sum(types.values()) for types in plan_by_company.values())
    reasons = []
    if total > max_delete:
        reasons.append("it would delete %d keys, more than max_delete=%d" % (total, max_delete))
    over = []
    for company, types in sorted(plan_by_company.items()):
        count = sum(types.values())
        of = company_totals.get(company) or 0
        if of and count / of > max_delete_share:
            over.append("%s: %d of %d keys (%.1f%%)" % (company, count, of, 100.0 * count / of))
    if over:
        shown = over[:20] + (["... and %d more" % (len(over) - 20)] if len(over) > 20 else [])
        reasons.append("it would delete more than max_delete_share=%s of the keys of %d compan%s: %s"
                       % (max_delete_share, len(over), "y" if len(over) == 1 else "ies", "; ".join(shown)))
    if not reasons:
        return None
    return "refusing to delete anything: %s. Raise the limit if this is intended." % " and ".join(reasons)


# -- age buckets -----------------------------------------------------------------------------


def bucket_sql(ref="%(run_at)s::timestamptz", column="k.updated_at"):
    """SELECT items counting rows per age bucket (days since updated_at at the run's start)."""
    return ", ".join('count(*) FILTER (WHERE %s) AS "%s"' % (condition, name)
                     for name, condition in bucket_conditions(column, ref))


def empty_buckets():
    return dict.fromkeys(BUCKET_NAMES, 0)


def add_buckets(into, values):
    for name, value in zip(BUCKET_NAMES, values):
        into[name] += int(value)
    return into


# -- archive ---------------------------------------------------------------------------------


def sidecar_path(archive):
    return archive + ".sha256"


def sidecar_text(hexdigest, archive):
    return "%s  %s\n" % (hexdigest, os.path.basename(archive))


def read_sidecar(archive):
    """The sha256 the sidecar records for archive; CleanupError when missing or malformed."""
    path = sidecar_path(archive)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read(4096)
    except FileNotFoundError:
        raise CleanupError("the archive %s has no sha256 sidecar (%s): refusing to restore from it" % (archive, path)) from None
    parts = text.split()
    if len(parts) != 2 or len(parts[0]) != 64 or any(c not in "0123456789abcdef" for c in parts[0]):
        raise CleanupError("the sidecar %s is not '<sha256>  <name>'" % path)
    if parts[1] != os.path.basename(archive):
        raise CleanupError("the sidecar %s names %r, not %r" % (path, parts[1], os.path.basename(archive)))
    return parts[0]


def verify_archive(archive):
    """sha256 of archive, after checking it equals its sidecar's; CleanupError on mismatch."""
    from ansible.module_utils.baileys_dr_fs import sha256_file

    expected = read_sidecar(archive)
    actual = sha256_file(archive)
    if actual != expected:
        raise CleanupError(
            "the archive %s does not match its sidecar (sha256 %s, sidecar says %s): refusing to restore from it"
            % (archive, actual, expected))
    return actual


class ArchiveWriter:
    """Appends one gzip member per batch; the file and its sidecar are synced before the batch commits."""

    def __init__(self, path, header):
        self.path = path
        self.rows = 0
        self.bytes = 0
        self._sha = hashlib.sha256()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fsync_dir(os.path.dirname(os.path.abspath(path)))
        self._append([json.dumps(header, sort_keys=True, separators=(",", ":"))])

    def _append(self, lines):
        data = gzip.compress(("\n".join(lines) + "\n").encode("utf-8"), compresslevel=6, mtime=0)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        self._sha.update(data)
        self.bytes += len(data)
        os.fsync(self._fd)
        write_file_atomic(sidecar_path(self.path), sidecar_text(self._sha.hexdigest(), self.path).encode("ascii"))

    def write_batch(self, lines):
        """Durably append rows (JSON texts); returns when file and sidecar are on disk."""
        if lines:
            self._append(lines)
            self.rows += len(lines)

    @property
    def sha256(self):
        return self._sha.hexdigest()

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def iter_archive(archive):
    """(line number, header dict) first, then (line number, raw text) per row. Streams."""
    with gzip.open(archive, "rt", encoding="utf-8", newline="\n") as fh:
        header = None
        for number, line in enumerate(fh, 1):
            line = line.rstrip("\n")
            if header is None:
                try:
                    header = json.loads(line)
                except ValueError:
                    header = None
                if not isinstance(header, dict) or header.get("kind") != ARCHIVE_KIND or header.get("format") != ARCHIVE_FORMAT:
                    raise CleanupError("%s is not a baileys-dr keys archive (format %d): bad header line" % (archive, ARCHIVE_FORMAT))
                if header.get("table") != TABLE or not isinstance(header.get("columns"), list):
                    raise CleanupError("%s: the header names table %r, this restores %s" % (archive, header.get("table"), TABLE))
                yield number, header
                continue
            if line:
                yield number, line


def parse_row(archive, number, line):
    try:
        row = json.loads(line)
    except ValueError as exc:
        raise CleanupError("%s line %d is not JSON: %s" % (archive, number, exc)) from None
    if not isinstance(row, dict) or not all(isinstance(row.get(c), str) for c in PRIMARY_KEY):
        raise CleanupError("%s line %d is not a whatsapp_keys row (company_id, key_type, key_id)" % (archive, number))
    return row


def archive_name(moment, suffix):
    return "%s-%s-%s.jsonl.gz" % (TABLE, moment.astimezone(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ"), suffix)


# -- database --------------------------------------------------------------------------------


class Cleanup:
    """One run: plan, cap, archive-then-delete in batches, vacuum, stats; or a restore."""

    def __init__(self, conn, params, queries=None, clock=time.monotonic):
        self.conn = conn
        self.p = params
        self.queries = queries if queries is not None else []
        self.clock = clock
        self.run_at = None
        self.retention = {}
        self.protected = []

    # -- helpers
    def _run(self, cur, sql, args=None):
        if sql not in self.queries:
            self.queries.append(sql)
        cur.execute(sql, args)

    def _one(self, sql, args=None):
        with self.conn.cursor() as cur:
            self._run(cur, sql, args)
            return cur.fetchone()

    def _all(self, sql, args=None):
        with self.conn.cursor() as cur:
            self._run(cur, sql, args)
            return cur.fetchall()

    def _args(self, **extra):
        args = {
            "run_at": self.run_at,
            "r_types": sorted(self.retention),
            "r_map": json.dumps(self.retention),
            "protected": self.protected,
            "companies": self.p.get("companies") or [],
            "grace": int(self.p.get("expired_grace_days") or 0),
            "tc_cutoff": tctoken_cutoff(self.run_at.timestamp()),
            "sentinel_types": [t for t, _ in SENTINEL_KEYS],
            "sentinel_ids": [i for _, i in SENTINEL_KEYS],
        }
        args.update(extra)
        return args

    _OLD = "k.updated_at < %(run_at)s::timestamptz - make_interval(days => (%(r_map)s::jsonb ->> k.key_type)::int)"
    _EXPIRES = "k.expires_at < %(run_at)s::timestamptz - make_interval(days => %(grace)s)"

    def _candidate_where(self):
        """Candidates: a retention type, not protected, never a sentinel row; tctoken rows by Baileys' expiry, the other
        types older than their retention (or past expires_at, when enabled)."""
        old = self._OLD
        if self.p.get("delete_expired"):
            old = "(%s OR %s)" % (old, self._EXPIRES)
        where = ["k.key_type = ANY(%(r_types)s::text[])", "k.key_type <> ALL(%(protected)s::text[])",
                 "(k.key_type, k.key_id) NOT IN (SELECT * FROM unnest(%(sentinel_types)s::text[], %(sentinel_ids)s::text[]))",
                 "CASE WHEN k.key_type = 'tctoken' THEN %s ELSE %s END" % (tctoken_prunable_sql(), old)]
        if self.p.get("companies"):
            where.append("k.company_id = ANY(%(companies)s::text[])")
        return " AND ".join(where)

    def _rule_sql(self):
        """The rule that selected a candidate, for the plan: tctoken-expired, age>Nd or expires_at+Nd."""
        return ("CASE WHEN k.key_type = 'tctoken' THEN '%s' WHEN %s THEN 'age>' || (%%(r_map)s::jsonb ->> k.key_type) || 'd' "
                "ELSE 'expires_at+' || %%(grace)s || 'd' END" % (RULE_TCTOKEN, self._OLD))

    def _company_where(self):
        return "WHERE k.company_id = ANY(%(companies)s::text[])" if self.p.get("companies") else ""

    def prepare(self):
        self.retention, self.protected = validate_policy(
            self.p.get("retention"), self.p.get("protected_types"), self.p.get("companies"), self.p.get("expired_grace_days"))
        with self.conn.cursor() as cur:
            self._run(cur, "SET TIME ZONE 'UTC'")
            self._run(cur, "SET lock_timeout = %s", ("%dms" % int(self.p.get("lock_timeout_ms") or 1000),))
        exists = self._one("SELECT to_regclass(%s) IS NOT NULL", (TABLE,))[0]
        if not exists:
            raise CleanupError("the table %s does not exist in this database" % TABLE)
        self.run_at = self._one("SELECT now()")[0]
        self.conn.commit()

    def take_lock(self):
        if not self._one("SELECT pg_try_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))[0]:
            self.conn.rollback()
            raise CleanupError("another baileys-dr cleanup or restore is running on this database (advisory lock %d is held)"
                               % ADVISORY_LOCK_KEY)
        self.conn.commit()

    # -- statistics
    def key_stats(self):
        """Key counts by type with age buckets (scope: the companies filter), plus companies."""
        rows = self._all(
            "SELECT k.key_type, count(*), %s FROM %s k %s GROUP BY k.key_type ORDER BY k.key_type"
            % (bucket_sql(), TABLE, self._company_where()), self._args())
        companies = self._one("SELECT count(DISTINCT k.company_id) FROM %s k %s" % (TABLE, self._company_where()), self._args())[0]
        by_type, buckets = {}, empty_buckets()
        for row in rows:
            by_type[row[0]] = {"keys": int(row[1]), "buckets": add_buckets(empty_buckets(), row[2:])}
            add_buckets(buckets, row[2:])
        self.conn.commit()
        return {
            "keys": sum(t["keys"] for t in by_type.values()),
            "companies": int(companies),
            "by_type": by_type,
            "buckets": buckets,
            "protected": sum(t["keys"] for name, t in by_type.items() if name in self.protected),
        }

    def table_stats(self):
        row = self._one(
            "SELECT pg_table_size(c.oid), pg_indexes_size(c.oid), pg_total_relation_size(c.oid), "
            "s.n_live_tup, s.n_dead_tup, s.last_vacuum, s.last_autovacuum, s.last_analyze, s.last_autoanalyze "
            "FROM pg_class c LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid WHERE c.oid = %s::regclass", (TABLE,))
        self.conn.commit()
        stamp = lambda v: v.isoformat() if v is not None else None  # noqa: E731
        return {
            "table_bytes": int(row[0]), "index_bytes": int(row[1]), "total_bytes": int(row[2]),
            "live_tuples": int(row[3] or 0), "dead_tuples": int(row[4] or 0),
            "last_vacuum": stamp(row[5]), "last_autovacuum": stamp(row[6]),
            "last_analyze": stamp(row[7]), "last_autoanalyze": stamp(row[8]),
        }

    def stats(self):
        out = self.key_stats()
        out.update(self.table_stats())
        return out

    def flush_stats(self):
        """Make this backend's pending counters (dead tuples) visible now, where the server can (PostgreSQL 15+)."""
        if self.conn.server_version >= 150000:
            self._one("SELECT pg_stat_force_next_flush()")
            self.conn.commit()

    # -- plan
    def plan(self):
        """Exact candidates per company, type and selecting rule, their buckets and size; totals of those companies."""
        rows = self._all(
            "SELECT k.company_id, k.key_type, %s, count(*), coalesce(sum(pg_column_size(k.*)), 0)::bigint, %s "
            "FROM %s k WHERE %s GROUP BY 1, 2, 3" % (self._rule_sql(), bucket_sql(), TABLE, self._candidate_where()),
            self._args())
        by_company, by_type, by_rule, rules, buckets, size = {}, {}, {}, {}, empty_buckets(), 0
        for company, key_type, rule, count, nbytes, *bucket_values in rows:
            per = by_company.setdefault(company, {})
            per[key_type] = per.get(key_type, 0) + int(count)
            by_type[key_type] = by_type.get(key_type, 0) + int(count)
            by_rule[rule] = by_rule.get(rule, 0) + int(count)
            rules.setdefault(company, {}).setdefault(key_type, {})[rule] = int(count)
            add_buckets(buckets, bucket_values)
            size += int(nbytes)
        totals = {}
        if by_company:
            totals = dict(self._all(
                "SELECT k.company_id, count(*) FROM %s k WHERE k.company_id = ANY(%%(ids)s::text[]) GROUP BY k.company_id" % TABLE,
                {"ids": sorted(by_company)}))
        self.conn.commit()
        return {
            "keys": sum(by_type.values()),
            "companies": len(by_company),
            "by_company": {c: dict(sorted(t.items())) for c, t in sorted(by_company.items())},
            "by_type": dict(sorted(by_type.items())),
            "by_rule": dict(sorted(by_rule.items())),
            "rules": {c: {t: dict(sorted(r.items())) for t, r in sorted(types.items())} for c, types in sorted(rules.items())},
            "buckets": buckets,
            "row_bytes": size,
            "company_keys": {c: int(n) for c, n in sorted(totals.items())},
        }

    # -- delete
    def _batch_sql(self, first):
        after = "" if first else " AND (k.company_id, k.key_type, k.key_id) > (%(c)s, %(t)s, %(i)s)"
        return (
            "WITH doomed AS ("
            "SELECT k.company_id, k.key_type, k.key_id, row_number() OVER (ORDER BY k.company_id, k.key_type, k.key_id) AS n FROM ("
            "SELECT k.company_id, k.key_type, k.key_id FROM %s k WHERE %s%s "
            "ORDER BY k.company_id, k.key_type, k.key_id LIMIT %%(limit)s FOR UPDATE OF k SKIP LOCKED) k) "
            "DELETE FROM %s k USING doomed d "
            "WHERE k.company_id = d.company_id AND k.key_type = d.key_type AND k.key_id = d.key_id AND %s "
            "RETURNING d.n, k.company_id, k.key_type, k.key_id, to_jsonb(k)::text"
            % (TABLE, self._candidate_where(), after, TABLE, self._candidate_where()))

    def columns(self):
        rows = self._all(
            "SELECT a.attname FROM pg_attribute a WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped "
            "ORDER BY a.attnum", (TABLE,))
        self.conn.commit()
        return [r[0] for r in rows]

    def delete(self, archive_dir, budget, header):
        """Archive-then-delete batches until no candidate is left or budget rows are gone."""
        batch_size = int(self.p.get("batch_size") or 2000)
        max_tx = float(self.p.get("max_transaction_seconds") or 0.5)
        retries = int(self.p.get("lock_retries") if self.p.get("lock_retries") is not None else 5)
        writer = None
        deleted = {}
        position = None
        stats = {"batches": 0, "max_transaction_seconds": 0.0, "lock_timeouts": 0, "batch_size_final": batch_size}
        total = 0
        try:
            while total < budget:
                limit = min(batch_size, budget - total)
                args = self._args(limit=limit)
                if position is not None:
                    args.update(c=position[0], t=position[1], i=position[2])
                started = self.clock()
                try:
                    with self.conn.cursor() as cur:
                        self._run(cur, self._batch_sql(position is None), args)
                        rows = cur.fetchall()
                except Exception as exc:
                    self.conn.rollback()
                    if getattr(exc, "pgcode", None) == "55P03" and retries > 0:  # lock_not_available
                        retries -= 1
                        stats["lock_timeouts"] += 1
                        time.sleep(0.5)
                        continue
                    raise
                if not rows:
                    self.conn.rollback()
                    break
                if writer is None:
                    os.makedirs(archive_dir, mode=0o700, exist_ok=True)
                    path = os.path.join(archive_dir, archive_name(datetime.datetime.now(datetime.timezone.utc), "%d" % os.getpid()))
                    writer = ArchiveWriter(path, header)
                # Archive what RETURNING gave, synced, before the delete commits.
                writer.write_batch([r[4] for r in rows])
                self.conn.commit()
                elapsed = self.clock() - started
                stats["batches"] += 1
                stats["max_transaction_seconds"] = max(stats["max_transaction_seconds"], round(elapsed, 4))
                if elapsed > max_tx and batch_size > 50:
                    batch_size = max(50, batch_size // 2)  # keep row locks short for the application's upserts
                last = max(rows, key=lambda r: r[0])
                position = (last[1], last[2], last[3])
                for _, company, key_type, _, _ in rows:
                    per = deleted.setdefault(company, {})
                    per[key_type] = per.get(key_type, 0) + 1
                total += len(rows)
                test_hook("cleanup_after_batch:%d" % stats["batches"])
        except Exception as exc:
            if writer is None:
                raise
            # What was deleted so far is archived and verifies: say where, for a restore.
            raise CleanupError("the cleanup stopped after deleting %d keys, all archived in %s (it verifies against its sidecar): %s"
                               % (total, writer.path, str(exc).strip())) from None
        finally:
            if writer is not None:
                writer.close()
        stats["batch_size_final"] = batch_size
        archive = None
        if writer is not None:
            archive = {"path": writer.path, "sha256": writer.sha256, "sidecar": sidecar_path(writer.path),
                       "rows": writer.rows, "bytes": writer.bytes}
        return total, {c: dict(sorted(t.items())) for c, t in sorted(deleted.items())}, archive, stats

    def vacuum(self):
        """VACUUM (ANALYZE) the table (autocommit); returns what happened, warnings included."""
        self.conn.commit()
        old = self.conn.autocommit
        self.conn.autocommit = True
        del self.conn.notices[:]
        started = self.clock()
        try:
            with self.conn.cursor() as cur:
                # VACUUM's lock never blocks the application's row writes, but it queues
                # behind an autovacuum (cancelled after deadlock_timeout): do not give up at 1 s.
                self._run(cur, "SET lock_timeout = '60s'")
                self._run(cur, "VACUUM (ANALYZE) %s" % TABLE)
        finally:
            self.conn.autocommit = old
        warnings = [n.strip() for n in self.conn.notices if "WARNING" in n]
        return {"ran": not warnings, "seconds": round(self.clock() - started, 3), "warnings": warnings}

    # -- restore
    def restore(self, archive, check_mode=False):
        """Re-insert an archive's rows that are missing; never overwrites a present row."""
        sha = verify_archive(archive)
        columns = self.columns()
        companies = set(self.p.get("companies") or [])
        header, rows_total = None, 0
        # First pass: the whole archive parses, before anything is written.
        for number, item in iter_archive(archive):
            if header is None:
                header = item
                missing = [c for c in header["columns"] if c not in columns]
                if missing or not all(c in header["columns"] for c in PRIMARY_KEY):
                    raise CleanupError("%s holds columns the table %s does not have: %s" % (archive, TABLE, ", ".join(missing) or "(no primary key)"))
                continue
            parse_row(archive, number, item)
            rows_total += 1
        if header is None:
            raise CleanupError("%s is empty (no header line)" % archive)
        cols = ", ".join('"%s"' % c.replace('"', '""') for c in header["columns"])
        acols = ", ".join('a."%s"' % c.replace('"', '""') for c in header["columns"])
        kcols = ", ".join('k."%s"' % c.replace('"', '""') for c in header["columns"])
        records = "jsonb_populate_recordset(NULL::%s, %%s::jsonb) a" % TABLE
        present_sql = (
            "SELECT count(*), count(*) FILTER (WHERE (%s) IS DISTINCT FROM (%s)) FROM %s "
            "JOIN %s k ON k.company_id = a.company_id AND k.key_type = a.key_type AND k.key_id = a.key_id" % (kcols, acols, records, TABLE))
        insert_sql = (
            "INSERT INTO %s (%s) SELECT %s FROM %s ON CONFLICT (company_id, key_type, key_id) DO NOTHING RETURNING 1"
            % (TABLE, cols, acols, records))
        result = {"archive": archive, "sha256": sha, "rows": rows_total, "selected": 0, "inserted": 0,
                  "already_present": 0, "already_present_differs": 0, "by_company": {}}
        batch_size = int(self.p.get("batch_size") or 2000)
        batch = []

        def flush():
            payload = "[" + ",".join(line for _, line in batch) + "]"
            with self.conn.cursor() as cur:
                self._run(cur, present_sql, (payload,))
                present, differs = cur.fetchone()
                inserted = 0
                if not check_mode:
                    self._run(cur, insert_sql, (payload,))
                    inserted = len(cur.fetchall())
            if check_mode:
                self.conn.rollback()
                inserted = len(batch) - int(present)
            else:
                self.conn.commit()
            result["inserted"] += inserted
            result["already_present"] += len(batch) - inserted
            result["already_present_differs"] += int(differs)
            for company, _ in batch:
                result["by_company"][company] = result["by_company"].get(company, 0) + 1
            del batch[:]

        for number, item in iter_archive(archive):
            if number == 1:
                continue
            row = parse_row(archive, number, item)
            if companies and row["company_id"] not in companies:
                continue
            batch.append((row["company_id"], item))
            result["selected"] += 1
            if len(batch) >= batch_size:
                flush()
        if batch:
            flush()
        result["header"] = {k: header.get(k) for k in ("created_at", "run_at", "source", "policy", "columns")}
        return result
