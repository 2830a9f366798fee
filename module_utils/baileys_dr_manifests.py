# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The manifests of a sessions tree on disk: checked, read, rendered and written.

The top manifest (.baileys-dr/manifest.json) lists every company with the sha256 of its company manifest
(.baileys-dr/companies/<id>.json), which lists every file with its sha256, size and row version, one file per line,
so that a standby refresh splices lines instead of re-encoding; CompanyState reads a standby company back that way,
with its digest lines and row versions (.baileys-dr/digest-lines/<id>.lines and .rows).
"""

from __future__ import annotations

import bisect
import json
import os

from ansible.module_utils.baileys_dr_codec import COMPANY_ID_RE, key_file_name, sort_key
from ansible.module_utils.baileys_dr_files import make_dir, open_dir, put_file, read_regular, replace_file
from ansible.module_utils.baileys_dr_tree import (
    COMPANIES_DIR, CREDS_FILE, FORMAT, HEADER_LINE, KIND, LINES_DIR, MANIFEST_NAME, META_DIR, ManifestError,
    encode_json, sha256_bytes, split_digest_lines,
)


def read_json_at(dir_fd, name, limit=1 << 30):
    data = read_regular(dir_fd, name, limit)
    try:
        return data, json.loads(data)
    except ValueError as exc:
        raise ManifestError("%s is not JSON (%s)" % (name, exc)) from None


def validate_top_manifest(document):
    """Raise ManifestError unless document has the shape of a top manifest (format 1)."""
    if not isinstance(document, dict) or document.get("format") != FORMAT or document.get("kind") != KIND:
        raise ManifestError("not a format %d %s manifest" % (FORMAT, KIND))
    companies = document.get("companies")
    if not isinstance(companies, dict):
        raise ManifestError("the manifest has no companies object")
    for company_id, entry in companies.items():
        if not COMPANY_ID_RE.match(company_id):
            raise ManifestError("the manifest names an invalid company id %r" % (company_id,))
        if not isinstance(entry, dict) or not isinstance(entry.get("manifest_sha256"), str) or not isinstance(entry.get("digest"), str):
            raise ManifestError("the manifest entry of company %s is incomplete" % company_id)
    if not isinstance(document.get("generation"), int):
        raise ManifestError("the manifest has no integer generation")
    return document


def validate_company_manifest(document, company_id):
    if not isinstance(document, dict) or document.get("company_id") != company_id or not isinstance(document.get("files"), dict):
        raise ManifestError("the manifest of company %s is not a company manifest of that company" % company_id)
    for name, entry in document["files"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or not isinstance(entry.get("size"), int):
            raise ManifestError("company %s: manifest entry of %r is incomplete" % (company_id, name))
        if name == CREDS_FILE:
            if entry.get("type") != "creds":
                raise ManifestError("company %s: creds.json is not typed creds in its manifest" % company_id)
        elif not isinstance(entry.get("type"), str) or not isinstance(entry.get("id"), str):
            raise ManifestError("company %s: manifest entry of %r has no type or id" % (company_id, name))
        elif key_file_name(entry["type"], entry["id"]) != name:
            raise ManifestError("company %s: manifest entry %r does not name the file of %s id %r" % (company_id, name, entry["type"], entry["id"]))
    return document


class TreeMeta:
    """The .baileys-dr directory of a tree (fds, no symbolic link followed)."""

    def __init__(self, root_fd):
        self.root_fd = root_fd
        self.meta_fd = self.companies_fd = self.lines_fd = None

    def open(self, create=False, owner=None, lines=False):
        for attr, name, parent_attr in (("meta_fd", META_DIR, "root_fd"), ("companies_fd", COMPANIES_DIR, "meta_fd"),
                                        ("lines_fd", LINES_DIR, "meta_fd")):
            if attr == "lines_fd" and not lines:
                continue
            parent = getattr(self, parent_attr)
            try:
                fd = open_dir(name, parent)
            except FileNotFoundError:
                if not create:
                    raise
                fd = make_dir(parent, name, owner)
            setattr(self, attr, fd)
        return self

    def close(self):
        for attr in ("meta_fd", "companies_fd", "lines_fd"):
            fd = getattr(self, attr)
            if fd is not None:
                os.close(fd)
                setattr(self, attr, None)


def load_top_manifest(root_fd):
    """(bytes, manifest) of a tree, or raise ManifestError / FileNotFoundError."""
    meta_fd = open_dir(META_DIR, root_fd)
    try:
        data, document = read_json_at(meta_fd, MANIFEST_NAME)
    finally:
        os.close(meta_fd)
    return data, validate_top_manifest(document)


def load_company_manifest(companies_fd, company_id, expected_sha256=None):
    data, document = read_json_at(companies_fd, company_id + ".json")
    if expected_sha256 is not None and sha256_bytes(data) != expected_sha256:
        raise ManifestError("the manifest of company %s does not match the sha256 the top manifest lists" % company_id)
    return validate_company_manifest(document, company_id)


def top_manifest_document(generation, source, companies, created_at, last_good_refresh, mode, extra=None):
    totals = {"companies": len(companies), "keys": sum(c["keys"] for c in companies.values()),
              "files": sum(c["files"] for c in companies.values())}
    return {
        "format": FORMAT,
        "kind": KIND,
        "mode": mode,
        "generation": generation,
        "created_at": created_at,
        "last_good_refresh": last_good_refresh,
        "source": {k: source.get(k) for k in ("kind", "target", "system_identifier", "snapshot_at", "timeline_id",
                                               "postmaster_start_time", "xid")},
        "counts": totals,
        "companies": companies,
        **(extra or {}),  # identities and the Baileys version (baileys_dr_identity.snapshot_fields)
    }


def entry_line(name, entry):
    """One file of a company manifest, as its line in the manifest."""
    return json.dumps(name, ensure_ascii=False).encode("utf-8") + b":" + encode_json(entry)


_json_string = json.encoder.encode_basestring  # what json.dumps(text, ensure_ascii=False) gives


def key_entry_line(name, key_type, key_id, sha256, size, xmin, md5):
    """entry_line(name, {"type", "id", "sha256", "size", "xmin", "row_md5"}) of a key file, formatted directly."""
    return ('%s:{"type":%s,"id":%s,"sha256":"%s","size":%d,"xmin":%d,"row_md5":%s}' % (
        _json_string(name), _json_string(key_type), _json_string(key_id), sha256, size, int(xmin),
        "null" if md5 is None else _json_string(md5))).encode("utf-8")


MANIFEST_FOOTER = b"}}"


def render_company_manifest(company_id, digest, keys, entry_lines, rows_sha256=None):
    """A company manifest: JSON with one file per line, so a refresh can splice lines instead of re-encoding."""
    rows = ',"rows_sha256":"%s"' % rows_sha256 if rows_sha256 else ""
    header = ('{"company_id":%s,"digest":"%s","keys":%d%s,"files":{' % (json.dumps(company_id), digest, keys, rows)).encode("utf-8")
    body = b",\n".join(entry_lines)
    return header + b"\n" + (body + b"\n" if entry_lines else b"") + MANIFEST_FOOTER + b"\n"


def write_company_meta(tree, company_id, digest, keys, entry_lines, owner, lines_data=None, rows_text=None, in_place=False):
    """Digest lines and row versions (standby trees), then the company manifest; returns the manifest's sha256."""
    put = put_file if in_place else replace_file
    rows_sha256 = None
    if tree.lines_fd is not None and lines_data is not None:
        rows_data = rows_text.encode("utf-8")
        rows_sha256 = sha256_bytes(rows_data)
        put(tree.lines_fd, company_id + ".lines", lines_data, owner)
        put(tree.lines_fd, company_id + ".rows", rows_data, owner)
    data = render_company_manifest(company_id, digest, keys, entry_lines, rows_sha256)
    put(tree.companies_fd, company_id + ".json", data, owner)
    return sha256_bytes(data)


class CompanyState:
    """A company of a standby tree as its last refresh left it, read without decoding every entry.

    The manifest has one file per line, the digest lines one key per line,
    the row versions (`type TAB id TAB xmin`) one key per line, all in digest
    order: line n of each is key n. Each proves the next (top manifest ->
    manifest sha256 -> digest and rows_sha256), and a refresh edits them by
    splicing the lines of the keys that changed.
    """

    def __init__(self, company_id, manifest_data, lines_data, rows_data, hashes=None):
        self.company_id = company_id
        lines_sha256, rows_sha256 = hashes or (sha256_bytes(lines_data), sha256_bytes(rows_data))
        first, newline, body = manifest_data.partition(b"\n")
        if not newline or not first.endswith(b'"files":{') or not body.endswith(MANIFEST_FOOTER + b"\n"):
            raise ManifestError("the manifest of company %s does not have the one-file-per-line layout" % company_id)
        try:
            header = json.loads(first + b"}}")
        except ValueError:
            raise ManifestError("the manifest header of company %s is not JSON" % company_id) from None
        if header.get("company_id") != company_id or not isinstance(header.get("keys"), int) \
                or not isinstance(header.get("digest"), str):
            raise ManifestError("the manifest of company %s does not describe that company" % company_id)
        if not isinstance(header.get("rows_sha256"), str):
            raise ManifestError("the manifest of company %s records no row versions" % company_id)
        # Every file's line but the last ends with a comma: split at ",\n" (no Python loop over a company's lines).
        body = body[:-len(MANIFEST_FOOTER) - 1]
        entries = body[:-1].split(b",\n") if body else []
        if body and (not body.endswith(b"\n") or body.count(b"\n") != len(entries) or entries[-1].endswith(b",")):
            raise ManifestError("the manifest of company %s does not have the one-file-per-line layout" % company_id)
        self.digest = header["digest"]
        self.keys = header["keys"]
        self.has_creds = bool(entries) and entries[0].startswith(b'"creds.json":')
        self.creds_entry_line = entries[0] if self.has_creds else None
        self.key_entry_lines = entries[1:] if self.has_creds else entries
        if len(self.key_entry_lines) != self.keys:
            raise ManifestError("the manifest of company %s lists %d keys, not %d" % (company_id, len(self.key_entry_lines), self.keys))
        if lines_sha256 != self.digest:
            raise ManifestError("the digest lines of company %s do not prove its manifest's digest" % company_id)
        lines = split_digest_lines(lines_data)
        if lines is None or len(lines) != self.keys + 2 or lines[0] != HEADER_LINE:
            raise ManifestError("the digest lines of company %s do not match its manifest" % company_id)
        self.creds_line = lines[1]
        self.key_lines = lines[2:]
        if rows_sha256 != header["rows_sha256"]:
            raise ManifestError("the row versions of company %s do not match its manifest" % company_id)
        self.rows_text = rows_data.decode("utf-8")
        self.rows = self.rows_text.split("\n") if self.rows_text else []
        if len(self.rows) != self.keys:
            raise ManifestError("the row versions of company %s do not match its manifest" % company_id)

    @staticmethod
    def _parse_entry(line):
        try:
            ((name, entry),) = json.loads(b"{" + line + b"}").items()
        except (ValueError, TypeError):
            raise ManifestError("a manifest entry is not JSON") from None
        if not isinstance(entry, dict) or "/" in name or name in (".", ".."):
            raise ManifestError("a manifest entry names %r" % name)
        return name, entry

    def entry(self, n):
        return self._parse_entry(self.key_entry_lines[n])

    def creds_entry(self):
        return self._parse_entry(self.creds_entry_line)[1] if self.has_creds else None

    def md5_rows(self):
        """Row versions with the manifest's row_md5 appended (the slow path: every entry decoded)."""
        return ["%s\t%s" % (row, self.entry(n)[1].get("row_md5")) for n, row in enumerate(self.rows)]

    def position_of(self, key_type, key_id):
        """Where a new key goes among the old ones (digest order), by bisection."""
        return bisect.bisect_left(self.rows, sort_key(key_type, key_id), key=lambda row: sort_key(*row.split("\t", 2)[:2]))

    def file_names(self):
        return {key_file_name(*row.split("\t", 2)[:2]) for row in self.rows}
