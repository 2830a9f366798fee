# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The sessions tree's contract: its names, errors, times, hostile input, and the bytes of a file and of its digest line.

Contract: docs/architecture.md, "The sessions tree and its manifest (format 1)".

    <dest>/company_<id>/creds.json, <type>-<fixFileName(id)>.json   what Baileys reads
    <dest>/.baileys-dr/manifest.json                                 written last: the proof
    <dest>/.baileys-dr/companies/<id>.json                           one manifest per company
    <dest>/.baileys-dr/digest-lines/<id>.lines                       standby only: the digest input

What every other part of the tree's code shares, without touching the disk or the database: the names and modes
above, the errors (messages safe to show), the times the manifests write, the test-only fault hooks, the checks that
refuse a row that cannot become a Baileys file, and the bytes of a file and of its line of the state digest.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import time

from ansible.module_utils.baileys_dr_codec import (
    COMPANY_ID_RE, DIGEST_HEADER, KEY_TYPES, VALUE_ERRORS, canonical_json, creds_shape_problems, key_file_name,
    key_forms, key_line_text, row_name, sort_key, to_base64_form, value_problem,
)

FORMAT = 1
KIND = "baileys-dr-sessions"
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
MAX_SHOWN = 20
TMP_PREFIX = ".bdr-tmp-"
# Control characters (Unicode category Cc): C0, DEL and C1.
CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f]")
TEST_PAUSE_ENV = "BAILEYS_DR_TEST_PAUSE_AT"
TEST_PAUSE_SECONDS_ENV = "BAILEYS_DR_TEST_PAUSE_SECONDS"
TEST_FAIL_ENV = "BAILEYS_DR_TEST_FAIL_AT"
# With a pause: a file whose creation ends the pause early (the test releases the module when it has seen what it
# needs; the seconds stay the upper bound).
TEST_RELEASE_ENV = "BAILEYS_DR_TEST_PAUSE_UNTIL"


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


def age_of(top):
    moment = parse_iso(top.get("last_good_refresh") or top.get("created_at"))
    if moment is None:
        return None
    return round((utc_now() - moment).total_seconds(), 3)


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


# -- JSON documents and their sha256 ----------------------------------------------------


def encode_json(document):
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sha256_bytes(data):
    return hashlib.sha256(data).hexdigest()
