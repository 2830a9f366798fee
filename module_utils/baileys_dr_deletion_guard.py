# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The deletion guard of a standby refresh: a mass deletion in the database is refused before anything is written,
recorded beside the copy (.baileys-dr/refresh-refused.json), and read back for health (standby_refusal).
"""

from __future__ import annotations

import os

from ansible.module_utils.baileys_dr_files import open_dir
from ansible.module_utils.baileys_dr_manifests import load_top_manifest, read_json_at
from ansible.module_utils.baileys_dr_tree import FORMAT, META_DIR, REFUSED_NAME, SessionsError, iso, utc_now

GUARD_SHOWN = 5


class DeletionGuard:
    """The mass-change guard of a standby refresh, decided before anything is written.

    The standby copy exists for the day the database is wrong: a refresh that copied an emptied or mass-deleted
    table into it (and archived that as a new generation) would destroy the copy DR relies on. Counted per company
    from the copy's top manifest (keys it holds) and the database's statistics (keys it has, one aggregate query the
    refresh runs anyway): a company with fewer keys loses at least the difference, a company gone or left without a
    key loses all. Churn (consumed pre-keys replaced by new ones) is no mass deletion and is not counted.

    Refused: a database without any company, or without any key, while the copy has some; more than
    max_delete_share of the copy's keys removed; every key of a company holding more than
    max_company_keys_removed keys removed. force overrides (the result says so).
    """

    def __init__(self, params):
        self.max_share = params.get("max_delete_share")
        self.max_company_keys = params.get("max_company_keys_removed")
        self.force = bool(params.get("force"))
        if self.max_share is None or not 0 <= self.max_share <= 1:
            raise SessionsError("max_delete_share must be between 0 and 1 (1 turns the share rule off), got %r" % (self.max_share,))
        if self.max_company_keys is None or self.max_company_keys < 0:
            raise SessionsError("max_company_keys_removed must be 0 or more, got %r" % (self.max_company_keys,))

    def check(self, top, stats):
        """{"keys_in_copy", "keys_in_database", "keys_removed", "share", "companies_in_copy", "companies_in_database",
        "companies_losing_all_keys", "companies": [{"company_id", "keys", "gone"}] (the largest first, at most GUARD_SHOWN),
        "reasons": [...], "refused": bool, "overridden": bool}."""
        database = {company_id: keys for company_id, keys, _fingerprint, _creds in stats}
        before = removed = 0
        emptied = []
        for company_id, entry in top["companies"].items():
            old = entry.get("keys") if isinstance(entry.get("keys"), int) else 0
            new = database.get(company_id, 0)
            before += old
            removed += max(0, old - new)
            if new == 0 and old > self.max_company_keys:
                emptied.append((old, company_id))
        emptied.sort(key=lambda item: (-item[0], item[1].encode("utf-8")))
        after = sum(database.values())
        share = removed / before if before else 0.0
        report = {"keys_in_copy": before, "keys_in_database": after, "keys_removed": removed, "share": round(share, 6),
                  "companies_in_copy": len(top["companies"]), "companies_in_database": len(database),
                  "companies_losing_all_keys": len(emptied),
                  "companies": [{"company_id": c, "keys": k, "gone": c not in database} for k, c in emptied[:GUARD_SHOWN]],
                  "limits": {"max_delete_share": self.max_share, "max_company_keys_removed": self.max_company_keys}}
        reasons = []
        if top["companies"] and not database:
            reasons.append("the database has no company at all while the copy holds %d companies and %d keys (an emptied or "
                           "wrong database?)" % (len(top["companies"]), before))
        elif before and not after:
            reasons.append("the database has no key at all while the copy holds %d keys of %d companies (an emptied table?)"
                           % (before, len(top["companies"])))
        else:
            if share > self.max_share:
                reasons.append("it would delete %d of the copy's %d keys (%.1f%%, more than max_delete_share=%s)"
                               % (removed, before, 100 * share, self.max_share))
            if emptied:
                shown = ", ".join("%s: %d keys%s" % (c, k, ", gone from the database" if c not in database else "")
                                  for k, c in emptied[:GUARD_SHOWN])
                reasons.append("it would delete every key of %d compan%s holding more than max_company_keys_removed=%d keys (%s%s)"
                               % (len(emptied), "y" if len(emptied) == 1 else "ies", self.max_company_keys, shown,
                                  ", ..." if len(emptied) > GUARD_SHOWN else ""))
        report.update(reasons=reasons, refused=bool(reasons) and not self.force, overridden=bool(reasons) and self.force)
        return report

    @staticmethod
    def refusal(dest, top, report, recorded):
        """The message of a refused refresh (what it would have removed, that nothing changed, what to do)."""
        where = ("the refusal is recorded in %s, which health reports as critical" % os.path.join(dest, META_DIR, REFUSED_NAME)
                 if recorded else "check mode: nothing recorded")
        return ("refusing to refresh the standby copy %s: %s. Nothing was changed: the copy keeps generation %s (database time %s) "
                "and no archive was written or removed; %s. If the deletion is intended, run again with force=true "
                "(snapshot.yml: -e baileys_snapshot_force=true); if not, restore the database from this copy (docs/runbook.md, "
                "scenario 3: accidental deletion)" % (dest, "; ".join(report["reasons"]), top.get("generation"),
                                                      (top.get("source") or {}).get("snapshot_at"), where))

    @staticmethod
    def record(top, meta, report):
        """The document of .baileys-dr/refresh-refused.json (read by baileys_db_health)."""
        return {"format": FORMAT, "kind": "baileys-dr-refresh-refused", "refused_at": iso(utc_now()),
                "snapshot_at": meta.get("snapshot_at"), "generation": top.get("generation"),
                "last_good_refresh": top.get("last_good_refresh"), "reasons": report["reasons"],
                "counts": {k: report[k] for k in ("keys_in_copy", "keys_in_database", "keys_removed", "share", "companies_in_copy",
                                                  "companies_in_database", "companies_losing_all_keys")},
                "companies": report["companies"], "limits": report["limits"]}


def standby_refusal(path):
    """Read-only view of a standby copy for health: {"exists", "generation", "last_good_refresh", "snapshot_at",
    "refused": the refresh-refused.json document or None, "error": why it could not be read, or None}.

    No lock is taken (health must not wait behind a refresh) and no symbolic link is followed.
    """
    state = {"exists": False, "generation": None, "last_good_refresh": None, "snapshot_at": None, "refused": None, "error": None}
    try:
        root_fd = open_dir(os.path.normpath(path))
    except FileNotFoundError:
        return state
    except (OSError, SessionsError) as exc:
        state.update(exists=True, error=str(exc))
        return state
    state["exists"] = True
    try:
        try:
            _data, top = load_top_manifest(root_fd)
            state.update(generation=top.get("generation"), last_good_refresh=top.get("last_good_refresh"),
                         snapshot_at=(top.get("source") or {}).get("snapshot_at"))
        except FileNotFoundError:
            pass
        except (OSError, SessionsError) as exc:
            state["error"] = "its manifest cannot be read: %s" % exc
        meta_fd = open_dir(META_DIR, root_fd)
    except FileNotFoundError:
        return state
    except (OSError, SessionsError) as exc:
        state["error"] = "%s cannot be read: %s" % (META_DIR, exc)
        return state
    finally:
        os.close(root_fd)
    try:
        _data, state["refused"] = read_json_at(meta_fd, REFUSED_NAME, limit=1 << 20)
    except FileNotFoundError:
        pass
    except (OSError, SessionsError) as exc:
        # A record that exists but cannot be read still says a refresh was refused.
        state["refused"] = {"reasons": ["%s exists but cannot be read: %s" % (REFUSED_NAME, exc)]}
    finally:
        os.close(meta_fd)
    if not isinstance(state["refused"], (dict, type(None))):
        state["refused"] = {"reasons": ["%s is not a JSON object" % REFUSED_NAME]}
    return state
