"""Shared pytest set-up: module imports the Ansible way, and the throwaway cluster."""

from __future__ import annotations

import os
import secrets
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "testbed"))
sys.path.insert(0, os.path.join(ROOT, "library"))
sys.path.insert(0, os.path.join(ROOT, "tests"))

# Modules import their shared code as ansible.module_utils.<name>, as on a target.
import ansible.module_utils  # noqa: E402

if os.path.join(ROOT, "module_utils") not in ansible.module_utils.__path__:
    ansible.module_utils.__path__.append(os.path.join(ROOT, "module_utils"))


@pytest.fixture(scope="session")
def pg_cluster():
    """A PostgreSQL cluster with the application's schema, for the whole session."""
    import pgcluster

    # Not under pytest's tmp_path: its 0700 parents keep the server's account out.
    base = tempfile.mkdtemp(prefix="baileys-dr-pytest-pg-")
    os.chmod(base, 0o755)
    cluster = pgcluster.Cluster(os.path.join(base, "cluster"))
    password = "pw-" + secrets.token_hex(8)
    cluster.start(password)
    cluster.wait_ready()
    cluster.password = password
    yield cluster
    cluster.destroy()
    os.rmdir(base)


@pytest.fixture(scope="session")
def db_params(pg_cluster):
    """Module connection parameters for the cluster's application role."""
    return {
        "login_host": "127.0.0.1",
        "login_port": pg_cluster.port,
        "login_user": "baileys",
        "login_password": pg_cluster.password,
        "login_db": "baileys",
        "connect_timeout": 5,
    }


@pytest.fixture
def db(db_params):
    """A connection to an empty auth-state store; tables are emptied afterwards."""
    from ansible.module_utils.baileys_dr_postgres import connect

    conn = connect(db_params)
    yield conn
    conn.rollback()
    with conn.cursor() as cur:
        cur.execute("TRUNCATE whatsapp_keys, whatsapp_auth")
    conn.commit()
    conn.close()


def running_in_ci():
    """CI=true (or 1/yes), as GitHub Actions, GitLab and AWX-driven pipelines set it."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a skip is a failure that carries the skip's reason.

    Every skip in this suite depends on the machine (root, git, node, a second account); CI is meant to have all of
    them, so a skip there means a promise went untested without anyone noticing. xfail is left alone.
    """
    outcome = yield
    report = outcome.get_result()
    if report.skipped and running_in_ci() and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = "skipped under CI=true (a skip is never silent in CI): %s" % reason
