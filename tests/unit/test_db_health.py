"""baileys_db_health without a server: thresholds, rating, quantiles, hostile ids, arguments, Prometheus samples."""

from __future__ import annotations

import baileys_db_health
import pytest
from module_harness import run_module

from ansible.module_utils import baileys_dr_health as health
from ansible.module_utils import baileys_dr_metrics


def test_thresholds_merge_over_the_defaults_level_by_level():
    merged = health.merge_thresholds({"latency_p95_seconds": {"warning": 0.05}, "expired_keys": {"critical": "1000"}})
    assert merged["latency_p95_seconds"] == {"warning": 0.05, "critical": 0.5}
    assert merged["expired_keys"] == {"warning": None, "critical": 1000.0}
    assert merged["connections_ratio"] == health.DEFAULT_THRESHOLDS["connections_ratio"]
    # The defaults themselves are never modified.
    assert health.DEFAULT_THRESHOLDS["latency_p95_seconds"] == {"warning": 0.1, "critical": 0.5}


def test_a_level_set_to_null_is_disabled():
    merged = health.merge_thresholds({"companies_without_keys": {"warning": None}})
    assert health.rate(50, merged["companies_without_keys"]) == "healthy"


def test_the_defaults_carry_the_original_dashboards_alerts():
    """Over 500 ms per query, over 80 % of the pool, over 5 waiting."""
    levels = health.DEFAULT_THRESHOLDS
    assert health.rate(0.501, levels["latency_p95_seconds"]) == "critical"
    assert health.rate(0.5, levels["latency_p95_seconds"]) == "warning"
    assert health.rate(0.81, levels["connections_ratio"]) == "warning"
    assert health.rate(0.8, levels["connections_ratio"]) == "healthy"
    assert health.rate(6, levels["waiting_locks"]) == "warning"
    assert health.rate(5, levels["waiting_locks"]) == "healthy"


@pytest.mark.parametrize("overrides, message", [
    ({"nope": {}}, "thresholds: unknown check 'nope'"),
    ({"waiting_locks": []}, "thresholds.waiting_locks must be a dict"),
    ({"waiting_locks": {"warn": 1}}, "thresholds.waiting_locks: unknown level 'warn'"),
    ({"waiting_locks": {"warning": True}}, "thresholds.waiting_locks.warning must be a number or null"),
    ({"waiting_locks": {"critical": "nan"}}, "thresholds.waiting_locks.critical must be a number or null"),
    ({"waiting_locks": {"warning": 30}}, "thresholds.waiting_locks: warning (30.0) is above critical (20)"),
])
def test_bad_thresholds_are_refused_naming_the_input(overrides, message):
    with pytest.raises(health.HealthArgumentError) as err:
        health.merge_thresholds(overrides)
    assert message in str(err.value)


def test_overall_status_is_the_worst():
    assert health.worst(["healthy", "warning", "healthy"]) == "warning"
    assert health.worst(["warning", "critical"]) == "critical"
    assert health.worst([]) == "healthy"


def test_quantiles_are_nearest_rank_and_ordered():
    values = sorted([0.001 * i for i in range(1, 21)])
    assert health.quantile(values, 0.5) == pytest.approx(0.010)
    assert health.quantile(values, 0.95) == pytest.approx(0.019)
    assert health.quantile(values, 0.99) == pytest.approx(0.020)
    assert health.quantile([0.3], 0.5) == health.quantile([0.3], 0.99) == 0.3
    assert health.quantile([], 0.5) is None


def test_hostile_company_ids_are_escaped_and_shortened_for_reports():
    assert health.shown("company-1_ok") == "company-1_ok"
    assert health.shown("a\nb") == '"a\\nb"'
    assert "\x1b" not in health.shown("\x1b[31mred")
    long = health.shown("x" * 300)
    assert len(long) == 80 and long.endswith('..."')


@pytest.mark.parametrize("args, message", [
    ({"probes": 0}, "probes must be 1 or more"),
    ({"probes": 10001}, "probes must be 10000 or less"),
    ({"sample_size": -1}, "sample_size must be 0 or more"),
    ({"thresholds": {"latency": {}}}, "thresholds: unknown check 'latency'"),
    ({"expected_role": "replica"}, "expected_role"),
])
def test_bad_arguments_fail_the_task_before_connecting(args, message):
    ok, result = run_module(baileys_db_health, dict(args, login_host="127.0.0.1", login_port=9, login_password="s3cret-pw"))
    assert not ok and message in result["msg"]
    assert "s3cret-pw" not in result["msg"]


def _unreachable_result():
    checker = health.DbHealth({"thresholds": {}, "protected_types": list(health.PROTECTED_TYPES)})
    checker.result.update(reachable=False, checked_at=1700000000.0, status="critical", duration_seconds=0.01)
    checker._check("reachability", 0, "down", levels={}, status="critical")
    return checker


def test_samples_of_an_unreachable_server_render_through_baileys_metrics():
    """The module's samples are exactly what baileys_metrics (and prometheus_client) accept."""
    metrics = _unreachable_result().metrics()
    wanted = [baileys_dr_metrics.validate(m, i) for i, m in enumerate(metrics)]
    text = baileys_dr_metrics.render(baileys_dr_metrics.merge({}, wanted)).decode()
    assert "baileys_dr_db_up 0.0" in text
    assert 'baileys_dr_health_status{check="overall"} 2.0' in text
    assert 'baileys_dr_health_status{check="reachability"} 2.0' in text
    assert "baileys_dr_health_last_run_timestamp_seconds 1.7e+09" in text


def test_samples_of_a_full_result_render_through_baileys_metrics():
    checker = health.DbHealth({"thresholds": {}, "protected_types": ["pre-key"]})
    checker.result.update(
        reachable=True, checked_at=1700000000.0, status="healthy", duration_seconds=0.2,
        server={"in_recovery": False, "replay_lag_seconds": None, "database_size_bytes": 8e6, "max_connections": 100},
        latency={"p50_seconds": 0.001, "p95_seconds": 0.002, "p99_seconds": 0.003, "avg_seconds": 0.0015, "probes": 20},
        connections={"by_application": [{"application": "baileys-whatsapp-service", "state": "idle", "count": 3},
                                        {"application": "", "state": "unknown", "count": 1}]},
        locks={"waiting": 0, "longest_wait_seconds": 0.0},
        keys={"by_type": {"pre-key": 10, "(unknown)": 1}, "age_buckets": {"0-1d": 11}, "expired": 0, "protected": 10,
              "expired_protected": 0},
        companies={"total": 2, "without_keys": 0, "keys_without_creds": {"companies": 0, "keys": 0}},
        tables={"whatsapp_keys": {"size_bytes": 8192, "indexes_size_bytes": 16384, "live_tuples": 11, "dead_tuples": 0,
                                  "last_vacuum": None, "last_autovacuum": 1699999000.0, "last_analyze": None,
                                  "last_autoanalyze": 1699999000.0, "vacuum_count": 0, "autovacuum_count": 2,
                                  "analyze_count": 0, "autoanalyze_count": 3, "indexes": {"whatsapp_keys_pkey": 16384}}},
    )
    checker._check("reachability", 1, "up", levels={}, status="healthy")
    metrics = checker.metrics()
    wanted = [baileys_dr_metrics.validate(m, i) for i, m in enumerate(metrics)]
    text = baileys_dr_metrics.render(baileys_dr_metrics.merge({}, wanted)).decode()
    assert 'baileys_dr_db_latency_seconds{quantile="0.95"} 0.002' in text
    assert 'baileys_dr_db_connections{application="baileys-whatsapp-service",state="idle"} 3.0' in text
    assert 'baileys_dr_keys{key_type="(unknown)"} 1.0' in text
    assert 'baileys_dr_table_vacuums_total{kind="auto",table="whatsapp_keys"} 2.0' in text
    assert 'baileys_dr_index_size_bytes{index="whatsapp_keys_pkey",table="whatsapp_keys"} 16384.0' in text
    # A vacuum that never happened has no sample (not a 1970 timestamp).
    assert 'baileys_dr_table_last_vacuum_timestamp_seconds{kind="manual"' not in text
    assert "baileys_dr_db_replay_lag_seconds" not in text
