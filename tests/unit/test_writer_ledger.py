"""The writer's ledger logic: what a ledger says the store must hold, and the downtime it measured."""

from __future__ import annotations

import json

import pytest

import writer

T0 = 1_800_000_000.0
PRE_KEY = {"private": {"type": "Buffer", "data": "AQID"}, "public": {"type": "Buffer", "data": "BAUG"}}
SESSION = {"_sessions": {}, "version": "v1"}
CREDS = {"registrationId": 7, "noiseKey": {"private": {"type": "Buffer", "data": "AQ=="}}}


class Ledger:
    """A ledger written the way `writer run` writes it, one request a second unless told."""

    def __init__(self, path):
        self.path = path
        self.seq = 0
        self.lines = [{"kind": "run", "v": 1, "run": "r1", "pid": 1, "started": writer.iso(T0)}]

    def request(self, outcome="ack", company="co1", written=(), deleted=(), creds=None, at=None, run="r1",
                params=None, status=None, creds_changed=True):
        self.seq += 1
        sent = T0 + self.seq if at is None else at
        record = {"kind": "request", "run": run, "seq": self.seq, "company": company, "seed": "s%d" % self.seq,
                  "params": params or {"newKeys": 4, "consumePreKeys": 1, "touchCreds": True},
                  "sent": writer.iso(sent), "done": writer.iso(sent + 0.1), "outcome": outcome,
                  "status": status or {"ack": 200, "failed": 409, "unanswered": None, "applied": 503}[outcome],
                  "error": None if outcome == "ack" else "x"}
        if outcome in ("ack", "applied"):
            record.update({
                "written": [{"type": t, "id": i, "line_sha256": writer.key_line_sha256(t, i, v)} for t, i, v in written],
                "deleted": [{"type": t, "id": i} for t, i in deleted],
                "creds_changed": creds_changed,
                "creds_sha256": writer.creds_line_sha256(creds) if creds is not None else None,
            })
        self.lines.append(record)
        return self

    def write(self, tail=""):
        self.path.write_text("".join(json.dumps(line) + "\n" for line in self.lines) + tail)
        return str(self.path)


@pytest.fixture
def ledger(tmp_path):
    return Ledger(tmp_path / "ledger.jsonl")


@pytest.fixture
def sessions(tmp_path):
    """A Baileys sessions tree: put(company, type, id, value) writes the file Baileys would."""
    root = tmp_path / "sessions"
    root.mkdir()

    class Tree:
        path = str(root)

        @staticmethod
        def put(company, key_type, key_id, value):
            folder = root / ("company_" + company)
            folder.mkdir(exist_ok=True)
            name = "creds.json" if key_type == "creds" else writer.codec.key_file_name(key_type, key_id)
            (folder / name).write_text(json.dumps(writer.codec.to_base64_form(value)))

        @staticmethod
        def remove(company, key_type, key_id):
            (root / ("company_" + company) / writer.codec.key_file_name(key_type, key_id)).unlink()

    Tree.put("co1", "creds", None, CREDS)
    return Tree


def check(ledger_path, tree):
    return writer.check(ledger_path, writer.FilesStore(tree.path))


def lost_keys(report):
    return [(e["company"], e["type"], e["id"]) for e in report["lost_examples"]]


def test_the_last_acknowledged_operation_on_a_key_decides(ledger, sessions):
    ledger.request(written=[("pre-key", "5", PRE_KEY)], creds=CREDS)
    ledger.request(deleted=[("pre-key", "5")], creds=CREDS)
    path = ledger.write()
    report = check(path, sessions)
    assert report["passed"] and report["lost"] == 0
    assert (report["writes_acked"], report["deletes_acked"], report["keys_checked"]) == (1, 1, 1)

    sessions.put("co1", "pre-key", "5", PRE_KEY)
    report = check(path, sessions)
    assert not report["passed"] and lost_keys(report) == [("co1", "pre-key", "5")]
    assert "present although deleted" in report["lost_examples"][0]["why"]


def test_a_key_deleted_then_recreated_by_a_later_acknowledged_write_must_be_present(ledger, sessions):
    ledger.request(deleted=[("pre-key", "5")], creds=CREDS)
    ledger.request(written=[("pre-key", "5", PRE_KEY)], creds=CREDS)
    path = ledger.write()
    assert lost_keys(check(path, sessions)) == [("co1", "pre-key", "5")]
    sessions.put("co1", "pre-key", "5", PRE_KEY)
    assert check(path, sessions)["passed"]


def test_a_written_key_must_hold_exactly_the_acknowledged_value_whatever_its_buffer_encoding(ledger, sessions):
    array_form = {"private": {"type": "Buffer", "data": [1, 2, 3]}, "public": {"type": "Buffer", "data": [4, 5, 6]}}
    ledger.request(written=[("pre-key", "5", array_form), ("sender-key", "g@g.us::491:1/x", SESSION)], creds=CREDS)
    path = ledger.write()
    sessions.put("co1", "pre-key", "5", PRE_KEY)  # the same bytes, base64 as Baileys writes files
    sessions.put("co1", "sender-key", "g@g.us::491:1/x", SESSION)  # stored as sender-key-g@g.us--491-1__x.json
    report = check(path, sessions)
    assert report["passed"] and report["unverified"] == 0

    sessions.put("co1", "pre-key", "5", dict(PRE_KEY, public={"type": "Buffer", "data": "BAUH"}))
    report = check(path, sessions)
    assert lost_keys(report) == [("co1", "pre-key", "5")]
    assert "value differs" in report["lost_examples"][0]["why"]


def test_a_missing_key_after_an_unanswered_request_that_could_consume_it_is_ambiguous_not_lost(ledger, sessions):
    ledger.request(written=[("pre-key", "40", PRE_KEY), ("session", "491.1", SESSION)], creds=CREDS)
    ledger.request(outcome="unanswered")  # a timeout: may have consumed pre-key 40 and changed the creds
    path = ledger.write()
    sessions.put("co1", "creds", None, dict(CREDS, accountSyncCounter=3))
    report = check(path, sessions)
    # A session is never deleted by /simulate: its absence stays a loss.
    assert lost_keys(report) == [("co1", "session", "491.1")]
    assert report["ambiguous"] == 2
    assert {(e["type"], e["id"]) for e in report["ambiguous_examples"]} == {("pre-key", "40"), ("creds", None)}


def test_an_unanswered_request_may_land_after_a_later_one_but_not_minutes_later(ledger, sessions):
    # Given up on at T0 + 1.1, it may still be applied (a transaction waiting on a lock) after the
    # request acknowledged at T0 + 2: the creds that one acknowledged may have been replaced.
    ledger.request(outcome="unanswered", at=T0 + 1)
    ledger.request(creds=dict(CREDS, accountSyncCounter=1), at=T0 + 2)
    path = ledger.write()
    report = check(path, sessions)
    assert report["lost"] == 0 and report["ambiguous_examples"][0]["type"] == "creds"
    ledger.request(creds=dict(CREDS, accountSyncCounter=2), at=T0 + 1 + writer.LINGER_SECONDS + 10)
    report = check(ledger.write(), sessions)
    assert lost_keys(report) == [("co1", "creds", None)] and report["ambiguous"] == 0


def test_an_unanswered_request_that_consumes_no_pre_key_explains_no_missing_pre_key(ledger, sessions):
    ledger.request(written=[("pre-key", "40", PRE_KEY)], creds=CREDS)
    ledger.request(outcome="unanswered", params={"newKeys": 2, "consumePreKeys": 0, "touchCreds": False})
    ledger.request(outcome="unanswered", company="co2")
    assert lost_keys(check(ledger.write(), sessions)) == [("co1", "pre-key", "40")]


def test_keys_an_unacknowledged_answer_lists_as_changed_are_ambiguous(ledger, sessions):
    ledger.request(written=[("session", "491.1", SESSION)], creds=CREDS)
    ledger.request(outcome="applied", deleted=[("session", "491.1")], creds_changed=False)
    report = check(ledger.write(), sessions)
    assert report["passed"] and report["ambiguous"] == 1


def test_creds_must_equal_the_last_acknowledged_ones(ledger, sessions):
    ledger.request(creds=dict(CREDS, accountSyncCounter=1))
    ledger.request(creds=dict(CREDS, accountSyncCounter=2))
    path = ledger.write()
    sessions.put("co1", "creds", None, dict(CREDS, accountSyncCounter=1))
    report = check(path, sessions)
    assert lost_keys(report) == [("co1", "creds", None)] and "differ" in report["lost_examples"][0]["why"]
    sessions.put("co1", "creds", None, dict(CREDS, accountSyncCounter=2))
    assert check(path, sessions)["passed"]


def test_failed_requests_change_no_expectation_and_an_empty_proof_fails(ledger, sessions):
    ledger.request(outcome="failed")
    report = check(ledger.write(), sessions)
    assert report["lost"] == 0 and not report["passed"]
    assert "proves nothing" in report["problems"][0]


def test_answers_are_classified_by_what_they_prove():
    effects = {"written": [{"type": "pre-key", "id": "1", "line_sha256": "a" * 64}], "deleted": [], "creds_changed": True}
    assert writer.outcome_of(200, effects, None, True)[0] == "ack"
    assert writer.outcome_of(503, effects, None, True)[0] == "applied"
    assert writer.outcome_of(None, None, "ConnectionRefusedError", False)[0] == "failed"
    assert writer.outcome_of(503, {"error": "the service is stopping"}, None, True)[0] == "failed"
    assert writer.outcome_of(409, {"error": "not ready"}, None, True)[0] == "failed"
    assert writer.outcome_of(None, None, "timeout", True)[0] == "unanswered"
    assert writer.outcome_of(500, {"error": "boom"}, None, True)[0] == "unanswered"
    # A 200 whose key list is not {type, id} objects is no acknowledgment the check could use.
    assert writer.outcome_of(200, {"written": ["pre-key-1"], "deleted": []}, None, True)[0] == "unanswered"


def test_downtime_is_the_longest_interval_between_consecutive_acknowledged_requests(ledger):
    for second in (0, 1, 2):
        ledger.request(at=T0 + second)
    for second in (3, 4, 5):
        ledger.request(outcome="failed", at=T0 + second)
    ledger.request(at=T0 + 6.5)
    ledger.request(at=T0 + 7)
    path = ledger.write()
    stats = writer.ledger_stats(path)
    assert (stats["requests"], stats["acknowledged"], stats["failed"]) == (8, 5, 3)
    gap = stats["downtime"]
    assert gap["seconds"] == pytest.approx(4.5)
    assert gap["from"] == writer.iso(T0 + 2.1) and gap["to"] == writer.iso(T0 + 6.6)
    assert gap["not_acknowledged_between"] == 3 and gap["unacknowledged_tail_seconds"] == 0
    assert stats["acks_per_second"] == pytest.approx(5 / 7.1, abs=0.001)

    window = writer.ledger_stats(path, T0 + 5.5, T0 + 10)
    assert (window["requests"], window["acknowledged"]) == (2, 2)
    assert window["downtime"]["seconds"] == pytest.approx(0.5)
    start_of_outage = writer.ledger_stats(path, T0, T0 + 5.5)
    assert start_of_outage["downtime"]["seconds"] == pytest.approx(1.0)
    assert start_of_outage["downtime"]["unacknowledged_tail_seconds"] == pytest.approx(3.0)


def test_the_time_between_two_runs_of_the_writer_is_no_downtime(ledger):
    ledger.request(at=T0)
    ledger.request(at=T0 + 1)
    ledger.request(at=T0 + 100, run="r2")
    ledger.request(at=T0 + 102, run="r2")
    stats = writer.ledger_stats(ledger.write())
    assert stats["downtime"]["seconds"] == pytest.approx(2.0)
    assert stats["seconds"] == pytest.approx(1.1 + 2.1)


def test_window_bounds_take_iso_times_and_epoch_seconds():
    assert writer.parse_time("2027-01-15T08:00:00Z", "--from") == writer.parse_time("2027-01-15T08:00:00", "--from")
    assert writer.parse_time("1800000000.5", "--to") == 1800000000.5
    with pytest.raises(writer.UsageError, match="--from"):
        writer.parse_time("yesterday", "--from")


def test_a_line_being_written_is_ignored_but_a_damaged_line_is_an_error(ledger, sessions):
    ledger.request(written=[("pre-key", "5", PRE_KEY)], creds=CREDS)
    sessions.put("co1", "pre-key", "5", PRE_KEY)
    assert check(ledger.write(tail='{"kind": "request", "outc'), sessions)["passed"]
    ledger.lines.insert(1, "not a record")
    with pytest.raises(writer.LedgerError, match="line 2"):
        check(ledger.write(), sessions)


def test_hostile_ledger_entries_are_refused_before_any_file_is_opened(ledger, sessions):
    ledger.request(written=[("pre-key", "5", PRE_KEY)], creds=CREDS)
    ledger.lines[-1]["company"] = "../../etc"
    with pytest.raises(writer.LedgerError, match="company"):
        check(ledger.write(), sessions)
    ledger.lines[-1]["company"] = "co1"
    ledger.lines[-1]["written"][0]["type"] = "../pre-key"
    with pytest.raises(writer.LedgerError, match="key type"):
        check(ledger.write(), sessions)


def test_check_exit_status_and_json_report(ledger, sessions, capsys):
    ledger.request(written=[("pre-key", "5", PRE_KEY)], creds=CREDS)
    path = ledger.write()
    assert writer.main(["check", "--ledger", path, "--store", "files", "--sessions", sessions.path, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["lost"] == 1 and report["lost_examples"][0]["why"].startswith("missing")
    assert set(report) >= {"requests", "acknowledged", "failed", "writes_acked", "deletes_acked", "lost",
                           "lost_examples", "ambiguous", "downtime"}
    sessions.put("co1", "pre-key", "5", PRE_KEY)
    assert writer.main(["check", "--ledger", path, "--store", "files", "--sessions", sessions.path]) == 0
    assert "OK: no acknowledged write lost" in capsys.readouterr().out
    assert writer.main(["check", "--ledger", path, "--store", "files"]) == 2
    assert "--sessions" in capsys.readouterr().err


def test_a_window_that_begins_with_the_service_down_counts_its_downtime_from_the_window_start(ledger):
    # A database stopped before the window: requests fail from its start until the failover brings the service back.
    for second in (0, 1, 2, 3):
        ledger.request(outcome="failed", at=T0 + second)
    ledger.request(at=T0 + 5)
    ledger.request(at=T0 + 5.5)
    stats = writer.ledger_stats(ledger.write(), start=T0 - 0.5)
    assert stats["downtime"]["head_seconds"] == pytest.approx(5.6)
    assert stats["downtime"]["seconds"] == pytest.approx(0.5)
    # A window that begins with an acknowledged request has no such head.
    assert writer.ledger_stats(ledger.path, start=T0 + 4.5)["downtime"]["head_seconds"] == 0
