"""The identity guard and the credentials cache through failover.yml on the embedded test bed (issue 17): fresh creds
written over a registered company's in PostgreSQL stop the failover before anything is switched, unless forced for
that company, and so do fresh creds written over a registered company's on files stop the failback before the
database changes; the application's credentials cache is moved aside before the service starts on the restored files."""

from __future__ import annotations

import glob
import json
import os

import pytest

from faults_helpers import wait_until
from test_identity_guard import fresh_creds
from testbed_helpers import testbed  # noqa: F401 (the fixture)

from ansible.module_utils.baileys_dr_identity import CACHE_FILE
from ansible.module_utils.baileys_dr_tree import COMPANY_PREFIX


@pytest.fixture(autouse=True)
def normal_state(testbed):  # noqa: F811
    """Serving on PostgreSQL, no failover in effect (whatever a failed test left)."""
    testbed.back_to_normal()
    yield testbed


def registered_company(bed):
    """(company, its creds.me.id): the first company, paired as the service on PostgreSQL holds it; the standby copy
    refreshed."""
    conn = bed.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT company_id FROM whatsapp_auth ORDER BY company_id LIMIT 1")
            (company,) = cur.fetchone()
            cur.execute("UPDATE whatsapp_auth SET creds = jsonb_set(creds, '{me}', '{\"id\": \"4915550000:3@s.whatsapp.net\"}') "
                        "WHERE company_id = %s AND NOT creds ? 'me'", (company,))
            cur.execute("SELECT creds->'me'->>'id' FROM whatsapp_auth WHERE company_id = %s", (company,))
            (me,) = cur.fetchone()
        conn.commit()
    finally:
        conn.close()
    run = bed.playbook("snapshot.yml")
    assert run.returncode == 0, run.explain()
    return company, me


def test_a_failover_moves_the_credentials_cache_aside_before_the_service_starts_on_files(testbed):  # noqa: F811
    bed = testbed
    cache = os.path.join(bed.app_root, CACHE_FILE)
    wait_until(lambda: os.path.exists(cache), timeout=60, what="the service on PostgreSQL to write its credentials cache")
    with open(cache, "rb") as fh:
        data = fh.read()
    run = bed.playbook("failover.yml")
    assert run.returncode == 0, run.explain()
    moved = run.result("baileys_store_switch")["credentials_cache"]
    assert moved["path"] == cache and os.path.dirname(moved["moved_to"]) == bed.app_root
    assert glob.glob(cache + ".set-aside-*") == [moved["moved_to"]]
    with open(moved["moved_to"], "rb") as fh:
        assert fh.read() == data, "kept as it was"
    assert not os.path.exists(cache), "no cache beside the restored files"
    assert moved["moved_to"] in run.output, "named in the run's output"
    bed.wait_serving("files", complete=False)


def test_fresh_creds_in_postgres_stop_the_failover_before_anything_is_switched_unless_forced(testbed):  # noqa: F811
    bed = testbed
    company, me = registered_company(bed)
    conn = bed.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("UPDATE whatsapp_auth SET creds = %s WHERE company_id = %s", (json.dumps(fresh_creds()), company))
        conn.commit()
    finally:
        conn.close()
    before = (bed.env_file(), bed.git_ref())
    run = bed.playbook("failover.yml")
    assert run.returncode != 0
    assert "company %s: registered credentials would be replaced by unregistered ones" % company in run.output, run.explain()
    assert "me %s" % me in run.output and "me none (unregistered)" in run.output
    assert (bed.env_file(), bed.git_ref()) == before, "nothing switched"
    bed.wait_serving("postgres")

    run = bed.playbook("failover.yml", {"baileys_dr_identity_force_companies": [company]})
    assert run.returncode == 0, run.explain()
    bed.wait_serving("files", complete=False)
    status, doc = bed.health()
    assert doc["identities"][company]["me"] is None, "the forced company's new creds are what the service runs on"


def test_fresh_creds_in_the_files_stop_the_failback_before_the_database_changes_unless_forced(testbed):  # noqa: F811
    bed = testbed
    company, me = registered_company(bed)
    run = bed.playbook("failover.yml")
    assert run.returncode == 0, run.explain()
    bed.wait_serving("files", complete=False)
    # Fresh credentials over the registered company's on files (a store read error answered with initAuthCreds()).
    creds_path = os.path.join(bed.sessions, COMPANY_PREFIX + company, "creds.json")
    with open(creds_path, "w") as fh:
        json.dump(fresh_creds(), fh)
    database_creds = bed.database_digests()["digests"][company]
    before = (bed.env_file(), bed.git_ref())

    run = bed.playbook("failback.yml")
    assert run.returncode != 0
    assert "company %s: registered credentials would be replaced by unregistered ones" % company in run.output, run.explain()
    assert "me %s" % me in run.output and "me none (unregistered)" in run.output
    assert bed.database_digests()["digests"][company] == database_creds, "the database keeps the registered creds"
    assert (bed.env_file(), bed.git_ref()) == before, "nothing switched: the service stays on the files"
    bed.wait_serving("files", complete=False)

    run = bed.playbook("failback.yml", {"baileys_dr_identity_force_companies": [company]})
    assert run.returncode == 0, run.explain()
    bed.wait_serving("postgres", complete=False)
    status, doc = bed.health()
    assert doc["identities"][company]["me"] is None, "the forced company's new creds are what the service runs on"
