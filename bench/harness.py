"""What every step of bench/run stands on: paths, a child process measured (wall time, peak RSS), a playbook run,
the test application's events and health, the 1% change of the keys, and the log line.

Step files (bench/steps.py, floor_bench.py, ssh_bench.py, switch_bench.py) import this and bench/sizerun.py;
nothing here imports a step or the command line (bench/benchmark.py).
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# BAILEYS_DR_BENCH_RESULTS: a scratch results directory, so a trial run leaves bench/results/ alone.
RESULTS = os.environ.get("BAILEYS_DR_BENCH_RESULTS") or os.path.join(HERE, "results")
PROFILES = os.environ.get("BAILEYS_DR_BENCH_PROFILES") or os.path.join(HERE, "profiles")
KEYS_PER_COMPANY = 1500
STEPS = ("export", "import", "standby", "failover", "ssh", "switch", "cleanup")


class BenchError(RuntimeError):
    pass


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


def utcnow():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def loadavg():
    with open("/proc/loadavg", encoding="ascii") as fh:
        return " ".join(fh.read().split()[:3])



def health(url):
    """The application's /health document, or None when it does not answer (also run on an app host over SSH: see
    ssh_bench.RESTART_TO_READY, which sends this function's source)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as resp:
            return json.load(resp)
    except (OSError, ValueError):
        return None


def wait_new_ready(url, before, timeout):
    """Whether the application at url answered ready on the file store with a pid other than before within timeout
    seconds: a restart to ready (also run on an app host over SSH, with health)."""
    deadline = time.time() + timeout
    while True:
        doc = health(url) or {}
        if doc.get("ready") is True and doc.get("store") == "files" and doc.get("pid") not in (None, before):
            return True
        if time.time() > deadline:
            return False
        time.sleep(0.02)


def run_playbook(name, inventory, playbook, extra, log_path, env=None, timeout=3600):
    """ansible-playbook measured (see measure), its output in log_path: (the measure, the log's text); BenchError
    naming name when it fails."""
    argv = [os.path.join(os.path.dirname(sys.executable), "ansible-playbook"), "-i", inventory, playbook]
    for item in extra:
        argv += ["-e", item]
    run = measure(argv, env=env, cwd=ROOT, stdout_file=log_path, timeout=timeout)
    with open(log_path, encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    if run["rc"]:
        raise BenchError("%s failed (exit %s); log %s:\n%s\n%s" % (name, run["rc"], log_path, text[-4000:], run["stderr"]))
    return run, text
