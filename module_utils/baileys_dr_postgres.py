# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""PostgreSQL connection options shared by the baileys-dr modules.

Option names follow community.postgresql (login_host, login_port, ...), plus
db_url; unset options fall back to the libpq PG* environment variables.
Errors never carry the password: psycopg2 messages are scrubbed first.

With statement_timeout set, every wait on the server also has a client-side
deadline (statement_timeout + connect_timeout without any answer): a frozen
server (SIGSTOP, `docker pause`) enforces no statement_timeout, and its kernel
still answers TCP keepalives, so without it libpq would wait for ever.
"""

from __future__ import annotations

import os
import re
import select
import threading
import time
import weakref

from ansible.module_utils.baileys_dr_secrets import MASK

try:
    import psycopg2
    import psycopg2.extensions
    import psycopg2.extras

    HAS_PSYCOPG2 = True
    PSYCOPG2_IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - depends on the target host
    psycopg2 = None
    HAS_PSYCOPG2 = False
    PSYCOPG2_IMPORT_ERROR = exc


def postgres_argument_spec():
    """Connection options, to merge into a module's argument_spec."""
    return dict(
        db_url=dict(type="str", no_log=True, aliases=["dsn"]),
        login_host=dict(type="str", aliases=["host"]),
        login_port=dict(type="int", aliases=["port"]),
        login_user=dict(type="str", aliases=["user"]),
        login_password=dict(type="str", no_log=True, aliases=["password"]),
        login_db=dict(type="str", aliases=["db", "database"]),
        ssl_mode=dict(type="str", choices=["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]),
        ca_cert=dict(type="path", aliases=["ssl_rootcert"]),
        connect_timeout=dict(type="int", default=10),
        statement_timeout=dict(type="int", default=0, aliases=["statement_timeout_ms"]),
    )


_OPTION_TO_LIBPQ = (
    ("login_host", "host", "PGHOST"),
    ("login_port", "port", "PGPORT"),
    ("login_user", "user", "PGUSER"),
    ("login_password", "password", "PGPASSWORD"),
    ("login_db", "dbname", "PGDATABASE"),
    ("ssl_mode", "sslmode", "PGSSLMODE"),
    ("ca_cert", "sslrootcert", "PGSSLROOTCERT"),
)


def connection_kwargs(params, application_name="baileys-dr"):
    """psycopg2.connect() keyword arguments from module params (PG* fallbacks)."""
    kwargs = {}
    if params.get("db_url"):
        kwargs["dsn"] = params["db_url"]
    for option, keyword, env in _OPTION_TO_LIBPQ:
        value = params.get(option)
        if value is None and not params.get("db_url"):
            value = os.environ.get(env)
        if value is not None and value != "":
            kwargs[keyword] = value
    kwargs["connect_timeout"] = params.get("connect_timeout") or 10
    kwargs["application_name"] = application_name
    options = []
    if params.get("statement_timeout"):
        options.append("-c statement_timeout=%d" % int(params["statement_timeout"]))
    if options:
        kwargs["options"] = " ".join(options)
    return kwargs


def describe_target(params):
    """host:port/db of the target, for messages (never the password)."""
    kwargs = connection_kwargs(params)
    if "dsn" in kwargs:
        try:
            parsed = psycopg2.extensions.parse_dsn(kwargs["dsn"])
        except Exception:  # an unparsable DSN is reported by connect()
            parsed = {}
        for key in ("host", "port", "dbname"):
            kwargs.setdefault(key, parsed.get(key))
    return "%s:%s/%s" % (kwargs.get("host") or "local socket", kwargs.get("port") or 5432, kwargs.get("dbname") or "(default)")


def scrub(message, params):
    """Remove every secret of params from an error message."""
    text = str(message)
    for secret in (params.get("login_password"), params.get("db_url"), os.environ.get("PGPASSWORD")):
        if secret:
            text = text.replace(secret, MASK)
    # A DSN echoed back by libpq: hide whatever follows password=.
    return re.sub(r"(password\s*=\s*)\S+", r"\1" + MASK, re.sub(r"(://[^:/@\s]+:)[^@\s]+@", r"\1" + MASK + "@", text))


class DatabaseError(Exception):
    """A connection or query error whose message is safe to show."""


# -- client-side deadline --------------------------------------------------------------------------------------
# psycopg2 has a single, process-wide wait callback ("green" mode): it is
# installed while at least one connection with a deadline is open, and waits
# without a deadline for every other connection. Green mode forbids COPY, so
# cursors of connect() suspend the callback around COPY (bounded by the server's
# statement_timeout only).

_deadline_lock = threading.RLock()
_deadline_conns = weakref.WeakSet()
_suspended = [0]


def _wait(conn):
    """psycopg2 wait callback: poll/select, giving up after conn's deadline without any answer."""
    limit = getattr(conn, "_baileys_dr_wait", None)
    connecting = getattr(conn, "_baileys_dr_connecting", False)
    if connecting:
        limit = getattr(conn, "_baileys_dr_connect_timeout", None)
        connect_deadline = time.monotonic() + limit if limit else None
    while True:
        state = conn.poll()
        if state == psycopg2.extensions.POLL_OK:
            return
        if state == psycopg2.extensions.POLL_READ:
            readers, writers = [conn.fileno()], []
        elif state == psycopg2.extensions.POLL_WRITE:
            readers, writers = [], [conn.fileno()]
        else:
            raise psycopg2.OperationalError("bad state from poll: %s" % state)
        # Connecting: libpq's connect_timeout does not apply to a polled connection, so it is
        # enforced here, in total, with libpq's own words. Afterwards: per wait, since any answer is progress.
        timeout = (max(0.0, connect_deadline - time.monotonic()) if connect_deadline else None) if connecting else limit
        ready = select.select(readers, writers, [], timeout)
        if not any(ready):
            if connecting:
                raise psycopg2.OperationalError("timeout expired")
            raise psycopg2.OperationalError(
                "no answer from PostgreSQL at %s within %s s (server frozen?)" % (conn._baileys_dr_target, _seconds(limit)))


def _seconds(value):
    return ("%.1f" % value).rstrip("0").rstrip(".")


def _refresh_wait_callback():
    """Install the callback while a connection with a deadline is open (and COPY is not running)."""
    with _deadline_lock:
        wanted = not _suspended[0] and any(not conn.closed for conn in list(_deadline_conns))
        psycopg2.extensions.set_wait_callback(_wait if wanted else None)


class _suspend_deadline(object):
    """Context manager: no wait callback (COPY cannot run in green mode)."""

    def __enter__(self):
        with _deadline_lock:
            _suspended[0] += 1
            _refresh_wait_callback()

    def __exit__(self, *exc):
        with _deadline_lock:
            _suspended[0] -= 1
            _refresh_wait_callback()


if HAS_PSYCOPG2:

    class _Cursor(psycopg2.extensions.cursor):
        """A cursor whose COPY runs outside green mode."""

        def copy_expert(self, *args, **kwargs):
            with _suspend_deadline():
                return super().copy_expert(*args, **kwargs)

        def copy_from(self, *args, **kwargs):
            with _suspend_deadline():
                return super().copy_from(*args, **kwargs)

        def copy_to(self, *args, **kwargs):
            with _suspend_deadline():
                return super().copy_to(*args, **kwargs)

    class _Connection(psycopg2.extensions.connection):
        """A connection that may carry a client-side deadline for _wait."""

        def __init__(self, dsn, *args, **kwargs):
            # Handed over by connect(): _wait needs them while libpq is still connecting.
            self._baileys_dr_wait = kwargs.pop("baileys_dr_wait", None)
            self._baileys_dr_connect_timeout = kwargs.pop("baileys_dr_connect_timeout", None)
            self._baileys_dr_target = kwargs.pop("baileys_dr_target", "PostgreSQL")
            self._baileys_dr_connecting = True
            try:
                super().__init__(dsn, *args, **kwargs)
            finally:
                self._baileys_dr_connecting = False
            self.cursor_factory = _Cursor

        def close(self):
            super().close()
            if self._baileys_dr_wait:
                _refresh_wait_callback()


def client_deadline(params):
    """Seconds without any answer after which a query gives up (0: never): statement_timeout + connect_timeout."""
    statement_timeout = params.get("statement_timeout") or 0
    if statement_timeout <= 0:
        return 0
    return statement_timeout / 1000.0 + float(params.get("connect_timeout") or 10)


def connect(params, application_name="baileys-dr", autocommit=False):
    if not HAS_PSYCOPG2:
        raise DatabaseError("the Python library psycopg2 is required on the host running this module: %s" % PSYCOPG2_IMPORT_ERROR)
    wait = client_deadline(params)
    kwargs = connection_kwargs(params, application_name)

    def factory(dsn, *args, **extra):
        return _Connection(dsn, *args, baileys_dr_wait=wait or None, baileys_dr_connect_timeout=float(kwargs["connect_timeout"]),
                           baileys_dr_target=describe_target(params), **extra)

    try:
        with _deadline_lock:
            if wait and not _suspended[0]:
                psycopg2.extensions.set_wait_callback(_wait)
        conn = psycopg2.connect(connection_factory=factory, **kwargs)
    except psycopg2.Error as exc:
        _refresh_wait_callback()
        raise DatabaseError("cannot connect to PostgreSQL at %s: %s" % (describe_target(params), scrub(exc, params).strip())) from None
    if wait:
        with _deadline_lock:
            _deadline_conns.add(conn)
    _refresh_wait_callback()
    conn.autocommit = autocommit
    return conn


def copy_text(text):
    """A field of COPY's text format."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


class CopyStream:
    """A file-like object feeding COPY FROM STDIN from an iterator of text lines, produced as PostgreSQL reads them.

    An exception of the iterator ends the data early and is kept in .error (raised by the caller once COPY returned):
    psycopg2 would otherwise turn it into an unrelated COPY error.
    """

    def __init__(self, lines):
        self._lines = iter(lines)
        self._rest = b""
        self.error = None

    def read(self, size=-1):
        size = 1 << 16 if size is None or size < 0 else size
        parts, length = [self._rest], len(self._rest)
        if self.error is None:
            try:
                for line in self._lines:
                    data = line.encode("utf-8")
                    parts.append(data)
                    length += len(data)
                    if length >= size:
                        break
            except Exception as exc:  # noqa: BLE001 - re-raised by the caller
                self.error = exc
        chunk = b"".join(parts)
        self._rest = chunk[size:]
        return chunk[:size]

    readline = read


# -- retry after a dropped connection ----------------------------------------------------------------------------
# A server restart or a network cut kills the connection, and with it the transaction in progress: PostgreSQL rolled
# it back, so the unit of work can be done again on a new connection. Anything else (a data, integrity or permission
# error, a query cancelled by statement_timeout, a serialization failure) says something about the work itself and is
# never retried here.

RETRY_DELAYS = (0.5, 1.0, 2.0)
# SQLSTATEs of a connection that is gone: class 08 (connection exception), admin/crash shutdown, cannot connect now.
_LOST_SQLSTATES = ("57P01", "57P02", "57P03")


def connection_lost(exc, conn=None):
    """Whether exc reports a dropped connection (never a data or integrity error).

    With conn, psycopg2's own verdict decides: it marks a connection closed (conn.closed != 0) when the server or the
    network dropped it. Without conn, the SQLSTATE does (none: libpq lost the server).
    """
    if psycopg2 is None or not isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)):
        return False
    if conn is not None:
        return bool(conn.closed)
    code = getattr(exc, "pgcode", None)
    return code is None or code.startswith("08") or code in _LOST_SQLSTATES


def retry_on_disconnect(action, what, reconnect=None, conn=None, delays=RETRY_DELAYS, log=None, sleep=time.sleep):
    """action() again after a dropped connection, at most len(delays) times, waiting delays[n] before the n-th retry.

    conn: a callable giving the connection action uses (for connection_lost), or None. reconnect: called before each
    retry (a DatabaseError or dropped connection there counts as one more failed attempt). log: a list that gets one
    {"what", "attempt", "waited", "error"} per retry. The last error is raised once the retries are spent; any other
    error at once.
    """
    attempt = 0
    while True:
        reconnecting = attempt > 0 and reconnect is not None
        try:
            if reconnecting:
                reconnect()
                reconnecting = False
            return action()
        except Exception as exc:  # noqa: BLE001 - re-raised unless it is a dropped connection
            if reconnecting:  # the server is not back yet (connect() raises DatabaseError)
                lost = isinstance(exc, DatabaseError) or connection_lost(exc)
            else:
                lost = connection_lost(exc, conn() if conn is not None else None)
            if not lost or attempt >= len(delays):
                raise
            if log is not None:
                log.append({"what": what, "attempt": attempt + 1, "waited": delays[attempt],
                            "error": " ".join(str(exc).split())[:300]})
            sleep(delays[attempt])
            attempt += 1
