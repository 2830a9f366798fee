"""Fixtures and helpers of the fault-injection suite (tests/integration/test_faults_*.py).

Destructive faults (a killed or frozen server, a standby) never touch the
session-wide `pg_cluster` other tests rely on: they get `scratch_cluster`, a
cluster of their own that a test may kill; the `scratch` fixture brings it back
up, empty, before each test that uses it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import stat
import subprocess
import tempfile
import time

import pytest


@pytest.fixture(scope="session")
def scratch_cluster():
    """A throwaway cluster the fault tests may kill, freeze or clone."""
    import pgcluster

    base = tempfile.mkdtemp(prefix="baileys-dr-faults-pg-")
    os.chmod(base, 0o755)
    cluster = pgcluster.Cluster(os.path.join(base, "cluster"))
    cluster.password = "pw-" + secrets.token_hex(8)
    cluster.start(cluster.password)
    cluster.wait_ready()
    yield cluster
    thaw(cluster)
    cluster.destroy()
    with contextlib.suppress(OSError):
        os.rmdir(base)


def server_pids(cluster):
    """The postmaster and every backend/auxiliary process of a cluster."""
    with open(os.path.join(cluster.datadir, "postmaster.pid"), encoding="utf-8") as fh:
        postmaster = int(fh.readline())
    children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True, text=True).stdout.split()
    return [postmaster] + [int(pid) for pid in children]


def freeze(cluster):
    """What `docker pause` does to the database container: every server process stopped (SIGSTOP)."""
    for pid in server_pids(cluster):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)


def thaw(cluster):
    if not os.path.exists(os.path.join(cluster.datadir, "postmaster.pid")):
        return
    for pid in server_pids(cluster):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def kill_server(cluster):
    """The server dies at once (SIGKILL of the postmaster and its backends: no shutdown, no goodbye to clients)."""
    for pid in server_pids(cluster):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while cluster.running() and time.monotonic() < deadline:
        time.sleep(0.1)


def params_of(cluster, **extra):
    return dict({"login_host": "127.0.0.1", "login_port": cluster.port, "login_user": "baileys",
                 "login_password": cluster.password, "login_db": "baileys", "connect_timeout": 5}, **extra)


@pytest.fixture
def scratch(scratch_cluster):
    """The scratch cluster running and empty; (cluster, db params, connection)."""
    from ansible.module_utils.baileys_dr_postgres import connect

    thaw(scratch_cluster)
    if not scratch_cluster.running():
        # A server killed by a test: crash recovery on the next start.
        scratch_cluster.start(scratch_cluster.password)
        scratch_cluster.wait_ready()
    params = params_of(scratch_cluster)
    conn = connect(params)
    with conn.cursor() as cur:
        cur.execute("TRUNCATE whatsapp_keys, whatsapp_auth")
    conn.commit()
    yield scratch_cluster, params, conn
    thaw(scratch_cluster)
    with contextlib.suppress(Exception):
        conn.close()


# -- what "nothing lost" is measured with -------------------------------------------------------------


def database_digests(conn):
    """State digest of every company, as the database holds it."""
    from ansible.module_utils.baileys_dr_store import company_digest, list_companies

    digests = {company: company_digest(conn, company)[0] for company in list_companies(conn)}
    conn.rollback()
    return digests


def tree_digests(path):
    """State digests of a sessions tree, recomputed from its files (fails when the tree does not verify)."""
    from ansible.module_utils.baileys_dr_verify import verify_tree

    checked = verify_tree(str(path), recompute_digests=True)
    assert checked["verified"], checked["problems"][:5]
    return checked["digests"]


def listing(path):
    """Every path below path with type, size, mtime and a content hash (directories: type only, their entries are listed):
    equal listings mean an untouched tree."""
    import hashlib

    found = {}
    for directory, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(directory, name)
            info = os.lstat(full)
            digest, mtime = None, info.st_mtime_ns
            if stat.S_ISDIR(info.st_mode):
                mtime = None  # a lock or staging entry created and removed again is not a change
            elif stat.S_ISREG(info.st_mode):
                with open(full, "rb") as fh:
                    digest = hashlib.sha256(fh.read()).hexdigest()
            found[os.path.relpath(full, path)] = (stat.S_IFMT(info.st_mode), info.st_size if mtime else None, mtime, digest)
    return found


def full_rows(conn):
    """Every row of both tables, JSONB as text, with its timestamps."""
    with conn.cursor() as cur:
        cur.execute("SELECT company_id, key_type, key_id, value::text, created_at, updated_at, expires_at FROM whatsapp_keys "
                    "ORDER BY company_id, key_type COLLATE \"C\", key_id COLLATE \"C\"")
        keys = cur.fetchall()
        cur.execute("SELECT company_id, creds::text, created_at, updated_at FROM whatsapp_auth ORDER BY company_id")
        auth = cur.fetchall()
    conn.rollback()
    return {"keys": keys, "auth": auth}


def execute(conn, *statements):
    with conn.cursor() as cur:
        for statement in statements:
            cur.execute(*statement) if isinstance(statement, tuple) else cur.execute(statement)
    conn.commit()


def wait_until(predicate, timeout=20, what="the condition"):
    """The first true value of predicate(), polled until the deadline (AssertionError naming what after it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out waiting for %s" % what)


def read_json(path):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def refuse_worker_connections(monkeypatch, module):
    """module.connect refuses forked workers as a full server does (too many clients); the module's own process
    connects as always."""
    import psycopg2

    module_pid, real_connect = os.getpid(), module.connect

    def connect(params, **kwargs):
        if os.getpid() != module_pid:
            raise psycopg2.OperationalError("FATAL:  sorry, too many clients already")
        return real_connect(params, **kwargs)

    monkeypatch.setattr(module, "connect", connect)
