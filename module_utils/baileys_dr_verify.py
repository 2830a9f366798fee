# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A sessions tree verified against its manifests (baileys_sessions_verify's engine), read-only.

depth=content reads and hashes every file (and, with recompute_digests, recomputes each company's digest);
depth=structure reads the manifests and one directory listing per company, hashing only the files modified since the
top manifest. Every difference of files is also counted in a DriftReport (tree_drift, baileys_dr_drift).
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import stat

from ansible.module_utils.baileys_dr_codec import VALUE_ERRORS, sort_key
from ansible.module_utils.baileys_dr_files import ParentLock, open_dir, read_regular
from ansible.module_utils.baileys_dr_manifests import (
    MANIFEST_FOOTER, read_json_at, validate_company_manifest, validate_top_manifest,
)
from ansible.module_utils.baileys_dr_tree import (
    COMPANIES_DIR, COMPANY_PREFIX, CREDS_FILE, DIR_MODE, FILE_MODE, IN_PROGRESS_NAME, MANIFEST_NAME, MAX_SHOWN,
    META_DIR, DigestLines, ManifestError, SessionsError, age_of, creds_line, key_line, sha256_bytes,
)

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
