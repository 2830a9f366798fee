# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Secrets, said once: which names hold secret values, the mask that replaces them, and secrets in free text.

Used by the modules (baileys_env_file's masked diff and arguments, baileys_pm2_process's messages, the database errors, the audit
record), the audit callback and the Sentry callback (which load this file through the module_utils path).
"""

from __future__ import annotations

import re

MASK = "********"

# Names whose values are secrets (searched, case-insensitive): passwords, tokens, keys, DSNs and URLs (they carry
# credentials), private material. `auth` only as a word of its own (AUTH, BASIC_AUTH): USE_DATABASE_AUTH_STATE is the
# switch every failover sets and must stay readable in diffs and records.
SECRET_NAME_PATTERN = r"pass|secret|token|dsn|url|key$|_key|credential|private|cookie|(?:^|_)auth$"
SECRET_NAME = re.compile(SECRET_NAME_PATTERN, re.IGNORECASE)

# Secrets inside free text: PEM private keys, credentials in URLs, bearer tokens, Telegram bot tokens in API paths,
# name=value and name: value pairs of secret-looking names.
SECRET_TEXT = (
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|$)", re.S), MASK),
    (re.compile(r"(?i)([a-z][a-z0-9+.-]*://)[^/\s@'\"]+@"), r"\1" + MASK + "@"),
    (re.compile(r"(?i)/bot[0-9]+:[A-Za-z0-9_-]+"), "/bot" + MASK),
    (re.compile(r"(?i)\b(bearer|basic|token)(\s+)[A-Za-z0-9._~+/=-]{8,}"), r"\1\2" + MASK),
    (re.compile(r"(?i)([\w.-]*(?:pass(?:word|wd|phrase)?|secret|token|api[_-]?key|private[_-]?key|credential|dsn)[\w.-]*"
                r"['\"]?\s*[:=]\s*['\"]?)([^\s'\",;&(){}\[\]]+)"), r"\1" + MASK),
)


def is_secret_name(name):
    """Whether a variable, option or field of this name holds a secret."""
    return bool(SECRET_NAME.search(str(name)))


def mask_values(text, secrets):
    """text with every occurrence of a known secret value replaced by MASK (the longest first, so that a secret
    containing another is masked whole)."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def mask_shapes(text):
    """text with the secrets recognisable by their shape (SECRET_TEXT) replaced by MASK."""
    for pattern, replacement in SECRET_TEXT:
        text = pattern.sub(replacement, text)
    return text
