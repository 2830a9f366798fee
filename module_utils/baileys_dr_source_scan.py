# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Directory listings of a sessions tree: signatures (name, size, mtime, inode) that prove a company's files
unchanged, listed in forked workers for many companies.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import stat
import time

from ansible.module_utils.baileys_dr_passfiles import racy_limit
from ansible.module_utils.baileys_dr_files import open_dir, write_all
from ansible.module_utils.baileys_dr_tree import COMPANY_PREFIX, SessionsError
from ansible.module_utils.baileys_dr_workers import export_workers
from ansible.module_utils.baileys_dr_failback_errors import FailbackError


SCAN_MIN_FORK = 50  # companies from which a delta pass lists directories in forked workers

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
