# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""File primitives of the sessions tree: relative to a directory fd, never following a symbolic link.

Files are created (O_EXCL), replaced (temporary file and rename) or written in place, and read only when they are
regular files; dest is checked before anything is written; ParentLock serialises the writers and verifiers of the
trees of one directory; the space check estimates what a tree takes. The path-based crash-safe writes and the swap of
two trees are baileys_dr_fs's.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import secrets
import shutil
import stat
import time

from ansible.module_utils.baileys_dr_fs import fsync_tree, libc
from ansible.module_utils.baileys_dr_tree import DIR_MODE, FILE_MODE, TMP_PREFIX, SessionsError

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


def unlink_quiet(dir_fd, name):
    try:
        os.unlink(name, dir_fd=dir_fd)
        return True
    except FileNotFoundError:
        return False


def unlink_names(dir_fd, names):
    """Unlink names in dir_fd (those already gone are not counted), then close dir_fd; returns the count."""
    try:
        return sum(1 for name in names if unlink_quiet(dir_fd, name))
    finally:
        os.close(dir_fd)


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


# Bytes of manifest entry per file, for the space estimate.
MANIFEST_BYTES_PER_FILE = 260


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
