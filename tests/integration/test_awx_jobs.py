"""The AWX job templates run as AWX runs them: ansible-runner inside the built execution environment.

The execution environment is the image `testbed/bin/build-images ee` builds from execution-environment.yml
(testbed/images/ee). Each job gets what AWX gives a job: a private data dir mounted at /runner with the
project checkout at /runner/project, the inventory, the survey defaults and the secrets credential's
injected variables as extra vars, the machine credential's key in env/ssh_key (ansible-runner loads it into
an ssh-agent), and `ansible-runner run` as the container's command. The hosts are containers of the test
bed's db and app images on a network of their own (names never those of the Molecule scenarios); the
runner containers reach the app container over SSH, as AWX reaches an application host.

CI runs the failover's job and, beside it, a snapshot job the failover's lease refuses; every job template:

    BAILEYS_DR_AWX_TEMPLATES=all python -m pytest tests/integration/test_awx_jobs.py -q
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time

import pytest
import yaml

from conftest import ROOT
from containers import ContainerBed, sh

DB_PASSWORD = "awx-test-only-db-password"
# Job templates whose jobs CI runs (the failover's job runs beside a snapshot job refused by its lease): the full set
# adds ~6 min to the suite (docs/awx.md).
CI_TEMPLATES = ["baileys-dr failover"]
with open(os.path.join(ROOT, "awx", "settings", "controller.yml"), encoding="utf-8") as _fh:
    SETTINGS = yaml.safe_load(_fh)
ALL_TEMPLATES = [t["name"] for t in SETTINGS["awx_job_templates"]]
# The order every template can run in on one test bed: the standby copy first, the failover before its failback,
# the rehearsal (its own failover and failback, on the staging inventory) last.
ORDER = ["baileys-dr health", "baileys-dr snapshot", "baileys-dr cleanup", "baileys-dr failover",
         "baileys-dr failback", "baileys-dr rehearsal"]
SELECTED = ALL_TEMPLATES if os.environ.get("BAILEYS_DR_AWX_TEMPLATES") == "all" else CI_TEMPLATES
SELECTED = sorted(SELECTED, key=ORDER.index)
TEMPLATES = {t["name"]: t for t in SETTINGS["awx_job_templates"]}
HOST = "awx-app"
DB_HOST = "awx-db"
LEASES = "/var/lib/baileys-dr/locks"


def survey_defaults(template):
    with open(os.path.join(ROOT, "awx", "surveys", template["survey"] + ".json"), encoding="utf-8") as fh:
        spec = json.load(fh)["spec"]
    return {q["variable"]: q["default"] for q in spec}


class Bed(ContainerBed):
    """The test bed's containers (testbed/containers.py), the project checkout and a private data dir per job."""

    def __init__(self, tmp, suffix):
        super().__init__(tmp, "baileys-dr-awx", suffix, DB_PASSWORD)
        self.project = tmp / "project"
        self.jobs = 0
        self.runners = []

    def checkout(self):
        """The project as AWX checks it out: the tracked (and new, not ignored) files of this tree."""
        files = sh("git", "ls-files", "-co", "--exclude-standard", "-z", cwd=ROOT).stdout.split("\0")
        self.project.mkdir()
        for rel in filter(None, files):
            src = os.path.join(ROOT, rel)
            if not os.path.lexists(src):
                continue  # deleted in the working tree
            dst = self.project / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if os.path.islink(src):
                os.symlink(os.readlink(src), dst)
            else:
                shutil.copy2(src, dst)
        chown_tree(self.project)

    def inventory(self, environment):
        """An AWX inventory as the project's inventories/*/hosts.yml would give it, for the test bed.

        staging (the rehearsal's) names the database host too: the rehearsal stops PostgreSQL there."""
        app = {
            "ansible_host": self.app, "ansible_user": "root",
            "baileys_dr_app_root": "/srv/baileys-app", "baileys_dr_app_user": "baileys",
            "baileys_dr_pm2_bin": "/usr/local/bin/pm2", "baileys_dr_db_host": self.db,
            "baileys_dr_db_port": 5432, "baileys_dr_db_name": "baileys", "baileys_dr_db_user": "baileys",
            "baileys_dr_environment": environment, "baileys_dr_metrics_dir": "/var/lib/baileys-dr/metrics"}
        groups = {"baileys_app": {"hosts": {HOST: app}}}
        if environment == "staging":
            app["baileys_rehearsal_db_control_host"] = DB_HOST
            groups["db"] = {"hosts": {DB_HOST: {"ansible_host": self.db, "ansible_user": "root"}}}
        return {"all": {"children": groups}}

    # -- jobs -----------------------------------------------------------------------------------------------------
    def job(self, template_name, extra=None):
        """A private data dir for one job of a template, as AWX lays it out; returns the runner's argv."""
        template = TEMPLATES[template_name]
        self.jobs += 1
        job_id = 4200 + self.jobs
        pdd = self.tmp / ("job-%d" % job_id)
        (pdd / "inventory").mkdir(parents=True)
        (pdd / "env").mkdir()
        environment = "staging" if template["inventory"] == "staging" else "test"
        (pdd / "inventory" / "hosts.yml").write_text(yaml.safe_dump(self.inventory(environment)))
        extravars = dict(survey_defaults(template))
        # What AWX adds to every job, and the secrets credential's injected extra var.
        extravars.update({"awx_job_id": job_id, "awx_job_template_name": template_name, "awx_user_name": "pytest",
                          "baileys_dr_db_password": DB_PASSWORD})
        extravars.update(extra or {})
        (pdd / "env" / "extravars").write_text(json.dumps(extravars))
        (pdd / "env" / "envvars").write_text(json.dumps({"JOB_ID": str(job_id)}))
        shutil.copy(self.key, pdd / "env" / "ssh_key")
        chown_tree(pdd)
        name = "baileys-dr-awx-runner-%d-%s" % (job_id, self.net.rsplit("-", 1)[-1])
        self.runners.append(name)
        argv = ["docker", "run", "--rm", "--name", name, "--network", self.net,
                "-v", "%s:/runner" % pdd, "-v", "%s:/runner/project" % self.project,
                self.images["EE"], "ansible-runner", "run", "/runner", "-p", template["playbook"],
                "--ident", str(job_id), "--limit", HOST]
        return Job(pdd, job_id, argv)

    def lease_files(self):
        return sh("docker", "exec", self.app, "sh", "-c", "ls %s 2>/dev/null || true" % LEASES).stdout.split()

    def teardown(self):
        super().teardown(*self.runners)


class Job:
    def __init__(self, pdd, job_id, argv):
        self.pdd, self.job_id, self.argv = pdd, job_id, argv

    def run(self, timeout=1800):
        t0 = time.monotonic()
        self.proc = sh(*self.argv, check=False, timeout=timeout)
        self.seconds = time.monotonic() - t0
        return self

    def start(self):
        self.t0 = time.monotonic()
        self.popen = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return self

    def wait(self, timeout=1800):
        out, _ = self.popen.communicate(timeout=timeout)
        self.seconds = time.monotonic() - self.t0
        self.proc = subprocess.CompletedProcess(self.argv, self.popen.returncode, out, "")
        return self

    @property
    def artifacts(self):
        return self.pdd / "artifacts" / str(self.job_id)

    @property
    def status(self):
        path = self.artifacts / "status"
        return path.read_text().strip() if path.exists() else None

    @property
    def stdout(self):
        path = self.artifacts / "stdout"
        return path.read_text() if path.exists() else ""

    def explain(self):
        return "job %s: rc %s, status %s, %.0f s\n%s\n%s" % (
            self.job_id, self.proc.returncode, self.status, self.seconds, self.proc.stdout[-6000:], self.proc.stderr[-3000:])


def chown_tree(path):
    # The EE runs as uid 1000 (gid 0), as AWX runs it; the job writes its artifacts in the private data dir.
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [dirpath] + [os.path.join(dirpath, n) for n in dirnames + filenames]:
            os.lchown(name, 1000, 0)


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    if os.geteuid() != 0 or shutil.which("docker") is None:
        pytest.skip("the AWX jobs need root and the Docker engine (testbed/bin/build-images)")
    tmp = tmp_path_factory.mktemp("awx")
    os.chmod(tmp, 0o755)
    b = Bed(tmp, "%d" % os.getpid())
    try:
        t0 = time.monotonic()
        b.build("ee")
        b.start()
        b.checkout()
        b.start_sshd()
        if "baileys-dr rehearsal" in SELECTED:
            b.start_db_sshd()
        b.prepare()
        print("AWX test bed ready in %.0f s" % (time.monotonic() - t0))
        yield b
    finally:
        b.teardown()


def test_the_execution_environment_runs_ansible_runner_as_uid_1000_with_the_bundle(bed):
    run = sh("docker", "run", "--rm", bed.images["EE"], "sh", "-c",
             "id -u; ansible-runner --version; ansible --version; pip freeze;"
             " ansible-galaxy collection list community.postgresql 2>/dev/null")
    uid, runner_version = run.stdout.splitlines()[:2]
    with open(os.path.join(ROOT, "execution-environment.yml"), encoding="utf-8") as fh:
        deps = yaml.safe_load(fh)["dependencies"]
    assert uid == "1000"
    assert "ansible-runner==" + runner_version == deps["ansible_runner"]["package_pip"]
    assert "[core %s]" % deps["ansible_core"]["package_pip"].split("==")[1] in run.stdout
    installed = {line.lower().replace("_", "-") for line in run.stdout.splitlines()}
    with open(os.path.join(ROOT, deps["python"]), encoding="utf-8") as fh:
        pins = [line.split("#")[0].strip() for line in fh if line.split("#")[0].strip()]
    for pin in pins:
        assert pin.lower().replace("_", "-") in installed, pin
    assert "community.postgresql" in run.stdout


@pytest.mark.parametrize("template", SELECTED)
def test_the_job_template_passes_under_ansible_runner_in_the_execution_environment(bed, template):
    if template == "baileys-dr failover":
        return concurrent_failover_and_snapshot(bed)
    job = bed.job(template).run()
    assert job.proc.returncode == 0 and job.status == "successful", job.explain()
    print("%s: %.0f s" % (template, job.seconds))
    # AWX's live output callback ran, and so did the project's callbacks the EE enables.
    assert (job.artifacts / "job_events").is_dir() and any((job.artifacts / "job_events").iterdir())
    assert "baileys_dr_sentry callback disabled: no DSN" in job.stdout
    assert bed.lease_files() == [], "every lease is given back"


def concurrent_failover_and_snapshot(bed):
    """Two jobs from two runner containers on one host: the snapshot is refused by the failover's lease."""
    failover = bed.job("baileys-dr failover").start()
    deadline = time.monotonic() + 300
    while "failover-%s.lease" % HOST not in bed.lease_files():
        assert failover.popen.poll() is None, failover.wait().explain()
        assert time.monotonic() < deadline, "no failover lease on the host after 300 s"
        time.sleep(0.2)
    snapshot = bed.job("baileys-dr snapshot").run()
    failover.wait()
    assert snapshot.proc.returncode != 0 and snapshot.status == "failed", snapshot.explain()
    refusal = re.search(r"snapshot on this host refused: failover holds the lease \S+ \(run \w+ \(AWX job (\d+)\)",
                        snapshot.stdout)
    assert refusal, snapshot.explain()
    assert refusal.group(1) == str(failover.job_id)
    assert failover.proc.returncode == 0 and failover.status == "successful", failover.explain()
    print("baileys-dr failover: %.0f s; the concurrent snapshot refused in %.0f s" % (failover.seconds, snapshot.seconds))
    assert bed.lease_files() == [], "every lease is given back"
