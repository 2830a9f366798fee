# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Reading the application's PostgreSQL auth-state store, one company at a time.

Queries go company by company: the index on company_id finds the rows and
the sort stays small, so memory does not grow with the table.
"""

from __future__ import annotations

import json

from ansible.module_utils.baileys_dr_codec import VALUE_ERRORS, StateDigest, row_name, value_problem

# Byte order of ids, the order of the state digest (docs/architecture.md).
KEYS_OF_COMPANY = (
    'SELECT key_type, key_id, value::text FROM whatsapp_keys WHERE company_id = %s '
    'ORDER BY key_type COLLATE "C", key_id COLLATE "C"'
)
FETCH_SIZE = 2000


class StoreValueError(Exception):
    """A stored value that cannot be read or digested; the message names its row (company, type, id)."""

    def __init__(self, company_id, key_type, key_id, exc):
        super().__init__("%s: the value %s; the state digest cannot be computed"
                         % (row_name(company_id, key_type, key_id), value_problem(exc)))


def list_companies(conn, companies=None):
    """Company ids having creds or keys (optionally only those in companies), in byte order."""
    sql = (
        'SELECT company_id FROM (SELECT company_id FROM whatsapp_auth {where} UNION '
        'SELECT DISTINCT company_id FROM whatsapp_keys {where}) ids ORDER BY company_id COLLATE "C"'
    )
    with conn.cursor() as cur:
        if companies:
            cur.execute(sql.format(where="WHERE company_id = ANY(%(ids)s)"), {"ids": list(companies)})
        else:
            cur.execute(sql.format(where=""))
        return [row[0] for row in cur.fetchall()]


def company_creds_text(conn, company_id):
    with conn.cursor() as cur:
        cur.execute("SELECT creds::text FROM whatsapp_auth WHERE company_id = %s", (company_id,))
        row = cur.fetchone()
    return None if row is None else row[0]


def iter_company_keys(conn, company_id):
    """(type, id, value as JSON text) of one company's keys in digest order, fetched in pages."""
    with conn.cursor() as cur:
        cur.execute(KEYS_OF_COMPANY, (company_id,))
        while True:
            rows = cur.fetchmany(FETCH_SIZE)
            if not rows:
                return
            yield from rows


def company_digest(conn, company_id):
    """(digest, key count) of one company as the database holds it.

    StoreValueError names a row whose value cannot be read (PostgreSQL accepts values nested far deeper
    than Python reads).
    """
    text = company_creds_text(conn, company_id)
    try:
        digest = StateDigest(None if text is None else json.loads(text))
    except VALUE_ERRORS as exc:
        raise StoreValueError(company_id, None, None, exc) from None
    for key_type, key_id, text in iter_company_keys(conn, company_id):
        try:
            digest.add(key_type, key_id, json.loads(text))
        except VALUE_ERRORS as exc:
            raise StoreValueError(company_id, key_type, key_id, exc) from None
    return digest.hexdigest(), digest.keys
