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
forked worker processes (baileys_dr_sessions.Workers, the export's): each
takes whole companies on its own connection, and the per-company code
(_company, _write_company) is the same in a worker as in the module's process.

Reused: the codec (fixFileName, Buffer forms, canonical JSON through the
digest lines), the sessions tree readers and validators, the export's test
hooks, the application's expires_at policy (baileys_dr_codec.expiry_days).
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import pickle
import re
import secrets
import stat
import threading
import time

from ansible.module_utils.baileys_dr_codec import (
    COMPANY_ID_RE,
    KEY_TYPES,
    VALUE_ERRORS,
    creds_shape_problems,
    decode_base64,
    expiry_days,
    key_file_name,
    key_name,
    nesting_problem,
    sort_key,
    to_array_form,
    to_base64_form,
    value_problem,
)
from ansible.module_utils.baileys_dr_fs import fsync_dir, write_file_atomic
from ansible.module_utils.baileys_dr_identity import import_refusal
from ansible.module_utils import baileys_dr_passfiles as passfiles
from ansible.module_utils.baileys_dr_passfiles import RACY_COARSE_NS, RACY_NS, racy_limit
from ansible.module_utils.baileys_dr_postgres import (
    RETRY_DELAYS,
    CopyStream,
    DatabaseError,
    connection_lost,
    copy_text,
    postgres_argument_spec,
    psycopg2,
    retry_on_disconnect,
)
from ansible.module_utils.baileys_dr_files import (
    NEW_FILE_FLAGS,
    READ_FLAGS,
    ParentLock,
    check_dest,
    open_dir,
    write_all,
)
from ansible.module_utils.baileys_dr_manifests import (
    load_company_manifest,
    read_json_at,
    validate_top_manifest,
)
from ansible.module_utils.baileys_dr_tree import (
    COMPANIES_DIR,
    COMPANY_PREFIX,
    CREDS_FILE,
    HEADER_LINE,
    IN_PROGRESS_NAME,
    MANIFEST_NAME,
    META_DIR,
    DigestLines,
    HostileInputError,
    ManifestError,
    SessionsError,
    checked_key_file_name,
    compact_stamp,
    creds_line,
    encode_json,
    iso,
    key_line,
    parse_iso,
    sha256_bytes,
    test_hook,
    utc_now,
)
from ansible.module_utils.baileys_dr_workers import (
    PARALLEL_MIN_KEYS,
    Workers,
    export_workers,
)

UNDO_FORMAT = 1
UNDO_KIND = "baileys-dr-failback-undo"
UNDO_RE = re.compile(r"\Afailback-([A-Za-z0-9_-]{1,50})-(\d{8}T\d{6}Z)(?:-\d+)?\.jsonl\.gz\Z")
LEGACY_MANIFEST = "manifest.json"
MAX_FILE_BYTES = 64 << 20
MAX_CANDIDATES = 8
BATCH = 1000
LOCK_NAME = "baileys-dr-import"
SCAN_MIN_FORK = 50  # companies from which a delta pass lists directories in forked workers
BOM = b"\xef\xbb\xbf"
TYPES_BY_LENGTH = tuple(sorted(KEY_TYPES, key=len, reverse=True))

# -- id shapes of Baileys' keys (reverse of fixFileName) ------------------------------------
DIGITS_RE = re.compile(r"\A[0-9]+\Z")
# libsignal ProtocolAddress.toString(): <user>[_<domain type>].<device>
SIGNAL_ADDRESS_RE = re.compile(r"\A[0-9]+(?:_[0-9]+)?\.[0-9]+\Z")
# Group JIDs hold no ':' (only user JIDs carry a device); old groups are <creator>-<time>@g.us.
GROUP_JID = r"(?:[0-9]+(?:-[0-9]+)?@g\.us|status@broadcast)"
GROUP_JID_RE = re.compile(r"\A%s\Z" % GROUP_JID)
# SenderKeyName.toString(): <group jid>::<signal user>::<device>, the file holds '--' for '::'.
SENDER_KEY_NAME_RE = re.compile(r"\A(%s)--([0-9]+(?:_[0-9]+)?)--([0-9]+)\Z" % GROUP_JID)
LID_MAPPING_RE = re.compile(r"\A[0-9]+(?:_reverse)?\Z")
BASE64_NAME_RE = re.compile(r"\A[A-Za-z0-9+=_]+\Z")

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


class FailbackError(SessionsError):
    """An error whose message is safe to show (no secret, no key value)."""


class CompanyRefused(FailbackError):
    """A company that cannot be imported as its files are (refused before any write of it)."""


class Deferred(FailbackError):
    """A company whose files changed while it was read or imported (changed_during_read=defer): left to the delta pass."""


class BaseStale(Exception):
    """Delta pass, per file: the company's rows are no longer the bulk pass's (its fingerprint moved): read it whole."""


class _LeftOut(Exception):
    """Delta batch: companies ({company: why}) the batch leaves out (rolled back, done again without them)."""

    def __init__(self, reasons):
        super().__init__(", ".join(sorted(reasons)))
        self.reasons = reasons


class FileProblem(Exception):
    """Why one file cannot be imported."""


def chunks(items, size=BATCH):
    for start in range(0, len(items), size):
        yield items[start:start + size]


# One encoder for every compact dump (json.dumps with these options would build a new one per call); same output.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def dumps(value):
    return _ENCODER.encode(value)




# -- file names: type by longest prefix, id by a type-aware reverse of fixFileName ------------


def parse_key_file_name(file_name):
    """(type, name part) of a key file, longest type first (sender-key-memory before sender-key), else None."""
    if not file_name.endswith(".json"):
        return None
    stem = file_name[: -len(".json")]
    for key_type in TYPES_BY_LENGTH:
        if stem.startswith(key_type + "-") and len(stem) > len(key_type) + 1:
            return key_type, stem[len(key_type) + 1:]
    return None


def preimage_count(name):
    """How many ids fixFileName turns into name: 2 per '-' ('-' or ':'), Fibonacci per run of '_' ('__' or '/')."""
    count = 1
    for char in name:
        if char == "-":
            count *= 2
    for run in re.findall(r"_+", name):
        a, b = 1, 1
        for _ in range(len(run) - 1):
            a, b = b, a + b
        count *= b
    return count


def preimages(name, limit=MAX_CANDIDATES):
    """Up to limit ids that fixFileName turns into name, the name itself first."""
    found = []

    def walk(position, prefix):
        if len(found) >= limit:
            return
        if position == len(name):
            found.append(prefix)
        elif name[position] == "-":
            walk(position + 1, prefix + "-")
            walk(position + 1, prefix + ":")
        elif name.startswith("__", position):
            walk(position + 1, prefix + "_")
            walk(position + 2, prefix + "/")
        else:
            walk(position + 1, prefix + name[position])

    walk(0, "")
    return found


class Reverse:
    """Result of the reverse mapping of one file name: id, or None with candidates and the reason."""

    __slots__ = ("key_id", "reason", "candidates", "candidate_count", "rule")

    def __init__(self, key_id=None, reason=None, name=None, rule=None):
        self.key_id = key_id
        self.reason = reason
        self.rule = rule
        if key_id is None:
            self.candidates = preimages(name)
            self.candidate_count = preimage_count(name)
        else:
            self.candidates = [key_id]
            self.candidate_count = 1


def reverse_key_name(key_type, name):
    """The original id of a key file's name part, by the type's id shape; Reverse(None, reason) when it cannot be told.

    Every id returned satisfies fix_file_name(id) == name.
    """
    plain = "-" not in name and "__" not in name
    if key_type == "pre-key":
        if DIGITS_RE.match(name):
            return Reverse(name, rule="pre-key ids are integers")
        return Reverse(None, "pre-key ids are integers", name)
    if key_type == "lid-mapping":
        if LID_MAPPING_RE.match(name):
            return Reverse(name, rule="lid-mapping ids are <digits> or <digits>_reverse")
        return Reverse(None, "lid-mapping ids are <digits> or <digits>_reverse", name)
    if key_type == "app-state-sync-key":
        if BASE64_NAME_RE.match(name):
            key_id = name.replace("__", "/")
            if "_" not in key_id and decode_base64(key_id) is not None:
                return Reverse(key_id, rule="app-state-sync-key ids are base64: '__' is '/'")
        return Reverse(None, "app-state-sync-key ids are base64 (a '-' or a lone '_' cannot come from one)", name)
    if key_type == "sender-key":
        match = SENDER_KEY_NAME_RE.match(name)
        if match:
            return Reverse("::".join(match.groups()), rule="sender-key ids are <group jid>::<user>::<device>")
        return Reverse(None, "not the sender-key shape <group jid>--<user>--<device>", name)
    if key_type == "sender-key-memory" and GROUP_JID_RE.match(name):
        return Reverse(name, rule="sender-key-memory ids are group JIDs (no ':')")
    if key_type in ("session", "identity-key") and SIGNAL_ADDRESS_RE.match(name):
        return Reverse(name, rule="%s ids are signal addresses <user>.<device>" % key_type)
    if plain:
        return Reverse(name, rule="no '-' or '__': the name is the id")
    return Reverse(None, "a '-' may have been ':' and '__' may have been '/'", name)


# -- file contents ------------------------------------------------------------------------------


def _no_constant(name):
    raise ValueError("%s is not JSON" % name)


def _finite(text):
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError("the number %s is out of range" % text[:20])
    return value


def _check_strings(value):
    """Strings PostgreSQL's JSONB cannot store (\\u0000, lone surrogates) raise FileProblem."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for name, member in item.items():
                stack.append(name)
                stack.append(member)
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            if "\x00" in item:
                raise FileProblem("holds \\u0000, which PostgreSQL JSONB cannot store")
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise FileProblem("holds a lone UTF-16 surrogate") from None


def parse_file(data):
    """The JSON value of a file as Baileys' JSON.parse reads it, or FileProblem."""
    if not data:
        raise FileProblem("is empty (0 bytes)")
    if data.startswith(BOM):
        raise FileProblem("starts with a byte order mark (JSON.parse in Baileys fails on it)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FileProblem("is not UTF-8 (byte %d)" % exc.start) from None
    # Checked before parsing, with a fixed limit: a value nested deeper than Python's recursion limit would end the
    # module with a traceback here or wherever it is handled later (canonical form, stored text).
    problem = nesting_problem(text)
    if problem:
        raise FileProblem(problem)
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError as exc:
        raise FileProblem(value_problem(exc)) from None
    except ValueError as exc:
        raise FileProblem("is not JSON (%s; %d bytes: truncated?)" % (str(exc).split(":")[0], len(data))) from None
    # \u0000 and lone surrogates can only come from a \u escape: strict JSON holds no raw control character, and
    # UTF-8 decoding refuses encoded surrogates. Without one, the walk over every string is not needed.
    if "\\u" in text:
        _check_strings(value)
    return value


def check_src(src):
    """(normalised src, whether it exists): the sessions tree's path checks (check_dest), with messages that name src."""
    if isinstance(src, str) and os.path.isabs(src) and os.path.islink(os.path.normpath(src)):
        raise FailbackError("src %s is a symbolic link: refusing to read through it (give the directory it points to)"
                            % os.path.normpath(src))
    try:
        return check_dest(src)
    except SessionsError as exc:
        # check_dest words its refusals for the export's dest.
        raise FailbackError(_DEST_WORD.sub("src", str(exc))) from None


_DEST_WORD = re.compile(r"\Adest\b|(?<=\bof )dest\b")


def database_line(key_type, key_id, text):
    """The digest line of a row's JSON text (key_type None: the creds; text None: no creds row). PostgreSQL holds
    values nested deeper than Python reads: CompanyRefused names such a row instead of a traceback."""
    try:
        value = None if text is None else json.loads(text)
        return creds_line(value) if key_type is None else key_line(key_type, key_id, value)
    except VALUE_ERRORS as exc:
        raise CompanyRefused("the database's value of %s %s: the company is refused, nothing of it is written"
                             % (key_name(key_type, key_id), value_problem(exc))) from None


def check_creds(value):
    """FileProblem naming the fields (never values) of creds Baileys could not start on (codec.creds_shape_problems)."""
    problems = creds_shape_problems(value)
    if problems:
        raise FileProblem("has creds Baileys could not start on: %s" % "; ".join(problems))


def stored_text(key_type, value, buffer_format):
    """The JSON text written to PostgreSQL for a value read from a file."""
    if key_type == "app-state-sync-key":
        return dumps(value)  # as the file holds it (protobuf JSON form)
    return dumps(to_base64_form(value) if buffer_format == "base64" else to_array_form(value))


# An exported file (its sha256 the manifest's) is file_content(value): dumps' own settings over to_base64_form, so every
# Buffer in it is exactly {"type":"Buffer","data":"<base64>"}. Its array form is then its text with each of those objects
# rewritten: byte for byte stored_text(type, parse_file(data), "array"), without parsing it. ('{"' cannot occur inside
# a JSON string, whose quotes are escaped: each match is a whole object.) Any other Buffer form, or a "Buffer" the
# rewrite does not cover, leaves the file to the parse.
BASE64_BUFFER_RE = re.compile(r'\{"type":"Buffer","data":"([A-Za-z0-9+/]*={0,2})"\}')
OTHER_BUFFER_RE = re.compile(r'"data":\[|\{"[0-9]+":')
_BYTE_TEXT = tuple(str(n) for n in range(256))


def exported_array_text(data):
    """stored_text(type, value, "array") of an exported file's bytes (not app-state-sync-key), or None (then parse it)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if OTHER_BUFFER_RE.search(text):
        return None
    undecodable = []

    def array(match):
        raw = decode_base64(match.group(1))
        if raw is None:
            undecodable.append(match.group(1))
            return match.group(0)
        return '{"type":"Buffer","data":[%s]}' % ",".join(map(_BYTE_TEXT.__getitem__, raw))

    out, count = BASE64_BUFFER_RE.subn(array, text)
    if undecodable or count != text.count('"Buffer"'):
        return None
    return out


class FileEntry:
    """One file of a company directory: bytes, sha256, its manifest entry, the value parsed on demand."""

    __slots__ = ("name", "key_type", "key_id", "data", "sha256", "spec", "_value", "reverse")

    def __init__(self, name, key_type, key_id, data, spec, reverse=None):
        self.name = name
        self.key_type = key_type
        self.key_id = key_id
        self.data = data
        self.sha256 = sha256_bytes(data)
        self.spec = spec
        self.reverse = reverse
        self._value = None

    @property
    def same(self):
        """The file is byte for byte what the export wrote (manifest sha256 and size)."""
        return self.spec is not None and self.spec.get("sha256") == self.sha256 and self.spec.get("size", len(self.data)) == len(self.data)

    @property
    def parsed(self):
        return self._value is not None

    def value(self):
        if self._value is None:
            value = parse_file(self.data)
            if self.key_type == "creds":
                check_creds(value)
            self._value = (value,)
        return self._value[0]

    def line(self):
        """The file's line of the state digest input."""
        if self.key_type == "creds":
            return creds_line(self.value())
        return key_line(self.key_type, self.key_id, self.value())


class CompanyFiles:
    """A company directory read against its manifest; problems refuse the company."""

    def __init__(self, company_id):
        self.company_id = company_id
        self.creds = None
        self.keys = {}  # (type, id) -> FileEntry
        self.problems = []  # (file or None, reason)
        self.ambiguous = []  # report entries
        self.skipped = set()  # names of ambiguous files left out (ambiguous=skip)
        self.stats = {}  # name -> (inode, size, mtime_ns), to see changes before the commit
        self.before = {}  # name -> stats of every entry, listed before the first file was read
        self.observed_ns = None  # wall clock just before that listing (directory_signature)
        self.changed = []  # names whose file changed or vanished between the listing and its read
        self.counts = {"files": 0, "same": 0, "changed": 0, "new": 0, "missing": 0}
        # Delta pass, per file (SourceTree.bases): the bulk pass's record of the company, the record positions of the
        # keys whose files kept their recorded stat (not read), the keys whose files are gone, the creds not read.
        self.base = None
        self.carried = []
        self.deleted = []
        self.creds_carried = False
        self.whole_because = None  # why a company with a base was read whole after all
        # Bulk pass writing a pass record: the keys in digest order and their digest lines (passfiles.encode's input).
        self.digest_keys = self.digest_data = None

    def problem(self, name, reason):
        self.problems.append((name, reason))

    @property
    def as_exported(self):
        """Every file of the manifest is here, byte for byte (sha256), and no other: the files are the exported ones."""
        counts = self.counts
        return (counts["files"] == counts["same"] and not counts["missing"] and not self.skipped and not self.problems
                and self.base is None)

    def reasons(self, limit=5):
        shown = ["%s %s" % (name, reason) if name else reason for name, reason in self.problems[:limit]]
        more = " (and %d more)" % (len(self.problems) - limit) if len(self.problems) > limit else ""
        return "; ".join(shown) + more


def listing(dir_fd):
    """(name, stat) of every entry of a directory: stat only, no symbolic link followed (an entry gone meanwhile left out)."""
    with os.scandir(dir_fd) as entries:
        for entry in entries:
            try:
                yield entry.name, entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue


def dir_stats(dir_fd):
    """{name: (inode, size, mtime_ns, file type)} of every entry of a directory (listing's, without the generator: a
    delta pass lists every file of every changed company)."""
    found = {}
    with os.scandir(dir_fd) as entries:
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            found[entry.name] = (info.st_ino, info.st_size, info.st_mtime_ns, stat.S_IFMT(info.st_mode))
    return found


# One line per entry; the names as os.scandir gives them (undecodable bytes as surrogate escapes, encoded back below).
SIGNATURE_LINE = "%s\0%d\0%d\0%d\n"


def _signature(lines):
    lines.sort()
    return hashlib.sha256("".join(lines).encode("utf-8", "surrogateescape")).hexdigest()


def directory_signature(stats, observed_ns=None):
    """sha256 (hex) over the sorted (name, size, mtime_ns, inode) of a directory's entries, as dir_stats lists them;
    None when an entry's mtime is within the racy window before observed_ns (the wall clock just before the listing).

    Without observed_ns (a listing compared with a recorded signature, never recorded itself) there is no window: a file
    written since the recorded listing has another mtime than the recorded one, which was outside the window."""
    if observed_ns is not None:
        limit = racy_limit(stats, observed_ns)  # the racy window: a signature is only recorded for older entries
        if any(entry[2] >= limit for entry in stats.values()):
            return None
    return _signature([SIGNATURE_LINE % (name, size, mtime_ns, inode) for name, (inode, size, mtime_ns, _kind) in stats.items()])


def scan_company(root_fd, company_id):
    """(directory signature, None) of a company directory listed now, or (None, why not)."""
    try:
        dir_fd = open_dir(COMPANY_PREFIX + company_id, root_fd)
    except FileNotFoundError:
        return None, "absent"
    except (OSError, SessionsError):
        return None, "unreadable"
    # directory_signature(dir_stats(dir_fd)) without the mapping in between: the stat calls are most of a delta pass.
    try:
        return _signature([SIGNATURE_LINE % (name, i.st_size, i.st_mtime_ns, i.st_ino) for name, i in listing(dir_fd)]), None
    finally:
        os.close(dir_fd)


class ScanWorkers:
    """scan_company of many companies in forked processes, one per usable CPU (a listing is a stat per file: CPU bound
    in Python, and threads would contend for the GIL), while the parent does other work (the aggregate query).
    start() forks; results() collects {company: (signature, why, prepared)}.

    prepare: {company: recorded signature} of the companies a delta pass may import per file, and prepare(company,
    dir_fd, stats, observed_ns, signature) the function that does it (Failback._prepare): a company whose signature differs from
    the recorded one is prepared from the same listing (its changed files read and checked, its digest spliced), so that
    its directory is listed once in the whole delta pass."""

    def __init__(self, root_fd, company_ids, prepare=None, recorded=None):
        self.root_fd = root_fd
        self.ids = list(company_ids)
        self.children = []  # (pid, read fd, company ids)
        self.local = None
        self.prepare = prepare
        self.recorded = recorded or {}

    def scan(self, company_id):
        """(signature, why not, prepared or None) of one company."""
        if self.prepare is None or company_id not in self.recorded:
            return scan_company(self.root_fd, company_id) + (None,)
        try:
            dir_fd = open_dir(COMPANY_PREFIX + company_id, self.root_fd)
        except FileNotFoundError:
            return None, "absent", None
        except (OSError, SessionsError):
            return None, "unreadable", None
        try:
            observed_ns = time.time_ns()
            stats = dir_stats(dir_fd)
            signature = directory_signature(stats)
            if signature == self.recorded[company_id]:
                return signature, None, None
            return signature, None, self.prepare(company_id, dir_fd, stats, observed_ns, signature)
        finally:
            os.close(dir_fd)

    def start(self):
        count = export_workers() if len(self.ids) >= SCAN_MIN_FORK else 1
        if count == 1:
            self.local = self.ids
            return self
        try:
            for part in (self.ids[n::count] for n in range(count)):
                self._fork(part)
        except BaseException:
            self.reap()
            raise
        return self

    def _fork(self, part):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the parent's stack
            code = 1
            try:
                os.close(read_fd)
                write_all(write_fd, pickle.dumps([self.scan(c) for c in part], protocol=pickle.HIGHEST_PROTOCOL))
                code = 0
            finally:
                os._exit(code)
        os.close(write_fd)
        self.children.append((pid, read_fd, part))

    def results(self):
        found = {} if self.local is None else {c: self.scan(c) for c in self.local}
        failed = False
        for pid, read_fd, part in self.children:
            with os.fdopen(read_fd, "rb") as pipe:
                data = pipe.read()
            failed = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0 or failed
            if not failed:
                # Pickled by a fork of this very process (same code), read from its pipe only.
                found.update((c, tuple(r)) for c, r in zip(part, pickle.loads(data)))
        self.children = []
        if failed:
            raise FailbackError("a worker listing the company directories failed: the delta pass proves nothing, run it again")
        return found

    def reap(self):
        """Wait for the workers, their results unused."""
        for pid, read_fd, _part in self.children:
            os.close(read_fd)
            os.waitpid(pid, 0)
        self.children = []


def read_file_at(dir_fd, name):
    """(bytes, stat) of a regular file; no symbolic link followed, no FIFO opened for long."""
    fd = os.open(name, READ_FLAGS | os.O_NONBLOCK, dir_fd=dir_fd)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileProblem("is not a regular file")
        if info.st_size > MAX_FILE_BYTES:
            raise FileProblem("is larger than %d bytes" % MAX_FILE_BYTES)
        want = max(info.st_size + 1, 65536)
        data = os.read(fd, want)
        if len(data) < want:
            return data, info  # a regular file reads short only at its end: no second read to see it
        parts = [data]
        while True:
            block = os.read(fd, want)
            if not block:
                break
            parts.append(block)
        return b"".join(parts), info
    finally:
        os.close(fd)


# -- the source tree ---------------------------------------------------------------------------


class SourceTree:
    """The sessions tree failback reads: its manifests and company directories (fds, no symbolic link followed)."""

    def __init__(self, path, root_fd, require_manifest=True):
        self.path = path
        self.root_fd = root_fd
        self.require_manifest = require_manifest
        self.top = None
        self.legacy = None
        self.meta_fd = self.companies_fd = None
        # Delta pass: {company: {"path", "files", "digest", "fingerprint"}} of the companies whose rows are the bulk
        # pass's and whose pass files record lets read_company read only the files changed since (set before any read).
        self.bases = {}

    def open(self):
        try:
            self.meta_fd = open_dir(META_DIR, self.root_fd)
        except FileNotFoundError:
            self.meta_fd = None
        except SessionsError as exc:
            raise FailbackError("%s/%s: %s" % (self.path, META_DIR, exc)) from None
        if self.meta_fd is not None:
            try:
                os.lstat(IN_PROGRESS_NAME, dir_fd=self.meta_fd)
                raise FailbackError("%s/%s/%s exists: a standby refresh was interrupted or is running; the tree is not a finished "
                                    "generation" % (self.path, META_DIR, IN_PROGRESS_NAME))
            except FileNotFoundError:
                pass
            try:
                _, top = read_json_at(self.meta_fd, MANIFEST_NAME)
                self.top = validate_top_manifest(top)
                self.companies_fd = open_dir(COMPANIES_DIR, self.meta_fd)
            except FileNotFoundError:
                if self.top is not None:
                    raise FailbackError("%s/%s/%s is missing" % (self.path, META_DIR, COMPANIES_DIR)) from None
            except (ManifestError, SessionsError, OSError) as exc:
                raise FailbackError("the manifest of %s is unusable: %s" % (self.path, exc)) from None
        if self.top is None:
            self.legacy = self._legacy()
        if self.top is None and self.legacy is None and self.require_manifest:
            raise FailbackError(
                "%s has no manifest (%s/%s or %s): files cannot be verified and ids of every file would have to be guessed "
                "(require_manifest=false imports it anyway, reverse-mapping every name)" % (self.path, META_DIR, MANIFEST_NAME, LEGACY_MANIFEST)
            )
        return self

    def _legacy(self):
        """Companies of an older tree's <tree>/manifest.json ({"format": 1, "companies": {id: {"files": {...}}}}), or None."""
        try:
            _, document = read_json_at(self.root_fd, LEGACY_MANIFEST)
        except FileNotFoundError:
            return None
        except (ManifestError, SessionsError, OSError) as exc:
            raise FailbackError("%s/%s is unusable: %s" % (self.path, LEGACY_MANIFEST, exc)) from None
        if not isinstance(document, dict) or document.get("format") != 1 or not isinstance(document.get("companies"), dict):
            raise FailbackError("%s/%s is not a format 1 manifest" % (self.path, LEGACY_MANIFEST))
        return document["companies"]

    def close(self):
        for attr in ("companies_fd", "meta_fd"):
            fd = getattr(self, attr)
            if fd is not None:
                os.close(fd)
                setattr(self, attr, None)

    @property
    def kind(self):
        return "baileys-dr" if self.top is not None else "legacy" if self.legacy is not None else None

    @property
    def source(self):
        return (self.top or {}).get("source") or {}

    def listed(self):
        if self.top is not None:
            return set(self.top["companies"])
        return set(self.legacy or ())

    def company_ids(self, wanted=None, missing="fail"):
        """(company ids in byte order, {raw name: reason} of directories that cannot be companies, wanted ids that are
        neither a directory nor in the manifest: left out with missing=skip, else refused)."""
        listed = self.listed()
        found, bad = set(), {}
        for name in os.listdir(self.root_fd):
            if not name.startswith(COMPANY_PREFIX):
                continue
            company_id = name[len(COMPANY_PREFIX):]
            info = os.lstat(name, dir_fd=self.root_fd)
            if not COMPANY_ID_RE.match(company_id):
                bad[company_id] = "directory %r: the company id does not match [A-Za-z0-9_-]{1,50}" % name
            elif stat.S_ISLNK(info.st_mode):
                bad[company_id] = "%s is a symbolic link: refused" % name
            elif not stat.S_ISDIR(info.st_mode):
                bad[company_id] = "%s is not a directory" % name
            else:
                found.add(company_id)
        ids = found | listed | set(bad)
        absent = []
        if wanted:
            unknown = [c for c in wanted if c not in ids]
            if unknown and missing != "skip":
                raise FailbackError("companies not in %s: %s (missing_companies=skip leaves them out)"
                                    % (self.path, ", ".join(repr(c) for c in unknown[:20])))
            absent = sorted(set(unknown))
            ids = set(wanted) - set(unknown)
        ordered = sorted(ids, key=lambda c: c.encode("utf-8", "surrogateescape"))
        return ordered, {c: r for c, r in bad.items() if c in ids}, absent

    def manifest_files(self, company_id):
        """{file name: entry} the manifest lists for the company ({} for a company created while on files)."""
        if self.top is not None:
            entry = self.top["companies"].get(company_id)
            if entry is None:
                return {}
            try:
                return load_company_manifest(self.companies_fd, company_id, entry["manifest_sha256"])["files"]
            except FileNotFoundError:
                raise CompanyRefused("its manifest %s/%s/%s.json is missing" % (META_DIR, COMPANIES_DIR, company_id)) from None
            except (ManifestError, SessionsError, OSError) as exc:
                raise CompanyRefused("its manifest is unusable (checksum mismatch or damage): %s" % exc) from None
        entry = (self.legacy or {}).get(company_id)
        if entry is None:
            return {}
        files = entry.get("files") if isinstance(entry, dict) else None
        if not isinstance(files, dict):
            raise CompanyRefused("its entry in %s has no files object" % LEGACY_MANIFEST)
        for name, spec in files.items():
            ok = isinstance(spec, dict) and (
                (name == CREDS_FILE and spec.get("type") in ("creds", None))
                or (spec.get("type") in KEY_TYPES and isinstance(spec.get("id"), str) and key_file_name(spec["type"], spec["id"]) == name)
            )
            if not ok:
                raise CompanyRefused("%s: the entry of %r does not name the file of its type and id" % (LEGACY_MANIFEST, name))
        return files

    def manifest_digest(self, company_id):
        if self.top is None:
            return None
        return (self.top["companies"].get(company_id) or {}).get("digest")

    def read_company(self, company_id, ambiguous_mode):
        """The company's files, checked: everything that refuses the company is in .problems / .ambiguous. With a base
        (bases), only the files changed since the bulk pass are read (_read_changed) when that is sound."""
        files = CompanyFiles(company_id)
        base, files.whole_because = self._base(company_id)
        specs = self.manifest_files(company_id) if base is None else None
        try:
            dir_fd = open_dir(COMPANY_PREFIX + company_id, self.root_fd)
        except FileNotFoundError:
            files.problem(None, "its directory %s%s is missing (the manifest lists it): refusing to delete the company's rows"
                          % (COMPANY_PREFIX, company_id))
            return files
        except SessionsError as exc:
            files.problem(None, str(exc))
            return files
        try:
            files.observed_ns = time.time_ns()
            files.before = dir_stats(dir_fd)
            if base is not None:
                changed = self._read_changed(files, dir_fd, base, ambiguous_mode)
                if changed is not None:
                    return changed
            if specs is None:
                specs = self.manifest_files(company_id)
            present = set()
            for name in sorted(files.before):
                present.add(name)
                self._read_file(files, dir_fd, name, specs.get(name), ambiguous_mode)
            for name, spec in specs.items():
                if name in present:
                    continue
                if name == CREDS_FILE:
                    files.problem(CREDS_FILE, "is missing (the manifest lists it): refusing to delete the credentials "
                                              "(Baileys would have written fresh ones)")
                else:
                    files.counts["missing"] += 1
        finally:
            os.close(dir_fd)
        return files

    def _base(self, company_id):
        """(the company's pass files record, None), or (None, why it cannot be used), or (None, None) without one."""
        entry = self.bases.get(company_id)
        if entry is None:
            return None, None
        try:
            base = passfiles.PassFiles.load(entry["path"], company_id, entry["files"], entry["digest"])
        except passfiles.PassFilesError as exc:
            return None, str(exc)
        base.fingerprint = entry["fingerprint"]
        return base, None

    def _read_changed(self, listed, dir_fd, base, ambiguous_mode):
        """The company's files as the bulk pass's record and the files changed since: a file whose listed stat is the
        recorded one is carried (not read: the bulk pass imported that content, its rows are proven by the fingerprint);
        every other file is read and checked as a full read checks it. None (listed.whole_because says why) when the
        company must be read whole: ambiguous file names, or a changed file naming a carried key."""
        files = CompanyFiles(listed.company_id)
        files.base, files.before, files.observed_ns = base, listed.before, listed.observed_ns
        specs = None
        changed = []
        # base.carried(name, info) inlined (1,500 files a company): the recorded stat text equal to the listed one.
        by_name, carried, stats, unproven, regular = base.by_name, files.carried, files.stats, passfiles.UNPROVEN_TEXT, stat.S_IFREG
        for name, info in files.before.items():
            if info[3] == regular:
                if name == CREDS_FILE:
                    if base.creds_unchanged(info):
                        files.creds_carried = True
                        stats[name] = info
                        continue
                else:
                    recorded = by_name.get(name)
                    if recorded is not None and recorded[1] != unproven and recorded[1] == "%d\t%d\t%d" % info[:3]:
                        carried.append(recorded[0])
                        stats[name] = info
                        continue
            changed.append(name)
        for name in sorted(changed):  # read in name order, as a full read does
            recorded = base.by_name.get(name)
            if recorded is not None:
                key_type, key_id = base.keys[recorded[0]]
                spec = {"type": key_type, "id": key_id}
            else:
                if specs is None:
                    specs = self.manifest_files(listed.company_id)
                spec = specs.get(name)
            self._read_file(files, dir_fd, name, spec, ambiguous_mode)
        if files.ambiguous or files.skipped:
            listed.whole_because = "a file whose original id cannot be told for certain"
            return None
        files.carried.sort()
        carried = set(files.carried)
        if any(base.position_of(key) in carried for key in files.keys):
            listed.whole_because = "a changed file names a key of an unchanged one"
            return None
        files.deleted = [base.keys[position] for name, (position, _stat) in base.by_name.items() if name not in files.before]
        if base.creds_stat is not None and CREDS_FILE not in files.before:
            files.problem(CREDS_FILE, "is missing (the bulk pass imported it): refusing to delete the credentials "
                                      "(Baileys would have written fresh ones)")
        return files

    def prepare_changed(self, company_id, dir_fd, stats, observed_ns, signature, ambiguous_mode, buffer_format):
        """Delta pass, per file, from the listing the proof took (stats listed at observed_ns, their signature): the
        company's changed files read and checked, compared with the bulk pass's lines, its digest spliced (Prepared), so
        that the company is written in a batch (Failback._delta_batches) without listing its directory again. None when
        it is not that simple (no usable record, a problem, an ambiguous name, a file changed while read, a key both new
        and gone): the company then goes the per-company way, which reads it again and says what is wrong."""
        base, _why = self._base(company_id)
        if base is None:
            return None
        listed = CompanyFiles(company_id)
        listed.before, listed.observed_ns = stats, observed_ns
        try:
            files = self._read_changed(listed, dir_fd, base, ambiguous_mode)
            if files is None or files.problems or files.changed or files.ambiguous or files.skipped:
                return None
            return Prepared(files, base, buffer_format, signature)
        except (FileProblem, CompanyRefused, passfiles.PassFilesError, SessionsError, OSError):
            return None

    def _read_file(self, files, dir_fd, name, spec, ambiguous_mode):
        files.counts["files"] += 1
        try:
            data, info = read_file_at(dir_fd, name)
        except FileProblem as exc:
            files.problem(name, str(exc))
            return
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                files.changed.append(name)  # deleted since the listing (Baileys consumed a pre-key)
            reason = "is a symbolic link: refused" if exc.errno == errno.ELOOP else "is unreadable (%s)" % exc.strerror
            files.problem(name, reason)
            return
        files.stats[name] = (info.st_ino, info.st_size, info.st_mtime_ns, stat.S_IFMT(info.st_mode))
        if files.stats[name] != files.before.get(name):
            files.changed.append(name)
        reverse = None
        if name == CREDS_FILE:
            key_type, key_id = "creds", None
        elif spec is not None:
            key_type, key_id = spec.get("type"), spec.get("id")
            if key_type not in KEY_TYPES:
                files.problem(name, "has the type %r in the manifest, not a Baileys key type" % (key_type,))
                return
        else:
            parsed = parse_key_file_name(name)
            if parsed is None:
                files.problem(name, "is not a Baileys key file (<type>-<id>.json with a type of %s): unknown type" % ", ".join(KEY_TYPES))
                return
            key_type, part = parsed
            reverse = reverse_key_name(key_type, part)
            if reverse.key_id is None:
                files.ambiguous.append({"company": files.company_id, "file": name, "type": key_type, "reason": reverse.reason,
                                        "candidates": reverse.candidates, "candidate_count": reverse.candidate_count})
                if ambiguous_mode == "skip":
                    files.skipped.add(name)
                return
            key_id = reverse.key_id
            try:
                if checked_key_file_name(files.company_id, key_type, key_id) != name:
                    raise HostileInputError("the id %r does not give back the file name" % key_id)
            except HostileInputError as exc:
                files.problem(name, "cannot be imported: %s" % exc)
                return
        entry = FileEntry(name, key_type, key_id, data, spec, reverse)
        if entry.same:
            files.counts["same"] += 1
        else:
            files.counts["changed" if spec is not None else "new"] += 1
            try:
                entry.value()  # validated now, before any write
            except FileProblem as exc:
                files.problem(name, str(exc))
                return
        if key_type == "creds":
            files.creds = entry
        else:
            files.keys[(key_type, key_id)] = entry

    def unchanged_since_read(self, files, before=None):
        """None when the company directory still holds what was read (or before: the listing before the read), else
        what changed."""
        dir_fd = open_dir(COMPANY_PREFIX + files.company_id, self.root_fd)
        try:
            now = dir_stats(dir_fd)
        finally:
            os.close(dir_fd)
        before = files.stats if before is None else before
        if now == before:
            return None
        changed = sorted(set(now) ^ set(before)) + sorted(n for n in set(now) & set(before) if now[n] != before[n])
        return ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else "")


class StagedKey:
    """A key a delta batch writes: what CompanyPlan's inserts and updates hold (key_type, key_id), and the text."""

    __slots__ = ("key_type", "key_id", "name", "text")

    def __init__(self, key_type, key_id, name, text):
        self.key_type, self.key_id, self.name, self.text = key_type, key_id, name, text


class Prepared:
    """A company of a delta pass ready to be written in a batch: its changed files against the bulk pass's record (the
    rows of every other key are the bulk pass's, proven by the fingerprint), the texts to write, the spliced digest.
    Built in a scan worker from the proof's listing, sent to the parent pickled: no file data, no listing kept (the
    listing's signature only, for the check before the COMMIT when the directory's watch saw an event)."""

    def __init__(self, files, base, buffer_format, signature):
        self.company_id = files.company_id
        self.fingerprint = base.fingerprint
        self.signature = signature
        self.files_read = files.counts["files"]
        self.updates, self.inserts, self.unchanged = [], [], 0
        changed = {}
        for key, entry in files.keys.items():
            line = changed[key] = entry.line()
            recorded = base.by_name.get(entry.name)
            position = recorded[0] if recorded is not None and base.keys[recorded[0]] == key else None
            if position is not None and base.key_lines[position] == line:
                self.unchanged += 1  # rewritten with the same value: its row is the bulk pass's, equal
                continue
            staged = StagedKey(key[0], key[1], entry.name, stored_text(key[0], entry.value(), buffer_format))
            (self.updates if position is not None else self.inserts).append(staged)
        self.deletes = sorted(files.deleted, key=lambda k: sort_key(*k))
        if not set(files.deleted).isdisjoint(files.keys):
            raise passfiles.PassFilesError("a key both gone and read")
        # The creds: carried (the bulk pass's, its row too), or read: inserted when the bulk pass had none.
        self.creds = self.creds_text = self.creds_value = None
        if files.creds_carried:
            self.creds_line = base.creds_line
        elif files.creds is None:
            self.creds_line = creds_line(None)
        else:
            self.creds_line = files.creds.line()
            if base.creds_stat is None:
                self.creds = "inserted"
            elif self.creds_line != base.creds_line:
                self.creds = "updated"
                self.creds_value = files.creds.value()
            if self.creds:
                self.creds_text = stored_text(None, files.creds.value(), buffer_format)
        if self.creds is None and files.creds is None and not files.creds_carried and base.creds_stat is not None:
            raise passfiles.PassFilesError("creds.json is gone")
        self.creds_present = files.creds_carried or files.creds is not None
        self.digest = base.spliced_digest(self.creds_line, files.carried, changed)


class _ReadThread(threading.Thread):
    def __init__(self, tree, company_id, mode):
        super().__init__(name="baileys-dr-read-%s" % company_id, daemon=True)
        self.tree, self.company_id, self.mode = tree, company_id, mode
        self.files = self.error = None
        self.start()

    def run(self):
        try:
            self.files = self.tree.read_company(self.company_id, self.mode)
        except BaseException as exc:  # noqa: BLE001 - re-raised by result()
            self.error = exc

    def result(self):
        self.join()
        if self.error is not None:
            raise self.error
        return self.files


class CompanyReader:
    """SourceTree.read_company of companies asked for in order, the next one read by a thread while the caller works on
    the current one (file reads release the GIL, and so does psycopg2 while the server works): at most two companies'
    files in memory. close() waits for a read still running (before the tree's fds are closed)."""

    def __init__(self, tree, company_ids, mode, reuse=None):
        self.tree, self.mode = tree, mode
        self.ids = list(company_ids)
        self.position = {company_id: n for n, company_id in enumerate(self.ids)}
        self.ahead = None
        self.last = None  # the CompanyFiles read last
        # The files the previous pass read last, used again when that company comes first and its directory is unchanged
        # since (the check before the COMMIT compares with the same stats): a run of one company reads it once.
        self.reuse = reuse if reuse is not None and self.ids and self.ids[0] == reuse.company_id else None

    def read(self, company_id):
        reuse, self.reuse = self.reuse, None
        if reuse is not None and reuse.company_id == company_id and not reuse.problems and self._unchanged(reuse):
            self._next(company_id)
            self.last = reuse
            return reuse
        ahead, self.ahead = self.ahead, None
        if ahead is None or ahead.company_id != company_id:
            if ahead is not None:
                ahead.join()
            ahead = _ReadThread(self.tree, company_id, self.mode)
        try:
            self.last = ahead.result()
            return self.last
        finally:
            self._next(company_id)

    def _unchanged(self, files):
        try:
            return self.tree.unchanged_since_read(files) is None
        except (OSError, SessionsError):
            return False  # read again: the read reports what is wrong

    def _next(self, company_id):
        following = self.position[company_id] + 1
        if following < len(self.ids):
            self.ahead = _ReadThread(self.tree, self.ids[following], self.mode)

    def close(self):
        if self.ahead is not None:
            self.ahead.join()
            self.ahead = None


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


# -- undo files -------------------------------------------------------------------------------------


class _HashingWriter:
    def __init__(self, raw):
        self.raw = raw
        self.digest = hashlib.sha256()

    def write(self, data):
        self.digest.update(data)
        return self.raw.write(data)

    def flush(self):
        self.raw.flush()


def write_undo_file(undo_dir, company_id, header, records):
    """<undo_dir>/failback-<company>-<UTC stamp>.jsonl.gz and its .sha256, both synced; returns the path."""
    name = _undo_name(undo_dir, company_id, compact_stamp(utc_now()), set())
    final = os.path.join(undo_dir, name)
    tmp = os.path.join(undo_dir, ".%s.tmp-%s" % (name, secrets.token_hex(4)))
    count = 0
    try:
        fd = os.open(tmp, NEW_FILE_FLAGS, 0o600)
        with os.fdopen(fd, "wb") as raw:
            hashing = _HashingWriter(raw)
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
                hashing = _HashingWriter(raw)
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


# -- the pass record (two-pass failback) --------------------------------------------------------------
# The switch rule: a bulk pass while the service still writes the files (changed_during_read=defer), then, with the
# service stopped, a delta pass of what changed since. The bulk pass records per company what it made equal: the
# directory's signature (listed before the read) and the rows' fingerprint after the COMMIT. A company whose signature
# and fingerprint are both still the recorded ones holds in PostgreSQL what its files hold: the delta pass skips it
# without reading a file.

PASS_FORMAT = 1
PASS_KIND = "baileys-dr-failback-pass"
MAX_PASS_RECORD_BYTES = 256 << 20
HEX64_RE = re.compile(r"\A[0-9a-f]{64}\Z")
XID_WRAP = 1 << 32
MAX_RECORD_XIDS = 16  # transactions kept per company in a record's xids (a pass run again adds one)


def fingerprint_text(keys, xmin_hash, creds_xmin):
    """A company's fingerprint: '<Baileys keys>:<sum of hashint8(xmin)>:<creds xmin or ->'."""
    return "%d:%d:%s" % (int(keys), int(xmin_hash or 0), creds_xmin or "-")


def _optional(value, kind):
    return value is None or isinstance(value, kind)


def load_pass_record(path):
    """The pass record at path, its shape checked; FailbackError naming the path otherwise."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_PASS_RECORD_BYTES + 1)
    except OSError as exc:
        raise FailbackError("delta_from %s cannot be read (%s)" % (path, exc.strerror)) from None
    try:
        document = json.loads(data) if len(data) <= MAX_PASS_RECORD_BYTES else None
    except ValueError:
        document = None
    ok = (isinstance(document, dict) and document.get("format") == PASS_FORMAT and document.get("kind") == PASS_KIND
          and isinstance(document.get("tree"), str) and isinstance(document.get("system_identifier"), str)
          and isinstance(document.get("companies"), dict) and isinstance(document.get("deferred"), list)
          and _optional(document.get("timeline_id"), int))
    if ok:
        for company_id, entry in document["companies"].items():
            ok = ok and COMPANY_ID_RE.match(company_id) and isinstance(entry, dict) and (
                entry.get("signature") is None or HEX64_RE.match(str(entry["signature"]))) and _optional(
                entry.get("fingerprint"), str) and _optional(entry.get("xid"), int) and _optional(entry.get("digest"), str) and (
                entry.get("files") is None or HEX64_RE.match(str(entry["files"])))
        ok = ok and all(isinstance(c, str) and COMPANY_ID_RE.match(c) for c in document["deferred"])
        xids = document.get("xids", {})
        ok = ok and isinstance(xids, dict) and all(
            COMPANY_ID_RE.match(c) and isinstance(v, list) and all(isinstance(x, int) for x in v) for c, v in xids.items())
    if not ok:
        raise FailbackError("delta_from %s is not a format %d %s record (the pass_record of a bulk pass)" % (path, PASS_FORMAT, PASS_KIND))
    return document


def record_xids(record):
    """{company: {64-bit xid}} of the transactions of a failback's passes that wrote each company (a pass record's)."""
    found = {c: set(v) for c, v in (record.get("xids") or {}).items()}
    for company_id, entry in record["companies"].items():
        if entry.get("xid") is not None:
            found.setdefault(company_id, set()).add(entry["xid"])
    return found


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


class Failback:
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
