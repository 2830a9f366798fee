#!/usr/bin/env python3
"""Benchmark of baileys_keys_cleanup: delete 1,000,000 of 1,500,000 keys with the archive, then restore them.

    bench/cleanup_bench.py scenario [--dir /var/tmp/baileys-dr-cleanup-bench] [--keep]

`scenario` starts a throwaway PostgreSQL cluster (testbed/bin/pg-cluster), loads
1000 companies x 1500 keys with testbed/bin/seed, then shapes the table so that
exactly --delete rows are candidates under the module's default policy: every
row is made fresh (2 days), enough pre-keys are turned into sessions for the
rebuildable types (session, sender-key, sender-key-memory, device-list,
tctoken: 56% of the generated mix) to reach --delete rows, and those rows are
aged 45 days. It then runs, each as its own process (wall time and peak RSS
from wait4), a check-mode plan, the cleanup (archive + delete + VACUUM
(ANALYZE)), and a restore of the archive, and prints one JSON summary.
The caps are raised for the run (max_delete, max_delete_share 0.7): a real
run of this size would be refused by the defaults, as it should.
`module` runs the module once in this process with JSON arguments (what
`scenario` times); the password comes from PGPASSWORD, never the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import time

import harness
from harness import ROOT

REBUILDABLE = ("session", "sender-key", "sender-key-memory", "device-list", "tctoken")


def setup_paths():
    harness.setup_paths()
    sys.path.insert(0, os.path.join(ROOT, "testbed"))


def cmd_module(args):
    setup_paths()
    from module_harness import run_module

    import baileys_keys_cleanup

    params = dict(json.loads(args.args), **harness.db_args())
    ok, result = run_module(baileys_keys_cleanup, params, check_mode=args.check)
    for bulky in ("queries", "deleted"):
        result.pop(bulky, None)
    for part in ("plan",):
        if isinstance(result.get(part), dict):
            result[part].pop("by_company", None)
            result[part].pop("company_keys", None)
    result.pop("by_company", None)
    print(json.dumps({"ok": ok, "result": result}, default=str))
    return 0 if ok else 1


def timed(argv, env):
    """(seconds, peak RSS MiB, JSON stdout) of a child process, from wait4."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, env=env)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.monotonic() - started
    document = json.loads(out.decode().strip().splitlines()[-1])
    if not document["ok"]:
        raise SystemExit("module failed: %s" % document["result"].get("msg"))
    return round(seconds, 2), round(usage.ru_maxrss / 1024.0, 1), document["result"]


def shape(cluster, delete):
    """Exactly `delete` candidates under the default policy (superuser: the updated_at trigger is off meanwhile)."""
    types = ",".join("'%s'" % t for t in REBUILDABLE)
    sql = """
ALTER TABLE whatsapp_keys DISABLE TRIGGER update_whatsapp_keys_updated_at;
UPDATE whatsapp_keys SET updated_at = now() - interval '2 days';
UPDATE whatsapp_keys k SET key_type = 'session', key_id = 'bench.' || k.key_id
  FROM (SELECT company_id, key_id FROM whatsapp_keys WHERE key_type = 'pre-key'
         ORDER BY md5(company_id || key_id)
         LIMIT greatest(0, %(delete)d - (SELECT count(*) FROM whatsapp_keys WHERE key_type IN (%(types)s)))) p
 WHERE k.company_id = p.company_id AND k.key_type = 'pre-key' AND k.key_id = p.key_id;
UPDATE whatsapp_keys k SET updated_at = now() - interval '45 days'
  FROM (SELECT company_id, key_type, key_id FROM whatsapp_keys WHERE key_type IN (%(types)s)
         ORDER BY md5(company_id || key_type || key_id) LIMIT %(delete)d) p
 WHERE (k.company_id, k.key_type, k.key_id) = (p.company_id, p.key_type, p.key_id);
ALTER TABLE whatsapp_keys ENABLE TRIGGER update_whatsapp_keys_updated_at;
VACUUM (FULL, ANALYZE) whatsapp_keys;
""" % {"delete": delete, "types": types}
    cluster.psql(sql, db="baileys")


def cmd_scenario(args):
    setup_paths()
    import pgcluster

    if os.path.exists(args.dir):
        shutil.rmtree(args.dir)
    os.makedirs(args.dir)
    os.chmod(args.dir, 0o755)
    cluster = pgcluster.Cluster(os.path.join(args.dir, "cluster"))
    password = "bench-" + secrets.token_hex(8)
    cluster.start(password)
    cluster.wait_ready()
    env = dict(os.environ, PGHOST="127.0.0.1", PGPORT=str(cluster.port), PGUSER="baileys", PGDATABASE="baileys",
               PGPASSWORD=password, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    summary = {"keys": args.companies * args.keys_per_company, "delete": args.delete}
    try:
        started = time.monotonic()
        subprocess.run([os.path.join(ROOT, "testbed", "bin", "seed"), "--companies", str(args.companies),
                        "--keys-per-company", str(args.keys_per_company), "--seed", "cleanup-bench"],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        summary["seed_seconds"] = round(time.monotonic() - started, 1)
        started = time.monotonic()
        shape(cluster, args.delete)
        summary["shape_seconds"] = round(time.monotonic() - started, 1)
        archive_dir = os.path.join(args.dir, "archive")
        common = {"archive_dir": archive_dir, "max_delete": args.delete, "max_delete_share": 0.7, "batch_size": args.batch_size}
        me = [sys.executable, os.path.abspath(__file__), "module", "--args"]
        seconds, rss, plan = timed(me + [json.dumps(common), "--check"], env)
        summary["check"] = {"seconds": seconds, "peak_rss_mib": rss, "candidates": plan["plan"]["keys"],
                            "buckets": plan["plan"]["buckets"], "before": plan["before"]}
        seconds, rss, run = timed(me + [json.dumps(common)], env)
        summary["cleanup"] = {
            "seconds": seconds, "peak_rss_mib": rss, "keys_deleted": run["keys_deleted"], "archive": run["archive"],
            "batches": run["batches"], "vacuum": run["vacuum"], "module_seconds": run["duration_seconds"],
            "before": {k: run["before"][k] for k in ("keys", "table_bytes", "index_bytes", "total_bytes", "dead_tuples")},
            "after_delete": {k: run["after_delete"][k] for k in ("keys", "table_bytes", "index_bytes", "total_bytes", "dead_tuples")},
            "after": {k: run["after"][k] for k in ("keys", "table_bytes", "index_bytes", "total_bytes", "dead_tuples")},
        }
        if not args.no_restore:
            restore = {"mode": "restore", "archive": run["archive"]["path"], "batch_size": args.batch_size}
            seconds, rss, back = timed(me + [json.dumps(restore)], env)
            summary["restore"] = {"seconds": seconds, "peak_rss_mib": rss, "inserted": back["inserted"],
                                  "already_present": back["already_present"]}
    finally:
        if not args.keep:
            cluster.destroy()
            shutil.rmtree(args.dir, ignore_errors=True)
    print(json.dumps(summary, indent=1, default=str))
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    scenario = sub.add_parser("scenario")
    scenario.add_argument("--dir", default="/var/tmp/baileys-dr-cleanup-bench")
    scenario.add_argument("--companies", type=int, default=1000)
    scenario.add_argument("--keys-per-company", type=int, default=1500)
    scenario.add_argument("--delete", type=int, default=1000000)
    scenario.add_argument("--batch-size", type=int, default=2000)
    scenario.add_argument("--no-restore", action="store_true")
    scenario.add_argument("--keep", action="store_true", help="keep the cluster and archive")
    module = sub.add_parser("module")
    module.add_argument("--args", required=True)
    module.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    return cmd_scenario(args) if args.command == "scenario" else cmd_module(args)


if __name__ == "__main__":
    sys.exit(main())
