# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The pass record of a two-pass failback: what the bulk pass made of each company (directory signature, row
fingerprint, transactions), loaded and checked for the delta pass.
"""

from __future__ import annotations

import json
import re

from ansible.module_utils.baileys_dr_codec import (
    COMPANY_ID_RE,
)
from ansible.module_utils.baileys_dr_failback_errors import FailbackError


# -- the pass record (two-pass failback) --------------------------------------------------------------
# The switch rule: a bulk pass while the service still writes the files (changed_during_read=defer), then, with the
# service stopped, a delta pass of what changed since. The bulk pass records per company what it made equal: the
# directory's signature (listed before the read) and the rows' fingerprint after the COMMIT. A company whose signature
# and fingerprint are both still the recorded ones holds in PostgreSQL what its files hold: the delta pass skips it
# without reading a file.

PASS_FORMAT = 1
PASS_KIND = "baileys-dr-failback-pass"
MAX_PASS_RECORD_BYTES = 256 << 20
HEX64_RE = re.compile(r"\A[0-9a-f]{64}\Z")
XID_WRAP = 1 << 32
MAX_RECORD_XIDS = 16  # transactions kept per company in a record's xids (a pass run again adds one)


def fingerprint_text(keys, xmin_hash, creds_xmin):
    """A company's fingerprint: '<Baileys keys>:<sum of hashint8(xmin)>:<creds xmin or ->'."""
    return "%d:%d:%s" % (int(keys), int(xmin_hash or 0), creds_xmin or "-")


def _optional(value, kind):
    return value is None or isinstance(value, kind)


def load_pass_record(path):
    """The pass record at path, its shape checked; FailbackError naming the path otherwise."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_PASS_RECORD_BYTES + 1)
    except OSError as exc:
        raise FailbackError("delta_from %s cannot be read (%s)" % (path, exc.strerror)) from None
    try:
        document = json.loads(data) if len(data) <= MAX_PASS_RECORD_BYTES else None
    except ValueError:
        document = None
    ok = (isinstance(document, dict) and document.get("format") == PASS_FORMAT and document.get("kind") == PASS_KIND
          and isinstance(document.get("tree"), str) and isinstance(document.get("system_identifier"), str)
          and isinstance(document.get("companies"), dict) and isinstance(document.get("deferred"), list)
          and _optional(document.get("timeline_id"), int))
    if ok:
        for company_id, entry in document["companies"].items():
            ok = ok and COMPANY_ID_RE.match(company_id) and isinstance(entry, dict) and (
                entry.get("signature") is None or HEX64_RE.match(str(entry["signature"]))) and _optional(
                entry.get("fingerprint"), str) and _optional(entry.get("xid"), int) and _optional(entry.get("digest"), str) and (
                entry.get("files") is None or HEX64_RE.match(str(entry["files"])))
        ok = ok and all(isinstance(c, str) and COMPANY_ID_RE.match(c) for c in document["deferred"])
        xids = document.get("xids", {})
        ok = ok and isinstance(xids, dict) and all(
            COMPANY_ID_RE.match(c) and isinstance(v, list) and all(isinstance(x, int) for x in v) for c, v in xids.items())
    if not ok:
        raise FailbackError("delta_from %s is not a format %d %s record (the pass_record of a bulk pass)" % (path, PASS_FORMAT, PASS_KIND))
    return document


def record_xids(record):
    """{company: {64-bit xid}} of the transactions of a failback's passes that wrote each company (a pass record's)."""
    found = {c: set(v) for c, v in (record.get("xids") or {}).items()}
    for company_id, entry in record["companies"].items():
        if entry.get("xid") is not None:
            found.setdefault(company_id, set()).add(entry["xid"])
    return found
