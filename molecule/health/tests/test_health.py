"""health.yml on the container test bed: the JSON report and the Prometheus textfile describe the store."""

import json
import os
import sys

from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "shared"))

from verify_helpers import database_digests  # noqa: E402

testinfra_hosts = ["ansible://baileys-dr-app"]
REPORT = "/var/lib/baileys-dr/reports/health.json"
TEXTFILE = "/var/lib/baileys-dr/metrics/baileys_dr_db_health.prom"


def report(host):
    return json.loads(host.file(REPORT).content_string)


def samples(host):
    text = host.file(TEXTFILE).content_string
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def test_the_report_is_private_to_root_and_its_group(host):
    report_file = host.file(REPORT)
    assert report_file.mode == 0o640 and report_file.user == "root"


def test_the_report_describes_the_seeded_store(host):
    data = report(host)
    assert data["reachable"] and data["status"] in ("healthy", "warning"), data["checks"]
    assert data["checks"]["role"]["value"] == "primary"
    assert data["keys"]["total"] == 1200
    assert data["companies"]["total"] == len(database_digests()) == 4
    assert data["companies"]["without_keys"] == 0 and data["companies"]["keys_without_creds"]["companies"] == 0
    latency = data["latency"]
    assert latency["probes"] == 20 and latency["p50_seconds"] <= latency["p95_seconds"] <= latency["p99_seconds"]
    assert "baileys-dr-health" in {c["application"] for c in data["connections"]["by_application"]}
    assert data["fails_play"] is False


def test_the_textfile_holds_the_same_figures_for_node_exporter(host):
    assert host.file(TEXTFILE).mode == 0o644
    found = samples(host)
    by_name = {}
    for sample in found:
        by_name.setdefault(sample.name, []).append(sample)
    assert all(name.startswith("baileys_dr_") for name in by_name)
    assert by_name["baileys_dr_db_up"][0].value == 1
    assert sum(s.value for s in by_name["baileys_dr_keys"]) == 1200
    assert by_name["baileys_dr_companies"][0].value == 4
    overall = [s for s in by_name["baileys_dr_health_status"] if s.labels["check"] == "overall"][0]
    assert overall.value == {"healthy": 0, "warning": 1}[report(host)["status"]]
    assert {s.labels["quantile"] for s in by_name["baileys_dr_db_latency_seconds"]} == {"0.5", "0.95", "0.99"}


def test_no_temporary_file_is_left_beside_the_reports(host):
    leftovers = host.run("find /var/lib/baileys-dr/reports /var/lib/baileys-dr/metrics -type f ! -name '*.json' ! -name '*.prom'")
    assert leftovers.stdout.strip() == ""
