"""The test bed in containers: a db and an app container of the test-bed images on a network of their own.

Used where a run must reach the application host as production does (over SSH) without Molecule: the AWX job
tests (tests/integration/test_awx_jobs.py, ansible-runner in the execution environment) and the failover over SSH
of the benchmark (bench/ssh_bench.py). Names carry a prefix and a suffix of the caller's, never those of the
Molecule scenarios, so a run beside Molecule (or beside CI) touches nothing of theirs.

    bed = ContainerBed(tmp, "baileys-dr-awx", str(os.getpid()), db_password)
    bed.build("ee"); bed.start(); bed.start_sshd(); bed.prepare(); ...; bed.teardown()
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.dirname(sys.executable)


def sh(*argv, check=True, timeout=600, **kw):
    """Run argv, its output captured as text; a failure raises with the command, exit status and output."""
    run = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, **kw)
    if check and run.returncode != 0:
        raise AssertionError("%s: rc %s\n%s%s" % (" ".join(argv), run.returncode, run.stdout, run.stderr))
    return run


class ContainerBed:
    """A db container (PostgreSQL with the schema) and an app container (the test application under PM2)."""

    def __init__(self, tmp, prefix, suffix, db_password):
        self.tmp = tmp
        self.net = "%s-%s" % (prefix, suffix)
        self.db = "%s-db-%s" % (prefix, suffix)
        self.app = "%s-app-%s" % (prefix, suffix)
        self.db_password = db_password
        self.images = {}
        self.key = None

    # -- set up -------------------------------------------------------------------------------------------------------
    def build(self, *extra_images):
        """The test-bed images (db, app and any of extra_images, e.g. "ee"), built or taken from the cache."""
        out = sh(os.path.join(ROOT, "testbed", "bin", "build-images"), "db", "app", *extra_images, timeout=1800).stdout
        self.images = dict(re.findall(r"^BAILEYS_DR_IMAGE_(\w+)=(\S+)$", out, re.M))
        return self.images

    def start(self):
        sh("docker", "network", "create", self.net)
        sh("docker", "run", "-d", "--name", self.db, "--network", self.net, "-e", "POSTGRES_PASSWORD=" + self.db_password,
           self.images["DB"], "sleep", "infinity")
        sh("docker", "run", "-d", "--name", self.app, "--network", self.net, self.images["APP"])

    def prepare(self, extra_vars=None):
        """Seed PostgreSQL and run the application on it: molecule/shared/prepare_testbed.yml, over docker exec.

        extra_vars: e.g. {"testbed_seed_companies": 1, "testbed_seed_keys_per_company": 1500}."""
        inv = os.path.join(self.tmp, "prepare")
        os.makedirs(inv)
        os.symlink(os.path.join(ROOT, "molecule", "shared", "group_vars"), os.path.join(inv, "group_vars"))
        with open(os.path.join(inv, "hosts.yml"), "w", encoding="utf-8") as fh:
            json.dump({"all": {"children": {"db": {"hosts": {self.db: {}}}, "baileys_app": {"hosts": {self.app: {}}}},
                               "vars": {"ansible_connection": "community.docker.docker"}}}, fh)
        env = dict(os.environ, BAILEYS_DR_MOLECULE_DB_PASSWORD=self.db_password, MOLECULE_EPHEMERAL_DIRECTORY=str(self.tmp),
                   ANSIBLE_PIPELINING="true")
        argv = [os.path.join(VENV_BIN, "ansible-playbook"), "-i", os.path.join(inv, "hosts.yml"),
                "-e", "baileys_dr_db_host_name=" + self.db]
        if extra_vars:
            argv += ["-e", json.dumps(extra_vars)]
        sh(*argv, os.path.join(ROOT, "molecule", "shared", "prepare_testbed.yml"), cwd=ROOT, env=env, timeout=900)

    def start_sshd(self):
        """A key made now, authorized for root on the app container, and its sshd started (the app image has one)."""
        # Made by the container's ssh-keygen: the host needs no OpenSSH client for this.
        self.key = os.path.join(self.tmp, "id_ed25519")
        with open(self.key, "w", encoding="ascii") as fh:
            fh.write(sh("docker", "exec", self.app, "sh", "-ec",
                        "ssh-keygen -q -t ed25519 -N '' -C baileys-dr-test-bed -f /tmp/bed-key; cat /tmp/bed-key").stdout)
        os.chmod(self.key, 0o600)
        with open(self.key + ".pub", "w", encoding="ascii") as fh:
            fh.write(sh("docker", "exec", self.app, "cat", "/tmp/bed-key.pub").stdout)
        sh("docker", "exec", self.app, "sh", "-ec",
           "ssh-keygen -A >/dev/null; install -d -m 0700 /root/.ssh; mv /tmp/bed-key.pub /root/.ssh/authorized_keys;"
           " rm -f /tmp/bed-key; chmod 0600 /root/.ssh/authorized_keys; /usr/sbin/sshd")

    def start_db_sshd(self):
        """An sshd on the db container too, for the same key (the rehearsal stops PostgreSQL on its host). The db
        image has none: Debian's openssh-server is installed now (needs the host's apt mirror)."""
        with open(self.key + ".pub", encoding="ascii") as fh:
            pub = fh.read()
        with open(os.path.join(ROOT, "testbed", "images", "app", "sshd_config"), encoding="utf-8") as fh:
            config = fh.read()
        sh("docker", "exec", self.db, "sh", "-ec",
           "export DEBIAN_FRONTEND=noninteractive; apt-get -q update >/dev/null;"
           " apt-get -q install -y --no-install-recommends openssh-server >/dev/null;"
           " rm -f /etc/ssh/ssh_host_*; install -d -m 0755 /run/sshd; ssh-keygen -A >/dev/null")
        sh("docker", "exec", "-i", self.db, "sh", "-ec", "cat >/etc/ssh/sshd_config.d/baileys-dr.conf", input=config)
        sh("docker", "exec", "-i", self.db, "sh", "-ec",
           "install -d -m 0700 /root/.ssh; cat >/root/.ssh/authorized_keys; chmod 0600 /root/.ssh/authorized_keys;"
           " /usr/sbin/sshd", input=pub)

    # -- use ----------------------------------------------------------------------------------------------------------
    def address(self, container):
        """The container's address on the bed's network (reachable from this host)."""
        out = sh("docker", "inspect", "-f", "{{json .NetworkSettings.Networks}}", container).stdout
        return json.loads(out)[self.net]["IPAddress"]

    def exec(self, container, script, **kw):
        """`sh -ec script` in the container."""
        return sh("docker", "exec", container, "sh", "-ec", script, **kw)

    def teardown(self, *more_containers):
        for name in list(more_containers) + [self.app, self.db]:
            subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)
        subprocess.run(["docker", "network", "rm", self.net], capture_output=True, check=False)
