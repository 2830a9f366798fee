# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Age buckets of keys, said once: the cleanup's plan and health's report count keys in the same buckets.

Bounds in days, the lower one included and the upper one excluded; a time in the future counts in the first bucket,
a row without a time in `unknown`.
"""

from __future__ import annotations

AGE_BUCKETS = (("0-1d", None, 1), ("1-7d", 1, 7), ("7-14d", 7, 14), ("14-30d", 14, 30), ("30d+", 30, None))
UNKNOWN_AGE = "unknown"
BUCKET_NAMES = tuple(name for name, _low, _high in AGE_BUCKETS) + (UNKNOWN_AGE,)


def bucket_of(age_days):
    """The bucket of an age in days (None: unknown)."""
    if age_days is None:
        return UNKNOWN_AGE
    for name, low, high in AGE_BUCKETS:
        if (low is None or age_days >= low) and (high is None or age_days < high):
            return name
    raise AssertionError(age_days)


def bucket_conditions(column, ref):
    """[(bucket, SQL condition)] on a timestamp column against the reference time ref, as bucket_of() bounds them;
    the last is the unknown bucket (column IS NULL)."""
    conditions = []
    for name, low, high in AGE_BUCKETS:
        parts = []
        if high is not None:
            parts.append("%s > %s - interval '%d days'" % (column, ref, high))
        if low is not None:
            parts.append("%s <= %s - interval '%d days'" % (column, ref, low))
        conditions.append((name, " AND ".join(parts)))
    return conditions + [(UNKNOWN_AGE, "%s IS NULL" % column)]
