#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: baileys_rehearsal_report
short_description: Write the JSON and JUnit XML reports of a DR rehearsal and render its RTO/RPO table
description:
  - Takes the phases a rehearsal ran (each with its start, ready and end times, the age of the data a
    failover used, and the state digests it saw) and computes per phase the duration, the RTO (start to
    ready), the RPO (age of the data the failover used) and whether no key was lost (digests equal to the
    baseline).
  - Writes C(<name>.json) and C(<name>.xml) (JUnit, one testcase per phase, a C(failure) element with the
    message of a failed phase, C(skipped) for phases an earlier failure prevented) into O(dest), then the same
    documents as C(rehearsal-latest.json) and C(rehearsal-latest.xml) for CI; each file is staged and renamed
    into place.
  - Never fails because a phase failed; the play decides (the reports must exist either way).
version_added: "0.1.0"
author: baileys-dr contributors
options:
  dest:
    description: Directory of the reports; created 0750 when missing.
    type: path
    required: true
  name:
    description: Base name of this rehearsal's report files (letters, digits, C(._-)).
    type: str
    required: true
  host:
    description: The application host rehearsed.
    type: str
    required: true
  environment:
    description: The kind of environment (test, staging, production).
    type: str
    default: test
  baseline_digests:
    description: State digests by company id before the rehearsal began (the database's); C(zero_loss) compares with them.
    type: dict
    default: {}
  phases:
    description:
      - "The phases in order, each a dict: C(name) (required), C(kind) (snapshot, failover, failback, verify, database),
        C(status) (passed, failed, skipped), C(started) and C(ended) (epoch seconds), C(ready) (epoch seconds the
        service was ready; default C(ended)), C(message), C(source) (live or standby), C(data_at) (ISO 8601 time of the
        data a failover used), C(armed) (failover phases: whether its arming record held and the preflight skipped the
        checks it covers), C(digests) (by company id), C(writes_acked) (writes the load generator had acknowledged in
        the phase), C(downtime_seconds) (its longest gap between two acknowledged writes in the phase), C(writes_lost) and
        C(writes_checked) (verify phases: acknowledged writes missing from the store, and checked), C(details) (dict kept
        as is)."
    type: list
    elements: dict
    required: true
  rto_targets:
    description: "Target RTO in seconds by phase kind (for example C({failover: 5})); the report says whether each was met. Informational."
    type: dict
    default: {}
attributes:
  check_mode:
    support: full
    details: Nothing is written; the report and the table are returned.
  diff_mode:
    support: none
"""

EXAMPLES = r"""
- name: Write the rehearsal reports
  baileys_rehearsal_report:
    dest: /var/lib/baileys-dr/reports
    name: rehearsal-20261128T210000Z
    host: app1
    baseline_digests: "{{ baseline.digests }}"
    phases:
      - {name: snapshot, kind: snapshot, status: passed, started: 1795900000.1, ended: 1795900002.3}
      - {name: failover (PostgreSQL up), kind: failover, status: passed, started: 1795900002.4, ready: 1795900007.0,
         ended: 1795900007.6, source: live, data_at: "2026-11-28T21:00:03+00:00"}
  register: report

- name: Print the RTO/RPO table
  ansible.builtin.debug:
    msg: "{{ report.table }}"
"""

RETURN = r"""
json_path:
  description: The JSON report of this rehearsal.
  returned: always
  type: str
junit_path:
  description: The JUnit XML report of this rehearsal.
  returned: always
  type: str
report:
  description: The JSON report (phases with seconds, rto_seconds, rpo_seconds, zero_loss; totals; the table).
  returned: always
  type: dict
table:
  description: The RTO/RPO table, one line per list item.
  returned: always
  type: list
  elements: str
passed:
  description: Whether every phase passed.
  returned: always
  type: bool
"""

import datetime
import json

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.baileys_dr_junit import STATUSES, exit_with_report, junit_xml as junit_document

KINDS = ("snapshot", "failover", "failback", "verify", "database")


class ReportError(Exception):
    pass


def epoch_of_iso(value):
    """Epoch seconds of an ISO 8601 time (naive means UTC), or None for an empty value."""
    if value in (None, ""):
        return None
    try:
        parsed = datetime.datetime.fromisoformat(str(value).strip().replace("Z", "+00:00"))
    except ValueError:
        raise ReportError("data_at %r is not an ISO 8601 time" % (value,)) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.timezone.utc)
    return parsed.timestamp()


def iso_of_epoch(value):
    return datetime.datetime.fromtimestamp(value, datetime.timezone.utc).isoformat(timespec="milliseconds")


def _number(phase, key, index, required=True):
    value = phase.get(key)
    if value in (None, ""):
        if required:
            raise ReportError("phases[%d] (%s) has no %s" % (index, phase.get("name"), key))
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ReportError("phases[%d] (%s): %s %r is not a number of seconds" % (index, phase.get("name"), key, value)) from None


def build_phase(phase, index, baseline):
    """One phase of the report: the inputs checked, the figures computed."""
    if not isinstance(phase, dict) or not str(phase.get("name") or "").strip():
        raise ReportError("phases[%d] needs a name" % index)
    kind = phase.get("kind") or "verify"
    status = phase.get("status") or "passed"
    if kind not in KINDS:
        raise ReportError("phases[%d] (%s): kind %r is not one of %s" % (index, phase["name"], kind, ", ".join(KINDS)))
    if status not in STATUSES:
        raise ReportError("phases[%d] (%s): status %r is not one of %s" % (index, phase["name"], status, ", ".join(STATUSES)))
    out = {"name": str(phase["name"]), "kind": kind, "status": status, "message": str(phase.get("message") or "")}
    if status == "skipped":
        return out
    started = _number(phase, "started", index)
    ended = _number(phase, "ended", index, required=status == "passed") or started
    ready = _number(phase, "ready", index, required=False)
    out.update(started_at=iso_of_epoch(started), ended_at=iso_of_epoch(ended), seconds=round(max(0.0, ended - started), 3))
    if kind in ("failover", "failback") and status == "passed":
        out["rto_seconds"] = round(max(0.0, (ready if ready is not None else ended) - started), 3)
        out["rto_measured_to"] = "ready" if ready is not None else "end of phase"
    if kind == "failover":
        out["source"] = phase.get("source") or None
        armed = phase.get("armed")
        # Ansible passes a templated boolean as text.
        out["armed"] = None if armed in (None, "") else str(armed).strip().lower() in ("true", "yes", "1")
        data_at = epoch_of_iso(phase.get("data_at"))
        if data_at is not None:
            out["data_at"] = iso_of_epoch(data_at)
            # The data a failover serves is as old as the moment it was read; a live export reads after the start.
            out["rpo_seconds"] = round(max(0.0, started - data_at), 3)
    digests = phase.get("digests")
    if isinstance(digests, dict) and digests:
        out["companies"] = len(digests)
        if baseline:
            differ = sorted(k for k in set(baseline) | set(digests) if baseline.get(k) != digests.get(k))
            out["zero_loss"] = not differ
            if differ:
                out["digests_differ"] = differ[:20]
    # The load generator's figures (docs/rehearsal.md, "Load generator"): writes acknowledged in the phase, the longest
    # gap between two acknowledged writes in it, and (verify phases) acknowledged writes missing from the store.
    for key, kind in (("writes_acked", int), ("writes_lost", int), ("writes_checked", int), ("downtime_seconds", float)):
        value = phase.get(key)
        if value not in (None, ""):
            try:
                out[key] = kind(value)
            except (TypeError, ValueError):
                raise ReportError("phases[%d] (%s): %s %r is not a number" % (index, phase["name"], key, value)) from None
    if isinstance(phase.get("details"), dict):
        out["details"] = phase["details"]
    return out


def build_report(params, now):
    baseline = params["baseline_digests"] or {}
    phases = [build_phase(p, i, baseline) for i, p in enumerate(params["phases"])]
    failed = [p["name"] for p in phases if p["status"] == "failed"]
    ran = [p for p in phases if p["status"] != "skipped"]
    targets = {}
    for kind, target in (params["rto_targets"] or {}).items():
        measured = [p["rto_seconds"] for p in phases if p["kind"] == kind and "rto_seconds" in p]
        if measured:
            targets[kind] = {"target_seconds": float(target), "worst_seconds": max(measured), "met": max(measured) <= float(target)}
    checked = [p["zero_loss"] for p in phases if "zero_loss" in p]
    # With the writer, zero loss is what its ledger proves: every acknowledged write found in the store.
    checked += [p["writes_lost"] == 0 for p in phases if "writes_lost" in p]
    ledger = [p for p in phases if "writes_lost" in p]
    return {
        "format": 1,
        "name": params["name"],
        "host": params["host"],
        "environment": params["environment"],
        "written_at": iso_of_epoch(now),
        "passed": not failed and bool(ran),
        "failed_phases": failed,
        "zero_loss": bool(checked) and all(checked) and not failed,
        "seconds": round(sum(p.get("seconds", 0.0) for p in ran), 3),
        "baseline": {"companies": len(baseline)},
        "rto_targets": targets,
        "writes": {"acknowledged": sum(p.get("writes_acked", 0) for p in phases),
                   "checked": ledger[-1]["writes_checked"] if ledger and "writes_checked" in ledger[-1] else None,
                   "lost": ledger[-1]["writes_lost"] if ledger else None} if ledger else None,
        "phases": phases,
    }


def _fmt(value, digits=1):
    return "-" if value is None else ("%.*f" % (digits, value))


def junit_xml(report):
    """A test case per phase, through the project's one JUnit writer (module_utils/baileys_dr_junit.py)."""
    cases = []
    for index, phase in enumerate(report["phases"], 1):
        figures = ["%s=%s" % (k, phase[k]) for k in ("rto_seconds", "rpo_seconds", "source", "armed", "data_at", "zero_loss", "writes_acked",
                                                      "writes_lost", "downtime_seconds") if k in phase]
        cases.append({"classname": "rehearsal.%s" % report["host"], "name": "%02d %s" % (index, phase["name"]),
                      "seconds": phase.get("seconds", 0.0), "status": phase["status"], "message": phase["message"],
                      "failure_type": "PhaseFailed", "skipped_message": "not run: an earlier phase failed",
                      "output": ", ".join(figures)})
    properties = [(key, json.dumps(report[key]) if key == "zero_loss" else report[key]) for key in ("name", "environment", "zero_loss")]
    return junit_document("baileys-dr rehearsal", "rehearsal %s" % report["host"], report["host"], report["written_at"],
                          report["seconds"], properties, cases)


def table(report):
    header = ("#", "Phase", "Result", "Time s", "RTO s", "RPO s", "Source", "Armed", "Data as of", "Writes", "Down s", "Lost", "Zero loss")
    rows = []
    for index, p in enumerate(report["phases"], 1):
        zero = {True: "yes", False: "NO"}.get(p.get("zero_loss"), "-")
        if "writes_lost" in p:
            zero = "yes" if p["writes_lost"] == 0 and p.get("zero_loss", True) else "NO"
        rows.append((str(index), p["name"], p["status"].upper() if p["status"] == "failed" else p["status"],
                     _fmt(p.get("seconds")), _fmt(p.get("rto_seconds")), _fmt(p.get("rpo_seconds")),
                     p.get("source") or "-", {True: "yes", False: "no"}.get(p.get("armed"), "-"),
                     (p.get("data_at") or "-")[:19].replace("T", " "),
                     str(p["writes_acked"]) if "writes_acked" in p else "-", _fmt(p.get("downtime_seconds")),
                     str(p["writes_lost"]) if "writes_lost" in p else "-", zero))
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    for kind, t in sorted(report["rto_targets"].items()):
        out.append("%s RTO target %s s: worst %s s, %s" % (kind, _fmt(t["target_seconds"]), _fmt(t["worst_seconds"]),
                                                          "met" if t["met"] else "MISSED"))
    writes = report.get("writes")
    if writes:
        out.append("acknowledged writes lost: %s of %s (the writer's ledger checked against the store at the last verify)" % (
            "-" if writes["lost"] is None else writes["lost"], "-" if writes["checked"] is None else writes["checked"]))
    out.append("rehearsal %s: %s%s" % (report["name"], "PASSED" if report["passed"] else "FAILED (%s)" % ", ".join(report["failed_phases"]),
                                       (", zero loss proven by the writer's ledger" if writes else ", zero loss proven by digests")
                                       if report["zero_loss"] else ""))
    return out


def main():
    module = AnsibleModule(
        argument_spec=dict(
            dest=dict(type="path", required=True),
            name=dict(type="str", required=True),
            host=dict(type="str", required=True),
            environment=dict(type="str", default="test"),
            baseline_digests=dict(type="dict", default={}),
            phases=dict(type="list", elements="dict", required=True),
            rto_targets=dict(type="dict", default={}),
        ),
        supports_check_mode=True,
    )
    exit_with_report(module, build_report, table, "rehearsal-latest", junit_xml, (ReportError,))

if __name__ == "__main__":
    main()
