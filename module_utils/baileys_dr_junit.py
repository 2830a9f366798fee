# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one JUnit XML writer of the project: the rehearsal's report (a test case per phase) and the fleet summary of
failover.yml and failback.yml (a test case per host) both write through it, so CI reads them the same way."""

from __future__ import annotations

import json
import os
import re
import time
import xml.etree.ElementTree as ET

from ansible.module_utils.baileys_dr_fs import write_file_atomic

STATUSES = ("passed", "failed", "skipped")
# A report's base name: it names files.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Characters XML 1.0 cannot carry at all, even escaped.
_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def clean(text):
    return _XML_ILLEGAL.sub("?", str(text))


def junit_xml(title, suite, hostname, timestamp, seconds, properties, cases):
    """One <testsuites> with one <testsuite>.

    properties: [(name, value)]; cases: dicts with classname, name, seconds, status (passed, failed, skipped),
    message, failure_type, skipped_message (the default text of a skipped case) and output (the system-out text,
    none when empty)."""
    counts = {s: sum(1 for c in cases if c["status"] == s) for s in STATUSES}
    attrs = {"tests": str(len(cases)), "failures": str(counts["failed"]), "errors": "0",
             "skipped": str(counts["skipped"]), "time": "%.3f" % seconds}
    suites = ET.Element("testsuites", dict(attrs, name=title))
    node = ET.SubElement(suites, "testsuite", dict(attrs, name=clean(suite), hostname=clean(hostname), timestamp=timestamp))
    props = ET.SubElement(node, "properties")
    for key, value in properties:
        ET.SubElement(props, "property", name=key, value=clean(value))
    for case in cases:
        element = ET.SubElement(node, "testcase", classname=clean(case["classname"]), name=clean(case["name"]),
                                time="%.3f" % case.get("seconds", 0.0))
        message = case.get("message") or ""
        if case["status"] == "failed":
            failure = ET.SubElement(element, "failure", message=clean(message[:1000] or "failed"), type=case.get("failure_type") or "Failed")
            failure.text = clean(message or "failed")
        elif case["status"] == "skipped":
            ET.SubElement(element, "skipped", message=clean(message or case.get("skipped_message") or "skipped"))
        if case.get("output"):
            ET.SubElement(element, "system-out").text = clean(case["output"])
    ET.indent(suites)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="utf-8") + b"\n"


def write_reports(dest, name, latest, report, junit, check_mode):
    """A report's JSON and JUnit XML documents as <dest>/<name>.json and .xml, then as <latest>.json and .xml for CI,
    each staged and renamed into place (nothing in check mode); {json_path, junit_path}. ValueError for a name that
    cannot name a file."""
    if not NAME_RE.match(name):
        raise ValueError("name %r must be letters, digits, '.', '_' or '-' (it names files)" % name)
    paths = {"json_path": os.path.join(dest, name + ".json"), "junit_path": os.path.join(dest, name + ".xml")}
    if check_mode:
        return paths
    os.makedirs(dest, mode=0o750, exist_ok=True)
    documents = {".json": (json.dumps(report, indent=2) + "\n").encode("utf-8"), ".xml": junit(report)}
    for suffix, data in documents.items():
        write_file_atomic(os.path.join(dest, name + suffix), data, mode=0o640)
        write_file_atomic(os.path.join(dest, latest + suffix), data, mode=0o640)
    return paths


def exit_with_report(module, build_report, table, latest, junit, errors=()):
    """The end of a report module: the report built from its params at this moment, its console table, its JSON and
    JUnit files (write_reports); exit_json with them, or fail_json naming what is wrong (errors: the module's own
    exception classes for bad input)."""
    params = module.params
    try:
        report = build_report(params, time.time())
        report["table"] = table(report)
        paths = write_reports(params["dest"], params["name"], latest, report, junit, module.check_mode)
    except (ValueError, OSError) + tuple(errors) as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(**dict(paths, changed=True, report=report, table=report["table"], passed=report["passed"]))
