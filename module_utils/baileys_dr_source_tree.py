# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The source tree of a failback: opened against its manifest, companies read (whole, or only the files changed
since the bulk pass), a reader thread one company ahead.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time

from ansible.module_utils.baileys_dr_codec import (
    COMPANY_ID_RE,
    KEY_TYPES,
    key_file_name,
    sort_key,
)
from ansible.module_utils import baileys_dr_passfiles as passfiles
from ansible.module_utils.baileys_dr_files import open_dir
from ansible.module_utils.baileys_dr_manifests import load_company_manifest, read_json_at, validate_top_manifest
from ansible.module_utils.baileys_dr_tree import (
    checked_key_file_name,
    COMPANIES_DIR,
    COMPANY_PREFIX,
    CREDS_FILE,
    creds_line,
    HostileInputError,
    IN_PROGRESS_NAME,
    MANIFEST_NAME,
    ManifestError,
    META_DIR,
    SessionsError,
)
from ansible.module_utils.baileys_dr_failback_errors import CompanyRefused, FailbackError, FileProblem
from ansible.module_utils.baileys_dr_reverse_names import parse_key_file_name, reverse_key_name
from ansible.module_utils.baileys_dr_source_files import CompanyFiles, FileEntry, read_file_at, stored_text
from ansible.module_utils.baileys_dr_source_scan import dir_stats


LEGACY_MANIFEST = "manifest.json"

# -- the source tree ---------------------------------------------------------------------------


class SourceTree:
    """The sessions tree failback reads: its manifests and company directories (fds, no symbolic link followed)."""

    def __init__(self, path, root_fd, require_manifest=True):
        self.path = path
        self.root_fd = root_fd
        self.require_manifest = require_manifest
        self.top = None
        self.legacy = None
        self.meta_fd = self.companies_fd = None
        # Delta pass: {company: {"path", "files", "digest", "fingerprint"}} of the companies whose rows are the bulk
        # pass's and whose pass files record lets read_company read only the files changed since (set before any read).
        self.bases = {}

    def open(self):
        try:
            self.meta_fd = open_dir(META_DIR, self.root_fd)
        except FileNotFoundError:
            self.meta_fd = None
        except SessionsError as exc:
            raise FailbackError("%s/%s: %s" % (self.path, META_DIR, exc)) from None
        if self.meta_fd is not None:
            try:
                os.lstat(IN_PROGRESS_NAME, dir_fd=self.meta_fd)
                raise FailbackError("%s/%s/%s exists: a standby refresh was interrupted or is running; the tree is not a finished "
                                    "generation" % (self.path, META_DIR, IN_PROGRESS_NAME))
            except FileNotFoundError:
                pass
            try:
                _, top = read_json_at(self.meta_fd, MANIFEST_NAME)
                self.top = validate_top_manifest(top)
                self.companies_fd = open_dir(COMPANIES_DIR, self.meta_fd)
            except FileNotFoundError:
                if self.top is not None:
                    raise FailbackError("%s/%s/%s is missing" % (self.path, META_DIR, COMPANIES_DIR)) from None
            except (ManifestError, SessionsError, OSError) as exc:
                raise FailbackError("the manifest of %s is unusable: %s" % (self.path, exc)) from None
        if self.top is None:
            self.legacy = self._legacy()
        if self.top is None and self.legacy is None and self.require_manifest:
            raise FailbackError(
                "%s has no manifest (%s/%s or %s): files cannot be verified and ids of every file would have to be guessed "
                "(require_manifest=false imports it anyway, reverse-mapping every name)" % (self.path, META_DIR, MANIFEST_NAME, LEGACY_MANIFEST)
            )
        return self

    def _legacy(self):
        """Companies of an older tree's <tree>/manifest.json ({"format": 1, "companies": {id: {"files": {...}}}}), or None."""
        try:
            _, document = read_json_at(self.root_fd, LEGACY_MANIFEST)
        except FileNotFoundError:
            return None
        except (ManifestError, SessionsError, OSError) as exc:
            raise FailbackError("%s/%s is unusable: %s" % (self.path, LEGACY_MANIFEST, exc)) from None
        if not isinstance(document, dict) or document.get("format") != 1 or not isinstance(document.get("companies"), dict):
            raise FailbackError("%s/%s is not a format 1 manifest" % (self.path, LEGACY_MANIFEST))
        return document["companies"]

    def close(self):
        for attr in ("companies_fd", "meta_fd"):
            fd = getattr(self, attr)
            if fd is not None:
                os.close(fd)
                setattr(self, attr, None)

    @property
    def kind(self):
        return "baileys-dr" if self.top is not None else "legacy" if self.legacy is not None else None

    @property
    def source(self):
        return (self.top or {}).get("source") or {}

    def listed(self):
        if self.top is not None:
            return set(self.top["companies"])
        return set(self.legacy or ())

    def company_ids(self, wanted=None, missing="fail"):
        """(company ids in byte order, {raw name: reason} of directories that cannot be companies, wanted ids that are
        neither a directory nor in the manifest: left out with missing=skip, else refused)."""
        listed = self.listed()
        found, bad = set(), {}
        for name in os.listdir(self.root_fd):
            if not name.startswith(COMPANY_PREFIX):
                continue
            company_id = name[len(COMPANY_PREFIX):]
            info = os.lstat(name, dir_fd=self.root_fd)
            if not COMPANY_ID_RE.match(company_id):
                bad[company_id] = "directory %r: the company id does not match [A-Za-z0-9_-]{1,50}" % name
            elif stat.S_ISLNK(info.st_mode):
                bad[company_id] = "%s is a symbolic link: refused" % name
            elif not stat.S_ISDIR(info.st_mode):
                bad[company_id] = "%s is not a directory" % name
            else:
                found.add(company_id)
        ids = found | listed | set(bad)
        absent = []
        if wanted:
            unknown = [c for c in wanted if c not in ids]
            if unknown and missing != "skip":
                raise FailbackError("companies not in %s: %s (missing_companies=skip leaves them out)"
                                    % (self.path, ", ".join(repr(c) for c in unknown[:20])))
            absent = sorted(set(unknown))
            ids = set(wanted) - set(unknown)
        ordered = sorted(ids, key=lambda c: c.encode("utf-8", "surrogateescape"))
        return ordered, {c: r for c, r in bad.items() if c in ids}, absent

    def manifest_files(self, company_id):
        """{file name: entry} the manifest lists for the company ({} for a company created while on files)."""
        if self.top is not None:
            entry = self.top["companies"].get(company_id)
            if entry is None:
                return {}
            try:
                return load_company_manifest(self.companies_fd, company_id, entry["manifest_sha256"])["files"]
            except FileNotFoundError:
                raise CompanyRefused("its manifest %s/%s/%s.json is missing" % (META_DIR, COMPANIES_DIR, company_id)) from None
            except (ManifestError, SessionsError, OSError) as exc:
                raise CompanyRefused("its manifest is unusable (checksum mismatch or damage): %s" % exc) from None
        entry = (self.legacy or {}).get(company_id)
        if entry is None:
            return {}
        files = entry.get("files") if isinstance(entry, dict) else None
        if not isinstance(files, dict):
            raise CompanyRefused("its entry in %s has no files object" % LEGACY_MANIFEST)
        for name, spec in files.items():
            ok = isinstance(spec, dict) and (
                (name == CREDS_FILE and spec.get("type") in ("creds", None))
                or (spec.get("type") in KEY_TYPES and isinstance(spec.get("id"), str) and key_file_name(spec["type"], spec["id"]) == name)
            )
            if not ok:
                raise CompanyRefused("%s: the entry of %r does not name the file of its type and id" % (LEGACY_MANIFEST, name))
        return files

    def manifest_digest(self, company_id):
        if self.top is None:
            return None
        return (self.top["companies"].get(company_id) or {}).get("digest")

    def read_company(self, company_id, ambiguous_mode):
        """The company's files, checked: everything that refuses the company is in .problems / .ambiguous. With a base
        (bases), only the files changed since the bulk pass are read (_read_changed) when that is sound."""
        files = CompanyFiles(company_id)
        base, files.whole_because = self._base(company_id)
        specs = self.manifest_files(company_id) if base is None else None
        try:
            dir_fd = open_dir(COMPANY_PREFIX + company_id, self.root_fd)
        except FileNotFoundError:
            files.problem(None, "its directory %s%s is missing (the manifest lists it): refusing to delete the company's rows"
                          % (COMPANY_PREFIX, company_id))
            return files
        except SessionsError as exc:
            files.problem(None, str(exc))
            return files
        try:
            files.observed_ns = time.time_ns()
            files.before = dir_stats(dir_fd)
            if base is not None:
                changed = self._read_changed(files, dir_fd, base, ambiguous_mode)
                if changed is not None:
                    return changed
            if specs is None:
                specs = self.manifest_files(company_id)
            present = set()
            for name in sorted(files.before):
                present.add(name)
                self._read_file(files, dir_fd, name, specs.get(name), ambiguous_mode)
            for name, spec in specs.items():
                if name in present:
                    continue
                if name == CREDS_FILE:
                    files.problem(CREDS_FILE, "is missing (the manifest lists it): refusing to delete the credentials "
                                              "(Baileys would have written fresh ones)")
                else:
                    files.counts["missing"] += 1
        finally:
            os.close(dir_fd)
        return files

    def _base(self, company_id):
        """(the company's pass files record, None), or (None, why it cannot be used), or (None, None) without one."""
        entry = self.bases.get(company_id)
        if entry is None:
            return None, None
        try:
            base = passfiles.PassFiles.load(entry["path"], company_id, entry["files"], entry["digest"])
        except passfiles.PassFilesError as exc:
            return None, str(exc)
        base.fingerprint = entry["fingerprint"]
        return base, None

    def _read_changed(self, listed, dir_fd, base, ambiguous_mode):
        """The company's files as the bulk pass's record and the files changed since: a file whose listed stat is the
        recorded one is carried (not read: the bulk pass imported that content, its rows are proven by the fingerprint);
        every other file is read and checked as a full read checks it. None (listed.whole_because says why) when the
        company must be read whole: ambiguous file names, or a changed file naming a carried key."""
        files = CompanyFiles(listed.company_id)
        files.base, files.before, files.observed_ns = base, listed.before, listed.observed_ns
        specs = None
        changed = []
        # base.carried(name, info) inlined (1,500 files a company): the recorded stat text equal to the listed one.
        by_name, carried, stats, unproven, regular = base.by_name, files.carried, files.stats, passfiles.UNPROVEN_TEXT, stat.S_IFREG
        for name, info in files.before.items():
            if info[3] == regular:
                if name == CREDS_FILE:
                    if base.creds_unchanged(info):
                        files.creds_carried = True
                        stats[name] = info
                        continue
                else:
                    recorded = by_name.get(name)
                    if recorded is not None and recorded[1] != unproven and recorded[1] == "%d\t%d\t%d" % info[:3]:
                        carried.append(recorded[0])
                        stats[name] = info
                        continue
            changed.append(name)
        for name in sorted(changed):  # read in name order, as a full read does
            recorded = base.by_name.get(name)
            if recorded is not None:
                key_type, key_id = base.keys[recorded[0]]
                spec = {"type": key_type, "id": key_id}
            else:
                if specs is None:
                    specs = self.manifest_files(listed.company_id)
                spec = specs.get(name)
            self._read_file(files, dir_fd, name, spec, ambiguous_mode)
        if files.ambiguous or files.skipped:
            listed.whole_because = "a file whose original id cannot be told for certain"
            return None
        files.carried.sort()
        carried = set(files.carried)
        if any(base.position_of(key) in carried for key in files.keys):
            listed.whole_because = "a changed file names a key of an unchanged one"
            return None
        files.deleted = [base.keys[position] for name, (position, _stat) in base.by_name.items() if name not in files.before]
        if base.creds_stat is not None and CREDS_FILE not in files.before:
            files.problem(CREDS_FILE, "is missing (the bulk pass imported it): refusing to delete the credentials "
                                      "(Baileys would have written fresh ones)")
        return files

    def prepare_changed(self, company_id, dir_fd, stats, observed_ns, signature, ambiguous_mode, buffer_format):
        """Delta pass, per file, from the listing the proof took (stats listed at observed_ns, their signature): the
        company's changed files read and checked, compared with the bulk pass's lines, its digest spliced (Prepared), so
        that the company is written in a batch (Failback._delta_batches) without listing its directory again. None when
        it is not that simple (no usable record, a problem, an ambiguous name, a file changed while read, a key both new
        and gone): the company then goes the per-company way, which reads it again and says what is wrong."""
        base, _why = self._base(company_id)
        if base is None:
            return None
        listed = CompanyFiles(company_id)
        listed.before, listed.observed_ns = stats, observed_ns
        try:
            files = self._read_changed(listed, dir_fd, base, ambiguous_mode)
            if files is None or files.problems or files.changed or files.ambiguous or files.skipped:
                return None
            return Prepared(files, base, buffer_format, signature)
        except (FileProblem, CompanyRefused, passfiles.PassFilesError, SessionsError, OSError):
            return None

    def _read_file(self, files, dir_fd, name, spec, ambiguous_mode):
        files.counts["files"] += 1
        try:
            data, info = read_file_at(dir_fd, name)
        except FileProblem as exc:
            files.problem(name, str(exc))
            return
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                files.changed.append(name)  # deleted since the listing (Baileys consumed a pre-key)
            reason = "is a symbolic link: refused" if exc.errno == errno.ELOOP else "is unreadable (%s)" % exc.strerror
            files.problem(name, reason)
            return
        files.stats[name] = (info.st_ino, info.st_size, info.st_mtime_ns, stat.S_IFMT(info.st_mode))
        if files.stats[name] != files.before.get(name):
            files.changed.append(name)
        reverse = None
        if name == CREDS_FILE:
            key_type, key_id = "creds", None
        elif spec is not None:
            key_type, key_id = spec.get("type"), spec.get("id")
            if key_type not in KEY_TYPES:
                files.problem(name, "has the type %r in the manifest, not a Baileys key type" % (key_type,))
                return
        else:
            parsed = parse_key_file_name(name)
            if parsed is None:
                files.problem(name, "is not a Baileys key file (<type>-<id>.json with a type of %s): unknown type" % ", ".join(KEY_TYPES))
                return
            key_type, part = parsed
            reverse = reverse_key_name(key_type, part)
            if reverse.key_id is None:
                files.ambiguous.append({"company": files.company_id, "file": name, "type": key_type, "reason": reverse.reason,
                                        "candidates": reverse.candidates, "candidate_count": reverse.candidate_count})
                if ambiguous_mode == "skip":
                    files.skipped.add(name)
                return
            key_id = reverse.key_id
            try:
                if checked_key_file_name(files.company_id, key_type, key_id) != name:
                    raise HostileInputError("the id %r does not give back the file name" % key_id)
            except HostileInputError as exc:
                files.problem(name, "cannot be imported: %s" % exc)
                return
        entry = FileEntry(name, key_type, key_id, data, spec, reverse)
        if entry.same:
            files.counts["same"] += 1
        else:
            files.counts["changed" if spec is not None else "new"] += 1
            try:
                entry.value()  # validated now, before any write
            except FileProblem as exc:
                files.problem(name, str(exc))
                return
        if key_type == "creds":
            files.creds = entry
        else:
            files.keys[(key_type, key_id)] = entry

    def unchanged_since_read(self, files, before=None):
        """None when the company directory still holds what was read (or before: the listing before the read), else
        what changed."""
        dir_fd = open_dir(COMPANY_PREFIX + files.company_id, self.root_fd)
        try:
            now = dir_stats(dir_fd)
        finally:
            os.close(dir_fd)
        before = files.stats if before is None else before
        if now == before:
            return None
        changed = sorted(set(now) ^ set(before)) + sorted(n for n in set(now) & set(before) if now[n] != before[n])
        return ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else "")


class StagedKey:
    """A key a delta batch writes: what CompanyPlan's inserts and updates hold (key_type, key_id), and the text."""

    __slots__ = ("key_type", "key_id", "name", "text")

    def __init__(self, key_type, key_id, name, text):
        self.key_type, self.key_id, self.name, self.text = key_type, key_id, name, text


class Prepared:
    """A company of a delta pass ready to be written in a batch: its changed files against the bulk pass's record (the
    rows of every other key are the bulk pass's, proven by the fingerprint), the texts to write, the spliced digest.
    Built in a scan worker from the proof's listing, sent to the parent pickled: no file data, no listing kept (the
    listing's signature only, for the check before the COMMIT when the directory's watch saw an event)."""

    def __init__(self, files, base, buffer_format, signature):
        self.company_id = files.company_id
        self.fingerprint = base.fingerprint
        self.signature = signature
        self.files_read = files.counts["files"]
        self.updates, self.inserts, self.unchanged = [], [], 0
        changed = {}
        for key, entry in files.keys.items():
            line = changed[key] = entry.line()
            recorded = base.by_name.get(entry.name)
            position = recorded[0] if recorded is not None and base.keys[recorded[0]] == key else None
            if position is not None and base.key_lines[position] == line:
                self.unchanged += 1  # rewritten with the same value: its row is the bulk pass's, equal
                continue
            staged = StagedKey(key[0], key[1], entry.name, stored_text(key[0], entry.value(), buffer_format))
            (self.updates if position is not None else self.inserts).append(staged)
        self.deletes = sorted(files.deleted, key=lambda k: sort_key(*k))
        if not set(files.deleted).isdisjoint(files.keys):
            raise passfiles.PassFilesError("a key both gone and read")
        # The creds: carried (the bulk pass's, its row too), or read: inserted when the bulk pass had none.
        self.creds = self.creds_text = self.creds_value = None
        if files.creds_carried:
            self.creds_line = base.creds_line
        elif files.creds is None:
            self.creds_line = creds_line(None)
        else:
            self.creds_line = files.creds.line()
            if base.creds_stat is None:
                self.creds = "inserted"
            elif self.creds_line != base.creds_line:
                self.creds = "updated"
                self.creds_value = files.creds.value()
            if self.creds:
                self.creds_text = stored_text(None, files.creds.value(), buffer_format)
        if self.creds is None and files.creds is None and not files.creds_carried and base.creds_stat is not None:
            raise passfiles.PassFilesError("creds.json is gone")
        self.creds_present = files.creds_carried or files.creds is not None
        self.digest = base.spliced_digest(self.creds_line, files.carried, changed)


class _ReadThread(threading.Thread):
    def __init__(self, tree, company_id, mode):
        super().__init__(name="baileys-dr-read-%s" % company_id, daemon=True)
        self.tree, self.company_id, self.mode = tree, company_id, mode
        self.files = self.error = None
        self.start()

    def run(self):
        try:
            self.files = self.tree.read_company(self.company_id, self.mode)
        except BaseException as exc:  # noqa: BLE001 - re-raised by result()
            self.error = exc

    def result(self):
        self.join()
        if self.error is not None:
            raise self.error
        return self.files


class CompanyReader:
    """SourceTree.read_company of companies asked for in order, the next one read by a thread while the caller works on
    the current one (file reads release the GIL, and so does psycopg2 while the server works): at most two companies'
    files in memory. close() waits for a read still running (before the tree's fds are closed)."""

    def __init__(self, tree, company_ids, mode, reuse=None):
        self.tree, self.mode = tree, mode
        self.ids = list(company_ids)
        self.position = {company_id: n for n, company_id in enumerate(self.ids)}
        self.ahead = None
        self.last = None  # the CompanyFiles read last
        # The files the previous pass read last, used again when that company comes first and its directory is unchanged
        # since (the check before the COMMIT compares with the same stats): a run of one company reads it once.
        self.reuse = reuse if reuse is not None and self.ids and self.ids[0] == reuse.company_id else None

    def read(self, company_id):
        reuse, self.reuse = self.reuse, None
        if reuse is not None and reuse.company_id == company_id and not reuse.problems and self._unchanged(reuse):
            self._next(company_id)
            self.last = reuse
            return reuse
        ahead, self.ahead = self.ahead, None
        if ahead is None or ahead.company_id != company_id:
            if ahead is not None:
                ahead.join()
            ahead = _ReadThread(self.tree, company_id, self.mode)
        try:
            self.last = ahead.result()
            return self.last
        finally:
            self._next(company_id)

    def _unchanged(self, files):
        try:
            return self.tree.unchanged_since_read(files) is None
        except (OSError, SessionsError):
            return False  # read again: the read reports what is wrong

    def _next(self, company_id):
        following = self.position[company_id] + 1
        if following < len(self.ids):
            self.ahead = _ReadThread(self.tree, self.ids[following], self.mode)

    def close(self):
        if self.ahead is not None:
            self.ahead.join()
            self.ahead = None
