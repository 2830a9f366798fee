#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: baileys_fleet_report
short_description: Write the fleet summary of a failover or failback over several application hosts (JSON, JUnit XML, table)
description:
  - Takes one entry per application host of a run of failover.yml or failback.yml (its outcome, RTO, downtime,
    companies, acknowledged writes lost when a writer's ledger was checked, and the failed step with its message) and
    renders the fleet summary as a table, a JSON report and a JUnit XML report (one test case per host, a C(failure)
    element for a host that failed, rolled back or was refused, C(skipped) for a host not run).
  - Writes C(<name>.json) and C(<name>.xml) into O(dest), then the same documents as C(<operation>-fleet-latest.json)
    and C(<operation>-fleet-latest.xml); each file is staged and renamed into place. The JUnit XML comes from the
    project's one writer (C(module_utils/baileys_dr_junit.py)), the rehearsal's too.
  - A failed host does not fail the module; the play fails it afterwards, once the reports are written.
version_added: "0.3.0"
author: baileys-dr contributors
options:
  name:
    description: The run's report files are named after it (letters, digits, C(._-)).
    type: str
    required: true
  dest:
    description: Where the reports go (the control node, as the play delegates it); created 0750 when missing.
    type: path
    required: true
  operation:
    description: The operation of the run.
    type: str
    choices: [failover, failback]
    required: true
  hosts:
    description:
      - "One dict per host, in the order to show: C(host) (required), C(outcome) (ok, check, refused, rolled_back, failed
        or C(not run)), C(started_at) and C(ended_at) (epoch seconds), C(rto_seconds) (start to ready),
        C(downtime_seconds) (stop to ready), C(companies) (how many the run moved), C(scope) (the host's company ids, or
        C(all)), C(writes_lost) (acknowledged writes missing from the store, when a writer's ledger was checked),
        C(failed_step), C(message), C(note)."
    type: list
    elements: dict
    required: true
attributes:
  check_mode:
    support: full
    details: Nothing is written; the report and the table are returned.
  diff_mode:
    support: none
"""

EXAMPLES = r"""
- name: Write the fleet summary on the control node
  baileys_fleet_report:
    dest: ~/.local/state/baileys-dr/reports
    name: failover-fleet-20261207T130000Z
    operation: failover
    hosts:
      - {host: app1, outcome: ok, started_at: 1796648400.0, ended_at: 1796648406.2, rto_seconds: 5.1, downtime_seconds: 1.4,
         companies: 40, scope: [acme, beta]}
      - {host: app2, outcome: rolled_back, failed_step: identities, message: the service on files reports other identities}
  delegate_to: localhost
  run_once: true
"""

RETURN = r"""
json_path:
  description: The JSON report of this run.
  returned: always
  type: str
junit_path:
  description: The JUnit XML report of this run.
  returned: always
  type: str
report:
  description: The JSON report (hosts with their figures, counts by outcome, the fleet's wall time and worst RTO and downtime).
  returned: always
  type: dict
table:
  description: The fleet summary, one line per list item.
  returned: always
  type: list
  elements: str
passed:
  description: Whether every host ran and ended ok (or check).
  returned: always
  type: bool
"""

import datetime
import json

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.baileys_dr_junit import exit_with_report, junit_xml

PASSED = ("ok", "check")
NOT_RUN = "not run"


class ReportError(Exception):
    pass


def _number(entry, key, kind=float):
    value = entry.get(key)
    if value in (None, ""):
        return None
    try:
        return kind(float(value)) if kind is int else round(float(value), 3)
    except (TypeError, ValueError):
        raise ReportError("host %s: %s %r is not a number" % (entry.get("host"), key, value)) from None


def iso_of_epoch(value):
    return datetime.datetime.fromtimestamp(value, datetime.timezone.utc).isoformat(timespec="milliseconds")


def build_host(entry):
    if not isinstance(entry, dict) or not str(entry.get("host") or "").strip():
        raise ReportError("every host entry needs a host name")
    outcome = str(entry.get("outcome") or "failed")
    out = {"host": str(entry["host"]), "outcome": outcome,
           "status": "skipped" if outcome == NOT_RUN else "passed" if outcome in PASSED else "failed"}
    for key in ("started_at", "ended_at", "rto_seconds", "downtime_seconds"):
        out[key] = _number(entry, key)
    out["seconds"] = round(max(0.0, out["ended_at"] - out["started_at"]), 3) if out["started_at"] and out["ended_at"] else None
    out["companies"] = _number(entry, "companies", int)
    scope = entry.get("scope")
    out["scope"] = "all" if scope in (None, "", "all", []) else [str(c) for c in scope] if isinstance(scope, list) else str(scope)
    out["writes_lost"] = _number(entry, "writes_lost", int)
    for key in ("failed_step", "message", "note"):
        out[key] = str(entry.get(key) or "")
    return out


def build_report(params, now):
    hosts = [build_host(entry) for entry in params["hosts"]]
    outcomes = {}
    for host in hosts:
        outcomes[host["outcome"]] = outcomes.get(host["outcome"], 0) + 1
    starts = [h["started_at"] for h in hosts if h["started_at"]]
    ends = [h["ended_at"] for h in hosts if h["ended_at"]]
    worst = lambda key: max((h[key] for h in hosts if h[key] is not None), default=None)  # noqa: E731
    lost = [h["writes_lost"] for h in hosts if h["writes_lost"] is not None]
    return {
        "format": 1,
        "name": params["name"],
        "operation": params["operation"],
        "written_at": iso_of_epoch(now),
        "passed": bool(hosts) and all(h["status"] == "passed" for h in hosts),
        "outcomes": outcomes,
        "failed_hosts": [h["host"] for h in hosts if h["status"] == "failed"],
        "not_run": [h["host"] for h in hosts if h["status"] == "skipped"],
        # The fleet's wall time: the first host's start to the last host's end.
        "seconds": round(max(ends) - min(starts), 3) if starts and ends else 0.0,
        "worst_rto_seconds": worst("rto_seconds"),
        "worst_downtime_seconds": worst("downtime_seconds"),
        "writes_lost": sum(lost) if lost else None,
        "hosts": hosts,
    }


def _fmt(value):
    return "-" if value is None else ("%.1f" % value)


def table(report):
    header = ("Host", "Outcome", "RTO s", "Down s", "Companies", "Writes lost", "Step / message")
    rows = []
    for h in report["hosts"]:
        companies = " ".join(x for x in ("" if h["companies"] is None else str(h["companies"]),
                                          "" if h["scope"] == "all" else "(%d listed)" % len(h["scope"])) if x) or "-"
        # A failure's message names its step already.
        said = h["message"] or h["failed_step"] or h["note"]
        rows.append((h["host"], h["outcome"] if h["status"] != "failed" else h["outcome"].upper(), _fmt(h["rto_seconds"]),
                     _fmt(h["downtime_seconds"]), companies, "-" if h["writes_lost"] is None else str(h["writes_lost"]),
                     said if len(said) <= 100 else said[:97] + "..."))
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    counts = ", ".join("%d %s" % (n, outcome) for outcome, n in sorted(report["outcomes"].items()))
    out.append("%s of %d hosts: %s; wall time %s s, worst RTO %s s, worst downtime %s s%s" % (
        report["operation"], len(report["hosts"]), counts, _fmt(report["seconds"]), _fmt(report["worst_rto_seconds"]),
        _fmt(report["worst_downtime_seconds"]),
        "" if report["writes_lost"] is None else ", acknowledged writes lost %d" % report["writes_lost"]))
    return out


def junit(report):
    cases = []
    for h in report["hosts"]:
        figures = ["%s=%s" % (k, h[k]) for k in ("outcome", "rto_seconds", "downtime_seconds", "companies", "writes_lost")
                   if h[k] is not None]
        scope = "all" if h["scope"] == "all" else ",".join(h["scope"])
        message = h["message"] or h["failed_step"] or h["outcome"]
        cases.append({"classname": "%s.fleet" % report["operation"], "name": h["host"], "seconds": h["seconds"] or 0.0,
                      "status": h["status"], "message": message if h["status"] != "passed" else "",
                      "failure_type": "Host%s" % h["outcome"].title().replace("_", ""),
                      "skipped_message": "not run: a batch before it failed", "output": ", ".join(figures + ["scope=" + scope])})
    properties = [("name", report["name"]), ("operation", report["operation"]), ("passed", json.dumps(report["passed"]))]
    return junit_xml("baileys-dr %s fleet" % report["operation"], "%s fleet" % report["operation"], "control node",
                     report["written_at"], report["seconds"], properties, cases)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            dest=dict(type="path", required=True),
            name=dict(type="str", required=True),
            operation=dict(type="str", choices=["failover", "failback"], required=True),
            hosts=dict(type="list", elements="dict", required=True),
        ),
        supports_check_mode=True,
    )
    exit_with_report(module, build_report, table, "%s-fleet-latest" % module.params["operation"], junit, (ReportError,))

if __name__ == "__main__":
    main()
