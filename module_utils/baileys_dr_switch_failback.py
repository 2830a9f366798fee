# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The failback's critical section (files -> PostgreSQL), run by StoreSwitch: the delta import, the recorded .env
and git ref, and the rollback.
"""

from __future__ import annotations

import os

from ansible.module_utils.baileys_dr_dotenv import EnvFileError
from ansible.module_utils.baileys_dr_failback import auth_import_argument_spec, failback, import_failure
from ansible.module_utils.baileys_dr_git import GitError
from ansible.module_utils.baileys_dr_postgres import connect, describe_target
from ansible.module_utils.baileys_dr_switch_parts import (
    DB_OPTIONS,
    SwitchError,
    engine_params,
    identity_differences,
    read_identities,
    utc_iso,
)


class FailbackSwitch:
    """Files -> PostgreSQL: delta import of what changed since the bulk pass, then the recorded .env and ref."""

    def __init__(self, switch):
        self.s = switch
        self.p = switch.params
        self.phase = None

    def run(self):
        s, p = self.s, self.p
        record = s.journal.document
        if not record:
            raise SwitchError("inputs", "no failover state at %s: failback restores what failover recorded" % p["state_file"])
        self.phase = "stop"
        s.stop_and_fence()
        s.journal.phase("failback", "stopped", stopped_at=utc_iso(s.stopped_at))
        self.phase = "final copy"
        self.expected = read_identities(p["sessions_dir"])
        imported = self._delta_import()
        s.journal.phase("failback", "copied")
        s._step("copied")
        self.phase = "switch"
        git = record.get("git") or {}
        s._git("restored", tag=None, restore_ref=git.get("ref") or git.get("commit"), allow_dirty=False)
        s._env({k: v.get("value") if v.get("present") else None for k, v in (record.get("env") or {}).items()})
        s.journal.phase("failback", "switched")
        s._step("switched")
        self.phase = "start"
        ok, started = s._start(record.get("store_before") or "postgres")
        s.result["readiness"] = started.get("readiness")
        if not ok:
            raise SwitchError("start", started.get("msg", "the service did not become ready on PostgreSQL"))
        self.phase = "identities"
        doc = s._health_answers() or {}
        differ = identity_differences(self.expected, doc)
        s.result["identities"] = {"companies": len(self.expected), "differ": differ[:20]}
        if differ:
            raise SwitchError("identities", "the service on PostgreSQL reports other identities than the files: %s"
                              % "; ".join(differ[:10]))
        s.journal.phase("failback", "done", ready_at=(started.get("readiness") or {}).get("ready_at"))
        s._step("ready")
        return imported

    def _delta_import(self):
        s, p = self.s, self.p
        values = dict(p["import_options"] or {})
        values.update({k: p[k] for k in DB_OPTIONS})
        if p.get("companies") and not values.get("companies"):
            values["companies"] = p["companies"]
        params = engine_params(auth_import_argument_spec(), src=p["sessions_dir"], **values)
        result = failback(params, lambda: connect(params, application_name="baileys-dr-switch-import"), describe_target(params), False)
        s.result["final_copy"] = {k: result.get(k) for k in ("delta", "totals", "retries") if k in result}
        s.result["undo_files"] = result.get("undo_files", [])
        for warning in result.get("warnings") or ():
            s.module.warn(warning)
        failure = import_failure(result)
        if failure:
            raise SwitchError("final copy", failure)
        return result

    def rollback(self, step, exc):
        """Back to the file store (it holds every write made before the stop): the recorded tag, file flags."""
        s, p = self.s, self.p
        failures, summary = [], []
        if step in ("switch", "start", "identities"):
            try:
                s._env({name: "false" for name in p["store_flags"]})
                summary.append(".env on files")
            except (EnvFileError, OSError) as why:
                failures.append(".env: %s" % why)
            try:
                s._git("checked_out", tag=p["tag"], annotated=True, allow_dirty=True)
                summary.append("tag checked out")
            except GitError as why:
                failures.append("git: %s" % why)
        if not os.path.isdir(p["sessions_dir"]):
            failures.append("the sessions tree %s is missing: the service was left stopped" % p["sessions_dir"])
        else:
            ok, started = s._start("files")
            if ok:
                summary.append("service ready on files")
            else:
                failures.append("restart on files: %s" % started.get("msg"))
        try:
            s.journal.phase("failback", "rolled_back")
        except OSError:
            pass
        if failures:
            return {"summary": summary + failures, "line": "ROLLBACK INCOMPLETE, fix by hand: %s" % "; ".join(failures)}
        return {"summary": summary, "line": "Rolled back: the service runs on file sessions as before the stop; undo the "
                                            "import with the undo files to put the database back as it was."}
