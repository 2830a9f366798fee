# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The Baileys sessions tree: export, incremental standby refresh, archives, verification.

Contract: docs/architecture.md, "The sessions tree and its manifest (format 1)".

    <dest>/company_<id>/creds.json, <type>-<fixFileName(id)>.json   what Baileys reads
    <dest>/.baileys-dr/manifest.json                                 written last: the proof
    <dest>/.baileys-dr/companies/<id>.json                           one manifest per company
    <dest>/.baileys-dr/digest-lines/<id>.lines                       standby only: the digest input

Reading: one REPEATABLE READ READ ONLY transaction, company by company, keys
through a server-side cursor in digest order, so memory follows the largest
company, never the table.

Writing: a full export goes to a sibling staging directory, is synced, then
swapped in with renameat2(RENAME_EXCHANGE). A standby refresh changes the
tree in place, company by company (files, then the company's digest lines,
then its manifest), syncs the file system, then rewrites the top manifest,
which lists the sha256 of every company manifest: a refresh that stops
half-way leaves a tree that verification rejects until the next good one.

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

import ctypes
import ctypes.util
import datetime
import errno
import fcntl
import gzip
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import time

from ansible.module_utils.baileys_dr_codec import (
    COMPANY_ID_RE,
    DIGEST_HEADER,
    KEY_TYPES,
    apply_type_rules,
    canonical_json,
    key_file_name,
    sort_key,
    to_base64_form,
)
from ansible.module_utils.baileys_dr_fs import fsync_dir, fsync_tree, swap_in, write_file_atomic

FORMAT = 1
KIND = "baileys-dr-sessions"
ARCHIVE_KIND = "baileys-dr-sessions-archive"
META_DIR = ".baileys-dr"
MANIFEST_NAME = "manifest.json"
COMPANIES_DIR = "companies"
LINES_DIR = "digest-lines"
IN_PROGRESS_NAME = "refresh-in-progress"
COMPANY_PREFIX = "company_"
CREDS_FILE = "creds.json"
NAME_MAX = 255
FILE_MODE = 0o600
DIR_MODE = 0o700
FETCH_SIZE = 2000
# Bytes of manifest entry per file, for the space estimate.
MANIFEST_BYTES_PER_FILE = 260
MAX_SHOWN = 20
TMP_PREFIX = ".bdr-tmp-"
# Control characters (Unicode category Cc): C0, DEL and C1.
CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f]")
ARCHIVE_RE = re.compile(r"\Asessions-(\d+)-(\d{8}T\d{6}Z)\.jsonl\.gz\Z")
TEST_PAUSE_ENV = "BAILEYS_DR_TEST_PAUSE_AT"
TEST_PAUSE_SECONDS_ENV = "BAILEYS_DR_TEST_PAUSE_SECONDS"
TEST_FAIL_ENV = "BAILEYS_DR_TEST_FAIL_AT"
XID_WINDOW = 2 ** 31


class SessionsError(Exception):
    """An error whose message is safe to show (no secret, ids shown with repr)."""


class HostileInputError(SessionsError):
    """A row that cannot be written as a Baileys file without danger or loss."""


class UnknownKeyTypeError(HostileInputError):
    pass


class ManifestError(SessionsError):
    pass


# -- time and test hooks ---------------------------------------------------------------


def utc_now():
    return datetime.datetime.now(datetime.timezone.utc)


def iso(moment):
    """ISO 8601 in UTC with a Z, as the manifests write times."""
    if moment is None:
        return None
    return moment.astimezone(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def parse_iso(text):
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.timezone.utc)


def compact_stamp(moment):
    return moment.astimezone(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def test_hook(point):
    """Test-only fault hooks (documented in the modules' notes)."""
    if os.environ.get(TEST_PAUSE_ENV) == point:
        time.sleep(float(os.environ.get(TEST_PAUSE_SECONDS_ENV) or 30))
    if os.environ.get(TEST_FAIL_ENV) == point:
        raise SessionsError("fault injected at %s (%s is set: a test-only hook)" % (point, TEST_FAIL_ENV))


# -- hostile input ---------------------------------------------------------------------


def check_company_id(company_id):
    if not isinstance(company_id, str) or not COMPANY_ID_RE.match(company_id):
        raise HostileInputError(
            "company id %r does not match [A-Za-z0-9_-]{1,50}: refusing to export it (it would name a directory)" % (company_id,)
        )
    return company_id


def checked_key_file_name(company_id, key_type, key_id):
    """File name of a key, or HostileInputError naming company, type and id."""
    if key_type not in KEY_TYPES:
        raise UnknownKeyTypeError(
            "company %s: key type %r is not a Baileys key type (%s); key id %r" % (company_id, key_type, ", ".join(KEY_TYPES), key_id)
        )
    if not isinstance(key_id, str):
        raise HostileInputError("company %s: %s key id %r is not text" % (company_id, key_type, key_id))
    if CONTROL_RE.search(key_id):
        raise HostileInputError("company %s: %s key id %r contains control characters" % (company_id, key_type, key_id))
    if key_id in (".", ".."):
        raise HostileInputError("company %s: %s key id %r is a path component" % (company_id, key_type, key_id))
    name = key_file_name(key_type, key_id)
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise HostileInputError("company %s: %s key id %r is not valid Unicode text" % (company_id, key_type, key_id)) from None
    if size > NAME_MAX:
        raise HostileInputError(
            "company %s: %s key id %r gives a file name of %d bytes (the limit is %d)" % (company_id, key_type, key_id, size, NAME_MAX)
        )
    return name


def collision_error(company_id, name, first, second):
    return HostileInputError(
        "company %s: %s key id %r and %s key id %r both become the file %r (Baileys' fixFileName is not "
        "reversible): refusing to export either" % (company_id, first[0], first[1], second[0], second[1], name)
    )


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


# -- file contents and the digest input --------------------------------------------------


def file_content(value):
    """Bytes of a Baileys file: compact JSON, Buffers in BufferJSON.replacer's base64 form."""
    return json.dumps(to_base64_form(value), separators=(",", ":"), ensure_ascii=False).encode("utf-8")


HEADER_LINE = (canonical_json(DIGEST_HEADER) + "\n").encode("utf-8")


def creds_line(creds):
    return (canonical_json(["creds", creds]) + "\n").encode("utf-8")


def key_line(key_type, key_id, value):
    """One line of the state digest's input (the line StateDigest.add hashes)."""
    return (canonical_json([key_type, key_id, apply_type_rules(key_type, value)]) + "\n").encode("utf-8")


class DigestLines:
    """The state digest of one company, from its lines; optionally keeps them (the standby's digest input)."""

    def __init__(self, creds_line_bytes, keep=False):
        self._hash = hashlib.sha256(HEADER_LINE)
        self._hash.update(creds_line_bytes)
        self.lines = [HEADER_LINE, creds_line_bytes] if keep else None
        self._last = None
        self.keys = 0

    def add(self, key_type, key_id, line):
        position = sort_key(key_type, key_id)
        if self._last is not None and position <= self._last:
            raise SessionsError("key %s/%r is out of digest order or repeated" % (key_type, key_id))
        self._last = position
        self.keys += 1
        self._hash.update(line)
        if self.lines is not None:
            self.lines.append(line)

    def hexdigest(self):
        return self._hash.hexdigest()

    def data(self):
        return b"".join(self.lines)


def split_digest_lines(data):
    """Lines of a digest-lines file (each ends in a newline; canonical JSON holds no raw newline)."""
    if not data.endswith(b"\n"):
        return None
    lines = data.split(b"\n")
    lines.pop()
    return [line + b"\n" for line in lines]


# -- JSON documents ----------------------------------------------------------------------


def encode_json(document):
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sha256_bytes(data):
    return hashlib.sha256(data).hexdigest()


def validate_top_manifest(document):
    """Raise ManifestError unless document has the shape of a top manifest (format 1)."""
    if not isinstance(document, dict) or document.get("format") != FORMAT or document.get("kind") != KIND:
        raise ManifestError("not a format %d %s manifest" % (FORMAT, KIND))
    companies = document.get("companies")
    if not isinstance(companies, dict):
        raise ManifestError("the manifest has no companies object")
    for company_id, entry in companies.items():
        if not COMPANY_ID_RE.match(company_id):
            raise ManifestError("the manifest names an invalid company id %r" % (company_id,))
        if not isinstance(entry, dict) or not isinstance(entry.get("manifest_sha256"), str) or not isinstance(entry.get("digest"), str):
            raise ManifestError("the manifest entry of company %s is incomplete" % company_id)
    if not isinstance(document.get("generation"), int):
        raise ManifestError("the manifest has no integer generation")
    return document


def validate_company_manifest(document, company_id):
    if not isinstance(document, dict) or document.get("company_id") != company_id or not isinstance(document.get("files"), dict):
        raise ManifestError("the manifest of company %s is not a company manifest of that company" % company_id)
    for name, entry in document["files"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or not isinstance(entry.get("size"), int):
            raise ManifestError("company %s: manifest entry of %r is incomplete" % (company_id, name))
        if name == CREDS_FILE:
            if entry.get("type") != "creds":
                raise ManifestError("company %s: creds.json is not typed creds in its manifest" % company_id)
        elif not isinstance(entry.get("type"), str) or not isinstance(entry.get("id"), str):
            raise ManifestError("company %s: manifest entry of %r has no type or id" % (company_id, name))
        elif key_file_name(entry["type"], entry["id"]) != name:
            raise ManifestError("company %s: manifest entry %r does not name the file of %s id %r" % (company_id, name, entry["type"], entry["id"]))
    return document


# -- file system -------------------------------------------------------------------------

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_dir(name, dir_fd=None):
    """A directory fd; symbolic links are refused (never followed)."""
    try:
        return os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise SessionsError("%s is a symbolic link or not a directory: refusing to follow it" % name) from None
        raise


def write_all(fd, data):
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def create_file(dir_fd, name, data, owner=None):
    """Create name (it must not exist) holding data, mode 0600 (the module sets umask 077)."""
    fd = os.open(name, NEW_FILE_FLAGS, FILE_MODE, dir_fd=dir_fd)
    try:
        write_all(fd, data)
        if owner:
            os.fchown(fd, owner[0], owner[1])
    finally:
        os.close(fd)


def replace_file(dir_fd, name, data, owner=None, durable=False):
    """Replace name atomically (temp file + rename, both relative to dir_fd)."""
    tmp = TMP_PREFIX + secrets.token_hex(8)
    fd = os.open(tmp, NEW_FILE_FLAGS, FILE_MODE, dir_fd=dir_fd)
    try:
        try:
            write_all(fd, data)
            if owner:
                os.fchown(fd, owner[0], owner[1])
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise
    if durable:
        os.fsync(dir_fd)


def make_dir(dir_fd, name, owner=None):
    os.mkdir(name, DIR_MODE, dir_fd=dir_fd)
    fd = open_dir(name, dir_fd)
    if owner:
        os.fchown(fd, owner[0], owner[1])
    return fd


def read_regular(dir_fd, name, limit=1 << 30):
    """Bytes of a regular file (no symbolic link followed)."""
    fd = os.open(name, READ_FLAGS, dir_fd=dir_fd)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SessionsError("%s is not a regular file" % name)
        if info.st_size > limit:
            raise SessionsError("%s is larger than %d bytes" % (name, limit))
        chunks = []
        while True:
            block = os.read(fd, max(info.st_size + 1, 65536))
            if not block:
                return b"".join(chunks)
            chunks.append(block)
    finally:
        os.close(fd)


def unlink_quiet(dir_fd, name):
    try:
        os.unlink(name, dir_fd=dir_fd)
        return True
    except FileNotFoundError:
        return False


def remove_tree_at(dir_fd, name):
    """Remove dir_fd/name whatever it is, without following symbolic links."""
    try:
        info = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(info.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


_syncfs = None


def sync_filesystem(dir_fd, path):
    """Flush every dirty file and directory of the file system holding dir_fd (syncfs(2)).

    One call instead of one fsync per file: a tree of a million files is
    durable in one flush. Falls back to fsyncing every file below path.
    """
    global _syncfs
    if _syncfs is None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _syncfs = getattr(libc, "syncfs", False)
    if _syncfs:
        if _syncfs(dir_fd) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err), path)
    fsync_tree(path)


def check_dest(dest):
    """Refuse a dest that is a symbolic link, or below a symbolic link someone else owns."""
    if not os.path.isabs(dest):
        raise SessionsError("dest must be an absolute path, got %r" % dest)
    dest = os.path.normpath(dest)
    if dest == "/":
        raise SessionsError("dest cannot be the root directory")
    current = "/"
    for part in dest.strip("/").split("/")[:-1]:
        current = os.path.join(current, part)
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            raise SessionsError("the parent directory %s of dest does not exist" % os.path.dirname(dest)) from None
        if stat.S_ISLNK(info.st_mode) and info.st_uid not in (0, os.geteuid()):
            raise SessionsError("%s (a parent of dest) is a symbolic link owned by uid %d: refusing to follow it" % (current, info.st_uid))
    parent = os.path.dirname(dest)
    if not os.path.isdir(parent):
        raise SessionsError("the parent %s of dest is not a directory" % parent)
    try:
        info = os.lstat(dest)
    except FileNotFoundError:
        return dest, False
    if stat.S_ISLNK(info.st_mode):
        raise SessionsError("dest %s is a symbolic link: refusing to write through it" % dest)
    if not stat.S_ISDIR(info.st_mode):
        raise SessionsError("dest %s exists and is not a directory" % dest)
    return dest, True


class ParentLock:
    """flock(2) on the directory holding the trees: one writer, or several verifiers, at a time."""

    def __init__(self, parent, exclusive=True, timeout=300):
        self.parent = parent
        self.mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        self.timeout = timeout
        self.fd = None

    def __enter__(self):
        self.fd = os.open(self.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self.fd, self.mode | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(self.fd)
                    raise SessionsError(
                        "another baileys-dr export, refresh or verification holds the lock on %s (waited %ss)" % (self.parent, self.timeout)
                    ) from None
                time.sleep(0.2)

    def __exit__(self, *exc):
        os.close(self.fd)


def free_space(path):
    info = os.statvfs(path)
    return {
        "bytes": info.f_bavail * info.f_frsize,
        "inodes": info.f_favail if info.f_files else None,
        "block": info.f_frsize or 4096,
    }


def estimate_tree_bytes(content_bytes, files, block):
    """Bytes a tree of files takes: content, a partial block per file, manifests."""
    return int(content_bytes + files * (block // 2 + MANIFEST_BYTES_PER_FILE) + 2 * block)


def check_space(path, estimated_bytes, files, margin):
    space = free_space(path)
    need = int(estimated_bytes * margin)
    if space["bytes"] < need:
        raise SessionsError(
            "not enough free space on the file system of %s: %d bytes free, %d needed (estimate %d x margin %s)"
            % (path, space["bytes"], need, estimated_bytes, margin)
        )
    if space["inodes"] is not None and space["inodes"] < files * margin:
        raise SessionsError(
            "not enough free inodes on the file system of %s: %d free, %d needed" % (path, space["inodes"], int(files * margin))
        )
    return space


# -- the database --------------------------------------------------------------------------

META_SQL = (
    "SELECT now(), (SELECT system_identifier FROM pg_control_system())::text, "
    "(SELECT timeline_id FROM pg_control_checkpoint()), pg_postmaster_start_time(), "
    "txid_snapshot_xmax(txid_current_snapshot()), current_setting('server_encoding')"
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
LIST_XMIN_SQL = "SELECT key_type, key_id, xmin::text, pg_column_size(value) FROM whatsapp_keys WHERE company_id = %s"
LIST_MD5_SQL = "SELECT key_type, key_id, xmin::text, pg_column_size(value), md5(value::text) FROM whatsapp_keys WHERE company_id = %s"
VALUES_SQL = (
    "SELECT key_type, key_id, xmin::text, t, md5(t) FROM (SELECT key_type, key_id, xmin, value::text AS t "
    "FROM whatsapp_keys WHERE company_id = %s AND (key_type, key_id) IN (SELECT * FROM unnest(%s::text[], %s::text[])) OFFSET 0) s"
)

MD5S_SQL = (
    "SELECT key_type, key_id, md5(value::text) FROM whatsapp_keys WHERE company_id = %s "
    "AND (key_type, key_id) IN (SELECT * FROM unnest(%s::text[], %s::text[]))"
)
SIZE_SQL = (
    "SELECT coalesce(sum(pg_column_size(value)), 0), count(*), "
    "(SELECT count(*) FROM whatsapp_auth WHERE company_id = %s) FROM whatsapp_keys WHERE company_id = %s"
)


class Snapshot:
    """One REPEATABLE READ READ ONLY transaction over the auth-state store; records the SQL it runs."""

    def __init__(self, conn):
        self.conn = conn
        self.queries = []
        conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
        conn.set_client_encoding("UTF8")
        self._cursor_serial = 0
        self.meta = None

    def _run(self, cur, sql, args=None):
        if sql not in self.queries:
            self.queries.append(sql)
        cur.execute(sql, args)

    def begin(self, target):
        with self.conn.cursor() as cur:
            self._run(cur, META_SQL)
            now, system_identifier, timeline, started, xid, encoding = cur.fetchone()
        self.meta = {
            "kind": "postgres",
            "target": target,
            "system_identifier": system_identifier,
            "snapshot_at": iso(now),
            "timeline_id": timeline,
            "postmaster_start_time": iso(started),
            "xid": int(xid),
            "server_encoding": encoding,
        }
        return self.meta

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

    def listing(self, company_id, with_md5):
        """(type, id, xmin, stored size[, md5]) of a company's keys, streamed, unordered."""
        return self._stream(LIST_MD5_SQL if with_md5 else LIST_XMIN_SQL, (company_id,))

    def company_size(self, company_id):
        """(stored bytes, files) of a company, cheaply (no conversion to text)."""
        with self.conn.cursor() as cur:
            self._run(cur, SIZE_SQL, (company_id, company_id))
            size, keys, creds = cur.fetchone()
        return int(size), int(keys) + int(creds)

    def md5s(self, company_id, pairs):
        """(type, id, md5(value::text)) of the given keys of a company."""
        if not pairs:
            return iter(())
        return self._stream(MD5S_SQL, (company_id, [p[0] for p in pairs], [p[1] for p in pairs]))

    def values(self, company_id, pairs):
        """(type, id, xmin, value text, md5) of the given (type, id) keys of a company."""
        if not pairs:
            return iter(())
        types = [p[0] for p in pairs]
        ids = [p[1] for p in pairs]
        return self._stream(VALUES_SQL, (company_id, types, ids))


def same_server_lifetime(old_source, meta):
    """True when xmins recorded under old_source still identify row versions now."""
    if not isinstance(old_source, dict):
        return False
    for field in ("system_identifier", "timeline_id", "postmaster_start_time"):
        if old_source.get(field) is None or old_source.get(field) != meta.get(field):
            return False
    old_xid = old_source.get("xid")
    return isinstance(old_xid, int) and 0 <= meta["xid"] - old_xid < XID_WINDOW


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


# -- manifests on disk -------------------------------------------------------------------


def read_json_at(dir_fd, name, limit=1 << 30):
    data = read_regular(dir_fd, name, limit)
    try:
        return data, json.loads(data)
    except ValueError as exc:
        raise ManifestError("%s is not JSON (%s)" % (name, exc)) from None


class TreeMeta:
    """The .baileys-dr directory of a tree (fds, no symbolic link followed)."""

    def __init__(self, root_fd):
        self.root_fd = root_fd
        self.meta_fd = self.companies_fd = self.lines_fd = None

    def open(self, create=False, owner=None, lines=False):
        for attr, name, parent_attr in (("meta_fd", META_DIR, "root_fd"), ("companies_fd", COMPANIES_DIR, "meta_fd"),
                                        ("lines_fd", LINES_DIR, "meta_fd")):
            if attr == "lines_fd" and not lines:
                continue
            parent = getattr(self, parent_attr)
            try:
                fd = open_dir(name, parent)
            except FileNotFoundError:
                if not create:
                    raise
                fd = make_dir(parent, name, owner)
            setattr(self, attr, fd)
        return self

    def close(self):
        for attr in ("meta_fd", "companies_fd", "lines_fd"):
            fd = getattr(self, attr)
            if fd is not None:
                os.close(fd)
                setattr(self, attr, None)


def load_top_manifest(root_fd):
    """(bytes, manifest) of a tree, or raise ManifestError / FileNotFoundError."""
    meta_fd = open_dir(META_DIR, root_fd)
    try:
        data, document = read_json_at(meta_fd, MANIFEST_NAME)
    finally:
        os.close(meta_fd)
    return data, validate_top_manifest(document)


def load_company_manifest(companies_fd, company_id, expected_sha256=None):
    data, document = read_json_at(companies_fd, company_id + ".json")
    if expected_sha256 is not None and sha256_bytes(data) != expected_sha256:
        raise ManifestError("the manifest of company %s does not match the sha256 the top manifest lists" % company_id)
    return validate_company_manifest(document, company_id)


def company_manifest_document(company_id, digest, keys, files):
    return {"company_id": company_id, "digest": digest, "keys": keys, "files": files}


def top_manifest_document(generation, source, companies, created_at, last_good_refresh, mode):
    totals = {"companies": len(companies), "keys": sum(c["keys"] for c in companies.values()),
              "files": sum(c["files"] for c in companies.values())}
    return {
        "format": FORMAT,
        "kind": KIND,
        "mode": mode,
        "generation": generation,
        "created_at": created_at,
        "last_good_refresh": last_good_refresh,
        "source": {k: source.get(k) for k in ("kind", "target", "system_identifier", "snapshot_at", "timeline_id",
                                               "postmaster_start_time", "xid")},
        "counts": totals,
        "companies": companies,
    }


# -- writing one company (shared by the full export and the standby rebuild) ------------------


class CompanyWriter:
    """Writes files into a company directory and builds its manifest and digest."""

    def __init__(self, company_id, dir_fd, owner, unknown_types, keep_lines, replace=False):
        self.company_id = company_id
        self.dir_fd = dir_fd
        self.owner = owner
        self.unknown_types = unknown_types
        self.keep_lines = keep_lines
        self.replace = replace
        self.files = {}
        self.digest = None
        self.written = 0
        self.bytes = 0
        self.skipped = 0
        self.skipped_types = set()

    def _write(self, name, data):
        if self.replace:
            replace_file(self.dir_fd, name, data, self.owner)
        else:
            create_file(self.dir_fd, name, data, self.owner)
        self.written += 1
        self.bytes += len(data)

    def creds(self, row):
        if row is None:
            self.digest = DigestLines(creds_line(None), self.keep_lines)
            return
        xmin, text, md5 = row
        creds = json.loads(text)
        data = file_content(creds)
        self._write(CREDS_FILE, data)
        self.files[CREDS_FILE] = {"type": "creds", "sha256": sha256_bytes(data), "size": len(data), "xmin": int(xmin), "row_md5": md5}
        self.digest = DigestLines(creds_line(creds), self.keep_lines)

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
        other = self.files.get(name)
        if other is not None:
            raise collision_error(self.company_id, name, (other.get("type"), other.get("id")), (key_type, key_id))
        return name

    def key(self, key_type, key_id, xmin, text, md5):
        name = self.name_of(key_type, key_id)
        if name is None:
            return
        value = json.loads(text)
        data = file_content(value)
        self._write(name, data)
        self.files[name] = {"type": key_type, "id": key_id, "sha256": sha256_bytes(data), "size": len(data),
                            "xmin": int(xmin), "row_md5": md5}
        self.digest.add(key_type, key_id, key_line(key_type, key_id, value))


def write_company_meta(tree, company_id, writer_digest, keys, files, owner):
    """Company manifest (and digest lines when kept); returns the manifest's sha256."""
    if tree.lines_fd is not None and writer_digest.lines is not None:
        replace_file(tree.lines_fd, company_id + ".lines", writer_digest.data(), owner)
    data = encode_json(company_manifest_document(company_id, writer_digest.hexdigest(), keys, files))
    replace_file(tree.companies_fd, company_id + ".json", data, owner)
    return sha256_bytes(data)


# -- full export into a staging directory ---------------------------------------------------


class FullExport:
    """A complete tree written into a fresh directory below parent_fd, then swapped in."""

    def __init__(self, snapshot, stats, owner, unknown_types, keep_lines, hook_prefix=""):
        self.snapshot = snapshot
        self.stats = stats
        self.owner = owner
        self.unknown_types = unknown_types
        self.keep_lines = keep_lines
        self.companies = {}
        self.digests = {}
        self.totals = {"files": 0, "bytes": 0, "keys": 0, "skipped_keys": 0}
        self.skipped_types = set()
        self.without_creds = []

    def write(self, root_fd):
        tree = TreeMeta(root_fd).open(create=True, owner=self.owner, lines=self.keep_lines)
        try:
            for index, (company_id, _keys, fingerprint, has_creds) in enumerate(self.stats, 1):
                self._company(tree, company_id, fingerprint)
                test_hook("after_company:%d" % index)
        finally:
            tree.close()

    def _company(self, tree, company_id, fingerprint):
        dir_fd = make_dir(tree.root_fd, COMPANY_PREFIX + company_id, self.owner)
        try:
            writer = CompanyWriter(company_id, dir_fd, self.owner, self.unknown_types, self.keep_lines)
            creds = self.snapshot.creds(company_id)
            if creds is None:
                self.without_creds.append(company_id)
            writer.creds(creds)
            for key_type, key_id, xmin, text, md5 in self.snapshot.keys(company_id):
                writer.key(key_type, key_id, xmin, text, md5)
        finally:
            os.close(dir_fd)
        manifest_sha256 = write_company_meta(tree, company_id, writer.digest, writer.digest.keys, writer.files, self.owner)
        self.companies[company_id] = {"digest": writer.digest.hexdigest(), "keys": writer.digest.keys, "files": len(writer.files),
                                      "manifest_sha256": manifest_sha256, "fingerprint": fingerprint}
        self.digests[company_id] = writer.digest.hexdigest()
        self.totals["files"] += writer.written
        self.totals["bytes"] += writer.bytes
        self.totals["keys"] += writer.digest.keys
        self.totals["skipped_keys"] += writer.skipped
        self.skipped_types |= writer.skipped_types


class DigestOnly:
    """The digests a full export would give, computed without writing (check mode)."""

    def __init__(self, snapshot, unknown_types):
        self.snapshot = snapshot
        self.unknown_types = unknown_types

    def company(self, company_id):
        writer = CompanyWriter(company_id, None, None, self.unknown_types, False)
        row = self.snapshot.creds(company_id)
        if row is None:
            writer.digest = DigestLines(creds_line(None))
        else:
            writer.files[CREDS_FILE] = {"type": "creds"}
            writer.digest = DigestLines(creds_line(json.loads(row[1])))
        for key_type, key_id, _xmin, text, _md5 in self.snapshot.keys(company_id):
            name = writer.name_of(key_type, key_id)
            if name is None:
                continue
            writer.files[name] = {"type": key_type, "id": key_id}
            writer.digest.add(key_type, key_id, key_line(key_type, key_id, json.loads(text)))
        return writer.digest.hexdigest(), writer.digest.keys, writer.skipped


def staging_name(dest):
    return ".%s.staging-%s" % (os.path.basename(dest), secrets.token_hex(6))


def backup_path(dest, backup_dir, moment):
    base = os.path.join(backup_dir or os.path.dirname(dest), "%s.before-%s" % (os.path.basename(dest), compact_stamp(moment)))
    path, serial = base, 1
    while os.path.lexists(path):
        serial += 1
        path = "%s-%d" % (base, serial)
    return path


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


class Exporter:
    """mode=live: the database's state as a complete new tree, swapped in atomically."""

    def __init__(self, params, connect, target, owner, check_mode):
        self.params = params
        self.connect = connect
        self.target = target
        self.owner = owner
        self.check_mode = check_mode

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
        meta = snapshot.begin(self.target)
        filter_ids = params.get("companies") or None
        stats = snapshot.company_stats(filter_ids)
        for company_id, *_ in stats:
            check_company_id(company_id)
        hostile = snapshot.hostile_rows(filter_ids, params["unknown_types"])
        if hostile:
            raise hostile_error(hostile, params["unknown_types"])
        current, why = read_current_manifest(dest, exists)
        result = {"dest": dest, "manifest": os.path.join(dest, META_DIR, MANIFEST_NAME), "snapshot_at": meta["snapshot_at"],
                  "system_identifier": meta["system_identifier"], "companies": len(stats), "keys": sum(s[1] for s in stats),
                  "backup": None, "files": 0, "bytes": 0, "queries": snapshot.queries,
                  "generation": current["generation"] if current else None}
        differs = self._differs(current, stats, meta)
        if differs is False and not params["force"]:
            result.update(changed=False, differs=False, digests={c: e["digest"] for c, e in current["companies"].items()},
                          reason="the database holds what the manifest of dest lists (row versions unchanged)")
            return result
        files = sum(s[1] + (1 if s[3] else 0) for s in stats)
        estimated = estimate_tree_bytes(snapshot.estimate_bytes(filter_ids), files, free_space(parent)["block"])
        result["estimated_bytes"] = estimated
        check_space(parent, estimated, files, params["space_margin"])
        if self.check_mode or (differs is None and not params["force"]):
            # Digests from the rows, compared with the manifest before anything is written.
            report = self._compare(snapshot, stats, current)
            result.update(report)
            if self.check_mode:
                result["changed"] = report["differs"] or bool(params["force"])
                if result["changed"]:
                    result["would_write"] = {"companies": len(stats), "keys": result["keys"] - report["skipped_keys"],
                                             "files": files - report["skipped_keys"], "estimated_bytes": estimated}
                result["reason"] = why or report["reason"]
                return result
            if not report["differs"]:
                result["changed"] = False
                return result
        result.update(self._write(conn, snapshot, stats, meta, current, dest, exists, parent, backup_dir))
        result["reason"] = why or "the database differs from the manifest of dest"
        return result

    def _write(self, conn, snapshot, stats, meta, current, dest, exists, parent, backup_dir):
        params = self.params
        staging = os.path.join(parent, staging_name(dest))
        os.mkdir(staging, DIR_MODE)
        try:
            root_fd = open_dir(staging)
            try:
                if self.owner:
                    os.fchown(root_fd, *self.owner)
                export = FullExport(snapshot, stats, self.owner, params["unknown_types"], keep_lines=params["mode"] == "standby")
                export.write(root_fd)
                conn.rollback()
                generation = (current["generation"] + 1) if current else 1
                now = iso(utc_now())
                top = top_manifest_document(generation, meta, export.companies, now, now, params["mode"])
                meta_fd = open_dir(META_DIR, root_fd)
                try:
                    create_file(meta_fd, MANIFEST_NAME, encode_json(top), self.owner)
                finally:
                    os.close(meta_fd)
                sync_filesystem(root_fd, staging)
            finally:
                os.close(root_fd)
            test_hook("before_swap")
            backup = swap_in(staging, dest, backup_path(dest, backup_dir, utc_now()) if exists else None)
            staging = None
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
        if backup and not params["keep_backup"]:
            shutil.rmtree(backup)
            backup = None
        return {"changed": True, "differs": True, "backup": backup, "files": export.totals["files"],
                "bytes": export.totals["bytes"], "keys": export.totals["keys"], "skipped_keys": export.totals["skipped_keys"],
                "skipped_types": sorted(export.skipped_types), "generation": generation, "digests": export.digests,
                "companies_without_creds": export.without_creds[:MAX_SHOWN]}

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


# -- standby: incremental refresh in place ---------------------------------------------------------


class CompanyPlan:
    """What a refresh changes in one company, decided from listings before anything is written."""

    def __init__(self, company_id, fingerprint):
        self.company_id = company_id
        self.fingerprint = fingerprint
        self.rebuild = None  # why the company is rewritten whole, or None
        self.manifest_sha256 = None  # of the company manifest the plan was made against
        self.fetch = []  # (type, id) of new keys and keys whose row may have changed
        self.old_md5 = {}  # (type, id) -> row_md5 in the manifest, for keys in fetch
        self.xmin_updates = {}  # (type, id) or None (creds) -> new xmin of rows with unchanged content
        self.delete = []  # file names of deleted keys (and creds.json when the creds row is gone)
        self.creds = False  # the creds row must be read
        self.write_bytes = 0
        self.write_files = 0


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
        self.stats = dict.fromkeys(self.COUNTERS, 0)

    def run(self):
        started = time.monotonic()
        dest, exists = check_dest(self.params["dest"])
        parent = os.path.dirname(dest)
        with ParentLock(parent, exclusive=True, timeout=self.params["lock_timeout"]):
            current, why = read_current_manifest(dest, exists)
            if current is None:
                # First build (or an unusable tree): a complete export, staged and swapped in.
                exporter = Exporter(dict(self.params, force=True), self.connect, self.target, self.owner, self.check_mode)
                result = exporter.run(locked=True)
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
        root_fd = open_dir(dest)
        tree = TreeMeta(root_fd)
        try:
            _, top = load_top_manifest(root_fd)
            tree.open(create=not self.check_mode, owner=self.owner, lines=not self.check_mode)
            if tree.lines_fd is None:
                try:
                    tree.lines_fd = open_dir(LINES_DIR, tree.meta_fd)
                except FileNotFoundError:
                    pass
            snapshot = Snapshot(conn)
            meta = snapshot.begin(self.target)
            filter_ids = params.get("companies") or None
            stats = snapshot.company_stats(filter_ids)
            for company_id, *_ in stats:
                check_company_id(company_id)
            hostile = snapshot.hostile_rows(filter_ids, params["unknown_types"])
            if hostile:
                raise hostile_error(hostile, params["unknown_types"])
            fast = same_server_lifetime(top.get("source"), meta)
            interrupted = self._interrupted(tree)
            plans, removed = self._plan(snapshot, tree, top, stats, fast, interrupted)
            files_to_write = sum(p.write_files for p in plans)
            result = {"dest": dest, "manifest": os.path.join(dest, META_DIR, MANIFEST_NAME), "backup": None,
                      "snapshot_at": meta["snapshot_at"], "system_identifier": meta["system_identifier"],
                      "companies": len(stats), "keys": sum(s[1] for s in stats), "queries": snapshot.queries,
                      "row_versions_used": fast, "previous_refresh_interrupted": interrupted,
                      "estimated_bytes": estimate_tree_bytes(sum(p.write_bytes for p in plans), files_to_write,
                                                             free_space(dest)["block"])}
            if self.check_mode:
                result.update(self._check_report(snapshot, plans, removed, top, stats))
                return result
            check_space(dest, result["estimated_bytes"], files_to_write, params["space_margin"])
            if plans or removed or interrupted:
                self._mark_in_progress(tree, meta)
            companies = {}
            plan_of = {p.company_id: p for p in plans}
            for index, (company_id, _keys, fingerprint, _creds) in enumerate(stats, 1):
                plan = plan_of.get(company_id)
                if plan is None:
                    companies[company_id] = dict(top["companies"][company_id], fingerprint=fingerprint)
                    self.stats["companies_skipped"] += 1
                    continue
                companies[company_id] = self._apply(snapshot, tree, plan, index)
                test_hook("after_company:%d" % index)
            for company_id in removed:
                remove_tree_at(root_fd, COMPANY_PREFIX + company_id)
                unlink_quiet(tree.companies_fd, company_id + ".json")
                unlink_quiet(tree.lines_fd, company_id + ".lines")
                self.stats["companies_removed"] += 1
            conn.rollback()
            sync_filesystem(root_fd, dest)
            test_hook("before_manifest")
            changed = interrupted or any(self.stats[k] for k in ("files_written", "files_deleted", "companies_rebuilt",
                                                                  "companies_removed"))
            now = iso(utc_now())
            generation = top["generation"] + 1 if changed else top["generation"]
            document = top_manifest_document(generation, meta, companies, now if changed else top.get("created_at"), now, "standby")
            write_file_atomic(os.path.join(dest, META_DIR, MANIFEST_NAME), encode_json(document), mode=FILE_MODE,
                              owner=self.owner[0] if self.owner else None, group=self.owner[1] if self.owner else None)
            if unlink_quiet(tree.meta_fd, IN_PROGRESS_NAME):
                os.fsync(tree.meta_fd)
            result.update(self.stats)
            result.update(changed=changed, generation=generation, last_good_refresh=now, age_seconds=0.0,
                          files=self.stats["files_written"], bytes=self.stats["bytes_written"],
                          digests={c: e["digest"] for c, e in companies.items()})
            return result
        finally:
            tree.close()
            os.close(root_fd)

    # -- planning (reads only) --
    @staticmethod
    def _interrupted(tree):
        try:
            os.lstat(IN_PROGRESS_NAME, dir_fd=tree.meta_fd)
            return True
        except FileNotFoundError:
            return False

    def _plan(self, snapshot, tree, top, stats, fast, interrupted):
        plans = []
        removed = sorted(set(top["companies"]) - {s[0] for s in stats}, key=lambda c: c.encode("utf-8"))
        for company_id, _keys, fingerprint, _has_creds in stats:
            entry = top["companies"].get(company_id)
            if entry is not None and fast and not interrupted and entry.get("fingerprint") == fingerprint:
                continue
            plan = CompanyPlan(company_id, fingerprint)
            plans.append(plan)
            if entry is None:
                plan.rebuild = "new company"
            else:
                try:
                    if interrupted:
                        # After an interrupted refresh only what the files prove is trusted.
                        manifest, plan.manifest_sha256 = self._verified_on_disk(tree, company_id)
                    else:
                        manifest = load_company_manifest(tree.companies_fd, company_id, entry["manifest_sha256"])
                        plan.manifest_sha256 = entry["manifest_sha256"]
                except (OSError, ManifestError, SessionsError) as exc:
                    plan.rebuild = "company manifest unusable: %s" % exc
                else:
                    self._plan_company(snapshot, plan, manifest, fast)
            if plan.rebuild:
                plan.write_bytes, plan.write_files = snapshot.company_size(company_id)
        return plans, removed

    def _verified_on_disk(self, tree, company_id):
        """(manifest, its sha256) of a company whose files and digest lines match its own manifest."""
        data, manifest = read_json_at(tree.companies_fd, company_id + ".json")
        validate_company_manifest(manifest, company_id)
        if tree.lines_fd is None or sha256_bytes(read_regular(tree.lines_fd, company_id + ".lines")) != manifest.get("digest"):
            raise SessionsError("digest lines do not match the manifest")
        dir_fd = open_dir(COMPANY_PREFIX + company_id, tree.root_fd)
        try:
            for name, spec in manifest["files"].items():
                content = read_regular(dir_fd, name)
                if len(content) != spec["size"] or sha256_bytes(content) != spec["sha256"]:
                    raise SessionsError("%s does not match the manifest" % name)
            extra = [n for n in os.listdir(dir_fd) if n not in manifest["files"] and not n.startswith(TMP_PREFIX)]
            if extra:
                raise SessionsError("files not in the manifest: %r" % extra[:3])
        finally:
            os.close(dir_fd)
        return manifest, sha256_bytes(data)

    def _plan_company(self, snapshot, plan, manifest, fast):
        files = manifest["files"]
        by_key = {(e["type"], e["id"]): (n, e) for n, e in files.items() if n != CREDS_FILE}
        seen = {}
        skip_unknown = self.params["unknown_types"] == "skip"
        for row in snapshot.listing(plan.company_id, with_md5=not fast):
            key_type, key_id, xmin, size = row[0], row[1], int(row[2]), row[3] or 0
            try:
                name = checked_key_file_name(plan.company_id, key_type, key_id)
            except UnknownKeyTypeError:
                if skip_unknown:
                    self.stats["skipped_keys"] += 1
                    continue
                raise
            other = seen.get(name)
            if other is not None:
                raise collision_error(plan.company_id, name, other, (key_type, key_id))
            seen[name] = (key_type, key_id)
            old = by_key.pop((key_type, key_id), None)
            if old is None:
                changed = True
            elif fast:
                changed = old[1].get("xmin") != xmin
            else:
                changed = old[1].get("row_md5") != row[4]
                if not changed and old[1].get("xmin") != xmin:
                    plan.xmin_updates[(key_type, key_id)] = xmin
            if changed:
                plan.fetch.append((key_type, key_id))
                plan.write_bytes += size
                plan.write_files += 1
                if old is not None:
                    plan.old_md5[(key_type, key_id)] = old[1].get("row_md5")
        plan.delete = [name for name, _entry in by_key.values() if name not in seen]
        creds = files.get(CREDS_FILE)
        row = snapshot.creds(plan.company_id)
        if row is None:
            if creds is not None:
                plan.delete.append(CREDS_FILE)
        elif creds is None or (creds.get("xmin") != int(row[0]) if fast else creds.get("row_md5") != row[2]):
            plan.creds = True
            plan.write_files += 1
            plan.write_bytes += len(row[1])
        elif creds.get("xmin") != int(row[0]):
            plan.xmin_updates[None] = int(row[0])

    def _check_report(self, snapshot, plans, removed, top, stats):
        """Check mode: what a refresh would write and delete (content compared by md5), nothing written."""
        per_company = {}
        to_write = to_delete = 0
        rebuilt = []
        for plan in plans:
            if plan.rebuild:
                rebuilt.append(plan.company_id)
                writes, deletes = plan.write_files, 0
            else:
                writes = sum(1 for key_type, key_id, md5 in snapshot.md5s(plan.company_id, plan.fetch)
                             if plan.old_md5.get((key_type, key_id)) != md5)
                if plan.creds:
                    writes += 1
                deletes = len(plan.delete)
            to_write += writes
            to_delete += deletes
            if (writes or deletes or plan.rebuild) and len(per_company) < MAX_SHOWN * 5:
                per_company[plan.company_id] = {"write": writes, "delete": deletes, "rebuild": plan.rebuild}
        changed = bool(to_write or to_delete or rebuilt or removed)
        return {"changed": changed, "files": 0, "bytes": 0, "generation": top["generation"],
                "last_good_refresh": top.get("last_good_refresh"), "age_seconds": age_of(top),
                "would_change": {"files_to_write": to_write, "files_to_delete": to_delete, "companies_examined": len(plans),
                                 "companies_rebuilt": len(rebuilt), "companies_removed": len(removed),
                                 "removed_companies": removed[: MAX_SHOWN * 5], "per_company": per_company},
                "companies_skipped": len(stats) - len(plans),
                "digests": {c: e["digest"] for c, e in top["companies"].items()}}

    # -- writing --
    def _mark_in_progress(self, tree, meta):
        data = encode_json({"started_at": iso(utc_now()), "pid": os.getpid(), "snapshot_at": meta["snapshot_at"]})
        replace_file(tree.meta_fd, IN_PROGRESS_NAME, data, self.owner, durable=True)

    def _apply(self, snapshot, tree, plan, index):
        old = old_lines = None
        if not plan.rebuild:
            try:
                old = load_company_manifest(tree.companies_fd, plan.company_id, plan.manifest_sha256)
                old_lines = self._old_lines(tree, plan.company_id, old)
            except (OSError, ManifestError, SessionsError) as exc:
                plan.rebuild = "company manifest unusable: %s" % exc
            else:
                if old_lines is None:
                    plan.rebuild = "digest lines missing or not matching the manifest"
        if plan.rebuild:
            return self._rebuild(snapshot, tree, plan, index)
        return self._update(snapshot, tree, plan, old, old_lines, index)

    @staticmethod
    def _old_lines(tree, company_id, manifest):
        """{(type, id) or None (creds): line} of the previous digest input, or None unless it proves the manifest's digest."""
        if tree.lines_fd is None:
            return None
        try:
            data = read_regular(tree.lines_fd, company_id + ".lines")
        except FileNotFoundError:
            return None
        if sha256_bytes(data) != manifest.get("digest"):
            return None
        lines = split_digest_lines(data)
        keys = sorted(((e["type"], e["id"]) for n, e in manifest["files"].items() if n != CREDS_FILE), key=lambda k: sort_key(*k))
        if lines is None or len(lines) != len(keys) + 2 or lines[0] != HEADER_LINE:
            return None
        mapping = dict(zip(keys, lines[2:]))
        mapping[None] = lines[1]
        return mapping

    def _company_dir(self, tree, company_id):
        name = COMPANY_PREFIX + company_id
        try:
            return open_dir(name, tree.root_fd)
        except FileNotFoundError:
            return make_dir(tree.root_fd, name, self.owner)

    @staticmethod
    def _remove_strays(dir_fd, keep):
        """Remove what the company's new manifest does not list (orphans of an interrupted run, temp files)."""
        removed = 0
        for name in os.listdir(dir_fd):
            if name not in keep:
                remove_tree_at(dir_fd, name)
                removed += 1
        return removed

    def _finish_company(self, tree, plan, index, digest, files):
        test_hook("before_company_manifest:%d" % index)
        manifest_sha256 = write_company_meta(tree, plan.company_id, digest, digest.keys, files, self.owner)
        return {"digest": digest.hexdigest(), "keys": digest.keys, "files": len(files),
                "manifest_sha256": manifest_sha256, "fingerprint": plan.fingerprint}

    def _rebuild(self, snapshot, tree, plan, index):
        """The whole company written in place (new company, or no usable manifest or digest lines)."""
        dir_fd = self._company_dir(tree, plan.company_id)
        try:
            writer = CompanyWriter(plan.company_id, dir_fd, self.owner, self.params["unknown_types"], keep_lines=True, replace=True)
            writer.creds(snapshot.creds(plan.company_id))
            rows = 0
            for row in snapshot.keys(plan.company_id):
                rows += 1
                writer.key(*row)
            deleted = self._remove_strays(dir_fd, set(writer.files))
        finally:
            os.close(dir_fd)
        entry = self._finish_company(tree, plan, index, writer.digest, writer.files)
        for counter, value in (("files_written", writer.written), ("bytes_written", writer.bytes), ("files_deleted", deleted),
                               ("rows_fetched", rows), ("skipped_keys", writer.skipped), ("companies_rebuilt", 1),
                               ("companies_added", 1 if plan.rebuild == "new company" else 0)):
            self.stats[counter] += value
        return entry

    def _update(self, snapshot, tree, plan, old, old_lines, index):
        files = dict(old["files"])
        lines = dict(old_lines)
        written = deleted = written_bytes = fetched = same = 0
        for key, xmin in plan.xmin_updates.items():
            name = CREDS_FILE if key is None else key_file_name(*key)
            files[name] = dict(files[name], xmin=xmin)
        dir_fd = open_dir(COMPANY_PREFIX + plan.company_id, tree.root_fd)
        try:
            rows = []
            if plan.creds:
                xmin, text, md5 = snapshot.creds(plan.company_id)
                rows.append((None, None, xmin, text, md5))
            rows = iter(rows + list(snapshot.values(plan.company_id, plan.fetch)))
            for key_type, key_id, xmin, text, md5 in rows:
                fetched += 1
                name = CREDS_FILE if key_type is None else key_file_name(key_type, key_id)
                previous = files.get(name)
                if previous is not None and previous.get("row_md5") == md5 and previous.get("id") == key_id:
                    files[name] = dict(previous, xmin=int(xmin))
                    same += 1
                    continue
                value = json.loads(text)
                data = file_content(value)
                replace_file(dir_fd, name, data, self.owner)
                written += 1
                written_bytes += len(data)
                entry = {"type": key_type or "creds", "id": key_id, "sha256": sha256_bytes(data), "size": len(data),
                         "xmin": int(xmin), "row_md5": md5}
                if key_type is None:
                    del entry["id"]
                    lines[None] = creds_line(value)
                else:
                    lines[(key_type, key_id)] = key_line(key_type, key_id, value)
                files[name] = entry
            for name in plan.delete:
                entry = files.pop(name, None)
                if name == CREDS_FILE:
                    lines[None] = creds_line(None)
                elif entry is not None:
                    lines.pop((entry["type"], entry["id"]), None)
                if unlink_quiet(dir_fd, name):
                    deleted += 1
            deleted += self._remove_strays(dir_fd, set(files))
        finally:
            os.close(dir_fd)
        expected = len(plan.fetch) + (1 if plan.creds else 0)
        if fetched != expected:
            raise SessionsError("company %s: %d rows listed as changed but %d read back in the same snapshot"
                                % (plan.company_id, expected, fetched))
        digest = DigestLines(lines[None], keep=True)
        for key in sorted((k for k in lines if k is not None), key=lambda k: sort_key(*k)):
            digest.add(key[0], key[1], lines[key])
        entry = self._finish_company(tree, plan, index, digest, files)
        for counter, value in (("files_written", written), ("bytes_written", written_bytes), ("files_deleted", deleted),
                               ("rows_fetched", fetched), ("rows_unchanged_content", same), ("companies_refreshed", 1)):
            self.stats[counter] += value
        return entry


def age_of(top):
    moment = parse_iso(top.get("last_good_refresh") or top.get("created_at"))
    if moment is None:
        return None
    return round((utc_now() - moment).total_seconds(), 3)


# -- archives ----------------------------------------------------------------------------------


def list_archives(archive_dir):
    """[(generation, stamp, name)] of the archives in archive_dir, newest first."""
    found = []
    for name in os.listdir(archive_dir):
        match = ARCHIVE_RE.match(name)
        if match:
            found.append((int(match.group(1)), match.group(2), name))
    return sorted(found, key=lambda a: (a[1], a[0]), reverse=True)


class Archiver:
    """A verified generation as compressed JSON lines (+ .sha256), keeping the newest N."""

    def __init__(self, dest, archive_dir, keep, every, owner, compresslevel=6):
        self.dest = dest
        self.archive_dir = archive_dir
        self.keep = keep
        self.every = every
        self.owner = owner
        self.compresslevel = compresslevel

    def due(self):
        archives = list_archives(self.archive_dir)
        if not archives:
            return True
        newest = datetime.datetime.strptime(archives[0][1], "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.timezone.utc)
        return (utc_now() - newest).total_seconds() >= self.every

    def run(self):
        if not os.path.isdir(self.archive_dir) or os.path.islink(self.archive_dir):
            raise SessionsError("archive_dir %s is not a directory" % self.archive_dir)
        result = {"archive": None}
        if self.due():
            result["archive"] = self.write()
        result["archives"] = self.rotate()
        return result

    def write(self):
        root_fd = open_dir(self.dest)
        tree = TreeMeta(root_fd)
        moment = utc_now()
        try:
            tree.open()
            _, top = load_top_manifest(root_fd)
            name = "sessions-%d-%s.jsonl.gz" % (top["generation"], compact_stamp(moment))
            final = os.path.join(self.archive_dir, name)
            tmp = os.path.join(self.archive_dir, ".%s.tmp-%s" % (name, secrets.token_hex(4)))
            digest = hashlib.sha256()
            try:
                fd = os.open(tmp, NEW_FILE_FLAGS, FILE_MODE)
                with os.fdopen(fd, "wb") as raw:
                    hashing = _HashingWriter(raw, digest)
                    with gzip.GzipFile(fileobj=hashing, mode="wb", compresslevel=self.compresslevel, mtime=0) as gz:
                        gz.write(encode_json({"format": FORMAT, "kind": ARCHIVE_KIND, "manifest": top}) + b"\n")
                        for company_id in sorted(top["companies"], key=lambda c: c.encode("utf-8")):
                            self._company(tree, top, company_id, gz)
                    raw.flush()
                    if self.owner:
                        os.fchown(raw.fileno(), *self.owner)
                    os.fsync(raw.fileno())
                os.rename(tmp, final)
                write_file_atomic(final + ".sha256", ("%s  %s\n" % (digest.hexdigest(), name)).encode("ascii"), mode=FILE_MODE,
                                  owner=self.owner[0] if self.owner else None, group=self.owner[1] if self.owner else None)
            except BaseException:
                for path in (tmp,):
                    try:
                        os.unlink(path)
                    except OSError:
                        pass
                raise
            fsync_dir(self.archive_dir)
            return final
        finally:
            tree.close()
            os.close(root_fd)

    def _company(self, tree, top, company_id, out):
        manifest = load_company_manifest(tree.companies_fd, company_id, top["companies"][company_id]["manifest_sha256"])
        dir_fd = open_dir(COMPANY_PREFIX + company_id, tree.root_fd)
        try:
            for name, entry in manifest["files"].items():
                data = read_regular(dir_fd, name)
                if len(data) != entry["size"] or sha256_bytes(data) != entry["sha256"]:
                    raise SessionsError("company %s: %s does not match its manifest: the generation is not archived" % (company_id, name))
                line = {"company": company_id, "name": name, "type": entry["type"]}
                if name != CREDS_FILE:
                    line["id"] = entry["id"]
                line["content"] = data.decode("utf-8")
                out.write(encode_json(line) + b"\n")
        finally:
            os.close(dir_fd)

    def rotate(self):
        archives = list_archives(self.archive_dir)
        for _generation, _stamp, name in archives[self.keep:]:
            for path in (name, name + ".sha256"):
                try:
                    os.unlink(os.path.join(self.archive_dir, path))
                except FileNotFoundError:
                    pass
        if len(archives) > self.keep:
            fsync_dir(self.archive_dir)
        return [os.path.join(self.archive_dir, a[2]) for a in archives[: self.keep]]


class _HashingWriter:
    """A write-only file object that hashes what passes through it."""

    def __init__(self, raw, digest):
        self.raw = raw
        self.digest = digest

    def write(self, data):
        self.digest.update(data)
        return self.raw.write(data)

    def flush(self):
        self.raw.flush()


# -- verification ------------------------------------------------------------------------------


class Verifier:
    """A sessions tree against its manifest: read-only."""

    def __init__(self, path, recompute_digests=False, allow_extra=False, max_problems=100):
        self.path = path
        self.recompute = recompute_digests
        self.allow_extra = allow_extra
        self.max_problems = max_problems
        self.problems = []
        self.problem_count = 0
        self.extra_files = []
        self.extra_companies = []
        self.permissions = []
        self.counts = {"companies": 0, "files": 0, "bytes": 0, "keys": 0, "missing_files": 0, "mismatched_files": 0,
                       "extra_files": 0, "extra_companies": 0, "permission_issues": 0}

    def problem(self, text):
        self.problem_count += 1
        if len(self.problems) < self.max_problems:
            self.problems.append(text)

    def _perm(self, what, info, expected):
        mode = stat.S_IMODE(info.st_mode)
        if mode & ~expected:
            self.counts["permission_issues"] += 1
            if len(self.permissions) < self.max_problems:
                self.permissions.append("%s has mode %04o (expected %04o)" % (what, mode, expected))

    def run(self):
        result = {"path": self.path, "verified": False, "generation": None, "created_at": None, "source": None,
                  "age_seconds": None, "last_good_refresh": None, "digests": {}}
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            self.problem("%s does not exist" % self.path)
            return self._finish(result)
        if stat.S_ISLNK(info.st_mode):
            self.problem("%s is a symbolic link: refused" % self.path)
            return self._finish(result)
        if not stat.S_ISDIR(info.st_mode):
            self.problem("%s is not a directory" % self.path)
            return self._finish(result)
        root_fd = open_dir(self.path)
        try:
            self._tree(root_fd, result)
        finally:
            os.close(root_fd)
        return self._finish(result)

    def _tree(self, root_fd, result):
        try:
            meta_fd = open_dir(META_DIR, root_fd)
        except FileNotFoundError:
            self.problem("no %s directory: the tree has no manifest" % META_DIR)
            return
        except SessionsError as exc:
            self.problem(str(exc))
            return
        try:
            try:
                data, top = read_json_at(meta_fd, MANIFEST_NAME)
                validate_top_manifest(top)
            except FileNotFoundError:
                self.problem("%s/%s is missing: the tree is incomplete or was never finished" % (META_DIR, MANIFEST_NAME))
                return
            except (ManifestError, SessionsError, OSError) as exc:
                self.problem("%s/%s: %s" % (META_DIR, MANIFEST_NAME, exc))
                return
            result.update(generation=top.get("generation"), created_at=top.get("created_at"), source=top.get("source"),
                          last_good_refresh=top.get("last_good_refresh"), age_seconds=age_of(top), mode=top.get("mode"),
                          manifest_counts=top.get("counts"))
            try:
                os.lstat(IN_PROGRESS_NAME, dir_fd=meta_fd)
                self.problem("%s/%s exists: a refresh was interrupted (or is running); the tree is not a finished generation"
                             % (META_DIR, IN_PROGRESS_NAME))
            except FileNotFoundError:
                pass
            try:
                companies_fd = open_dir(COMPANIES_DIR, meta_fd)
            except (FileNotFoundError, SessionsError) as exc:
                self.problem("%s/%s: %s" % (META_DIR, COMPANIES_DIR, exc if isinstance(exc, SessionsError) else "missing"))
                return
            try:
                self._companies(root_fd, companies_fd, top, result)
            finally:
                os.close(companies_fd)
        finally:
            os.close(meta_fd)

    def _companies(self, root_fd, companies_fd, top, result):
        listed = top["companies"]
        on_disk = set()
        for name in os.listdir(root_fd):
            if name == META_DIR:
                continue
            info = os.lstat(name, dir_fd=root_fd)
            if stat.S_ISLNK(info.st_mode):
                self.problem("%s is a symbolic link: refused" % name)
                continue
            if name.startswith(COMPANY_PREFIX) and stat.S_ISDIR(info.st_mode):
                company_id = name[len(COMPANY_PREFIX):]
                if company_id in listed:
                    on_disk.add(company_id)
                    continue
            self.counts["extra_companies"] += 1
            if len(self.extra_companies) < self.max_problems:
                self.extra_companies.append(name)
        if self.extra_companies and not self.allow_extra:
            self.problem("%d entries of the tree are not companies of the manifest: %s"
                         % (self.counts["extra_companies"], ", ".join(repr(n) for n in self.extra_companies[:MAX_SHOWN])))
        keys_total = 0
        for company_id in sorted(listed, key=lambda c: c.encode("utf-8")):
            entry = listed[company_id]
            self.counts["companies"] += 1
            if company_id not in on_disk:
                self.problem("company %s: directory %s%s is missing" % (company_id, COMPANY_PREFIX, company_id))
                continue
            try:
                data, manifest = read_json_at(companies_fd, company_id + ".json")
            except FileNotFoundError:
                self.problem("company %s: its manifest is missing" % company_id)
                continue
            except (ManifestError, SessionsError, OSError) as exc:
                self.problem("company %s: manifest unreadable: %s" % (company_id, exc))
                continue
            if sha256_bytes(data) != entry["manifest_sha256"]:
                self.problem("company %s: its manifest's sha256 differs from the top manifest's (half-refreshed company)" % company_id)
                continue
            try:
                validate_company_manifest(manifest, company_id)
            except ManifestError as exc:
                self.problem(str(exc))
                continue
            if manifest.get("digest") != entry["digest"]:
                self.problem("company %s: the digests of the top and company manifests differ" % company_id)
            keys_total += self._company(root_fd, company_id, manifest, entry, result)
        self.counts["keys"] = keys_total

    def _company(self, root_fd, company_id, manifest, entry, result):
        dir_name = COMPANY_PREFIX + company_id
        try:
            dir_fd = open_dir(dir_name, root_fd)
        except SessionsError as exc:
            self.problem("company %s: %s" % (company_id, exc))
            return 0
        try:
            self._perm(dir_name, os.fstat(dir_fd), DIR_MODE)
            files = manifest["files"]
            names = set(os.listdir(dir_fd))
            creds = None
            values = []
            ok = True
            for name, spec in files.items():
                if name not in names:
                    self.counts["missing_files"] += 1
                    self.problem("company %s: %s is missing" % (company_id, name))
                    ok = False
                    continue
                try:
                    data = read_regular(dir_fd, name)
                    info = os.lstat(name, dir_fd=dir_fd)
                except (OSError, SessionsError) as exc:
                    reason = "a symbolic link: refused" if isinstance(exc, OSError) and exc.errno == errno.ELOOP else exc
                    self.problem("company %s: %s is %s" % (company_id, name, reason))
                    ok = False
                    continue
                self.counts["files"] += 1
                self.counts["bytes"] += len(data)
                self._perm("%s/%s" % (dir_name, name), info, FILE_MODE)
                if len(data) != spec["size"] or sha256_bytes(data) != spec["sha256"]:
                    self.counts["mismatched_files"] += 1
                    self.problem("company %s: %s differs from its manifest (size %d, expected %d)" % (company_id, name, len(data), spec["size"]))
                    ok = False
                    continue
                if self.recompute:
                    try:
                        value = json.loads(data)
                    except ValueError as exc:
                        self.problem("company %s: %s is not JSON (%s)" % (company_id, name, exc))
                        ok = False
                        continue
                    if name == CREDS_FILE:
                        creds = value
                    else:
                        values.append((spec["type"], spec["id"], value))
            for name in sorted(names - set(files)):
                self.counts["extra_files"] += 1
                if len(self.extra_files) < self.max_problems:
                    self.extra_files.append("%s/%s" % (dir_name, name))
                if not self.allow_extra:
                    self.problem("company %s: %s is not in the manifest" % (company_id, name))
            keys = sum(1 for n in files if n != CREDS_FILE)
            if self.recompute and ok:
                digest = DigestLines(creds_line(creds))
                for key_type, key_id, value in sorted(values, key=lambda v: sort_key(v[0], v[1])):
                    digest.add(key_type, key_id, key_line(key_type, key_id, value))
                result["digests"][company_id] = digest.hexdigest()
                if digest.hexdigest() != manifest["digest"]:
                    self.problem("company %s: the digest recomputed from the files differs from the manifest's" % company_id)
            elif not self.recompute:
                result["digests"][company_id] = manifest["digest"]
            return keys
        finally:
            os.close(dir_fd)

    def _finish(self, result):
        result.update(problems=self.problems, problem_count=self.problem_count, extra_files=self.extra_files,
                      extra_companies=self.extra_companies, permissions=self.permissions, counts=self.counts,
                      verified=self.problem_count == 0, recomputed=self.recompute)
        return result


def export_tree(params, connect, target, owner, check_mode):
    """Entry point of baileys_auth_export."""
    os.umask(0o077)
    if params["mode"] == "standby":
        return Refresher(params, connect, target, owner, check_mode).run()
    return Exporter(params, connect, target, owner, check_mode).run()


def verify_tree(path, recompute_digests=False, allow_extra=False, max_problems=100, lock_timeout=300):
    """Entry point of baileys_sessions_verify."""
    path = os.path.normpath(path)
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        verifier = Verifier(path, recompute_digests, allow_extra, max_problems)
        verifier.problem("the parent directory %s does not exist" % parent)
        return verifier._finish({"path": path, "verified": False, "digests": {}})
    with ParentLock(parent, exclusive=False, timeout=lock_timeout):
        return Verifier(path, recompute_digests, allow_extra, max_problems).run()
