#!/usr/bin/env python3
"""Throwaway PostgreSQL cluster for the embedded default and the pytest suite.

One implementation serves both: the `testbed_postgres` role calls
`testbed/bin/pg-cluster`, tests/conftest.py imports this module.

initdb refuses to run as root, so as root the cluster runs as an
unprivileged account (`postgres` by default). Local (socket) connections are
trusted inside a 0700 socket directory; TCP on 127.0.0.1 needs a password.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SCHEMA = os.path.join(HERE, "schema.sql")
APP_ROLE = "baileys"
APP_DB = "baileys"


class ClusterError(RuntimeError):
    pass


def find_bindir():
    """Directory of initdb/pg_ctl: PG_BINDIR, else the newest Debian install, else PATH."""
    candidates = [os.environ.get("PG_BINDIR", "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True)
    for path in candidates:
        if path and os.path.isfile(os.path.join(path, "initdb")):
            return path
    initdb = shutil.which("initdb")
    if initdb:
        return os.path.dirname(os.path.realpath(initdb))
    raise ClusterError(
        "no PostgreSQL server binaries (initdb) found: install Debian's 'postgresql' package "
        "(scripts/bootstrap does) or set PG_BINDIR"
    )


def free_port():
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    """A PostgreSQL cluster in `datadir` listening on 127.0.0.1:`port`."""

    def __init__(self, base, port=None, os_user="postgres"):
        self.base = os.path.abspath(base)
        self.datadir = os.path.join(self.base, "data")
        self.rundir = os.path.join(self.base, "run")
        self.logfile = os.path.join(self.base, "postgres.log")
        self.state_file = os.path.join(self.base, "cluster.json")
        self.os_user = os_user if os.geteuid() == 0 else None
        self.bindir = find_bindir()
        saved = self._load_state()
        self.port = port or saved.get("port") or free_port()

    # -- plumbing -----------------------------------------------------------------
    def _load_state(self):
        try:
            with open(self.state_file, encoding="utf-8") as fh:
                return json.load(fh)
        except FileNotFoundError:
            return {}

    def _as_owner(self, argv, **kwargs):
        if self.os_user:
            argv = ["runuser", "-u", self.os_user, "--"] + argv
        kwargs.setdefault("check", True)
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        try:
            return subprocess.run(argv, **kwargs)
        except subprocess.CalledProcessError as exc:
            raise ClusterError("%s failed (exit %s): %s" % (os.path.basename(argv[argv.index("--") + 1] if "--" in argv else argv[0]), exc.returncode, (exc.stderr or exc.stdout or "").strip())) from None

    def _chown(self, path):
        if self.os_user:
            entry = pwd.getpwnam(self.os_user)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _bin(self, name):
        return os.path.join(self.bindir, name)

    def psql(self, sql, db="postgres", user="postgres", variables=None):
        argv = [self._bin("psql") if os.path.exists(self._bin("psql")) else "psql",
                "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", self.rundir, "-p", str(self.port), "-U", user, "-d", db, "-At"]
        for name, value in (variables or {}).items():
            argv += ["-v", "%s=%s" % (name, value)]
        return self._as_owner(argv, input=sql).stdout

    # -- lifecycle ------------------------------------------------------------------
    @property
    def initialised(self):
        return os.path.isfile(os.path.join(self.datadir, "PG_VERSION"))

    def running(self):
        if not self.initialised:
            return False
        result = self._as_owner([self._bin("pg_ctl"), "-D", self.datadir, "status"], check=False)
        return result.returncode == 0

    def init(self, password):
        os.makedirs(self.base, mode=0o755, exist_ok=True)
        if self.os_user and self._as_owner(["test", "-x", self.base], check=False).returncode != 0:
            raise ClusterError("the account %s cannot reach %s: every parent directory must be traversable by it" % (self.os_user, self.base))
        for path in (self.datadir, self.rundir):
            os.makedirs(path, mode=0o700, exist_ok=True)
            self._chown(path)
        pwfile = os.path.join(self.rundir, ".pw")
        with open(os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8") as fh:
            fh.write(password)
        self._chown(pwfile)
        try:
            self._as_owner([self._bin("initdb"), "-D", self.datadir, "-U", "postgres", "--pwfile", pwfile,
                            "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8"])
        finally:
            os.unlink(pwfile)
        with open(os.path.join(self.datadir, "postgresql.auto.conf"), "a", encoding="utf-8") as fh:
            fh.write("listen_addresses = '127.0.0.1'\nunix_socket_directories = '%s'\n"
                     "fsync = on\nmax_connections = 50\nshared_buffers = '128MB'\n" % self.rundir)

    def start(self, password):
        """Start (initialising when needed). Returns True when something changed."""
        changed = False
        if not self.initialised:
            self.init(password)
            changed = True
        if not self.running():
            if not os.path.exists(self.logfile):
                open(self.logfile, "a").close()
                self._chown(self.logfile)
            self._as_owner([self._bin("pg_ctl"), "-D", self.datadir, "-l", self.logfile, "-w", "-t", "60",
                            "-o", "-p %d" % self.port, "start"])
            changed = True
        if self._ensure_app_database(password):
            changed = True
        with open(self.state_file, "w", encoding="utf-8") as fh:
            json.dump({"port": self.port, "datadir": self.datadir, "socket_dir": self.rundir}, fh)
        return changed

    def _ensure_app_database(self, password):
        exists = self.psql("SELECT 1 FROM pg_database WHERE datname = '%s'" % APP_DB).strip() == "1"
        # The password goes through a psql variable so it is quoted by psql, never logged.
        self.psql(
            "SELECT format('CREATE ROLE %I LOGIN', :'role') WHERE NOT EXISTS "
            "(SELECT 1 FROM pg_roles WHERE rolname = :'role') \\gexec\n"
            "SELECT format('ALTER ROLE %I PASSWORD %L', :'role', :'pw') \\gexec\n"
            "GRANT pg_monitor TO " + APP_ROLE + ";\n",
            variables={"role": APP_ROLE, "pw": password},
        )
        if not exists:
            self.psql("CREATE DATABASE %s OWNER %s" % (APP_DB, APP_ROLE))
        with open(SCHEMA, encoding="utf-8") as fh:
            self.psql(fh.read(), db=APP_DB, user=APP_ROLE)
        return not exists

    def stop(self):
        if not self.running():
            return False
        self._as_owner([self._bin("pg_ctl"), "-D", self.datadir, "-m", "fast", "-w", "stop"])
        return True

    def destroy(self):
        self.stop()
        existed = os.path.exists(self.base)
        shutil.rmtree(self.base, ignore_errors=True)
        return existed

    def wait_ready(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            time.sleep(0.2)
        raise ClusterError("PostgreSQL did not accept connections on 127.0.0.1:%d within %ds; see %s" % (self.port, timeout, self.logfile))

    def info(self):
        return {"host": "127.0.0.1", "port": self.port, "database": APP_DB, "user": APP_ROLE,
                "datadir": self.datadir, "socket_dir": self.rundir, "log": self.logfile, "running": self.running()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("start", "stop", "status", "destroy"))
    parser.add_argument("--dir", required=True, help="base directory of the cluster")
    parser.add_argument("--port", type=int, help="TCP port (default: the one used before, else a free one)")
    parser.add_argument("--password-file", help="file holding the application role's password (start)")
    parser.add_argument("--os-user", default="postgres", help="account the server runs as when started by root")
    args = parser.parse_args(argv)
    try:
        cluster = Cluster(args.dir, port=args.port, os_user=args.os_user)
        changed = False
        if args.action == "start":
            if not args.password_file:
                parser.error("start needs --password-file")
            with open(args.password_file, encoding="utf-8") as fh:
                password = fh.read().strip()
            changed = cluster.start(password)
            cluster.wait_ready()
        elif args.action == "stop":
            changed = cluster.stop()
        elif args.action == "destroy":
            changed = cluster.destroy()
            print(json.dumps({"changed": changed}))
            return 0
        print(json.dumps(dict(cluster.info(), changed=changed)))
        return 0
    except ClusterError as exc:
        print(json.dumps({"failed": True, "msg": str(exc)}))
        print("pg-cluster: %s" % exc, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
