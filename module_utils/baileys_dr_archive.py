# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Archives of a sessions tree: a verified generation as compressed JSON lines (+ .sha256), the newest N kept.

Format: docs/architecture.md, "The sessions tree and its manifest (format 1)" (generation archive).
"""

from __future__ import annotations

import datetime
import gzip
import hashlib
import os
import re
import secrets

from ansible.module_utils.baileys_dr_files import NEW_FILE_FLAGS, open_dir, read_regular
from ansible.module_utils.baileys_dr_fs import HashingWriter, fsync_dir, write_file_atomic
from ansible.module_utils.baileys_dr_manifests import TreeMeta, load_company_manifest, load_top_manifest
from ansible.module_utils.baileys_dr_tree import (
    COMPANY_PREFIX, CREDS_FILE, FILE_MODE, FORMAT, SessionsError, compact_stamp, encode_json, sha256_bytes, utc_now,
)

ARCHIVE_KIND = "baileys-dr-sessions-archive"
ARCHIVE_RE = re.compile(r"\Asessions-(\d+)-(\d{8}T\d{6}Z)\.jsonl\.gz\Z")


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
                    hashing = HashingWriter(raw, digest)
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
