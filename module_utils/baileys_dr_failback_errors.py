# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The failback's errors: every message is safe to show (no secret, no key value).
"""

from __future__ import annotations


from ansible.module_utils.baileys_dr_tree import SessionsError


class FailbackError(SessionsError):
    """An error whose message is safe to show (no secret, no key value)."""


class CompanyRefused(FailbackError):
    """A company that cannot be imported as its files are (refused before any write of it)."""


class Deferred(FailbackError):
    """A company whose files changed while it was read or imported (changed_during_read=defer): left to the delta pass."""


class BaseStale(Exception):
    """Delta pass, per file: the company's rows are no longer the bulk pass's (its fingerprint moved): read it whole."""


class FileProblem(Exception):
    """Why one file cannot be imported."""
