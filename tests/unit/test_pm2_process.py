"""baileys_pm2_process: exact pm2 argv per state, robust jlist parsing, readiness, and no environment value ever out.

PM2 outputs are the recordings in fixtures/pm2 (made by fixtures/pm2/record.py with PM2 7.0.4); the
recorded environment of baileys-whatsapp-service holds the fake secret POSTGRES_PASSWORD=fixture-secret-123
and the stale variable STALE_FLAG=from-an-old-shell.
"""

from __future__ import annotations

import copy
import json
import os
import pwd
from pathlib import Path
from unittest import mock

import pytest

import baileys_pm2_process as pm2_process
from ansible.module_utils import basic
from ansible.module_utils import baileys_dr_pm2 as pm2
from module_harness import run_module

FIXTURES = Path(__file__).parent / "fixtures" / "pm2"
APP = "baileys-whatsapp-service"
SECRET = "fixture-secret-123"
STALE = "from-an-old-shell"


def recorded(name):
    return (FIXTURES / name).read_text()


def processes(name):
    return pm2.parse_jlist(recorded(name))


def jlist(name, drop=(), **changes):
    """A recorded jlist, optionally without some processes or with fields of pm2_env changed:
    changes={"cleanup-job": {"status": "online"}}; a "pid" key changes the top-level pid."""
    procs = [p for p in copy.deepcopy(processes(name)) if p["name"] not in drop]
    for proc in procs:
        for key, value in changes.get(proc["name"].replace("-", "_"), {}).items():
            if key == "pid":
                proc["pid"] = value
            else:
                proc["pm2_env"][key] = value
    return json.dumps(procs)


def app_started():
    """pm_uptime of baileys-whatsapp-service in the recording, in seconds."""
    return next(p for p in processes("jlist-online-stopped-errored.txt") if p["name"] == APP)["pm2_env"]["pm_uptime"] / 1000.0


class FakeClock:
    """Wall clock and monotonic clock moving together, only when the module sleeps."""

    def __init__(self, wall):
        self.wall0 = wall
        self.elapsed = 0.0

    def time(self):
        return self.wall0 + self.elapsed

    def monotonic(self):
        return 1000.0 + self.elapsed

    def sleep(self, seconds):
        self.elapsed += seconds


class FakePm2:
    """Stands in for AnsibleModule.run_command: replies from recordings, keeps argv, cwd and environment."""

    def __init__(self, jlists, replies=None):
        self.jlists = list(jlists)
        self.replies = replies or {}
        self.calls = []

    def run_command(self, module, args, cwd=None, environ_update=None, **kwargs):
        env = dict(os.environ)
        env.update(module.run_command_environ_update or {})
        env.update(environ_update or {})
        self.calls.append({"argv": list(args), "cwd": cwd, "env": env})
        if args[1] == "jlist":
            reply = self.jlists.pop(0) if len(self.jlists) > 1 else self.jlists[0]
            return 0, reply() if callable(reply) else reply, ""
        return self.replies.get(args[1], (0, recorded("start-ecosystem.txt") if args[1] == "start" else "", ""))

    @property
    def argv(self):
        return [call["argv"][1:] for call in self.calls]


class FakeHealth:
    def __init__(self, answers):
        self.answers = list(answers)
        self.urls = []

    def get(self, client, url, timeout):
        self.urls.append(url)
        status, doc = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return status, (json.dumps(doc).encode() if not isinstance(doc, bytes) else doc)


@pytest.fixture
def pm2_env(tmp_path):
    """A PM2_HOME whose daemon 'runs' (rpc.sock), a pm2 executable never run, an ecosystem file and a .env."""
    home = tmp_path / "pm2home"
    home.mkdir()
    (home / "rpc.sock").touch()
    pm2_bin = tmp_path / "pm2"
    pm2_bin.write_text("#!/bin/sh\nexit 99\n")
    pm2_bin.chmod(0o755)
    app = tmp_path / "app"
    app.mkdir()
    (app / "ecosystem.config.js").write_text("module.exports = {apps: []};\n")
    (app / ".env").write_text(
        "# written by failover\n"
        "USE_LEGACY_SUPABASE=false\n"
        "export USE_DATABASE_AUTH_STATE=false  # files\n"
        "USE_REPOSITORY_PATTERN='false'\n"
        'POSTGRES_PASSWORD="env-file-secret-456"\n'
        'MULTILINE="first\nSECOND_LINE_IS_NOT_A_NAME=x"\n'
    )
    return {"home": home, "bin": str(pm2_bin), "app": app, "tmp": tmp_path}


def run(pm2_env, fake, args, check_mode=False, health=None, clock=None, diff=False):
    clock = clock or FakeClock(app_started() + 3600)
    params = dict(pm2_bin=pm2_env["bin"], pm2_home=str(pm2_env["home"]), name=APP)
    params.update(args)
    if diff:
        params["_ansible_diff"] = True
    health = health or FakeHealth([(599, {})])

    def run_command(module, cmd, **kwargs):
        return fake.run_command(module, cmd, **kwargs)

    def get(client, url, timeout):
        return health.get(client, url, timeout)

    warnings = []
    with mock.patch.object(basic.AnsibleModule, "run_command", run_command), \
            mock.patch.object(basic.AnsibleModule, "warn", lambda module, msg: warnings.append(msg)), \
            mock.patch.object(pm2.HealthClient, "get", get), \
            mock.patch.multiple(pm2_process.Pm2Process, clock=clock.time, monotonic=clock.monotonic, sleep=clock.sleep):
        ok, result = run_module(pm2_process, params, check_mode=check_mode)
    if warnings:  # what exit_json would add
        result["warnings"] = warnings
    return ok, result


def assert_no_env_value(result):
    text = json.dumps(result)
    for value in (SECRET, STALE, "env-file-secret-456", "/usr/local/bin:/usr/bin:/bin"):
        assert value not in text


# --- pm2 jlist parsing ----------------------------------------------------------------------------------


def test_first_run_banner_then_empty_array_is_the_empty_list():
    text = recorded("jlist-first-run.txt")
    assert "[PM2]" in text and text.rstrip().endswith("[]")
    assert pm2.parse_jlist(text) == []


def test_out_of_date_notice_before_the_array_is_skipped():
    text = recorded("jlist-out-of-date.txt")
    assert "In-memory PM2 is out-of-date" in text
    assert [p["name"] for p in pm2.parse_jlist(text)] == [APP]


def test_bracketed_notices_around_the_array_are_not_taken_for_it():
    text = ("[PM2] Applying action restartProcessId on app [all](ids: [ 0, 1, 2 ])\n[PM2] [v] done []\n"
            + recorded("jlist-online-stopped-errored.txt") + "\n[PM2][WARN] [ 3 ] {\"a\": [1]}\n")
    assert [p["name"] for p in pm2.parse_jlist(text)] == [APP, "cleanup-job", "boom"]


def test_output_without_a_process_list_is_an_error():
    with pytest.raises(pm2.Pm2Error, match="no JSON process list"):
        pm2.parse_jlist("[PM2] Spawning PM2 daemon\n[PM2] PM2 Successfully daemonized\n[ 0 ]\n")


def test_summary_holds_the_named_facts_and_no_environment_value():
    procs = processes("jlist-online-stopped-errored.txt")
    now = app_started() + 90.5
    summaries = {p["name"]: pm2.summarize(p, now) for p in procs}
    app = summaries[APP]
    assert app["status"] == "online" and app["pm_id"] == 0 and app["pid"] == procs[0]["pid"]
    assert app["restarts"] == 0 and app["unstable_restarts"] == 0 and app["uptime_seconds"] == 90.5
    assert app["revision"] == "5f3c2d1e0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d"
    assert app["exec_cwd"] == "/srv/baileys-whatsapp-service"
    assert app["started_at"].startswith("2026-") and app["started_at"].endswith("+00:00")
    assert summaries["cleanup-job"]["status"] == "stopped" and summaries["cleanup-job"]["uptime_seconds"] is None
    assert summaries["cleanup-job"]["pid"] is None
    assert summaries["boom"]["status"] == "errored" and summaries["boom"]["restarts"] == 1
    assert SECRET in recorded("jlist-online-stopped-errored.txt")
    assert_no_env_value(summaries)


def test_env_file_names_include_exported_quoted_and_multiline_values(pm2_env):
    names, secrets = pm2.read_env_file(str(pm2_env["app"] / ".env"))
    assert names == ["USE_LEGACY_SUPABASE", "USE_DATABASE_AUTH_STATE", "USE_REPOSITORY_PATTERN",
                     "POSTGRES_PASSWORD", "MULTILINE"]
    assert "env-file-secret-456" in secrets and "false" not in secrets


def test_scrubbed_output_has_no_json_no_assignment_and_no_known_secret():
    text = recorded("delete-unknown.txt") + recorded("jlist-online-stopped-errored.txt") + \
        "\nPOSTGRES_PASSWORD=hunter2 failed\nconnecting with fixture-secret-123\n"
    scrubbed = pm2.scrub_output(text, {SECRET})
    assert "Process or Namespace no-such-app not found" in scrubbed
    assert SECRET not in scrubbed and "hunter2" not in scrubbed and "PATH" not in scrubbed
    assert "\x1b[" not in scrubbed


# --- argv per state ---------------------------------------------------------------------------------


def test_info_reads_only_and_returns_no_environment_value(pm2_env):
    fake = FakePm2([recorded("jlist-online-stopped-errored.txt")])
    ok, result = run(pm2_env, fake, dict(state="info"))
    assert ok and not result["changed"] and result["would"] == "none"
    assert fake.argv == [["jlist"]]
    assert result["commands"] == [[pm2_env["bin"], "jlist"]]
    assert result["process"]["status"] == "online" and result["process"]["uptime_seconds"] == 3600
    assert result["pm2_home"] == str(pm2_env["home"])
    assert fake.calls[0]["env"]["PM2_HOME"] == str(pm2_env["home"])
    assert_no_env_value(result)


def test_started_when_online_changes_nothing(pm2_env):
    fake = FakePm2([recorded("jlist-online-stopped-errored.txt")])
    ok, result = run(pm2_env, fake, dict(state="started", wait=False))
    assert ok and not result["changed"]
    assert fake.argv == [["jlist"]]


def test_started_when_stopped_runs_pm2_start_by_name(pm2_env):
    fake = FakePm2([recorded("jlist-online-stopped-errored.txt"),
                    jlist("jlist-online-stopped-errored.txt", cleanup_job={"status": "online", "pid": 4321})])
    ok, result = run(pm2_env, fake, dict(name="cleanup-job", state="started", wait=False))
    assert ok and result["changed"] and result["would"] == "start"
    assert fake.argv == [["jlist"], ["start", "cleanup-job"], ["jlist"]]
    assert result["process"]["pid"] == 4321


def test_started_when_unknown_starts_from_the_ecosystem_with_a_clean_environment(pm2_env, monkeypatch):
    monkeypatch.setenv("USE_DATABASE_AUTH_STATE", "true")  # stale: .env says false
    monkeypatch.setenv("STALE_FLAG", "1")
    monkeypatch.setenv("KEEP_ME", "yes")
    fake = FakePm2([recorded("jlist-first-run.txt"), recorded("jlist-out-of-date.txt")])
    ecosystem = str(pm2_env["app"] / "ecosystem.config.js")
    ok, result = run(pm2_env, fake, dict(state="started", ecosystem=ecosystem, env_file=str(pm2_env["app"] / ".env"),
                                         env_remove=["STALE_FLAG"], wait=False))
    assert ok and result["changed"] and result["would"] == "start"
    assert fake.argv == [["jlist"], ["start", ecosystem, "--only", APP], ["jlist"]]
    start = fake.calls[1]
    assert start["cwd"] == str(pm2_env["app"])
    for name in ("USE_DATABASE_AUTH_STATE", "STALE_FLAG", "USE_LEGACY_SUPABASE", "POSTGRES_PASSWORD", "MULTILINE"):
        assert name not in start["env"]
    assert start["env"]["KEEP_ME"] == "yes" and start["env"]["PM2_HOME"] == str(pm2_env["home"]) and "PATH" in start["env"]
    # Only the start ran without them; the module's own environment is intact afterwards.
    assert os.environ["USE_DATABASE_AUTH_STATE"] == "true" and os.environ["STALE_FLAG"] == "1"
    assert "USE_DATABASE_AUTH_STATE" in fake.calls[2]["env"]


def test_ecosystem_relative_to_cwd(pm2_env):
    fake = FakePm2([recorded("jlist-first-run.txt"), recorded("jlist-out-of-date.txt")])
    ok, _ = run(pm2_env, fake, dict(state="started", ecosystem="ecosystem.config.js", cwd=str(pm2_env["app"]), wait=False))
    assert ok
    assert fake.argv[1] == ["start", str(pm2_env["app"] / "ecosystem.config.js"), "--only", APP]
    assert fake.calls[1]["cwd"] == str(pm2_env["app"])


def test_restarted_deletes_then_starts_from_the_ecosystem_by_default(pm2_env):
    ecosystem = str(pm2_env["app"] / "ecosystem.config.js")
    fake = FakePm2([recorded("jlist-out-of-date.txt")])
    ok, result = run(pm2_env, fake, dict(state="restarted", ecosystem=ecosystem, wait=False))
    assert ok and result["changed"] and result["would"] == "restart"
    # No list read first: a fresh-env restart deletes whatever the process's state (one Node process less).
    assert fake.argv == [["delete", APP], ["start", ecosystem, "--only", APP], ["jlist"]]
    assert result["commands"] == [[pm2_env["bin"]] + argv for argv in fake.argv]


def test_restarted_when_pm2_does_not_know_the_process_starts_it(pm2_env):
    ecosystem = str(pm2_env["app"] / "ecosystem.config.js")
    fake = FakePm2([recorded("jlist-first-run.txt"), recorded("jlist-out-of-date.txt")],
                   replies={"delete": (1, "", "[PM2][ERROR] Process or Namespace %s not found" % APP)})
    ok, result = run(pm2_env, fake, dict(state="restarted", ecosystem=ecosystem, wait=False))
    assert ok and result["changed"] and result["would"] == "start"
    assert fake.argv == [["delete", APP], ["jlist"], ["start", ecosystem, "--only", APP], ["jlist"]]


def test_restarted_whose_delete_fails_on_a_known_process_is_an_error_and_starts_nothing(pm2_env):
    ecosystem = str(pm2_env["app"] / "ecosystem.config.js")
    fake = FakePm2([recorded("jlist-online-stopped-errored.txt")], replies={"delete": (1, "", "[PM2][ERROR] EACCES")})
    ok, result = run(pm2_env, fake, dict(state="restarted", ecosystem=ecosystem, wait=False))
    assert not ok and "`pm2 delete %s` failed (rc=1" % APP in result["msg"] and "EACCES" in result["msg"]
    assert fake.argv == [["delete", APP], ["jlist"]]


def test_restarted_with_a_missing_ecosystem_is_refused_before_anything_is_deleted(pm2_env):
    fake = FakePm2([recorded("jlist-online-stopped-errored.txt")])
    ok, result = run(pm2_env, fake, dict(state="restarted", ecosystem=str(pm2_env["app"] / "nope.config.js"), wait=False))
    assert not ok and "does not exist" in result["msg"] and fake.argv == []


def test_restarted_in_diff_mode_reads_the_status_before(pm2_env):
    ecosystem = str(pm2_env["app"] / "ecosystem.config.js")
    fake = FakePm2([recorded("jlist-online-stopped-errored.txt"), recorded("jlist-out-of-date.txt")])
    ok, result = run(pm2_env, fake, dict(state="restarted", ecosystem=ecosystem, wait=False), diff=True)
    assert ok and fake.argv == [["jlist"], ["delete", APP], ["start", ecosystem, "--only", APP], ["jlist"]]
    assert result["diff"]["before"] == "%s: online\n" % APP


def test_restarted_without_ecosystem_is_refused_explaining_the_environment_trap(pm2_env):
    fake = FakePm2([recorded("jlist-online-stopped-errored.txt")])
    ok, result = run(pm2_env, fake, dict(state="restarted"))
    assert not ok
    assert "--update-env" in result["msg"] and "never removes" in result["msg"] and "fresh_env: false" in result["msg"]
    assert fake.calls == []


def test_restarted_without_fresh_env_runs_pm2_restart(pm2_env):
    fake = FakePm2([recorded("jlist-online-stopped-errored.txt")])
    ok, result = run(pm2_env, fake, dict(state="restarted", fresh_env=False, wait=False))
    assert ok and result["changed"]
    assert fake.argv == [["jlist"], ["restart", APP], ["jlist"]]


def test_reloaded_runs_pm2_reload(pm2_env):
    fake = FakePm2([recorded("jlist-online-stopped-errored.txt")])
    ok, result = run(pm2_env, fake, dict(state="reloaded", wait=False))
    assert ok and result["would"] == "reload"
    assert fake.argv == [["jlist"], ["reload", APP], ["jlist"]]


def test_reloaded_with_fresh_env_is_refused(pm2_env):
    ok, result = run(pm2_env, FakePm2(["[]"]), dict(state="reloaded", fresh_env=True))
    assert not ok and "state=restarted" in result["msg"]


def test_started_with_fresh_env_on_a_stopped_process_starts_it_again_from_the_ecosystem(pm2_env):
    ecosystem = str(pm2_env["app"] / "ecosystem.config.js")
    fake = FakePm2([recorded("jlist-online-stopped-errored.txt"),
                    jlist("jlist-online-stopped-errored.txt", cleanup_job={"status": "online"})])
    ok, _ = run(pm2_env, fake, dict(name="cleanup-job", state="started", fresh_env=True, ecosystem=ecosystem, wait=False))
    assert ok
    assert fake.argv == [["jlist"], ["delete", "cleanup-job"], ["start", ecosystem, "--only", "cleanup-job"], ["jlist"]]


def test_stopped_stops_an_online_process(pm2_env):
    fake = FakePm2([recorded("jlist-online-stopped-errored.txt"),
                    jlist("jlist-online-stopped-errored.txt", baileys_whatsapp_service={"status": "stopped", "pid": 0})])
    ok, result = run(pm2_env, fake, dict(state="stopped"))
    assert ok and result["changed"] and result["would"] == "stop"
    assert fake.argv == [["jlist"], ["stop", APP], ["jlist"]]
    assert result["process"]["status"] == "stopped" and "readiness" not in result


@pytest.mark.parametrize("name", ["cleanup-job", "boom"])
def test_stopped_when_stopped_or_errored_changes_nothing(pm2_env, name):
    fake = FakePm2([recorded("jlist-online-stopped-errored.txt")])
    ok, result = run(pm2_env, fake, dict(name=name, state="stopped"))
    assert ok and not result["changed"]
    assert fake.argv == [["jlist"]]


def test_stop_that_leaves_the_process_online_fails(pm2_env):
    fake = FakePm2([recorded("jlist-online-stopped-errored.txt")])
    ok, result = run(pm2_env, fake, dict(state="stopped"))
    assert not ok and "still online after `pm2 stop`" in result["msg"]


def test_absent_deletes_a_known_process(pm2_env):
    fake = FakePm2([recorded("jlist-online-stopped-errored.txt"), jlist("jlist-online-stopped-errored.txt", drop=[APP])])
    ok, result = run(pm2_env, fake, dict(state="absent"))
    assert ok and result["changed"] and result["process"] is None
    assert fake.argv == [["jlist"], ["delete", APP], ["jlist"]]


def test_absent_of_an_unknown_process_changes_nothing(pm2_env):
    fake = FakePm2([recorded("jlist-online-stopped-errored.txt")])
    ok, result = run(pm2_env, fake, dict(name="no-such-app", state="absent"))
    assert ok and not result["changed"] and "warnings" not in result
    assert fake.argv == [["jlist"]]


def test_absent_in_an_empty_daemon_warns_it_may_be_the_wrong_user(pm2_env):
    fake = FakePm2([recorded("jlist-first-run.txt")])
    ok, result = run(pm2_env, fake, dict(state="absent"))
    assert ok and not result["changed"]
    assert "each user has its own daemon, and this one runs no process at all" in result["warnings"][0]


@pytest.mark.parametrize("name,args,would", [
    (APP, dict(state="restarted"), "restart"),
    (APP, dict(state="reloaded"), "reload"),
    (APP, dict(state="stopped"), "stop"),
    (APP, dict(state="absent"), "delete"),
    (APP, dict(state="started"), "none"),
    ("cleanup-job", dict(state="started"), "start"),
    ("cleanup-job", dict(state="stopped"), "none"),
    ("not-yet-there", dict(state="started"), "start"),
])
def test_check_mode_runs_only_jlist_and_tells_what_would_be_done(pm2_env, name, args, would):
    fake = FakePm2([recorded("jlist-online-stopped-errored.txt")])
    args = dict(args, name=name, ecosystem=str(pm2_env["app"] / "ecosystem.config.js"), wait=False)
    ok, result = run(pm2_env, fake, args, check_mode=True)
    assert ok and result["would"] == would and result["changed"] == (would != "none")
    assert fake.argv == [["jlist"]]


def test_check_mode_skips_the_readiness_wait_when_something_would_be_done(pm2_env):
    fake = FakePm2([recorded("jlist-online-stopped-errored.txt")])
    ok, result = run(pm2_env, fake, dict(state="restarted", ecosystem=str(pm2_env["app"] / "ecosystem.config.js"),
                                         health_url="http://127.0.0.1:3011/health"), check_mode=True)
    assert ok and "readiness" not in result and fake.argv == [["jlist"]]


def test_diff_shows_the_status_before_and_after(pm2_env):
    fake = FakePm2([recorded("jlist-online-stopped-errored.txt")])
    ok, result = run(pm2_env, fake, dict(state="stopped"), check_mode=True, diff=True)
    assert ok and result["diff"] == {"before": "%s: online\n" % APP, "after": "%s: stopped\n" % APP}


# --- the other user's daemon ------------------------------------------------------------------------------


def test_unknown_process_names_the_user_and_pm2_home_of_the_daemon(pm2_env):
    fake = FakePm2([recorded("jlist-first-run.txt")])
    ok, result = run(pm2_env, fake, dict(state="stopped"))
    assert not ok
    user = pwd.getpwuid(os.geteuid()).pw_name
    assert result["msg"].startswith("no process %s in the PM2 daemon of user %s (PM2_HOME=%s): each user has its own daemon"
                                    % (APP, user, pm2_env["home"]))
    assert "runs no process at all" in result["msg"] and "become_user" in result["msg"]


def test_unknown_process_lists_what_the_daemon_runs(pm2_env):
    fake = FakePm2([recorded("jlist-online-stopped-errored.txt")])
    ok, result = run(pm2_env, fake, dict(name="other-app", state="restarted", fresh_env=False))
    assert not ok and "runs only: baileys-whatsapp-service, boom, cleanup-job" in result["msg"]
    assert "give ecosystem" in result["msg"]


def test_without_a_daemon_nothing_is_run_to_read(pm2_env):
    (pm2_env["home"] / "rpc.sock").unlink()
    fake = FakePm2(["unused"])
    ok, result = run(pm2_env, fake, dict(state="info"))
    assert ok and result["process"] is None and fake.calls == []
    assert "no daemon is running there" in result["warnings"][0]
    ok, result = run(pm2_env, fake, dict(state="stopped"))
    assert not ok and "no daemon is running there" in result["msg"] and fake.calls == []


def test_names_pm2_would_misread_are_refused(pm2_env):
    for name in ("all", "0", "--help"):
        ok, result = run(pm2_env, FakePm2(["[]"]), dict(name=name, state="stopped"))
        assert not ok and repr(name) in result["msg"]


# --- errors and the environment -----------------------------------------------------------------------------


def test_failing_command_message_carries_pm2_error_but_no_environment(pm2_env):
    noisy = recorded("jlist-online-stopped-errored.txt") + "\nPOSTGRES_PASSWORD=fixture-secret-123\n" + \
        "\x1b[31m[PM2][ERROR] \x1b[39mProcess or Namespace baileys-whatsapp-service not found\n"
    fake = FakePm2([recorded("jlist-online-stopped-errored.txt")], replies={"stop": (1, "", noisy)})
    ok, result = run(pm2_env, fake, dict(state="stopped"))
    assert not ok
    assert "`pm2 stop %s` failed (rc=1" % APP in result["msg"]
    assert "Process or Namespace baileys-whatsapp-service not found" in result["msg"]
    assert_no_env_value(result)


def test_secret_from_the_process_environment_is_hidden_even_in_plain_text(pm2_env):
    fake = FakePm2([recorded("jlist-online-stopped-errored.txt")],
                   replies={"stop": (1, "", "could not connect with fixture-secret-123 as password")})
    ok, result = run(pm2_env, fake, dict(state="stopped"))
    assert not ok and "with ******** as password" in result["msg"]


def test_start_that_creates_no_process_says_to_check_the_ecosystem(pm2_env):
    fake = FakePm2([recorded("jlist-first-run.txt")],
                   replies={"start": (0, "[PM2][WARN] No process found", "")})
    ecosystem = str(pm2_env["app"] / "ecosystem.config.js")
    ok, result = run(pm2_env, fake, dict(state="started", ecosystem=ecosystem, wait=False))
    assert not ok and "started no process named %s: is it defined in the ecosystem file?" % APP in result["msg"]


def test_missing_ecosystem_file_is_named(pm2_env):
    ok, result = run(pm2_env, FakePm2(["[]"]), dict(state="started", ecosystem=str(pm2_env["tmp"] / "nope.js")))
    assert not ok and "ecosystem %s does not exist" % (pm2_env["tmp"] / "nope.js") in result["msg"]


def test_bad_variable_names_are_named(pm2_env):
    ok, result = run(pm2_env, FakePm2(["[]"]), dict(state="info", env_check=["GOOD", "BAD NAME"]))
    assert not ok and "env_check" in result["msg"] and "'BAD NAME'" in result["msg"]


def test_env_check_reports_present_names_only(pm2_env):
    fake = FakePm2([recorded("jlist-online-stopped-errored.txt")])
    ok, result = run(pm2_env, fake, dict(state="info", env_check=["STALE_FLAG", "POSTGRES_PASSWORD", "NOT_THERE"]))
    assert ok and result["stale_env"] == ["STALE_FLAG", "POSTGRES_PASSWORD"]
    assert_no_env_value(result)


def test_fail_on_stale_env_names_the_variables_not_their_values(pm2_env):
    fake = FakePm2([recorded("jlist-online-stopped-errored.txt")])
    ok, result = run(pm2_env, fake, dict(state="info", env_check=["STALE_FLAG"], fail_on_stale_env=True))
    assert not ok and "still has STALE_FLAG in its environment" in result["msg"]
    assert_no_env_value(result)


def test_ecosystem_setting_a_variable_of_the_env_file_is_warned_about(pm2_env):
    env_file = pm2_env["tmp"] / "dot.env"
    env_file.write_text("NODE_ENV=staging\nUSE_DATABASE_AUTH_STATE=false\n")
    fake = FakePm2([recorded("jlist-first-run.txt"), recorded("jlist-out-of-date.txt")])
    ok, result = run(pm2_env, fake, dict(state="started", ecosystem=str(pm2_env["app"] / "ecosystem.config.js"),
                                         env_file=str(env_file), wait=False))
    # NODE_ENV comes from the ecosystem's env block; USE_DATABASE_AUTH_STATE from the recording's old shell.
    assert ok and "NODE_ENV, USE_DATABASE_AUTH_STATE" in result["warnings"][0]


# --- readiness ---------------------------------------------------------------------------------------------------


def health_doc(pid, **extra):
    doc = {"ready": True, "store": "files", "revision": None, "companies": 2,
           "digests": {"company1": "a" * 64, "company2": "b" * 64}, "registrationIds": {"company1": 1, "company2": 2},
           "errors": [], "startedAt": "2026-11-28T18:28:59Z", "pid": pid}
    doc.update(extra)
    return doc


def app_pid():
    return processes("jlist-online-stopped-errored.txt")[0]["pid"]


def test_ready_after_the_window_with_health_fields_and_digests(pm2_env):
    clock = FakeClock(app_started() + 1.0)  # up for 1s: 4 more to wait
    fake = FakePm2([recorded("jlist-online-stopped-errored.txt")])
    health = FakeHealth([(200, health_doc(app_pid()))])
    ok, result = run(pm2_env, fake, dict(state="started", health_url="http://127.0.0.1:3011/health",
                                         health_expect={"store": "files", "ready": True},
                                         expected_digests={"company1": "a" * 64, "company2": "b" * 64}),
                     clock=clock, health=health)
    assert ok and not result["changed"]
    assert result["readiness"]["ready"] and 4.0 <= result["readiness"]["waited_seconds"] <= 4.5
    assert {c["name"] for c in result["readiness"]["checks"]} == \
        {"status", "restarts_stable", "uptime", "health_http", "health_fields", "digests"}
    assert result["health"]["store"] == "files"
    assert health.urls[0] == "http://127.0.0.1:3011/health"
    assert set(map(tuple, fake.argv)) == {("jlist",)}


def test_crash_loop_is_not_ready_and_the_message_gives_the_restart_counts(pm2_env):
    clock = FakeClock(app_started() + 60)
    later = {"restarts": 5}

    def still_crashing():
        # After the two recordings, PM2 keeps restarting it: a new pid and start each time.
        later["restarts"] += 1
        return jlist("jlist-crashloop-2.txt", crashloop={"restart_time": later["restarts"], "pid": 7000 + later["restarts"],
                                                          "pm_uptime": int(clock.time() * 1000)})

    fake = FakePm2([recorded("jlist-crashloop-1.txt"), recorded("jlist-crashloop-2.txt"), still_crashing])
    ok, result = run(pm2_env, fake, dict(name="crashloop", state="info", wait=True, ready_timeout=10), clock=clock)
    assert not ok
    assert result["msg"].startswith("crashloop is not ready: not ready after 10s: restart count not stable: "
                                     "went from 2 to %d while waiting (crash loop?)" % later["restarts"])
    assert result["readiness"]["ready"] is False and result["readiness"]["waited_seconds"] == 10
    assert result["process"]["restarts"] == later["restarts"] > 20


def test_one_crash_then_a_stable_window_is_ready(pm2_env):
    clock = FakeClock(app_started() + 60)
    restarted = jlist("jlist-crashloop-2.txt", crashloop={"pm_uptime": int((app_started() + 60.5) * 1000)})
    fake = FakePm2([recorded("jlist-crashloop-1.txt"), restarted])
    ok, result = run(pm2_env, fake, dict(name="crashloop", state="info", wait=True), clock=clock)
    assert ok and result["readiness"]["ready"]
    assert "restart count stable at 5 (it went from 2 to 5 while waiting)" in \
        [c["detail"] for c in result["readiness"]["checks"]]


def test_errored_process_fails_at_once(pm2_env):
    clock = FakeClock(app_started() + 60)
    ok, result = run(pm2_env, FakePm2([recorded("jlist-online-stopped-errored.txt")]),
                     dict(name="boom", state="info", wait=True), clock=clock)
    assert not ok and "PM2 gave up on it (status errored after 1 restarts)" in result["msg"]
    assert result["readiness"]["waited_seconds"] == 0


def test_health_answered_by_another_pid_is_not_ready(pm2_env):
    health = FakeHealth([(200, health_doc(99999))])
    ok, result = run(pm2_env, FakePm2([recorded("jlist-online-stopped-errored.txt")]),
                     dict(state="started", health_url="http://127.0.0.1:3011/health", ready_timeout=3, ready_window=1),
                     health=health)
    assert not ok and "answered by pid 99999, but PM2 runs %s as pid %d" % (APP, app_pid()) in result["msg"]


def test_unready_health_answer_is_reported_with_its_errors(pm2_env):
    health = FakeHealth([(503, health_doc(app_pid(), ready=False, errors=["company7: creds.json is missing"]))])
    ok, result = run(pm2_env, FakePm2([recorded("jlist-online-stopped-errored.txt")]),
                     dict(state="started", health_url="http://127.0.0.1:3011/health", ready_timeout=3, ready_window=1),
                     health=health)
    assert not ok and "answered 503: company7: creds.json is missing" in result["msg"]


def test_digest_mismatch_fails_at_once_naming_at_most_20_companies(pm2_env):
    expected = {"c%02d" % i: "c" * 64 for i in range(25)}
    health = FakeHealth([(200, health_doc(app_pid()))])
    ok, result = run(pm2_env, FakePm2([recorded("jlist-online-stopped-errored.txt")]),
                     dict(state="started", health_url="http://127.0.0.1:3011/health", expected_digests=expected),
                     health=health)
    assert not ok
    assert "state digests differ for 27 companies: c00, c01" in result["msg"]
    assert "c19, ..." in result["msg"] and "c20" not in result["msg"]
    assert result["readiness"]["waited_seconds"] < 1


def test_health_field_mismatch_names_field_and_values(pm2_env):
    health = FakeHealth([(200, health_doc(app_pid(), store="postgres"))])
    ok, result = run(pm2_env, FakePm2([recorded("jlist-online-stopped-errored.txt")]),
                     dict(state="started", health_url="http://127.0.0.1:3011/health", health_expect={"store": "files"}),
                     health=health)
    assert not ok and 'store is "postgres", expected "files"' in result["msg"]


def test_health_returned_is_capped_and_without_secret_fields(pm2_env):
    digests = {"company%05d" % i: "d" * 64 for i in range(3000)}
    doc = health_doc(app_pid(), digests=digests, db_password="nope-123", note="uses fixture-secret-123")
    ok, result = run(pm2_env, FakePm2([recorded("jlist-online-stopped-errored.txt")]),
                     dict(state="started", health_url="http://127.0.0.1:3011/health"),
                     health=FakeHealth([(200, doc)]))
    assert ok
    assert result["health"]["digests"] == "<3000 entries omitted>" and result["health"]["omitted"] == ["digests"]
    assert "db_password" not in result["health"] and result["health"]["note"] == "uses ********"
    assert len(json.dumps(result["health"])) < 65536


def test_no_answer_from_the_health_url_times_out_with_the_reason(pm2_env):
    health = FakeHealth([(None, b"[Errno 111] Connection refused")])
    ok, result = run(pm2_env, FakePm2([recorded("jlist-online-stopped-errored.txt")]),
                     dict(state="started", health_url="http://127.0.0.1:3011/health", ready_timeout=2, ready_window=1),
                     health=health)
    assert not ok and "not ready after 2s" in result["msg"] and "Connection refused" in result["msg"]


def test_window_longer_than_the_timeout_is_refused(pm2_env):
    ok, result = run(pm2_env, FakePm2(["[]"]), dict(state="started", ready_window=30, ready_timeout=20))
    assert not ok and "ready_window (30.0s) must be shorter than ready_timeout (20.0s)" in result["msg"]


def test_info_reads_pm2_and_the_readiness_endpoint_once_in_one_task(pm2_env):
    health = FakeHealth([(503, health_doc(app_pid(), ready=False, store="postgres", errors=["loading"]))])
    fake = FakePm2([recorded("jlist-online-stopped-errored.txt")])
    ok, result = run(pm2_env, fake, dict(state="info", health_url="http://127.0.0.1:3011/health"), health=health)
    assert ok and not result["changed"]
    assert result["health_status"] == 503 and result["health"]["store"] == "postgres"
    assert health.urls == ["http://127.0.0.1:3011/health"] and "readiness" not in result
    assert result["process"]["status"] == "online"


def test_info_reports_a_readiness_endpoint_that_does_not_answer(pm2_env):
    ok, result = run(pm2_env, FakePm2([recorded("jlist-online-stopped-errored.txt")]),
                     dict(state="info", health_url="http://127.0.0.1:3011/health"), health=FakeHealth([(None, b"refused")]))
    assert ok and result["health_status"] is None and "health" not in result


# --- readiness first, digests when the application has computed them ----------------------------------------------

DIGESTS = {"company1": "a" * 64, "company2": "b" * 64}


def test_ready_at_is_when_readiness_was_first_seen_with_the_applications_own_time(pm2_env):
    clock = FakeClock(app_started() + 3600)
    health = FakeHealth([(200, health_doc(app_pid(), readyAt="2026-11-28T18:29:00.125Z"))])
    ok, result = run(pm2_env, FakePm2([recorded("jlist-online-stopped-errored.txt")]),
                     dict(state="started", health_url="http://127.0.0.1:3011/health", ready_window=1), clock=clock, health=health)
    assert ok
    readiness = result["readiness"]
    assert readiness["ready_at_epoch"] == round(clock.time(), 3)
    assert readiness["ready_at"].endswith("Z") and len(readiness["ready_at"]) == len("2026-11-28T18:29:00.125Z")
    assert readiness["app_ready_at"] == "2026-11-28T18:29:00.125Z"


def test_restart_asks_pm2_once_more_when_the_service_answers_ready(pm2_env):
    """The readiness endpoint is polled; `pm2 jlist` (a Node process) is run again only to confirm it."""
    ecosystem = str(pm2_env["app"] / "ecosystem.config.js")
    clock = FakeClock(app_started() + 0.3)  # the new run is up 0.3 s when PM2 is first asked
    answers = [(None, b"[Errno 111] Connection refused")] * 4 + [(200, health_doc(app_pid()))]
    fake = FakePm2([recorded("jlist-online-stopped-errored.txt")])
    ok, result = run(pm2_env, fake, dict(state="restarted", ecosystem=ecosystem, ready_window=1,
                                         health_url="http://127.0.0.1:3011/health"), clock=clock, health=FakeHealth(answers))
    assert ok and result["readiness"]["ready"]
    assert fake.argv == [["delete", APP], ["start", ecosystem, "--only", APP], ["jlist"], ["jlist"]]
    # Ready once up for the window: 0.3 s at the start, four polls of 0.05 s, then a wait for the rest of it.
    assert result["readiness"]["waited_seconds"] == pytest.approx(0.7, abs=0.01)


def test_digests_are_compared_once_the_application_has_computed_them_all(pm2_env):
    partial = health_doc(app_pid(), digests={"company1": "a" * 64}, digestsComplete=False)
    complete = health_doc(app_pid(), digestsComplete=True)
    health = FakeHealth([(200, partial), (200, partial), (200, partial), (200, complete)])
    ok, result = run(pm2_env, FakePm2([recorded("jlist-online-stopped-errored.txt")]),
                     dict(state="started", health_url="http://127.0.0.1:3011/health", ready_window=1,
                          expected_digests=DIGESTS), health=health)
    assert ok, result.get("msg")
    readiness = result["readiness"]
    assert readiness["ready"] and readiness["digests_waited_seconds"] == pytest.approx(0.75)
    assert readiness["digests_complete_at"] > readiness["ready_at"]
    assert {"name": "digests", "ok": True, "detail": "state digests of 2 companies match"} in readiness["checks"]


def test_digest_mismatch_found_after_readiness_fails_the_task(pm2_env):
    partial = health_doc(app_pid(), digests={}, digestsComplete=False)
    wrong = health_doc(app_pid(), digests={"company1": "a" * 64, "company2": "0" * 64}, digestsComplete=True)
    ok, result = run(pm2_env, FakePm2([recorded("jlist-online-stopped-errored.txt")]),
                     dict(state="started", health_url="http://127.0.0.1:3011/health", expected_digests=DIGESTS),
                     health=FakeHealth([(200, partial), (200, wrong)]))
    assert not ok and "state digests differ for 1 companies: company2" in result["msg"]
    assert result["readiness"]["ready"] is False and result["readiness"]["ready_at"]


def test_an_error_found_while_computing_the_digests_fails_the_task(pm2_env):
    partial = health_doc(app_pid(), digests={}, digestsComplete=False)
    broken = health_doc(app_pid(), ready=False, digestsComplete=False, errors=["company2: pre-key-7.json is not JSON"])
    ok, result = run(pm2_env, FakePm2([recorded("jlist-online-stopped-errored.txt")]),
                     dict(state="started", health_url="http://127.0.0.1:3011/health", expected_digests=DIGESTS),
                     health=FakeHealth([(200, partial), (503, broken)]))
    assert not ok
    assert "it was ready, then GET http://127.0.0.1:3011/health answered 503: company2: pre-key-7.json is not JSON" \
        in result["msg"]


def test_digests_never_complete_fail_after_digests_timeout(pm2_env):
    partial = health_doc(app_pid(), digests={}, digestsComplete=False)
    ok, result = run(pm2_env, FakePm2([recorded("jlist-online-stopped-errored.txt")]),
                     dict(state="started", health_url="http://127.0.0.1:3011/health", expected_digests=DIGESTS,
                          digests_timeout=3), health=FakeHealth([(200, partial)]))
    assert not ok and "its digests were not complete after 3s (digests_timeout)" in result["msg"]
    assert result["readiness"]["digests_waited_seconds"] == 3


def test_a_restart_while_computing_the_digests_fails_the_task(pm2_env):
    partial = health_doc(app_pid(), digests={}, digestsComplete=False)
    restarted = jlist("jlist-online-stopped-errored.txt", baileys_whatsapp_service={"pid": 55555, "restart_time": 9})
    fake = FakePm2([recorded("jlist-online-stopped-errored.txt"), recorded("jlist-online-stopped-errored.txt"), restarted])
    ok, result = run(pm2_env, fake, dict(state="started", health_url="http://127.0.0.1:3011/health",
                                         expected_digests=DIGESTS),
                     health=FakeHealth([(200, partial), (None, b"[Errno 111] Connection refused")]))
    assert not ok and "it went down while computing its digests (PM2 status online, pid 55555)" in result["msg"]
