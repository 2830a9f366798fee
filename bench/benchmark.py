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
import io
import json
import os
import pstats
import shlex
import subprocess
import sys

import report
import ssh_bench
import steps
import switch_bench
from harness import KEYS_PER_COMPANY, ROOT, STEPS, BenchError, change_rows, db_args, log, setup_paths
from sizerun import SizeRun

MODULES = {"export": "baileys_auth_export", "import": "baileys_auth_import", "verify": "baileys_sessions_verify",
           "cleanup": "baileys_keys_cleanup"}
PROFILE_MAX_SECONDS = 150


# --------------------------------------------------------------------------------------------------------------------
# Child side: one module in this process.

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


def cmd_change(args):
    print(json.dumps(change_rows(args.percent, args.spread)))
    return 0


# --------------------------------------------------------------------------------------------------------------------
# Parent side.

def phases(run):
    """(name, function, arguments) of each phase of a size, in order: the 1,500,000-key targets (refresh, failover)
    first, so that a run cut short still has them."""
    only, out = run.opts.only, []
    if "standby" in only or "failover" in only:
        out.append(("standby/failover", steps.run_standby_failover, (run, "failover" in only)))
    if "ssh" in only:
        out.append(("ssh", ssh_bench.run_ssh, (run,)))
    if "switch" in only:
        out.append(("switch", switch_bench.run_switch, (run,)))
    if "export" in only or "import" in only:
        out.append(("export/import", steps.run_export_import, (run, "import" in only)))
    if "cleanup" in only:
        out.append(("cleanup", steps.run_cleanup, (run,)))
    return out


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
            run.run(phases(run))
    finally:
        report.write_report(opts.out, __doc__)
        if not opts.keep:
            for run in done:
                log("removing %s (the trees of %d keys)" % (run.work, run.keys))
                subprocess.run(["rm", "-rf", "--one-file-system", run.work], check=False)
    failed = ["%d keys: %s" % (run.keys, ", ".join(run.record["failed"])) for run in done if run.record.get("failed")]
    if failed:
        print("bench/run: failed phases (see the notes in %s): %s" % (opts.out, "; ".join(failed)), file=sys.stderr)
        return 1
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], prog="bench/run", epilog=report.targets_help(),
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
    p.set_defaults(func=lambda a: report.write_report(a.out, __doc__) or 0)
    p = sub.add_parser("run", help="the benchmark (default)", description=__doc__.splitlines()[0], epilog=report.targets_help(),
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
