#!/usr/bin/env python3
"""Benchmark of baileys_auth_export (live and standby) and baileys_sessions_verify.

Against a database loaded with testbed/bin/seed (libpq PG* environment):

    testbed/bin/pg-cluster start --dir /tmp/x --password-file F
    PGHOST=127.0.0.1 PGPORT=... PGUSER=baileys PGDATABASE=baileys PGPASSWORD=... \\
        testbed/bin/seed --companies 1000 --keys-per-company 1500 --seed bench
    bench/export_bench.py scenario --dir /var/tmp/bench-trees [--companies 100]

`scenario` runs, each as its own process under /usr/bin/time -v (wall time and
peak RSS): a live export, a second live export (unchanged), a standby build,
a refresh without change, then for two spreads of a change of --percent of
the keys (UPDATE, plus 1% of that in DELETE and INSERT; "uniform" over all
companies, "concentrated" in the first tenth of them) a check-mode refresh
and the refresh, and a verification with recomputed digests (with
--compare-db, compared with the database's); then prints one JSON summary. `module` runs one module with JSON
arguments (what `scenario` times); `change` only changes rows.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setup_paths():
    sys.path[:0] = [os.path.join(ROOT, "library"), os.path.join(ROOT, "tests")]
    import ansible.module_utils

    path = os.path.join(ROOT, "module_utils")
    if path not in ansible.module_utils.__path__:
        ansible.module_utils.__path__.append(path)


def db_args():
    return {"login_host": os.environ.get("PGHOST"), "login_port": int(os.environ.get("PGPORT") or 5432),
            "login_user": os.environ.get("PGUSER"), "login_db": os.environ.get("PGDATABASE")}


def cmd_module(args):
    """Run one module in this process (password from PGPASSWORD, never on the command line)."""
    setup_paths()
    from module_harness import run_module

    import baileys_auth_export
    import baileys_sessions_verify

    module = baileys_auth_export if args.name == "export" else baileys_sessions_verify
    params = json.loads(args.args)
    if args.name == "export":
        params = dict(db_args(), **params)
    ok, result = run_module(module, params, check_mode=args.check)
    if not args.digests:
        result.pop("digests", None)
    result.pop("queries", None)
    print(json.dumps({"ok": ok, "result": result}, default=str))
    return 0 if ok else 1


def change_rows(percent, spread, seed=None):
    """UPDATE percent of the keys (all companies, or the first tenth when concentrated), delete and insert a few."""
    import psycopg2

    conn = psycopg2.connect("")
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM whatsapp_keys")
        total = cur.fetchone()[0]
        count = int(total * percent / 100)
        where = ""
        if spread == "concentrated":
            where = "WHERE company_id IN (SELECT DISTINCT company_id FROM whatsapp_keys ORDER BY 1 LIMIT (SELECT count(DISTINCT company_id) / 10 FROM whatsapp_keys))"
        cur.execute("SELECT setseed(%s)", ((seed if seed is not None else time.time() % 1000) / 1000.0,))
        cur.execute(
            "UPDATE whatsapp_keys k SET value = CASE WHEN jsonb_typeof(value) = 'object' "
            "THEN jsonb_set(value, '{baileysDrBench}', to_jsonb(clock_timestamp()::text)) "
            "ELSE jsonb_build_array(value, clock_timestamp()::text) END "
            "FROM (SELECT company_id, key_type, key_id FROM whatsapp_keys %s ORDER BY random() LIMIT %%s) s "
            "WHERE k.company_id = s.company_id AND k.key_type = s.key_type AND k.key_id = s.key_id" % where, (count,))
        updated = cur.rowcount
        cur.execute("DELETE FROM whatsapp_keys WHERE ctid IN (SELECT ctid FROM whatsapp_keys WHERE key_type = 'pre-key' "
                    "ORDER BY random() LIMIT %s)", (max(1, count // 100),))
        deleted = cur.rowcount
        cur.execute("INSERT INTO whatsapp_keys (company_id, key_type, key_id, value) SELECT company_id, 'pre-key', "
                    "'bench-' || md5(clock_timestamp()::text || company_id), '{\"private\":{\"type\":\"Buffer\",\"data\":\"AQID\"}}' "
                    "FROM (SELECT DISTINCT company_id FROM whatsapp_keys ORDER BY 1 LIMIT %s) c", (max(1, count // 100),))
        inserted = cur.rowcount
    conn.commit()
    conn.close()
    return {"updated": updated, "deleted": deleted, "inserted": inserted}


def cmd_change(args):
    print(json.dumps(change_rows(args.percent, args.spread)))
    return 0


def timed(argv):
    """(seconds, peak RSS in MiB, parsed JSON stdout) of a command run under /usr/bin/time -v."""
    started = time.monotonic()
    proc = subprocess.run(["/usr/bin/time", "-v"] + argv, capture_output=True, text=True)
    seconds = time.monotonic() - started
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    rss = int(match.group(1)) / 1024 if match else None
    try:
        output = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise SystemExit("command failed: %s\n%s\n%s" % (argv, proc.stdout[-2000:], proc.stderr[-2000:]))
    if not output.get("ok"):
        raise SystemExit("module failed: %s" % json.dumps(output)[:2000])
    return round(seconds, 2), round(rss, 1) if rss else None, output["result"]


def module_argv(name, params, check=False):
    argv = [sys.executable, os.path.abspath(__file__), "module", name, "--args", json.dumps(params)]
    return argv + (["--check"] if check else [])


def refresh_step(common, standby, check=False):
    seconds, rss, result = timed(module_argv("export", dict(common, dest=standby, mode="standby"), check))
    step = {"seconds": seconds, "peak_rss_mib": rss, "module_seconds": result.get("duration_seconds")}
    for key in ("files_written", "files_deleted", "rows_fetched", "rows_unchanged_content", "companies_refreshed",
                "companies_skipped", "companies_rebuilt", "changed"):
        if key in result:
            step[key] = result[key]
    if result.get("would_change"):
        step["would_change"] = {k: v for k, v in result["would_change"].items() if k != "per_company"}
    return step


def database_digests(companies):
    setup_paths()
    import psycopg2
    from ansible.module_utils.baileys_dr_store import company_digest, list_companies

    conn = psycopg2.connect("")
    try:
        return {c: company_digest(conn, c)[0] for c in list_companies(conn, companies)}
    finally:
        conn.close()


def cmd_scenario(args):
    os.makedirs(args.dir, exist_ok=True)
    live = os.path.join(args.dir, "baileys_sessions")
    standby = os.path.join(args.dir, "baileys_sessions.standby")
    for path in os.listdir(args.dir):
        shutil.rmtree(os.path.join(args.dir, path))
    companies = None
    if args.companies:
        companies = ["%s%05d" % (args.prefix, i) for i in range(1, args.companies + 1)]
    common = {"companies": companies, "keep_backup": False}
    summary = {"nproc": os.cpu_count()}
    steps = [("standby_build", dict(common, dest=standby, mode="standby"))]
    if not args.skip_live:
        steps = [("live_export", dict(common, dest=live)), ("live_export_unchanged", dict(common, dest=live))] + steps
    for label, params in steps:
        seconds, rss, result = timed(module_argv("export", params))
        summary[label] = {"seconds": seconds, "peak_rss_mib": rss, "changed": result.get("changed"), "keys": result.get("keys"),
                          "files": result.get("files"), "module_seconds": result.get("duration_seconds")}
    summary["standby_refresh_unchanged"] = refresh_step(common, standby)
    for spread in ("uniform", "concentrated"):
        summary["change_" + spread] = change_rows(args.percent, spread)
        summary["standby_refresh_check_" + spread] = refresh_step(common, standby, check=True)
        summary["standby_refresh_" + spread] = refresh_step(common, standby)
    seconds, rss, result = timed(module_argv("verify", {"path": standby, "recompute_digests": True, "fail_on_problems": False}))
    summary["verify_recompute"] = {"seconds": seconds, "peak_rss_mib": rss, "verified": result.get("verified"),
                                   "files": result.get("counts", {}).get("files")}
    if args.compare_db:
        checked = json.loads(subprocess.run(module_argv("verify", {"path": standby, "recompute_digests": True}) + ["--digests"],
                                            capture_output=True, text=True).stdout)["result"]["digests"]
        summary["verify_digests_equal_database"] = checked == database_digests(companies)
    print(json.dumps(summary, indent=1))
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("module")
    p.add_argument("name", choices=["export", "verify"])
    p.add_argument("--args", required=True)
    p.add_argument("--check", action="store_true")
    p.add_argument("--digests", action="store_true", help="keep the digests in the printed result")
    p.set_defaults(func=cmd_module)
    p = sub.add_parser("change")
    p.add_argument("--percent", type=float, default=1.0)
    p.add_argument("--spread", choices=["uniform", "concentrated"], default="uniform")
    p.set_defaults(func=cmd_change)
    p = sub.add_parser("scenario")
    p.add_argument("--dir", required=True)
    p.add_argument("--companies", type=int, help="only the first N companies (default all)")
    p.add_argument("--prefix", default="company")
    p.add_argument("--percent", type=float, default=1.0)
    p.add_argument("--spread", choices=["uniform", "concentrated"], default="uniform")
    p.add_argument("--skip-live", action="store_true")
    p.add_argument("--compare-db", action="store_true", help="also compare the standby's recomputed digests with the database's")
    p.set_defaults(func=cmd_scenario)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
