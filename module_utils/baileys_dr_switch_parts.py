# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The pieces of a store switch: its errors, the journal and its lock, the service's user, stray processes,
the rows and identities a switch compares.
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

from ansible.module_utils.baileys_dr_fs import write_file_atomic
from ansible.module_utils.baileys_dr_postgres import postgres_argument_spec, psycopg2
from ansible.module_utils.baileys_dr_tree import COMPANY_PREFIX, CREDS_FILE, MANIFEST_NAME, META_DIR, test_hook


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
