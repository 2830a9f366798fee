# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""One key file of a sessions tree: its bytes read (no link followed), parsed and checked, the value to store and
its digest line; a company's files.
"""

from __future__ import annotations

import json
import os
import re
import stat

from ansible.module_utils.baileys_dr_codec import (
    VALUE_ERRORS,
    creds_shape_problems,
    decode_base64,
    key_name,
    nesting_problem,
    to_array_form,
    to_base64_form,
    value_problem,
)
from ansible.module_utils.baileys_dr_files import check_dest, READ_FLAGS
from ansible.module_utils.baileys_dr_tree import creds_line, key_line, SessionsError, sha256_bytes
from ansible.module_utils.baileys_dr_failback_errors import CompanyRefused, FailbackError, FileProblem


MAX_FILE_BYTES = 64 << 20
BOM = b"\xef\xbb\xbf"

# One encoder for every compact dump (json.dumps with these options would build a new one per call); same output.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def dumps(value):
    return _ENCODER.encode(value)


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
