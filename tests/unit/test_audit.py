"""The audit log: one durable JSON line per operation, secrets redacted."""

from __future__ import annotations

import json

import baileys_audit
from module_harness import run_module


def test_each_operation_appends_one_record_with_its_duration(tmp_path):
    log = tmp_path / "audit" / "audit.jsonl"
    for outcome in ("ok", "rolled_back"):
        ok, _ = run_module(baileys_audit, dict(path=str(log), operation="failover", outcome=outcome,
                                               started_at="2026-11-28T03:00:00Z", user="ops", inputs={"source": "live"}))
        assert ok
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["outcome"] for r in records] == ["ok", "rolled_back"]
    assert records[0]["duration_seconds"] > 0 and records[0]["user"] == "ops"
    assert oct(log.stat().st_mode & 0o777) == "0o600"


def test_secret_looking_inputs_never_reach_the_log(tmp_path):
    log = tmp_path / "audit.jsonl"
    run_module(baileys_audit, dict(path=str(log), operation="failback", outcome="failed",
                                   inputs={"login_password": "hunter2-secret", "db_url": "postgresql://u:pw-x@h/db",
                                           "nested": {"telegram_token": "123:tok"}, "companies": ["a"]}))
    text = log.read_text()
    assert "hunter2-secret" not in text and "pw-x" not in text and "123:tok" not in text
    assert '"companies": ["a"]' in text


def test_check_mode_writes_no_record(tmp_path):
    log = tmp_path / "audit.jsonl"
    ok, result = run_module(baileys_audit, dict(path=str(log), operation="failover", outcome="ok"), check_mode=True)
    assert ok and result["record"]["outcome"] == "check"
    assert not log.exists()


def test_known_secret_values_are_scrubbed_wherever_they_appear(tmp_path):
    log = tmp_path / "audit.jsonl"
    token = "123456:AAE-bot-token-value"
    ok, result = run_module(baileys_audit, dict(
        path=str(log), operation="failover", outcome="failed", event="notification_failed",
        details={"message": "POST https://api.telegram.org/bot%s/sendMessage: HTTP 500" % token, "status": 500},
        redact_values=[token, "", "ab"]))
    assert ok
    text = log.read_text()
    assert token not in text and token not in json.dumps(result)
    record = json.loads(text)
    assert record["event"] == "notification_failed"
    assert record["details"]["message"] == "POST https://api.telegram.org/bot********/sendMessage: HTTP 500"


def test_records_name_the_target_hosts_and_the_awx_job(tmp_path):
    log = tmp_path / "audit.jsonl"
    run_module(baileys_audit, dict(path=str(log), operation="snapshot", outcome="ok", hosts=["app1", "app2"], job_id="4242"))
    record = json.loads(log.read_text())
    assert record["hosts"] == ["app1", "app2"] and record["job_id"] == "4242" and record["event"] == "run"
