# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""One PM2 process brought to a state and waited for until ready: the engine of the baileys_pm2_process module
(and of the store switch).

Pm2Process takes an AnsibleModule-like object (params, check_mode, _diff, warn, get_bin_path, run_command);
its run() returns (ok, result) and never exits.
"""

from __future__ import annotations

import datetime
import json
import os
import pwd
import time

from ansible.module_utils.baileys_dr_pm2 import (
    DOWN_STATUSES,
    ENV_NAME,
    RUNNING_STATUSES,
    HealthClient,
    Pm2Error,
    ReadinessTracker,
    digest_differences,
    env_names,
    find_instances,
    health_field_differences,
    read_env_file,
    restart_count,
    safe_health,
    scrub_output,
    status_of,
    summarize,
    uptime_seconds,
)
from ansible.module_utils.baileys_dr_pm2_driver import Pm2Driver

STARTING_STATES = ("started", "restarted", "reloaded")
NEVER_REMOVED = ("PATH", "PM2_HOME")
PREDICTED_STATUS = {"start": "online", "restart": "online", "reload": "online", "stop": "stopped", "delete": "absent"}



def pm2_process_argument_spec():
    """The options of baileys_pm2_process (a new dict per call: AnsibleModule changes the one it gets)."""
    return dict(
        name=dict(type="str", required=True),
        state=dict(type="str", default="started", choices=["started", "restarted", "reloaded", "stopped", "absent", "info"]),
        pm2_bin=dict(type="str", default="pm2"),
        pm2_home=dict(type="path"),
        ecosystem=dict(type="path"),
        cwd=dict(type="path"),
        fresh_env=dict(type="bool"),
        env_remove=dict(type="list", elements="str", default=[]),
        env_file=dict(type="path"),
        env_check=dict(type="list", elements="str", default=[]),
        fail_on_stale_env=dict(type="bool", default=False),
        wait=dict(type="bool"),
        ready_window=dict(type="float", default=5),
        ready_timeout=dict(type="float", default=60),
        health_url=dict(type="str"),
        health_expect=dict(type="dict"),
        expected_digests=dict(type="dict"),
        digests_timeout=dict(type="float", default=600),
    )


def resolve_pm2_bin(module, pm2_bin):
    """The pm2 executable: pm2_bin itself when it is a path, else found in PATH; Pm2Error naming it otherwise."""
    if "/" in pm2_bin:
        if not (os.path.isfile(pm2_bin) and os.access(pm2_bin, os.X_OK)):
            raise Pm2Error("pm2_bin %s is not an executable file" % pm2_bin)
        return pm2_bin
    found = module.get_bin_path(pm2_bin)
    if not found:
        raise Pm2Error("pm2_bin %r was not found in PATH (%s): give its full path" % (pm2_bin, os.environ.get("PATH", "")))
    return found


class Pm2Process:
    clock = staticmethod(time.time)  # wall clock: pm_uptime is an epoch
    monotonic = staticmethod(time.monotonic)
    sleep = staticmethod(time.sleep)
    poll_interval = 0.25  # between PM2 samples when there is no readiness endpoint
    health_poll_interval = 0.05  # between two reads of the readiness endpoint (a local HTTP GET)
    pm2_sample_interval = 1.0  # between PM2 samples while the endpoint is not ready (to see a crash)
    digests_poll_interval = 0.25
    health_request_timeout = 5.0

    def __init__(self, module, runner=None, health_client=None):
        self.module = module
        self.params = module.params
        self.name = self.params["name"]
        self.state = self.params["state"]
        self.user = pwd.getpwuid(os.geteuid()).pw_name
        self.pm2_home = self.params["pm2_home"] or os.environ.get("PM2_HOME") or \
            os.path.join(pwd.getpwuid(os.geteuid()).pw_dir, ".pm2")
        # One Node process for every PM2 command of this run (a restart with its readiness samples is several).
        self.owns_runner = runner is None
        self.runner = runner or Pm2Driver(module, resolve_pm2_bin(module, self.params["pm2_bin"]), self.pm2_home)
        self.health_client = health_client or HealthClient()
        self.fresh_env = self.params["fresh_env"] if self.params["fresh_env"] is not None else self.state == "restarted"
        self.wait = self.params["wait"] if self.params["wait"] is not None else self.state in STARTING_STATES
        self.env_file_names = []
        self.health = None

    # --- inputs ---

    def validate(self):
        if not self.name.strip() or self.name == "all" or self.name.isdigit() or self.name.startswith("-"):
            raise Pm2Error("name %r is not a PM2 process name this module accepts: pm2 reads 'all' as every process "
                           "and a number as a pm_id" % self.name)
        for option in ("env_remove", "env_check"):
            bad = [n for n in self.params[option] if not ENV_NAME.match(n)]
            if bad:
                raise Pm2Error("%s holds names that are not environment variable names: %s" % (option, ", ".join(map(repr, bad))))
        if self.fresh_env and self.state == "reloaded":
            raise Pm2Error("fresh_env cannot be honoured by state=reloaded: a reload keeps the environment PM2 stored; "
                           "use state=restarted")
        if self.fresh_env and self.state in ("restarted",) and not self.params["ecosystem"]:
            raise Pm2Error("state=restarted with fresh_env needs ecosystem (and cwd): `pm2 restart --update-env` merges "
                           "and never removes a variable, so a stale one would beat .env. Set fresh_env: false to "
                           "restart %s with the environment PM2 stored" % self.name)
        window, timeout = self.params["ready_window"], self.params["ready_timeout"]
        if window < 0 or timeout <= 0:
            raise Pm2Error("ready_window (%s) must be 0 or more and ready_timeout (%s) more than 0" % (window, timeout))
        if self.wait and window >= timeout:
            raise Pm2Error("ready_window (%ss) must be shorter than ready_timeout (%ss): the process could never be "
                           "ready in time" % (window, timeout))
        url = self.params["health_url"]
        if url is not None and not url.startswith(("http://", "https://")):
            raise Pm2Error("health_url %r is not an http:// or https:// URL" % url)
        bad = [k for k, v in (self.params["expected_digests"] or {}).items() if not isinstance(v, str)]
        if bad:
            raise Pm2Error("expected_digests must map company ids to digest strings: not a string for %s"
                           % ", ".join(sorted(bad)[:20]))
        if self.params["env_file"]:
            self.env_file_names, values = read_env_file(self.params["env_file"])
            self.runner.secrets.update(values)

    def _ecosystem(self):
        """(ecosystem path, cwd) to start from; Pm2Error when they are missing or wrong."""
        ecosystem, cwd = self.params["ecosystem"], self.params["cwd"]
        if not ecosystem:
            raise Pm2Error("ecosystem is needed to start %s" % self.name)
        if not os.path.isabs(ecosystem):
            if not cwd:
                raise Pm2Error("ecosystem %s is a relative path: give cwd too" % ecosystem)
            ecosystem = os.path.join(cwd, ecosystem)
        cwd = cwd or os.path.dirname(ecosystem)
        if not os.path.isfile(ecosystem):
            raise Pm2Error("ecosystem %s does not exist (or is not a file)" % ecosystem)
        if not os.path.isdir(cwd):
            raise Pm2Error("cwd %s is not a directory" % cwd)
        return ecosystem, cwd

    def _removed_env(self):
        names = []
        for name in list(self.params["env_remove"]) + self.env_file_names:
            if name in NEVER_REMOVED:
                self.module.warn("%s is kept in the environment of pm2 start (it is needed to run PM2)" % name)
            elif name not in names:
                names.append(name)
        return names

    def _not_found(self, processes, hint=""):
        if not self.runner.daemon_running():
            runs = "no daemon is running there"
        elif processes:
            names = sorted({str(p.get("name")) for p in processes})
            runs = "this one runs only: %s" % ", ".join(names[:20])
        else:
            runs = "this one runs no process at all"
        return ("no process %s in the PM2 daemon of user %s (PM2_HOME=%s): each user has its own daemon, and %s. "
                "Run the module as the application's user (become_user) or set pm2_home%s"
                % (self.name, self.user, self.pm2_home, runs, hint))

    # --- plan and apply ---

    def plan(self, instances, processes):
        """(would, steps): what to do, as step names for apply()."""
        statuses = {(p.get("pm2_env") or {}).get("status") for p in instances}
        if not instances and self.state in ("info", "absent") and not processes:
            # Nothing to do, but an empty daemon is what running as the wrong user looks like.
            self.module.warn(self._not_found(processes))
        if self.state == "info":
            return "none", []
        if self.state == "absent":
            return ("delete", ["delete"]) if instances else ("none", [])
        if self.state == "stopped":
            if not instances:
                raise Pm2Error(self._not_found(processes))
            return ("none", []) if statuses <= DOWN_STATUSES else ("stop", ["stop"])
        if not instances:
            if not self.params["ecosystem"]:
                raise Pm2Error(self._not_found(processes, "; or give ecosystem (and cwd) to start it"))
            self._ecosystem()
            return "start", ["start_ecosystem"]
        if self.state == "started":
            if statuses <= RUNNING_STATUSES:
                return "none", []
            if self.fresh_env:
                self._ecosystem()
                return "start", ["delete", "start_ecosystem"]
            return "start", ["start"]
        if self.state == "restarted":
            if self.fresh_env:
                self._ecosystem()
                return "restart", ["delete", "start_ecosystem"]
            return "restart", ["restart"]
        return "reload", ["reload"]

    def apply(self, step):
        if step == "start_ecosystem":
            ecosystem, cwd = self._ecosystem()
            self.runner.check(["start", ecosystem, "--only", self.name], cwd=cwd, env_remove=self._removed_env())
        else:
            self.runner.check([step, self.name])

    def verify(self, steps, instances, processes):
        """Pm2Error when PM2 does not show what the steps should have done."""
        if self.state == "absent" and instances:
            raise Pm2Error("%s is still in PM2 after `pm2 delete`" % self.name)
        if self.state == "stopped" and not {(p.get("pm2_env") or {}).get("status") for p in instances} <= DOWN_STATUSES:
            raise Pm2Error("%s is still %s after `pm2 stop`" % (self.name, status_of(instances)))
        if self.state in STARTING_STATES and not instances:
            if "start_ecosystem" in steps:
                ecosystem, cwd = self._ecosystem()
                raise Pm2Error("`pm2 start %s --only %s` (in %s) started no process named %s: is it defined in the "
                               "ecosystem file? %s" % (ecosystem, self.name, cwd, self.name, self._not_found(processes)))
            raise Pm2Error(self._not_found(processes))
        if "start_ecosystem" in steps and self.env_file_names:
            from_ecosystem = sorted(set(self.env_file_names) & set().union(*(env_names(p) for p in instances)))
            if from_ecosystem:
                self.module.warn(
                    "the ecosystem file (or PM2) sets %s, which %s also sets: the process gets that value and dotenv "
                    "never overrides it" % (", ".join(from_ecosystem), self.params["env_file"]))

    # --- readiness ---

    def _read_health(self, remaining):
        """(status, doc, reason): one GET of health_url; doc is the JSON object (or None)."""
        url = self.params["health_url"]
        status, body = self.health_client.get(url, timeout=max(1.0, min(self.health_request_timeout, remaining)))
        if status is None:
            return None, None, scrub_output(body.decode("utf-8", "replace"), self.runner.secrets, limit=200)
        try:
            doc = json.loads(body.decode("utf-8"))
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            self.health = safe_health(doc, secrets=self.runner.secrets)
            return status, doc, ""
        return status, None, ""

    def _health_checks(self, instances, status, doc, reason):
        """(checks, terminal): checks of one readiness answer, digests apart; terminal when a wrong answer will
        not change."""
        url = self.params["health_url"]
        if status is None:
            return [("health_http", False, "GET %s: no answer (%s)" % (url, reason))], False
        if status != 200:
            errors = doc.get("errors") if isinstance(doc, dict) and isinstance(doc.get("errors"), list) else []
            detail = "GET %s answered %d" % (url, status)
            if errors:
                detail += ": " + scrub_output("; ".join(map(str, errors[:3])), self.runner.secrets, limit=300)
            return [("health_http", False, detail)], False
        if not isinstance(doc, dict):
            return [("health_http", False, "GET %s answered 200 without a JSON object" % url)], False
        checks = [("health_http", True, "GET %s answered 200" % url)]
        pids = [p.get("pid") for p in instances]
        if "pid" in doc and doc["pid"] not in pids:
            checks.append(("health_pid", False, "answered by pid %s, but PM2 runs %s as pid %s: another process holds "
                                                "the port" % (doc["pid"], self.name, ", ".join(map(str, pids)))))
            return checks, True
        terminal = False
        if self.params["health_expect"]:
            wrong = health_field_differences(self.params["health_expect"], doc)
            checks.append(("health_fields", not wrong, "; ".join(wrong) or "expected fields match"))
            terminal = bool(wrong)
        return checks, terminal

    def _digest_check(self, doc):
        differ = digest_differences(self.params["expected_digests"], doc.get("digests"))
        if differ:
            detail = "state digests differ for %d companies: %s" % (len(differ), ", ".join(differ[:20]))
            if len(differ) > 20:
                detail += ", ..."
        else:
            detail = "state digests of %d companies match" % len(self.params["expected_digests"])
        return "digests", not differ, detail

    def read_health_once(self, result):
        """One GET of health_url, its answer returned as it is (no readiness decision)."""
        status, _doc, _reason = self._read_health(self.health_request_timeout)
        result["health_status"] = status

    def _sample(self):
        return find_instances(self.runner.jlist(), self.name)

    def wait_ready(self, instances):
        """The readiness report; Pm2Error (with the report) when not ready in time.

        The readiness endpoint is cheap to ask and is polled every health_poll_interval; `pm2 jlist` (a Node
        process, about 0.3 s) is sampled when the endpoint says ready (to tie its pid to PM2's and check the
        restart count and the uptime), and every pm2_sample_interval otherwise to see a crash.
        """
        tracker = ReadinessTracker(self.params["ready_window"])
        start = self.monotonic()
        deadline = start + self.params["ready_timeout"]
        url = self.params["health_url"]
        pm2_checks = tracker.observe(instances, self.clock()) if instances else []
        sampled = self.monotonic()
        resampled_for_pid = False
        health = None  # (checks, terminal, doc) of the last answer
        answer = None
        while True:
            terminal = None
            if not instances:
                checks = [("process", False, "%s is no longer in PM2" % self.name)]
                terminal = "it disappeared from PM2"
            else:
                checks = list(pm2_checks)
                if status_of(instances) == "errored":
                    terminal = "PM2 gave up on it (status errored after %d restarts)" % restart_count(instances)
            if url and not terminal:
                # An answer that was ready is judged again against the PM2 sample it asked for, not asked again.
                status, doc, reason = answer if answer else self._read_health(deadline - self.monotonic())
                answer = None
                health_checks, wrong = self._health_checks(instances, status, doc, reason)
                if wrong and any(name == "health_pid" for name, _, _ in health_checks):
                    if not resampled_for_pid:
                        # The sample may predate a restart by PM2: judge the pid against a fresh one.
                        resampled_for_pid = True
                        before = restart_count(instances)
                        instances, sampled = self._sample(), self.monotonic()
                        pm2_checks = tracker.observe(instances, self.clock()) if instances else []
                        restarting = not instances or status_of(instances) != "online" or restart_count(instances) != before
                        answer = None if restarting else (status, doc, reason)
                        continue
                    if not all(ok for _, ok, _ in pm2_checks):
                        wrong = False  # PM2 is restarting it: another pid answering is no proof of another process
                health = (health_checks, wrong, doc)
                last_answer, answered = (status, doc, reason), self.monotonic()
                checks += health_checks
                if wrong:
                    terminal = "it is up but its readiness endpoint reports the wrong state"
            ready = all(ok for _, ok, _ in checks)
            if ready or terminal or self.monotonic() >= deadline:
                break
            pm2_ok = all(ok for _, ok, _ in pm2_checks)
            health_ok = not url or all(ok for _, ok, _ in health[0])
            if health_ok and not pm2_ok:
                # Only PM2's side is missing: sample again once the uptime can have passed the window.
                uptimes = [uptime_seconds(p, self.clock()) for p in instances]
                short = self.params["ready_window"] - min(uptimes) if uptimes and None not in uptimes else 0.0
                cap = self.pm2_sample_interval if url else self.poll_interval
                self.sleep(max(0.0, min(short, cap, deadline - self.monotonic())))
                answer = last_answer if url and self.monotonic() - answered <= self.pm2_sample_interval else None
            else:
                self.sleep(max(0.0, min(self.health_poll_interval if url else self.poll_interval,
                                        deadline - self.monotonic())))
                if url and self.monotonic() - sampled < self.pm2_sample_interval:
                    continue
            instances, sampled = self._sample(), self.monotonic()
            pm2_checks = tracker.observe(instances, self.clock()) if instances else []
            resampled_for_pid = False
        readiness = {"ready": ready, "waited_seconds": round(self.monotonic() - start, 3),
                     "checks": [{"name": name, "ok": ok, "detail": detail} for name, ok, detail in checks]}
        if ready:
            readiness.update(_when(self.clock()))
            app_ready = (health[2] or {}).get("readyAt") if health else None
            if isinstance(app_ready, str):
                readiness["app_ready_at"] = app_ready[:40]
        if not ready:
            failed = "; ".join(detail for _, ok, detail in checks if not ok)
            why = terminal or "not ready after %ss" % _seconds(self.params["ready_timeout"])
            raise ReadinessError("%s is not ready: %s: %s" % (self.name, why, failed), readiness, instances)
        if self.params["expected_digests"] is not None and url:
            self.wait_digests(readiness, instances, health[2])
        return readiness, instances

    def wait_digests(self, readiness, instances, doc):
        """After readiness: wait until the application has computed every digest (digestsComplete, when it reports
        it), then compare them. A mismatch, an answer that is no longer ready, or another pid fails."""
        start = self.monotonic()
        deadline = start + self.params["digests_timeout"]
        url = self.params["health_url"]
        pids = [p.get("pid") for p in instances]
        problem = None
        while True:
            if doc is not None and doc.get("digestsComplete", True) is not False:
                break
            if self.monotonic() >= deadline:
                problem = "its digests were not complete after %ss (digests_timeout)" % _seconds(self.params["digests_timeout"])
                break
            self.sleep(max(0.0, min(self.digests_poll_interval, deadline - self.monotonic())))
            status, doc, reason = self._read_health(deadline - self.monotonic())
            checks, wrong = self._health_checks(instances, status, doc, reason)
            if status is None:
                # Busy or gone: PM2 tells which.
                now = self._sample()
                if [p.get("pid") for p in now] != pids or status_of(now) != "online":
                    problem = "it went down while computing its digests (PM2 status %s, pid %s)" % (
                        status_of(now), ", ".join(str(p.get("pid")) for p in now) or "none")
                    instances = now
                    break
                doc = None
                continue
            if wrong or not all(ok for _, ok, _ in checks):
                problem = "it was ready, then %s" % "; ".join(detail for _, ok, detail in checks if not ok)
                break
        readiness["digests_waited_seconds"] = round(self.monotonic() - start, 3)
        if problem is None:
            check = self._digest_check(doc)
            readiness["checks"].append({"name": check[0], "ok": check[1], "detail": check[2]})
            if check[1]:
                readiness["digests_complete_at"] = _when(self.clock())["ready_at"]
                return
            problem = "it is up but its readiness endpoint reports the wrong state"
        readiness["ready"] = False
        failed = "; ".join(c["detail"] for c in readiness["checks"] if not c["ok"])
        raise ReadinessError("%s is not ready: %s%s" % (self.name, problem, (": " + failed) if failed else ""),
                             readiness, instances)

    # --- the run ---

    def run(self):
        try:
            ok, result = self._run()
        finally:
            if self.owns_runner:
                self.runner.close()
        result["pm2_runner"] = self.runner.description
        return ok, result

    def _run(self):
        result = {"changed": False, "pm2_home": self.pm2_home, "user": self.user, "commands": self.runner.commands}
        try:
            self.validate()
            if self._deletes_first():
                # A fresh-env restart is delete + start whatever the process's state: delete straight away rather
                # than read the list first (one `pm2` Node process less while the service is down).
                would, steps, before = ("restart" if self._delete_first() else "start"), ["start_ecosystem"], None
            else:
                processes = self.runner.jlist()
                instances = find_instances(processes, self.name)
                before = status_of(instances)
                would, steps = self.plan(instances, processes)
            result.update(would=would, changed=would != "none")
            if would != "none" and not self.module.check_mode:
                for step in steps:
                    self.apply(step)
                processes = self.runner.jlist()
                instances = find_instances(processes, self.name)
                self.verify(steps, instances, processes)
            if self.wait and self.state in STARTING_STATES + ("info",) and not (self.module.check_mode and would != "none"):
                if not instances:
                    raise Pm2Error(self._not_found(processes))
                result["readiness"], instances = self.wait_ready(instances)
            if self.state == "info" and not self.wait and self.params["health_url"]:
                self.read_health_once(result)
            self._describe(result, instances)
            if self.module._diff:
                after = PREDICTED_STATUS[would] if self.module.check_mode and would != "none" else status_of(instances)
                result["diff"] = {"before": "%s: %s\n" % (self.name, before), "after": "%s: %s\n" % (self.name, after)}
            stale = result.get("stale_env")
            if stale and self.params["fail_on_stale_env"]:
                raise Pm2Error("%s (pid %s) still has %s in its environment: such a variable beats .env (dotenv never "
                               "overrides the environment); restart with fresh_env and env_remove"
                               % (self.name, result["process"]["pid"], ", ".join(stale)))
        except ReadinessError as exc:
            result["readiness"] = exc.readiness
            self._describe(result, exc.instances)
            return self._failed(result, str(exc))
        except Pm2Error as exc:
            return self._failed(result, str(exc))
        return True, result

    def _deletes_first(self):
        """Whether this run may delete before reading the list: a fresh-env restart, for real (check mode and diff
        mode read the list first to tell what would be done and the status before), in a running daemon."""
        return (self.state == "restarted" and self.fresh_env and not self.module.check_mode and not self.module._diff
                and self.runner.daemon_running())

    def _delete_first(self):
        """Delete the process; True when PM2 had it, False when it did not (the list then says so)."""
        self._ecosystem()  # a missing ecosystem is refused before the service is stopped
        rc, out, err = self.runner.run(["delete", self.name])
        if rc == 0:
            return True
        processes = self.runner.jlist()
        if find_instances(processes, self.name):
            raise Pm2Error("`pm2 delete %s` failed (rc=%d, PM2_HOME=%s): %s" % (
                self.name, rc, self.pm2_home, scrub_output((err or "") + "\n" + (out or ""), self.runner.secrets) or "no output"))
        return False

    def _describe(self, result, instances):
        result["process"] = summarize(instances[0], self.clock()) if instances else None
        result["instances"] = len(instances)
        if self.health is not None:
            result["health"] = self.health
        if self.params["env_check"]:
            present = set().union(*(env_names(p) for p in instances)) if instances else set()
            result["stale_env"] = [name for name in self.params["env_check"] if name in present]

    def _failed(self, result, msg):
        result["msg"] = msg
        return False, result


class ReadinessError(Pm2Error):
    def __init__(self, msg, readiness, instances):
        super().__init__(msg)
        self.readiness = readiness
        self.instances = instances


def _when(epoch):
    """ready_at (ISO 8601 UTC, milliseconds) and ready_at_epoch of an epoch."""
    stamp = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc)
    return {"ready_at": stamp.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (stamp.microsecond // 1000),
            "ready_at_epoch": round(epoch, 3)}


def _seconds(value):
    return int(value) if float(value).is_integer() else value
