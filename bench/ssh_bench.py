"""The failover from the standby copy over SSH, against its floor over SSH: the `ssh` step of bench/run.

Production runs the playbooks from a control node over SSH, so the RTO that matters is the one over SSH. At the
1-company size the step stands up the container test bed (testbed/containers.py: a db container and an app
container of the test-bed images, the app container's sshd, the same companies and keys as the size), then over
SSH with the project's ansible.cfg (pipelining, one persistent connection per host):

- snapshot.yml (the standby copy and the arming record; not timed), then PostgreSQL stopped in its container;
- ssh_failover: playbooks/failover.yml -e baileys_failover_source=standby, from the start of ansible-playbook to
  the application's own "ready on the file store" event (its PM2 log, read from the container afterwards);
- ssh_floor, over the same transport: ansible-playbook with one no-op task against the app container, plus a bare
  `pm2 restart` onto the same files to ready, run through one `ssh` command as an operator would.

Target: RTO over SSH at most 1.5x the floor over SSH. Needs root and the Docker engine (testbed/bin/ensure-docker);
without them the step records why it did not run.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
import time

from harness import (HERE, ROOT, BenchError, health, log, parse_events, ready_times, run_playbook,
                     wait_new_ready)

sys.path.insert(0, os.path.join(ROOT, "testbed"))
from containers import ContainerBed, sh  # noqa: E402 - the test bed's module, by path

APP_NAME = "baileys-whatsapp-service"
APP_USER = "baileys"
PM2 = "/usr/local/bin/pm2"
HEALTH_URL = "http://127.0.0.1:3011/health"
DB_PASSWORD = "bench-ssh-only-db-password"
FLOOR_RATIO = 1.5
READY_TIMEOUT = 300
STEP_TEXT = {
    "ssh_failover": "**failover from the standby copy over SSH** (playbooks/failover.yml to a test-bed container)",
    "ssh_floor": "floor over SSH: `ansible-playbook` with one no-op task + `ssh` running a bare `pm2 restart` to ready",
}
# Run on the app host by the floor's ssh command: a bare restart onto the files, to ready (the pid must change), with
# the benchmark's own health and wait_new_ready (their source, sent with the script).
RESTART_TO_READY = r"""
import json, pwd, subprocess, sys, time, urllib.request
%(functions)s
before = (health(%(url)r) or {}).get("pid")
home = pwd.getpwnam(%(user)r).pw_dir
subprocess.run(["runuser", "-u", %(user)r, "--", "env", "HOME=" + home, "PM2_HOME=" + home + "/.pm2", %(pm2)r, "restart",
                %(app)r], check=True, capture_output=True)
if not wait_new_ready(%(url)r, before, %(timeout)d):
    sys.exit("not ready on the files within %(timeout)ds")
"""


class SshBed(ContainerBed):
    """The container test bed reached over SSH, with the inventory and the ssh command a control node would use."""

    def __init__(self, work):
        super().__init__(work, "baileys-dr-bench-ssh", str(os.getpid()), DB_PASSWORD)
        self.inventory = os.path.join(work, "hosts.yml")

    def write_inventory(self):
        self.host = self.address(self.app)
        app = {"ansible_host": self.host, "ansible_user": "root", "ansible_ssh_private_key_file": self.key,
               "ansible_ssh_common_args": "-o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=no",
               "baileys_dr_app_root": "/srv/baileys-app", "baileys_dr_app_user": APP_USER, "baileys_dr_pm2_bin": PM2,
               "baileys_dr_db_host": self.db, "baileys_dr_db_port": 5432, "baileys_dr_db_name": "baileys",
               "baileys_dr_db_user": "baileys", "baileys_dr_environment": "test",
               "baileys_dr_metrics_dir": "/var/lib/baileys-dr/metrics",
               "baileys_dr_controller_audit_log": os.path.join(self.tmp, "controller-audit.jsonl")}
        with open(self.inventory, "w", encoding="utf-8") as fh:
            json.dump({"all": {"children": {"baileys_app": {"hosts": {"ssh-app": app}}}}}, fh)

    def ssh_argv(self, *command):
        return ["ssh", "-i", self.key, "-o", "UserKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=no",
                "-o", "LogLevel=ERROR", "-o", "BatchMode=yes", "root@" + self.host] + list(command)

    def failover_armed(self):
        """Whether the last failover ran armed, from the control node's audit record of it."""
        with open(os.path.join(self.tmp, "controller-audit.jsonl"), encoding="utf-8") as fh:
            records = [json.loads(line) for line in fh if line.strip()]
        failovers = [r for r in records if r.get("operation") == "failover"]
        return (failovers[-1].get("details") or {}).get("armed") if failovers else None

    def app_log_lines(self):
        home = self.exec(self.app, "getent passwd %s | cut -d: -f6" % APP_USER).stdout.strip()
        return self.exec(self.app, "cat %s/.pm2/logs/%s-out.log" % (home, APP_NAME)).stdout.splitlines()


def playbook(bed, label, playbook_path, extra=()):
    extra = [json.dumps({"baileys_dr_db_password": DB_PASSWORD})] + list(extra)
    run, _ = run_playbook("%s over SSH" % label, bed.inventory, playbook_path, extra,
                          os.path.join(bed.tmp, "%s.log" % label), timeout=1800)
    return run


def run_ssh(run):
    """Record ssh_failover and ssh_floor at the 1-company size."""
    if run.companies != 1:
        return
    if os.geteuid() != 0 or shutil.which("docker") is None or shutil.which("ssh") is None:
        run.record["notes"].append("failover over SSH not measured: it needs root, the Docker engine and an ssh client")
        return
    sh(os.path.join(ROOT, "testbed", "bin", "ensure-docker"), timeout=300)
    work = os.path.join(run.work, "ssh")
    os.makedirs(work, exist_ok=True)
    bed = SshBed(work)
    try:
        log("%s: ssh: the container test bed (db, app with sshd; %d company x %d keys)"
                  % (run.keys, run.companies, run.per_company))
        bed.build()
        bed.start()
        bed.start_sshd()
        bed.prepare({"testbed_seed_companies": run.companies, "testbed_seed_keys_per_company": run.per_company})
        bed.write_inventory()
        log("%s: ssh: snapshot.yml over SSH (standby copy and arming, not timed)" % run.keys)
        playbook(bed, "ssh-snapshot", os.path.join(ROOT, "playbooks", "snapshot.yml"))
        bed.exec(bed.db, "pg_ctlcluster 15 main stop -m fast")
        log("%s: ssh: failover from the standby copy over SSH" % run.keys)
        failover = playbook(bed, "ssh-failover", os.path.join(ROOT, "playbooks", "failover.yml"),
                            ["baileys_failover_source=standby"])
        ready, _ = ready_times(parse_events(bed.app_log_lines(), ("load_finished", "verify_finished")),
                                     failover["started_epoch"])
        if ready is None:
            raise BenchError("the application on the app container never said ready on the files after the "
                                   "failover over SSH")
        armed = bed.failover_armed()
        run.record["steps"]["ssh_failover"] = {"kind": "ours", "seconds": failover["seconds"], "keys": run.keys,
                                               "rto_seconds": ready, "armed": armed, "peak_rss_mib": None}
        log("%s: ssh: failover playbook %.2f s, start to ready %.2f s" % (run.keys, failover["seconds"], ready))
        noop = playbook(bed, "ssh-floor-noop", os.path.join(HERE, "noop.yml"))
        script = RESTART_TO_READY % {"functions": inspect.getsource(health) + "\n" + inspect.getsource(wait_new_ready),
                                     "url": HEALTH_URL, "user": APP_USER, "pm2": PM2, "app": APP_NAME,
                                     "timeout": READY_TIMEOUT}
        started = time.monotonic()
        restart = subprocess.run(bed.ssh_argv("python3", "-"), input=script, text=True, capture_output=True,
                                 timeout=READY_TIMEOUT + 60)
        restart_seconds = round(time.monotonic() - started, 3)
        if restart.returncode:
            raise BenchError("the bare pm2 restart over SSH failed: %s" % (restart.stderr or restart.stdout)[-2000:])
        run.record["steps"]["ssh_floor"] = {
            "kind": "baseline", "seconds": round(noop["seconds"] + restart_seconds, 3), "keys": run.keys,
            "ansible_noop_seconds": noop["seconds"], "pm2_restart_seconds": restart_seconds, "peak_rss_mib": None,
            "note": "ansible-playbook no-op %.2f s + ssh pm2 restart to ready %.2f s" % (noop["seconds"], restart_seconds)}
        log("%s: ssh: floor %s" % (run.keys, run.record["steps"]["ssh_floor"]["note"]))
    finally:
        bed.teardown()
        run.save()


def targets(rec):
    """The Targets row: RTO over SSH against the floor over SSH."""
    steps = rec["steps"]
    ours, floor = steps.get("ssh_failover"), steps.get("ssh_floor")
    if not (ours and floor and ours.get("rto_seconds")):
        return []
    ratio = ours["rto_seconds"] / floor["seconds"]
    return [("failover RTO from the standby copy over SSH / floor over SSH (1 company)",
             "%.2fx (%.2f s against %s)" % (ratio, ours["rto_seconds"], floor["note"]), "<= %.1fx" % FLOOR_RATIO,
             ratio <= FLOOR_RATIO)]
