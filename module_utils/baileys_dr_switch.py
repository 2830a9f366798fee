# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The critical section of a store switch, in one module call (the engine of baileys_store_switch).

The switch rule (docs/architecture.md, "The switch rule"): the bulk copy ran while the service served
(an earlier task); here the service is stopped and fenced (no instance left that could write), the
delta since the bulk pass is copied, the target is proven equal to the frozen source with the tool's own
fingerprints and digests, .env and the git ref are switched, the service is started and checked for what
stays true while it serves (online, stable, the expected store, every company's identity).

Every step is written to the journal (the failover state file, "switch" member) before the next begins,
so a run killed between the stop and the start can be finished by the next run. A failure after the stop
puts the old store back and restarts there only when that store answers; otherwise the service is left
on the new store (or stopped), and the message says so in one line.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import pwd
import shutil
import time

from ansible.module_utils.baileys_dr_dotenv import DotenvDocument, EnvFile, EnvFileError, env_file_argument_spec
from ansible.module_utils.baileys_dr_fs import fsync_dir, swap_in, write_file_atomic
from ansible.module_utils.baileys_dr_identity import set_cache_aside
from ansible.module_utils.baileys_dr_failback import auth_import_argument_spec, failback, import_failure
from ansible.module_utils.baileys_dr_git import GitError, GitRunner, TagVerifier, git_tag_verify_argument_spec
from ansible.module_utils.baileys_dr_pm2 import HealthClient, Pm2Error, find_instances
from ansible.module_utils.baileys_dr_pm2_driver import Pm2Driver
from ansible.module_utils.baileys_dr_pm2_process import Pm2Process, pm2_process_argument_spec, resolve_pm2_bin
from ansible.module_utils.baileys_dr_postgres import (
    DatabaseError, connect, describe_target, postgres_argument_spec, psycopg2, retry_on_disconnect)
from ansible.module_utils.baileys_dr_auth_export import auth_export_argument_spec, export_tree
from ansible.module_utils.baileys_dr_drift import drift_warning, prove_tree, tree_drift
from ansible.module_utils.baileys_dr_files import ParentLock, open_dir
from ansible.module_utils.baileys_dr_manifests import load_top_manifest
from ansible.module_utils.baileys_dr_snapshot import Snapshot
from ansible.module_utils.baileys_dr_tree import COMPANY_PREFIX, CREDS_FILE, MANIFEST_NAME, META_DIR, SessionsError, test_hook
from ansible.module_utils.baileys_dr_verify import verify_tree

# The connection options (baileys_dr_postgres) every engine of the switch is given.
DB_OPTIONS = tuple(postgres_argument_spec())
# What the driver raises from inside an engine (a query that fails after the stop): rolled back, never a traceback.
DRIVER_ERRORS = (psycopg2.Error,) if psycopg2 is not None else ()
JOURNAL_FORMAT = 1
# Executables of a stray instance when PM2 ran none to compare with (an operator's shell in the directory is no instance).
RUNTIMES = ("node", "nodejs", "bun", "deno")
# Phases of the journal, in order; a re-run resumes after the last one written.
PHASES = ("stopped", "copied", "swapped", "switched", "started", "done")


# What makes two Snapshot.begin metas of one server see the same rows: the same server lifetime and txid snapshot.
SAME_ROWS_FIELDS = ("system_identifier", "timeline_id", "postmaster_start_time", "txid_snapshot")


class SwitchError(Exception):
    """A step failed; step names it for the operator."""

    def __init__(self, step, msg):
        super().__init__(msg)
        self.step = step


class FenceError(SwitchError):
    """The service could not be stopped completely: nothing was copied or changed."""


def utc_iso(epoch=None):
    moment = datetime.datetime.fromtimestamp(time.time() if epoch is None else epoch, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (moment.microsecond // 1000)


def engine_params(spec, **values):
    """Params of another module's engine: its defaults, then values (already of the right types)."""
    params = {}
    for name, option in spec.items():
        default = option.get("default")
        params[name] = list(default) if isinstance(default, list) else (dict(default) if isinstance(default, dict) else default)
    unknown = set(values) - set(params)
    if unknown:
        raise ValueError("not options of that engine: %s" % ", ".join(sorted(unknown)))
    params.update(values)
    return params


class RunAs:
    """Commands as the application's account: PM2 and git never run the application's programs as root."""

    def __init__(self, user):
        try:
            self.pw = pwd.getpwnam(user) if not str(user).isdigit() else pwd.getpwuid(int(user))
        except KeyError:
            raise SwitchError("inputs", "app_user %s does not exist on this host" % user) from None
        euid = os.geteuid()
        self.switch = euid == 0 and self.pw.pw_uid != 0
        if euid not in (0, self.pw.pw_uid):
            raise SwitchError("inputs", "run as root or as %s (the module runs as uid %d): PM2 daemons are per user"
                              % (self.pw.pw_name, euid))
        self.setpriv = shutil.which("setpriv") if self.switch else None
        if self.switch and not self.setpriv:
            raise SwitchError("inputs", "setpriv (util-linux) is needed to run PM2 and git as %s" % self.pw.pw_name)

    @property
    def owner(self):
        return self.pw.pw_uid, self.pw.pw_gid

    @property
    def home(self):
        return self.pw.pw_dir

    def wrap(self, argv, environ_update):
        if not self.switch:
            return argv, environ_update
        env = dict(environ_update or {}, HOME=self.pw.pw_dir, USER=self.pw.pw_name, LOGNAME=self.pw.pw_name)
        return [self.setpriv, "--reuid=%d" % self.pw.pw_uid, "--regid=%d" % self.pw.pw_gid, "--init-groups", "--"] + list(argv), env


class SubModule:
    """The calling AnsibleModule as another module's engine sees it: that engine's params, commands run as
    the application's account when asked, no diff, never exiting."""

    def __init__(self, module, params, run_as=None):
        self._module = module
        self._run_as = run_as
        self.params = params
        self.check_mode = module.check_mode
        self._diff = False
        self.no_log = True

    def __getattr__(self, name):
        return getattr(self._module, name)

    def run_command(self, args, **kwargs):
        if self._run_as is not None:
            args, kwargs["environ_update"] = self._run_as.wrap(args, kwargs.get("environ_update"))
        return self._module.run_command(args, **kwargs)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True


def executable_of(pid):
    try:
        return os.readlink("/proc/%d/exe" % pid)
    except OSError:
        return None


def processes_in(directory, exclude=()):
    """[(pid, command line, executable)] of the processes whose working directory is directory (or below it)."""
    real = os.path.realpath(directory)
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in exclude:
            continue
        try:
            cwd = os.readlink("/proc/%s/cwd" % name)
            with open("/proc/%s/cmdline" % name, "rb") as handle:
                cmdline = handle.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
        except OSError:
            continue
        if cmdline and (cwd == real or cwd.startswith(real + "/")):
            found.append((int(name), cmdline[:200], executable_of(int(name))))
    return found


def own_ancestry():
    """This process and its ancestors (never counted as a stray instance of the service)."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            with open("/proc/%d/stat" % pid) as handle:
                pid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def same_rows(before, now):
    """True when the transaction of now (a later Snapshot.begin) sees exactly the rows the one of before saw.

    Equal txid snapshots (xmin:xmax:running xids) of one server lifetime mean that no transaction committed, aborted
    or was given a transaction id in between: every data change (an INSERT, UPDATE, DELETE or TRUNCATE of any table)
    is given one, so the rows visible to both are the same. Anything else (another database of the cluster written,
    an autovacuum ANALYZE) makes them differ, and the caller compares the rows' fingerprints instead."""
    return bool(before and now) and all(before.get(k) is not None and before.get(k) == now.get(k) for k in SAME_ROWS_FIELDS)


def manifest_mtime_ns(tree):
    """The mtime of a tree's top manifest (the last instant its refresh proved it), or None without one."""
    try:
        return os.stat(os.path.join(tree, META_DIR, MANIFEST_NAME), follow_symlinks=False).st_mtime_ns
    except OSError:
        return None


def read_identities(tree):
    """{company: {registrationId, me}} from the creds.json of every company directory of a sessions tree."""
    identities = {}
    for entry in sorted(os.listdir(tree)):
        if not entry.startswith(COMPANY_PREFIX):
            continue
        path = os.path.join(tree, entry, CREDS_FILE)
        try:
            with open(path, "rb") as handle:
                creds = json.loads(handle.read().decode("utf-8"))
        except (OSError, ValueError) as exc:
            raise SwitchError("identities", "cannot read the credentials %s: %s" % (path, exc)) from None
        identities[entry[len(COMPANY_PREFIX):]] = identity_of(creds)
    return identities


def identity_of(creds):
    me = creds.get("me") if isinstance(creds, dict) else None
    return {"registrationId": creds.get("registrationId") if isinstance(creds, dict) else None,
            "me": me.get("id") if isinstance(me, dict) else None}


def identity_differences(expected, doc):
    """Companies whose identity the service reports differently from the frozen state (no secret values)."""
    reported = doc.get("identities") if isinstance(doc.get("identities"), dict) else None
    if reported is None:
        # An application that reports registration ids only: compare those.
        ids = doc.get("registrationIds") if isinstance(doc.get("registrationIds"), dict) else {}
        reported = {company: {"registrationId": value} for company, value in ids.items()}
    differ = []
    for company, want in sorted(expected.items()):
        got = reported.get(company)
        if not isinstance(got, dict):
            differ.append("%s: not reported by the service" % company)
            continue
        for field in ("registrationId", "me"):
            if field in got and got.get(field) != want.get(field):
                differ.append("%s: %s %s, expected %s" % (company, field, got.get(field), want.get(field)))
    return differ


class Journal:
    """The switch's progress in the failover state file (0600, written atomically at every phase)."""

    def __init__(self, path):
        self.path = path
        self.document = None

    def load(self):
        try:
            with open(self.path, "rb") as handle:
                self.document = json.loads(handle.read().decode("utf-8"))
        except FileNotFoundError:
            self.document = None
        except (OSError, ValueError) as exc:
            raise SwitchError("journal", "cannot read the state file %s: %s" % (self.path, exc)) from None
        return self.document

    def switch(self):
        return (self.document or {}).get("switch") or {}

    def write(self, document):
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            os.makedirs(directory, mode=0o700)
        write_file_atomic(self.path, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("utf-8"), mode=0o600)
        self.document = document

    def phase(self, operation, phase, **details):
        document = dict(self.document or {})
        switch = dict(document.get("switch") or {})
        if switch.get("operation") != operation:
            switch = {"operation": operation, "started_at": utc_iso()}
        switch.update(details, phase=phase, updated_at=utc_iso())
        document["switch"] = switch
        self.write(document)
        # Test-only: pause or fail right after a phase is durable (switch_copied, switch_switched...).
        test_hook("switch_" + phase)


class SwitchLock:
    """One switch at a time per state file: flock(2) on a file beside it, held for the whole module run.

    A module whose playbook was killed runs on (Ansible's workers start sessions of their own; a target outlives its
    controller): the playbook's lock is then stale, and a re-run would switch a second time beside it, replacing the
    tree the service writes into. The kernel releases this lock when the process ends, whatever ends it."""

    def __init__(self, state_file):
        self.path = os.path.join(os.path.dirname(os.path.abspath(state_file)), ".switch.lock")
        self.fd = None

    def __enter__(self):
        if not os.path.isdir(os.path.dirname(self.path)):
            os.makedirs(os.path.dirname(self.path), mode=0o700)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(self.fd)
            raise SwitchError("lock", "another switch (pid %s) is still running on this host (its playbook may have been "
                                      "killed): nothing was done; let it end, it finishes or rolls back by itself, then run "
                                      "again" % holder) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, b"%d\n" % os.getpid(), 0)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


class StoreSwitch:
    """Stop, fence, final copy, proof, switch, start, identity check; rollback onto an answering store."""

    health_timeout = 2.0

    def __init__(self, module, run_as=None, health_client=None):
        self.module = module
        self.params = module.params
        self.run_as = run_as or RunAs(self.params["app_user"])
        self.health_client = health_client or HealthClient()
        self.journal = Journal(self.params["state_file"])
        self.result = {"changed": False, "store": self.params["store"], "steps": []}
        self.started = time.time()
        self.stopped_at = None
        self.pm2_runner = None
        # The daemon of app_user: PM2_HOME of this process only when it is that user (as pm2 itself reads it).
        self.pm2_home = self.params["pm2_home"] or (None if self.run_as.switch else os.environ.get("PM2_HOME")) or \
            os.path.join(self.run_as.home, ".pm2")

    # -- engines of the other modules, run in this process -------------------------------------

    def _pm2_runner(self):
        """One PM2 runner for the whole run: one Node process connected to the daemon (Pm2Driver), so that the stop,
        the start and the readiness samples cost no `pm2` CLI start while the service is down."""
        if self.pm2_runner is None:
            self.pm2_runner = Pm2Driver(SubModule(self.module, {}, self.run_as),
                                        resolve_pm2_bin(self.module, self.params["pm2_bin"]), self.pm2_home,
                                        wrap=self.run_as.wrap)
        return self.pm2_runner

    def _pm2(self, state, **values):
        p = self.params
        params = engine_params(pm2_process_argument_spec(), name=p["app_name"], state=state, pm2_bin=p["pm2_bin"],
                               pm2_home=self.pm2_home, **values)
        engine = Pm2Process(SubModule(self.module, params, self.run_as), runner=self._pm2_runner())
        engine.user = self.run_as.pw.pw_name
        return engine.run()

    def _start(self, store):
        p = self.params
        return self._pm2("restarted", cwd=p["app_root"], ecosystem=p["ecosystem"], fresh_env=True,
                         env_file=os.path.join(p["app_root"], ".env"), wait=True, ready_window=p["ready_window"],
                         ready_timeout=p["ready_timeout"], health_url=p["health_url"],
                         health_expect={"store": store, "ready": True})

    def _git(self, state, **values):
        p = self.params
        params = engine_params(git_tag_verify_argument_spec(), repo=p["app_root"], state=state, **values)
        sub = SubModule(self.module, params, self.run_as)
        return TagVerifier(sub, GitRunner(sub, p["app_root"])).run()

    def _git_head(self):
        """HEAD of the application's repository (read as its owner): the ref failback checks out again."""
        return GitRunner(SubModule(self.module, {}, self.run_as), self.params["app_root"]).head()

    def _env(self, values, backup=True):
        params = engine_params(env_file_argument_spec(), path=os.path.join(self.params["app_root"], ".env"),
                               values=values, backup=backup)
        return EnvFile(SubModule(self.module, params)).run()

    def _env_values(self, names):
        """{name: {present, value}} of .env now (what a failover records, what a rollback restores)."""
        path = os.path.join(self.params["app_root"], ".env")
        try:
            with open(path, "rb") as handle:
                values = DotenvDocument(handle.read().decode("utf-8", "surrogateescape")).values()
        except FileNotFoundError:
            values = {}
        return {name: {"present": name in values, "value": values.get(name)} for name in names}

    def _step(self, name, **details):
        self.result["steps"].append(dict(details, step=name, at=round(time.time() - self.started, 3)))

    # -- stop and fence ------------------------------------------------------------------------

    def _health_answers(self):
        status, body = self.health_client.get(self.params["health_url"], timeout=self.health_timeout)
        if status is None:
            return None
        try:
            return json.loads(body.decode("utf-8"))
        except ValueError:
            return {}

    def stop_and_fence(self):
        """Stop every instance gracefully, then prove none is left; FenceError (service restarted as it was)
        when one is."""
        # Read while the service still serves: the instances to see gone, and what they run (a stray instance started
        # by hand runs the same executable in the same directory).
        before = [proc for proc in self._instances() if proc.get("pid")]
        executables = {exe for exe in (executable_of(proc["pid"]) for proc in before) if exe}
        test_hook("switch_before_stop")
        self.stop_began = time.time()
        ok, result = self._pm2("stopped")
        self.stopped_at = time.time()
        self.result.update(stop_began_at_epoch=round(self.stop_began, 3), stopped_at=utc_iso(self.stopped_at),
                           stopped_at_epoch=round(self.stopped_at, 3))
        problems = [] if ok else [result.get("msg", "pm2 stop failed")]
        alive = [str(proc["pid"]) for proc in before if pid_alive(proc["pid"])]
        if alive:
            problems.append("PM2 instance(s) still alive after `pm2 stop`: pid %s" % ", ".join(alive))
        exclude = own_ancestry() | {self._daemon_pid()}
        strays = [(pid, cmdline) for pid, cmdline, exe in processes_in(self.params["app_root"], exclude=exclude)
                  if (exe in executables if executables else os.path.basename(exe or "") in RUNTIMES)]
        if strays:
            problems.append("instance(s) outside PM2 run in %s: %s" % (
                self.params["app_root"], "; ".join("pid %d (%s)" % stray for stray in strays[:5])))
        doc = self._health_answers()
        if doc is not None:
            problems.append("%s still answers (pid %s)" % (self.params["health_url"], doc.get("pid", "?")))
        self._step("stopped", instances=len(before), seconds=round(self.stopped_at - self.stop_began, 3))
        if problems:
            restarted, detail = self._pm2("started", wait=False)
            raise FenceError("stop", "refusing to copy: the service is not completely stopped (%s); nothing was "
                             "copied or changed%s" % ("; ".join(problems),
                                                     ", and the PM2 process was started again" if restarted else
                                                     ", and starting it again failed: %s" % detail.get("msg")))

    def _daemon_pid(self):
        """The PM2 daemon's pid (it runs node too, maybe started in the application's directory)."""
        try:
            with open(os.path.join(self.pm2_home, "pm2.pid")) as handle:
                text = handle.read().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def _instances(self):
        return [dict(pid=proc.get("pid")) for proc in find_instances(self._pm2_runner().jlist(), self.params["app_name"])]

    # -- the run -------------------------------------------------------------------------------

    def run(self):
        if self.module.check_mode:
            return dict(self.result, msg="check mode: would stop %s, copy the delta, switch to %s and start it"
                        % (self.params["app_name"], self.params["store"]))
        with SwitchLock(self.params["state_file"]):
            try:
                return self._run_locked()
            finally:
                if self.pm2_runner is not None:
                    self.pm2_runner.close()
                    self.result["pm2_driver"] = self.pm2_runner.description

    def _run_locked(self):
        self.journal.load()
        operation = "failover" if self.params["store"] == "files" else "failback"
        engine = FailoverSwitch(self) if operation == "failover" else FailbackSwitch(self)
        try:
            engine.run()
        except (SwitchError, SessionsError, DatabaseError, EnvFileError, GitError, Pm2Error, OSError) + DRIVER_ERRORS as exc:
            step = getattr(exc, "step", engine.phase or "stop")
            if isinstance(exc, FenceError):
                self.result.update(failed=True, failed_step=step, msg=str(exc))
                return self.result
            outcome = engine.rollback(step, exc)
            self.result.update(failed=True, failed_step=step, rollback=outcome["summary"],
                               msg="%s failed at step '%s': %s. %s" % (operation, step, exc, outcome["line"]))
            return self.result
        self.result["changed"] = True
        return self.result


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
