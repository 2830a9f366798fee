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

import ctypes
import hashlib
import json
import os
import struct

from ansible.module_utils.baileys_dr_codec import sort_key
from ansible.module_utils.baileys_dr_fs import write_file_atomic
from ansible.module_utils.baileys_dr_tree import HEADER_LINE, SessionsError

FORMAT = 1
KIND = "baileys-dr-pass-files"
UNPROVEN = (-1, -1, -1)
STAT_TEXT = "%d\t%d\t%d"
UNPROVEN_TEXT = STAT_TEXT % UNPROVEN
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


class _Keys:
    """The (type, id) of each line of a record, parsed when asked for."""

    __slots__ = ("rows",)

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, position):
        fields = self.rows[position].split("\t", 2)
        try:
            return fields[0], _json_string(fields[1])
        except ValueError:
            raise PassFilesError("its pass files record has a damaged line") from None

    def __iter__(self):
        return (self[position] for position in range(len(self.rows)))


class _Lines:
    """The digest lines of a record's keys, each with its newline (added when asked for)."""

    __slots__ = ("lines", "offset")

    def __init__(self, lines, offset):
        self.lines, self.offset = lines, offset

    def __len__(self):
        return len(self.lines) - self.offset

    def __getitem__(self, position):
        if position < 0:
            raise IndexError(position)
        return self.lines[position + self.offset] + b"\n"


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
        # The digest lines split without their newlines (no copy of each): _Lines adds it back to the few asked for.
        block = parts[count]
        lines = block[:-1].split(b"\n") if block.endswith(b"\n") else None
        if lines is None or len(lines) != count + 2 or lines[0] + b"\n" != HEADER_LINE:
            raise PassFilesError("its pass files record's digest lines do not match its files")
        if hashlib.sha256(parts[count]).hexdigest() != digest:
            raise PassFilesError("its pass files record's digest lines do not give the company's digest")
        self.company_id = company_id
        self.digest = digest
        self.creds_stat = tuple(header["creds"]) if header.get("creds") else None
        self.creds_line = lines[1] + b"\n"
        # The file lines decoded at once and split in C; each only as far as the name (the id parsed when asked for, the
        # stat kept as its text, compared with the listing's as text): a delta pass loads a record per changed company.
        block = rest[:len(rest) - len(parts[count])].decode("utf-8", "surrogateescape")
        rows = block.split("\n")[:count]
        self.keys = _Keys(rows)  # (type, id) in digest order
        self.by_name = {}  # file name -> (position, "<ino>\t<size>\t<mtime_ns>")
        try:
            for position, row in enumerate(rows):
                fields = row.split("\t", 3)
                if len(fields) != 4:
                    raise ValueError("damaged")
                self.by_name[_json_string(fields[2])] = (position, fields[3])
        except ValueError:
            raise PassFilesError("its pass files record has a damaged line") from None
        if len(self.by_name) != count:
            raise PassFilesError("its pass files record names a file twice")
        self._lines = lines  # without newlines: header, creds, then one per key
        self.key_lines = _Lines(lines, 2)
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
        if recorded is None or recorded[1] == UNPROVEN_TEXT or recorded[1] != STAT_TEXT % tuple(stat_[:3]):
            return None
        return recorded[0]

    def position_of(self, key):
        """The record position of the (type, id) key, or None: a binary search over the lines (in digest order)."""
        wanted = sort_key(*key)
        low, high = 0, len(self.keys)
        while low < high:
            middle = (low + high) // 2
            if sort_key(*self.keys[middle]) < wanted:
                low = middle + 1
            else:
                high = middle
        return low if low < len(self.keys) and self.keys[low] == key else None

    def creds_unchanged(self, stat_):
        return self.creds_stat is not None and self.creds_stat != UNPROVEN and self.creds_stat == tuple(stat_[:3])

    def _merged(self, carried, changed):
        """In digest order: ("carried", positions) runs of carried keys (positions in the record, ascending) and
        ("changed", line) of every changed key ({(type, id): line}). The carried lines are in digest order already: each
        changed line is merged in by a binary search over them (sort keys of a few entries only)."""
        keys = self.keys
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
            yield "carried", carried[start:low]
            if low < len(carried) and keys[carried[low]] == key:
                raise PassFilesError("the key %s %r is both carried and changed" % key)
            yield "changed", line
            start = low
        yield "carried", carried[start:]

    def spliced(self, carried, changed):
        """The key lines of the company in digest order: the recorded line of every carried key, the given line of every
        changed one (_merged)."""
        out = []
        for kind, item in self._merged(carried, changed):
            if kind == "changed":
                out.append(item)
            else:
                out.extend(self.key_lines[position] for position in item)
        return out

    def spliced_digest(self, creds_line, carried, changed):
        """sha256 (hex) of the header line, creds_line and spliced(carried, changed): the carried lines hashed a run at a
        time, joined from the record's lines (a slice when the run has no gap), none of them copied one by one."""
        digest = hashlib.sha256(HEADER_LINE)
        digest.update(creds_line)
        lines = self._lines
        for kind, item in self._merged(carried, changed):
            if kind == "changed":
                digest.update(item)
            elif item:
                first, last = item[0] + 2, item[-1] + 2
                run = lines[first:last + 1] if last - first + 1 == len(item) else [lines[p + 2] for p in item]
                digest.update(b"\n".join(run))
                digest.update(b"\n")
        return digest.hexdigest()


# -- the check before a delta batch's COMMIT: what changed in the watched directories (inotify) -------------------------
# A delta pass lists each company directory once. Between that listing and the COMMIT of the company's rows, a file
# written by a service that was not stopped must still be seen: a watch added before the listing reports every create,
# write, attribute change, rename and delete in the directory (and the directory's own move or removal) from then on,
# so the check before the COMMIT reads the events instead of listing the directory again. A directory with an event, or
# without a watch (no inotify, no /proc, the watch limit reached, a file system whose changes made elsewhere inotify does
# not see), is listed again and compared with the listing the import used.

IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF, IN_UNMOUNT, IN_Q_OVERFLOW, IN_IGNORED = 0x400, 0x800, 0x2000, 0x4000, 0x8000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
WATCH_MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF
              | IN_MOVE_SELF)
EVENT_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then len bytes of name)
# statfs f_type of file systems where another host or a user-space daemon changes files without the local kernel's
# notifications (NFS, SMB/CIFS, FUSE, 9p, Ceph, GPFS, Lustre, AFS): no watch is trusted there.
REMOTE_FS = {0x6969: "nfs", 0xFF534D42: "cifs", 0xFE534D42: "smb2", 0x517B: "smb", 0x65735546: "fuse", 0x01021997: "9p",
             0x00C36400: "ceph", 0x47504653: "gpfs", 0x0BD00BD0: "lustre", 0x5346414F: "afs", 0x6B414653: "afs"}


def _libc():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc if hasattr(libc, "inotify_init1") and hasattr(libc, "inotify_add_watch") else None
    except (OSError, AttributeError):
        return None


def file_system_type(path):
    """statfs f_type of the file system holding path, or None."""
    libc = _libc()
    if libc is None or not hasattr(libc, "statfs"):
        return None
    buf = ctypes.create_string_buffer(512)
    if libc.statfs(os.fsencode(path), buf) != 0:
        return None
    return struct.unpack_from("l", buf.raw, 0)[0] & 0xFFFFFFFF


class DirectoryWatch:
    """inotify watches on company directories; suspects() names the watched companies that may have changed since their
    watch was added (and every company whose watch could not be added). Watches are added by directory fd
    (/proc/self/fd/N): the directory opened without following a symbolic link is the one watched."""

    def __init__(self, tree_path):
        self.fd = None
        self.wds = {}  # watch descriptor -> company id
        self.changed = set()
        self.overflow = False
        self.why = None  # why nothing is watched, or None
        fs_type = file_system_type(tree_path)
        libc = _libc()
        if libc is None:
            self.why = "no inotify"
        elif fs_type in REMOTE_FS:
            self.why = "the tree is on %s (changes made elsewhere raise no inotify event)" % REMOTE_FS[fs_type]
        else:
            fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
            if fd < 0:
                self.why = "inotify_init1 failed (%s)" % os.strerror(ctypes.get_errno())
            else:
                self.fd, self._libc = fd, libc

    def add(self, company_id, dir_fd):
        """Watch the open directory dir_fd for company_id; False (the company is then always suspect) when it cannot be."""
        if self.fd is None:
            return False
        wd = self._libc.inotify_add_watch(self.fd, b"/proc/self/fd/%d" % dir_fd, WATCH_MASK | IN_ONLYDIR)
        if wd < 0:
            return False
        self.wds[wd] = company_id
        return True

    def watched(self):
        return set(self.wds.values())

    def _drain(self):
        while self.fd is not None:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            offset = 0
            while offset + EVENT_HEADER.size <= len(data):
                wd, mask, _cookie, length = EVENT_HEADER.unpack_from(data, offset)
                offset += EVENT_HEADER.size + length
                if mask & IN_Q_OVERFLOW:
                    self.overflow = True
                elif wd in self.wds:
                    self.changed.add(self.wds[wd])
                    if mask & (IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT):
                        # The watch is gone with its directory: the company stays suspect (changed holds it).
                        pass

    def suspects(self, company_ids):
        """The companies of company_ids that may have changed since they were watched: an event in the directory, an
        overflowed event queue, or no watch at all."""
        self._drain()
        watched = set(self.wds.values())
        if self.overflow or self.fd is None:
            return set(company_ids)
        return {c for c in company_ids if c in self.changed or c not in watched}

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
