# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""PostgreSQL connection options shared by the baileys-dr modules.

Option names follow community.postgresql (login_host, login_port, ...), plus
db_url; unset options fall back to the libpq PG* environment variables.
Errors never carry the password: psycopg2 messages are scrubbed first.
"""

from __future__ import annotations

import os
import re

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
            text = text.replace(secret, "********")
    # A DSN echoed back by libpq: hide whatever follows password=.
    return re.sub(r"(password\s*=\s*)\S+", r"\1********", re.sub(r"(://[^:/@\s]+:)[^@\s]+@", r"\1********@", text))


class DatabaseError(Exception):
    """A connection or query error whose message is safe to show."""


def connect(params, application_name="baileys-dr", autocommit=False):
    if not HAS_PSYCOPG2:
        raise DatabaseError("the Python library psycopg2 is required on the host running this module: %s" % PSYCOPG2_IMPORT_ERROR)
    try:
        conn = psycopg2.connect(**connection_kwargs(params, application_name))
    except psycopg2.Error as exc:
        raise DatabaseError("cannot connect to PostgreSQL at %s: %s" % (describe_target(params), scrub(exc, params).strip())) from None
    conn.autocommit = autocommit
    return conn
