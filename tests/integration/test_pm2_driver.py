"""PM2 driven from one Node process (module_utils/baileys_dr_pm2_driver.py) against the real PM2.

The driver must do what the CLI does (same statuses, same environment for a start, the same errors), never
spawn a daemon, leave the daemon running when it ends, and hand the commands to the CLI when it cannot run.
"""

from __future__ import annotations

import json
import os
import subprocess

from module_harness import set_module_args
from test_pm2_real import DIGESTS, SECRET, environ_of, make_app, pm2_bin, pm2_home  # noqa: F401 (fixtures)

from ansible.module_utils import baileys_dr_pm2 as pm2
from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.baileys_dr_pm2_driver import Pm2Driver, pm2_package_of, request_of


def a_module():
    """A real AnsibleModule: the CLI runs through its run_command when the driver cannot."""
    with set_module_args({}):
        return AnsibleModule(argument_spec={})


def driver_for(app):
    return Pm2Driver(a_module(), app.pm2_bin, app.pm2_home)


def cli_list(app):
    out = subprocess.run([app.pm2_bin, "jlist"], env=dict(os.environ, PM2_HOME=app.pm2_home), check=True,
                         capture_output=True, text=True, timeout=60).stdout
    return pm2.find_instances(pm2.parse_jlist(out), app.name)


def test_a_fresh_env_restart_with_its_readiness_wait_runs_in_one_node_process(make_app, monkeypatch):
    app = make_app("drv-restart")
    ok, result = app.module(**app.start_args(state="started"))
    assert ok, result.get("msg")
    # The service's account still has a stale flag exported: the driver's start must leave it out, as the CLI does.
    monkeypatch.setenv("STALE_FLAG", "1")
    ok, result = app.module(**app.start_args(state="restarted", env_remove=["STALE_FLAG"],
                                             health_expect={"store": "files", "stale": False}, expected_digests=DIGESTS))
    assert ok, result.get("msg")
    assert result["pm2_runner"].startswith("one node process (pm2 ")
    assert [argv[1] for argv in result["commands"]] == ["delete", "start", "jlist"]
    environ = environ_of(result["process"]["pid"])
    assert b"STALE_FLAG" not in environ and environ[b"NODE_ENV"] == b"test"
    assert os.environ["STALE_FLAG"] == "1"  # left out for the start only
    assert app.health()["pid"] == result["process"]["pid"]
    assert SECRET not in json.dumps(result)


def test_the_driver_sees_and_does_what_the_cli_does_and_the_daemon_outlives_it(make_app):
    app = make_app("drv-same")
    assert app.module(**app.start_args(state="started"))[0]
    with driver_for(app) as driver:
        listed = pm2.find_instances(driver.jlist(), app.name)
        assert [p["pid"] for p in listed] == [p["pid"] for p in cli_list(app)]
        driver.check(["stop", app.name])
        assert pm2.status_of(cli_list(app)) == "stopped"
        driver.check(["delete", app.name])
        assert cli_list(app) == []
        driver.check(["start", str(app.root / "ecosystem.config.js"), "--only", app.name], cwd=str(app.root))
        assert driver.version and "node process" in driver.description
    # Closed: the daemon and the application run on.
    assert pm2.status_of(cli_list(app)) == "online"
    assert os.path.exists(os.path.join(app.pm2_home, "rpc.sock"))


def test_a_failing_command_fails_with_pm2s_own_message(make_app):
    app = make_app("drv-fail")
    assert app.module(**app.start_args(state="started"))[0]
    with driver_for(app) as driver:
        rc, out, err = driver.run(["stop", "no-such-process"])
        assert rc == 1 and "not found" in err
        try:
            driver.check(["delete", "no-such-process"])
        except pm2.Pm2Error as exc:
            assert "`pm2 delete no-such-process` failed (rc=1" in str(exc)
        else:
            raise AssertionError("deleting an unknown process succeeded")
        assert driver.version  # a failed command leaves the driver usable
        assert pm2.find_instances(driver.jlist(), app.name)


def test_without_a_daemon_the_cli_runs_and_no_daemon_is_spawned(pm2_bin, tmp_path):  # noqa: F811
    home = str(tmp_path / "pm2")
    os.mkdir(home)
    with Pm2Driver(a_module(), pm2_bin, home) as driver:
        assert driver.jlist() == []
        assert not driver.connect()
        assert driver.description == "pm2 CLI (no PM2 daemon runs in %s)" % home
    assert not os.path.exists(os.path.join(home, "rpc.sock"))


def test_only_the_commands_the_driver_knows_go_to_it(pm2_bin):  # noqa: F811
    assert pm2_package_of(pm2_bin) and os.path.isfile(os.path.join(pm2_package_of(pm2_bin), "package.json"))
    assert pm2_package_of("/bin/sh") is None
    assert request_of(["jlist"], None, ()) == {"op": "jlist"}
    assert request_of(["stop", "svc"], None, ()) == {"op": "stop", "name": "svc"}
    assert request_of(["start", "/srv/app/ecosystem.config.js", "--only", "svc"], "/srv/app", ["X"]) == {
        "op": "start", "file": "/srv/app/ecosystem.config.js", "only": "svc", "cwd": "/srv/app", "env_remove": ["X"]}
    # A relative ecosystem, extra flags or other commands keep the CLI's own parsing.
    assert request_of(["start", "ecosystem.config.js", "--only", "svc"], "/srv/app", ()) is None
    assert request_of(["restart", "svc", "--update-env"], None, ()) is None
    assert request_of(["kill"], None, ()) is None
