"""One size of bench/run set up: its PostgreSQL cluster (testbed/bin/pg-cluster) seeded with testbed/bin/seed, its
trees, its private application (repository, PM2_HOME, health port, inventory) and the record of its steps
(bench/results/<size>.json); a step measured as a child process. The steps themselves are in bench/steps.py and the
*_bench.py files; each takes a SizeRun.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time

from harness import (HERE, KEYS_PER_COMPANY, PROFILES, RESULTS, ROOT, STEPS, BenchError, last_json, loadavg, log,
                     measure, parse_events, ready_times, run_playbook, sh, utcnow)
from report import STEP_TEXT, phase_of

# Bytes a key file takes on disk (one 4 KiB block) and trees alive at once (baseline + export, or standby + live).
DISK_PER_KEY = 4096 + 600


class SizeRun:
    """Every step at one size, on a cluster of its own under workdir/<keys>."""

    def __init__(self, opts, keys):
        self.per_company = opts.keys_per_company
        if keys % self.per_company:
            raise BenchError("--sizes: %d is not a multiple of %d keys per company" % (keys, self.per_company))
        self.opts = opts
        self.keys = keys
        self.companies = keys // self.per_company
        # A variant (--keys-per-company) has results and profiles of its own: "<companies>x<keys per company>".
        self.name = str(keys) if self.per_company == KEYS_PER_COMPANY else "%dx%d" % (self.companies, self.per_company)
        self.work = os.path.join(opts.workdir, self.name)
        self.record = {"keys": keys, "companies": self.companies, "keys_per_company": self.per_company,
                       "command": opts.command_line, "started_at": utcnow(), "steps": {}, "profiles": {},
                       "notes": [], "loadavg": {"start": loadavg()}}
        self.env = None
        self.cluster = None
        previous = os.path.join(RESULTS, "%s.json" % self.name)
        if opts.only != set(STEPS) and os.path.exists(previous):
            # A partial run (--only) replaces the steps it measures and keeps the others of the last run, saying so.
            with open(previous, encoding="utf-8") as fh:
                old = json.load(fh)
            mine = {label for label in STEP_TEXT if phase_of(label) in opts.only}
            kept = {k: dict(v, run=v.get("run") or {"command": old.get("command"), "started_at": old.get("started_at"),
                                                       "load_mean": old.get("loadavg", {}).get("mean")})
                    for k, v in old.get("steps", {}).items() if k not in mine}
            if kept:
                self.record["steps"].update(kept)
                self.record["profiles"].update({k: v for k, v in old.get("profiles", {}).items() if k not in mine})
                by_run = {}
                for label, entry in sorted(kept.items()):
                    by_run.setdefault(json.dumps(entry["run"], sort_keys=True), []).append(label)
                for run, labels in by_run.items():
                    run = json.loads(run)
                    self.record["notes"].append("%s: from an earlier run, `%s` (started %s, 1-minute load average mean %s)"
                                                % (", ".join(labels), run["command"], run["started_at"], run["load_mean"]))

    # -- plumbing ---------------------------------------------------------------------------------------------------
    def discard(self, path):
        """Move a tree out of the way; removing millions of files takes minutes on a busy disk, so it happens after
        the results are written (see cmd_run), never between measured steps."""
        if os.path.lexists(path):
            trash = os.path.join(self.work, "trash")
            os.makedirs(trash, exist_ok=True)
            os.rename(path, os.path.join(trash, "%s-%s" % (os.path.basename(path), secrets.token_hex(3))))

    def py(self, *args):
        return [sys.executable] + list(args)

    def module_argv(self, name, params, profile=None, check=False):
        path = os.path.join(self.work, "args-%s-%s.json" % (name, secrets.token_hex(3)))
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(params, fh)
        argv = self.py(os.path.join(HERE, "benchmark.py"), "module", name, "--args-file", path)
        return argv + (["--profile", profile] if profile else []) + (["--check"] if check else [])

    def step(self, label, argv, kind, keys=None, env=None, extra=None, timeout=None):
        log("%s: %s ..." % (self.keys, label))
        # No step pays for the writeback of the one before it.
        os.sync()
        run = measure(argv, env=env or self.env, timeout=timeout)
        output = last_json(run["stdout"])
        if run["rc"] != 0 or not output or not output.get("ok"):
            raise BenchError("%s failed (exit %s): %s\n%s" % (label, run["rc"], (output or {}).get("result", run["stdout"][-3000:]),
                                                              run["stderr"]))
        keys = self.keys if keys is None else keys
        entry = {"kind": kind, "seconds": run["seconds"], "peak_rss_mib": run["peak_rss_mib"], "keys": keys,
                 "keys_per_second": round(keys / run["seconds"]) if run["seconds"] and keys else None,
                 "result": output.get("result"), "started_epoch": round(run["started_epoch"], 3)}
        entry.update(extra or {})
        self.record["steps"][label] = entry
        log("%s: %s %.2f s, %s keys/s, peak %.1f MiB" % (self.keys, label, run["seconds"], entry["keys_per_second"],
                                                         run["peak_rss_mib"]))
        self.save()
        return entry

    def save(self):
        for entry in self.record["steps"].values():
            entry.setdefault("run", {"command": self.record["command"], "started_at": self.record["started_at"],
                                     "load_mean": self.record["loadavg"].get("mean")})
        os.makedirs(RESULTS, exist_ok=True)
        path = os.path.join(RESULTS, "%s.json" % self.name)
        with open(path + ".tmp", "w", encoding="utf-8") as fh:
            json.dump(self.record, fh, indent=1, default=str)
        os.replace(path + ".tmp", path)

    def profile_path(self, label):
        return os.path.join(PROFILES, "%s-%s.txt" % (label, self.name))

    def maybe_profile(self, label, seconds, rerun):
        """Re-run a step that missed its time target under cProfile (when it is short enough to afford twice)."""
        if seconds > self.opts.profile_max_seconds:
            self.record["profiles"][label] = {"skipped": "the step took %.0f s (> %d s); see the same step's profile at a "
                                                         "smaller size" % (seconds, self.opts.profile_max_seconds)}
            return
        log("%s: profiling %s" % (self.keys, label))
        rerun(self.profile_path(label))
        self.record["profiles"][label] = {"path": os.path.relpath(self.profile_path(label), ROOT)}
        self.save()

    # -- set-up ------------------------------------------------------------------------------------------------------
    def check_disk(self):
        os.makedirs(self.work, exist_ok=True)
        stat = os.statvfs(self.work)
        free = stat.f_bavail * stat.f_frsize
        need = self.keys * DISK_PER_KEY * 4 + self.keys * 2500 + 2 * 1024 ** 3
        if free < need:
            raise BenchError("%s has %.1f GiB free, %d keys need about %.1f GiB" % (self.work, free / 1024 ** 3, self.keys,
                                                                                  need / 1024 ** 3))
        if stat.f_favail < self.keys * 2.2:
            raise BenchError("%s has %d free inodes, %d keys need about %d" % (self.work, stat.f_favail, self.keys,
                                                                               self.keys * 2.2))

    def start_cluster(self):
        sys.path.insert(0, os.path.join(ROOT, "testbed"))
        from pgcluster import Cluster

        password = secrets.token_urlsafe(18)
        self.password_file = os.path.join(self.work, "pg-password")
        with open(os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
            fh.write(password)
        os.chmod(self.work, 0o755)
        self.cluster = Cluster(os.path.join(self.work, "pg"))
        self.cluster.start(password)
        self.cluster.wait_ready()
        self.env = dict(os.environ, PGHOST="127.0.0.1", PGPORT=str(self.cluster.port), PGUSER="baileys",
                        PGDATABASE="baileys", PGPASSWORD=password, BENCH_TMP=self.work)
        os.environ.update({k: self.env[k] for k in ("PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGPASSWORD")})
        self.record["postgresql"] = self.cluster.psql("SHOW server_version").strip()

    def seed(self):
        log("%s: seeding %d companies x %d keys" % (self.keys, self.companies, self.per_company))
        started = time.monotonic()
        sh([os.path.join(ROOT, "testbed", "bin", "seed"), "--companies", str(self.companies), "--keys-per-company",
            str(self.per_company), "--seed", "bench"], env=dict(self.env, PATH=os.path.dirname(sys.executable) + ":" +
                                                              os.environ["PATH"]))
        self.cluster.psql("VACUUM ANALYZE", db="baileys")
        self.cluster.psql("CHECKPOINT")
        self.record["seed_seconds"] = round(time.monotonic() - started, 1)
        self.record["table_size"] = self.cluster.psql(
            "SELECT pg_size_pretty(pg_total_relation_size('whatsapp_keys'))", db="baileys").strip()

    def make_import_db(self):
        self.cluster.psql("DROP DATABASE IF EXISTS bench_import")
        self.cluster.psql("CREATE DATABASE bench_import OWNER baileys")
        with open(os.path.join(ROOT, "testbed", "schema.sql"), encoding="utf-8") as fh:
            self.cluster.psql(fh.read(), db="bench_import", user="baileys")
        self.cluster.psql("CREATE TABLE copy_auth (LIKE whatsapp_auth INCLUDING ALL);"
                          "CREATE TABLE copy_keys (LIKE whatsapp_keys INCLUDING ALL);", db="bench_import", user="baileys")

    # -- the application -------------------------------------------------------------------------------------------
    def app_setup(self):
        out = sh([os.path.join(ROOT, "testbed", "bin", "install-node-deps"), "--link"]).stdout
        found = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        self.node_modules, self.pm2_bin = found["APP_NODE_MODULES"], found["PM2_BIN"]
        self.app_root = os.path.join(self.work, "app")
        sh([os.path.join(ROOT, "testbed", "bin", "make-app-repo"), self.app_root, "--node-modules", self.node_modules])
        sys.path.insert(0, os.path.join(ROOT, "testbed"))
        from pgcluster import free_port

        self.health_port = free_port()
        dr = os.path.join(self.work, "dr")
        inventory = os.path.join(self.work, "inventory")
        os.makedirs(os.path.join(inventory, "group_vars", "all"), exist_ok=True)
        with open(os.path.join(inventory, "hosts.yml"), "w", encoding="utf-8") as fh:
            fh.write("all:\n  children:\n    testbed:\n      hosts:\n        localhost:\n"
                     "          ansible_connection: local\n"
                     "          ansible_python_interpreter: \"{{ ansible_playbook_python }}\"\n"
                     "    baileys_app:\n      hosts:\n        localhost:\n")
        settings = {
            "baileys_dr_app_root": self.app_root, "baileys_dr_app_user": "root", "baileys_dr_pm2_bin": self.pm2_bin,
            "baileys_dr_health_port": self.health_port, "baileys_dr_archive_dir": dr + "/archives",
            "baileys_dr_state_dir": dr + "/state", "baileys_dr_audit_log": dr + "/audit.jsonl",
            "baileys_dr_lock_dir": dr + "/locks", "baileys_dr_db_host": "127.0.0.1",
            "baileys_dr_db_port": self.cluster.port, "baileys_dr_db_name": "baileys", "baileys_dr_db_user": "baileys",
            "baileys_dr_db_password": "{{ lookup('ansible.builtin.file', '%s') }}" % self.password_file,
            "baileys_dr_environment": "test", "baileys_dr_report_dir": dr + "/reports",
            "baileys_dr_metrics_dir": dr + "/metrics", "baileys_dr_controller_audit_log": dr + "/controller-audit.jsonl",
            "baileys_dr_notify_state_dir": dr + "/notify",
            "testbed_app_root": self.app_root, "testbed_app_health_port": self.health_port,
            "testbed_app_node_modules": self.node_modules, "testbed_app_pm2": self.pm2_bin,
            "testbed_app_ready_timeout": 1800,
            "testbed_postgres_connection": {"host": "127.0.0.1", "port": self.cluster.port, "database": "baileys",
                                            "user": "baileys", "password": "{{ baileys_dr_db_password }}"},
        }
        path = os.path.join(inventory, "group_vars", "all", "main.yml")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8") as fh:
            json.dump(settings, fh, indent=1)  # JSON is YAML
        self.inventory = os.path.join(inventory, "hosts.yml")
        self.pm2_home = self.opts.pm2_home
        os.makedirs(self.pm2_home, exist_ok=True)
        self.app_env = dict(self.env, PM2_HOME=self.pm2_home, ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"),
                            PATH=os.path.dirname(sys.executable) + ":" + os.environ["PATH"])
        for name in ("PGPASSWORD", "PGHOST", "PGPORT", "PGUSER", "PGDATABASE"):
            self.app_env.pop(name, None)

    def playbook(self, label, playbook, extra, timeout=3600):
        return run_playbook(label, self.inventory, playbook, extra, os.path.join(self.work, "%s.log" % label),
                            env=self.app_env, timeout=timeout)

    def arm(self):
        """snapshot.yml, as the schedule runs it before any failover: refreshes the standby copy and writes the arming
        record the failover confirms (not timed)."""
        log("%s: snapshot.yml (standby refresh and arming, not timed)" % self.keys)
        self.playbook("snapshot", os.path.join(ROOT, "playbooks", "snapshot.yml"), [])

    def failover_playbook(self, label):
        """playbooks/failover.yml from the standby copy; its step entry (RTO: start of ansible-playbook to ready)."""
        audit_path = os.path.join(self.work, "dr", "audit.jsonl")
        run, text = self.playbook(label, os.path.join(ROOT, "playbooks", "failover.yml"),
                                  ["baileys_failover_source=standby", "baileys_failover_ready_timeout=1800",
                                   "baileys_failover_digests_timeout=3600"])
        with open(audit_path, encoding="utf-8") as fh:
            audit = [json.loads(line) for line in fh]
        record = [r for r in audit if r.get("operation") == "failover"][-1]
        if record.get("outcome") != "ok":
            raise BenchError("the failover's audit record says %s" % record.get("outcome"))
        done = re.search(r"Failover done in ([0-9.]+) s", text)
        # RTO as the operator lives it: from starting ansible-playbook to the service answering ready on files.
        ready, verified = self.app_ready_after(run["started_epoch"])
        return {"kind": "ours", "seconds": run["seconds"], "keys": self.keys,
                "rto_seconds": ready, "verified_seconds": verified,
                "keys_per_second": round(self.keys / run["seconds"]),
                "rto_role_seconds": float(done.group(1)) if done else record.get("duration_seconds"),
                "audit_duration_seconds": record.get("duration_seconds"),
                "armed": (record.get("details") or {}).get("armed"),
                "peak_rss_mib": None}

    def app_events(self, names):
        """The test application's log events of these names, in order (JSON lines of its PM2 out log)."""
        path = os.path.join(self.pm2_home, "logs", "baileys-whatsapp-service-out.log")
        if not os.path.exists(path):
            return []
        with open(path, encoding="utf-8", errors="replace") as fh:
            return parse_events(fh, names)

    def app_ready_after(self, started_epoch):
        """Seconds from started_epoch to the application's ready on the file store, and to its verification's end."""
        return ready_times(self.app_events(("load_finished", "verify_finished")), started_epoch)

    def app_teardown(self):
        # Not testbed_app's state=absent: it removes the application root, sessions tree included, file by file.
        for argv in ([self.pm2_bin, "delete", "baileys-whatsapp-service"], [self.pm2_bin, "kill"]):
            subprocess.run(argv, env=self.app_env, capture_output=True, timeout=120, check=False)
        shutil.rmtree(self.pm2_home, ignore_errors=True)
        self.discard(self.app_root)

    # -- the phases ----------------------------------------------------------------------------------------------
    def phase(self, name, func, *args):
        try:
            func(*args)
        except BenchError as exc:
            log("%s: %s FAILED: %s" % (self.keys, name, exc))
            self.record["notes"].append("%s failed: %s" % (name, str(exc)[:1500]))
            self.record.setdefault("failed", []).append(name)
            self.save()

    def sample_load(self, stop):
        """The 1-minute load average every 5 s: how busy the machine was besides the benchmark."""
        samples = []
        while not stop.wait(5):
            samples.append(float(loadavg().split()[0]))
            self.record["loadavg"].update(max=max(samples), mean=round(sum(samples) / len(samples), 2))

    def run(self, phases):
        """The cluster started and seeded, then each phase (name, function, arguments) in turn: one that fails is
        recorded and the next one runs."""
        self.check_disk()
        if self.opts.note:
            self.record["notes"].append(self.opts.note)
        stop = threading.Event()
        threading.Thread(target=self.sample_load, args=(stop,), daemon=True).start()
        try:
            self.start_cluster()
            self.seed()
            for name, func, args in phases:
                self.phase(name, func, *args)
        finally:
            stop.set()
            self.record["finished_at"] = utcnow()
            self.record["loadavg"]["end"] = loadavg()
            self.save()
            if self.cluster:
                self.cluster.stop()
        return self.record
