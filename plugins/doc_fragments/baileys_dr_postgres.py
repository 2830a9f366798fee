# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Connection options of every baileys-dr module that talks to PostgreSQL
(module_utils/baileys_dr_postgres.py: postgres_argument_spec)."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  db_url:
    description: libpq connection URI; takes precedence over the login_* options.
    type: str
    aliases: [dsn]
  login_host:
    description: Database host; default from C(PGHOST).
    type: str
    aliases: [host]
  login_port:
    description: Database port; default from C(PGPORT).
    type: int
    aliases: [port]
  login_user:
    description: Database user; default from C(PGUSER).
    type: str
    aliases: [user]
  login_password:
    description: Password of O(login_user); default from C(PGPASSWORD). Never logged or returned.
    type: str
    aliases: [password]
  login_db:
    description: Database name; default from C(PGDATABASE).
    type: str
    aliases: [db, database]
  ssl_mode:
    description: libpq sslmode.
    type: str
    choices: [disable, allow, prefer, require, verify-ca, verify-full]
  ca_cert:
    description: CA certificate file for O(ssl_mode=verify-ca) or O(ssl_mode=verify-full).
    type: path
    aliases: [ssl_rootcert]
  connect_timeout:
    description: Seconds to wait for a connection; a frozen server must not hang a DR run.
    type: int
    default: 10
  statement_timeout:
    description:
      - Statement timeout in milliseconds (0 for none).
      - The client also stops waiting O(statement_timeout) plus O(connect_timeout) seconds without an answer,
        so a frozen server fails the task instead of hanging it.
    type: int
    default: 0
    aliases: [statement_timeout_ms]
requirements:
  - psycopg2
"""
