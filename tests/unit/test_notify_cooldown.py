"""The notification cooldown: the same event is not sent twice within its window, across runs."""

from __future__ import annotations

import json
import os

import baileys_notify_cooldown
from module_harness import run_module


def cooldown(state_dir, state="checked", check_mode=False, **args):
    params = dict(event="failover|app1|failed", state=state, cooldown=900, state_dir=str(state_dir))
    params.update(args)
    ok, result = run_module(baileys_notify_cooldown, params, check_mode=check_mode)
    assert ok, result
    return result


def test_an_event_never_sent_is_due_and_once_recorded_is_not(tmp_path):
    state = tmp_path / "notify"
    assert cooldown(state)["due"] and not cooldown(state)["changed"]
    recorded = cooldown(state, state="recorded")
    assert recorded["changed"]
    again = cooldown(state)
    assert not again["due"] and 890 < again["remaining_seconds"] <= 900
    # Another outcome is another event.
    assert cooldown(state, event="failover|app1|ok")["due"]


def test_the_event_is_due_again_once_the_cooldown_has_passed(tmp_path):
    state = tmp_path / "notify"
    result = cooldown(state, state="recorded")
    with open(result["path"], "w", encoding="utf-8") as fh:
        json.dump({"event": "failover|app1|failed", "last_sent": result["last_sent"] - 901}, fh)
    assert cooldown(state)["due"]


def test_nothing_is_recorded_when_no_channel_delivered_and_failures_warn(tmp_path, capsys):
    state = tmp_path / "notify"
    result = cooldown(state, state="recorded", sent=False, failures=[{"channel": "webhook", "reason": "HTTP 500"}])
    assert not result["changed"] and not os.path.exists(result["path"])
    from ansible.module_utils.common.warnings import get_warning_messages

    # Depending on what ran before in this process, ansible-core either collects the
    # warning for the result or prints it at once: either way the operator sees it.
    shown = list(result.get("warnings") or []) + list(get_warning_messages()) + [capsys.readouterr().err]
    assert any("through webhook failed: HTTP 500" in w for w in shown)
    assert cooldown(state)["due"]


def test_state_is_private_and_hostile_event_keys_never_become_paths(tmp_path):
    state = tmp_path / "notify"
    result = cooldown(state, state="recorded", event="../../etc/passwd|x")
    assert os.path.dirname(result["path"]) == str(state)
    assert oct(os.stat(state).st_mode & 0o777) == "0o700"
    assert oct(os.stat(result["path"]).st_mode & 0o777) == "0o600"
    assert sorted(os.listdir(tmp_path)) == ["notify"]


def test_check_mode_records_nothing(tmp_path):
    state = tmp_path / "notify"
    assert cooldown(state, state="recorded", check_mode=True)["changed"]
    assert not state.exists()


def test_an_unreadable_record_does_not_silence_notifications(tmp_path):
    state = tmp_path / "notify"
    path = cooldown(state, state="recorded")["path"]
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("{torn")
    assert cooldown(state)["due"]


def test_a_negative_cooldown_is_refused_naming_it(tmp_path):
    ok, result = run_module(baileys_notify_cooldown, dict(event="e", cooldown=-5, state_dir=str(tmp_path)))
    assert not ok and "cooldown" in result["msg"] and "-5" in result["msg"]


def test_a_cooldown_directory_others_can_write_or_a_symlinked_record_is_not_trusted(tmp_path):
    state = tmp_path / "notify"
    state.mkdir(mode=0o700)
    os.chmod(state, 0o777)
    ok, result = run_module(baileys_notify_cooldown, dict(event="failover|app1|failed", state="recorded", cooldown=900,
                                                          state_dir=str(state)))
    assert not ok and "writable by group or others" in result["msg"] and str(state) in result["msg"]
    os.chmod(state, 0o700)
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps({"last_sent": 4102444800}))
    path = cooldown(state)["path"]
    os.symlink(forged, path)
    # A record behind a symlink never silences a notification.
    assert cooldown(state)["due"]
