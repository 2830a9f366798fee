# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Audit trail of baileys-dr playbook runs on the control node (notification callback).

from __future__ import annotations

DOCUMENTATION = r"""
name: baileys_dr_audit
type: notification
short_description: Appends one JSON line per playbook start and end and per task result of DR playbooks
description:
  - Writes to a JSON lines file on the control node, for every playbook run, a C(playbook_start) record, one C(step)
    record per task result and host, and a C(playbook_end) record with the outcome, the target hosts and their
    counts, and the duration.
  - Every record says who (the control-node user, and the AWX job id and launching user when the run comes from AWX, from the
    environment C(JOB_ID), or extra vars C(awx_job_id)/C(tower_job_id), C(awx_user_name)/C(tower_user_name)), which run
    (C(run_id)), playbook, play, role, task, host, status (ok, changed, failed, skipped, unreachable, ignored) and
    duration.
  - Never task arguments and never results. A failed step carries the first 300 characters of its C(msg), except for
    C(no_log) tasks, of which only the task name and the status are recorded. Extra vars appear by name only.
  - The file is created 0600 in a 0700 directory; each record is one C(write(2)) in append mode, and the file is
    fsynced after failures and at the end of the run.
requirements:
  - enabled through C(callbacks_enabled) in ansible.cfg or C(ANSIBLE_CALLBACKS_ENABLED)
options:
  path:
    description: The audit file (JSON lines).
    type: path
    default: ~/.local/state/baileys-dr/audit.jsonl
    env:
      - name: BAILEYS_DR_AUDIT_LOG
    ini:
      - section: callback_baileys_dr_audit
        key: path
"""

import datetime
import getpass
import json
import os
import time
import uuid

from ansible import context
from ansible.plugins.callback import CallbackBase

MSG_LIMIT = 300


def _utc_now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _user():
    try:
        return getpass.getuser()
    except Exception:  # no USER and no passwd entry (some containers)
        return str(os.getuid())


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "notification"
    CALLBACK_NAME = "baileys_dr_audit"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, display=None):
        super().__init__(display=display)
        self.path = None
        self.fd = None
        self.broken = False
        self.run_id = uuid.uuid4().hex
        self.started = time.time()
        self.who = {"user": _user(), "job_id": os.environ.get("JOB_ID", ""), "awx_user": ""}
        self.playbook = ""
        self.play = ""
        self.task_started = {}

    def set_options(self, task_keys=None, var_options=None, direct=None):
        super().set_options(task_keys=task_keys, var_options=var_options, direct=direct)
        self.path = os.path.expanduser(self.get_option("path"))

    # -- writing -----------------------------------------------------------
    def _open(self):
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        # A file created earlier by another tool keeps no wider mode than the audit needs.
        os.fchmod(self.fd, 0o600)

    def _write(self, record, sync=False):
        if self.broken:
            return
        record = dict({"time": _utc_now(), "run_id": self.run_id, "playbook": self.playbook}, **self.who, **record)
        try:
            if self.fd is None:
                self._open()
            os.write(self.fd, (json.dumps(record, sort_keys=True, default=str) + "\n").encode("utf-8"))
            if sync:
                os.fsync(self.fd)
        except OSError as exc:
            self.broken = True
            self._display.warning("baileys_dr_audit: cannot write the audit log %s: %s; no more records this run" % (self.path, exc))

    # -- playbook and play -------------------------------------------------
    def v2_playbook_on_start(self, playbook):
        self.playbook = os.path.basename(playbook._file_name)
        args = context.CLIARGS
        self._write({"event": "playbook_start", "playbook_path": os.path.abspath(playbook._file_name),
                     "check_mode": bool(args.get("check", False)), "limit": args.get("subset") or "",
                     "tags": list(args.get("tags") or [])})

    def v2_playbook_on_play_start(self, play):
        self.play = play.get_name().strip()
        extra_vars = {}
        try:
            extra_vars = play.get_variable_manager().extra_vars or {}
        except Exception:
            pass
        job_id = extra_vars.get("awx_job_id", extra_vars.get("tower_job_id"))
        if job_id not in (None, "") and not self.who["job_id"]:
            self.who["job_id"] = str(job_id)
        awx_user = extra_vars.get("awx_user_name", extra_vars.get("tower_user_name"))
        if awx_user:
            self.who["awx_user"] = str(awx_user)
        self._write({"event": "play_start", "play": self.play, "hosts_pattern": list(play.hosts or []),
                     "extra_vars": sorted(str(k) for k in extra_vars)})

    def v2_playbook_on_stats(self, stats):
        hosts = sorted(stats.processed.keys())
        summary = {host: stats.summarize(host) for host in hosts}
        failed = any(s["failures"] or s["unreachable"] for s in summary.values())
        self._write({"event": "playbook_end", "outcome": "failed" if failed else "ok", "hosts": hosts, "summary": summary,
                     "duration_seconds": round(time.time() - self.started, 3)}, sync=True)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    # -- steps ---------------------------------------------------------------
    def v2_runner_on_start(self, host, task):
        self.task_started[(task._uuid, host.get_name())] = time.time()

    def _step(self, result, status):
        task = result._task
        host = result._host.get_name()
        started = self.task_started.pop((task._uuid, host), None)
        record = {
            "event": "step",
            "play": self.play,
            "role": task._role.get_name() if task._role else "",
            # The bare name: the role has a field of its own.
            "task": (task.name or task.get_name()).strip(),
            "host": host,
            "status": status,
            "duration_seconds": round(time.time() - started, 3) if started else None,
        }
        hidden = bool(task.no_log) or bool(result._result.get("_ansible_no_log"))
        if hidden:
            # Name and status only: not even the action, the delegation or the message.
            record = {k: record[k] for k in ("event", "task", "status", "host", "play")}
            record["no_log"] = True
        else:
            record["action"] = task.action
            delegated = (result._result.get("_ansible_delegated_vars") or {}).get("ansible_host")
            if delegated:
                record["delegated_to"] = delegated
            if status in ("failed", "ignored", "unreachable"):
                record["msg"] = str(result._result.get("msg", ""))[:MSG_LIMIT]
        self._write(record, sync=status in ("failed", "unreachable"))

    def v2_runner_on_ok(self, result):
        self._step(result, "changed" if result._result.get("changed") else "ok")

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._step(result, "ignored" if ignore_errors else "failed")

    def v2_runner_on_skipped(self, result):
        self._step(result, "skipped")

    def v2_runner_on_unreachable(self, result):
        self._step(result, "unreachable")
