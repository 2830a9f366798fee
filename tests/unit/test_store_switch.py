"""baileys_store_switch: the parts that decide without a service (the flows run for real in
tests/integration/test_switch_under_traffic.py and the Molecule scenarios)."""

from __future__ import annotations

import json
import os
import pwd
import stat

import pytest

import baileys_store_switch
from module_harness import run_module

from ansible.module_utils import baileys_dr_switch_parts as parts
from ansible.module_utils.baileys_dr_pm2_process import pm2_process_argument_spec


def test_an_engine_gets_its_own_defaults_and_refuses_an_option_it_does_not_have():
    params = parts.engine_params(pm2_process_argument_spec(), name="svc", state="stopped")
    assert params["ready_timeout"] == 60 and params["env_remove"] == [] and params["name"] == "svc"
    params["env_remove"].append("X")
    assert parts.engine_params(pm2_process_argument_spec(), name="svc")["env_remove"] == [], "defaults are copied"
    with pytest.raises(ValueError, match="not options of that engine: no_such"):
        parts.engine_params(pm2_process_argument_spec(), name="svc", no_such=1)


def other_account():
    for entry in pwd.getpwall():
        if entry.pw_uid not in (0, os.geteuid()) and entry.pw_uid < 65534:
            return entry
    pytest.skip("no other account on this machine")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs PM2 and git as another account")
def test_as_root_pm2_and_git_run_as_the_application_account_with_its_home():
    account = other_account()
    run_as = parts.RunAs(account.pw_name)
    argv, env = run_as.wrap(["pm2", "jlist"], {"PM2_HOME": "/x/.pm2"})
    assert argv[0].endswith("setpriv") and argv[-3:] == ["--", "pm2", "jlist"]
    assert "--reuid=%d" % account.pw_uid in argv and "--regid=%d" % account.pw_gid in argv and "--init-groups" in argv
    assert env == {"PM2_HOME": "/x/.pm2", "HOME": account.pw_dir, "USER": account.pw_name, "LOGNAME": account.pw_name}


def test_the_account_the_module_runs_as_runs_its_commands_unchanged():
    me = pwd.getpwuid(os.geteuid()).pw_name
    run_as = parts.RunAs(me)
    assert run_as.wrap(["git", "status"], {"A": "1"}) == (["git", "status"], {"A": "1"})


def test_an_unknown_application_account_is_refused_by_name():
    with pytest.raises(parts.SwitchError, match="app_user no-such-user-xyz does not exist"):
        parts.RunAs("no-such-user-xyz")


def test_identities_compare_registration_id_and_me_and_name_what_differs():
    expected = {"c1": {"registrationId": 7, "me": "491@s.whatsapp.net"}, "c2": {"registrationId": 9, "me": None},
                "c3": {"registrationId": 3, "me": None}}
    reported = {"identities": {"c1": {"registrationId": 7, "me": "491@s.whatsapp.net"},
                               "c2": {"registrationId": 11, "me": None}}}
    assert parts.identity_differences(expected, reported) == [
        "c2: registrationId 11, expected 9", "c3: not reported by the service"]
    # Fresh credentials written over real ones: a new registrationId and no me.
    fresh = {"identities": {"c1": {"registrationId": 12345, "me": None}}}
    assert parts.identity_differences({"c1": expected["c1"]}, fresh) == [
        "c1: registrationId 12345, expected 7", "c1: me None, expected 491@s.whatsapp.net"]


def test_an_application_that_reports_registration_ids_only_is_compared_on_those():
    assert parts.identity_differences({"c1": {"registrationId": 7, "me": "x"}}, {"registrationIds": {"c1": 7}}) == []
    assert parts.identity_differences({"c1": {"registrationId": 7, "me": "x"}}, {"registrationIds": {"c1": 8}}) == [
        "c1: registrationId 8, expected 7"]


def test_identities_are_read_from_each_company_creds_and_a_torn_creds_file_is_named(tmp_path):
    for company, creds in (("a", {"registrationId": 1, "me": {"id": "1@s"}}), ("b", {"registrationId": 2})):
        (tmp_path / ("company_" + company)).mkdir()
        (tmp_path / ("company_" + company) / "creds.json").write_text(json.dumps(creds))
    (tmp_path / ".baileys-dr").mkdir()
    assert parts.read_identities(str(tmp_path)) == {"a": {"registrationId": 1, "me": "1@s"},
                                                     "b": {"registrationId": 2, "me": None}}
    (tmp_path / "company_b" / "creds.json").write_text('{"registrationId": 2, "noi')
    with pytest.raises(parts.SwitchError, match="company_b/creds.json"):
        parts.read_identities(str(tmp_path))


def test_the_journal_keeps_the_record_and_adds_each_phase_atomically_and_privately(tmp_path):
    path = tmp_path / "state" / "failover-state.json"
    journal = parts.Journal(str(path))
    assert journal.load() is None and journal.switch() == {}
    journal.write({"format": 1, "env": {"USE_DATABASE_AUTH_STATE": {"present": True, "value": "true"}}})
    journal.phase("failover", "stopped")
    journal.phase("failover", "copied")
    again = parts.Journal(str(path))
    document = again.load()
    assert document["env"]["USE_DATABASE_AUTH_STATE"]["value"] == "true"
    assert again.switch()["operation"] == "failover" and again.switch()["phase"] == "copied"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [n for n in os.listdir(path.parent) if n != path.name] == [], "no temporary file left"
    # Another operation starts its own progress (a failback after a failover), keeping the record.
    again.phase("failback", "stopped")
    assert again.switch()["operation"] == "failback" and again.document["env"]


def test_a_stray_instance_is_found_by_its_directory_not_an_unrelated_process(tmp_path):
    found = parts.processes_in(str(tmp_path))
    assert found == []
    here = parts.processes_in(os.getcwd(), exclude=parts.own_ancestry())
    assert all(pid not in parts.own_ancestry() for pid, _cmd, _exe in here)


def test_check_mode_says_what_it_would_do_and_touches_nothing(tmp_path):
    args = {"store": "files", "app_root": str(tmp_path), "app_user": pwd.getpwuid(os.geteuid()).pw_name,
            "health_url": "http://127.0.0.1:9/health", "state_file": str(tmp_path / "state.json"),
            "sessions_dir": str(tmp_path / "s"), "standby_dir": str(tmp_path / "s.standby")}
    ok, result = run_module(baileys_store_switch, args, check_mode=True)
    assert ok and not result["changed"] and "would stop baileys-whatsapp-service" in result["msg"]
    assert os.listdir(tmp_path) == []


def test_a_failover_needs_the_standby_directory(tmp_path):
    args = {"store": "files", "app_root": str(tmp_path), "app_user": "root", "health_url": "http://127.0.0.1:9/health",
            "state_file": str(tmp_path / "state.json"), "sessions_dir": str(tmp_path / "s")}
    ok, result = run_module(baileys_store_switch, args)
    assert not ok and "standby_dir" in result["msg"]
