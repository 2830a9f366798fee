"""The baileys_dr_report role through real ansible-playbook runs: audit records, metrics, notifications.

Telegram and the webhook are a local HTTP server started by the test; the role runs on localhost with
temporary directories for the audit logs, the textfiles and the cooldown state.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT

ANSIBLE_PLAYBOOK = os.path.join(os.path.dirname(sys.executable), "ansible-playbook")
TOKEN = "987654:AAH-test-bot-token-do-not-leak"
DB_PASSWORD = "db-pw-do-not-leak-4711"
HOOK_SECRET = "hook-secret-do-not-leak"
SECRETS = (TOKEN, DB_PASSWORD, HOOK_SECRET)


class Receiver:
    """A local HTTP server standing in for the Bot API and the webhook; records every request."""

    def __init__(self, status=200):
        self.status = status
        self.requests = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.requests.append({"path": self.path, "type": self.headers.get("Content-Type"),
                                          "json": json.loads(body) if body else None})
                answer = json.dumps({"ok": receiver.status < 300}).encode()
                self.send_response(receiver.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def paths(self):
        return [r["path"] for r in self.requests]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    server = Receiver()
    yield server
    server.close()


def refused_url():
    """A local URL nobody listens on (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return "http://127.0.0.1:%d" % port


PLAYBOOK = """
- name: An operation reported by baileys_dr_report
  hosts: app1
  gather_facts: false
  tasks:
    - name: Run the operation
      block:
        - name: The operation itself
          ansible.builtin.fail:
            msg: "export broke at company00002 (password {{ baileys_dr_db_password }} was refused)"
          when: fail_operation | default(false) | bool
      rescue:
        - name: Keep the cause
          ansible.builtin.set_fact:
            cause: "{{ ansible_failed_result.msg }}"
        - name: Report the failure
          ansible.builtin.include_role:
            name: baileys_dr_report
          vars:
            baileys_dr_report_operation: failover
            baileys_dr_report_outcome: rolled_back
            baileys_dr_report_started_at: "{{ now().timestamp() - 4 }}"
            baileys_dr_report_inputs: {source: live, login_password: "{{ baileys_dr_db_password }}"}
            baileys_dr_report_details: {failed_step: The operation itself, message: "{{ cause }}"}
        - name: Fail with the cause, as the DR roles do
          ansible.builtin.fail:
            msg: "failover failed: {{ cause }}"

    - name: Report the success
      ansible.builtin.include_role:
        name: baileys_dr_report
      vars:
        baileys_dr_report_operation: failover
        baileys_dr_report_outcome: "{{ 'check' if ansible_check_mode else 'ok' }}"
        baileys_dr_report_started_at: "{{ now().timestamp() - 12 }}"
        baileys_dr_report_inputs: {source: live, tag: emergency-file-fallback-v1}
        baileys_dr_report_data_at: "{{ data_at | default('') }}"
        baileys_dr_report_details: {companies: 3}
        baileys_dr_report_metrics: {keys_exported: "{{ keys | default(4500) }}", companies: 3, files_written: null}
"""


@pytest.fixture
def bed(tmp_path):
    """Directories, inventory and playbook of one test; run(...) runs ansible-playbook."""
    (tmp_path / "playbook.yml").write_text(PLAYBOOK)
    (tmp_path / "inventory.yml").write_text(json.dumps({"all": {"hosts": {"app1": {
        "ansible_connection": "local", "ansible_python_interpreter": sys.executable}}}}))
    (tmp_path / "metrics").mkdir()

    class Bed:
        target_audit = tmp_path / "target" / "audit.jsonl"
        controller_audit = tmp_path / "controller" / "audit.jsonl"
        metrics = tmp_path / "metrics"
        prom = tmp_path / "metrics" / "baileys_dr_failover.prom"
        state = tmp_path / "notify"
        app = tmp_path / "app"
        reports = tmp_path / "reports"

        def run(self, *args, telegram=None, webhook=None, env=None, **extra_vars):
            variables = dict(
                baileys_dr_audit_log=str(self.target_audit),
                baileys_dr_controller_audit_log=str(self.controller_audit),
                baileys_dr_metrics_dir=str(self.metrics),
                baileys_dr_notify_state_dir=str(self.state),
                baileys_dr_report_install_client=False,
                baileys_dr_db_password=DB_PASSWORD,
                baileys_dr_notify_telegram_api_url=telegram or "",
                baileys_dr_notify_telegram_bot_token=TOKEN if telegram else "",
                baileys_dr_notify_telegram_chat_id="-100200300" if telegram else "",
                baileys_dr_notify_webhook_url=(webhook + "/hooks/" + HOOK_SECRET) if webhook else "",
                # The retention prunes these: never the machine's own.
                baileys_dr_app_root=str(self.app), baileys_dr_report_dir=str(self.reports),
            )
            variables.update(extra_vars)
            # The project's ansible.cfg, with whatever callbacks it enables kept away from the real audit log.
            environ = {k: v for k, v in os.environ.items() if k not in ("JOB_ID", "SENTRY_DSN", "BAILEYS_DR_SENTRY_DSN")}
            environ.update(ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"), ANSIBLE_NOCOLOR="1",
                           BAILEYS_DR_AUDIT_LOG=str(tmp_path / "callback" / "audit.jsonl"), **(env or {}))
            command = [ANSIBLE_PLAYBOOK, "-i", str(tmp_path / "inventory.yml"), str(tmp_path / "playbook.yml"),
                       "-e", json.dumps(variables)] + list(args)
            return subprocess.run(command, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300)

        def records(self, which):
            path = self.target_audit if which == "target" else self.controller_audit
            return [json.loads(line) for line in path.read_text().splitlines()]

        def samples(self):
            return {(s.name, tuple(sorted(s.labels.items()))): s.value
                    for family in text_string_to_metric_families(self.prom.read_text()) for s in family.samples}

        def everything_written(self):
            """Every file the runs left, as text."""
            texts = []
            for directory, _, files in os.walk(tmp_path):
                for name in files:
                    with open(os.path.join(directory, name), encoding="utf-8", errors="replace") as fh:
                        texts.append(fh.read())
            return "\n".join(texts)

    return Bed()


FAILOVER = (("operation", "failover"),)


def assert_passed(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


def test_a_successful_run_is_audited_on_target_and_control_node_measured_and_notified(bed, receiver):
    result = bed.run(telegram=receiver.url, webhook=receiver.url, env={"JOB_ID": "4242"},
                     data_at="2026-11-28T03:00:00.123456Z")
    assert_passed(result)
    for which in ("target", "controller"):
        (record,) = bed.records(which)
        assert record["operation"] == "failover" and record["outcome"] == "ok" and record["event"] == "run"
        assert record["job_id"] == "4242" and record["user"] and record["hosts"] == ["app1"]
        assert record["inputs"] == {"source": "live", "tag": "emergency-file-fallback-v1"}
        assert 11 < record["duration_seconds"] < 120
        assert record["details"]["figures"]["keys_exported"] == 4500
    assert oct(bed.target_audit.stat().st_mode & 0o777) == "0o600"
    assert oct(bed.controller_audit.stat().st_mode & 0o777) == "0o600"

    samples = bed.samples()
    assert samples[("baileys_dr_last_success_timestamp_seconds", FAILOVER)] > 1.7e9
    assert ("baileys_dr_last_failure_timestamp_seconds", FAILOVER) not in samples
    assert 11 < samples[("baileys_dr_last_run_duration_seconds", FAILOVER)] < 120
    assert samples[("baileys_dr_keys_exported_total", FAILOVER)] == 4500
    assert samples[("baileys_dr_last_run_keys_exported", FAILOVER)] == 4500
    assert samples[("baileys_dr_last_run_companies", FAILOVER)] == 3
    assert samples[("baileys_dr_last_run_outcome", FAILOVER + (("outcome", "ok"),))] == 1
    assert samples[("baileys_dr_last_run_outcome", FAILOVER + (("outcome", "rolled_back"),))] == 0
    assert samples[("baileys_dr_runs_total", FAILOVER + (("outcome", "ok"),))] == 1
    assert samples[("baileys_dr_snapshot_timestamp_seconds", FAILOVER)] == 1795834800  # 2026-11-28T03:00:00Z
    assert samples[("baileys_dr_snapshot_age_seconds", FAILOVER)] > 0
    assert oct(bed.prom.stat().st_mode & 0o777) == "0o644"

    telegram, webhook = receiver.requests
    assert telegram["path"] == "/bot%s/sendMessage" % TOKEN
    assert telegram["json"]["chat_id"] == "-100200300"
    assert telegram["json"]["text"].startswith("baileys-dr failover on app1: OK after ")
    assert "AWX job 4242" in telegram["json"]["text"]
    assert webhook["path"] == "/hooks/" + HOOK_SECRET and webhook["type"] == "application/json"
    assert webhook["json"]["operation"] == "failover" and webhook["json"]["outcome"] == "ok"
    assert webhook["json"]["host"] == "app1" and webhook["json"]["job_id"] == "4242"
    assert webhook["json"]["figures"]["keys_exported"] == 4500


def test_a_failed_run_keeps_the_last_success_and_counters_accumulate(bed):
    assert_passed(bed.run(keys=4500))
    first_success = bed.samples()[("baileys_dr_last_success_timestamp_seconds", FAILOVER)]
    assert_passed(bed.run(keys=300))
    second = bed.samples()
    assert second[("baileys_dr_keys_exported_total", FAILOVER)] == 4800
    assert second[("baileys_dr_last_run_keys_exported", FAILOVER)] == 300
    assert second[("baileys_dr_last_success_timestamp_seconds", FAILOVER)] > first_success

    result = bed.run(fail_operation=True)
    assert result.returncode != 0
    # The operation's own failure message is what the play ends with, after the report.
    assert "failover failed: export broke at company00002" in result.stdout
    after = bed.samples()
    assert after[("baileys_dr_last_success_timestamp_seconds", FAILOVER)] == second[("baileys_dr_last_success_timestamp_seconds", FAILOVER)]
    assert after[("baileys_dr_last_failure_timestamp_seconds", FAILOVER)] > second[("baileys_dr_last_success_timestamp_seconds", FAILOVER)]
    assert after[("baileys_dr_keys_exported_total", FAILOVER)] == 4800
    assert after[("baileys_dr_last_run_outcome", FAILOVER + (("outcome", "rolled_back"),))] == 1
    assert after[("baileys_dr_last_run_outcome", FAILOVER + (("outcome", "ok"),))] == 0
    assert after[("baileys_dr_runs_total", FAILOVER + (("outcome", "ok"),))] == 2
    assert after[("baileys_dr_runs_total", FAILOVER + (("outcome", "rolled_back"),))] == 1
    record = bed.records("target")[-1]
    assert record["outcome"] == "rolled_back" and record["details"]["failed_step"] == "The operation itself"
    assert record["inputs"]["login_password"] == "********"
    assert DB_PASSWORD not in bed.target_audit.read_text() and DB_PASSWORD not in bed.controller_audit.read_text()


def test_the_same_event_within_its_cooldown_is_sent_once(bed, receiver):
    assert_passed(bed.run(telegram=receiver.url, webhook=receiver.url))
    assert_passed(bed.run(telegram=receiver.url, webhook=receiver.url))
    assert len(receiver.requests) == 2  # one Telegram message and one webhook event, not two of each
    # Another outcome is another event.
    bed.run(telegram=receiver.url, webhook=receiver.url, fail_operation=True)
    assert len(receiver.requests) == 4
    assert "ROLLED_BACK" in receiver.requests[2]["json"]["text"]
    # A cooldown of 0 sends every time.
    assert_passed(bed.run(telegram=receiver.url, webhook=receiver.url, baileys_dr_notify_cooldown_seconds=0))
    assert len(receiver.requests) == 6


def test_notifications_only_for_the_configured_outcomes(bed, receiver):
    assert_passed(bed.run(telegram=receiver.url, webhook=receiver.url, baileys_dr_notify_outcomes=["failed", "rolled_back"]))
    assert receiver.requests == []


@pytest.mark.parametrize("failure", ["http_500", "connection_refused"])
def test_a_failed_notification_warns_is_audited_and_never_fails_the_play(bed, failure):
    server = Receiver(status=500) if failure == "http_500" else None
    url = server.url if server else refused_url()
    try:
        result = bed.run("-vvv", telegram=url, webhook=url)
        assert_passed(result)
        output = result.stdout + result.stderr
        assert "[WARNING]: notification of failover|app1|ok through telegram failed" in output
        assert "through webhook failed" in output
        if server:
            assert len(server.requests) == 2 and "HTTP 500" in output
        else:
            assert "no HTTP answer" in output
        for which in ("target", "controller"):
            run_record, failed = bed.records(which)
            assert run_record["event"] == "run" and run_record["outcome"] == "ok"
            assert failed["event"] == "notification_failed" and failed["operation"] == "failover"
            assert [f["channel"] for f in failed["details"]["failures"]] == ["telegram", "webhook"]
        # Nothing was delivered, so nothing is in cooldown: the next run tries again.
        assert not bed.state.exists() or os.listdir(bed.state) == []
        for secret in SECRETS:
            assert secret not in output, "a secret reached stdout at -vvv"
            assert secret not in bed.everything_written(), "a secret reached a file"
    finally:
        if server:
            server.close()


def test_a_report_that_cannot_write_does_not_mask_the_operations_failure(bed, tmp_path):
    # The textfile directory is a file and the audit directory cannot be created: every report write fails.
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    result = bed.run(fail_operation=True, telegram=refused_url(),
                     baileys_dr_metrics_dir=str(blocker), baileys_dr_audit_log=str(blocker / "audit.jsonl"))
    assert result.returncode == 2
    assert "failover failed: export broke at company00002" in result.stdout
    assert "WARNING: metrics of failover not written" in result.stdout


def test_check_mode_writes_and_sends_nothing(bed, receiver):
    result = bed.run("--check", telegram=receiver.url, webhook=receiver.url)
    assert_passed(result)
    assert receiver.requests == []
    assert not bed.target_audit.exists() and not bed.controller_audit.exists()
    assert os.listdir(bed.metrics) == []


def test_the_awx_job_id_extra_var_is_recorded(bed):
    assert_passed(bed.run(awx_job_id=777, awx_user_name="alice"))
    assert bed.records("controller")[0]["job_id"] == "777"


def test_the_snapshot_playbook_at_vvv_reports_and_leaks_no_secret(db, db_params, tmp_path, receiver):
    """playbooks/snapshot.yml against the throwaway cluster, secrets known, output at -vvv."""
    from ansible.module_utils import baileys_dr_testdata as testdata

    testdata.load(db, "report", 2, 30)
    (tmp_path / "app").mkdir()
    (tmp_path / "metrics").mkdir()
    inventory = {"all": {"children": {"baileys_app": {"hosts": {"app1": {
        "ansible_connection": "local", "ansible_python_interpreter": sys.executable}}}}}}
    (tmp_path / "inventory.yml").write_text(json.dumps(inventory))
    variables = dict(
        baileys_dr_app_root=str(tmp_path / "app"), baileys_dr_app_user="root",
        baileys_dr_sessions_dir=str(tmp_path / "app" / "baileys_sessions"),
        baileys_dr_archive_dir=str(tmp_path / "archives"), baileys_dr_state_dir=str(tmp_path / "state"),
        baileys_dr_lock_dir=str(tmp_path / "locks"),
        baileys_dr_audit_log=str(tmp_path / "target" / "audit.jsonl"),
        baileys_dr_controller_audit_log=str(tmp_path / "controller" / "audit.jsonl"),
        baileys_dr_metrics_dir=str(tmp_path / "metrics"), baileys_dr_notify_state_dir=str(tmp_path / "notify"),
        baileys_dr_report_install_client=False,
        baileys_dr_db_host=db_params["login_host"], baileys_dr_db_port=db_params["login_port"],
        baileys_dr_db_name=db_params["login_db"], baileys_dr_db_user=db_params["login_user"],
        baileys_dr_db_password=db_params["login_password"],
        baileys_dr_notify_telegram_api_url=receiver.url, baileys_dr_notify_telegram_bot_token=TOKEN,
        baileys_dr_notify_telegram_chat_id="42",
        baileys_dr_notify_webhook_url=receiver.url + "/hooks/" + HOOK_SECRET,
    )
    environ = {k: v for k, v in os.environ.items() if k not in ("JOB_ID", "SENTRY_DSN", "BAILEYS_DR_SENTRY_DSN")}
    environ.update(ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"), ANSIBLE_NOCOLOR="1",
                   ANSIBLE_CALLBACKS_ENABLED="baileys_dr_audit,ansible.posix.profile_tasks",
                   BAILEYS_DR_AUDIT_LOG=str(tmp_path / "callback" / "audit.jsonl"))
    result = subprocess.run([ANSIBLE_PLAYBOOK, "-vvv", "-i", str(tmp_path / "inventory.yml"),
                             os.path.join(ROOT, "playbooks", "snapshot.yml"), "-e", json.dumps(variables)],
                            cwd=ROOT, env=environ, capture_output=True, text=True, timeout=600)
    assert_passed(result)

    prom = tmp_path / "metrics" / "baileys_dr_snapshot.prom"
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(prom.read_text()) for s in family.samples}
    snapshot = (("operation", "snapshot"),)
    assert samples[("baileys_dr_last_success_timestamp_seconds", snapshot)] > 1.7e9
    assert samples[("baileys_dr_keys_exported_total", snapshot)] >= 60  # 2 companies x 30 keys, plus creds
    assert samples[("baileys_dr_last_run_companies", snapshot)] == 2
    assert 0 <= samples[("baileys_dr_snapshot_age_seconds", snapshot)] < 300
    for audit in (tmp_path / "target" / "audit.jsonl", tmp_path / "controller" / "audit.jsonl"):
        (record,) = [json.loads(line) for line in audit.read_text().splitlines()]
        assert record["operation"] == "snapshot" and record["outcome"] == "ok" and record["hosts"] == ["app1"]
    steps = [json.loads(line) for line in (tmp_path / "callback" / "audit.jsonl").read_text().splitlines()]
    assert steps[-1]["event"] == "playbook_end" and steps[-1]["outcome"] == "ok"
    assert any(s.get("task") == "Refresh the standby copy from PostgreSQL" and s["status"] == "changed"
               and s["role"] == "baileys_snapshot" for s in steps)
    assert [r["path"] for r in receiver.requests] == ["/bot%s/sendMessage" % TOKEN, "/hooks/" + HOOK_SECRET]

    output = result.stdout + result.stderr
    written = "\n".join(open(os.path.join(d, f), encoding="utf-8", errors="replace").read()
                        for d in (str(tmp_path / "target"), str(tmp_path / "controller"), str(tmp_path / "callback"),
                                  str(tmp_path / "metrics"), str(tmp_path / "notify"))
                        for f in os.listdir(d))
    for secret in (db_params["login_password"], TOKEN, HOOK_SECRET):
        assert secret not in output, "a secret reached stdout at -vvv"
        assert secret not in written, "a secret reached an audit log, a metrics or a state file"


def aged(path, days, tree=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir() if tree else path.write_text("{}")
    stamp = time.time() - days * 86400
    os.utime(path, (stamp, stamp))


def test_old_replaced_trees_env_backups_and_reports_are_pruned_after_an_operation(bed):
    for n, days in enumerate((40, 30, 1)):
        aged(bed.app / ("baileys_sessions.before-2026110%dT000000000000Z" % n), days, tree=True)
        aged(bed.app / (".env.%d.2026-11-0%d@00:00:00~" % (100 + n, n + 1)), days)
        for suffix in (".json", ".xml"):
            aged(bed.reports / ("rehearsal-2026110%dT000000Z-app1%s" % (n, suffix)), days)
    aged(bed.app / "baileys_sessions", 90, tree=True)
    aged(bed.reports / "health.json", 90)
    everything = sorted(os.listdir(bed.app)) + sorted(os.listdir(bed.reports))

    # Check mode prunes nothing.
    assert_passed(bed.run("--check", baileys_dr_retention_keep_last=1, baileys_dr_retention_keep_days=7))
    assert sorted(os.listdir(bed.app)) + sorted(os.listdir(bed.reports)) == everything

    assert_passed(bed.run(baileys_dr_retention_keep_last=1, baileys_dr_retention_keep_days=7))
    assert sorted(os.listdir(bed.app)) == [".env.102.2026-11-03@00:00:00~", "baileys_sessions",
                                           "baileys_sessions.before-20261102T000000000000Z"]
    assert sorted(os.listdir(bed.reports)) == ["health.json", "rehearsal-20261102T000000Z-app1.json",
                                               "rehearsal-20261102T000000Z-app1.xml"]

    # Off: nothing more goes, whatever the settings.
    aged(bed.app / "baileys_sessions.before-20260101T000000000000Z", 300, tree=True)
    assert_passed(bed.run(baileys_dr_retention=False, baileys_dr_retention_keep_last=1, baileys_dr_retention_keep_days=0))
    assert "baileys_sessions.before-20260101T000000000000Z" in os.listdir(bed.app)
