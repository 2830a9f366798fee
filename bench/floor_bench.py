"""The floor of a failover and the failover with one busy core: part of the `failover` step of bench/run.

The floor is what no failover tool can beat on this host, measured in the same run right after the failover from
the standby copy (the application serving on the file store):

- Ansible's own start: `ansible-playbook` running one no-op task (ansible.builtin.ping: one module, as a real
  task) against the same host through the same inventory and ansible.cfg;
- a bare restart: `pm2 restart` of the same application onto the same files (.env already says files, as an
  operator switching by hand would have left it), to the application answering ready on the file store.

Failover RTO (start of ansible-playbook to ready, the `failover` step) is reported as a ratio to the floor; target
1.5x for 1 company, 2x for 1,000 companies. Then, at sizes up to MAX_BUSY_KEYS, the failover from the standby copy
runs again (a fresh application on PostgreSQL, a fresh standby copy and arming record from snapshot.yml, untimed) with one busy core: a bounded CPU
burner (one process spinning, killed at the end and at most BURN_SECONDS anyway); target: at most 1.5x the idle RTO.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from harness import HERE, BenchError, health, log, wait_new_ready

APP_NAME = "baileys-whatsapp-service"
NOOP_PLAYBOOK = os.path.join(HERE, "noop.yml")
FLOOR_RATIO = {1: 1.5, 1000: 2.0}
BUSY_RATIO = 1.5
MAX_BUSY_KEYS = 150000
BURN_SECONDS = 900
READY_TIMEOUT = 600
STEP_TEXT = {
    "failover_floor": "floor: `ansible-playbook` with one no-op task + a bare `pm2 restart` onto the files to ready",
    "failover_standby_busy": "**failover from the standby copy, one busy core** (playbooks/failover.yml)",
}


def measure_floor(run):
    """Record failover_floor: Ansible's start and a bare PM2 restart onto the files, each to its end."""
    log("%s: failover floor: ansible-playbook with one no-op task" % run.keys)
    noop, _ = run.playbook("floor-noop", NOOP_PLAYBOOK, [])
    url = "http://127.0.0.1:%d/health" % run.health_port
    before = (health(url) or {}).get("pid")
    log("%s: failover floor: pm2 restart onto the files to ready" % run.keys)
    started = time.time()
    subprocess.run([run.pm2_bin, "restart", APP_NAME], env=run.app_env, check=True, capture_output=True, timeout=120)
    if not wait_new_ready(url, before, READY_TIMEOUT):
        raise BenchError("the bare pm2 restart was not ready on the files within %ds" % READY_TIMEOUT)
    restart = round(time.time() - started, 3)
    entry = {"kind": "baseline", "seconds": round(noop["seconds"] + restart, 3), "keys": run.keys,
             "ansible_noop_seconds": noop["seconds"], "pm2_restart_seconds": restart, "peak_rss_mib": None,
             "note": "ansible-playbook no-op %.2f s + pm2 restart to ready %.2f s" % (noop["seconds"], restart)}
    run.record["steps"]["failover_floor"] = entry
    log("%s: failover floor %.2f s (%s)" % (run.keys, entry["seconds"], entry["note"]))


class CpuBurner:
    """One core kept busy for the block (a spinning process, killed on exit, bounded by BURN_SECONDS anyway)."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c",
                                      "import time\nend = time.time() + %d\nwhile time.time() < end: pass" % BURN_SECONDS])
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def run_busy_failover(run):
    """failover_standby_busy: the same failover again, from a fresh standby copy (snapshot.yml, which arms it), with one
    busy core."""
    if run.keys > MAX_BUSY_KEYS:
        run.record["notes"].append("failover with one busy core measured up to %s keys only (each run rebuilds the "
                                   "application and the standby copy)" % "{:,}".format(MAX_BUSY_KEYS))
        return
    run.discard(os.path.join(run.work, "dr"))
    run.app_setup()
    run.playbook("busy-app-start", os.path.join(HERE, "app.yml"), [])
    try:
        run.arm()
        with CpuBurner():
            log("%s: failover from the standby copy with one busy core" % run.keys)
            entry = run.failover_playbook("failover-busy")
        run.record["steps"]["failover_standby_busy"] = entry
        log("%s: busy failover: start to ready %s s" % (run.keys, entry["rto_seconds"]))
    finally:
        run.app_teardown()
        run.save()


def targets(rec):
    """Rows for the Targets table: RTO against the floor, and busy against idle."""
    steps, rows = rec["steps"], []
    idle, floor, busy = steps.get("failover_standby"), steps.get("failover_floor"), steps.get("failover_standby_busy")
    limit = FLOOR_RATIO.get(1000 if rec["companies"] >= 1000 else rec["companies"])
    if idle and floor and limit and idle.get("rto_seconds"):
        ratio = idle["rto_seconds"] / floor["seconds"]
        rows.append(("failover RTO from the standby copy / floor (%d compan%s)" % (
            rec["companies"], "y" if rec["companies"] == 1 else "ies"),
            "%.2fx (%.2f s against %s)" % (ratio, idle["rto_seconds"], floor["note"]), "<= %.1fx" % limit, ratio <= limit))
    if idle and busy and idle.get("rto_seconds") and busy.get("rto_seconds"):
        ratio = busy["rto_seconds"] / idle["rto_seconds"]
        rows.append(("failover RTO with one busy core / idle", "%.2fx (%.2f s against %.2f s)" % (
            ratio, busy["rto_seconds"], idle["rto_seconds"]), "<= %.1fx" % BUSY_RATIO, ratio <= BUSY_RATIO))
    return rows
