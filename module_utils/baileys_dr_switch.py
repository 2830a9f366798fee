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

import json
import os
import time

from ansible.module_utils.baileys_dr_dotenv import DotenvDocument, EnvFile, EnvFileError, env_file_argument_spec
from ansible.module_utils.baileys_dr_git import GitError, GitRunner, TagVerifier, git_tag_argument_spec
from ansible.module_utils.baileys_dr_pm2 import HealthClient, Pm2Error, find_instances
from ansible.module_utils.baileys_dr_pm2_driver import Pm2Driver
from ansible.module_utils.baileys_dr_pm2_process import Pm2Process, pm2_process_argument_spec, resolve_pm2_bin
from ansible.module_utils.baileys_dr_postgres import DatabaseError
from ansible.module_utils.baileys_dr_tree import SessionsError, test_hook

from ansible.module_utils.baileys_dr_switch_failback import FailbackSwitch
from ansible.module_utils.baileys_dr_switch_failover import FailoverSwitch
from ansible.module_utils.baileys_dr_switch_parts import (
    DRIVER_ERRORS,
    FenceError,
    Journal,
    RUNTIMES,
    RunAs,
    SubModule,
    SwitchError,
    SwitchLock,
    engine_params,
    executable_of,
    own_ancestry,
    pid_alive,
    processes_in,
    utc_iso,
)


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
        params = engine_params(git_tag_argument_spec(), repo=p["app_root"], state=state, **values)
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
