# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The failover's critical section (PostgreSQL -> files), run by StoreSwitch: the final copy into the standby copy
(or the standby as it is), the proof, the swap, and the rollback.
"""

from __future__ import annotations

import datetime
import os

from ansible.module_utils.baileys_dr_dotenv import EnvFileError
from ansible.module_utils.baileys_dr_fs import fsync_dir, swap_in
from ansible.module_utils.baileys_dr_identity import set_cache_aside
from ansible.module_utils.baileys_dr_git import GitError
from ansible.module_utils.baileys_dr_postgres import DatabaseError, connect, describe_target, retry_on_disconnect
from ansible.module_utils.baileys_dr_auth_export import auth_export_argument_spec, export_tree
from ansible.module_utils.baileys_dr_drift import drift_warning, prove_tree, tree_drift
from ansible.module_utils.baileys_dr_files import ParentLock, open_dir
from ansible.module_utils.baileys_dr_manifests import load_top_manifest
from ansible.module_utils.baileys_dr_snapshot import Snapshot
from ansible.module_utils.baileys_dr_tree import test_hook
from ansible.module_utils.baileys_dr_verify import verify_tree
from ansible.module_utils.baileys_dr_switch_parts import (
    DB_OPTIONS,
    PHASES,
    SwitchError,
    engine_params,
    identity_differences,
    manifest_mtime_ns,
    pid_alive,
    read_identities,
    same_rows,
    utc_iso,
)


class FailoverSwitch:
    """PostgreSQL -> files: final copy into the standby copy (live) or the standby as it is, then swap."""

    def __init__(self, switch):
        self.s = switch
        self.p = switch.params
        self.phase = None
        self.record = {}

    def _db_params(self):
        return {name: self.p[name] for name in DB_OPTIONS}

    def run(self):
        s, p = self.s, self.p
        previous = s.journal.switch()
        resume = previous.get("operation") == "failover" and previous.get("phase") not in (None, "done")
        if resume:
            self.record = dict(s.journal.document)
            s.result["resumed_from"] = previous.get("phase")
        else:
            self.record = dict(p["record_data"] or {})
            now = {"env": s._env_values(list(p["store_flags"])), "git": s._git_head()}
            earlier = s.journal.document or {}
            if earlier.get("env") and earlier.get("git"):
                # A failover still in effect (its failback aborted, or a forced run): failback must still restore what
                # that failover recorded, not the file store's .env and tag; a rollback of this run puts back what
                # runs now, and that record.
                in_effect = dict(now, store=(s._health_answers() or {}).get("store") or "files",
                                 record={k: v for k, v in earlier.items() if k != "in_effect"})
                self.record.update(format=1, env=earlier["env"], git=earlier["git"], in_effect=in_effect,
                                   store_before=earlier.get("store_before") or "postgres")
            else:
                self.record.update(format=1, store_before=self.record.get("store_before") or "postgres", **now)
        done = PHASES.index(previous["phase"]) if resume else -1
        self.phase = "stop"
        s.stop_and_fence()
        if not resume:
            # The record of what failback restores (.env values, git ref), durable before anything changes.
            document = dict(self.record)
            document["switch"] = {"operation": "failover", "phase": "stopped", "started_at": utc_iso(s.started),
                                  "stopped_at": utc_iso(s.stopped_at), "updated_at": utc_iso()}
            s.journal.write(document)
            test_hook("switch_stopped")
        if done < PHASES.index("swapped"):
            self.phase = "final copy"
            self._final_copy()
            self.phase = "swap"
            self._swap()
        self.phase = "switch"
        if done < PHASES.index("switched"):
            env = s._env({name: "false" for name in p["store_flags"]})
            s.result["env_changed"] = env.get("changed_keys", [])
            s._git("checked_out", tag=p["tag"], annotated=True, expected_commit=p["tag_commit"] or None,
                   marker_path=p["marker_path"], marker_regex=p["marker_regex"], allow_dirty=p["allow_dirty"])
            s.journal.phase("failover", "switched")
        s._step("switched")
        self.phase = "start"
        s.result["credentials_cache"] = set_cache_aside(p["app_root"], s.module.warn)  # never shadowing the restored creds
        ok, started = s._start("files")
        s.result["readiness"] = started.get("readiness")
        if not ok:
            raise SwitchError("start", started.get("msg", "the service did not become ready on files"))
        self.phase = "identities"
        self._check_identities()
        s.journal.phase("failover", "done", ready_at=(started.get("readiness") or {}).get("ready_at"))
        s._step("ready")
        self.report_replaced()

    def _final_copy(self):
        s, p = self.s, self.p
        if p["source"] == "live":
            params = engine_params(auth_export_argument_spec(), mode="standby", dest=p["standby_dir"], companies=p.get("companies"),
                                   space_margin=p["space_margin"], return_digests=True, lock_timeout=60, **self._db_params())
            # The copy as the bulk pass left it was proven equal to its manifests when its top manifest was written: a
            # file changed since (by anyone but this refresh, which rewrites the top manifest but reads no file it does
            # not change) is read by the proof.
            proven_ns = manifest_mtime_ns(p["standby_dir"])
            observed = {}
            refreshed = retry_on_disconnect(
                lambda: export_tree(params, lambda: connect(params, application_name="baileys-dr-switch"),
                                    describe_target(params), s.run_as.owner, False, observe=observed),
                what="the final copy of PostgreSQL into %s" % p["standby_dir"], log=s.result.setdefault("retries", []))
            s.result["final_copy"] = {k: refreshed.get(k) for k in (
                "files_written", "files_deleted", "companies_refreshed", "companies_rebuilt", "generation", "snapshot_at",
                "duration_seconds") if k in refreshed}
            self.record.update(data_at=refreshed.get("snapshot_at"), source="live",
                               system_identifier=refreshed.get("system_identifier"))
            self._prove_equal_to_database(params, observed.get("source"), proven_ns)
        else:
            verified = verify_tree(p["standby_dir"], depth="structure")
            if not verified.get("verified"):
                raise SwitchError("final copy", "the standby copy %s does not verify against its manifests: %s"
                                  % (p["standby_dir"], "; ".join(map(str, verified.get("problems", [])[:3]))))
            source = verified.get("source") or {}
            self.record.update(data_at=source.get("snapshot_at"), source="standby",
                               system_identifier=source.get("system_identifier"))
        s.result["data_at"] = self.record["data_at"]
        s.journal.write(dict(s.journal.document, **{k: self.record[k] for k in ("data_at", "source", "system_identifier")}))
        s.journal.phase("failover", "copied")
        s._step("copied")

    def _prove_equal_to_database(self, params, source=None, proven_ns=None):
        """The copy equals the frozen database: the tree on disk is exactly what its manifests list (every file
        changed since proven_ns, the bulk pass's proof, read and hashed: what the final refresh wrote and anything
        else), and the database still holds the rows the manifests were written from.

        The database side: when the top manifest was written from the snapshot source (the final refresh's, read
        after the stop) and a new snapshot sees the same rows (same_rows), nothing changed since and no row is read
        again; otherwise every company's row fingerprint (one query, grouped by company) equals the manifest's. It
        runs while worker processes walk the tree."""
        drift, database = prove_tree(self.p["standby_dir"], proven_ns, beside=lambda: self._fingerprints(params, source))
        root_fd = open_dir(self.p["standby_dir"])
        try:
            _data, manifest = load_top_manifest(root_fd)
        finally:
            os.close(root_fd)
        tree = {company: entry.get("fingerprint") for company, entry in manifest["companies"].items()}
        written = manifest.get("source") or {}
        if database is None and any(written.get(k) != source.get(k) for k in ("system_identifier", "snapshot_at", "xid")):
            # The manifest was not written from that snapshot: its fingerprints are compared after all.
            database = self._fingerprints(params, None)
        if database is not None:
            differ = sorted(company for company in set(database) | set(tree) if database.get(company) != tree.get(company))
            if differ:
                raise SwitchError("proof", "the copy differs from the stopped database for %d companies (%s): a writer "
                                  "outside the stopped service?" % (len(differ), ", ".join(differ[:10])))
        if not drift.get("clean"):
            raise SwitchError("proof", "the copy %s is not what its manifests list: %s" % (self.p["standby_dir"], drift.get("reason")))
        self.s.result["proof"] = {"companies": len(tree), "digests": {c: e.get("digest") for c, e in manifest["companies"].items()}
                                  if len(tree) <= 1000 else None,
                                  "database": "fingerprints" if database is not None else "unchanged since the copy's snapshot"}

    @staticmethod
    def _fingerprints(params, source):
        """{company: row fingerprint} in the database now, or None when a snapshot taken now sees the rows of source."""
        conn = connect(params, application_name="baileys-dr-switch-proof")
        try:
            snapshot = Snapshot(conn)
            if same_rows(source, snapshot.begin(describe_target(params))):
                return None
            # Only the companies of this host (O(companies)): the others are other hosts' and keep changing.
            return {company: fingerprint for company, _keys, fingerprint, _creds in
                    snapshot.company_stats(params.get("companies") or None)}
        finally:
            conn.close()

    def _swap(self):
        s, p = self.s, self.p
        backup = "%s.before-%s" % (p["sessions_dir"], datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ"))
        # A rename only, while the service is down: what the replaced tree held is reported after the start.
        with ParentLock(os.path.dirname(os.path.abspath(p["sessions_dir"])), timeout=60):
            kept = swap_in(p["standby_dir"], p["sessions_dir"], backup)
        s.result["sessions_backup"] = kept
        self.expected = read_identities(p["sessions_dir"])
        s.journal.write(dict(s.journal.document, sessions_backup=kept or "", identities=self.expected))
        s.journal.phase("failover", "swapped")
        s._step("swapped", backup=kept)

    def report_replaced(self):
        """After the start: the files the service had written into the tree it no longer uses (writes the database
        never received), kept in the backup and named in a warning."""
        kept = self.s.result.get("sessions_backup")
        if not kept or not os.path.isdir(kept):
            return
        drift = tree_drift(kept)
        if not drift.get("clean"):
            self.s.result["replaced_drift"] = {k: drift.get(k) for k in ("added", "changed", "deleted", "reason")}
            warning = drift_warning(drift, kept)
            if warning:
                self.s.module.warn(warning)

    def _check_identities(self):
        s = self.s
        expected = getattr(self, "expected", None) or s.journal.document.get("identities") or read_identities(self.p["sessions_dir"])
        doc = s._health_answers() or {}
        differ = identity_differences(expected, doc)
        s.result["identities"] = {"companies": len(expected), "differ": differ[:20]}
        if differ:
            raise SwitchError("identities", "the service on files reports other identities than the copied state: %s"
                              % "; ".join(differ[:10]))

    def rollback(self, step, exc):
        """Back to PostgreSQL with the state before the stop, when PostgreSQL answers; else leave the service
        on files (or stopped) and say so."""
        s, p = self.s, self.p
        summary = []
        # What ran before this run's stop: the store recorded before the failover, or the failover still in effect.
        in_effect = self.record.get("in_effect") or {}
        env, git, store = (in_effect["env"], in_effect["git"], in_effect["store"]) if in_effect else (
            self.record.get("env") or {}, self.record.get("git") or {}, self.record.get("store_before") or "postgres")
        try:
            if store in ("postgres", "supabase"):
                connect(self._db_params(), application_name="baileys-dr-switch-ping").close()
            answers = True
        except DatabaseError as why:
            answers, reason = False, str(why)
        if not answers:
            running = bool([i for i in s._instances() if i.get("pid") and pid_alive(i["pid"])])
            return {"summary": ["postgres does not answer: not rolled back"],
                    "line": "NOT ROLLED BACK: PostgreSQL does not answer (%s), so the service was left %s; fix the "
                            "cause and re-run failover.yml" % (reason, "running on the file store" if running else "stopped")}
        record = s.journal.document or {}
        switch = (record.get("switch") or {}).get("phase")
        failures = []
        if switch in ("switched", "started", "done") or step in ("switch", "start", "identities"):
            try:
                s._env({k: v.get("value") if v.get("present") else None for k, v in env.items()})
                summary.append(".env restored")
            except (EnvFileError, OSError) as why:
                failures.append(".env: %s" % why)
            try:
                s._git("restored", tag=None, restore_ref=git.get("ref") or git.get("commit"), allow_dirty=True)
                summary.append("git ref restored")
            except GitError as why:
                failures.append("git: %s" % why)
        restore = record.get("sessions_backup") and os.path.isdir(record["sessions_backup"])
        # A swap that found no tree to keep (none before the failover) recorded an empty sessions_backup: the
        # promoted tree must leave the sessions directory too, which is then absent again, as before the stop.
        vacate = not restore and "sessions_backup" in record and os.path.lexists(p["sessions_dir"])
        if restore or vacate:
            failed_tree = "%s.failed-%s" % (p["sessions_dir"], datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ"))
            try:
                with ParentLock(os.path.dirname(os.path.abspath(p["sessions_dir"])), timeout=60):
                    if restore:
                        promoted = swap_in(record["sessions_backup"], p["sessions_dir"], failed_tree)
                    else:
                        os.rename(p["sessions_dir"], failed_tree)
                        promoted = failed_tree
                    # The promoted copy is the standby again when the service wrote nothing into it: the next
                    # failover need not build it anew.
                    if promoted and not os.path.lexists(p["standby_dir"]) and tree_drift(promoted).get("clean"):
                        os.rename(promoted, p["standby_dir"])
                        summary.append("standby copy put back")
                    fsync_dir(os.path.dirname(os.path.abspath(p["sessions_dir"])))
                summary.append("sessions tree restored" if restore else "promoted sessions tree moved out")
            except OSError as why:
                failures.append("sessions: %s" % why)
        ok, started = s._start(store)
        if not ok:
            failures.append("restart on %s: %s" % (store, started.get("msg")))
        else:
            summary.append("service ready on %s" % store)
        if not failures:
            if in_effect:
                # The failover in effect before this run still is: its record stays for failback.
                s.journal.write(in_effect["record"])
            else:
                # Nothing of the failover is in effect: no state for failback to restore.
                try:
                    os.unlink(s.journal.path)
                except FileNotFoundError:
                    pass
            return {"summary": summary, "line": "Rolled back: sessions, git ref, .env and the service are as before the "
                                                "stop (store %s), with every write made before the stop." % store}
        return {"summary": summary + failures, "line": "ROLLBACK INCOMPLETE, fix by hand: %s" % "; ".join(failures)}
