"""The embedded default test bed, private to a test module: playbooks run on the real parts.

`testbed` (module scope) stands up `playbooks/testbed.yml` on `inventories/local/hosts.yml` (a throwaway
PostgreSQL cluster, seeded data, the test application under PM2) in directories of its own: the demo directory
(BAILEYS_DR_DEMO_DIR), a PM2 daemon of its own (PM2_HOME), a free health port, its own lock directory and
controller audit log. Nothing is shared with `scripts/demo`, port 3011 or the default PM2 daemon.

Playbooks run with the `ansible.posix.jsonl` stdout callback: every task result (module results included) can be
read back (`PlaybookRun`). `Writer` drives testbed/bin/writer (docs/rehearsal.md, "Load generator") against the
test bed's service and checks its ledger against either store.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

import pgcluster
import writer as writer_lib
from conftest import ROOT
from faults_helpers import wait_until

PLAYBOOK_BIN = os.path.join(os.path.dirname(sys.executable), "ansible-playbook")
WRITER_BIN = os.path.join(ROOT, "testbed", "bin", "writer")
INVENTORY = os.path.join(ROOT, "inventories", "local", "hosts.yml")
SEED = {"testbed_seed_companies": 2, "testbed_seed_keys_per_company": 300}
# Variables a test must not pass on to the playbooks (another run's hooks, a database or Sentry of the caller's).
SCRUBBED = ("BAILEYS_DR_TEST_", "PG", "SENTRY_", "BAILEYS_DR_SENTRY", "BAILEYS_DR_AUDIT_LOG", "BAILEYS_DR_DEMO_DIR",
            "PM2_HOME", "ANSIBLE_")
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def epoch_of(text):
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def pm2_bin():
    out = subprocess.run([os.path.join(ROOT, "testbed", "bin", "install-node-deps"), "--check", "--pm2-only"],
                         check=True, capture_output=True, text=True).stdout
    return [line.split("=", 1)[1] for line in out.splitlines() if line.startswith("PM2_BIN=")][0]


class PlaybookRun:
    """One ansible-playbook run: exit status, the jsonl events, every task result."""

    def __init__(self, name, returncode, output, log_path):
        self.name, self.returncode, self.output, self.log_path = name, returncode, output, log_path
        self.events = []
        for line in output.splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    self.events.append(json.loads(line))

    def tasks(self):
        """[(task name, event name, host result, start epoch, end epoch)] of every task result, in order."""
        found = []
        for event in self.events:
            if event.get("_event") not in ("v2_runner_on_ok", "v2_runner_on_failed", "v2_runner_on_skipped"):
                continue
            task = event["task"]
            for result in event.get("hosts", {}).values():
                duration = task.get("duration") or {}
                found.append((task.get("name", ""), event["_event"], result,
                              epoch_of(duration["start"]) if duration.get("start") else None,
                              epoch_of(duration["end"]) if duration.get("end") else None))
        return found

    def result(self, action):
        """The last result of a module (by its action name), or None when it did not run."""
        results = [result for _, event, result, _, _ in self.tasks()
                   if result.get("action") == action and event != "v2_runner_on_skipped"]
        return results[-1] if results else None

    def ended(self, task_part):
        """End (epoch) of the last task whose name holds task_part."""
        ends = [end for name, event, _, _, end in self.tasks() if task_part in name and event != "v2_runner_on_skipped"]
        assert ends, "%s ran no task named like %r\n%s" % (self.name, task_part, self.explain())
        return ends[-1]

    def failures(self):
        return ["%s: %s" % (name, result.get("msg")) for name, event, result, _, _ in self.tasks()
                if event == "v2_runner_on_failed" and not result.get("_ansible_ignore_errors")]

    def final_message(self):
        """What the play said last when it failed (the role's own "Fail, naming the step" task)."""
        failed = [result.get("msg", "") for _, event, result, _, _ in self.tasks() if event == "v2_runner_on_failed"]
        return str(failed[-1]) if failed else ""

    def explain(self):
        return "%s exited %s (log %s); failed tasks:\n  %s" % (
            self.name, self.returncode, self.log_path, "\n  ".join(self.failures()[-6:]) or "none")


class Testbed:
    """The embedded default in temporary directories: see the module docstring."""

    def __init__(self):
        self.base = tempfile.mkdtemp(prefix="baileys-dr-switch-")
        # The server's account (postgres) reads the cluster below the demo directory.
        os.chmod(self.base, 0o755)
        self.demo_dir = os.path.join(self.base, "demo")
        os.mkdir(self.demo_dir, 0o755)
        self.pm2_home = tempfile.mkdtemp(prefix="bdr-pm2-")  # short: PM2's socket paths are limited to 107 bytes
        self.port = pgcluster.free_port()
        self.pm2 = pm2_bin()
        self.logs = os.path.join(self.base, "logs")
        os.mkdir(self.logs)
        self.runs = 0
        self.writers = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(SCRUBBED)}
        self.env.update(BAILEYS_DR_DEMO_DIR=self.demo_dir, PM2_HOME=self.pm2_home, ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"),
                        BAILEYS_DR_AUDIT_LOG=os.path.join(self.base, "callback-audit.jsonl"), ANSIBLE_NOCOLOR="1",
                        ANSIBLE_STDOUT_CALLBACK="ansible.posix.jsonl",
                        PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
        self.extra_vars = {"testbed_app_health_port": self.port, "baileys_dr_lock_dir": os.path.join(self.base, "locks")}

    # -- where things are --------------------------------------------------------------------------------------------

    app_root = property(lambda self: os.path.join(self.demo_dir, "app"))
    sessions = property(lambda self: os.path.join(self.app_root, "baileys_sessions"))
    standby = property(lambda self: self.sessions + ".standby")
    state_file = property(lambda self: os.path.join(self.demo_dir, "state", "failover-state.json"))
    audit_log = property(lambda self: os.path.join(self.demo_dir, "audit.jsonl"))
    health_url = property(lambda self: "http://127.0.0.1:%d/health" % self.port)
    cluster = property(lambda self: pgcluster.Cluster(os.path.join(self.demo_dir, "postgres")))

    # -- playbooks ---------------------------------------------------------------------------------------------------

    def _argv(self, playbook, extra_vars, args=()):
        return [PLAYBOOK_BIN, "-i", INVENTORY, os.path.join(ROOT, "playbooks", playbook),
                "-e", json.dumps(dict(self.extra_vars, **(extra_vars or {}))), *args]

    def _log_path(self, playbook):
        self.runs += 1
        return os.path.join(self.logs, "%02d-%s.log" % (self.runs, playbook.replace(".yml", "")))

    def playbook(self, playbook, extra_vars=None, env=None, timeout=900, args=()):
        """Run a playbook to its end (args: more ansible-playbook arguments, --check say); a PlaybookRun."""
        log_path = self._log_path(playbook)
        run = subprocess.run(self._argv(playbook, extra_vars, args), cwd=ROOT, env=dict(self.env, **(env or {})),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
        with open(log_path, "w", encoding="utf-8") as fh:
            fh.write(run.stdout)
        return PlaybookRun(playbook, run.returncode, run.stdout, log_path)

    def playbook_process(self, playbook, extra_vars=None, env=None):
        """Start a playbook in a process group of its own (to be killed whole); (Popen, log path)."""
        log_path = self._log_path(playbook)
        with open(log_path, "w", encoding="utf-8") as out:
            process = subprocess.Popen(self._argv(playbook, extra_vars), cwd=ROOT, env=dict(self.env, **(env or {})),
                                       stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return process, log_path

    def up(self):
        run = self.playbook("testbed.yml", SEED)
        assert run.returncode == 0, run.explain()
        self.wait_serving("postgres")

    # -- the service ---------------------------------------------------------------------------------------------------

    def health(self, url=None):
        """(status, document) of /health, or (None, None) when nothing answers."""
        try:
            with NO_PROXY.open(url or self.health_url, timeout=10) as answer:
                return answer.status, json.load(answer)
        except urllib.error.HTTPError as exc:
            with contextlib.suppress(ValueError):
                return exc.code, json.load(exc)
            return exc.code, {}
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
            return None, None

    def wait_serving(self, store, complete=True, timeout=180, url=None):
        """/health once ready on store (with complete digests: the verification is over)."""
        found = {}

        def serving():
            status, doc = self.health(url)
            found["last"] = (status, doc)
            return status == 200 and doc.get("store") == store and doc.get("ready") and (
                doc.get("digestsComplete") or not complete)

        try:
            wait_until(serving, timeout=timeout, what="the service ready on %s" % store)
        except AssertionError:
            status, doc = found.get("last") or (None, None)
            raise AssertionError("the service is not ready on %s after %ds: %s %s" % (
                store, timeout, status, {k: (doc or {}).get(k) for k in ("store", "ready", "errors", "digestsComplete")})) from None
        return found["last"][1]

    def instances(self):
        """PM2 processes of the service: [{pid, status, exec_mode}]."""
        out = subprocess.run([self.pm2, "jlist"], env=self.env, capture_output=True, text=True, timeout=60, check=True).stdout
        line = [ln for ln in out.splitlines() if ln.lstrip().startswith("[")][-1]
        return [{"pid": proc.get("pid"), "status": proc["pm2_env"].get("status"), "exec_mode": proc["pm2_env"].get("exec_mode")}
                for proc in json.loads(line) if proc.get("name") == "baileys-whatsapp-service"]

    def pm2_command(self, *args):
        return subprocess.run([self.pm2, *args], cwd=self.app_root, env=self.app_env(), capture_output=True, text=True,
                              timeout=120, check=True)

    def app_env(self, **extra):
        """The environment a service started by hand gets: nothing that would beat its .env."""
        env = {k: v for k, v in self.env.items() if not k.startswith(("USE_", "POSTGRES_", "HEALTH_PORT", "NODE_ENV"))}
        return dict(env, **extra)

    def git(self, *args):
        return subprocess.run(["git", *args], cwd=self.app_root, capture_output=True, text=True, check=True).stdout.strip()

    def git_ref(self):
        """(symbolic ref or None, commit) of HEAD."""
        ref = subprocess.run(["git", "symbolic-ref", "-q", "HEAD"], cwd=self.app_root, capture_output=True, text=True).stdout.strip()
        return ref or None, self.git("rev-parse", "HEAD")

    def env_file(self):
        with open(os.path.join(self.app_root, ".env"), "rb") as fh:
            return fh.read()

    # -- the database --------------------------------------------------------------------------------------------------

    def db_params(self):
        with open(os.path.join(self.demo_dir, "postgres", "app-password"), encoding="utf-8") as fh:
            password = fh.read().strip()
        return {"login_host": "127.0.0.1", "login_port": self.cluster.port, "login_user": "baileys",
                "login_password": password, "login_db": "baileys", "connect_timeout": 5}

    def libpq_env(self):
        p = self.db_params()
        return {"PGHOST": p["login_host"], "PGPORT": str(p["login_port"]), "PGUSER": p["login_user"],
                "PGPASSWORD": p["login_password"], "PGDATABASE": p["login_db"], "PGCONNECT_TIMEOUT": "5"}

    def connect(self, application_name="baileys-dr-tests"):
        from ansible.module_utils.baileys_dr_postgres import connect

        return connect(self.db_params(), application_name=application_name)

    def database_digests(self, expected=None):
        """baileys_state_digest of the database (with mismatches when expected is given)."""
        import baileys_state_digest
        from module_harness import run_module

        params = dict(self.db_params())
        if expected is not None:
            params["expected"] = expected
        ok, result = run_module(baileys_state_digest, params)
        assert ok, result
        return result

    def stop_postgres(self):
        self.cluster.stop()
        wait_until(lambda: not self.cluster.running(), timeout=60, what="PostgreSQL to stop")

    def start_postgres(self):
        cluster = self.cluster
        if not cluster.running():
            with open(os.path.join(self.demo_dir, "postgres", "app-password"), encoding="utf-8") as fh:
                cluster.start(fh.read().strip())
            cluster.wait_ready(timeout=60)

    # -- reports -------------------------------------------------------------------------------------------------------

    def audit_records(self, operation):
        """The audit records (log on the host) of an operation, oldest first."""
        if not os.path.exists(self.audit_log):
            return []
        with open(self.audit_log, encoding="utf-8") as fh:
            records = [json.loads(line) for line in fh if line.strip()]
        return [r for r in records if r.get("operation") == operation and r.get("event", "run") == "run"]

    def read_state(self):
        try:
            with open(self.state_file, encoding="utf-8") as fh:
                return json.load(fh)
        except FileNotFoundError:
            return None

    # -- the normal state: serving on PostgreSQL, no failover in effect ------------------------------------------------

    def back_to_normal(self):
        """What a test that failed midway left: writers stopped, PostgreSQL up, failed back, ready on PostgreSQL."""
        for running in self.writers:
            running.stop(missing_ok=True)
        self.start_postgres()
        switch = (self.read_state() or {}).get("switch") or {}
        if switch.get("operation") == "failover" and switch.get("phase") != "done":
            # A failover killed or crashed between its stop and its start: a re-run finishes it.
            run = self.playbook("failover.yml")
            assert run.returncode == 0, "the interrupted failover cannot be finished: " + run.explain()
        status, doc = self.health()
        if os.path.exists(self.state_file) or (doc or {}).get("store") == "files":
            run = self.playbook("failback.yml")
            assert run.returncode == 0, "the test bed cannot be put back on PostgreSQL: " + run.explain()
        self.wait_serving("postgres")

    def destroy(self):
        for running in self.writers:
            with contextlib.suppress(Exception):
                running.stop(missing_ok=True)
        subprocess.run([self.pm2, "kill"], env=self.env, capture_output=True, timeout=120)
        with contextlib.suppress(Exception):
            self.cluster.destroy()
        shutil.rmtree(self.pm2_home, ignore_errors=True)
        if os.environ.get("BAILEYS_DR_KEEP_TESTBED"):
            print("test bed kept in %s" % self.base)
        else:
            shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="module")
def testbed():
    """The embedded default, up and serving on PostgreSQL (2 companies x 300 keys); destroyed after the module
    (BAILEYS_DR_KEEP_TESTBED=1 keeps its directories and logs)."""
    bed = Testbed()
    try:
        bed.up()
        yield bed
    finally:
        bed.destroy()


@pytest.fixture
def normal_testbed(testbed):
    """The test bed serving on PostgreSQL, no failover in effect, no writer running (whatever a failed test left):
    `pytestmark = pytest.mark.usefixtures("normal_testbed")`."""
    testbed.back_to_normal()
    yield testbed


class Writer:
    """testbed/bin/writer against the test bed's service, one ledger."""

    def __init__(self, bed, ledger, companies=None):
        self.bed, self.ledger, self.companies = bed, str(ledger), companies
        self.pid_file = self.ledger + ".pid"
        bed.writers.append(self)

    def _run(self, *args, env=None, timeout=120):
        return subprocess.run([WRITER_BIN, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                              env=dict(self.bed.app_env(), **(env or {})))

    def start(self):
        started = self._run("start", "--url", "http://127.0.0.1:%d" % self.bed.port, "--ledger", self.ledger,
                            "--pid-file", self.pid_file, "--companies", ",".join(self.companies or ["auto"]))
        assert started.returncode == 0, started.stderr
        return self

    def running(self):
        return os.path.exists(self.pid_file)

    def stop(self, missing_ok=False):
        stopped = self._run("stop", "--pid-file", self.pid_file, *(["--missing-ok"] if missing_ok else []))
        assert stopped.returncode == 0, stopped.stderr

    def requests(self):
        if not os.path.exists(self.ledger):
            return []
        return [record for _, record in writer_lib.requests_of(self.ledger)]

    def acks(self, after=None, before=None):
        return [r for r in self.requests() if r["outcome"] == "ack" and (after is None or r["done_at"] > after)
                and (before is None or r["done_at"] < before)]

    def wait_acks(self, count, after, timeout=120):
        wait_until(lambda: len(self.acks(after=after)) >= count, timeout=timeout,
                   what="%d writes acknowledged after %s" % (count, writer_lib.iso(after)))

    def check(self, store, sessions=None):
        """The ledger against a store: (exit status, report); the writer must be stopped (a quiet moment)."""
        args = ["check", "--ledger", self.ledger, "--store", store, "--json"]
        if store == "files":
            args += ["--sessions", sessions or self.bed.sessions]
        done = self._run(*args, env=self.bed.libpq_env() if store == "postgres" else None)
        assert done.returncode in (0, 1), done.stderr
        return done.returncode, json.loads(done.stdout)


def descendants(pid):
    """Every process below pid (Ansible's workers start sessions of their own: not in the playbook's process group)."""
    children = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open("/proc/%s/stat" % name, encoding="utf-8") as fh:
                    children.setdefault(int(fh.read().rsplit(")", 1)[1].split()[1]), []).append(int(name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def kill_run(process):
    """kill -9 of a whole playbook run started with start_new_session: ansible-playbook's process group, its workers
    (each in a session of its own) and the modules they run, as a crash of the machine running them would."""
    pids = descendants(process.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait(timeout=60)

    def alive(pid):
        try:
            with open("/proc/%d/stat" % pid, encoding="utf-8") as fh:
                return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    wait_until(lambda: not [pid for pid in pids if alive(pid)], timeout=30, what="every process of the killed run to be gone")


