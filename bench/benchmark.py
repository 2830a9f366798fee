#!/usr/bin/env python3
"""baileys-dr performance benchmark: our modules against baselines on the same rows (run it as bench/run).

    bench/run [--sizes 1500,150000,1500000] [--only export,import,standby,failover,ssh,switch,cleanup] [--out docs/benchmarks.md]

Per size (keys; 1,500 keys per company, or --keys-per-company) on a throwaway PostgreSQL cluster of its own (testbed/bin/pg-cluster) loaded
with testbed/bin/seed, every step runs as a child process whose wall time and peak RSS (the larger of wait4 rusage and the summed RSS of its process tree sampled every 0.2 s) are recorded, after an os.sync() so that no step pays for the writeback of the one before:

- baselines: `psql -c "COPY ... TO STDOUT"` to /dev/null; bench/baselines.py write-files (the same per-key files);
  bench/baselines.py read-copy-in (reading those files and COPY ... FROM of the same rows into fresh tables);
- export: baileys_auth_export mode=live into an empty directory;
- import: baileys_auth_import of that tree into an empty database of the same cluster;
- standby: baileys_auth_export mode=standby build, refresh without change, refresh after 1% of the keys changed;
- failover: playbooks/failover.yml with baileys_failover_source=standby against a private application (its own
  repository, PM2_HOME and health port; started in database mode first);
- ssh (1 company): the failover from the standby copy over SSH to a container of the test bed, against its floor
  over SSH (bench/ssh_bench.py; needs root and Docker);
- switch: a planned failover and a failback of a private application while testbed/bin/writer writes through it
  (bench/switch_bench.py: bulk pass, 1% changed, baileys_store_switch; downtime, throughput, writes lost);
- cleanup: baileys_keys_cleanup deleting part of the keys with the archive (when that module exists).

Order per size: standby and failover, ssh, switch, export and import, cleanup (the 1,500,000-key targets first). The 1% change
UPDATEs 1% of the keys (uniformly among values that are JSON objects, not Buffers and not app-state-sync-keys, so
that Baileys reads them back unchanged), and DELETEs and INSERTs 1% of that. Trees are moved aside between steps
and removed after the report is written (removing millions of files takes minutes on a busy disk).

Results per size go to bench/results/<keys>.json (a run with --only keeps the other steps of the last run of that
size, and says so); docs/benchmarks.md is generated from every result file there, with the machine description
and the command lines (`bench/run report` writes it again). A missed time target gets a profile under
bench/profiles/: cProfile of the module re-run (when the step took at most --profile-max-seconds), and
ansible.posix.profile_tasks for the failover. `bench/run module NAME --args-file F` runs one module in this process
(what the steps time); `bench/run change` changes 1% of the keys of the database of the PG* environment.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import glob
import io
import json
import os
import platform
import pstats
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import time

import floor_bench
import ssh_bench
import switch_bench

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# BAILEYS_DR_BENCH_RESULTS: a scratch results directory, so a trial run leaves bench/results/ alone.
RESULTS = os.environ.get("BAILEYS_DR_BENCH_RESULTS") or os.path.join(HERE, "results")
PROFILES = os.environ.get("BAILEYS_DR_BENCH_PROFILES") or os.path.join(HERE, "profiles")
KEYS_PER_COMPANY = 1500
MODULES = {"export": "baileys_auth_export", "import": "baileys_auth_import", "verify": "baileys_sessions_verify",
           "cleanup": "baileys_keys_cleanup"}
STEPS = ("export", "import", "standby", "failover", "ssh", "switch", "cleanup")
MIB = 1024 * 1024
# Bytes a key file takes on disk (one 4 KiB block) and trees alive at once (baseline + export, or standby + live).
DISK_PER_KEY = 4096 + 600
PROFILE_MAX_SECONDS = 150


# --------------------------------------------------------------------------------------------------------------------
# Child side: one module in this process.

def setup_paths():
    sys.path[:0] = [os.path.join(ROOT, "library"), os.path.join(ROOT, "tests")]
    import ansible.module_utils

    path = os.path.join(ROOT, "module_utils")
    if path not in ansible.module_utils.__path__:
        ansible.module_utils.__path__.append(path)


def db_args():
    """Connection options from the PG* environment (the password stays in PGPASSWORD, read by libpq)."""
    return {"login_host": os.environ.get("PGHOST"), "login_port": int(os.environ.get("PGPORT") or 5432),
            "login_user": os.environ.get("PGUSER"), "login_db": os.environ.get("PGDATABASE")}


def cmd_module(args):
    setup_paths()
    import importlib

    from module_harness import run_module

    module = importlib.import_module(MODULES.get(args.name, args.name))
    with open(args.args_file, encoding="utf-8") as fh:
        params = json.load(fh)
    if args.name != "verify":
        params = dict(db_args(), **params)
    if args.profile:
        profiler = cProfile.Profile()
        ok, result = profiler.runcall(run_module, module, params, args.check)
        write_profile(profiler, args.profile, "%s %s" % (MODULES.get(args.name, args.name), json.dumps(params)))
    else:
        ok, result = run_module(module, params, check_mode=args.check)
    if not args.full:
        result = {k: v for k, v in result.items() if not isinstance(v, (dict, list)) or k in ("msg", "counts", "would_change", "batches", "vacuum", "archive")}
    print(json.dumps({"ok": ok, "result": result}, default=str))
    return 0 if ok else 1


def write_profile(profiler, path, title):
    out = io.StringIO()
    out.write("# cProfile of %s\n\n## top 30 by cumulative time\n" % title)
    stats = pstats.Stats(profiler, stream=out).strip_dirs()
    stats.sort_stats("cumulative").print_stats(30)
    out.write("\n## top 30 by own time\n")
    stats.sort_stats("tottime").print_stats(30)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(out.getvalue())


def change_rows(percent, spread="uniform", seed=None, untouched_since=None):
    """UPDATE percent of the keys (all companies, or the first tenth when concentrated), delete and insert 1% of that;
    with untouched_since (epoch), only among rows not written since (not a load generator's)."""
    import psycopg2

    conn = psycopg2.connect("", application_name="bench-change")
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM whatsapp_keys")
        total = cur.fetchone()[0]
        count = int(total * percent / 100)
        where = ""
        if spread == "concentrated":
            where = ("WHERE company_id IN (SELECT DISTINCT company_id FROM whatsapp_keys ORDER BY 1 "
                     "LIMIT (SELECT greatest(1, count(DISTINCT company_id) / 10) FROM whatsapp_keys))")
        cur.execute("SELECT setseed(%s)", ((seed if seed is not None else time.time() % 1000) / 1000.0,))
        # Only JSON objects that are not themselves a Buffer get a new member, and not app-state-sync-keys: every changed
        # value keeps a shape Baileys reads as it is (a member added to a Buffer object makes it a plain object of byte
        # numbers, which Baileys refuses; an app-state-sync-key passes through a protobuf that drops unknown members).
        where = (where + " AND " if where else "WHERE ") + (
            "jsonb_typeof(value) = 'object' AND coalesce(value->>'type', '') <> 'Buffer' "
            "AND key_type <> 'app-state-sync-key'")
        fresh = "" if untouched_since is None else " AND updated_at < to_timestamp(%f)" % float(untouched_since)
        where += fresh
        cur.execute(
            "UPDATE whatsapp_keys k SET value = jsonb_set(value, '{baileysDrBench}', to_jsonb(clock_timestamp()::text)) "
            "FROM (SELECT company_id, key_type, key_id FROM whatsapp_keys %s ORDER BY random() LIMIT %%s) s "
            "WHERE k.company_id = s.company_id AND k.key_type = s.key_type AND k.key_id = s.key_id" % where, (count,))
        updated = cur.rowcount
        cur.execute("DELETE FROM whatsapp_keys WHERE ctid IN (SELECT ctid FROM whatsapp_keys WHERE key_type = 'pre-key' "
                    "%s ORDER BY random() LIMIT %%s)" % fresh, (max(1, count // 100),))
        deleted = cur.rowcount
        cur.execute("INSERT INTO whatsapp_keys (company_id, key_type, key_id, value) SELECT company_id, 'pre-key', "
                    "'9' || (1000000 + floor(random() * 8000000))::bigint::text, "
                    "'{\"private\":{\"type\":\"Buffer\",\"data\":\"AQID\"},\"public\":{\"type\":\"Buffer\",\"data\":\"BAUG\"}}' "
                    "FROM (SELECT DISTINCT company_id FROM whatsapp_keys ORDER BY 1 LIMIT %s) c ON CONFLICT DO NOTHING",
                    (max(1, count // 100),))
        inserted = cur.rowcount
    conn.commit()
    conn.close()
    return {"updated": updated, "deleted": deleted, "inserted": inserted}


def cmd_change(args):
    print(json.dumps(change_rows(args.percent, args.spread)))
    return 0


# --------------------------------------------------------------------------------------------------------------------
# Parent side.

def tree_rss_bytes(root):
    """Summed RSS of root and every process below it (shared pages counted in each: an upper bound)."""
    parent_of, rss = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry, "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
            parent_of[int(entry)] = int(fields[1])
            rss[int(entry)] = int(fields[21]) * PAGE_SIZE
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(child for child, parent in parent_of.items() if parent == pid)
    return total


PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def measure(argv, env=None, cwd=None, stdout_file=None, timeout=None):
    """Run argv as a child: wall seconds, peak RSS (MiB: wait4, or the process tree summed when larger), exit code, stdout, stderr tail."""
    tmp = os.path.join(os.environ.get("BENCH_TMP", "/tmp"), "bench-%s" % secrets.token_hex(4))
    out_path = stdout_file or tmp + ".out"
    with open(out_path, "wb") as out, open(tmp + ".err", "wb") as err:
        started_epoch = time.time()
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=cwd)
        deadline = started + timeout if timeout else None
        # wait4's peak is that of the largest single process; a module that forks workers is measured as the sum.
        tree_peak, next_sample = 0, started
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline and time.monotonic() > deadline:
                proc.kill()
            if time.monotonic() >= next_sample:
                tree_peak = max(tree_peak, tree_rss_bytes(proc.pid))
                next_sample = time.monotonic() + 0.2
            time.sleep(0.02)
        seconds = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout = "" if stdout_file else open(out_path, encoding="utf-8", errors="replace").read()
    stderr = open(tmp + ".err", encoding="utf-8", errors="replace").read()
    for path in (tmp + ".out", tmp + ".err"):
        if os.path.exists(path) and path != stdout_file:
            os.unlink(path)
    peak_mib = max(usage.ru_maxrss / 1024, tree_peak / 1048576)
    return {"seconds": round(seconds, 2), "peak_rss_mib": round(peak_mib, 1), "rc": proc.returncode,
            "stdout": stdout, "stderr": stderr[-4000:], "started_epoch": started_epoch}


def last_json(text):
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                pass
    return None


def sh(argv, **kwargs):
    kwargs.setdefault("check", True)
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    return subprocess.run(argv, **kwargs)


def log(message):
    print("[%s] %s" % (datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S"), message), flush=True)


class BenchError(RuntimeError):
    pass


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

    # -- steps -------------------------------------------------------------------------------------------------------
    def run_export_import(self, do_import):
        baseline_tree = os.path.join(self.work, "baseline", "baileys_sessions")
        live_dir = os.path.join(self.work, "live")
        live_tree = os.path.join(live_dir, "baileys_sessions")
        os.makedirs(live_dir, exist_ok=True)
        psql = shutil.which("psql") or os.path.join(self.cluster.bindir, "psql")
        run = measure([psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", "COPY whatsapp_auth TO STDOUT",
                       "-c", "COPY whatsapp_keys TO STDOUT"], env=self.env, stdout_file="/dev/null")
        if run["rc"]:
            raise BenchError("psql COPY TO STDOUT failed: %s" % run["stderr"])
        self.record["steps"]["baseline_copy_to"] = {
            "kind": "baseline", "seconds": run["seconds"], "peak_rss_mib": run["peak_rss_mib"], "keys": self.keys,
            "keys_per_second": round(self.keys / run["seconds"]) if run["seconds"] else None}
        log("%s: baseline_copy_to %.2f s" % (self.keys, run["seconds"]))
        self.step("baseline_write_files", self.py(os.path.join(HERE, "baselines.py"), "write-files", "--dest", baseline_tree),
                  "baseline")
        import_env = dict(self.env, PGDATABASE="bench_import")
        if do_import:
            # Each reader reads the tree written just before it (at 1,500,000 keys the trees outgrow the page cache).
            self.make_import_db()
            self.step("baseline_read_copy_in", self.py(os.path.join(HERE, "baselines.py"), "read-copy-in", "--src",
                                                       baseline_tree), "baseline", env=import_env)
            self.cluster.psql("DROP TABLE copy_keys, copy_auth; CHECKPOINT", db="bench_import")
        self.discard(os.path.dirname(baseline_tree))
        params = {"dest": live_tree, "keep_backup": False}
        export = self.step("export_live", self.module_argv("export", params), "ours")
        if self.opts.profile_always or export["seconds"] > TARGETS_RATIO * self.record["steps"]["baseline_write_files"]["seconds"]:
            prof_tree = os.path.join(self.work, "live-profile")
            os.makedirs(prof_tree, exist_ok=True)

            def rerun(path):
                run = measure(self.module_argv("export", dict(params, dest=os.path.join(prof_tree, "baileys_sessions")),
                                               profile=path), env=self.env)
                self.discard(prof_tree)
                if run["rc"]:
                    raise BenchError("profiled export failed: %s" % run["stdout"][-2000:])
            self.maybe_profile("export_live", export["seconds"], rerun)
        if do_import:
            iparams = {"src": live_tree, "undo_dir": os.path.join(self.work, "undo")}
            imported = self.step("import", self.module_argv("import", iparams), "ours", env=import_env)
            if self.opts.profile_always or imported["seconds"] > TARGETS_RATIO * self.record["steps"]["baseline_read_copy_in"]["seconds"]:
                def rerun(path):
                    self.cluster.psql("TRUNCATE whatsapp_keys, whatsapp_auth", db="bench_import")
                    run = measure(self.module_argv("import", dict(iparams, undo_dir=os.path.join(self.work, "undo2")),
                                                   profile=path), env=import_env)
                    if run["rc"]:
                        raise BenchError("profiled import failed: %s" % run["stdout"][-2000:])
                self.maybe_profile("import", imported["seconds"], rerun)
            self.cluster.psql("DROP DATABASE bench_import")
            self.discard(os.path.join(self.work, "undo"))
            self.discard(os.path.join(self.work, "undo2"))
        self.discard(os.path.dirname(baseline_tree))
        self.discard(live_dir)

    def run_standby(self, standby):
        params = {"dest": standby, "mode": "standby"}
        self.step("standby_build", self.module_argv("export", params), "ours")
        self.step("standby_refresh_unchanged", self.module_argv("export", params), "ours")
        change = change_rows(1.0, "uniform", seed=7)
        changed = change["updated"] + change["deleted"] + change["inserted"]
        entry = self.step("standby_refresh_1pct", self.module_argv("export", params), "ours", keys=changed,
                          extra={"change": change})
        if self.opts.profile_always or entry["seconds"] > TARGET_REFRESH_SECONDS:
            def rerun(path):
                change_rows(1.0, "uniform", seed=11)
                run = measure(self.module_argv("export", params, profile=path), env=self.env)
                if run["rc"]:
                    raise BenchError("profiled refresh failed: %s" % run["stdout"][-2000:])
            self.maybe_profile("standby_refresh_1pct", entry["seconds"], rerun)

    # -- failover ----------------------------------------------------------------------------------------------------
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
        argv = [os.path.join(os.path.dirname(sys.executable), "ansible-playbook"), "-i", self.inventory, playbook]
        for item in extra:
            argv += ["-e", item]
        log_path = os.path.join(self.work, "%s.log" % label)
        run = measure(argv, env=self.app_env, cwd=ROOT, stdout_file=log_path, timeout=timeout)
        with open(log_path, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
        if run["rc"]:
            raise BenchError("%s failed (exit %s); log %s:\n%s\n%s" % (label, run["rc"], log_path, text[-4000:], run["stderr"]))
        return run, text

    def run_failover(self, standby):
        log("%s: starting the private application (database mode, PM2_HOME=%s)" % (self.keys, self.pm2_home))
        run, _ = self.playbook("app-start", os.path.join(HERE, "app.yml"), [])
        self.record["app_start_seconds"] = run["seconds"]
        try:
            self.arm()
            log("%s: failover from the standby copy" % self.keys)
            entry = self.failover_playbook("failover")
            self.record["steps"]["failover_standby"] = entry
            log("%s: failover playbook %.2f s, start to ready %s s, role RTO %s s, keys verified by the application at %s s"
                % (self.keys, entry["seconds"], entry["rto_seconds"], entry["rto_role_seconds"], entry["verified_seconds"]))
            floor_bench.measure_floor(self, sys.modules[__name__])
        finally:
            self.failover_profile()
            self.app_teardown()
            self.save()

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

    def failover_profile(self):
        """Where the failover's time goes: every task's start (also of a run that failed), profile_tasks' summary, and
        the test application's load events."""
        log_path = os.path.join(self.work, "failover.log")
        if not os.path.exists(log_path):
            return
        with open(log_path, encoding="utf-8", errors="replace") as fh:
            lines = fh.read().splitlines()
        out = ["# playbooks/failover.yml -e baileys_failover_source=standby, %s keys (%d companies)" % (
            "{:,}".format(self.keys), self.companies), "", "## task start times (time of day, previous task's duration, elapsed)"]
        for i, line in enumerate(lines):
            if line.startswith("TASK [") and i + 1 < len(lines):
                stamp = re.search(r"(\d\d:\d\d:\d\d) \+0000 \(([0-9:.]+)\)\s+([0-9:.]+)", lines[i + 1])
                name = line[6:].split("]")[0]
                out.append("%-9s %-15s %-15s %s" % ((stamp.groups() if stamp else ("?", "?", "?")) + (name,)))
        out += ["", "## ansible.posix.profile_tasks (slowest tasks)"]
        out += [ln for ln in lines if re.search(r"-+ \d+\.\d+s$", ln)]
        events = self.app_events(("load_started", "load_finished", "verify_finished"))
        if events:
            out += ["", "## the test application's load events"]
            out += [" ".join("%s=%s" % (k, event.get(k)) for k in (
                "time", "event", "store", "ready", "companies", "keys", "loadMs", "verifyMs", "rssBytes", "errorCount")
                if k in event) for event in events]
        os.makedirs(PROFILES, exist_ok=True)
        with open(self.profile_path("failover_standby"), "w", encoding="utf-8") as fh:
            fh.write("\n".join(out) + "\n")
        self.record["profiles"]["failover_standby"] = {"path": os.path.relpath(self.profile_path("failover_standby"), ROOT)}

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

    # -- cleanup -----------------------------------------------------------------------------------------------------
    def run_cleanup(self):
        if not os.path.exists(os.path.join(ROOT, "library", "baileys_keys_cleanup.py")):
            self.record["notes"].append("cleanup not measured: library/baileys_keys_cleanup.py does not exist yet")
            return
        params = cleanup_params(self)
        entry = self.step("cleanup", self.module_argv("cleanup", params), "ours",
                          extra={"params": {k: v for k, v in params.items() if k != "archive_dir"}})
        deleted = (entry.get("result") or {}).get("keys_deleted")
        if deleted:
            # keys/s of a cleanup counts the keys deleted (and archived), not the table.
            entry["keys"] = deleted
            entry["keys_per_second"] = round(deleted / entry["seconds"])
            self.save()

    # -- all ---------------------------------------------------------------------------------------------------------
    def phase(self, name, func, *args):
        try:
            func(*args)
        except BenchError as exc:
            log("%s: %s FAILED: %s" % (self.keys, name, exc))
            self.record["notes"].append("%s failed: %s" % (name, str(exc)[:1500]))
            self.record.setdefault("failed", []).append(name)
            self.save()

    def run_standby_failover(self, failover):
        if failover:
            self.app_setup()
            standby = os.path.join(self.app_root, "baileys_sessions.standby")
        else:
            os.makedirs(os.path.join(self.work, "standby"), exist_ok=True)
            standby = os.path.join(self.work, "standby", "baileys_sessions")
        self.run_standby(standby)
        if failover:
            self.run_failover(standby)
            floor_bench.run_busy_failover(self, sys.modules[__name__])
        self.discard(os.path.dirname(standby))

    def sample_load(self, stop):
        """The 1-minute load average every 5 s: how busy the machine was besides the benchmark."""
        samples = []
        while not stop.wait(5):
            samples.append(float(loadavg().split()[0]))
            self.record["loadavg"].update(max=max(samples), mean=round(sum(samples) / len(samples), 2))

    def run(self):
        import threading

        only = self.opts.only
        self.check_disk()
        if self.opts.note:
            self.record["notes"].append(self.opts.note)
        stop = threading.Event()
        threading.Thread(target=self.sample_load, args=(stop,), daemon=True).start()
        try:
            self.start_cluster()
            self.seed()
            # The 1,500,000-key targets (refresh, failover) first: a run cut short still has them. A phase that fails
            # is recorded and the next one runs.
            if "standby" in only or "failover" in only:
                self.phase("standby/failover", self.run_standby_failover, "failover" in only)
            if "ssh" in only:
                self.phase("ssh", ssh_bench.run_ssh, self, sys.modules[__name__])
            if "switch" in only:
                self.phase("switch", switch_bench.run_switch, self, sys.modules[__name__])
            if "export" in only or "import" in only:
                self.phase("export/import", self.run_export_import, "import" in only)
            if "cleanup" in only:
                self.phase("cleanup", self.run_cleanup)
        finally:
            stop.set()
            self.record["finished_at"] = utcnow()
            self.record["loadavg"]["end"] = loadavg()
            self.save()
            if self.cluster:
                self.cluster.stop()
        return self.record


def parse_events(lines, names):
    """The test application's log events of these names, in order, from the JSON lines of its PM2 out log."""
    events = []
    for line in lines:
        if '"event"' not in line:
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") in names:
            events.append(event)
    return events


def ready_times(events, started_epoch):
    """Seconds from started_epoch to the first time the application said it was ready on the file store, and to
    the end of its verification pass (every key read, digests computed), from its own events; None when absent."""
    ready = verified = None
    for event in events:
        at = datetime.datetime.fromisoformat(event["time"].replace("Z", "+00:00")).timestamp()
        if at < started_epoch or event.get("store") != "files":
            continue
        if event["event"] == "load_finished" and event.get("ready") and ready is None:
            ready = round(at - started_epoch, 2)
        if event["event"] == "verify_finished" and verified is None and ready is not None:
            verified = round(at - started_epoch, 2)
    return ready, verified


def cleanup_params(run):
    """Arguments of baileys_keys_cleanup for the benchmark (see docs/benchmarks.md)."""
    # The default retention (rebuildable types older than 30 days: about 37% of the generated keys, whose updated_at is
    # spread over 90 days), archive first, VACUUM after; the row cap lifted so that the whole share is deleted.
    return {"mode": "delete", "archive_dir": os.path.join(run.work, "cleanup-archive"), "max_delete": run.keys}


def phase_of(label):
    """The --only step a result label belongs to."""
    if label in ("baseline_copy_to", "baseline_write_files", "export_live"):
        return "export"
    if label in ("baseline_read_copy_in", "import"):
        return "import"
    if label.startswith("switch"):
        return "switch"
    if label.startswith("standby"):
        return "standby"
    if label.startswith("failover"):
        return "failover"
    if label.startswith("ssh"):
        return "ssh"
    return label


TARGETS_RATIO = 1.5
TARGET_REFRESH_SECONDS = 10.0
TARGET_MEMORY_MIB = 256.0


def utcnow():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def loadavg():
    with open("/proc/loadavg", encoding="ascii") as fh:
        return " ".join(fh.read().split()[:3])


# --------------------------------------------------------------------------------------------------------------------
# Report.

def targets_of(rec):
    """(target, measured, limit, met) rows for one size."""
    steps = rec["steps"]
    rows = []

    def ratio(ours, base, name):
        if ours in steps and base in steps:
            value = steps[ours]["seconds"] / steps[base]["seconds"]
            rows.append((name, "%.2fx (%.1f s / %.1f s)" % (value, steps[ours]["seconds"], steps[base]["seconds"]),
                         "<= %.1fx" % TARGETS_RATIO, value <= TARGETS_RATIO))

    ratio("export_live", "baseline_write_files", "live export / per-key-files baseline")
    ratio("import", "baseline_read_copy_in", "import / read-files + COPY FROM baseline")
    for label in ("export_live", "import"):
        if label in steps:
            rss = steps[label]["peak_rss_mib"]
            rows.append(("peak memory of %s" % label.replace("_live", ""), "%.0f MiB" % rss, "<= %d MiB" % TARGET_MEMORY_MIB,
                         rss <= TARGET_MEMORY_MIB))
    if "standby_refresh_1pct" in steps and rec["keys"] >= 1500000:
        sec = steps["standby_refresh_1pct"]["seconds"]
        rows.append(("standby refresh after 1% changed", "%.1f s" % sec, "<= %.0f s" % TARGET_REFRESH_SECONDS,
                     sec <= TARGET_REFRESH_SECONDS))
    if "failover_standby" in steps:
        limit = 10.0 if rec["companies"] >= 1000 else 5.0 if rec["companies"] == 1 else None
        if limit:
            step = steps["failover_standby"]
            sec = step.get("rto_seconds") or step["seconds"]
            detail = ["whole playbook %.1f s" % step["seconds"]]
            if step.get("verified_seconds"):
                detail.append("every key read back by the application at %.1f s" % step["verified_seconds"])
            rows.append(("failover RTO from the standby copy (%d compan%s), start to ready" % (
                rec["companies"], "y" if rec["companies"] == 1 else "ies"),
                "%.1f s (%s)" % (sec, "; ".join(detail)), "<= %.0f s" % limit, sec <= limit))
    rows += floor_bench.targets(rec)
    rows += ssh_bench.targets(rec)
    rows += switch_bench.targets(rec)
    # A figure that cannot be judged (say why in "caveats" of the result file) is shown as such, never as met.
    caveats = rec.get("caveats", {})
    rows = [(n, m + " - " + caveats[n], l, None) if n in caveats else (n, m, l, ok) for n, m, l, ok in rows]
    # Targets judged from a run that could not finish a step (recorded by hand in the result file, with a note).
    rows += [tuple(row) for row in rec.get("extra_targets", [])]
    return rows


STEP_TEXT = {
    "baseline_copy_to": "baseline: `psql -c \"COPY ... TO STDOUT\"` > /dev/null",
    "baseline_write_files": "baseline: minimal script writing the same per-key files",
    "export_live": "**export** (baileys_auth_export mode=live)",
    "baseline_read_copy_in": "baseline: read those files + `COPY ... FROM` into fresh tables",
    "import": "**import** (baileys_auth_import into an empty database)",
    "standby_build": "standby build (baileys_auth_export mode=standby, empty)",
    "standby_refresh_unchanged": "standby refresh, nothing changed",
    "standby_refresh_1pct": "**standby refresh after 1% of the keys changed** (keys = rows changed)",
    "failover_standby": "**failover from the standby copy** (playbooks/failover.yml, whole playbook)",
    "cleanup": "**cleanup** (baileys_keys_cleanup)",
}
STEP_TEXT.update(floor_bench.STEP_TEXT)
STEP_TEXT.update(ssh_bench.STEP_TEXT)
STEP_TEXT.update(switch_bench.STEP_TEXT)


def machine():
    info = {}
    try:
        lscpu = sh(["lscpu"]).stdout
        info["cpu"] = re.search(r"Model name:\s*(.+)", lscpu).group(1).strip()
    except Exception:  # noqa: BLE001 - a description, best effort
        info["cpu"] = platform.processor() or "unknown"
    info["cores"] = os.cpu_count()
    with open("/proc/meminfo", encoding="ascii") as fh:
        info["ram"] = "%.1f GiB" % (int(re.search(r"MemTotal:\s+(\d+)", fh.read()).group(1)) / 1024 ** 2)
    info["kernel"] = platform.release()
    try:
        src = sh(["findmnt", "-n", "-o", "SOURCE,FSTYPE", "-T", "/var/tmp"]).stdout.split()
        dev = os.path.basename(src[0])
        rota = open("/sys/block/%s/queue/rotational" % dev).read().strip() if os.path.exists("/sys/block/%s" % dev) else "?"
        size = sh(["lsblk", "-dn", "-o", "SIZE", src[0]], check=False).stdout.strip()
        info["disk"] = "%s (%s, %s, %s)" % (src[0], src[1], size, {"0": "non-rotational", "1": "rotational"}.get(rota, "?"))
    except Exception:  # noqa: BLE001
        info["disk"] = "unknown"
    info["python"] = platform.python_version()
    return info


def fmt(value, spec="%.2f"):
    return "" if value is None else spec % value


def size_label(rec):
    """"1,500 keys", or "15,000 keys (1000 x 15)" for a --keys-per-company variant."""
    variant = rec["keys_per_company"] != KEYS_PER_COMPANY
    return "%s keys%s" % ("{:,}".format(rec["keys"]), " (%d x %d)" % (rec["companies"], rec["keys_per_company"]) if variant else "")


def render(records, mach, out_path):
    lines = ["# Benchmarks", "",
             "Generated by `bench/run` (bench/benchmark.py) from bench/results/*.json; do not edit by hand.", "",
             "## Machine", ""]
    for key in ("cpu", "cores", "ram", "disk", "kernel", "python"):
        lines.append("- %s: %s" % (key, mach.get(key)))
    versions = sorted({r.get("postgresql") for r in records if r.get("postgresql")})
    lines.append("- PostgreSQL: %s (throwaway cluster per size, testbed/bin/pg-cluster, fsync on, shared_buffers 128MB)"
                 % ", ".join(versions))
    lines += ["", "## Targets", "", "| size | target | measured | limit | |", "| --- | --- | --- | --- | --- |"]
    for rec in records:
        for name, measured, limit, met in targets_of(rec):
            lines.append("| %s | %s | %s | %s | %s |" % (size_label(rec), name, measured, limit, verdict(met)))
    lines += ["", "Standby-refresh target applies at 1,500,000 keys; failover RTO targets: 5 s for 1 company, 10 s for "
              "1,000 companies (from the standby copy), judged from the start of `ansible-playbook` to the moment the "
              "test application says it is ready on the file store (its own log: every company's creds loaded through "
              "Baileys, which reads keys on demand). The rest of the playbook (the application reading every key "
              "back and the digest comparison, the report) is shown next to it; the failover rolls back if that "
              "check fails.", ""]
    lines += switch_bench.report_lines(records, fmt)
    for rec in records:
        lines += ["## %s keys (%d compan%s x %d keys)" % ("{:,}".format(rec["keys"]), rec["companies"],
                                                         "y" if rec["companies"] == 1 else "ies", rec["keys_per_company"]), "",
                  "Command: `%s`  " % rec["command"],
                  "Run %s to %s on %d cores; 1-minute load average %s (mean %s, max %s while it ran; this benchmark "
                  "alone is about 1 to 2). Seeding took %s s (table %s)." % (
                      rec["started_at"], rec.get("finished_at"), mach["cores"], "at start %s, at end %s" % (
                          rec["loadavg"]["start"].split()[0], (rec["loadavg"].get("end") or "?").split()[0]),
                      rec["loadavg"].get("mean", "?"), rec["loadavg"].get("max", "?"),
                      rec.get("seed_seconds"), rec.get("table_size")), ""]
        lines += ["| step | wall s | module's own s | keys/s | peak RSS MiB | ratio to baseline |",
                  "| --- | --- | --- | --- | --- | --- |"]
        steps = rec["steps"]
        base = {"export_live": "baseline_write_files", "import": "baseline_read_copy_in"}
        for label in [k for k in STEP_TEXT if k in steps] + [k for k in steps if k not in STEP_TEXT]:
            entry = steps[label]
            ratio = ""
            if label in base and base[label] in steps:
                ratio = "%.2fx" % (entry["seconds"] / steps[base[label]]["seconds"])
                if label == "export_live" and "baseline_copy_to" in steps:
                    ratio += " (%.1fx COPY TO)" % (entry["seconds"] / steps["baseline_copy_to"]["seconds"])
            if label in ("failover_standby", "failover_standby_busy"):
                ratio = "start to ready: %s s%s" % (fmt(entry.get("rto_seconds")), {True: ", armed", False: ", not armed"}.get(
                    entry.get("armed"), ""))
            ratio = ratio or entry.get("note", "")
            own = (entry.get("result") or {}).get("duration_seconds")
            lines.append("| %s | %s | %s | %s | %s | %s |" % (STEP_TEXT.get(label, label), fmt(entry["seconds"]), fmt(own),
                                                         "{:,}".format(entry["keys_per_second"]) if entry.get("keys_per_second") else "",
                                                         fmt(entry.get("peak_rss_mib"), "%.1f"), ratio))
        if "standby_refresh_1pct" in steps:
            lines.append("")
            lines.append("1%% change: %s." % json.dumps(steps["standby_refresh_1pct"].get("change")))
        if rec.get("profiles"):
            lines += ["", "Profiles:"]
            for label, prof in rec["profiles"].items():
                lines.append("- %s: %s" % (label, "[%s](../%s)" % (prof["path"], prof["path"]) if "path" in prof else prof.get("skipped")))
        if rec.get("notes"):
            lines += ["", "Notes:"]
        for note in rec.get("notes", []):
            lines.append("- %s" % note)
        lines.append("")
    lines += ["## How it is measured", "", "```", __doc__.strip(), "```", "", "Baselines:", "", "```",
              baseline_doc().strip(), "```", "", "Floor:", "", "```", floor_bench.__doc__.strip(), "```", "",
              "Over SSH:", "", "```", ssh_bench.__doc__.strip(), "```", "",
              "Switch:", "", "```", switch_bench.__doc__.strip(), "```", ""]
    text = "\n".join(lines).rstrip() + "\n"
    with open(out_path + ".tmp", "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(out_path + ".tmp", out_path)
    return text


def baseline_doc():
    import ast

    with open(os.path.join(HERE, "baselines.py"), encoding="utf-8") as fh:
        return ast.get_docstring(ast.parse(fh.read()))


def verdict(met):
    return "not judged" if met is None else "met" if met else "**missed**"


def print_summary(records):
    for rec in records:
        print("\n== %s keys (%d companies)" % ("{:,}".format(rec["keys"]), rec["companies"]))
        for label, entry in rec["steps"].items():
            print("  %-28s %9.2f s  %10s keys/s  %7s MiB" % (label, entry["seconds"], entry.get("keys_per_second"),
                                                               entry.get("peak_rss_mib")))
        for name, measured, limit, met in targets_of(rec):
            print("  target %-50s %-40s %-10s %s" % (name, measured, limit, verdict(met).strip("*").upper()))


def cmd_run(opts):
    opts.only = set(opts.only.split(",")) if opts.only else set(STEPS)
    unknown = opts.only - set(STEPS)
    if unknown:
        raise SystemExit("--only: unknown step(s) %s (choose from %s)" % (", ".join(sorted(unknown)), ",".join(STEPS)))
    sizes = [int(s.replace("_", "")) for s in opts.sizes.split(",")]
    if not opts.pm2_home.startswith("/tmp/") or opts.pm2_home.rstrip("/") in (os.path.expanduser("~/.pm2"),):
        raise SystemExit("--pm2-home must be a private directory under /tmp (short: PM2's socket path is limited)")
    done = []
    try:
        for keys in sizes:
            run = SizeRun(opts, keys)
            done.append(run)
            run.run()
    finally:
        write_report(opts)
        if not opts.keep:
            for run in done:
                log("removing %s (the trees of %d keys)" % (run.work, run.keys))
                subprocess.run(["rm", "-rf", "--one-file-system", run.work], check=False)
    failed = ["%d keys: %s" % (run.keys, ", ".join(run.record["failed"])) for run in done if run.record.get("failed")]
    if failed:
        print("bench/run: failed phases (see the notes in %s): %s" % (opts.out, "; ".join(failed)), file=sys.stderr)
        return 1
    return 0


def write_report(opts):
    records = []
    for path in glob.glob(os.path.join(RESULTS, "*.json")):
        with open(path, encoding="utf-8") as fh:
            records.append(json.load(fh))
    records.sort(key=lambda rec: (rec["keys"], rec["companies"]))
    print_summary(records)
    render(records, machine(), opts.out)
    print("\nwrote %s" % opts.out, flush=True)


def targets_help():
    return ("targets (judged in docs/benchmarks.md; a missed one comes with a profile under bench/profiles/):\n"
            "  export and import: at most %.1fx their baselines, peak memory <= %d MiB each;\n"
            "  standby refresh after 1%% of 1,500,000 keys changed: <= %.0f s;\n"
            "  failover from the standby copy, start to ready: <= 5 s for 1 company, <= 10 s for 1,000 companies;\n%s"
            % (TARGETS_RATIO, TARGET_MEMORY_MIB, TARGET_REFRESH_SECONDS, switch_bench.TARGETS_HELP))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], prog="bench/run", epilog=targets_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("module", help="run one module in this process (JSON arguments in a file)")
    p.add_argument("name")
    p.add_argument("--args-file", required=True)
    p.add_argument("--check", action="store_true")
    p.add_argument("--profile", help="write a cProfile summary to this file")
    p.add_argument("--full", action="store_true", help="print the whole result (digests, per-company details)")
    p.set_defaults(func=cmd_module)
    p = sub.add_parser("change", help="change percent of the keys of the PG* database")
    p.add_argument("--percent", type=float, default=1.0)
    p.add_argument("--spread", choices=["uniform", "concentrated"], default="uniform")
    p.set_defaults(func=cmd_change)
    p = sub.add_parser("report", help="only write the document again from bench/results/*.json")
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks.md"))
    p.set_defaults(func=lambda a: write_report(a) or 0)
    p = sub.add_parser("run", help="the benchmark (default)", description=__doc__.splitlines()[0], epilog=targets_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1500,150000,1500000", help="keys, multiples of %d" % KEYS_PER_COMPANY)
    p.add_argument("--only", help="steps among %s (default all)" % ",".join(STEPS))
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks.md"))
    p.add_argument("--workdir", default="/var/tmp/baileys-dr-bench")
    p.add_argument("--pm2-home", default="/tmp/bpm2-bench")
    p.add_argument("--profile-max-seconds", type=int, default=PROFILE_MAX_SECONDS,
                   help="re-run a step that missed its target under cProfile only when it took at most this long")
    p.add_argument("--profile-always", action="store_true",
                   help="profile export, import, refresh and the switch even when they meet their targets")
    p.add_argument("--keys-per-company", type=int, default=KEYS_PER_COMPANY,
                   help="a variant (e.g. 15: 1,000 companies in --sizes 15000), results of its own (default %(default)s)")
    p.add_argument("--writer-rate", type=float, default=5.0,
                   help="switch: the writer's requests per second (default %(default)s, the writer's own)")
    p.add_argument("--switch-idle-seconds", type=float, default=15.0,
                   help="switch: the writer against the idle service before each bulk pass, at least (default %(default)s)")
    p.add_argument("--keep", action="store_true", help="keep the cluster and trees of each size")
    p.add_argument("--note", help="a remark recorded with each size (e.g. what else ran on the machine)")
    p.set_defaults(func=cmd_run)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        argv = ["run"] + argv
    args = parser.parse_args(argv)
    if args.command == "run":
        args.command_line = "bench/run " + " ".join(shlex.quote(a) for a in argv[1:])
    try:
        return args.func(args)
    except BenchError as exc:
        print("bench/run: %s" % exc, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
