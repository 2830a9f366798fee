# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The files of one company as a failback's bulk pass imported them: what lets the delta pass read only changed files.

A bulk pass (baileys_auth_import pass_record=...) writes, beside its pass record, one *pass files* record per company
it committed or found equal: every file's stat as listed before it was read (inode, size, mtime in ns), in digest
order, and the company's state digest lines (the input of its digest, whose sha256 is the digest). The pass record
holds the sha256 of each, so a damaged one is refused (the company is then imported whole).

The delta pass, service stopped, lists the company directory and reads only the files whose stat differs from the
recorded one (or that are new, or were written within the racy window of the bulk listing); files gone are rows to
delete. The rows of the other keys are the bulk pass's, proven by the company's row fingerprint; their digest lines
are the recorded ones. The company's digest is computed from the recorded lines with the changed ones spliced in:
the same digest a full read gives, without parsing 1,500 files per company.

Layout (bytes, every line ends in a newline; JSON escapes every control character, so no field holds a raw tab or
newline):
    line 1          {"format":1,"kind":"baileys-dr-pass-files","company":ID,"keys":N,"creds":[ino,size,mtime]|null}
    N lines         <type> TAB <id as JSON> TAB <file name as JSON> TAB <ino> TAB <size> TAB <mtime_ns>
    N + 2 lines     the digest lines (header line, creds line, one line per key in the same order)
A stat of -1 -1 -1 marks a file not provable from the listing (written within the racy window, or changed while read).
"""

from __future__ import annotations

import hashlib
import json
import os

from ansible.module_utils.baileys_dr_codec import sort_key
from ansible.module_utils.baileys_dr_fs import write_file_atomic
from ansible.module_utils.baileys_dr_sessions import HEADER_LINE, SessionsError, split_digest_lines

FORMAT = 1
KIND = "baileys-dr-pass-files"
UNPROVEN = (-1, -1, -1)
MAX_BYTES = 1 << 30

# A file written twice within one tick of the file system's clock keeps its size and mtime: a listing taken between
# the two writes cannot tell (git's "racy clean" case). A stat is only trusted when the file is older than this window
# before the listing (the kernel stamps files with a clock that lags the wall clock by up to a tick, a few ms); a
# directory whose every mtime is a whole second (a file system or copy of 1-2 s granularity) gets the wider one.
RACY_NS = 100 * 1000 * 1000
RACY_COARSE_NS = 2 * 1000 * 1000 * 1000


class PassFilesError(SessionsError):
    """A pass files record that cannot be used (the company is imported whole)."""


def racy_limit(stats, observed_ns):
    """The mtime (ns) from which a file of a listing taken at observed_ns may have been written twice unseen; stats are
    {name: (inode, size, mtime_ns, ...)}."""
    coarse = not any(entry[2] % 1000000000 for entry in stats.values())
    return observed_ns - (RACY_COARSE_NS if coarse else RACY_NS)


def directory_path(pass_record):
    """The directory of a pass record's per-company records."""
    return pass_record + ".files"


def company_path(pass_record, company_id):
    return os.path.join(directory_path(pass_record), company_id + ".tsv")


def _stat_of(name, listing, read_stats, limit):
    """The stat to record for a file: the listing's, when the read saw the same and it is outside the racy window."""
    listed = listing.get(name)
    if listed is None or read_stats.get(name) != listed or listed[2] >= limit:
        return UNPROVEN
    return tuple(listed[:3])


def encode(company_id, keys, creds_name, listing, read_stats, observed_ns, lines):
    """The record's bytes. keys: [(type, id, file name)] in digest order; lines: the DigestLines data of those keys
    (header, creds line, one line per key); listing: the directory's stats before the read; read_stats: each file's
    stat when read."""
    limit = racy_limit(listing, observed_ns)
    creds = list(_stat_of(creds_name, listing, read_stats, limit)) if creds_name else None
    header = {"format": FORMAT, "kind": KIND, "company": company_id, "keys": len(keys), "creds": creds}
    out = [json.dumps(header, separators=(",", ":")).encode("utf-8"), b"\n"]
    for key_type, key_id, name in keys:
        ino, size, mtime = _stat_of(name, listing, read_stats, limit)
        out.append(("%s\t%s\t%s\t%d\t%d\t%d\n" % (key_type, json.dumps(key_id), json.dumps(name), ino, size, mtime)).encode("utf-8"))
    out.append(lines)
    return b"".join(out)


def write(pass_record, company_id, data):
    """Write a company's record atomically (0600, in a 0700 directory); returns its sha256."""
    os.makedirs(directory_path(pass_record), mode=0o700, exist_ok=True)
    write_file_atomic(company_path(pass_record, company_id), data, mode=0o600)
    return hashlib.sha256(data).hexdigest()


def remove_others(pass_record, company_ids):
    """Remove the records of companies not in company_ids (an earlier bulk pass's); errors ignored."""
    keep = {company_id + ".tsv" for company_id in company_ids}
    try:
        names = os.listdir(directory_path(pass_record))
    except OSError:
        return
    for name in names:
        if name not in keep:
            try:
                os.unlink(os.path.join(directory_path(pass_record), name))
            except OSError:
                pass


def _json_string(field):
    """A JSON string field: sliced when it holds no escape (the common case, 1,500 of them per company), else parsed."""
    if len(field) >= 2 and field[0] == '"' and field[-1] == '"' and "\\" not in field:
        return field[1:-1]
    value = json.loads(field)
    if not isinstance(value, str):
        raise ValueError("not a string")
    return value


class PassFiles:
    """A company's pass files record, loaded and checked (sha256 from the pass record, digest from the lines)."""

    def __init__(self, company_id, data, sha256, digest):
        if hashlib.sha256(data).hexdigest() != sha256:
            raise PassFilesError("its pass files record does not match the pass record's checksum")
        first, newline, rest = data.partition(b"\n")
        try:
            header = json.loads(first) if newline else None
        except ValueError:
            header = None
        if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("kind") != KIND \
                or header.get("company") != company_id or not isinstance(header.get("keys"), int):
            raise PassFilesError("its pass files record is not a format %d record of this company" % FORMAT)
        count = header["keys"]
        parts = rest.split(b"\n", count)
        if len(parts) != count + 1:
            raise PassFilesError("its pass files record is truncated")
        lines = split_digest_lines(parts[count])
        if lines is None or len(lines) != count + 2 or lines[0] != HEADER_LINE:
            raise PassFilesError("its pass files record's digest lines do not match its files")
        if hashlib.sha256(parts[count]).hexdigest() != digest:
            raise PassFilesError("its pass files record's digest lines do not give the company's digest")
        self.company_id = company_id
        self.digest = digest
        self.creds_stat = tuple(header["creds"]) if header.get("creds") else None
        self.creds_line = lines[1]
        self.keys = []  # (type, id) in digest order
        self.by_name = {}  # file name -> (position, (ino, size, mtime_ns))
        for position, row in enumerate(parts[:count]):
            fields = row.decode("utf-8", "surrogateescape").split("\t")
            if len(fields) != 6:
                raise PassFilesError("its pass files record has a damaged line")
            try:
                key_id, name = _json_string(fields[1]), _json_string(fields[2])
                stat_ = (int(fields[3]), int(fields[4]), int(fields[5]))
            except ValueError:
                raise PassFilesError("its pass files record has a damaged line") from None
            self.keys.append((fields[0], key_id))
            self.by_name[name] = (position, stat_)
        if len(self.by_name) != count:
            raise PassFilesError("its pass files record names a file twice")
        self.key_lines = lines[2:]
        self.fingerprint = None  # the company's row fingerprint the pass record holds with it (set by the caller)

    @classmethod
    def load(cls, pass_record, company_id, sha256, digest):
        path = company_path(pass_record, company_id)
        try:
            with open(path, "rb") as fh:
                data = fh.read(MAX_BYTES + 1)
        except OSError as exc:
            raise PassFilesError("its pass files record %s cannot be read (%s)" % (path, exc.strerror)) from None
        if len(data) > MAX_BYTES:
            raise PassFilesError("its pass files record %s is too large" % path)
        return cls(company_id, data, sha256, digest)

    def carried(self, name, stat_):
        """The record position of the file name when it has the recorded (provable) stat, so its content is the one the
        bulk pass imported; else None."""
        recorded = self.by_name.get(name)
        if recorded is None or recorded[1] == UNPROVEN or recorded[1] != tuple(stat_[:3]):
            return None
        return recorded[0]

    def creds_unchanged(self, stat_):
        return self.creds_stat is not None and self.creds_stat != UNPROVEN and self.creds_stat == tuple(stat_[:3])

    def spliced(self, carried, changed):
        """The key lines of the company in digest order: the recorded line of every carried key (positions in the record,
        ascending), the given line of every changed one ({(type, id): line}). The carried lines are in digest order
        already: each changed line is merged in by a binary search over them (sort keys of a few entries only)."""
        keys, recorded = self.keys, self.key_lines
        out = []
        start = 0
        for key, line in sorted(changed.items(), key=lambda item: sort_key(*item[0])):
            wanted = sort_key(*key)
            low, high = start, len(carried)
            while low < high:
                middle = (low + high) // 2
                if sort_key(*keys[carried[middle]]) < wanted:
                    low = middle + 1
                else:
                    high = middle
            out.extend(recorded[position] for position in carried[start:low])
            if low < len(carried) and keys[carried[low]] == key:
                raise PassFilesError("the key %s %r is both carried and changed" % key)
            out.append(line)
            start = low
        out.extend(recorded[position] for position in carried[start:])
        return out
