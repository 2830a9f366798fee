"""baileys_pm2_process against the real PM2 (the pinned test-bed install) in a throwaway PM2_HOME.

The application is a tiny Node HTTP server that reads its .env the way dotenv does (a variable already
in the environment wins) and says on /health which store that gives and whether STALE_FLAG exists in
its environment: enough to show PM2's environment trap and that fresh_env gets out of it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import urllib.request

import pytest

import baileys_pm2_process as pm2_process
from conftest import ROOT
from module_harness import run_module
from pgcluster import free_port

from ansible.module_utils import baileys_dr_pm2 as pm2

APP_JS = r"""'use strict';
const fs = require('fs');
const http = require('http');
const path = require('path');
// dotenv's rule: a variable already in the environment wins over .env.
for (const line of fs.readFileSync(path.join(__dirname, '.env'), 'utf8').split('\n')) {
  const m = line.match(/^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$/);
  if (m && !(m[1] in process.env)) process.env[m[1]] = m[2];
}
const crashAfter = Number(process.env.CRASH_AFTER_MS || 0);
if (crashAfter) setTimeout(() => process.exit(3), crashAfter);
const digests = JSON.parse(fs.readFileSync(path.join(__dirname, 'digests.json'), 'utf8'));
const store = process.env.USE_DATABASE_AUTH_STATE === 'true' ? 'postgres' : 'files';
// Like the service: ready at once, its digests computed in the background for DIGESTS_AFTER_MS (then complete).
const readyAt = new Date().toISOString();
const digestsAfter = Number(process.env.DIGESTS_AFTER_MS || 0);
http.createServer((req, res) => {
  if (req.url !== '/health') { res.writeHead(404); res.end(); return; }
  const complete = process.uptime() * 1000 >= digestsAfter;
  const body = { ready: true, store, pid: process.pid, stale: 'STALE_FLAG' in process.env, errors: [], readyAt,
                 digests: complete ? digests : {}, digestsComplete: complete };
  res.writeHead(200, { 'content-type': 'application/json' });
  res.end(JSON.stringify(body));
}).listen(Number(process.env.HEALTH_PORT), '127.0.0.1');
"""

ECOSYSTEM = """module.exports = { apps: [{
  name: '%s', script: 'app.js', cwd: __dirname, autorestart: true,
  min_uptime: 100, restart_delay: 200, kill_timeout: 3000, env: { NODE_ENV: 'test' },
}]};
"""

DIGESTS = {"company1": "1" * 64, "company2": "2" * 64}
SECRET = "it-secret-789"


@pytest.fixture(scope="module")
def pm2_bin():
    path = os.environ.get("PM2_BIN")
    if not path:
        out = subprocess.run([os.path.join(ROOT, "testbed", "bin", "install-node-deps"), "--pm2-only"],
                             check=True, capture_output=True, text=True).stdout
        path = [ln.split("=", 1)[1] for ln in out.splitlines() if ln.startswith("PM2_BIN=")][0]
    return path


def kill_daemon(pm2_bin, home):
    subprocess.run([pm2_bin, "kill"], env=dict(os.environ, PM2_HOME=home), capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pm2_home(pm2_bin):
    """A PM2_HOME of its own (short: rpc.sock paths are limited to 107 bytes); its daemon is killed at the end."""
    home = tempfile.mkdtemp(prefix="bdr-pm2-")
    yield home
    kill_daemon(pm2_bin, home)
    shutil.rmtree(home, ignore_errors=True)


class App:
    def __init__(self, root, name, pm2_bin, pm2_home, **env):
        self.root, self.name, self.pm2_bin, self.pm2_home = root, name, pm2_bin, pm2_home
        self.port = free_port()
        root.mkdir()
        (root / "app.js").write_text(APP_JS)
        (root / "ecosystem.config.js").write_text(ECOSYSTEM % name)
        (root / "digests.json").write_text(json.dumps(DIGESTS))
        self.write_env(**env)

    def write_env(self, **env):
        values = dict(HEALTH_PORT=str(self.port), USE_DATABASE_AUTH_STATE="false", POSTGRES_PASSWORD=SECRET)
        values.update(env)
        (self.root / ".env").write_text("".join("%s=%s\n" % item for item in values.items()))

    @property
    def url(self):
        return "http://127.0.0.1:%d/health" % self.port

    def health(self):
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(self.url, timeout=5) as resp:
            return json.load(resp)

    def module(self, check_mode=False, **args):
        params = dict(name=self.name, pm2_bin=self.pm2_bin, pm2_home=self.pm2_home, ready_window=1, ready_timeout=30)
        params.update(args)
        return run_module(pm2_process, params, check_mode=check_mode)

    def start_args(self, **args):
        return dict(ecosystem=str(self.root / "ecosystem.config.js"), env_file=str(self.root / ".env"),
                    health_url=self.url, **args)

    def pm2(self, *args, env):
        return subprocess.run([self.pm2_bin] + list(args), cwd=self.root, env=dict(env, PM2_HOME=self.pm2_home),
                              check=True, capture_output=True, text=True, timeout=60)


@pytest.fixture
def make_app(tmp_path, pm2_bin, pm2_home):
    apps = []

    def make(name, **env):
        app = App(tmp_path / name, name, pm2_bin, pm2_home, **env)
        apps.append(app)
        return app

    yield make
    for app in apps:
        subprocess.run([pm2_bin, "delete", app.name], env=dict(os.environ, PM2_HOME=pm2_home), capture_output=True)


def environ_of(pid):
    with open("/proc/%d/environ" % pid, "rb") as handle:
        return dict(item.split(b"=", 1) for item in handle.read().split(b"\0") if b"=" in item)


def test_started_from_the_ecosystem_is_ready_and_a_second_run_changes_nothing(make_app):
    app = make_app("it-start")
    ok, result = app.module(**app.start_args(state="started", health_expect={"store": "files"}, expected_digests=DIGESTS))
    assert ok, result.get("msg")
    assert result["changed"] and result["would"] == "start"
    assert result["readiness"]["ready"] and result["process"]["status"] == "online"
    assert result["health"]["pid"] == result["process"]["pid"] and result["health"]["store"] == "files"
    assert result["commands"][-2][1:] == ["start", str(app.root / "ecosystem.config.js"), "--only", app.name]
    assert SECRET not in json.dumps(result)
    ok, again = app.module(**app.start_args(state="started"))
    assert ok and not again["changed"] and again["process"]["pid"] == result["process"]["pid"]
    assert [argv[1:] for argv in again["commands"]] == [["jlist"]]


def test_fresh_env_restart_really_removes_a_stale_variable(make_app, monkeypatch):
    app = make_app("it-fresh")
    # Long ago an operator started the service from a shell that had the old flags exported.
    old_shell = dict(os.environ, STALE_FLAG="1", USE_DATABASE_AUTH_STATE="true")
    app.pm2("start", "ecosystem.config.js", "--only", app.name, env=old_shell)
    ok, result = app.module(state="info", wait=True, health_url=app.url, env_check=["STALE_FLAG", "USE_DATABASE_AUTH_STATE"])
    assert ok and result["stale_env"] == ["STALE_FLAG", "USE_DATABASE_AUTH_STATE"]
    assert app.health()["stale"] is True and app.health()["store"] == "postgres"  # the environment beat .env

    # The trap: restart --update-env from a clean shell keeps both variables.
    clean_shell = {k: v for k, v in os.environ.items() if k not in ("STALE_FLAG", "USE_DATABASE_AUTH_STATE")}
    app.pm2("restart", app.name, "--update-env", env=clean_shell)
    ok, result = app.module(state="info", wait=True, health_url=app.url, env_check=["STALE_FLAG"], fail_on_stale_env=True)
    assert not ok and "still has STALE_FLAG in its environment" in result["msg"]
    assert app.health()["stale"] is True and app.health()["store"] == "postgres"

    # Without fresh_env the module's restart keeps them too, and says so.
    ok, result = app.module(state="restarted", fresh_env=False, env_check=["STALE_FLAG"], fail_on_stale_env=True)
    assert not ok and "STALE_FLAG" in result["msg"] and result["would"] == "restart"

    # fresh_env, run from an environment that still has both: .env names and env_remove are left out.
    monkeypatch.setenv("STALE_FLAG", "1")
    monkeypatch.setenv("USE_DATABASE_AUTH_STATE", "true")
    ok, result = app.module(**app.start_args(state="restarted", env_remove=["STALE_FLAG"],
                                             env_check=["STALE_FLAG", "USE_DATABASE_AUTH_STATE"], fail_on_stale_env=True,
                                             health_expect={"store": "files", "stale": False}, expected_digests=DIGESTS))
    assert ok, result.get("msg")
    assert result["changed"] and result["stale_env"] == []
    # Deleted without reading the list first (one Node process less while the service is down).
    assert [argv[1] for argv in result["commands"]] == ["delete", "start", "jlist"]
    pid = result["process"]["pid"]
    environ = environ_of(pid)
    assert b"STALE_FLAG" not in environ and b"USE_DATABASE_AUTH_STATE" not in environ
    assert environ[b"NODE_ENV"] == b"test"
    assert app.health() == dict(app.health(), pid=pid, stale=False, store="files")
    assert SECRET not in json.dumps(result)


def test_stopped_and_absent_are_idempotent_and_check_mode_changes_nothing(make_app):
    app = make_app("it-stop")
    ok, _ = app.module(**app.start_args(state="started"))
    assert ok
    ok, result = app.module(state="stopped", check_mode=True)
    assert ok and result["changed"] and result["would"] == "stop" and result["process"]["status"] == "online"
    assert [argv[1:] for argv in result["commands"]] == [["jlist"]]
    ok, result = app.module(state="stopped")
    assert ok and result["changed"] and result["process"]["status"] == "stopped" and result["process"]["pid"] is None
    ok, result = app.module(state="stopped")
    assert ok and not result["changed"]
    ok, result = app.module(state="absent")
    assert ok and result["changed"] and result["process"] is None
    ok, result = app.module(state="absent")
    assert ok and not result["changed"]


def test_crash_loop_fails_readiness_with_the_restart_counts(make_app):
    app = make_app("it-crash", CRASH_AFTER_MS="400")
    # 15 s: on a loaded 2-core machine a node start can take seconds, and three restarts must fit in the timeout.
    ok, result = app.module(**app.start_args(state="started", ready_window=2, ready_timeout=15))
    assert not ok
    assert result["msg"].startswith("it-crash is not ready: not ready after 15s: ")
    assert "restart count not stable: went from" in result["msg"] and "(crash loop?)" in result["msg"]
    assert result["readiness"]["ready"] is False and result["process"]["restarts"] >= 3


def test_another_users_daemon_is_named_in_the_error(make_app, pm2_bin):
    app = make_app("it-other")
    ok, _ = app.module(**app.start_args(state="started"))
    assert ok
    other = tempfile.mkdtemp(prefix="bdr-pm2o-")
    try:
        # No daemon there: nothing is spawned to read, and the message says so.
        ok, result = app.module(state="stopped", pm2_home=other)
        assert not ok and "no process it-other in the PM2 daemon of user" in result["msg"]
        assert "(PM2_HOME=%s): each user has its own daemon" % other in result["msg"]
        assert "no daemon is running there" in result["msg"]
        assert not os.path.exists(os.path.join(other, "rpc.sock"))
        # A running daemon that has never heard of the process (what another user sees).
        subprocess.run([pm2_bin, "ping"], env=dict(os.environ, PM2_HOME=other), check=True, capture_output=True)
        ok, result = app.module(state="restarted", fresh_env=False, pm2_home=other)
        assert not ok and "(PM2_HOME=%s): each user has its own daemon, and this one runs no process at all" % other \
            in result["msg"]
    finally:
        kill_daemon(pm2_bin, other)
        shutil.rmtree(other, ignore_errors=True)


def test_real_first_run_banner_is_parsed(pm2_bin):
    home = tempfile.mkdtemp(prefix="bdr-pm2b-")
    try:
        out = subprocess.run([pm2_bin, "jlist"], env=dict(os.environ, PM2_HOME=home), check=True,
                             capture_output=True, text=True).stdout
        assert "[PM2]" in out
        assert pm2.parse_jlist(out) == []
    finally:
        kill_daemon(pm2_bin, home)
        shutil.rmtree(home, ignore_errors=True)


def test_ready_is_noted_when_seen_and_the_digests_are_compared_once_the_application_has_them_all(make_app):
    # Digests 4 s after the start: "ready" is seen well before them even when polls are slow on a loaded machine.
    app = make_app("it-lazy", DIGESTS_AFTER_MS="4000")
    ok, result = app.module(**app.start_args(state="started", health_expect={"store": "files", "ready": True},
                                             expected_digests=DIGESTS))
    assert ok, result.get("msg")
    readiness = result["readiness"]
    # Ready (every check but the digests) well before the digests were complete, and both times recorded.
    assert readiness["ready_at"] < readiness["digests_complete_at"]
    assert readiness["digests_waited_seconds"] >= 0.5
    assert readiness["app_ready_at"].endswith("Z")
    assert {"name": "digests", "ok": True, "detail": "state digests of 2 companies match"} in readiness["checks"]

    # The same application with other digests: ready, then the comparison fails the task.
    (app.root / "digests.json").write_text(json.dumps(dict(DIGESTS, company2="0" * 64)))
    ok, result = app.module(**app.start_args(state="restarted", health_expect={"store": "files", "ready": True},
                                             expected_digests=DIGESTS))
    assert not ok and "state digests differ for 1 companies: company2" in result["msg"]
    assert result["readiness"]["ready_at"] and result["readiness"]["ready"] is False
