"""The pre-armed failover on the embedded test bed (issue 16): a standby refresh arms the host, failover.yml confirms the
record and goes straight to the switch; a record that no longer holds runs the full preflight and says why."""

from __future__ import annotations

import json
import os
import time

import pytest

from faults_helpers import wait_until
from testbed_helpers import testbed  # noqa: F401 (the fixture)

TAG_CHECK = "Verify the emergency tag"
STANDBY_CHECK = "Verify the standby copy against its manifests"
NOT_ARMED = "Not armed, running the full preflight"


@pytest.fixture(autouse=True)
def normal_state(testbed):  # noqa: F811
    """Serving on PostgreSQL, no failover in effect (whatever a failed test left)."""
    testbed.back_to_normal()
    yield testbed


def record_path(bed):
    return os.path.join(os.path.dirname(bed.state_file), "failover-arming.json")


def read_record(bed):
    with open(record_path(bed), encoding="utf-8") as fh:
        return json.load(fh)


def ran(run, task_part):
    """Whether a task named like task_part ran (not skipped)."""
    return any(task_part in name and event != "v2_runner_on_skipped" for name, event, _, _, _ in run.tasks())


def refresh(bed):
    run = bed.playbook("snapshot.yml")
    assert run.returncode == 0, run.explain()
    record = read_record(bed)
    assert record["armed"] and record["problems"] == [], record
    return record


def test_an_armed_failover_goes_straight_to_the_switch_and_a_stale_record_runs_the_full_preflight_saying_why(testbed):  # noqa: F811
    bed = testbed
    record = refresh(bed)
    assert record["tag"]["commit"] == bed.git("rev-parse", "emergency-file-fallback-v1^{commit}")

    armed = bed.playbook("failover.yml", {"baileys_failover_source": "standby"})
    assert armed.returncode == 0, armed.explain()
    assert armed.result("baileys_failover_arming")["armed"] is True
    assert not ran(armed, TAG_CHECK) and not ran(armed, STANDBY_CHECK) and not ran(armed, NOT_ARMED), \
        "the checks the record covers are skipped"
    assert armed.result("baileys_store_switch")["store"] == "files"
    audit = bed.audit_records("failover")[-1]
    assert audit["outcome"] == "ok" and audit["details"]["armed"] in (True, "True", "true"), audit["details"]
    assert audit["details"]["companies"] in (2, "2"), "the standby digests come from the record's manifest"
    bed.wait_serving("files", complete=False)

    back = bed.playbook("failback.yml")
    assert back.returncode == 0, back.explain()
    bed.wait_serving("postgres")

    # The record of a new refresh, then a limit it has outlived: the refresh job stopped, as far as the failover knows.
    refresh(bed)
    wait_until(lambda: time.time() - read_record(bed)["checked_at_epoch"] > 2, timeout=30, what="the record to be 2 s old")
    stale = bed.playbook("failover.yml", {"baileys_failover_source": "standby", "baileys_dr_arming_max_age": 1})
    assert stale.returncode == 0, stale.explain()
    verified = stale.result("baileys_failover_arming")
    assert verified["armed"] is False and any("older than max_age 1 s" in r for r in verified["reasons"]), verified
    assert ran(stale, NOT_ARMED) and "older than max_age 1 s" in stale.output, "the reason is printed"
    assert ran(stale, TAG_CHECK) and ran(stale, STANDBY_CHECK), "the full preflight ran"
    audit = bed.audit_records("failover")[-1]
    assert audit["outcome"] == "ok" and audit["details"]["armed"] in (False, "False", "false"), audit["details"]
    assert any("older than max_age" in r for r in audit["details"]["arming_reasons"]), audit["details"]
    bed.wait_serving("files", complete=False)
