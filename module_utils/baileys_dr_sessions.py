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

import bisect
import collections
import concurrent.futures
import ctypes
import datetime
import errno
import fcntl
import functools
import gzip
import hashlib
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import stat
import threading
import time

from ansible.module_utils.baileys_dr_codec import (
    COMPANY_ID_RE,
    DIGEST_HEADER,
    KEY_TYPES,
    VALUE_ERRORS,
    apply_type_rules,
    canonical_json,
    creds_shape_problems,
    key_file_name,
    key_forms,
    key_line_text,
    row_name,
    sort_key,
    to_base64_form,
    value_problem,
)
from ansible.module_utils.baileys_dr_fs import fsync_dir, fsync_tree, libc, swap_in, write_file_atomic
from ansible.module_utils.baileys_dr_identity import IdentityRefused, copy_guard
from ansible.module_utils.baileys_dr_postgres import postgres_argument_spec, psycopg2

FORMAT = 1
KIND = "baileys-dr-sessions"
ARCHIVE_KIND = "baileys-dr-sessions-archive"
META_DIR = ".baileys-dr"
MANIFEST_NAME = "manifest.json"
COMPANIES_DIR = "companies"
LINES_DIR = "digest-lines"
IN_PROGRESS_NAME = "refresh-in-progress"
# Written (in the metadata directory of a standby) by a refresh the deletion guard refused; removed by the next good one.
REFUSED_NAME = "refresh-refused.json"
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
# With a pause: a file whose creation ends the pause early (the test releases the module when it has seen what it
# needs; the seconds stay the upper bound).
TEST_RELEASE_ENV = "BAILEYS_DR_TEST_PAUSE_UNTIL"
XID_WINDOW = 2 ** 31
# Threads (each with its own connection on the exported snapshot) reading ahead during a standby refresh.
PREFETCH_THREADS = 2
# A full export of at least this many keys (and 2 companies) is shared among worker processes, at most this many.
PARALLEL_MIN_KEYS = 20000
MAX_EXPORT_WORKERS = 4
# A standby refresh shares its work among worker processes from this many companies to refresh (and PARALLEL_MIN_KEYS keys).
REFRESH_PARALLEL_MIN_COMPANIES = 8


class SessionsError(Exception):
    """An error whose message is safe to show (no secret, ids shown with repr)."""


class HostileInputError(SessionsError):
    """A row that cannot be written as a Baileys file without danger or loss."""


class UnknownKeyTypeError(HostileInputError):
    pass


class ManifestError(SessionsError):
    pass


class ForeignTreeError(SessionsError):
    """dest holds something that is not a baileys-dr tree: never deleted or replaced unless asked."""


class RefreshRefused(SessionsError):
    """A standby refresh would delete too much (the deletion guard): nothing was changed."""


# -- time and test hooks ---------------------------------------------------------------


def utc_now():
    return datetime.datetime.now(datetime.timezone.utc)


def iso(moment):
    """ISO 8601 in UTC with a Z, as the manifests write times."""
    if moment is None:
        return None
    return moment.astimezone(datetime.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


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
        seconds, release = float(os.environ.get(TEST_PAUSE_SECONDS_ENV) or 30), os.environ.get(TEST_RELEASE_ENV)
        if not release:
            time.sleep(seconds)
        deadline = time.monotonic() + seconds
        while release and time.monotonic() < deadline and not os.path.exists(release):
            time.sleep(0.05)
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


def value_error(company_id, key_type, key_id, exc):
    """HostileInputError naming the row whose value could not be parsed or encoded (key_type None: the creds)."""
    return HostileInputError("%s: the value %s; refusing to export it" % (row_name(company_id, key_type, key_id), value_problem(exc)))


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
    return (key_line_text(key_type, key_id, value) + "\n").encode("utf-8")


def key_file_and_line(key_type, key_id, value):
    """(file_content(value), key_line(...)) from one walk of the value."""
    text, line = key_forms(key_type, key_id, value)
    return text.encode("utf-8"), (line + "\n").encode("utf-8")


def encode_row(company_id, key_type, key_id, text):
    """(file bytes, digest line) of a row's value text (key_type None: the creds), or HostileInputError naming the row."""
    try:
        value = json.loads(text)
        return creds_file_and_line(company_id, value) if key_type is None else key_file_and_line(key_type, key_id, value)
    except VALUE_ERRORS as exc:
        raise value_error(company_id, key_type, key_id, exc) from None


def creds_file_and_line(company_id, creds):
    """(file bytes, digest line) of creds; HostileInputError naming the company and the fields (never values) when
    Baileys could not start a socket on them (codec.creds_shape_problems): nothing of that company is written."""
    problems = creds_shape_problems(creds)
    if problems:
        raise HostileInputError("%s: %s: Baileys could not start this company on them; refusing to export it"
                                % (row_name(company_id), "; ".join(problems)))
    return file_content(creds), creds_line(creds)


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


def put_file(dir_fd, name, data, owner=None):
    """Write name with data in place (standby refresh): one syscall path instead of temp file + rename.

    Not atomic for a reader: the refresh protocol makes a torn file visible
    (the company manifest, written after, lists the sha256 of every file).
    Files with other hard links, symbolic links and non-regular files are
    replaced by a rename instead, so nothing outside the tree is written.
    Returns True when the file existed.
    """
    try:
        fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        create_file(dir_fd, name, data, owner)
        return False
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise
        remove_tree_at(dir_fd, name)
        create_file(dir_fd, name, data, owner)
        return True
    try:
        info = os.fstat(fd)
        in_place = stat.S_ISREG(info.st_mode) and info.st_nlink == 1
        if in_place:
            write_all(fd, data)
            if info.st_size > len(data):
                os.ftruncate(fd, len(data))
            if stat.S_IMODE(info.st_mode) != FILE_MODE:
                os.fchmod(fd, FILE_MODE)
            if owner:
                os.fchown(fd, owner[0], owner[1])
    finally:
        os.close(fd)
    if not in_place:
        replace_file(dir_fd, name, data, owner)
    return True


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
        _syncfs = getattr(libc(), "syncfs", False)
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


def top_manifest_document(generation, source, companies, created_at, last_good_refresh, mode, extra=None):
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
        **(extra or {}),  # identities and the Baileys version (baileys_dr_identity.snapshot_fields)
    }


def identity_check(conn, params, dest, top, companies, action):
    """Each company's identity in the database (in the snapshot's transaction), refused when it would replace another
    identity in dest, and key types the application's Baileys does not know (baileys_dr_identity.copy_guard).
    Returns (the manifest's extra fields, the identity guard's report)."""
    try:
        with conn.cursor() as cur:
            return copy_guard(cur, dest, top, companies, params, action)
    except IdentityRefused as exc:
        raise RefreshRefused(str(exc)) from None


# -- writing one company (shared by the full export and the standby rebuild) ------------------


class CompanyWriter:
    """Writes files into a company directory and builds its manifest entries and digest."""

    def __init__(self, company_id, dir_fd, owner, unknown_types, keep_lines, replace=False):
        self.company_id = company_id
        self.dir_fd = dir_fd
        self.owner = owner
        self.unknown_types = unknown_types
        self.keep_lines = keep_lines
        self.replace = replace
        self.names = {}  # file name -> (type, id)
        self.entry_lines = []
        self.rows = [] if keep_lines else None  # "type\tid\txmin" per key, digest order (standby)
        self.digest = None
        self.written = 0
        self.bytes = 0
        self.skipped = 0
        self.skipped_types = set()

    def _write(self, name, data):
        if self.dir_fd is None:
            return
        if self.replace:
            put_file(self.dir_fd, name, data, self.owner)
        else:
            create_file(self.dir_fd, name, data, self.owner)
        self.written += 1
        self.bytes += len(data)

    def creds(self, row):
        if row is None:
            self.digest = DigestLines(creds_line(None), self.keep_lines)
            return
        xmin, text, md5 = row
        data, line = encode_row(self.company_id, None, None, text)
        self._write(CREDS_FILE, data)
        self.names[CREDS_FILE] = ("creds", None)
        self.entry_lines.append(entry_line(CREDS_FILE, {"type": "creds", "sha256": sha256_bytes(data), "size": len(data),
                                                        "xmin": int(xmin), "row_md5": md5}))
        self.digest = DigestLines(line, self.keep_lines)

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
        other = self.names.get(name)
        if other is not None:
            raise collision_error(self.company_id, name, other, (key_type, key_id))
        self.names[name] = (key_type, key_id)
        return name

    def key(self, key_type, key_id, xmin, text, md5):
        name = self.name_of(key_type, key_id)
        if name is None:
            return
        if self.dir_fd is None:
            try:
                line = key_line(key_type, key_id, json.loads(text))
            except VALUE_ERRORS as exc:
                raise value_error(self.company_id, key_type, key_id, exc) from None
            self.digest.add(key_type, key_id, line)
            return
        data, line = encode_row(self.company_id, key_type, key_id, text)
        self.digest.add(key_type, key_id, line)
        self._write(name, data)
        self.entry_lines.append(key_entry_line(name, key_type, key_id, sha256_bytes(data), len(data), xmin, md5))
        if self.rows is not None:
            self.rows.append("%s\t%s\t%s" % (key_type, key_id, xmin))

    def meta(self, tree, in_place=False):
        """Write the company's digest lines and row versions (standby) and manifest; returns the manifest's sha256."""
        rows = "\n".join(self.rows) if self.rows is not None else None
        lines = self.digest.data() if self.digest.lines is not None else None
        return write_company_meta(tree, self.company_id, self.digest.hexdigest(), self.digest.keys, self.entry_lines,
                                  self.owner, lines, rows, in_place)


def entry_line(name, entry):
    """One file of a company manifest, as its line in the manifest."""
    return json.dumps(name, ensure_ascii=False).encode("utf-8") + b":" + encode_json(entry)


_json_string = json.encoder.encode_basestring  # what json.dumps(text, ensure_ascii=False) gives


def key_entry_line(name, key_type, key_id, sha256, size, xmin, md5):
    """entry_line(name, {"type", "id", "sha256", "size", "xmin", "row_md5"}) of a key file, formatted directly."""
    return ('%s:{"type":%s,"id":%s,"sha256":"%s","size":%d,"xmin":%d,"row_md5":%s}' % (
        _json_string(name), _json_string(key_type), _json_string(key_id), sha256, size, int(xmin),
        "null" if md5 is None else _json_string(md5))).encode("utf-8")


MANIFEST_FOOTER = b"}}"


def render_company_manifest(company_id, digest, keys, entry_lines, rows_sha256=None):
    """A company manifest: JSON with one file per line, so a refresh can splice lines instead of re-encoding."""
    rows = ',"rows_sha256":"%s"' % rows_sha256 if rows_sha256 else ""
    header = ('{"company_id":%s,"digest":"%s","keys":%d%s,"files":{' % (json.dumps(company_id), digest, keys, rows)).encode("utf-8")
    body = b",\n".join(entry_lines)
    return header + b"\n" + (body + b"\n" if entry_lines else b"") + MANIFEST_FOOTER + b"\n"


def write_company_meta(tree, company_id, digest, keys, entry_lines, owner, lines_data=None, rows_text=None, in_place=False):
    """Digest lines and row versions (standby trees), then the company manifest; returns the manifest's sha256."""
    put = put_file if in_place else replace_file
    rows_sha256 = None
    if tree.lines_fd is not None and lines_data is not None:
        rows_data = rows_text.encode("utf-8")
        rows_sha256 = sha256_bytes(rows_data)
        put(tree.lines_fd, company_id + ".lines", lines_data, owner)
        put(tree.lines_fd, company_id + ".rows", rows_data, owner)
    data = render_company_manifest(company_id, digest, keys, entry_lines, rows_sha256)
    put(tree.companies_fd, company_id + ".json", data, owner)
    return sha256_bytes(data)


# -- full export into a staging directory ---------------------------------------------------


class FullExport:
    """A complete tree written into a fresh directory below parent_fd, then swapped in.

    With connect and an exported snapshot, a large export is shared among worker processes
    (export_workers()): each opens its own connection on the same snapshot and writes whole
    companies, so JSON work and file creation use every core; the parent collects each
    company's manifest entry in its place.
    """

    def __init__(self, snapshot, stats, owner, unknown_types, keep_lines, hook_prefix="", connect=None):
        self.snapshot = snapshot
        self.stats = stats
        self.owner = owner
        self.unknown_types = unknown_types
        self.keep_lines = keep_lines
        self.connect = connect
        self.companies = {}
        self.digests = {}
        self.totals = {"files": 0, "bytes": 0, "keys": 0, "skipped_keys": 0}
        self.skipped_types = set()
        self.without_creds = []
        self.workers_used = 0

    def write(self, root_fd):
        tree = TreeMeta(root_fd).open(create=True, owner=self.owner, lines=self.keep_lines)
        try:
            workers = self._workers()
            results = ExportWorkers(self, tree, workers).run() if workers > 1 else None
            self.workers_used = workers if results is not None else 0
            if results is None:
                results = {}
                for index, (company_id, _keys, fingerprint, _creds) in enumerate(self.stats):
                    results[index] = self._company(self.snapshot, tree, company_id, fingerprint)
                    test_hook("after_company:%d" % (index + 1))
        finally:
            tree.close()
        for index, (company_id, _keys, fingerprint, _creds) in enumerate(self.stats):
            self._add(company_id, results[index])

    def _workers(self):
        if self.connect is None or self.snapshot.exported is None or len(self.stats) < 2:
            return 0
        if sum(s[1] for s in self.stats) < PARALLEL_MIN_KEYS:
            return 0
        return min(export_workers(), len(self.stats))

    def _company(self, snapshot, tree, company_id, fingerprint):
        """Write one company; returns what the manifest and the result need of it (plain data, picklable)."""
        dir_fd = make_dir(tree.root_fd, COMPANY_PREFIX + company_id, self.owner)
        try:
            writer = CompanyWriter(company_id, dir_fd, self.owner, self.unknown_types, self.keep_lines)
            creds = snapshot.creds(company_id)
            writer.creds(creds)
            for key_type, key_id, xmin, text, md5 in snapshot.keys(company_id):
                writer.key(key_type, key_id, xmin, text, md5)
        finally:
            os.close(dir_fd)
        manifest_sha256 = writer.meta(tree)
        return {"entry": {"digest": writer.digest.hexdigest(), "keys": writer.digest.keys, "files": len(writer.entry_lines),
                          "manifest_sha256": manifest_sha256, "fingerprint": fingerprint},
                "files": writer.written, "bytes": writer.bytes, "skipped": writer.skipped,
                "skipped_types": sorted(writer.skipped_types), "without_creds": creds is None}

    def _add(self, company_id, result):
        entry = result["entry"]
        self.companies[company_id] = entry
        self.digests[company_id] = entry["digest"]
        if result["without_creds"]:
            self.without_creds.append(company_id)
        self.totals["files"] += result["files"]
        self.totals["bytes"] += result["bytes"]
        self.totals["keys"] += entry["keys"]
        self.totals["skipped_keys"] += result["skipped"]
        self.skipped_types.update(result["skipped_types"])


def export_workers():
    """Worker processes a large full export uses: one per usable CPU, at most MAX_EXPORT_WORKERS."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_EXPORT_WORKERS))


_prctl = None


def _die_with_parent():
    """PR_SET_PDEATHSIG: a worker must not outlive a killed module (it would write into a removed staging tree)."""
    global _prctl
    try:
        if _prctl is None:
            _prctl = libc().prctl
        _prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Workers:
    """Forked worker processes, each with its own state (its own database connection), doing the tasks the parent hands
    out one at a time, so that JSON work, file I/O and the server's work use every core. Shared by the export
    (ExportWorkers) and the import (baileys_dr_import).

    start(attach, do, detach) forks; in each worker, state = attach() (its connection), then do(state, task) gives the
    (picklable) result of each task received, and detach(state) ends it. Protocol on each worker's pipe: the worker sends
    ("ready", None) once attached, then ("done", position, result) per task, or ("error", exception) and exits. start()
    returns False when a worker could not attach (max_connections, say): the caller then does the work alone. The workers
    are forked with the parent's memory as it is then: they see what the parent computed before, nothing after.
    """

    def __init__(self, count, what="a worker"):
        self.count = count
        self.what = what
        self.pids = {}  # pipe -> pid
        self.failures = {}  # position -> exception of a task whose worker failed (map(drain=True))

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.kill()

    def start(self, attach, do, detach=None):
        try:
            for _ in range(self.count):
                self._start(attach, do, detach)
        except BaseException:
            self.kill()
            raise
        for pipe in list(self.pids):
            try:
                self._receive(pipe)
            except Exception:
                self.kill()
                return False
        return True

    def _start(self, attach, do, detach):
        from multiprocessing.connection import Pipe  # here, not at the top: most runs never fork

        parent_end, child_end = Pipe()
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the parent's stack
            code = 1
            try:
                parent_end.close()
                _die_with_parent()
                self._work(child_end, attach, do, detach)
                code = 0
            except BaseException:  # noqa: B036 - the worker reports what it can, then exits
                pass
            finally:
                os._exit(code)
        child_end.close()
        self.pids[parent_end] = pid

    def _work(self, pipe, attach, do, detach):
        state = None
        try:
            state = attach()
            pipe.send(("ready", None))
            while True:
                message = pipe.recv()
                if message is None:
                    break
                position, task = message
                pipe.send(("done", position, do(state, task)))
        except BaseException as exc:  # noqa: B036 - sent to the parent, which raises it
            try:
                pipe.send(("error", exc))
            except Exception:
                pipe.send(("error", SessionsError("%s failed: %s: %s" % (self.what, type(exc).__name__, exc))))
            raise
        finally:
            if detach is not None and state is not None:
                detach(state)

    def _receive(self, pipe):
        try:
            message = pipe.recv()
        except (EOFError, OSError):
            pid = self.pids.get(pipe)
            raise SessionsError("%s (pid %s) ended without a word (killed?)" % (self.what, pid)) from None
        if message[0] == "error":
            raise message[1]
        return message

    def map(self, tasks, accept=None, drain=False):
        """{position: result} of the tasks (a list), handed out one at a time to whichever worker is free.

        accept(position, result), called in the parent as each result comes, returning False hands out no further task
        (the tasks in flight finish; the others get no result). A failed worker raises its error at once, unless drain:
        then it gets no further task, the others finish theirs, and the failure is in failures (its task's position)."""
        from multiprocessing.connection import wait

        results, pending, next_position, stopped = {}, {}, 0, False
        idle = list(self.pids)
        while True:
            while idle and not stopped and next_position < len(tasks):
                pipe = idle.pop()
                pipe.send((next_position, tasks[next_position]))
                pending[pipe] = next_position
                next_position += 1
            if not pending:
                return results
            for pipe in wait(list(pending)):
                position = pending.pop(pipe)
                try:
                    _, _, result = self._receive(pipe)
                except Exception as exc:
                    if not drain:
                        raise
                    self.failures[position] = exc
                    self._forget(pipe)
                    stopped = True
                    continue
                results[position] = result
                idle.append(pipe)
                if accept is not None and accept(position, result) is False:
                    stopped = True

    def finish(self):
        """Let every worker end (detach), then reap it; a worker that ended badly raises."""
        for pipe in self.pids:
            pipe.send(None)
        for pipe, pid in list(self.pids.items()):
            status = os.waitpid(pid, 0)[1]
            del self.pids[pipe]
            pipe.close()
            if os.waitstatus_to_exitcode(status) != 0:
                raise SessionsError("%s (pid %d) failed at its end (exit %d)" % (self.what, pid, os.waitstatus_to_exitcode(status)))

    def _forget(self, pipe):
        pid = self.pids.pop(pipe)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
        pipe.close()

    def kill(self):
        """Kill and reap whatever worker is left (after a failure, before the staging tree is removed)."""
        for pipe in list(self.pids):
            self._forget(pipe)


class ExportWorkers:
    """Forked workers (Workers) writing whole companies of one FullExport, each on its own connection to the exported
    snapshot; the parent collects each company's result. A worker that cannot connect makes the whole export run in the
    parent instead (run() returns None); any later failure kills every worker and is raised, so the caller removes the
    staging tree.
    """

    def __init__(self, export, tree, count):
        self.export = export
        self.tree = tree
        self.count = count

    def run(self):
        with Workers(self.count, "an export worker") as workers:
            if not workers.start(self._attach, self._company, self._detach):
                return None
            queries = self.export.snapshot.queries

            def accept(_index, result):
                queries.extend(q for q in result[1] if q not in queries)

            results = workers.map(list(range(len(self.export.stats))), accept)
            workers.finish()
        return {index: result for index, (result, _queries) in results.items()}

    def _attach(self):
        conn = self.export.connect()
        try:
            return conn, self.export.snapshot.attach(conn)
        except BaseException:
            conn.close()
            raise

    def _company(self, state, index):
        snapshot = state[1]
        company_id, _keys, fingerprint, _creds = self.export.stats[index]
        result = self.export._company(snapshot, self.tree, company_id, fingerprint)
        test_hook("after_company:%d" % (index + 1))
        return result, snapshot.queries

    @staticmethod
    def _detach(state):
        conn = state[0]
        try:
            conn.rollback()
        finally:
            conn.close()


class DigestOnly:
    """The digests a full export would give, computed without writing (check mode, unchanged check)."""

    def __init__(self, snapshot, unknown_types):
        self.snapshot = snapshot
        self.unknown_types = unknown_types

    def company(self, company_id):
        writer = CompanyWriter(company_id, None, None, self.unknown_types, False)
        writer.creds(self.snapshot.creds(company_id))
        for row in self.snapshot.keys(company_id):
            writer.key(*row)
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


FOREIGN_SHOWN = 5


def refuse_foreign(dest, exists, replace_foreign):
    """Raise ForeignTreeError when dest is a non-empty directory without a baileys-dr top manifest (unless replace_foreign).

    Only a tree this project wrote (its .baileys-dr/manifest.json, even an unusable one) may be replaced by an
    export: anything else (an application directory given as dest by mistake, a tree another tool made) is
    refused before a connection is opened, naming dest and its first entries.
    """
    if not exists or replace_foreign:
        return
    root_fd = open_dir(dest)
    try:
        if has_top_manifest(root_fd):
            return
        with os.scandir(root_fd) as listing:
            entries = sorted(shown_name(entry.name) for entry in itertools.islice(listing, FOREIGN_SHOWN + 1))
    finally:
        os.close(root_fd)
    if not entries:
        return
    more = ", ..." if len(entries) > FOREIGN_SHOWN else ""
    raise ForeignTreeError(
        "dest %s is not a baileys-dr sessions tree (it has no %s/%s) and is not empty (%s%s): refusing to replace it. "
        "Give another dest, move it away, or set replace_foreign=true to replace it (it is then kept beside dest as "
        "%s.before-<UTC time>, never deleted)" % (dest, META_DIR, MANIFEST_NAME, ", ".join(entries[:FOREIGN_SHOWN]), more,
                                                    os.path.basename(dest)))


def has_top_manifest(root_fd):
    """True when the tree open at root_fd has a .baileys-dr/manifest.json regular file (no symbolic link followed)."""
    try:
        meta_fd = open_dir(META_DIR, root_fd)
    except (FileNotFoundError, SessionsError):
        return False
    try:
        return stat.S_ISREG(os.stat(MANIFEST_NAME, dir_fd=meta_fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False
    finally:
        os.close(meta_fd)


class Exporter:
    """mode=live: the database's state as a complete new tree, swapped in atomically."""

    def __init__(self, params, connect, target, owner, check_mode):
        self.params = params
        self.connect = connect
        self.target = target
        self.owner = owner
        self.check_mode = check_mode
        self.source_meta = None  # what Snapshot.begin read of the server

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
        refuse_foreign(dest, exists, self.params.get("replace_foreign"))
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
        # Exported, so that worker processes can read the same snapshot (FullExport).
        meta = self.source_meta = snapshot.begin(self.target, export=not self.check_mode)
        filter_ids = params.get("companies") or None
        stats = snapshot.company_stats(filter_ids)
        for company_id, *_ in stats:
            check_company_id(company_id)
        hostile = snapshot.hostile_rows(filter_ids, params["unknown_types"])
        if hostile:
            raise hostile_error(hostile, params["unknown_types"])
        current, why = read_current_manifest(dest, exists)
        self.extra, identity = identity_check(conn, params, dest, current, filter_ids, "write the database into %s" % dest)
        result = {"dest": dest, "manifest": os.path.join(dest, META_DIR, MANIFEST_NAME), "snapshot_at": meta["snapshot_at"],
                  "system_identifier": meta["system_identifier"], "companies": len(stats), "keys": sum(s[1] for s in stats),
                  "backup": None, "files": 0, "bytes": 0, "queries": snapshot.queries,
                  "generation": current["generation"] if current else None, "identity": identity,
                  "baileys": self.extra["baileys"]}
        differs = self._differs(current, stats, meta)
        # The manifest speaks for the files only while nobody wrote into them: a service running on the files creates,
        # rewrites in place and deletes files the database never sees. Checked before any "nothing to do" (a run that
        # writes anyway compares the replaced tree after the swap, where it is kept).
        drift = tree_drift(dest) if exists and (self.check_mode or (differs is not True and not params["force"])) else None
        drifted = drift is not None and not drift["clean"]
        if differs is False and not params["force"] and not drifted:
            result.update(changed=False, differs=False, digests={c: e["digest"] for c, e in current["companies"].items()},
                          reason="the database holds what the manifest of dest lists (row versions unchanged) and so does the tree")
            return result
        files = sum(s[1] + (1 if s[3] else 0) for s in stats)
        estimated = estimate_tree_bytes(snapshot.estimate_bytes(filter_ids), files, free_space(parent)["block"])
        result["estimated_bytes"] = estimated
        check_space(parent, estimated, files, params["space_margin"])
        if self.check_mode or (differs is None and not params["force"]):
            # Digests from the rows, compared with the manifest before anything is written.
            report = self._compare(snapshot, stats, current)
            result.update(report)
            differs = report["differs"]
            if self.check_mode:
                result["changed"] = report["differs"] or bool(params["force"]) or drifted
                if result["changed"]:
                    result["would_write"] = {"companies": len(stats), "keys": result["keys"] - report["skipped_keys"],
                                             "files": files - report["skipped_keys"], "estimated_bytes": estimated}
                    result["rewrite_reason"] = self._rewrite_reason(why, differs, drift)
                result["replaced_drift"] = drift
                result["reason"] = why or (report["reason"] if differs or not drifted else result["rewrite_reason"])
                return result
            if not report["differs"] and not drifted:
                result["changed"] = False
                return result
        result.update(self._write(conn, snapshot, stats, meta, current, dest, parent, backup_dir))
        drift = result["replaced_drift"] or drift
        result["differs"] = differs is not False
        result["rewrite_reason"] = self._rewrite_reason(why, differs, drift)
        result["reason"] = why or ("the database differs from the manifest of dest" if differs is not False else result["rewrite_reason"])
        return result

    def _rewrite_reason(self, why, differs, drift):
        """Why dest is (or would be) written anew: one line naming the database's change, the tree's, or both."""
        parts = [why] if why else []
        if differs and not why:
            parts.append("the database differs from the manifest of dest")
        if drift is not None and drift["manifest"] and not drift["clean"]:
            parts.append("the service changed the tree since its manifest: %s" % drift["reason"])
        if not parts:
            parts.append("force" if self.params["force"] else "the database differs from the manifest of dest")
        return "; ".join(parts)

    def _write(self, conn, snapshot, stats, meta, current, dest, parent, backup_dir):
        params = self.params
        staging = os.path.join(parent, staging_name(dest))
        os.mkdir(staging, DIR_MODE)
        try:
            root_fd = open_dir(staging)
            try:
                if self.owner:
                    os.fchown(root_fd, *self.owner)
                export = FullExport(snapshot, stats, self.owner, params["unknown_types"], keep_lines=params["mode"] == "standby",
                                    connect=self.connect)
                export.write(root_fd)
                conn.rollback()
                generation = (current["generation"] + 1) if current else 1
                now = iso(utc_now())
                top = top_manifest_document(generation, meta, export.companies, now, now, params["mode"], self.extra)
                meta_fd = open_dir(META_DIR, root_fd)
                try:
                    create_file(meta_fd, MANIFEST_NAME, encode_json(top), self.owner)
                finally:
                    os.close(meta_fd)
                sync_filesystem(root_fd, staging)
            finally:
                os.close(root_fd)
            test_hook("before_swap")
            # The replaced tree is kept whatever keep_backup says when the service wrote into it (swap_in_tree).
            swapped = swap_in_tree(staging, dest, backup_dir=backup_dir, keep_backup=params["keep_backup"])
            staging = None
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
        return {"changed": True, "backup": swapped["backup"], "replaced_drift": swapped["replaced_drift"],
                "files": export.totals["files"],
                "bytes": export.totals["bytes"], "keys": export.totals["keys"], "skipped_keys": export.totals["skipped_keys"],
                "skipped_types": sorted(export.skipped_types), "generation": generation, "digests": export.digests,
                "companies_without_creds": export.without_creds[:MAX_SHOWN], "workers": export.workers_used}

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

ROWS_SQL = (
    "PREPARE baileys_dr_rows(text, text[]) AS SELECT (SELECT string_agg(key_type || E'\\t' || key_id || E'\\t' || xmin::text{md5}, "
    "E'\\n' ORDER BY key_type COLLATE \"C\", key_id COLLATE \"C\") FROM whatsapp_keys WHERE company_id = $1 AND key_type = ANY($2)), "
    "a.xmin::text, a.creds::text, md5(a.creds::text) FROM (SELECT 1) one LEFT JOIN whatsapp_auth a ON a.company_id = $1"
)
VALUES_SQL = (
    "PREPARE baileys_dr_values(text, text[], text[]) AS SELECT key_type, key_id, xmin::text, value::text, md5(value::text) "
    "FROM whatsapp_keys WHERE company_id = $1 AND (key_type, key_id) IN (SELECT * FROM unnest($2, $3))"
)


class CompanyState:
    """A company of a standby tree as its last refresh left it, read without decoding every entry.

    The manifest has one file per line, the digest lines one key per line,
    the row versions (`type TAB id TAB xmin`) one key per line, all in digest
    order: line n of each is key n. Each proves the next (top manifest ->
    manifest sha256 -> digest and rows_sha256), and a refresh edits them by
    splicing the lines of the keys that changed.
    """

    def __init__(self, company_id, manifest_data, lines_data, rows_data, hashes=None):
        self.company_id = company_id
        lines_sha256, rows_sha256 = hashes or (sha256_bytes(lines_data), sha256_bytes(rows_data))
        first, newline, body = manifest_data.partition(b"\n")
        if not newline or not first.endswith(b'"files":{') or not body.endswith(MANIFEST_FOOTER + b"\n"):
            raise ManifestError("the manifest of company %s does not have the one-file-per-line layout" % company_id)
        try:
            header = json.loads(first + b"}}")
        except ValueError:
            raise ManifestError("the manifest header of company %s is not JSON" % company_id) from None
        if header.get("company_id") != company_id or not isinstance(header.get("keys"), int) \
                or not isinstance(header.get("digest"), str):
            raise ManifestError("the manifest of company %s does not describe that company" % company_id)
        if not isinstance(header.get("rows_sha256"), str):
            raise ManifestError("the manifest of company %s records no row versions" % company_id)
        # Every file's line but the last ends with a comma: split at ",\n" (no Python loop over a company's lines).
        body = body[:-len(MANIFEST_FOOTER) - 1]
        entries = body[:-1].split(b",\n") if body else []
        if body and (not body.endswith(b"\n") or body.count(b"\n") != len(entries) or entries[-1].endswith(b",")):
            raise ManifestError("the manifest of company %s does not have the one-file-per-line layout" % company_id)
        self.digest = header["digest"]
        self.keys = header["keys"]
        self.has_creds = bool(entries) and entries[0].startswith(b'"creds.json":')
        self.creds_entry_line = entries[0] if self.has_creds else None
        self.key_entry_lines = entries[1:] if self.has_creds else entries
        if len(self.key_entry_lines) != self.keys:
            raise ManifestError("the manifest of company %s lists %d keys, not %d" % (company_id, len(self.key_entry_lines), self.keys))
        if lines_sha256 != self.digest:
            raise ManifestError("the digest lines of company %s do not prove its manifest's digest" % company_id)
        lines = split_digest_lines(lines_data)
        if lines is None or len(lines) != self.keys + 2 or lines[0] != HEADER_LINE:
            raise ManifestError("the digest lines of company %s do not match its manifest" % company_id)
        self.creds_line = lines[1]
        self.key_lines = lines[2:]
        if rows_sha256 != header["rows_sha256"]:
            raise ManifestError("the row versions of company %s do not match its manifest" % company_id)
        self.rows_text = rows_data.decode("utf-8")
        self.rows = self.rows_text.split("\n") if self.rows_text else []
        if len(self.rows) != self.keys:
            raise ManifestError("the row versions of company %s do not match its manifest" % company_id)

    @staticmethod
    def _parse_entry(line):
        try:
            ((name, entry),) = json.loads(b"{" + line + b"}").items()
        except (ValueError, TypeError):
            raise ManifestError("a manifest entry is not JSON") from None
        if not isinstance(entry, dict) or "/" in name or name in (".", ".."):
            raise ManifestError("a manifest entry names %r" % name)
        return name, entry

    def entry(self, n):
        return self._parse_entry(self.key_entry_lines[n])

    def creds_entry(self):
        return self._parse_entry(self.creds_entry_line)[1] if self.has_creds else None

    def md5_rows(self):
        """Row versions with the manifest's row_md5 appended (the slow path: every entry decoded)."""
        return ["%s\t%s" % (row, self.entry(n)[1].get("row_md5")) for n, row in enumerate(self.rows)]

    def position_of(self, key_type, key_id):
        """Where a new key goes among the old ones (digest order), by bisection."""
        return bisect.bisect_left(self.rows, sort_key(key_type, key_id), key=lambda row: sort_key(*row.split("\t", 2)[:2]))

    def file_names(self):
        return {key_file_name(*row.split("\t", 2)[:2]) for row in self.rows}


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


def read_ahead(dir_fd, names):
    """Ask the kernel to read the given files of a directory into the page cache, without waiting.

    A refresh overwrites a session file in place; writing part of a page
    that is not cached makes the kernel read its block first, one
    synchronous disk read per file on a standby larger than the cache. Asked
    ahead (by the prefetch thread, a company or two early), those reads are
    queued together and done by the time the file is written. Only a hint:
    anything but a regular file is left alone and errors are ignored.
    """
    for name in names:
        try:
            if not stat.S_ISREG(os.lstat(name, dir_fd=dir_fd).st_mode):
                continue
            fd = os.open(name, READ_FLAGS | os.O_NONBLOCK | os.O_NOCTTY, dir_fd=dir_fd)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def in_thread(function, *args):
    """Start function(*args) in a thread; returns a callable that waits and gives its result (or raises its error)."""
    outcome = {}

    def target():
        try:
            outcome["value"] = function(*args)
        except BaseException as exc:  # handed to the caller
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="baileys-dr-check", daemon=True)
    thread.start()

    def result():
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]
    return result


def unlink_names(dir_fd, names):
    """Unlink names in dir_fd (those already gone are not counted), then close dir_fd; returns the count."""
    try:
        return sum(1 for name in names if unlink_quiet(dir_fd, name))
    finally:
        os.close(dir_fd)


class SpaceBudget:
    """check_space for a refresh that writes company after company: the file system is asked once, then each
    company's estimate is taken from what is left; it is asked again only when that is not enough."""

    def __init__(self, path, margin):
        self.path = path
        self.margin = margin
        self.left = None  # [bytes, inodes or None] after the estimates taken so far

    def take(self, estimated_bytes, files):
        left = self.left
        if left is None or left[0] < estimated_bytes * self.margin or (left[1] is not None and left[1] < files * self.margin):
            space = check_space(self.path, estimated_bytes, files, self.margin)
            left = self.left = [space["bytes"], space["inodes"]]
        left[0] -= estimated_bytes
        if left[1] is not None:
            left[1] -= files


GUARD_SHOWN = 5


class DeletionGuard:
    """The mass-change guard of a standby refresh, decided before anything is written.

    The standby copy exists for the day the database is wrong: a refresh that copied an emptied or mass-deleted
    table into it (and archived that as a new generation) would destroy the copy DR relies on. Counted per company
    from the copy's top manifest (keys it holds) and the database's statistics (keys it has, one aggregate query the
    refresh runs anyway): a company with fewer keys loses at least the difference, a company gone or left without a
    key loses all. Churn (consumed pre-keys replaced by new ones) is no mass deletion and is not counted.

    Refused: a database without any company, or without any key, while the copy has some; more than
    max_delete_share of the copy's keys removed; every key of a company holding more than
    max_company_keys_removed keys removed. force overrides (the result says so).
    """

    def __init__(self, params):
        self.max_share = params.get("max_delete_share")
        self.max_company_keys = params.get("max_company_keys_removed")
        self.force = bool(params.get("force"))
        if self.max_share is None or not 0 <= self.max_share <= 1:
            raise SessionsError("max_delete_share must be between 0 and 1 (1 turns the share rule off), got %r" % (self.max_share,))
        if self.max_company_keys is None or self.max_company_keys < 0:
            raise SessionsError("max_company_keys_removed must be 0 or more, got %r" % (self.max_company_keys,))

    def check(self, top, stats):
        """{"keys_in_copy", "keys_in_database", "keys_removed", "share", "companies_in_copy", "companies_in_database",
        "companies_losing_all_keys", "companies": [{"company_id", "keys", "gone"}] (the largest first, at most GUARD_SHOWN),
        "reasons": [...], "refused": bool, "overridden": bool}."""
        database = {company_id: keys for company_id, keys, _fingerprint, _creds in stats}
        before = removed = 0
        emptied = []
        for company_id, entry in top["companies"].items():
            old = entry.get("keys") if isinstance(entry.get("keys"), int) else 0
            new = database.get(company_id, 0)
            before += old
            removed += max(0, old - new)
            if new == 0 and old > self.max_company_keys:
                emptied.append((old, company_id))
        emptied.sort(key=lambda item: (-item[0], item[1].encode("utf-8")))
        after = sum(database.values())
        share = removed / before if before else 0.0
        report = {"keys_in_copy": before, "keys_in_database": after, "keys_removed": removed, "share": round(share, 6),
                  "companies_in_copy": len(top["companies"]), "companies_in_database": len(database),
                  "companies_losing_all_keys": len(emptied),
                  "companies": [{"company_id": c, "keys": k, "gone": c not in database} for k, c in emptied[:GUARD_SHOWN]],
                  "limits": {"max_delete_share": self.max_share, "max_company_keys_removed": self.max_company_keys}}
        reasons = []
        if top["companies"] and not database:
            reasons.append("the database has no company at all while the copy holds %d companies and %d keys (an emptied or "
                           "wrong database?)" % (len(top["companies"]), before))
        elif before and not after:
            reasons.append("the database has no key at all while the copy holds %d keys of %d companies (an emptied table?)"
                           % (before, len(top["companies"])))
        else:
            if share > self.max_share:
                reasons.append("it would delete %d of the copy's %d keys (%.1f%%, more than max_delete_share=%s)"
                               % (removed, before, 100 * share, self.max_share))
            if emptied:
                shown = ", ".join("%s: %d keys%s" % (c, k, ", gone from the database" if c not in database else "")
                                  for k, c in emptied[:GUARD_SHOWN])
                reasons.append("it would delete every key of %d compan%s holding more than max_company_keys_removed=%d keys (%s%s)"
                               % (len(emptied), "y" if len(emptied) == 1 else "ies", self.max_company_keys, shown,
                                  ", ..." if len(emptied) > GUARD_SHOWN else ""))
        report.update(reasons=reasons, refused=bool(reasons) and not self.force, overridden=bool(reasons) and self.force)
        return report

    @staticmethod
    def refusal(dest, top, report, recorded):
        """The message of a refused refresh (what it would have removed, that nothing changed, what to do)."""
        where = ("the refusal is recorded in %s, which health reports as critical" % os.path.join(dest, META_DIR, REFUSED_NAME)
                 if recorded else "check mode: nothing recorded")
        return ("refusing to refresh the standby copy %s: %s. Nothing was changed: the copy keeps generation %s (database time %s) "
                "and no archive was written or removed; %s. If the deletion is intended, run again with force=true "
                "(snapshot.yml: -e baileys_snapshot_force=true); if not, restore the database from this copy (docs/runbook.md, "
                "scenario 3: accidental deletion)" % (dest, "; ".join(report["reasons"]), top.get("generation"),
                                                      (top.get("source") or {}).get("snapshot_at"), where))

    @staticmethod
    def record(top, meta, report):
        """The document of .baileys-dr/refresh-refused.json (read by baileys_db_health)."""
        return {"format": FORMAT, "kind": "baileys-dr-refresh-refused", "refused_at": iso(utc_now()),
                "snapshot_at": meta.get("snapshot_at"), "generation": top.get("generation"),
                "last_good_refresh": top.get("last_good_refresh"), "reasons": report["reasons"],
                "counts": {k: report[k] for k in ("keys_in_copy", "keys_in_database", "keys_removed", "share", "companies_in_copy",
                                                  "companies_in_database", "companies_losing_all_keys")},
                "companies": report["companies"], "limits": report["limits"]}


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


VERIFY_DEPTHS = ("content", "structure")
# The end of each file's line in a company manifest (from its name's closing quote), each file's size and sha256.
MANIFEST_ENTRY_TAIL_RE = re.compile(rb'":\{"type":"[^\n]*')
MANIFEST_SIZE_RE = re.compile(rb'"size":(\d+)')
MANIFEST_SHA256_RE = re.compile(rb'"sha256":"([^"\n]*)"')
# File names shown per company and kind (added, changed, deleted) in a drift report.
DRIFT_SHOWN = 5


def shown_name(name):
    """A name from a directory listing as it can be shown: itself when printable, else its repr.

    Listings are hostile input: a newline, an escape sequence or an undecodable byte (a lone surrogate
    after os.fsdecode) would break a one-line reason or the module's JSON.
    """
    return name if name.isprintable() else repr(name)


def parse_json(data, name):
    try:
        return json.loads(data)
    except ValueError as exc:
        raise ManifestError("%s is not JSON (%s)" % (name, exc)) from None


def manifest_listing(data, company_id):
    """{"digest", "keys", "sizes": {file name: size}, "names", "body"} of a company manifest read from its layout alone, or None
    when it is not in the one-file-per-line layout or a name needs JSON unescaping (the caller parses it as JSON).

    What a manifest says is proven by the sha256 the top manifest lists for it; this only has to find the names
    and sizes, for depth=structure, without building a dictionary per file.
    """
    header, newline, body = data.partition(b"\n")
    if not newline or not header.endswith(b'"files":{') or not body.endswith(MANIFEST_FOOTER + b"\n"):
        return None
    try:
        document = json.loads(header + b"}}")
    except ValueError:
        return None
    if not isinstance(document, dict) or document.get("company_id") != company_id \
            or not isinstance(document.get("digest"), str) or not isinstance(document.get("keys"), int):
        return None
    body = body[:-len(MANIFEST_FOOTER) - 1]
    if body and not body.endswith(b"\n"):
        return None
    count = body.count(b"\n")
    names = []
    if count:
        # '"<name>":{...},' per line -> '"<name>' per line (C loops: a regular expression and bytes methods).
        quoted = MANIFEST_ENTRY_TAIL_RE.sub(b"", body)
        if not quoted.startswith(b'"') or quoted.count(b'"') != count or quoted.count(b'\n"') != count - 1 \
                or b"\\" in quoted or b"/" in quoted:
            return None
        try:
            names = quoted[1:-1].decode("utf-8").split('\n"')
        except UnicodeDecodeError:
            return None
    sizes = MANIFEST_SIZE_RE.findall(body)
    if len(sizes) != count or len(names) != count or body.count(b'"sha256":"') != count or body.count(b'","size":') != count:
        return None  # not every line has the fields of a file: JSON validation says which
    sizes = dict(zip(names, map(int, sizes)))
    if len(sizes) != count or sizes.keys() & {"", ".", ".."}:
        return None
    return {"company_id": company_id, "digest": document["digest"], "keys": document["keys"], "sizes": sizes,
            "names": names, "body": body}


def manifest_hashes(files):
    """{file name: sha256} of a company manifest's files (parsed as JSON)."""
    return {name: spec["sha256"] for name, spec in files.items()}


def listing_hashes(listing):
    """{file name: sha256} of a manifest_listing, built only when a file has to be hashed."""
    return dict(zip(listing["names"], (h.decode("ascii", "replace") for h in MANIFEST_SHA256_RE.findall(listing["body"]))))


class DriftReport:
    """What a tree holds that its manifests do not say: files added, changed and deleted, by company.

    Counts cover everything; names are kept for the first DRIFT_SHOWN files of the first MAX_SHOWN companies
    only, so a tree of a million drifted files costs no more memory than a clean one.
    """

    KINDS = ("added", "changed", "deleted")

    def __init__(self):
        self.counts = dict.fromkeys(self.KINDS, 0)
        self.companies = {}
        self.drifted_companies = 0
        self.extra_companies = []
        self.missing_companies = []
        self.other = []  # problems that are not files: manifests, markers, unreadable directories
        self.manifest = False

    def files(self, company_id, added=(), changed=(), deleted=()):
        """One company's drift: lists of shown file names, each sorted."""
        if not (added or changed or deleted):
            return
        self.drifted_companies += 1
        found = dict(zip(self.KINDS, (added, changed, deleted)))
        for kind, names in found.items():
            self.counts[kind] += len(names)
        if len(self.companies) < MAX_SHOWN:
            entry = {kind: list(names[:DRIFT_SHOWN]) for kind, names in found.items()}
            entry["counts"] = {kind: len(names) for kind, names in found.items()}
            self.companies[company_id] = entry

    def extra_company(self, name, files):
        """An entry of the tree that is no company of the manifest, holding files (counted as added)."""
        self.counts["added"] += files
        if len(self.extra_companies) < MAX_SHOWN:
            self.extra_companies.append(name)

    def missing_company(self, company_id, files):
        """A company of the manifest without its directory: its files count as deleted."""
        self.counts["deleted"] += files
        if len(self.missing_companies) < MAX_SHOWN:
            self.missing_companies.append(company_id)

    def examples(self, kind, limit=3):
        found = []
        for company_id, entry in self.companies.items():
            found.extend("%s%s/%s" % (COMPANY_PREFIX, company_id, name) for name in entry[kind][:limit - len(found)])
            if len(found) >= limit:
                break
        return found

    def reason(self, clean):
        if clean:
            return "the tree holds what its manifests list"
        parts, files = [], []
        for kind in self.KINDS:
            count = self.counts[kind]
            if count:
                noun = "" if files else (" file" if count == 1 else " files")
                examples = self.examples(kind)
                more = ", ..." if count > len(examples) and examples else ""
                files.append("%d%s %s%s" % (count, noun, kind, " (%s%s)" % (", ".join(examples), more) if examples else ""))
        if files:
            parts.append(", ".join(files))
        if self.extra_companies:
            parts.append("not companies of the manifest: %s" % ", ".join(self.extra_companies[:3]))
        if self.missing_companies:
            parts.append("companies of the manifest without a directory: %s" % ", ".join(self.missing_companies[:3]))
        parts.extend(self.other[:2])
        return "; ".join(parts)

    def summary(self, problem_count):
        """The dict tree_drift returns (see there)."""
        clean = problem_count == 0
        return {"clean": clean, "manifest": self.manifest, "added": self.counts["added"], "changed": self.counts["changed"],
                "deleted": self.counts["deleted"], "drifted_companies": self.drifted_companies, "companies": self.companies,
                "extra_companies": self.extra_companies, "missing_companies": self.missing_companies,
                "problems": self.other[:DRIFT_SHOWN], "reason": self.reason(clean)}


class Verifier:
    """A sessions tree against its manifest: read-only.

    depth "content" reads and hashes every file; depth "structure" checks the
    manifests (sha256 chain, format) and that each company directory holds
    exactly the regular files its manifest lists, each of the size listed,
    from one directory listing and one lstat per file; it hashes only the
    files modified since the top manifest was written (a service running on
    the files rewrites them in place with a plain writeFile: same size
    possible, new mtime). Seconds instead of minutes for a million files, for
    a failover that must not wait. It does not see a file changed in place
    whose mtime was set back before the manifest's.

    Every difference of files is also recorded in self.drift (a DriftReport),
    which tree_drift returns.
    """

    def __init__(self, path, recompute_digests=False, allow_extra=False, max_problems=100, depth="content",
                 changed_since_ns=None, companies=None, extras=True):
        if depth not in VERIFY_DEPTHS:
            raise SessionsError("depth must be one of %s, got %r" % (", ".join(VERIFY_DEPTHS), depth))
        if recompute_digests and depth != "content":
            raise SessionsError("recompute_digests reads every file: it needs depth=content, not depth=%s" % depth)
        self.path = path
        self.depth = depth
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
        self.drift = DriftReport()
        self.manifest_mtime_ns = None
        # depth=structure: files modified (mtime) or changed in any way (ctime, which no utime sets back) at or after
        # this instant are hashed, instead of those modified at or after the top manifest (a proof that a tree has not
        # moved since an earlier manifest: prove_tree).
        self.changed_since_ns = changed_since_ns
        # Only these companies of the manifest (None: all); extras=False leaves entries that are no company unreported.
        self.only = None if companies is None else set(companies)
        self.extras = extras

    def problem(self, text):
        self.problem_count += 1
        if len(self.problems) < self.max_problems:
            self.problems.append(text)

    def tree_problem(self, text):
        """A problem that is not a file's (manifests, markers, the tree itself): also the drift report's."""
        self.problem(text)
        if len(self.drift.other) < DRIFT_SHOWN:
            self.drift.other.append(text)

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
            self.tree_problem("%s does not exist" % self.path)
            return self._finish(result)
        if stat.S_ISLNK(info.st_mode):
            self.tree_problem("%s is a symbolic link: refused" % self.path)
            return self._finish(result)
        if not stat.S_ISDIR(info.st_mode):
            self.tree_problem("%s is not a directory" % self.path)
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
            self.tree_problem("no %s directory: the tree has no manifest" % META_DIR)
            return
        except SessionsError as exc:
            self.tree_problem(str(exc))
            return
        try:
            try:
                # Its mtime before its content: a manifest replaced in between can only make more files suspect.
                self.manifest_mtime_ns = os.stat(MANIFEST_NAME, dir_fd=meta_fd, follow_symlinks=False).st_mtime_ns
                data, top = read_json_at(meta_fd, MANIFEST_NAME)
                validate_top_manifest(top)
            except FileNotFoundError:
                self.tree_problem("%s/%s is missing: the tree is incomplete or was never finished" % (META_DIR, MANIFEST_NAME))
                return
            except (ManifestError, SessionsError, OSError) as exc:
                self.tree_problem("%s/%s: %s" % (META_DIR, MANIFEST_NAME, exc))
                return
            self.drift.manifest = True
            result.update(generation=top.get("generation"), created_at=top.get("created_at"), source=top.get("source"),
                          last_good_refresh=top.get("last_good_refresh"), age_seconds=age_of(top), mode=top.get("mode"),
                          manifest_counts=top.get("counts"))
            try:
                os.lstat(IN_PROGRESS_NAME, dir_fd=meta_fd)
                self.tree_problem("%s/%s exists: a refresh was interrupted (or is running); the tree is not a finished generation"
                                  % (META_DIR, IN_PROGRESS_NAME))
            except FileNotFoundError:
                pass
            try:
                companies_fd = open_dir(COMPANIES_DIR, meta_fd)
            except (FileNotFoundError, SessionsError) as exc:
                self.tree_problem("%s/%s: %s" % (META_DIR, COMPANIES_DIR, exc if isinstance(exc, SessionsError) else "missing"))
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
        extra = []  # as listed (the problem shows their repr)
        for name in os.listdir(root_fd):
            if name == META_DIR:
                continue
            info = os.lstat(name, dir_fd=root_fd)
            if stat.S_ISLNK(info.st_mode):
                if self.extras:
                    self.problem("%s is a symbolic link: refused" % shown_name(name))
                    self.drift.extra_company(shown_name(name), 1)
                continue
            if name.startswith(COMPANY_PREFIX) and stat.S_ISDIR(info.st_mode):
                company_id = name[len(COMPANY_PREFIX):]
                if company_id in listed:
                    on_disk.add(company_id)
                    continue
            if not self.extras:
                continue
            self.counts["extra_companies"] += 1
            if len(self.extra_companies) < self.max_problems:
                self.extra_companies.append(shown_name(name))
                extra.append(name)
            self.drift.extra_company(shown_name(name), self._entries(root_fd, name, info))
        if extra and not self.allow_extra:
            self.problem("%d entries of the tree are not companies of the manifest: %s"
                         % (self.counts["extra_companies"], ", ".join(repr(n) for n in extra[:MAX_SHOWN])))
        keys_total = 0
        for company_id in sorted(listed if self.only is None else self.only & listed.keys(), key=lambda c: c.encode("utf-8")):
            entry = listed[company_id]
            self.counts["companies"] += 1
            if company_id not in on_disk:
                self.problem("company %s: directory %s%s is missing" % (company_id, COMPANY_PREFIX, company_id))
                self.drift.missing_company(company_id, entry["files"] if isinstance(entry.get("files"), int) else 0)
                continue
            name = company_id + ".json"
            listing = None
            try:
                if self.depth == "structure":
                    data = read_regular(companies_fd, name)
                    listing = manifest_listing(data, company_id)
                    manifest = listing or parse_json(data, name)
                else:
                    data, manifest = read_json_at(companies_fd, name)
            except FileNotFoundError:
                self.tree_problem("company %s: its manifest is missing" % company_id)
                continue
            except (ManifestError, SessionsError, OSError) as exc:
                self.tree_problem("company %s: manifest unreadable: %s" % (company_id, exc))
                continue
            if sha256_bytes(data) != entry["manifest_sha256"]:
                self.tree_problem("company %s: its manifest's sha256 differs from the top manifest's (half-refreshed company)" % company_id)
                continue
            if listing is None:
                try:
                    validate_company_manifest(manifest, company_id)
                except ManifestError as exc:
                    self.tree_problem(str(exc))
                    continue
            if manifest.get("digest") != entry["digest"]:
                self.tree_problem("company %s: the digests of the top and company manifests differ" % company_id)
            if self.depth == "structure":
                if listing:
                    sizes, hashes = listing["sizes"], functools.partial(listing_hashes, listing)
                else:
                    sizes = {n: spec["size"] for n, spec in manifest["files"].items()}
                    hashes = functools.partial(manifest_hashes, manifest["files"])
                keys_total += self._company_structure(root_fd, company_id, manifest["digest"], sizes, hashes, result)
            else:
                keys_total += self._company(root_fd, company_id, manifest, entry, result)
        self.counts["keys"] = keys_total

    @staticmethod
    def _entries(root_fd, name, info):
        """Files an extra entry of the tree brings: a directory's entries (not followed, not descended), else 1."""
        if not stat.S_ISDIR(info.st_mode):
            return 1
        try:
            fd = open_dir(name, root_fd)
        except (OSError, SessionsError):
            return 1
        try:
            return len(os.listdir(fd))
        finally:
            os.close(fd)

    def _open_company(self, root_fd, company_id):
        """(directory name, fd) of a company directory with its mode checked, or (name, None) with the problem noted."""
        dir_name = COMPANY_PREFIX + company_id
        try:
            dir_fd = open_dir(dir_name, root_fd)
        except SessionsError as exc:
            self.tree_problem("company %s: %s" % (company_id, exc))
            return dir_name, None
        try:
            self._perm(dir_name, os.fstat(dir_fd), DIR_MODE)
        except BaseException:
            os.close(dir_fd)
            raise
        return dir_name, dir_fd

    def _extra_files(self, company_id, dir_name, extra):
        for name in extra:
            self.counts["extra_files"] += 1
            if len(self.extra_files) < self.max_problems:
                self.extra_files.append("%s/%s" % (dir_name, name))
            if not self.allow_extra:
                self.problem("company %s: %s is not in the manifest" % (company_id, name))

    def _company(self, root_fd, company_id, manifest, entry, result):
        dir_name, dir_fd = self._open_company(root_fd, company_id)
        if dir_fd is None:
            return 0
        try:
            files = manifest["files"]
            names = set(os.listdir(dir_fd))
            creds = None
            values = []
            missing, changed = [], []
            ok = True
            for name, spec in files.items():
                if name not in names:
                    self.counts["missing_files"] += 1
                    self.problem("company %s: %s is missing" % (company_id, shown_name(name)))
                    missing.append(shown_name(name))
                    ok = False
                    continue
                try:
                    data = read_regular(dir_fd, name)
                    info = os.lstat(name, dir_fd=dir_fd)
                except (OSError, SessionsError) as exc:
                    reason = "a symbolic link: refused" if isinstance(exc, OSError) and exc.errno == errno.ELOOP else exc
                    self.problem("company %s: %s is %s" % (company_id, shown_name(name), reason))
                    changed.append(shown_name(name))
                    ok = False
                    continue
                self.counts["files"] += 1
                self.counts["bytes"] += len(data)
                self._perm("%s/%s" % (dir_name, shown_name(name)), info, FILE_MODE)
                if len(data) != spec["size"] or sha256_bytes(data) != spec["sha256"]:
                    self.counts["mismatched_files"] += 1
                    self.problem("company %s: %s differs from its manifest (size %d, expected %d)"
                                 % (company_id, shown_name(name), len(data), spec["size"]))
                    changed.append(shown_name(name))
                    ok = False
                    continue
                if self.recompute:
                    try:
                        value = json.loads(data)
                    except VALUE_ERRORS as exc:
                        self.problem("company %s: %s cannot be read as JSON (%s)" % (company_id, shown_name(name), str(exc)[:200]))
                        ok = False
                        continue
                    if name == CREDS_FILE:
                        creds = value
                    else:
                        values.append((spec["type"], spec["id"], value))
            extra = sorted(shown_name(name) for name in names - set(files))
            self._extra_files(company_id, dir_name, extra)
            self.drift.files(company_id, extra, sorted(changed), sorted(missing))
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

    def _company_structure(self, root_fd, company_id, digest, sizes, hashes, result):
        """The company directory against its manifest from one listing and one lstat per listed file.

        os.scandir gives each entry's type from the directory itself: a symbolic
        link or anything but a regular file under a listed name is a problem, as
        with depth=content, and is never followed or opened. A listed regular
        file of another size differs; one of the listed size modified at or
        after the top manifest's mtime (same tick included: timestamps are
        coarse) is read and hashed (hashes() gives the manifest's sha256s), so
        a clean tree written before its manifest costs no read at all.
        """
        dir_name, dir_fd = self._open_company(root_fd, company_id)
        if dir_fd is None:
            return 0
        try:
            with os.scandir(dir_fd) as listing:
                entries = list(listing)
            names = {item.name for item in entries}
            # Set operations and comprehensions: a million entries in C loops, not Python statements.
            odd = {item.name: "a symbolic link: refused" if item.is_symlink() else "not a regular file"
                   for item in entries if item.name in sizes and not item.is_file(follow_symlinks=False)}
            del entries
            missing = sizes.keys() - names
            changed = {}  # name -> (size on disk or None, why)
            suspect = []
            since = self.manifest_mtime_ns if self.changed_since_ns is None else self.changed_since_ns
            ctime = self.changed_since_ns is not None
            lstat_at = functools.partial(os.stat, dir_fd=dir_fd, follow_symlinks=False)
            for name in (sizes.keys() & names) - odd.keys():
                try:
                    info = lstat_at(name)
                except FileNotFoundError:  # deleted since the listing
                    missing.add(name)
                    continue
                if not stat.S_ISREG(info.st_mode):
                    odd[name] = "a symbolic link: refused" if stat.S_ISLNK(info.st_mode) else "not a regular file"
                elif info.st_size != sizes[name]:
                    changed[name] = info.st_size
                elif since is None or info.st_mtime_ns >= since or (ctime and info.st_ctime_ns >= since):
                    suspect.append(name)
            if suspect:
                expected = hashes()
                for name in suspect:
                    try:
                        data = read_regular(dir_fd, name)
                    except FileNotFoundError:
                        missing.add(name)
                        continue
                    except (OSError, SessionsError) as exc:
                        odd[name] = "a symbolic link: refused" if isinstance(exc, OSError) and exc.errno == errno.ELOOP else exc
                        continue
                    if sha256_bytes(data) != expected.get(name):
                        changed[name] = len(data)
            for name in sorted(odd.keys() | changed.keys()):
                if name in odd:
                    self.problem("company %s: %s is %s" % (company_id, shown_name(name), odd[name]))
                else:
                    self.counts["mismatched_files"] += 1
                    self.problem("company %s: %s differs from its manifest (size %d, expected %d)"
                                 % (company_id, shown_name(name), changed[name], sizes[name]))
            missing = sorted(missing)
            for name in missing:
                self.counts["missing_files"] += 1
                self.problem("company %s: %s is missing" % (company_id, shown_name(name)))
            extra = sorted(shown_name(name) for name in names - sizes.keys())
            self._extra_files(company_id, dir_name, extra)
            self.drift.files(company_id, extra, sorted(shown_name(n) for n in odd.keys() | changed.keys()),
                             [shown_name(n) for n in missing])
            present = sizes.keys() & names
            gone = odd.keys() | (present & set(missing))
            self.counts["files"] += len(present) - len(gone)
            self.counts["bytes"] += sum(sizes[name] for name in present) - sum(sizes[name] for name in gone)
            result["digests"][company_id] = digest
            return len(sizes) - (1 if CREDS_FILE in sizes else 0)
        finally:
            os.close(dir_fd)

    def _finish(self, result):
        result.update(problems=self.problems, problem_count=self.problem_count, extra_files=self.extra_files,
                      extra_companies=self.extra_companies, permissions=self.permissions, counts=self.counts,
                      verified=self.problem_count == 0, recomputed=self.recompute, depth=self.depth)
        return result


# -- drift: what a service running on the files did to a tree --------------------------------------


def tree_drift(path, lock_timeout=None):
    """How the sessions tree at path differs from its own manifests: what a service running on the files did to it.

    The rules of baileys_sessions_verify depth=structure (one implementation, Verifier): a file on disk that no
    manifest lists is added; a listed file that is absent is deleted; a listed file that is not a regular file, or
    whose size differs, or that was modified at or after the top manifest's own mtime and whose sha256 differs
    from the manifest's, is changed. Symbolic links, sub-directories and hostile names are reported, never
    followed. One company's listing at a time: one scandir per company, one lstat per file, a read only of the
    files modified since the manifest.

    Read-only. Takes no lock unless lock_timeout is given (a shared ParentLock): a caller that writes the tree
    holds the exclusive one already.

    Returns {"clean": bool, "manifest": bool (a top manifest was read), "added": n, "changed": n, "deleted": n,
    "drifted_companies": n, "companies": {id: {"added": [names], "changed": [...], "deleted": [...], "counts":
    {...}}} (drifted companies only, at most MAX_SHOWN, DRIFT_SHOWN names each), "extra_companies": [entries of the
    tree that are no company of the manifest, their files counted as added], "missing_companies": [ids, their files
    counted as deleted], "problems": [the first problems that are not files: manifests, markers], "reason": one line}.
    A tree without a manifest, or with manifests that do not chain, is not clean.
    """
    path = os.path.normpath(path)
    verifier = Verifier(path, depth="structure", max_problems=MAX_SHOWN)
    try:
        if lock_timeout is None or not os.path.isdir(os.path.dirname(path)):
            verifier.run()
        else:
            with ParentLock(os.path.dirname(path), exclusive=False, timeout=lock_timeout):
                verifier.run()
    except (OSError, SessionsError) as exc:
        # After a swap the tree is only reported on: a tree that cannot be read is not clean, and says why.
        verifier.tree_problem("%s cannot be read: %s" % (path, exc))
    return verifier.drift.summary(verifier.problem_count)


# prove_tree: companies per task handed to a worker, and the fewest companies worth forking for.
PROOF_CHUNK_COMPANIES = 50
PROOF_PARALLEL_MIN_COMPANIES = 100


def _prove_chunk(path, changed_since_ns, companies, extras):
    verifier = Verifier(path, depth="structure", max_problems=MAX_SHOWN, changed_since_ns=changed_since_ns,
                        companies=companies, extras=extras)
    try:
        verifier.run()
    except (OSError, SessionsError) as exc:
        verifier.tree_problem("%s cannot be read: %s" % (path, exc))
    return verifier.drift.summary(verifier.problem_count), verifier.problem_count


def merge_drift(parts):
    """One tree_drift summary of [(summary, problem count)] of disjoint sets of companies of one tree."""
    report, problems = DriftReport(), 0
    report.manifest = bool(parts) and all(summary["manifest"] for summary, _count in parts)
    for summary, count in parts:
        problems += count
        for kind in DriftReport.KINDS:
            report.counts[kind] += summary[kind]
        report.drifted_companies += summary["drifted_companies"]
        for company_id, entry in summary["companies"].items():
            if len(report.companies) < MAX_SHOWN:
                report.companies[company_id] = entry
        for field, limit in (("extra_companies", MAX_SHOWN), ("missing_companies", MAX_SHOWN)):
            shown = getattr(report, field)
            shown.extend(name for name in summary[field] if name not in shown)
            del shown[limit:]
        report.other.extend(problem for problem in summary["problems"] if problem not in report.other)
        del report.other[DRIFT_SHOWN:]
    return report.summary(problems)


def prove_tree(path, changed_since_ns=None, workers=None, beside=None):
    """tree_drift(path) as the proof of a switch: a file modified (mtime) or changed at all (ctime) at or after
    changed_since_ns is read and hashed (default: the top manifest's own mtime, as tree_drift), so that a file
    edited in place in a tree since it was last proven (changed_since_ns: that proof's manifest mtime) is caught
    even when a later refresh rewrote the top manifest without reading the file.

    A large tree (PROOF_PARALLEL_MIN_COMPANIES companies or more) is walked by forked worker processes, a chunk of
    companies at a time (one listing and one lstat per file is kernel time: every core helps). beside(), when given,
    runs in this process while they walk (after the fork) and its result is returned with the drift:
    (tree_drift summary, beside's result or None). Read-only; takes no lock (the caller holds it or owns the tree).
    """
    path = os.path.normpath(path)
    count = export_workers() if workers is None else workers
    companies = None
    try:
        root_fd = open_dir(path)
        try:
            companies = sorted(load_top_manifest(root_fd)[1]["companies"], key=lambda c: c.encode("utf-8"))
        finally:
            os.close(root_fd)
    except (OSError, SessionsError):
        pass  # the single walk below says what is wrong
    if companies is None or count < 2 or len(companies) < PROOF_PARALLEL_MIN_COMPANIES:
        drift = _prove_chunk(path, changed_since_ns, None, True)
        return merge_drift([drift]), (beside() if beside is not None else None)
    chunks = [companies[i:i + PROOF_CHUNK_COMPANIES] for i in range(0, len(companies), PROOF_CHUNK_COMPANIES)]
    with Workers(count, "a proof worker") as pool:
        pool.start(lambda: None, lambda _state, position: _prove_chunk(path, changed_since_ns, chunks[position], position == 0))
        # After the fork: a thread of beside() is never copied into a worker.
        waiting = in_thread(beside) if beside is not None else None
        try:
            results = pool.map(list(range(len(chunks))))
            pool.finish()
        except BaseException:
            if waiting is not None:
                try:
                    waiting()  # not left running behind the error
                except Exception:  # noqa: BLE001 - the walk's error is the one raised
                    pass
            raise
    return merge_drift([results[i] for i in range(len(chunks))]), (waiting() if waiting is not None else None)


def drift_files(drift):
    """Files a service added, changed or deleted in a tree (0 for None)."""
    return drift["added"] + drift["changed"] + drift["deleted"] if drift else 0


def drift_warning(drift, kept):
    """The warning a module gives when the tree it replaced (now at kept) is not what its manifests say, else None."""
    if drift is None or drift["clean"]:
        return None
    if drift_files(drift):
        return ("the replaced tree held %d files the service wrote that the database never received (%d added, %d changed, "
                "and %d deleted by it; kept in %s)" % (drift["added"] + drift["changed"], drift["added"], drift["changed"],
                                                       drift["deleted"], kept))
    return "the replaced tree does not match its manifests (%s): what a service wrote into it cannot be told (kept in %s)" % (
        drift["reason"], kept)


def swap_in_tree(src, dest, backup=None, backup_dir=None, keep_backup=True, lock_timeout=None):
    """Make the tree src the tree at dest (one atomic exchange, baileys_dr_fs.swap_in) and say what the replaced tree held.

    The replaced tree goes to backup (default <backup_dir or parent of dest>/<name>.before-<UTC time>) and is
    compared with its manifests there (tree_drift). It is removed only when keep_backup is false and it held exactly
    what its manifests list: a tree a service wrote into, or one without a usable manifest, may hold state the
    database never received, and is never deleted. src, dest and backup must be on one file system.

    The caller holds ParentLock(parent of dest) unless lock_timeout is given (then this takes it, exclusive).
    Returns {"backup": path of the kept tree or None, "replaced_drift": tree_drift() of the replaced tree (None when
    dest did not exist), "warning": drift_warning() or None}.
    """
    if lock_timeout is not None:
        with ParentLock(os.path.dirname(os.path.abspath(dest)), exclusive=True, timeout=lock_timeout):
            return swap_in_tree(src, dest, backup, backup_dir, keep_backup)
    if backup is None and os.path.lexists(dest):
        backup = backup_path(dest, backup_dir, utc_now())
    kept = swap_in(src, dest, backup)
    if kept is None:
        return {"backup": None, "replaced_drift": None, "warning": None}
    drift = tree_drift(kept)
    if drift["clean"] and not keep_backup:
        shutil.rmtree(kept)
        return {"backup": None, "replaced_drift": drift, "warning": None}
    return {"backup": kept, "replaced_drift": drift, "warning": drift_warning(drift, kept)}


def export_tree(params, connect, target, owner, check_mode, observe=None):
    """Entry point of baileys_auth_export. observe (a dict), when given, receives "source": what Snapshot.begin read
    of the server (its txid snapshot included) for a caller that proves the copy afterwards (baileys_dr_switch)."""
    previous = os.umask(0o077)  # files 0600, directories 0700, whatever mode a create asks for
    try:
        engine = (Refresher if params["mode"] == "standby" else Exporter)(params, connect, target, owner, check_mode)
        try:
            return engine.run()
        finally:
            if observe is not None:
                observe["source"] = engine.source_meta
    finally:
        os.umask(previous)


def standby_refusal(path):
    """Read-only view of a standby copy for health: {"exists", "generation", "last_good_refresh", "snapshot_at",
    "refused": the refresh-refused.json document or None, "error": why it could not be read, or None}.

    No lock is taken (health must not wait behind a refresh) and no symbolic link is followed.
    """
    state = {"exists": False, "generation": None, "last_good_refresh": None, "snapshot_at": None, "refused": None, "error": None}
    try:
        root_fd = open_dir(os.path.normpath(path))
    except FileNotFoundError:
        return state
    except (OSError, SessionsError) as exc:
        state.update(exists=True, error=str(exc))
        return state
    state["exists"] = True
    try:
        try:
            _data, top = load_top_manifest(root_fd)
            state.update(generation=top.get("generation"), last_good_refresh=top.get("last_good_refresh"),
                         snapshot_at=(top.get("source") or {}).get("snapshot_at"))
        except FileNotFoundError:
            pass
        except (OSError, SessionsError) as exc:
            state["error"] = "its manifest cannot be read: %s" % exc
        meta_fd = open_dir(META_DIR, root_fd)
    except FileNotFoundError:
        return state
    except (OSError, SessionsError) as exc:
        state["error"] = "%s cannot be read: %s" % (META_DIR, exc)
        return state
    finally:
        os.close(root_fd)
    try:
        _data, state["refused"] = read_json_at(meta_fd, REFUSED_NAME, limit=1 << 20)
    except FileNotFoundError:
        pass
    except (OSError, SessionsError) as exc:
        # A record that exists but cannot be read still says a refresh was refused.
        state["refused"] = {"reasons": ["%s exists but cannot be read: %s" % (REFUSED_NAME, exc)]}
    finally:
        os.close(meta_fd)
    if not isinstance(state["refused"], (dict, type(None))):
        state["refused"] = {"reasons": ["%s is not a JSON object" % REFUSED_NAME]}
    return state


def verify_tree(path, recompute_digests=False, allow_extra=False, max_problems=100, lock_timeout=300, depth="content"):
    """Entry point of baileys_sessions_verify."""
    path = os.path.normpath(path)
    parent = os.path.dirname(path)
    verifier = Verifier(path, recompute_digests, allow_extra, max_problems, depth)
    if not os.path.isdir(parent):
        verifier.problem("the parent directory %s does not exist" % parent)
        return verifier._finish({"path": path, "verified": False, "digests": {}})
    with ParentLock(parent, exclusive=False, timeout=lock_timeout):
        return verifier.run()


def auth_export_argument_spec():
    """The options of baileys_auth_export, connection options included (a new dict per call)."""
    argument_spec = postgres_argument_spec()
    argument_spec.update(
        mode=dict(type="str", choices=["live", "standby"], default="live"),
        dest=dict(type="path", required=True),
        companies=dict(type="list", elements="str"),
        unknown_types=dict(type="str", choices=["fail", "skip"], default="fail"),
        backup_dir=dict(type="path"),
        keep_backup=dict(type="bool", default=True),
        owner=dict(type="str"),
        group=dict(type="str"),
        space_margin=dict(type="float", default=1.5),
        force=dict(type="bool", default=False),
        return_digests=dict(type="bool", default=False),
        lock_timeout=dict(type="int", default=300),
        archive_dir=dict(type="path"),
        archive_keep=dict(type="int", default=4),
        archive_every=dict(type="int", default=3600),
        max_delete_share=dict(type="float", default=0.1),
        max_company_keys_removed=dict(type="int", default=10),
        replace_foreign=dict(type="bool", default=False),
        identity_force_companies=dict(type="list", elements="str", default=[]),
        app_root=dict(type="path"),
    )
    return argument_spec
