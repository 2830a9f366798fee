# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Prometheus textfiles (node_exporter textfile collector) written through prometheus_client.

A textfile holds families of gauges and counters. Updating one is read, merge,
render, compare, write: the existing file is parsed with prometheus_client's
parser, the samples given replace (or, for ``increment``, add to) the samples
with the same name and labels, and the result is rendered by prometheus_client
from a CollectorRegistry whose one Collector yields the merged families.
Families and samples are sorted, so the same metrics always give the same text
and "changed" means the text differs.
"""

from __future__ import annotations

import math
import re
import traceback

try:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    HAS_PROMETHEUS_CLIENT = True
    PROMETHEUS_CLIENT_IMPORT_ERROR = None
except ImportError:  # the module reports it with missing_required_lib
    HAS_PROMETHEUS_CLIENT = False
    PROMETHEUS_CLIENT_IMPORT_ERROR = traceback.format_exc()

PREFIX = "baileys_dr_"
TYPES = ("gauge", "counter")
METRIC_NAME_RE = re.compile(r"\A[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
LABEL_NAME_RE = re.compile(r"\A[a-zA-Z_][a-zA-Z0-9_]*\Z")


class MetricsError(ValueError):
    """Bad input or an unusable existing file; the message names it."""


def _number(value, where):
    if isinstance(value, bool) or value is None:
        raise MetricsError("%s: value %r is not a number" % (where, value))
    try:
        return float(value)
    except (TypeError, ValueError):
        raise MetricsError("%s: value %r is not a number" % (where, value))


def validate(metric, index):
    """The checked form of one requested metric: dict(name, type, help, value, labels, increment)."""
    if not isinstance(metric, dict):
        raise MetricsError("metrics[%d] must be a dict, got %r" % (index, metric))
    unknown = set(metric) - {"name", "type", "help", "value", "labels", "increment"}
    if unknown:
        raise MetricsError("metrics[%d]: unknown keys %s" % (index, ", ".join(sorted(unknown))))
    name = metric.get("name")
    where = "metrics[%d] (%s)" % (index, name)
    if not isinstance(name, str) or not METRIC_NAME_RE.match(name):
        raise MetricsError("%s: %r is not a valid Prometheus metric name" % (where, name))
    if not name.startswith(PREFIX):
        raise MetricsError("%s: metric name %r must start with %r" % (where, name, PREFIX))
    kind = metric.get("type", "gauge")
    if kind not in TYPES:
        raise MetricsError("%s: type %r is not one of %s" % (where, kind, ", ".join(TYPES)))
    if kind == "counter" and not name.endswith("_total"):
        raise MetricsError("%s: counter name %r must end with _total" % (where, name))
    if kind == "gauge" and name.endswith("_total"):
        raise MetricsError("%s: gauge name %r must not end with _total (that suffix marks counters)" % (where, name))
    value = _number(metric.get("value"), where)
    if kind == "counter" and not value >= 0:
        raise MetricsError("%s: counter value %r must be zero or positive" % (where, metric.get("value")))
    labels = metric.get("labels") or {}
    if not isinstance(labels, dict):
        raise MetricsError("%s: labels must be a dict, got %r" % (where, labels))
    for label in labels:
        if not isinstance(label, str) or not LABEL_NAME_RE.match(label) or label.startswith("__"):
            raise MetricsError("%s: %r is not a valid label name" % (where, label))
    help_text = metric.get("help") or ""
    if not isinstance(help_text, str) or not help_text.strip():
        raise MetricsError("%s: help must be a non-empty string" % where)
    return {
        "name": name,
        "type": kind,
        "help": help_text.strip(),
        "value": value,
        "labels": {str(k): "" if v is None else str(v) for k, v in labels.items()},
        "increment": bool(metric.get("increment", False)),
    }


def _family_name(name, kind):
    # prometheus_client names a counter family without its _total suffix.
    return name[: -len("_total")] if kind == "counter" else name


def _labels_key(labels):
    return tuple(sorted(labels.items()))


def parse(text, path="the existing file"):
    """{sample name: {"type", "help", "samples": {labels key: value}}} of a textfile's gauges and counters."""
    families = {}
    try:
        parsed = list(text_string_to_metric_families(text))
    except Exception as exc:  # the parser raises ValueError and others on malformed text
        raise MetricsError("%s is not a Prometheus text file (%s); fix or remove it, or use merge=false" % (path, exc))
    for family in parsed:
        if family.type not in ("gauge", "counter", "unknown"):
            raise MetricsError("%s holds %s %r: only gauges and counters are kept; use merge=false to replace it"
                               % (path, family.type, family.name))
        kind = "gauge" if family.type == "unknown" else family.type
        for sample in family.samples:
            if kind == "counter" and not sample.name.endswith("_total"):
                continue  # _created samples: not written by this module
            entry = families.setdefault(sample.name, {"type": kind, "help": family.documentation, "samples": {}})
            entry["samples"][_labels_key(sample.labels)] = float(sample.value)
    return families


def merge(existing, metrics):
    """existing (from parse) with the validated metrics applied; a metric's type and help win."""
    merged = {name: {"type": f["type"], "help": f["help"], "samples": dict(f["samples"])} for name, f in existing.items()}
    for metric in metrics:
        entry = merged.get(metric["name"])
        if entry is None or entry["type"] != metric["type"]:
            entry = merged[metric["name"]] = {"type": metric["type"], "help": metric["help"], "samples": {}}
        entry["help"] = metric["help"]
        key = _labels_key(metric["labels"])
        value = metric["value"]
        if metric["increment"] and key in entry["samples"] and not math.isnan(entry["samples"][key]):
            value += entry["samples"][key]
        entry["samples"][key] = value
    return merged


class _Families(object):
    """A Collector yielding fixed families (prometheus_client calls collect())."""

    def __init__(self, families):
        self.families = families

    def collect(self):
        for family in self.families:
            yield family


def render(merged):
    """The text exposition of merged families, rendered by prometheus_client."""
    families = []
    for name in sorted(merged):
        entry = merged[name]
        family = Metric(_family_name(name, entry["type"]), entry["help"], entry["type"])
        for key in sorted(entry["samples"]):
            family.add_sample(name, dict(key), entry["samples"][key])
        families.append(family)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry)


def samples(merged):
    """Flat list of {name, type, labels, value} for return values."""
    return [{"name": name, "type": merged[name]["type"], "labels": dict(key), "value": merged[name]["samples"][key]}
            for name in sorted(merged) for key in sorted(merged[name]["samples"])]
