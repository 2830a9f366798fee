"""The Sentry callback end to end: real ansible-playbook runs, real sentry-sdk, a local ingest server.

The ingest (tests/sentry_ingest.py) decompresses and parses the envelopes the SDK really sends; the
assertions read the events, breadcrumbs and check-ins out of them, and search every byte received for
the secrets the playbooks handle.
"""

from __future__ import annotations

import gzip
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import zlib

import pytest

from conftest import ROOT
from pgcluster import free_port
from sentry_ingest import IngestServer, parse_envelope

PLAYBOOKS = os.path.join(ROOT, "tests", "integration", "playbooks", "sentry")
ANSIBLE_PLAYBOOK = os.path.join(os.path.dirname(sys.executable), "ansible-playbook")
# Known secrets: one only a no_log task sees, one put into a failure message, one in the environment,
# one in the inventory (baileys_dr_db_password of playbooks/sentry/inventory.yml).
NO_LOG_SECRET = "nolog-" + secrets.token_hex(8)
MESSAGE_SECRET = "msg-" + secrets.token_hex(8)
ENV_SECRET = "env-" + secrets.token_hex(8)
INVENTORY_SECRET = "inventory-pw-5f1c2e9a7b"
# A real DSN key is 32 hex digits: distinctive enough to search every byte for.
PUBLIC_KEY = secrets.token_hex(16)
WARNING = "baileys_dr_sentry callback disabled"


@pytest.fixture(scope="module")
def ingest():
    server = IngestServer(public_key=PUBLIC_KEY).start()
    yield server
    server.stop()


def run_playbook(playbook, *args, dsn=None, env=None, cwd=ROOT, verbosity="-vvv"):
    """ansible-playbook from the venv with only this callback enabled, as an operator would run it."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SENTRY_", "BAILEYS_DR_SENTRY_"))}
    environ.update(
        ANSIBLE_CALLBACKS_ENABLED="baileys_dr_sentry",
        ANSIBLE_CALLBACK_PLUGINS=os.path.join(ROOT, "callback_plugins"),
        ANSIBLE_NOCOLOR="1",
        DRILL_API_TOKEN=ENV_SECRET,
    )
    if dsn:
        environ["BAILEYS_DR_SENTRY_DSN"] = dsn
    environ.update(env or {})
    command = [ANSIBLE_PLAYBOOK, "-i", os.path.join(PLAYBOOKS, "inventory.yml"), playbook, *args,
               "-e", "drill_value=" + NO_LOG_SECRET, "-e", "drill_other=" + MESSAGE_SECRET,
               "-e", "sentry_test_closed_port=%d" % free_port()]
    if verbosity:
        command.append(verbosity)
    return subprocess.run(command, cwd=cwd, env=environ, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def drill(ingest):
    """One run of drill.yml at -vvv, monitored as 'drill': what came out of it."""
    ingest.clear()
    result = run_playbook(os.path.join(PLAYBOOKS, "drill.yml"), "-e", "baileys_dr_sentry_monitor_slug=drill",
                          "-e", "awx_job_id=4242", dsn=ingest.dsn())
    assert result.returncode == 4, result.stdout + result.stderr  # 4: a host was unreachable, not a crash
    return {"result": result, "events": ingest.events(), "checkins": ingest.checkins(),
            "requests": list(ingest.requests), "rejected": list(ingest.rejected), "bytes": ingest.body_bytes()}


def event_for(events, task):
    found = [event for event in events if event["tags"]["task"] == task]
    assert len(found) == 1, [event["tags"] for event in events]
    return found[0]


# -- events -----------------------------------------------------------------------------------

def test_each_failed_or_unreachable_task_becomes_one_error_event(drill):
    assert drill["rejected"] == []
    assert sorted((e["tags"]["task"], e["tags"]["host"], e["tags"]["status"]) for e in drill["events"]) == [
        ("Check each company", "alpha", "failed"),
        ("Connect with credentials in the message", "alpha", "failed"),
        ("Fail on purpose", "alpha", "failed"),
        ("Reach every host", "ghost", "unreachable"),
        ("Use the secret under no_log", "alpha", "failed"),
    ]  # the ignored failure ("Tolerated failure") is a breadcrumb, not an event
    assert {event["level"] for event in drill["events"]} == {"error"}


def test_events_are_tagged_with_playbook_play_role_task_host_component_and_operation(drill):
    event = event_for(drill["events"], "Fail on purpose")
    assert event["tags"] == {
        "component": "baileys-dr", "operation": "drill", "playbook": "drill.yml", "play": "Drill",
        "role": "drill_role", "task": "Fail on purpose", "host": "alpha", "status": "failed", "check_mode": "false",
        "awx_job_id": "4242",
    }
    assert event["message"] == "Fail on purpose: the role failed on purpose"
    assert event["environment"] == "test"  # baileys_dr_environment of the inventory
    unreachable = event_for(drill["events"], "Reach every host")
    assert unreachable["tags"]["host"] == "ghost" and "role" not in unreachable["tags"]
    assert unreachable["message"].startswith("Reach every host: ")
    assert "Connection refused" in unreachable["message"]


def test_no_log_task_event_says_output_hidden_and_nothing_else(drill):
    event = event_for(drill["events"], "Use the secret under no_log")
    assert event["message"] == "Use the secret under no_log: output hidden by no_log"
    assert "rc" not in event["contexts"]["ansible"]


def test_failed_loop_event_says_which_items_failed(drill):
    event = event_for(drill["events"], "Check each company")
    assert event["message"] == "Check each company: One or more items failed (company bad has no creds)"


def test_credentials_in_a_failure_message_are_masked(drill):
    event = event_for(drill["events"], "Connect with credentials in the message")
    assert event["message"] == ("Connect with credentials in the message: cannot connect to "
                                "postgresql://********@db.example:5432/baileys (password=********); last reply ********; "
                                "tried ********")


def test_events_carry_one_breadcrumb_per_task_result_without_arguments(drill):
    event = event_for(drill["events"], "Fail on purpose")
    crumbs = [(c["message"], c["data"]["host"], c["data"]["status"], c["level"]) for c in event["breadcrumbs"]["values"]]
    # The first task runs on both hosts at once: either may answer first.
    assert sorted(crumbs[:2]) == [("Reach every host", "alpha", "ok", "info"),
                                  ("Reach every host", "ghost", "unreachable", "error")]
    assert crumbs[2:] == [
        ("Never runs", "alpha", "skipped", "info"),
        ("Use the secret under no_log", "alpha", "failed", "error"),
        ("Rescue the no_log failure", "alpha", "ok", "info"),
        ("Tolerated failure", "alpha", "failed (ignored)", "warning"),
        ("Connect with credentials in the message", "alpha", "failed", "error"),
        ("Rescue the credentials failure", "alpha", "ok", "info"),
        ("Check each company", "alpha", "failed", "error"),
        ("Rescue the loop failure", "alpha", "ok", "info"),
        ("Fail inside a role", "alpha", "ok", "info"),
        ("Fail on purpose", "alpha", "failed", "error"),
    ]
    for crumb in event["breadcrumbs"]["values"]:
        assert crumb["category"] == "ansible.task"
        assert set(crumb["data"]) <= {"status", "host", "play", "role"}


# -- check-ins and delivery -------------------------------------------------------------------

def test_monitored_run_with_failures_checks_in_progress_then_error_with_duration(drill):
    checkins = drill["checkins"]
    assert [(c["monitor_slug"], c["status"]) for c in checkins] == [("drill", "in_progress"), ("drill", "error")]
    assert checkins[0]["check_in_id"] == checkins[1]["check_in_id"]
    assert checkins[0]["duration"] is None
    assert 0 < checkins[1]["duration"] < 60


def test_everything_is_delivered_before_ansible_playbook_exits(drill):
    # Envelopes were parsed from gzip bodies: the SDK's real wire format, fully received before exit.
    assert drill["requests"] and all(r.headers.get("Content-Encoding") == "gzip" for r in drill["requests"])
    assert len(drill["events"]) == 5 and len(drill["checkins"]) == 2


# -- secrets ----------------------------------------------------------------------------------

def test_no_secret_reaches_sentry_or_the_verbose_output(drill):
    data, output = drill["bytes"], drill["result"].stdout + drill["result"].stderr
    for secret in (NO_LOG_SECRET, MESSAGE_SECRET, ENV_SECRET, INVENTORY_SECRET, PUBLIC_KEY):
        assert secret.encode() not in data, secret
    assert NO_LOG_SECRET not in output and PUBLIC_KEY not in output
    # The search is meaningful: the secrets were really in play (the default callback prints that failure message).
    assert MESSAGE_SECRET in output and ENV_SECRET in output and INVENTORY_SECRET in output
    assert all(PUBLIC_KEY in r.headers["X-Sentry-Auth"] for r in drill["requests"])


# -- scheduled success, no DSN, AWX layout ----------------------------------------------------

def test_successful_scheduled_run_checks_in_progress_then_ok(ingest):
    ingest.clear()
    # Two playbooks in one command: each gets its own pair of check-ins.
    scheduled = os.path.join(PLAYBOOKS, "scheduled.yml")
    result = run_playbook(scheduled, scheduled, dsn=ingest.dsn(), verbosity=None,
                          env={"BAILEYS_DR_SENTRY_MONITOR_SCHEDULE": "*/15 * * * *",
                               "BAILEYS_DR_SENTRY_ENVIRONMENT": "staging"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert ingest.events() == []
    checkins = ingest.checkins()
    # The slug comes from a templated play var.
    assert [(c["monitor_slug"], c["status"]) for c in checkins] == [("baileys-dr-snapshot", "in_progress"),
                                                                     ("baileys-dr-snapshot", "ok")] * 2
    assert checkins[0]["check_in_id"] == checkins[1]["check_in_id"] != checkins[2]["check_in_id"]
    assert checkins[2]["check_in_id"] == checkins[3]["check_in_id"]
    assert checkins[1]["duration"] > 0 and checkins[3]["duration"] > 0
    assert checkins[1]["environment"] == "staging"
    assert checkins[0]["monitor_config"] == {"schedule": {"type": "crontab", "value": "*/15 * * * *"},
                                             "timezone": "UTC", "checkin_margin": 5, "max_runtime": 30}


def test_operation_play_var_names_the_operation_of_events(ingest):
    ingest.clear()
    result = run_playbook(os.path.join(PLAYBOOKS, "scheduled.yml"), "-e", "scheduled_fail=true",
                          dsn=ingest.dsn(), verbosity=None)
    assert result.returncode == 2, result.stdout + result.stderr
    [event] = ingest.events()
    assert event["tags"]["operation"] == "snapshot" and event["tags"]["playbook"] == "scheduled.yml"
    assert event["message"] == "Fail when asked: asked to fail"
    assert [c["status"] for c in ingest.checkins()] == ["in_progress", "error"]


def test_clean_run_without_monitor_sends_nothing(ingest):
    ingest.clear()
    result = run_playbook(os.path.join(PLAYBOOKS, "scheduled.yml"), "-e", "baileys_dr_sentry_monitor_slug=",
                          dsn=ingest.dsn(), verbosity=None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert ingest.requests == [] and ingest.rejected == []


def descendants(pid):
    """Every process below pid, from /proc."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as stat:
                    ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["int", "term", "hup"])
def test_interrupted_run_checks_in_error_as_it_exits(ingest, signum):
    ingest.clear()
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SENTRY_", "BAILEYS_DR_SENTRY_"))}
    environ.update(BAILEYS_DR_SENTRY_DSN=ingest.dsn(), BAILEYS_DR_SENTRY_MONITOR_SLUG="slow",
                   ANSIBLE_CALLBACKS_ENABLED="baileys_dr_sentry",
                   ANSIBLE_CALLBACK_PLUGINS=os.path.join(ROOT, "callback_plugins"))
    spawned = []
    process = subprocess.Popen([ANSIBLE_PLAYBOOK, "-i", os.path.join(PLAYBOOKS, "inventory.yml"),
                                os.path.join(PLAYBOOKS, "slow.yml")],
                               cwd=ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               # Default dispositions, whatever this test inherited (under nohup SIGHUP is ignored).
                               preexec_fn=lambda: signal.signal(signum, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 30
        while not ingest.checkins() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.1)
        assert [c["status"] for c in ingest.checkins()] == ["in_progress"]
        time.sleep(0.5)  # into the long task
        # Ansible's workers run in sessions of their own: note them to clean up what the signal leaves behind.
        spawned = descendants(process.pid)
        process.send_signal(signum)  # Ctrl-C, a stopped service or cancelled job, a closed terminal
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pid in spawned:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if signum == signal.SIGINT:
        assert "User interrupted execution" in output
    else:
        assert process.returncode == -signum  # still killed by the signal, as without the callback
    checkins = ingest.checkins()
    assert [c["status"] for c in checkins] == ["in_progress", "error"]
    assert checkins[1]["check_in_id"] == checkins[0]["check_in_id"] and 0.5 <= checkins[1]["duration"] < 30


def test_without_dsn_one_warning_and_nothing_sent(ingest):
    ingest.clear()
    result = run_playbook(os.path.join(PLAYBOOKS, "drill.yml"), "-e", "baileys_dr_sentry_monitor_slug=drill")
    output = result.stdout + result.stderr
    assert result.returncode == 4, output  # the run itself is unaffected
    assert output.count(WARNING) == 1, output
    assert ingest.requests == [] and ingest.rejected == []


def test_sentry_that_never_answers_delays_a_run_by_the_flush_timeout_only():
    # Accepts connections (the kernel's backlog) and never answers: the worst case for a DR run.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        dsn = "http://%s@127.0.0.1:%d/1" % (PUBLIC_KEY, silent.getsockname()[1])
        started = time.monotonic()
        result = run_playbook(os.path.join(PLAYBOOKS, "drill.yml"), "-e", "baileys_dr_sentry_monitor_slug=drill",
                              dsn=dsn, verbosity=None, env={"BAILEYS_DR_SENTRY_FLUSH_TIMEOUT": "1"})
        elapsed = time.monotonic() - started
    assert result.returncode == 4, result.stdout + result.stderr  # the same outcome as with Sentry up
    assert "Traceback" not in result.stdout + result.stderr
    # The run itself (2 s idle, up to ~10 s on a loaded machine) plus one 1 s flush at the recap and one at exit;
    # a send that blocked would wait for the SDK's 30 s socket timeout.
    assert elapsed < 25, elapsed


def test_loads_beside_the_playbook_when_awx_replaces_the_callback_path(ingest, tmp_path):
    # ansible-runner sets ANSIBLE_CALLBACK_PLUGINS (overriding ansible.cfg) and its own stdout callback;
    # a callback_plugins directory next to the playbook is still searched.
    shutil.copy(os.path.join(PLAYBOOKS, "scheduled.yml"), tmp_path)
    os.symlink(os.path.join(ROOT, "callback_plugins"), tmp_path / "callback_plugins")
    (tmp_path / "runner_callbacks").mkdir()
    ingest.clear()
    result = run_playbook(str(tmp_path / "scheduled.yml"), dsn=ingest.dsn(), verbosity=None,
                          env={"ANSIBLE_CALLBACK_PLUGINS": str(tmp_path / "runner_callbacks"),
                               "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.minimal"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert [c["status"] for c in ingest.checkins()] == ["in_progress", "ok"]


# -- the ingest stand-in itself ---------------------------------------------------------------

def test_ingest_parses_items_with_and_without_length_and_every_encoding():
    event = json.dumps({"message": "a\nb"}).encode()
    body = (b'{"event_id":"e1"}\n'
            + json.dumps({"type": "event", "length": len(event)}).encode() + b"\n" + event + b"\n"
            + b'{"type":"check_in"}\n{"status":"ok"}\n')
    envelope = parse_envelope(body)
    assert envelope.headers == {"event_id": "e1"}
    assert [(i.type, i.json()) for i in envelope.items] == [("event", {"message": "a\nb"}), ("check_in", {"status": "ok"})]

    import urllib.request
    server = IngestServer(public_key="k" * 32).start()
    try:
        raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        for encoding, data in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body)),
                               ("deflate", raw_deflate.compress(body) + raw_deflate.flush()), (None, body)):
            headers = {"X-Sentry-Auth": "Sentry sentry_key=%s, sentry_version=7" % ("k" * 32)}
            if encoding:
                headers["Content-Encoding"] = encoding
            request = urllib.request.Request("http://127.0.0.1:%d/api/1/envelope/" % server.port, data=data, headers=headers)
            with urllib.request.urlopen(request, timeout=5) as response:
                assert response.status == 200
        assert len(server.checkins()) == 4 and len(server.events()) == 4
        bad = urllib.request.Request("http://127.0.0.1:%d/api/1/envelope/" % server.port, data=body,
                                     headers={"X-Sentry-Auth": "Sentry sentry_key=wrong"})
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(bad, timeout=5)
        assert denied.value.code == 401 and len(server.rejected) == 1
    finally:
        server.stop()


# -- the scrubber's rules, one by one ---------------------------------------------------------

def load_plugin():
    import importlib.util
    spec = importlib.util.spec_from_file_location("baileys_dr_sentry", os.path.join(ROOT, "callback_plugins", "baileys_dr_sentry.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("text, expected", [
    ("POST https://api.telegram.org/bot123456:AAH-x_yz987/sendMessage failed",
     "POST https://api.telegram.org/bot********/sendMessage failed"),
    ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.payload", "Authorization: Bearer ********"),
    ("dsn=https://0123abcd@o1.ingest.sentry.io/5", "dsn=********"),
    ("{'login_password': 'hunter22', 'login_user': 'baileys'}", "{'login_password': '********', 'login_user': 'baileys'}"),
    ('{"api_key": "k-123456789"}', '{"api_key": "********"}'),
    ("x -----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY----- y", "x ******** y"),
    ("redis://:s3cret-pass@cache:6379/0", "redis://********@cache:6379/0"),
    ("connection refused on port 5432", "connection refused on port 5432"),
])
def test_scrubber_masks_secret_shapes_and_leaves_the_rest(text, expected):
    assert load_plugin().SecretScrubber().text(text) == expected


def test_scrubber_masks_values_of_secret_named_variables_only():
    scrubber = load_plugin().SecretScrubber()
    scrubber.learn(None, {"baileys_dr_db_password": "plain-value-1", "nested": {"bot_token": "tok-value-2"},
                          "baileys_dr_app_name": "baileys-whatsapp-service", "short_secret": "abc",
                          "templated_password": "{{ vault_pw }}", "port_key": 5432})
    scrubber.learn_environment({"PGPASSWORD": "env-value-3", "HOME": "/root"})
    assert scrubber.text("plain-value-1 tok-value-2 env-value-3 baileys-whatsapp-service abc /root") == \
        "******** ******** ******** baileys-whatsapp-service abc /root"
