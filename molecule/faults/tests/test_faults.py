"""Faults on the containers (docs/reliability.md, points 13 and 15).

Converge left on the control node, in BAILEYS_DR_FAULTS_DIR: the outcome of each tag fault,
the -vvv output of every playbook, both controller audit logs, the Sentry envelopes the local
ingest received and the requests the Telegram capture server received.
"""

import json
import os

import pytest

testinfra_hosts = ["ansible://baileys-dr-app"]

FAULTS_DIR = os.environ.get("BAILEYS_DR_FAULTS_DIR") or os.path.join(os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY", ""), "faults")
PLAYBOOKS = ["snapshot", "failover", "failback", "health", "cleanup", "rehearsal", "failover-refused"]
# Where the DR roles leave things on the application host.
TARGET_PATHS = ["/var/log/baileys-dr", "/var/lib/baileys-dr/reports", "/var/lib/baileys-dr/metrics"]


def artefact(name):
    with open(os.path.join(FAULTS_DIR, name), encoding="utf-8") as fh:
        return fh.read()


@pytest.fixture(scope="module")
def secrets():
    values = json.loads(artefact("secrets.json"))
    assert all(len(v) >= 16 for v in values.values()), "secrets too short to be told apart from other text"
    return values


def leaks(text, secrets):
    return sorted(name for name, value in secrets.items() if value in text)


def test_each_tag_fault_was_refused_by_name_before_any_restart():
    # converge asserted, per fault, the message and an unchanged PM2 pid/restart count, git, .env and sessions.
    outcomes = json.loads(artefact("tag_faults.json"))
    assert [o["fault"] for o in outcomes] == ["the tag missing", "the tag moved to another commit", "a dirty work tree"]
    assert all(o["message"] for o in outcomes)


def test_every_playbook_ran_and_the_run_after_the_faults_went_through():
    codes = json.loads(artefact("runs.json"))
    assert codes == dict(dict.fromkeys(PLAYBOOKS[:-1], 0), **{"failover-refused": 2})


@pytest.mark.parametrize("playbook", PLAYBOOKS)
def test_no_secret_in_the_vvv_output_of_the_playbook(secrets, playbook):
    output = artefact(playbook + ".log")
    assert "PLAY RECAP" in output and "ESTABLISH" in output, "a -vvv run"
    assert leaks(output, secrets) == []


def test_no_secret_in_the_audit_logs_of_the_control_node(secrets):
    callback = artefact("controller-audit.jsonl")
    role = artefact("controller-audit-role.jsonl")
    assert callback.count('"playbook_end"') >= len(PLAYBOOKS) and role.strip()
    assert leaks(callback, secrets) == [] and leaks(role, secrets) == []


def test_no_secret_in_the_audit_log_reports_or_metrics_of_the_target(host, secrets):
    listing = host.run("find %s -type f" % " ".join(TARGET_PATHS))
    files = listing.stdout.split()
    assert "/var/log/baileys-dr/audit.jsonl" in files
    assert any(f.startswith("/var/lib/baileys-dr/reports/") for f in files)
    assert any(f.startswith("/var/lib/baileys-dr/metrics/") for f in files)
    for name, value in secrets.items():
        found = host.run("grep -rlF -e %s " + " ".join(TARGET_PATHS), value)
        assert found.rc == 1 and not found.stdout, "%s found in %s" % (name, found.stdout.split())


def test_no_secret_in_the_sentry_events(secrets):
    items = [json.loads(line) for line in artefact("sentry.jsonl").splitlines() if line.strip()]
    events = [i for i in items if i["item"].get("type") == "event"]
    assert events, "the refused failover must have reached Sentry"
    assert any("no-such-tag" in i["payload"] for i in events)
    assert leaks(json.dumps(items), secrets) == []


def test_no_secret_in_the_telegram_messages(secrets):
    requests = [json.loads(line) for line in artefact("telegram.jsonl").splitlines() if line.strip()]
    assert requests and all(r["path"] == "/bot%s/sendMessage" % secrets["telegram_token"] for r in requests)
    assert any("REFUSED" in r["body"] and "no-such-tag" in r["body"] for r in requests), "the refused failover was notified"
    # The token is the URL (the Bot API's design); nowhere else.
    assert leaks(json.dumps([dict(r, path=None) for r in requests]), secrets) == []
