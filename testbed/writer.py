#!/usr/bin/env python3
"""Load generator with a ledger: proves that no acknowledged write is lost across a store switch.

    writer run   --url URL --ledger FILE [--rate 5] [--companies a,b|auto] [--duration S]
                 [--new-keys 4] [--consume-pre-keys 1] [--[no-]touch-creds] [--timeout 5]
    writer start (the options of run) --pid-file F [--log FILE] [--start-timeout 30]
    writer stop  --pid-file F [--wait 30] [--missing-ok]
    writer check --ledger FILE (--store postgres [--db-url URL] | --store files --sessions DIR)
                 [--json] [--min-acknowledged 1]
    writer stats --ledger FILE [--from ISO|epoch] [--to ISO|epoch] [--json]

`run` posts to the test application's POST /simulate at a steady rate, one request at a time (so
the ledger's order is the order the service applied them in), and appends one JSON line per request
to the ledger, written with a single write() as soon as its outcome is known. `check` replays the
ledger against a store: the last acknowledged operation on each key decides what the store must hold.
Documentation: docs/rehearsal.md, "Load generator". Exit status: 0 ok, 1 lost writes (check) or a
failed start/stop, 2 usage errors or a check that cannot run (unreadable ledger, store unreachable).
Python 3 standard library; psycopg2 only for `check --store postgres`.
"""

from __future__ import annotations

import argparse
import datetime
import errno
import fcntl
import hashlib
import http.client
import importlib.util
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEDGER_VERSION = 1
MAX_ANSWER_BYTES = 4 * 1024 * 1024
MAX_EXAMPLES = 20
# How long after the writer gave up on a request the service may still apply it (a transaction waiting
# on a lock, a queued request): its changes can land after those of requests sent later.
LINGER_SECONDS = 60.0
BATCH = 1000
KEY_TYPE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")

# Outcomes of a request, as the ledger records them.
ACK = "ack"  # 200 with the effects listed: acknowledged
FAILED = "failed"  # nothing applied: not connected, or the service refused (4xx, 503)
UNANSWERED = "unanswered"  # sent, no usable answer (timeout, reset, other 5xx): may or may not be applied
APPLIED = "applied"  # not acknowledged, but the answer lists what was applied (a 503/500 with effects)
OUTCOMES = (ACK, FAILED, UNANSWERED, APPLIED)


def _load_codec():
    """module_utils/baileys_dr_codec.py, the one canonical form (stdlib only: loaded as a plain file)."""
    path = os.path.join(ROOT, "module_utils", "baileys_dr_codec.py")
    spec = importlib.util.spec_from_file_location("baileys_dr_codec", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


codec = _load_codec()


class UsageError(Exception):
    """Bad input or a check that cannot run: exit status 2."""


class LedgerError(UsageError):
    pass


# -- time ----------------------------------------------------------------------------------------

def iso(epoch):
    """UTC ISO 8601 with milliseconds, as the ledger writes times."""
    stamp = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (stamp.microsecond // 1000)


def parse_time(text, what):
    """Epoch seconds of an ISO 8601 time (naive means UTC) or of an epoch number."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    if not isinstance(text, str):
        raise UsageError("%s: %r is not a time" % (what, text))
    try:
        return float(text)
    except ValueError:
        pass
    try:
        stamp = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise UsageError("%s: %r is neither an ISO 8601 time nor epoch seconds" % (what, text)) from None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=datetime.timezone.utc)
    return stamp.timestamp()


# -- the ledger ----------------------------------------------------------------------------------

class LedgerFile:
    """The ledger opened for appending by one writer at a time (an exclusive flock)."""

    def __init__(self, path):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise UsageError("ledger %s is in use by another writer" % path) from None

    def append(self, record):
        # One write() of a whole line on an O_APPEND descriptor: a reader never sees half a record
        # followed by another, and the line is in the file (the page cache) the moment it returns.
        data = (json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n").encode("utf-8")
        while data:
            data = data[os.write(self.fd, data):]

    def close(self):
        os.fsync(self.fd)
        os.close(self.fd)


def read_ledger(path):
    """(line number, record) of every complete line; a last line without its newline is a write in progress."""
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise UsageError("ledger %s cannot be read: %s" % (path, exc.strerror)) from None
    with handle:
        for number, raw in enumerate(handle, 1):
            if not raw.endswith(b"\n"):
                return
            try:
                record = json.loads(raw)
            except ValueError:
                raise LedgerError("ledger %s line %d is not JSON" % (path, number)) from None
            if not isinstance(record, dict):
                raise LedgerError("ledger %s line %d is not a ledger record" % (path, number))
            yield number, record


def requests_of(path):
    """The request records of a ledger, checked, with their times as epoch seconds."""
    for number, record in read_ledger(path):
        if record.get("kind") != "request":
            continue
        where = "ledger %s line %d" % (path, number)
        if record.get("outcome") not in OUTCOMES:
            raise LedgerError("%s: unknown outcome %r" % (where, record.get("outcome")))
        company = record.get("company")
        if not isinstance(company, str) or not codec.COMPANY_ID_RE.match(company):
            raise LedgerError("%s: company is not a valid company id" % where)
        record["sent_at"] = parse_time(record.get("sent"), where + " sent")
        record["done_at"] = parse_time(record.get("done"), where + " done")
        for name, fields in (("written", ("type", "id")), ("deleted", ("type", "id"))):
            entries = record.get(name) or []
            if not isinstance(entries, list):
                raise LedgerError("%s: %s is not a list" % (where, name))
            for entry in entries:
                _check_key(entry, where, name)
        yield number, record


def _check_key(entry, where, name):
    if not isinstance(entry, dict):
        raise LedgerError("%s: an entry of %s is not an object" % (where, name))
    key_type, key_id = entry.get("type"), entry.get("id")
    if not isinstance(key_type, str) or not 0 < len(key_type) <= 50 or not KEY_TYPE_CHARS.issuperset(key_type):
        raise LedgerError("%s: %s holds an invalid key type" % (where, name))
    if not isinstance(key_id, str) or not 0 < len(key_id) <= 1000 or "\x00" in key_id:
        raise LedgerError("%s: %s holds an invalid key id" % (where, name))
    sha = entry.get("line_sha256")
    if sha is not None and not _is_sha256(sha):
        raise LedgerError("%s: %s holds an invalid line_sha256" % (where, name))


def _is_sha256(value):
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


# -- statistics ----------------------------------------------------------------------------------

class Stats:
    """Counts, throughput and downtime of the requests whose outcome became known in [start, end].

    Downtime is the longest interval between two consecutive acknowledged requests of one run: the
    last acknowledgment before an interruption to the first one after it (between two runs of the
    writer nothing was asked, so nothing was down). Throughput is acknowledgments per second of
    writing: the time from each run's first request sent to its last outcome, summed.
    """

    def __init__(self, start=None, end=None):
        self.start, self.end = start, end
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self.requests = 0
        self.first_sent = self.last_done = None
        self.run = self.run_first_sent = None
        self.active = 0.0  # seconds of the runs before the current one
        self.last_ack = None
        self.not_acked_since = 0
        self.gap = None  # (seconds, from, to, requests not acknowledged in between)
        self.head = None  # (first acknowledgment, requests not acknowledged before it) when the window began down

    def add(self, record):
        done = record["done_at"]
        if (self.start is not None and done < self.start) or (self.end is not None and done > self.end):
            return
        if record.get("run") != self.run or self.run_first_sent is None:
            if self.run_first_sent is not None:
                self.active += self.last_done - self.run_first_sent
            self.run, self.run_first_sent = record.get("run"), record["sent_at"]
            self.last_ack, self.not_acked_since = None, 0
        self.requests += 1
        self.counts[record["outcome"]] += 1
        if self.first_sent is None:
            self.first_sent = record["sent_at"]
        self.last_done = done
        if record["outcome"] != ACK:
            self.not_acked_since += 1
            return
        if self.last_ack is None and self.not_acked_since and self.head is None and self.gap is None:
            self.head = (done, self.not_acked_since)
        if self.last_ack is not None:
            seconds = done - self.last_ack
            if self.gap is None or seconds > self.gap[0]:
                self.gap = (seconds, self.last_ack, done, self.not_acked_since)
        self.last_ack = done
        self.not_acked_since = 0

    def result(self):
        active = self.active + (self.last_done - self.run_first_sent if self.run_first_sent is not None else 0.0)
        acked = self.counts[ACK]
        downtime = {"seconds": None, "from": None, "to": None, "not_acknowledged_between": 0}
        if self.gap:
            seconds, begin, finish, between = self.gap
            downtime = {"seconds": round(seconds, 3), "from": iso(begin), "to": iso(finish),
                        "not_acknowledged_between": between}
        # An interruption the window began in (the service was already down: a stopped database) has no "last
        # acknowledgment before": measured from the window's start (or the first request) to the first acknowledgment.
        downtime["head_seconds"] = 0
        if self.head is not None:
            began = self.start if self.start is not None else self.first_sent
            downtime["head_seconds"] = round(self.head[0] - began, 3)
        # An interruption the window (or the last run) ends in has no "first acknowledgment after".
        downtime["unacknowledged_tail_seconds"] = (
            round(self.last_done - self.last_ack, 3) if self.last_ack is not None and self.not_acked_since else 0)
        first = self.start if self.start is not None else self.first_sent
        last = self.end if self.end is not None else self.last_done
        return {
            "from": iso(first) if first is not None else None,
            "to": iso(last) if last is not None else None,
            "seconds": round(active, 3),
            "requests": self.requests,
            "acknowledged": acked,
            "failed": self.requests - acked,
            "unanswered": self.counts[UNANSWERED],
            "applied_unacknowledged": self.counts[APPLIED],
            "acks_per_second": round(acked / active, 3) if active > 0 else None,
            "downtime": downtime,
        }


def ledger_stats(path, start=None, end=None):
    stats = Stats(start, end)
    for _, record in requests_of(path):
        stats.add(record)
    return stats.result()


# -- what the ledger says the store must hold ----------------------------------------------------

class Expectations:
    """The last acknowledged operation on every key and on every company's creds.

    Positions are ledger line numbers: one request is in flight at a time, so the ledger's order is
    the order the service applied the acknowledged requests in. A request the service may have
    applied without acknowledging it can change a key after the last acknowledged operation on it:
    an `applied` one if it comes later in the ledger, an `unanswered` one if it does or if it was
    given up less than LINGER_SECONDS before that operation was sent. A mismatch it could explain is
    ambiguous, never lost. What /simulate can do is known: it writes keys with new ids only, deletes
    the oldest pre-keys, and rewrites the creds.
    """

    def __init__(self):
        # (company, type, id) -> (True for written / False for deleted, line_sha256, position, sent)
        self.keys = {}
        self.creds = {}  # company -> (creds_sha256, position, sent)
        self.touched = {}  # (company, type, id) or (company,) for creds -> last position an `applied` answer lists it
        # company -> the last unanswered request that may delete pre-keys, write keys, touch creds: (position, done)
        self.unanswered = {}
        self.writes_acked = self.deletes_acked = 0

    def add(self, position, record):
        outcome = record["outcome"]
        company = record["company"]
        sent = record["sent_at"]
        if outcome == ACK:
            for entry in record.get("written") or ():
                self.keys[(company, entry["type"], entry["id"])] = (True, entry.get("line_sha256"), position, sent)
                self.writes_acked += 1
            for entry in record.get("deleted") or ():
                self.keys[(company, entry["type"], entry["id"])] = (False, None, position, sent)
                self.deletes_acked += 1
            self.creds[company] = (record.get("creds_sha256"), position, sent)
        elif outcome == APPLIED:
            for entry in (record.get("written") or []) + (record.get("deleted") or []):
                self.touched[(company, entry["type"], entry["id"])] = position
            if record.get("creds_changed") is not False:
                self.touched[(company,)] = position
        elif outcome == UNANSWERED:
            params = record.get("params") or {}
            last = self.unanswered.setdefault(company, [None, None, None])
            for index, (name, default) in enumerate((("consumePreKeys", 1), ("newKeys", 1), ("touchCreds", True))):
                if params.get(name, default):
                    last[index] = (position, record["done_at"])

    def _unanswered_after(self, company, index, position, sent):
        last = self.unanswered.get(company)
        found = last and last[index]
        return bool(found) and (found[0] > position or sent - found[1] < LINGER_SECONDS)

    def key_ambiguous(self, key, position, sent, present):
        """Whether a request not acknowledged can explain the state of a key last acknowledged at `position`."""
        if self.touched.get(key, 0) > position:
            return True
        if present:  # a deleted key back: only a new write can do that
            return self._unanswered_after(key[0], 1, position, sent)
        return key[1] == "pre-key" and self._unanswered_after(key[0], 0, position, sent)

    def creds_ambiguous(self, company, position, sent):
        return self.touched.get((company,), 0) > position or self._unanswered_after(company, 2, position, sent)


def key_line_sha256(key_type, key_id, value):
    return hashlib.sha256(codec.key_line_text(key_type, key_id, value).encode("utf-8")).hexdigest()


def creds_line_sha256(creds):
    """sha256 of the creds line of the state digest, without its newline (docs/architecture.md)."""
    return hashlib.sha256(('["creds",%s]' % codec.canonical_json(creds)).encode("utf-8")).hexdigest()


def _chunks(items, size=BATCH):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class FilesStore:
    """A Baileys sessions tree: DIR/company_<id>/<type>-<fixFileName(id)>.json and creds.json."""

    name = "files"

    def __init__(self, sessions_dir):
        if not os.path.isdir(sessions_dir):
            raise UsageError("--sessions %s is not a directory" % sessions_dir)
        self.sessions_dir = sessions_dir

    def _read(self, path):
        """(value, None), (None, None) when absent, or (None, why) when it cannot be read."""
        try:
            # O_NOFOLLOW: a symlink planted in a session directory is reported, not followed.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None, None
        except OSError as exc:
            return None, "cannot be opened (%s)" % ("a symlink" if exc.errno == errno.ELOOP else exc.strerror)
        with os.fdopen(fd, "rb") as handle:
            data = handle.read()
        try:
            return json.loads(data), None
        except ValueError:
            return None, "is not JSON (%d bytes)" % len(data)

    def key_states(self, keys):
        """{(company, type, id): (line sha256 or None when absent, why unreadable or None)}."""
        out = {}
        for company, key_type, key_id in keys:
            path = os.path.join(self.sessions_dir, "company_" + company, codec.key_file_name(key_type, key_id))
            value, why = self._read(path)
            out[(company, key_type, key_id)] = (None if value is None else key_line_sha256(key_type, key_id, value), why)
        return out

    def creds_states(self, companies):
        out = {}
        for company in companies:
            value, why = self._read(os.path.join(self.sessions_dir, "company_" + company, "creds.json"))
            out[company] = (None if value is None else creds_line_sha256(value), why)
        return out


class PostgresStore:
    """The application's tables, read in one REPEATABLE READ snapshot."""

    name = "postgres"

    def __init__(self, db_url=None):
        try:
            import psycopg2
        except ImportError:
            raise UsageError("--store postgres needs psycopg2 (run the writer with the project's .venv python)") from None
        try:
            # No DSN: libpq takes PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE... from the environment.
            timeout = {} if os.environ.get("PGCONNECT_TIMEOUT") else {"connect_timeout": 10}
            self.conn = psycopg2.connect(db_url or "", application_name="baileys-dr-writer-check", **timeout)
        except psycopg2.Error as exc:
            # libpq's message names host and port, never the password.
            raise UsageError("cannot connect to PostgreSQL: %s" % str(exc).strip().splitlines()[0]) from None
        self.conn.set_session(isolation_level="REPEATABLE READ", readonly=True)

    def key_states(self, keys):
        out = {}
        with self.conn.cursor() as cur:
            for chunk in _chunks(keys):
                cur.execute(
                    "SELECT q.n, w.value::text FROM unnest(%s::text[], %s::text[], %s::text[]) WITH ORDINALITY"
                    " AS q(company_id, key_type, key_id, n) LEFT JOIN whatsapp_keys w USING (company_id, key_type, key_id)",
                    ([k[0] for k in chunk], [k[1] for k in chunk], [k[2] for k in chunk]))
                for number, text in cur.fetchall():
                    key = chunk[number - 1]
                    out[key] = (None if text is None else key_line_sha256(key[1], key[2], json.loads(text)), None)
        return out

    def creds_states(self, companies):
        out = dict.fromkeys(companies, (None, None))
        with self.conn.cursor() as cur:
            cur.execute("SELECT company_id, creds::text FROM whatsapp_auth WHERE company_id = ANY(%s)", (list(companies),))
            for company, text in cur.fetchall():
                out[company] = (creds_line_sha256(json.loads(text)), None)
        return out

    def close(self):
        self.conn.rollback()
        self.conn.close()


class Verdicts:
    """Lost and ambiguous keys, counted, with the first examples kept."""

    def __init__(self):
        self.lost = self.ambiguous = 0
        self.lost_examples, self.ambiguous_examples = [], []

    def add(self, ambiguous, company, key_type, key_id, why):
        example = {"company": company, "type": key_type, "id": key_id, "why": why}
        if ambiguous:
            self.ambiguous += 1
            if len(self.ambiguous_examples) < MAX_EXAMPLES:
                self.ambiguous_examples.append(example)
        else:
            self.lost += 1
            if len(self.lost_examples) < MAX_EXAMPLES:
                self.lost_examples.append(example)


def check(ledger, store, min_acknowledged=1):
    """Replays the ledger against the store. Returns the report (see docs/rehearsal.md)."""
    expected = Expectations()
    stats = Stats()
    for position, record in requests_of(ledger):
        expected.add(position, record)
        stats.add(record)
    verdicts = Verdicts()
    unverified = 0
    for chunk in _chunks(expected.keys.items()):
        states = store.key_states([key for key, _ in chunk])
        for key, (written, sha, position, sent) in chunk:
            found, why = states[key]
            if why and not written:
                verdicts.add(expected.key_ambiguous(key, position, sent, True), *key,
                             "present although deleted by line %d (its file %s)" % (position, why))
            elif why:
                verdicts.add(expected.key_ambiguous(key, position, sent, False), *key, "its file " + why)
            elif written and found is None:
                verdicts.add(expected.key_ambiguous(key, position, sent, False), *key,
                             "missing (written by line %d)" % position)
            elif written and sha is None:
                unverified += 1  # the service did not report the line's hash: presence is all there is to check
            elif written and found != sha:
                verdicts.add(expected.key_ambiguous(key, position, sent, True), *key,
                             "value differs from the one acknowledged by line %d" % position)
            elif not written and found is not None:
                verdicts.add(expected.key_ambiguous(key, position, sent, True), *key,
                             "present although deleted by line %d" % position)
    creds = store.creds_states(sorted(expected.creds))
    for company, (sha, position, sent) in sorted(expected.creds.items()):
        found, why = creds[company]
        if why or found is None:
            verdicts.add(expected.creds_ambiguous(company, position, sent), company, "creds", None,
                         "creds " + (why or "missing"))
        elif sha is None:
            unverified += 1
        elif found != sha:
            verdicts.add(expected.creds_ambiguous(company, position, sent), company, "creds", None,
                         "creds differ from the ones acknowledged by line %d" % position)
    whole = stats.result()
    problems = []
    if verdicts.lost:
        problems.append("%d acknowledged write(s) lost" % verdicts.lost)
    if whole["acknowledged"] < min_acknowledged:
        problems.append("%d request(s) acknowledged, fewer than %d: the ledger proves nothing"
                        % (whole["acknowledged"], min_acknowledged))
    return {
        "ledger": ledger,
        "store": store.name,
        "passed": not problems,
        "problems": problems,
        "requests": whole["requests"],
        "acknowledged": whole["acknowledged"],
        "failed": whole["failed"],
        "unanswered": whole["unanswered"],
        "writes_acked": expected.writes_acked,
        "deletes_acked": expected.deletes_acked,
        "keys_checked": len(expected.keys),
        "creds_checked": len(expected.creds),
        "unverified": unverified,
        "lost": verdicts.lost,
        "lost_examples": verdicts.lost_examples,
        "ambiguous": verdicts.ambiguous,
        "ambiguous_examples": verdicts.ambiguous_examples,
        "downtime": whole["downtime"],
        "stats": whole,
    }


# -- the load ------------------------------------------------------------------------------------

class Service:
    """The test application's HTTP endpoints; a new connection per request (it may restart any time)."""

    def __init__(self, url, timeout):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise UsageError("--url %r must be http://HOST:PORT" % url)
        try:
            self.port = parts.port or 80
        except ValueError:
            raise UsageError("--url %r has an invalid port" % url) from None
        self.host = parts.hostname
        self.base = parts.path.rstrip("/")
        self.timeout = timeout

    def call(self, method, path, body=None):
        """(status, parsed JSON answer or None, error text or None, whether the request was sent)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            try:
                conn.connect()
            except OSError as exc:
                return None, None, _error_text(exc), False
            try:
                data = None if body is None else json.dumps(body).encode("utf-8")
                headers = {"content-type": "application/json"} if data is not None else {}
                conn.request(method, self.base + path, body=data, headers=headers)
                response = conn.getresponse()
                raw = response.read(MAX_ANSWER_BYTES + 1)
            except (OSError, http.client.HTTPException) as exc:
                return None, None, _error_text(exc), True
            try:
                answer = json.loads(raw) if len(raw) <= MAX_ANSWER_BYTES else None
            except ValueError:
                answer = None
            return response.status, answer, None, True
        finally:
            conn.close()

    def companies(self):
        """The companies /health lists (any status: a 503 still names them), or None."""
        status, answer, _, _ = self.call("GET", "/health")
        if not isinstance(answer, dict):
            return None
        found = set()
        for field in ("registrationIds", "digests", "identities"):
            if isinstance(answer.get(field), dict):
                found.update(answer[field])
        return sorted(c for c in found if codec.COMPANY_ID_RE.match(c)) or None


def _error_text(exc):
    if isinstance(exc, TimeoutError) or "timed out" in str(exc):
        return "timeout"
    name = type(exc).__name__
    return "%s: %s" % (name, exc) if str(exc) else name


def _keys(entries, with_sha):
    """The answer's key list as the ledger keeps it, or None when it is not a list of {type, id}."""
    if not isinstance(entries, list):
        return None
    out = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("type"), str) or not isinstance(entry.get("id"), str):
            return None
        item = {"type": entry["type"], "id": entry["id"]}
        if with_sha:
            sha = entry.get("line_sha256")
            item["line_sha256"] = sha if _is_sha256(sha) else None
        out.append(item)
    return out


def outcome_of(status, answer, error, sent):
    """(outcome, the effects the answer lists or None)."""
    effects = None
    if isinstance(answer, dict):
        written, deleted = _keys(answer.get("written"), True), _keys(answer.get("deleted"), False)
        if written is not None and deleted is not None:
            sha = answer.get("creds_sha256")
            effects = {"written": written, "deleted": deleted, "creds_changed": answer.get("creds_changed"),
                       "creds_sha256": sha if _is_sha256(sha) else None,
                       "digest": answer.get("digest") if isinstance(answer.get("digest"), str) else None}
    if status == 200 and effects is not None:
        return ACK, effects
    if effects is not None:
        return APPLIED, effects
    if not sent or (status is not None and (400 <= status < 500 or status == 503)):
        return FAILED, None
    return UNANSWERED, None


class Writer:
    """Posts /simulate at a steady rate, one request at a time, and records every outcome."""

    def __init__(self, service, ledger, rate, companies, duration, params, run_id=None, log=sys.stderr):
        self.service, self.ledger_path = service, ledger
        self.interval = 1.0 / rate
        self.rate = rate
        self.companies_arg, self.duration, self.params = companies, duration, params
        self.run_id = run_id or "%s-%s" % (time.strftime("%Y%m%dT%H%M%S", time.gmtime()), secrets.token_hex(4))
        self.stop_event = threading.Event()
        self.reason = None
        self.log = log
        self.stats = Stats()

    def stop(self, reason):
        self.reason = self.reason or reason
        self.stop_event.set()

    def say(self, text):
        print("%s writer: %s" % (iso(time.time()), text), file=self.log, flush=True)

    def resolve_companies(self):
        if self.companies_arg != "auto":
            return self.companies_arg
        while not self.stop_event.is_set():
            found = self.service.companies()
            if found:
                return found
            self.say("no company listed by /health yet; retrying")
            self.stop_event.wait(1.0)
        return None

    def request(self, seq, company):
        """(the ledger record of one /simulate request, sent and done as epoch seconds)."""
        body = dict(self.params, company=company, seed="%s-%d" % (self.run_id, seq))
        sent = time.time()
        status, answer, error, was_sent = self.service.call("POST", "/simulate", body)
        done = time.time()
        outcome, effects = outcome_of(status, answer, error, was_sent)
        if error is None and outcome != ACK and isinstance(answer, dict) and isinstance(answer.get("error"), str):
            error = answer["error"][:300]
        record = {"kind": "request", "run": self.run_id, "seq": seq, "company": company, "seed": body["seed"],
                  "params": self.params, "sent": iso(sent), "done": iso(done), "outcome": outcome,
                  "status": status, "error": error}
        if effects:
            record.update(effects)
        return record, sent, done

    def run(self):
        ledger = LedgerFile(self.ledger_path)
        started = time.time()
        seq = 0
        try:
            companies = self.resolve_companies()
            ledger.append({"kind": "run", "v": LEDGER_VERSION, "run": self.run_id, "pid": os.getpid(),
                           "started": iso(started), "url": "http://%s:%d%s" % (self.service.host, self.service.port, self.service.base),
                           "companies": companies or [], "rate": self.rate, "params": self.params})
            self.say("run %s: %s request(s)/s over %d company(ies)" % (self.run_id, self.rate, len(companies or [])))
            deadline = started + self.duration if self.duration else None
            next_at = time.monotonic()
            acked_before = True
            while companies and not self.stop_event.is_set():
                if deadline is not None and time.time() >= deadline:
                    self.stop("duration")
                    break
                seq += 1
                record, sent, done = self.request(seq, companies[(seq - 1) % len(companies)])
                ledger.append(record)
                self.stats.add(dict(record, sent_at=sent, done_at=done))
                acked = record["outcome"] == ACK
                if acked != acked_before:
                    self.say("request %d: %s%s" % (seq, record["outcome"], "" if acked else " (%s)" % (record["error"] or record["status"])))
                    acked_before = acked
                # A steady pace; after a slow request, no burst to catch up.
                next_at = max(next_at + self.interval, time.monotonic())
                self.stop_event.wait(next_at - time.monotonic())
        finally:
            summary = self.stats.result()
            ledger.append({"kind": "run_end", "run": self.run_id, "pid": os.getpid(), "started": iso(started),
                           "ended": iso(time.time()), "reason": self.reason or "error", "summary": summary})
            ledger.close()
        self.say("run %s ended (%s): %s" % (self.run_id, self.reason, summary_line(summary)))
        return summary


def summary_line(summary):
    gap = summary["downtime"]
    text = "%d requests, %d acknowledged, %d failed (%d unanswered)" % (
        summary["requests"], summary["acknowledged"], summary["failed"], summary["unanswered"])
    if summary["seconds"]:
        text += " in %.1f s" % summary["seconds"]
    if summary["acks_per_second"] is not None:
        text += ", %.2f acknowledged/s" % summary["acks_per_second"]
    if gap["seconds"] is not None:
        text += "; longest gap between acknowledged requests %.2f s (%s to %s)" % (gap["seconds"], gap["from"], gap["to"])
    return text


# -- start / stop --------------------------------------------------------------------------------

def writer_process(pid):
    """The ledger path of a running `writer run` process with this pid, or None (gone, zombie, or not a writer)."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as handle:
            state = handle.read().rsplit(b")", 1)[1].split()[0]
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            argv = handle.read().decode("utf-8", "replace").split("\0")
    except (OSError, IndexError):
        return None
    # A pid file can outlive its process and the pid be reused: only a writer is ever signalled.
    if state == b"Z" or "run" not in argv or not any(os.path.basename(a) in ("writer.py", "writer") for a in argv):
        return None
    return argv[argv.index("--ledger") + 1] if "--ledger" in argv[:-1] else ""


def read_pid_file(path):
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UsageError("--pid-file %s cannot be read: %s" % (path, exc.strerror)) from None
    if not text.isdigit() or not 0 < int(text) < 2 ** 22:
        raise UsageError("--pid-file %s does not hold a pid" % path)
    return int(text)


def write_pid_file(path, pid):
    tmp = "%s.tmp-%d" % (path, os.getpid())
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write("%d\n" % pid)
    os.replace(tmp, path)


def run_end_of(ledger, run_id=None, pid=None, tail_bytes=256 * 1024):
    """The last run_end record of a run (by id or pid) among the ledger's last lines, or None."""
    try:
        with open(ledger, "rb") as handle:
            handle.seek(max(0, os.fstat(handle.fileno()).st_size - tail_bytes))
            lines = handle.read().split(b"\n")
    except OSError:
        return None
    for raw in reversed(lines):
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("kind") == "run_end" and (
                record.get("run") == run_id if run_id else record.get("pid") == pid):
            return record
    return None


def first_request_seen(ledger, offset, run_id):
    try:
        with open(ledger, "rb") as handle:
            handle.seek(offset)
            for raw in handle:
                if b'"kind":"request"' in raw and ('"run":%s' % json.dumps(run_id)).encode() in raw:
                    return True
    except FileNotFoundError:
        pass
    return False


def start(args):
    pid_file = os.path.abspath(args.pid_file)
    for option, path in (("--pid-file", pid_file), ("--ledger", args.ledger), ("--log", args.log)):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise UsageError("%s %s: its directory does not exist" % (option, path))
    running = read_pid_file(pid_file)
    if running and writer_process(running) is not None:
        raise UsageError("a writer is already running with pid %d (--pid-file %s)" % (running, pid_file))
    ledger = os.path.abspath(args.ledger)
    log_path = os.path.abspath(args.log or ledger + ".log")
    run_id = "%s-%s" % (time.strftime("%Y%m%dT%H%M%S", time.gmtime()), secrets.token_hex(4))
    offset = os.path.getsize(ledger) if os.path.exists(ledger) else 0
    argv = [sys.executable, os.path.abspath(__file__), "run", "--url", args.url, "--ledger", ledger,
            "--rate", repr(args.rate), "--companies", args.companies_text, "--new-keys", str(args.new_keys),
            "--consume-pre-keys", str(args.consume_pre_keys), "--timeout", repr(args.timeout), "--run-id", run_id,
            "--touch-creds" if args.touch_creds else "--no-touch-creds"]
    if args.duration:
        argv += ["--duration", repr(args.duration)]
    with open(log_path, "ab") as log:
        # Its own session, no inherited descriptors: Ansible's command module (which waits for its
        # output pipes to close) and a shell's job control let it run on.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/",
                                start_new_session=True, close_fds=True)
    write_pid_file(pid_file, proc.pid)
    deadline = time.monotonic() + args.start_timeout
    while not first_request_seen(ledger, offset, run_id):
        if proc.poll() is not None:
            os.unlink(pid_file)
            raise StartError("the writer exited with status %d before its first request; see %s:\n%s"
                             % (proc.returncode, log_path, _tail(log_path)))
        if time.monotonic() > deadline:
            print("writer: no request attempted within %ss (is /health listing companies?); it keeps trying, log %s"
                  % (args.start_timeout, log_path), file=sys.stderr)
            break
        time.sleep(0.05)
    print(proc.pid)
    return 0


class StartError(Exception):
    """start or stop did not do what was asked: exit status 1."""


def _tail(path, size=2000):
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, os.fstat(handle.fileno()).st_size - size))
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return ""


def stop(args):
    pid = read_pid_file(args.pid_file)
    ledger = writer_process(pid) if pid else None
    if ledger is None:
        if pid:
            os.unlink(args.pid_file)
        text = "writer: no writer running (%s)" % ("pid %d is gone" % pid if pid else "no pid file %s" % args.pid_file)
        if args.missing_ok:
            print(text)
            return 0
        raise StartError(text)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.wait
    while writer_process(pid) is not None:
        if time.monotonic() > deadline:
            raise StartError("writer %d did not exit within %ss of SIGTERM" % (pid, args.wait))
        time.sleep(0.05)
    os.unlink(args.pid_file)
    end = run_end_of(ledger, pid=pid) if ledger else None
    if end is None or not isinstance(end.get("summary"), dict):
        print("writer %d stopped (no summary in its ledger %s)" % (pid, ledger))
    else:
        print("writer %d stopped (%s): %s" % (pid, end.get("reason"), summary_line(end["summary"])))
    return 0


# -- command line --------------------------------------------------------------------------------

def _positive(kind, low=0.0):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError("%r is not a number" % text) from None
        if value <= low if kind is float else value < low:
            raise argparse.ArgumentTypeError("%r is too small" % text)
        return value
    return parse


def _count(text):
    value = _positive(int)(text)
    if value > 1000:
        raise argparse.ArgumentTypeError("%r: at most 1000" % text)
    return value


def parser():
    top = argparse.ArgumentParser(prog="writer", description=__doc__.split("\n\n")[0],
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True)

    load = argparse.ArgumentParser(add_help=False)
    load.add_argument("--url", required=True, help="the test application, e.g. http://127.0.0.1:3011")
    load.add_argument("--ledger", required=True, help="the ledger (JSON lines, appended to)")
    load.add_argument("--rate", type=_positive(float), default=5.0, help="requests per second (default 5)")
    load.add_argument("--companies", default="auto", help="a,b,... or auto: the companies /health lists (default)")
    load.add_argument("--duration", type=_positive(float), help="seconds, then stop (default: until SIGTERM/SIGINT)")
    # 4 new keys a request include one pre-key (the application's type cycle: session, sender-key,
    # app-state-sync-key, pre-key): as many pre-keys written as consumed, so hours of load never
    # run a company out of pre-keys.
    load.add_argument("--new-keys", type=_count, default=4, help="newKeys of each request (default 4)")
    load.add_argument("--consume-pre-keys", type=_count, default=1, help="consumePreKeys of each request (default 1)")
    load.add_argument("--touch-creds", action=argparse.BooleanOptionalAction, default=True,
                      help="touchCreds of each request (default: yes)")
    load.add_argument("--timeout", type=_positive(float), default=5.0, help="seconds per request (default 5)")

    run = sub.add_parser("run", parents=[load], help="write until SIGTERM/SIGINT or --duration")
    run.add_argument("--run-id", help=argparse.SUPPRESS)
    begin = sub.add_parser("start", parents=[load], help="run detached; print its pid once it made its first request")
    begin.add_argument("--pid-file", required=True)
    begin.add_argument("--log", help="the detached writer's output (default: LEDGER.log)")
    begin.add_argument("--start-timeout", type=_positive(float), default=30.0)
    end = sub.add_parser("stop", help="SIGTERM the writer of --pid-file, wait for it, print its summary")
    end.add_argument("--pid-file", required=True)
    end.add_argument("--wait", type=_positive(float), default=30.0, help="seconds to wait for it to exit (default 30)")
    end.add_argument("--missing-ok", action="store_true", help="no running writer is not an error")

    verify = sub.add_parser("check", help="every acknowledged write is in the store")
    verify.add_argument("--ledger", required=True)
    verify.add_argument("--store", required=True, choices=("postgres", "files"))
    verify.add_argument("--db-url", help="PostgreSQL connection URL (default: libpq PG* variables)")
    verify.add_argument("--sessions", help="the sessions tree (--store files)")
    verify.add_argument("--min-acknowledged", type=_positive(int), default=1,
                        help="fewer acknowledged requests fail the check (default 1)")
    verify.add_argument("--json", action="store_true")

    stats = sub.add_parser("stats", help="counts, throughput and downtime of a time window")
    stats.add_argument("--ledger", required=True)
    stats.add_argument("--from", dest="start", help="ISO 8601 time or epoch seconds")
    stats.add_argument("--to", dest="end", help="ISO 8601 time or epoch seconds")
    stats.add_argument("--json", action="store_true")
    return top


def companies_option(text):
    if text == "auto":
        return "auto"
    names = [name.strip() for name in text.split(",") if name.strip()]
    bad = [name for name in names if not codec.COMPANY_ID_RE.match(name)]
    if not names or bad:
        raise UsageError("--companies must be auto or company ids [A-Za-z0-9_-]{1,50} separated by commas%s"
                         % (" (invalid: %r)" % bad[0] if bad else ""))
    return names


def params_of(args):
    return {"newKeys": args.new_keys, "consumePreKeys": args.consume_pre_keys, "touchCreds": args.touch_creds}


def command_run(args):
    writer = Writer(Service(args.url, args.timeout), args.ledger, args.rate, companies_option(args.companies),
                    args.duration, params_of(args), run_id=args.run_id)
    signal.signal(signal.SIGTERM, lambda *_: writer.stop("SIGTERM"))
    signal.signal(signal.SIGINT, lambda *_: writer.stop("SIGINT"))
    writer.run()
    return 0


def command_check(args):
    if args.store == "files" and not args.sessions:
        raise UsageError("--store files needs --sessions DIR")
    if args.store == "postgres" and args.sessions:
        raise UsageError("--sessions is for --store files")
    store = FilesStore(args.sessions) if args.store == "files" else PostgresStore(args.db_url)
    try:
        report = check(args.ledger, store, args.min_acknowledged)
    finally:
        if hasattr(store, "close"):
            store.close()
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(check_text(report))
    return 0 if report["passed"] else 1


def check_text(report):
    lines = [
        "ledger %s: %d requests, %d acknowledged, %d failed (%d unanswered); %d writes and %d deletes acknowledged"
        % (report["ledger"], report["requests"], report["acknowledged"], report["failed"], report["unanswered"],
           report["writes_acked"], report["deletes_acked"]),
        "store %s: %d keys and %d creds checked: %d lost, %d ambiguous, %d present but not hash-checked"
        % (report["store"], report["keys_checked"], report["creds_checked"], report["lost"], report["ambiguous"],
           report["unverified"]),
        "whole ledger: " + summary_line(report["stats"]),
    ]
    for kind, examples in (("LOST", report["lost_examples"]), ("ambiguous", report["ambiguous_examples"])):
        for example in examples:
            lines.append("%s: company %s %s %s: %s" % (kind, example["company"], example["type"],
                                                      json.dumps(example["id"]) if example["id"] is not None else "",
                                                      example["why"]))
    lines.append("FAILED: " + "; ".join(report["problems"]) if report["problems"] else
                 "OK: no acknowledged write lost")
    return "\n".join(lines)


def command_stats(args):
    start_at = parse_time(args.start, "--from") if args.start else None
    end_at = parse_time(args.end, "--to") if args.end else None
    if start_at is not None and end_at is not None and end_at < start_at:
        raise UsageError("--to is before --from")
    result = ledger_stats(args.ledger, start_at, end_at)
    print(json.dumps(result, indent=1) if args.json else summary_line(result))
    return 0


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        if args.command in ("run", "start"):
            args.companies_text = args.companies
            companies_option(args.companies)
        return {"run": command_run, "start": start, "stop": stop, "check": command_check, "stats": command_stats}[args.command](args)
    except UsageError as exc:
        print("writer: error: %s" % exc, file=sys.stderr)
        return 2
    except StartError as exc:
        print("writer: %s" % exc, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
