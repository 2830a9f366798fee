# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Crash-safe file system primitives shared by the baileys-dr modules.

Every write is staged beside its target, fsynced, then renamed over it, and
the directory is fsynced, so a crash leaves the old file or the new one,
never a mix. Directory trees are swapped with renameat2(RENAME_EXCHANGE)
where the kernel has it (atomic), else with two renames.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import tempfile

RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path, data, mode=0o600, owner=None, group=None):
    """Replace path with data (bytes) atomically and durably; returns True."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".%s.tmp-" % os.path.basename(path), dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        if owner is not None or group is not None:
            os.chown(tmp, -1 if owner is None else owner, -1 if group is None else group)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(directory)
    return True


def sha256_file(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                return digest.hexdigest()
            digest.update(block)


_libc = None


class HashingWriter:
    """A write-only file object that hashes (sha256 unless a digest is given) what passes through it to raw: a gzip
    stream written and its file's checksum taken in one pass."""

    def __init__(self, raw, digest=None):
        self.raw = raw
        self.digest = hashlib.sha256() if digest is None else digest

    def write(self, data):
        self.digest.update(data)
        return self.raw.write(data)

    def flush(self):
        self.raw.flush()


def libc():
    """The C library of this process, with errno kept (CDLL(None): no ldconfig run to find it, as find_library does)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _renameat2():
    return getattr(libc(), "renameat2", None)


def exchange_paths(a, b):
    """Atomically swap two existing paths (same file system). Returns False when unsupported."""
    func = _renameat2()
    if func is None:
        return False
    result = func(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), a)


def swap_in(staged, live, backup):
    """Make staged the live tree; what was live ends at backup (None when there was none).

    With RENAME_EXCHANGE readers see the old tree or the new one, never a
    missing directory; without it the gap between the two renames is a few
    microseconds.
    """
    parent = os.path.dirname(os.path.abspath(live))
    if not os.path.lexists(live):
        os.rename(staged, live)
        fsync_dir(parent)
        return None
    if os.path.islink(live):
        raise OSError(errno.ELOOP, "refusing to swap a symbolic link", live)
    if exchange_paths(staged, live):
        os.rename(staged, backup)
    else:
        os.rename(live, backup)
        os.rename(staged, live)
    fsync_dir(parent)
    return backup


def fsync_tree(root):
    """fsync every file and directory below root (bottom-up)."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(directory)
