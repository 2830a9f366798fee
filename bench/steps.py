"""The steps of bench/run measured on one size (a bench/sizerun.SizeRun): export and import against their
baselines, the standby build and refreshes, the failover from the standby copy (with its floor and the busy-core
run of bench/floor_bench.py), and the cleanup. The ssh and switch steps are bench/ssh_bench.py and
bench/switch_bench.py.
"""

from __future__ import annotations

import os
import re
import shutil

import floor_bench
from harness import HERE, PROFILES, ROOT, BenchError, change_rows, log, measure
from report import TARGET_REFRESH_SECONDS, TARGETS_RATIO


def run_export_import(run, do_import):
    baseline_tree = os.path.join(run.work, "baseline", "baileys_sessions")
    live_dir = os.path.join(run.work, "live")
    live_tree = os.path.join(live_dir, "baileys_sessions")
    os.makedirs(live_dir, exist_ok=True)
    psql = shutil.which("psql") or os.path.join(run.cluster.bindir, "psql")
    child = measure([psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", "COPY whatsapp_auth TO STDOUT",
                     "-c", "COPY whatsapp_keys TO STDOUT"], env=run.env, stdout_file="/dev/null")
    if child["rc"]:
        raise BenchError("psql COPY TO STDOUT failed: %s" % child["stderr"])
    run.record["steps"]["baseline_copy_to"] = {
        "kind": "baseline", "seconds": child["seconds"], "peak_rss_mib": child["peak_rss_mib"], "keys": run.keys,
        "keys_per_second": round(run.keys / child["seconds"]) if child["seconds"] else None}
    log("%s: baseline_copy_to %.2f s" % (run.keys, child["seconds"]))
    run.step("baseline_write_files", run.py(os.path.join(HERE, "baselines.py"), "write-files", "--dest", baseline_tree),
             "baseline")
    import_env = dict(run.env, PGDATABASE="bench_import")
    if do_import:
        # Each reader reads the tree written just before it (at 1,500,000 keys the trees outgrow the page cache).
        run.make_import_db()
        run.step("baseline_read_copy_in", run.py(os.path.join(HERE, "baselines.py"), "read-copy-in", "--src",
                                                  baseline_tree), "baseline", env=import_env)
        run.cluster.psql("DROP TABLE copy_keys, copy_auth; CHECKPOINT", db="bench_import")
    run.discard(os.path.dirname(baseline_tree))
    params = {"dest": live_tree, "keep_backup": False}
    export = run.step("export_live", run.module_argv("export", params), "ours")
    if run.opts.profile_always or export["seconds"] > TARGETS_RATIO * run.record["steps"]["baseline_write_files"]["seconds"]:
        prof_tree = os.path.join(run.work, "live-profile")
        os.makedirs(prof_tree, exist_ok=True)

        def rerun(path):
            child = measure(run.module_argv("export", dict(params, dest=os.path.join(prof_tree, "baileys_sessions")),
                                             profile=path), env=run.env)
            run.discard(prof_tree)
            if child["rc"]:
                raise BenchError("profiled export failed: %s" % child["stdout"][-2000:])
        run.maybe_profile("export_live", export["seconds"], rerun)
    if do_import:
        iparams = {"src": live_tree, "undo_dir": os.path.join(run.work, "undo")}
        imported = run.step("import", run.module_argv("import", iparams), "ours", env=import_env)
        if run.opts.profile_always or imported["seconds"] > TARGETS_RATIO * run.record["steps"]["baseline_read_copy_in"]["seconds"]:
            def rerun(path):
                run.cluster.psql("TRUNCATE whatsapp_keys, whatsapp_auth", db="bench_import")
                child = measure(run.module_argv("import", dict(iparams, undo_dir=os.path.join(run.work, "undo2")),
                                                 profile=path), env=import_env)
                if child["rc"]:
                    raise BenchError("profiled import failed: %s" % child["stdout"][-2000:])
            run.maybe_profile("import", imported["seconds"], rerun)
        run.cluster.psql("DROP DATABASE bench_import")
        run.discard(os.path.join(run.work, "undo"))
        run.discard(os.path.join(run.work, "undo2"))
    run.discard(os.path.dirname(baseline_tree))
    run.discard(live_dir)


def run_standby(run, standby):
    params = {"dest": standby, "mode": "standby"}
    run.step("standby_build", run.module_argv("export", params), "ours")
    run.step("standby_refresh_unchanged", run.module_argv("export", params), "ours")
    change = change_rows(1.0, "uniform", seed=7)
    changed = change["updated"] + change["deleted"] + change["inserted"]
    entry = run.step("standby_refresh_1pct", run.module_argv("export", params), "ours", keys=changed,
                     extra={"change": change})
    if run.opts.profile_always or entry["seconds"] > TARGET_REFRESH_SECONDS:
        def rerun(path):
            change_rows(1.0, "uniform", seed=11)
            child = measure(run.module_argv("export", params, profile=path), env=run.env)
            if child["rc"]:
                raise BenchError("profiled refresh failed: %s" % child["stdout"][-2000:])
        run.maybe_profile("standby_refresh_1pct", entry["seconds"], rerun)


def run_failover(run, standby):
    log("%s: starting the private application (database mode, PM2_HOME=%s)" % (run.keys, run.pm2_home))
    child, _ = run.playbook("app-start", os.path.join(HERE, "app.yml"), [])
    run.record["app_start_seconds"] = child["seconds"]
    try:
        run.arm()
        log("%s: failover from the standby copy" % run.keys)
        entry = run.failover_playbook("failover")
        run.record["steps"]["failover_standby"] = entry
        log("%s: failover playbook %.2f s, start to ready %s s, role RTO %s s, keys verified by the application at %s s"
            % (run.keys, entry["seconds"], entry["rto_seconds"], entry["rto_role_seconds"], entry["verified_seconds"]))
        floor_bench.measure_floor(run)
    finally:
        failover_profile(run)
        run.app_teardown()
        run.save()


def failover_profile(run):
    """Where the failover's time goes: every task's start (also of a run that failed), profile_tasks' summary, and
    the test application's load events."""
    log_path = os.path.join(run.work, "failover.log")
    if not os.path.exists(log_path):
        return
    with open(log_path, encoding="utf-8", errors="replace") as fh:
        lines = fh.read().splitlines()
    out = ["# playbooks/failover.yml -e baileys_failover_source=standby, %s keys (%d companies)" % (
        "{:,}".format(run.keys), run.companies), "", "## task start times (time of day, previous task's duration, elapsed)"]
    for i, line in enumerate(lines):
        if line.startswith("TASK [") and i + 1 < len(lines):
            stamp = re.search(r"(\d\d:\d\d:\d\d) \+0000 \(([0-9:.]+)\)\s+([0-9:.]+)", lines[i + 1])
            name = line[6:].split("]")[0]
            out.append("%-9s %-15s %-15s %s" % ((stamp.groups() if stamp else ("?", "?", "?")) + (name,)))
    out += ["", "## ansible.posix.profile_tasks (slowest tasks)"]
    out += [ln for ln in lines if re.search(r"-+ \d+\.\d+s$", ln)]
    events = run.app_events(("load_started", "load_finished", "verify_finished"))
    if events:
        out += ["", "## the test application's load events"]
        out += [" ".join("%s=%s" % (k, event.get(k)) for k in (
            "time", "event", "store", "ready", "companies", "keys", "loadMs", "verifyMs", "rssBytes", "errorCount")
            if k in event) for event in events]
    os.makedirs(PROFILES, exist_ok=True)
    with open(run.profile_path("failover_standby"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(out) + "\n")
    run.record["profiles"]["failover_standby"] = {"path": os.path.relpath(run.profile_path("failover_standby"), ROOT)}


def run_cleanup(run):
    if not os.path.exists(os.path.join(ROOT, "library", "baileys_keys_cleanup.py")):
        run.record["notes"].append("cleanup not measured: library/baileys_keys_cleanup.py does not exist yet")
        return
    params = cleanup_params(run)
    entry = run.step("cleanup", run.module_argv("cleanup", params), "ours",
                     extra={"params": {k: v for k, v in params.items() if k != "archive_dir"}})
    deleted = (entry.get("result") or {}).get("keys_deleted")
    if deleted:
        # keys/s of a cleanup counts the keys deleted (and archived), not the table.
        entry["keys"] = deleted
        entry["keys_per_second"] = round(deleted / entry["seconds"])
        run.save()


def run_standby_failover(run, failover):
    if failover:
        run.app_setup()
        standby = os.path.join(run.app_root, "baileys_sessions.standby")
    else:
        os.makedirs(os.path.join(run.work, "standby"), exist_ok=True)
        standby = os.path.join(run.work, "standby", "baileys_sessions")
    run_standby(run, standby)
    if failover:
        run_failover(run, standby)
        floor_bench.run_busy_failover(run)
    run.discard(os.path.dirname(standby))



def cleanup_params(run):
    """Arguments of baileys_keys_cleanup for the benchmark (see docs/benchmarks.md)."""
    # The default retention (rebuildable types older than 30 days: about 37% of the generated keys, whose updated_at is
    # spread over 90 days), archive first, VACUUM after; the row cap lifted so that the whole share is deleted.
    return {"mode": "delete", "archive_dir": os.path.join(run.work, "cleanup-archive"), "max_delete": run.keys}
