"""The report of bench/run: the targets judged from a size's record, docs/benchmarks.md rendered from every result
file (bench/results/*.json) with the machine description, and the summary printed at the end of a run.
"""

from __future__ import annotations

import ast
import glob
import json
import os
import platform
import re

import floor_bench
import ssh_bench
import switch_bench
from harness import HERE, KEYS_PER_COMPANY, RESULTS, sh

TARGETS_RATIO = 1.5
TARGET_REFRESH_SECONDS = 10.0
TARGET_MEMORY_MIB = 256.0


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


def render(records, mach, out_path, how):
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
    lines += ["## How it is measured", "", "```", how.strip(), "```", "", "Baselines:", "", "```",
              baseline_doc().strip(), "```", "", "Floor:", "", "```", floor_bench.__doc__.strip(), "```", "",
              "Over SSH:", "", "```", ssh_bench.__doc__.strip(), "```", "",
              "Switch:", "", "```", switch_bench.__doc__.strip(), "```", ""]
    text = "\n".join(lines).rstrip() + "\n"
    with open(out_path + ".tmp", "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(out_path + ".tmp", out_path)
    return text


def baseline_doc():
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


def write_report(out, how):
    """docs/benchmarks.md (or out) from every result file; how: the text of "How it is measured"."""
    records = []
    for path in glob.glob(os.path.join(RESULTS, "*.json")):
        with open(path, encoding="utf-8") as fh:
            records.append(json.load(fh))
    records.sort(key=lambda rec: (rec["keys"], rec["companies"]))
    print_summary(records)
    render(records, machine(), out, how)
    print("\nwrote %s" % out, flush=True)


def targets_help():
    return ("targets (judged in docs/benchmarks.md; a missed one comes with a profile under bench/profiles/):\n"
            "  export and import: at most %.1fx their baselines, peak memory <= %d MiB each;\n"
            "  standby refresh after 1%% of 1,500,000 keys changed: <= %.0f s;\n"
            "  failover from the standby copy, start to ready: <= 5 s for 1 company, <= 10 s for 1,000 companies;\n%s"
            % (TARGETS_RATIO, TARGET_MEMORY_MIB, TARGET_REFRESH_SECONDS, switch_bench.TARGETS_HELP))

