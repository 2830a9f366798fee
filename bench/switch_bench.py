"""The `switch` step of bench/run: a planned failover and a failback of the private application while the writer writes.

Per size, on the size's cluster, a private test application (its own repository, PM2_HOME, health port, started on
PostgreSQL by bench/app.yml) and testbed/bin/writer writing through its POST /simulate at --writer-rate:

1. the standby copy is built first, as snapshot.yml keeps it (not timed: the role's bulk pass refreshes it);
2. failover: the writer starts; once the application's verification is over, the writer runs --switch-idle-seconds
   against the idle service; the bulk pass runs as the role runs it (baileys_auth_export mode=standby into the standby
   copy); 1% of the keys are changed in PostgreSQL (bench/harness.py change_rows, never a row the writer wrote);
   baileys_store_switch runs with the options roles/baileys_failover/tasks/switch.yml gives it (store=files,
   source=live); once the writer has an acknowledgment after the start it is stopped and `writer check` runs on files;
3. failback: the same with the writer started again (idle window at least as long as the standby build: a full pass
   over the data, like this bulk pass): baileys_auth_import changed_during_read=defer pass_record=... (the role's
   bulk pass), then 1% of the key files are rewritten in place as Baileys would write them (same names, the value
   with one more member, as change_rows does in PostgreSQL; never a key the writer wrote), then baileys_store_switch
   store=postgres with import_options delta_from=<the pass record>; `writer check` on PostgreSQL.

Downtime, two ways: the module's (its stop command to the readiness wait's ready_at) and the writer's (`writer stats`:
the longest gap between two acknowledged requests). Throughput: the writer's acknowledged requests per second during
the bulk pass against the window of the same length just before it (the idle service), judged when the pass lasts at
least MIN_RATE_WINDOW seconds. A lost acknowledged write fails the step. A missed target, a failure or
--profile-always writes bench/profiles/switch_<failover|failback>-<size>.txt: the module's steps from the stop
command, the readiness wait, the delta, the test application's log events and the writer's requests around the switch.
"""

from __future__ import annotations

import bisect
import datetime
import json
import os
import random
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request

from harness import HERE, ROOT, BenchError, change_rows, log, measure, setup_paths

WRITER = os.path.join(ROOT, "testbed", "bin", "writer")
OPERATIONS = ("failover", "failback")
STEP_TEXT = {
    "switch_failover_bulk": "switch, failover bulk pass (baileys_auth_export mode=standby, writer on)",
    "switch_failover": "**planned failover** (baileys_store_switch store=files source=live, writer on)",
    "switch_failback_bulk": "switch, failback bulk pass (baileys_auth_import changed_during_read=defer, writer on)",
    "switch_failback": "**failback** (baileys_store_switch store=postgres, delta from the bulk pass, writer on)",
}
CHANGE_PERCENT = 1.0
MAX_THROUGHPUT_DROP = 0.20
# A bulk pass shorter than this holds a handful of requests at 5/s: no rate can be told from it.
MIN_RATE_WINDOW = 3.0
READY_TIMEOUT = 600
QUIET_TIMEOUT = 3600
# A request acknowledged after the ledger was read was sent at most the writer's --timeout (5 s) before.
LEDGER_MARGIN = 10.0
# Key files whose value is a JSON object (not a Buffer) for the generator and /simulate; app-state-sync-keys go through
# a protobuf that drops unknown members, and tctoken's __index is a list.
CHANGEABLE_PREFIXES = ("pre-key-", "session-", "sender-key-memory-", "app-state-sync-version-", "tctoken-")
APP_EVENTS = ("service_stopping", "service_starting", "health_listening", "load_started", "load_finished",
              "verify_started", "verify_finished", "store_unavailable", "service_failed", "config_error")
TARGETS_HELP = """  switch, the writer on and 1% of the keys changed after the bulk pass: downtime of a planned
    failover and of a failback, the module's (stop command to ready) and the writer's (longest gap
    between acknowledged requests), <= 3 s for 1 company of 1,500 keys and <= 10 s for 1,000
    companies; the writer's acknowledged requests/s during each bulk pass at most 20% below the same
    length of time just before it; 0 acknowledged writes lost (`writer check`)."""


def downtime_limit(companies):
    return 3.0 if companies == 1 else 10.0 if companies >= 1000 else None


def epoch_of(text):
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def percentile(values, share):
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(share * len(values)))], 3)


def change_files(sessions, percent, exclude, cutoff, seed=7):
    """Rewrite percent of the key files of a sessions tree in place, as Baileys writes them: same name, the value with
    one more member. Never a file in exclude ({company dir: {file names}}) or modified after cutoff (the writer's), and
    never creating one: a pre-key the service consumes meanwhile stays deleted."""
    companies, ends, total = [], [], 0
    for entry in sorted(os.listdir(sessions)):
        if not entry.startswith("company_"):
            continue
        names = [n for n in os.listdir(os.path.join(sessions, entry)) if n.endswith(".json") and n != "creds.json"]
        total += len(names)
        skip = exclude.get(entry, ())
        names = sorted(n for n in names if n.startswith(CHANGEABLE_PREFIXES) and n not in skip and n != "tctoken-__index.json")
        companies.append((entry, names))
        ends.append((ends[-1] if ends else 0) + len(names))
    eligible = ends[-1] if ends else 0
    want = int(total * percent / 100)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat()
    done = skipped = 0
    # Uniform over the eligible files of every company: a sample of their positions in the concatenated listings.
    for index in sorted(random.Random(seed).sample(range(eligible), min(want, eligible))):
        company = bisect.bisect_right(ends, index)
        entry, names = companies[company]
        path = os.path.join(sessions, entry, names[index - (ends[company - 1] if company else 0)])
        try:
            info = os.stat(path, follow_symlinks=False)
            if not stat.S_ISREG(info.st_mode) or info.st_mtime >= cutoff:
                skipped += 1
                continue
            with open(path, "rb") as fh:
                value = json.loads(fh.read())
            if not isinstance(value, dict) or value.get("type") == "Buffer":
                skipped += 1
                continue
            value["baileysDrBench"] = stamp
            # No O_CREAT: a file the service deleted since it was listed stays deleted.
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (FileNotFoundError, ValueError):
            skipped += 1
            continue
        with os.fdopen(fd, "wb") as fh:
            fh.write(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
        done += 1
    return {"key_files": total, "rewritten": done, "skipped": skipped}


def trim(result, keep=()):
    """A module result without its per-company members (the scalars, and keep)."""
    return {k: v for k, v in (result or {}).items() if not isinstance(v, (dict, list)) or k in keep}


class SwitchBench:
    """Failover then failback of the private application under the writer, on one SizeRun's cluster."""

    def __init__(self, run):
        self.run = run
        self.dir = os.path.join(run.work, "switch")
        self.ledger = os.path.join(self.dir, "ledger.jsonl")
        self.pid_file = os.path.join(self.dir, "writer.pid")
        self.rate = run.opts.writer_rate
        self.idle = run.opts.switch_idle_seconds
        self.offset = 0
        self.results = {}

    # -- the writer and the application ----------------------------------------------------------------------------
    def writer(self, *args, env=None, check=True):
        proc = subprocess.run([sys.executable, WRITER] + list(args), capture_output=True, text=True, timeout=600,
                              env=env or self.run.app_env)
        if check and proc.returncode:
            raise BenchError("writer %s failed (exit %d): %s" % (args[0], proc.returncode, proc.stderr[-2000:]))
        return proc

    def health(self):
        try:
            with urllib.request.urlopen(self.health_url, timeout=5) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read() or b"{}")
        except (OSError, ValueError):
            return {}

    def wait_quiet(self):
        """Until the application has read every key (its verification pass loads the machine for minutes at 1,000
        companies), so that the idle window is idle."""
        deadline = time.monotonic() + QUIET_TIMEOUT
        while not self.health().get("digestsComplete"):
            if time.monotonic() > deadline:
                raise BenchError("the application did not finish its verification in %d s" % QUIET_TIMEOUT)
            time.sleep(1)

    def requests(self):
        """The writer's request records appended since the last call (complete lines only)."""
        with open(self.ledger, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        data = data[:data.rfind(b"\n") + 1]
        self.offset += len(data)
        out = []
        for line in data.splitlines():
            record = json.loads(line)
            if record.get("kind") == "request":
                record["sent_at"], record["done_at"] = epoch_of(record["sent"]), epoch_of(record["done"])
                out.append(record)
        return out

    def all_requests(self):
        self.offset = 0
        return self.requests()

    def wait_ack_after(self, epoch, timeout=120):
        deadline = time.monotonic() + timeout
        self.offset = 0
        while time.monotonic() < deadline:
            if any(r["outcome"] == "ack" and r["done_at"] > epoch for r in self.requests()):
                return True
            time.sleep(0.2)
        return False

    def stats(self, start, end):
        out = self.writer("stats", "--ledger", self.ledger, "--from", "%.3f" % start, "--to", "%.3f" % end, "--json").stdout
        return json.loads(out)

    def latency(self, start, end):
        ms = [1000 * (r["done_at"] - r["sent_at"]) for r in self.all_requests()
              if r["outcome"] == "ack" and start <= r["done_at"] <= end]
        return {"p50_ms": percentile(ms, 0.5), "p95_ms": percentile(ms, 0.95), "max_ms": round(max(ms), 1) if ms else None}

    def written_files(self):
        """{company dir: {file names}} of every key the writer's answers list (written or deleted)."""
        from ansible.module_utils.baileys_dr_codec import key_file_name

        names = {}
        for record in self.all_requests():
            for entry in (record.get("written") or []) + (record.get("deleted") or []):
                names.setdefault("company_" + record["company"], set()).add(key_file_name(entry["type"], entry["id"]))
        return names

    # -- the run -----------------------------------------------------------------------------------------------------
    def run_all(self):
        run = self.run
        run.discard(os.path.join(run.work, "dr"))
        run.discard(self.dir)
        os.makedirs(self.dir)
        run.app_setup()
        setup_paths()
        self.health_url = "http://127.0.0.1:%d/health" % run.health_port
        self.sessions = os.path.join(run.app_root, "baileys_sessions")
        self.standby = self.sessions + ".standby"
        self.state_dir = os.path.join(run.work, "dr", "state")
        self.state_file = os.path.join(self.state_dir, "failover-state.json")
        self.pass_record = os.path.join(self.state_dir, "failback-bulk-pass.json")
        log("%s: switch: starting the private application (database mode, PM2_HOME=%s)" % (run.keys, run.pm2_home))
        run.playbook("switch-app-start", os.path.join(HERE, "app.yml"), [])
        try:
            log("%s: switch: building the standby copy (snapshot.yml's job, not timed)" % run.keys)
            built = measure(run.module_argv("export", {"dest": self.standby, "mode": "standby"}), env=run.env)
            if built["rc"]:
                raise BenchError("the standby build failed: %s" % built["stdout"][-2000:])
            self.prepared = built["seconds"]
            self.operation("failover", "export", self.failover_bulk, self.change_rows, self.failover_switch, "files",
                           self.idle)
            # The failback's bulk pass reads every file and compares it with its row: about three times the standby
            # build, which wrote every file; the idle window before it is as long (a baseline of the same length).
            self.operation("failback", "import", self.failback_bulk, self.change_files, self.failback_switch,
                           "postgres", max(self.idle, min(3 * self.prepared, 900)))
        finally:
            self.writer("stop", "--pid-file", self.pid_file, "--missing-ok", check=False)
            run.app_teardown()
            run.save()

    def common(self):
        run = self.run
        return {"app_root": run.app_root, "app_name": "baileys-whatsapp-service", "app_user": "root",
                "pm2_bin": run.pm2_bin, "pm2_home": run.pm2_home, "health_url": self.health_url, "ready_window": 1,
                "ready_timeout": READY_TIMEOUT, "state_file": self.state_file, "tag": "emergency-file-fallback-v1",
                "sessions_dir": self.sessions}

    # roles/baileys_failover/tasks/sessions.yml and switch.yml, with the role's defaults.
    def failover_bulk(self):
        return {"mode": "standby", "dest": self.standby, "owner": "root", "space_margin": 1.5}

    def failover_switch(self, started):
        return dict(self.common(), store="files", source="live",
                    record_data={"started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                                 "store_before": "postgres"},
                    tag_commit="", marker_path="src/stores/files.js", marker_regex="useMultiFileAuthState",
                    allow_dirty=False, standby_dir=self.standby, space_margin=1.5)

    # roles/baileys_failback/tasks/import.yml and switch.yml (vars/main.yml's import options).
    def import_options(self):
        with open(self.state_file, encoding="utf-8") as fh:
            state = json.load(fh)
        return {"since": state.get("data_at") or state.get("started_at"), "force": False, "allow_other_database": False,
                "undo_dir": os.path.join(self.state_dir, "undo"), "buffer_format": "array", "ambiguous": "fail"}

    def failback_bulk(self):
        return dict(self.import_options(), src=self.sessions, changed_during_read="defer", pass_record=self.pass_record)

    def failback_switch(self, started):
        return dict(self.common(), store="postgres",
                    import_options=dict(self.import_options(), delta_from=self.pass_record))

    def change_rows(self, writer_started):
        # Rows the writer wrote are left alone: changing one would be an acknowledged write lost.
        return dict(change_rows(CHANGE_PERCENT, "uniform", seed=13, untouched_since=writer_started - 1),
                    store="postgres")

    def change_files(self, writer_started):
        cutoff = time.time() - LEDGER_MARGIN
        return dict(change_files(self.sessions, CHANGE_PERCENT, self.written_files(), cutoff), store="files")

    def operation(self, op, bulk_module, bulk_params, change, switch_params, store, idle):
        run = self.run
        started = time.time()
        self.writer("start", "--url", self.health_url[:-len("/health")], "--ledger", self.ledger, "--pid-file",
                    self.pid_file, "--rate", str(self.rate))
        self.wait_quiet()
        idle_from = time.time()
        log("%s: switch: %s, writer on, %.0f s against the idle service" % (run.keys, op, idle))
        time.sleep(idle)  # the baseline of the throughput: a length of time, not a condition
        bulk = run.step("switch_%s_bulk" % op, run.module_argv(bulk_module, bulk_params()) + ["--full"], "ours")
        bulk["result"] = trim(bulk["result"], ("counts", "totals", "delta", "deferred"))
        if isinstance(bulk["result"].get("deferred"), list):
            bulk["result"]["deferred"] = len(bulk["result"]["deferred"])
        b0, b1 = bulk["started_epoch"], bulk["started_epoch"] + bulk["seconds"]
        changed = change(started)
        log("%s: switch: %s changed after the bulk pass: %s" % (run.keys, op, json.dumps(changed)))
        label = "switch_%s" % op
        try:
            entry = run.step(label, run.module_argv("baileys_store_switch", switch_params(started)) + ["--full"], "ours",
                             keys=0)
        except BenchError as exc:
            self.profile(op, None, str(exc))
            raise
        result = entry["result"] or {}
        stop_began = result["stop_began_at_epoch"]
        ready = (result.get("readiness") or {}).get("ready_at_epoch")
        acked = self.wait_ack_after(ready or time.time())
        self.writer("stop", "--pid-file", self.pid_file)
        gap = self.stats(entry["started_epoch"], time.time())["downtime"]
        window = min(max(bulk["seconds"], MIN_RATE_WINDOW), b0 - idle_from)
        before, during = self.stats(b0 - window, b0), self.stats(b0, b1)
        rates = (before["acks_per_second"], during["acks_per_second"])
        args = ["check", "--ledger", self.ledger, "--store", store, "--json"]
        if store == "files":
            args += ["--sessions", self.sessions]
        check = self.writer(*args, env=run.env, check=False)
        try:
            report = json.loads(check.stdout)
        except ValueError:
            report = {"passed": False, "problems": [check.stderr.strip()[-500:]]}
        entry.update({
            "operation": op, "writer_rate": self.rate, "change": changed,
            "downtime": {"module_seconds": round(ready - stop_began, 3) if ready else None,
                         "writer_seconds": gap["seconds"] if acked else None, "writer_from": gap["from"],
                         "writer_to": gap["to"], "not_acknowledged_between": gap["not_acknowledged_between"]},
            "throughput": {"bulk_seconds": bulk["seconds"], "window_seconds": round(window, 2),
                           "before": dict(acks_per_second=rates[0], requests=before["requests"],
                                          acknowledged=before["acknowledged"], **self.latency(b0 - window, b0)),
                           "during": dict(acks_per_second=rates[1], requests=during["requests"],
                                          acknowledged=during["acknowledged"], **self.latency(b0, b1)),
                           "drop": round(1 - rates[1] / rates[0], 3) if rates[0] and rates[1] is not None else None,
                           "judged": bulk["seconds"] >= MIN_RATE_WINDOW},
            "check": {k: report.get(k) for k in ("passed", "acknowledged", "requests", "writes_acked", "deletes_acked",
                                                 "lost", "ambiguous", "lost_examples", "problems")},
            "prepared_standby_seconds": self.prepared,
        })
        entry["note"] = "downtime: module %s s, writer %s s" % (entry["downtime"]["module_seconds"],
                                                               entry["downtime"]["writer_seconds"])
        entry["result"] = dict(trim(result), steps=result.get("steps"), final_copy=result.get("final_copy"),
                               readiness=trim(result.get("readiness"), ("checks",)),
                               identities=trim(result.get("identities"), ("differ",)))
        self.results[op] = entry
        run.save()
        log("%s: switch: %s %s; writer: %s acknowledged, %s lost; acks/s before %s, during the bulk pass %s" % (
            run.keys, op, entry["note"], report.get("acknowledged"), report.get("lost"), rates[0], rates[1]))
        problems = [] if acked else ["no request was acknowledged in 120 s after the service said ready"]
        if report.get("lost") or check.returncode:
            problems.append("writer check on %s: %s acknowledged writes lost (%s) %s" % (
                store, report.get("lost"), json.dumps((report.get("lost_examples") or [])[:3]),
                "; ".join(report.get("problems") or [])))
        if problems or self.run.opts.profile_always or any(
                met is False for _, _, _, met in operation_targets(run.record, op, entry)):
            self.profile(op, entry, "; ".join(problems) or None)
        if problems:
            raise BenchError("%s: %s" % (op, "; ".join(problems)))

    # -- profile -----------------------------------------------------------------------------------------------------
    def profile(self, op, entry, failure):
        """Where the downtime goes: the module's steps from the stop command, the readiness wait, the delta, the test
        application's log events and the writer's requests around the switch."""
        run = self.run
        rec = run.record
        out = ["# %s under the writer, %s keys (%d compan%s x %d keys)" % (
            op, "{:,}".format(run.keys), run.companies, "y" if run.companies == 1 else "ies", rec["keys_per_company"]),
            "", "Command: `%s`; writer at %s requests/s." % (rec["command"], self.rate)]
        if failure:
            out += ["", "## failure", "", failure[:4000]]
        if entry:
            result, down = entry["result"], entry["downtime"]
            stop = result["stop_began_at_epoch"]
            ready = (result.get("readiness") or {}).get("ready_at_epoch")
            out += ["", "## downtime", "", "module (stop command to ready): %s s" % down["module_seconds"],
                    "writer (longest gap between acknowledged requests): %s s, %s to %s, %s requests not acknowledged "
                    "between" % (down["writer_seconds"], down["writer_from"], down["writer_to"],
                                 down["not_acknowledged_between"]),
                    "", "## the module's steps (seconds from the stop command, and since the step before)", ""]
            steps = result.get("steps") or []
            stopped = next((s for s in steps if s["step"] == "stopped"), None)
            # Steps count from the module's start; stopped_at_epoch ties them to the clock.
            origin = result["stopped_at_epoch"] - stopped["at"] if stopped and result.get("stopped_at_epoch") else stop
            previous = stop
            out.append("%-10s %8.3f" % ("stop cmd", 0))
            for step in steps:
                at = origin + step["at"]
                details = {k: v for k, v in step.items() if k not in ("step", "at")}
                out.append("%-10s %8.3f  +%.3f  %s" % (step["step"], at - stop, at - previous, json.dumps(details) if details else ""))
                previous = at
            if ready:
                out.append("%-10s %8.3f  (readiness.ready_at)" % ("ready_at", ready - stop))
            readiness = result.get("readiness") or {}
            out += ["", "## readiness wait", "", "waited %s s; the application said ready at %s, the module at %s" % (
                readiness.get("waited_seconds"), readiness.get("app_ready_at"), readiness.get("ready_at"))]
            out += ["- %s: %s" % (c.get("name"), c.get("detail")) for c in readiness.get("checks") or []]
            out += ["", "## final copy (what changed since the bulk pass)", "",
                    "changed after the bulk pass: %s" % json.dumps(entry.get("change")),
                    json.dumps(result.get("final_copy"), indent=1, default=str)]
            begin, end = stop - 5, (ready or stop) + 5
        else:
            begin, end = time.time() - 600, time.time()
        events = [e for e in run.app_events(APP_EVENTS) if begin <= epoch_of(e["time"]) <= end]
        out += ["", "## the test application's log events (seconds from the stop command)", ""]
        origin = entry["result"]["stop_began_at_epoch"] if entry else begin
        for event in events:
            out.append("%8.3f %s" % (epoch_of(event["time"]) - origin, " ".join(
                "%s=%s" % (k, event[k]) for k in ("event", "pid", "store", "ready", "companies", "keys", "loadMs",
                                                  "verifyMs", "signal", "requests", "errorCount") if k in event)))
        out += ["", "## the writer's requests (seconds from the stop command: sent, done, outcome, status)", ""]
        for r in self.all_requests():
            if begin <= r["done_at"] <= end:
                out.append("%8.3f %8.3f %-10s %s %s" % (r["sent_at"] - origin, r["done_at"] - origin, r["outcome"],
                                                        r.get("status"), (r.get("error") or "")[:80]))
        if entry:
            out += ["", "## the bulk pass and the writer's throughput", "",
                    json.dumps(entry["throughput"], indent=1),
                    json.dumps(run.record["steps"].get("switch_%s_bulk" % op, {}).get("result"), indent=1, default=str)]
        os.makedirs(os.path.dirname(run.profile_path("switch_" + op)), exist_ok=True)
        with open(run.profile_path("switch_" + op), "w", encoding="utf-8") as fh:
            fh.write("\n".join(out) + "\n")
        rec["profiles"]["switch_" + op] = {"path": os.path.relpath(run.profile_path("switch_" + op), ROOT)}
        run.save()


def run_switch(run):
    SwitchBench(run).run_all()


# ----------------------------------------------------------------------------------------------------------------------
# Report.

def operation_targets(rec, op, entry):
    """(target, measured, limit, met) rows of one switch: downtime, throughput during its bulk pass, writes lost."""
    rows = []
    name = "planned failover" if op == "failover" else "failback"
    down = entry.get("downtime") or {}
    limit = downtime_limit(rec["companies"])
    if limit:
        figures = (down.get("module_seconds"), down.get("writer_seconds"))
        rows.append(("%s downtime (%d compan%s, writer on, 1%% changed after the bulk pass)" % (
            name, rec["companies"], "y" if rec["companies"] == 1 else "ies"),
            "module %s s (stop to ready); writer %s s (longest gap between acks)" % figures,
            "<= %.0f s" % limit, None if None in figures else max(figures) <= limit))
    flow = entry.get("throughput") or {}
    if flow:
        before, during = flow["before"]["acks_per_second"], flow["during"]["acks_per_second"]
        measured = "%s/s before, %s/s during (%s; the pass %.1f s, before it %.1f s)" % (
            "?" if before is None else "%.2f" % before, "?" if during is None else "%.2f" % during, "%+.0f%%" % (-100 * flow["drop"]) if flow.get("drop") is not None else "?",
            flow["bulk_seconds"], flow["window_seconds"])
        met = None
        if not flow.get("judged"):
            measured += " - the pass is shorter than %.0f s: too few requests for a rate" % MIN_RATE_WINDOW
        elif flow.get("drop") is not None:
            met = flow["drop"] <= MAX_THROUGHPUT_DROP
        rows.append(("writer's acks/s during the %s bulk pass vs just before" % op, measured,
                     "drop <= %.0f%%" % (100 * MAX_THROUGHPUT_DROP), met))
    check = entry.get("check") or {}
    rows.append(("acknowledged writes lost (%s, writer check on %s)" % (op, "files" if op == "failover" else "postgres"),
                 "%s of %s acknowledged requests" % (check.get("lost"), check.get("acknowledged")), "0",
                 check.get("lost") == 0 and bool(check.get("passed"))))
    return rows


def targets(rec):
    rows = []
    for op in OPERATIONS:
        entry = rec["steps"].get("switch_%s" % op)
        if entry and "downtime" in entry:
            rows += operation_targets(rec, op, entry)
    return rows


def report_lines(records, fmt):
    """The switch section of docs/benchmarks.md: one line per size and operation."""
    rows = [(rec, op, rec["steps"]["switch_%s" % op]) for rec in records for op in OPERATIONS
            if "downtime" in rec["steps"].get("switch_%s" % op, {})]
    if not rows:
        return []
    lines = ["## Switch under load", "",
             "A planned failover (PostgreSQL up) then a failback of the private test application while "
             "testbed/bin/writer writes through it, each as the roles run them: the bulk pass while the service "
             "serves, 1% of the keys changed after it (rows in PostgreSQL before the failover, key files rewritten in "
             "place before the failback; never a key the writer wrote), then baileys_store_switch (stop, fence, copy "
             "the delta, prove, switch, start, identities). Downtime: the module's (its stop command to ready) and the "
             "writer's (the longest gap between two acknowledged requests). Throughput: the writer's acknowledged "
             "requests per second during the bulk pass against the same length of time just before it, on the idle "
             "service (at the writer's pace, a drop means requests slower than the pace or refused; latency shows "
             "more). Lost: `writer check` on the store switched to.", "",
             "| size | switch | downtime, module s | downtime, writer s | bulk pass s | writer acks/s before -> during "
             "the bulk pass (latency p50/p95 ms) | changed after the bulk pass | delta | acknowledged, lost |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for rec, op, entry in rows:
        down, flow, check = entry["downtime"], entry["throughput"], entry["check"]
        bulk = rec["steps"].get("switch_%s_bulk" % op, {})
        change = entry.get("change") or {}
        changed = ("%s rows updated, %s deleted, %s inserted" % (change.get("updated"), change.get("deleted"),
                                                                 change.get("inserted")) if change.get("store") == "postgres"
                   else "%s of %s key files rewritten" % (change.get("rewritten"), change.get("key_files")))
        final = (entry.get("result") or {}).get("final_copy") or {}
        if op == "failover":
            delta = "%s files written, %s deleted, companies refreshed: %s" % (
                final.get("files_written"), final.get("files_deleted"), final.get("companies_refreshed"))
        else:
            d = final.get("delta") or {}
            delta = "%s of %s companies imported (%s)" % (d.get("imported"), d.get("companies"), ", ".join(
                "%s %s" % (v, k) for k, v in sorted((d.get("not_proven") or {}).items())) or "none changed")
        before, during = flow["before"], flow["during"]
        lines.append("| %s (%d x %d) | %s | %s | %s | %s | %s -> %s (%s/%s -> %s/%s) | %s | %s | %s, %s |" % (
            "{:,}".format(rec["keys"]), rec["companies"], rec["keys_per_company"], op, fmt(down["module_seconds"]),
            fmt(down["writer_seconds"]), fmt(bulk.get("seconds")), fmt(before["acks_per_second"]),
            fmt(during["acks_per_second"]), fmt(before["p50_ms"], "%.0f"), fmt(before["p95_ms"], "%.0f"),
            fmt(during["p50_ms"], "%.0f"), fmt(during["p95_ms"], "%.0f"), changed, delta, check.get("acknowledged"),
            check.get("lost")))
    lines += ["", "Targets (judged under Targets): %s" % " ".join(TARGETS_HELP.split()).split(": ", 1)[1], ""]
    return lines
