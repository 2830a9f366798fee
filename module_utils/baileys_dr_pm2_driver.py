# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""PM2 driven from one Node process: the runner of the store switch's critical section.

Every `pm2` CLI run starts Node, loads PM2 and connects to the daemon: 0.4-0.8 s each, and a switch runs several
while the service is down (stop, delete, start, the readiness samples). Pm2Driver keeps one Node process that
loads PM2's programmatic API once and holds one connection to the daemon; the commands the engines give it
(`jlist`, `stop NAME`, `delete NAME`, `restart NAME`, `reload NAME`, `start ECOSYSTEM --only NAME`) go to that
process as JSON lines and run in a few milliseconds. Any other command, or any command when the driver cannot
start (no `node`, a pm2_bin that does not lead to PM2's package, no daemon), runs through the CLI as
Pm2Runner runs it: the driver is a speed-up, never a second behaviour.

The driver is spawned only when the daemon runs (rpc.sock), so that it never spawns one itself, and as the
same account as the CLI would run (the `wrap` given, setpriv to the application's user when root). Its
environment is this process's, as the CLI's is; `start` leaves out env_remove for that one call, as
Pm2Runner does. PM2's own printing goes to the driver's stderr, kept (scrubbed) for error messages only.
"""

from __future__ import annotations

import collections
import json
import os
import select
import shutil
import subprocess
import threading
import time

from ansible.module_utils.baileys_dr_pm2 import Pm2Runner, scrub_output

# The Node side. argv[1]: PM2's package directory. Answers go to the real stdout; PM2 prints (console.log and
# process.stdout.write) to stderr, so that nothing it prints can be read as an answer.
DRIVER_JS = r"""
'use strict';
const answerOut = process.stdout.write.bind(process.stdout);
process.stdout.write = process.stderr.write.bind(process.stderr);
const pkg = process.argv[1];
const pm2 = require(pkg);
const answer = (doc) => answerOut(JSON.stringify(doc) + '\n');
const text = (err) => (err && (err.message || String(err))) || 'failed';
const call = (fn) => new Promise((resolve) => fn((err, value) => resolve([err, value])));

async function handle(req) {
  const done = (rc, out, err) => answer({ id: req.id, rc, out: out || '', err: err || '' });
  let res;
  switch (req.op) {
    case 'jlist':
      res = await call((cb) => pm2.list(cb));
      return res[0] ? done(1, '', text(res[0])) : done(0, JSON.stringify(res[1]));
    case 'stop':
      res = await call((cb) => pm2.stop(req.name, cb));
      break;
    case 'delete':
      res = await call((cb) => pm2.delete(req.name, cb));
      break;
    case 'restart':
      res = await call((cb) => pm2.restart(req.name, {}, cb));
      break;
    case 'reload':
      res = await call((cb) => pm2.reload(req.name, {}, cb));
      break;
    case 'start': {
      // As `cd CWD && env -u NAME... pm2 start FILE --only NAME`: PM2 takes the app's environment from ours.
      const saved = {};
      for (const name of req.env_remove || []) {
        if (name in process.env) { saved[name] = process.env[name]; delete process.env[name]; }
      }
      const cwd = process.cwd();
      try {
        process.chdir(req.cwd);
        res = await call((cb) => pm2.start(req.file, { only: req.only }, cb));
      } catch (err) {
        res = [err];
      } finally {
        process.chdir(cwd);
        Object.assign(process.env, saved);
      }
      break;
    }
    default:
      return done(2, '', 'unknown op ' + String(req.op));
  }
  return res[0] ? done(1, '', text(res[0])) : done(0, '');
}

pm2.connect((err) => {
  if (err) { answer({ ready: false, err: text(err) }); process.exit(1); }
  answer({ ready: true, version: require(pkg + '/package.json').version });
  let queue = Promise.resolve();
  require('readline').createInterface({ input: process.stdin })
    .on('line', (line) => {
      queue = queue.then(() => {
        let req;
        try { req = JSON.parse(line); } catch (e) { return answer({ id: null, rc: 2, err: 'not JSON' }); }
        return handle(req).catch((e) => answer({ id: req.id, rc: 1, err: text(e) }));
      });
    })
    .on('close', () => queue.then(() => pm2.disconnect(() => process.exit(0))));
});
"""

NAMED_OPS = ("stop", "delete", "restart", "reload")


def pm2_package_of(pm2_bin):
    """PM2's package directory behind pm2_bin (its bin/pm2, maybe through symlinks), or None."""
    real = os.path.realpath(pm2_bin)
    package = os.path.dirname(os.path.dirname(real))
    try:
        with open(os.path.join(package, "package.json")) as handle:
            name = json.load(handle).get("name")
    except (OSError, ValueError, AttributeError):
        return None
    return package if name == "pm2" and os.path.basename(os.path.dirname(real)) == "bin" else None


def request_of(args, cwd, env_remove):
    """The driver request for a CLI argv, or None when the CLI must run it."""
    args = list(args)
    if args == ["jlist"]:
        return {"op": "jlist"}
    if len(args) == 2 and args[0] in NAMED_OPS:
        return {"op": args[0], "name": args[1]}
    if len(args) == 4 and args[0] == "start" and args[2] == "--only" and os.path.isabs(args[1]):
        return {"op": "start", "file": args[1], "only": args[3], "cwd": cwd or os.getcwd(),
                "env_remove": list(env_remove)}
    return None


class Pm2Driver(Pm2Runner):
    """A Pm2Runner whose commands run in one long-lived Node process connected to the daemon (see the module
    docstring); use it as a context manager, or close() it."""

    ready_timeout = 30.0
    answer_timeout = 300.0  # a stop waits for the application's kill_timeout; a start for PM2 to fork it

    def __init__(self, module, pm2_bin, pm2_home, wrap=None):
        super().__init__(module, pm2_bin, pm2_home)
        self.wrap = wrap or (lambda argv, environ_update: (argv, environ_update))
        self.proc = None
        self.version = None
        self.cli_reason = None  # why the CLI runs the commands, once the driver could not start
        self.stderr = collections.deque(maxlen=100)
        self._buffer = b""
        self._next_id = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def description(self):
        """What runs the commands: for the module's result."""
        if self.version:
            return "one node process (pm2 %s API)" % self.version
        return "pm2 CLI%s" % (" (%s)" % self.cli_reason if self.cli_reason else "")

    # -- the Node process ---------------------------------------------------------------------------

    def connect(self):
        """Start the driver once (True when it runs); on any failure, record why and leave the commands to the CLI."""
        if self.proc is not None or self.cli_reason:
            return self.proc is not None
        if not self.daemon_running():
            # Connecting would spawn a daemon; the CLI is left to do what it does without one.
            self.cli_reason = "no PM2 daemon runs in %s" % self.pm2_home
            return False
        package = pm2_package_of(self.pm2_bin)
        node = shutil.which("node")
        if package is None or node is None:
            self.cli_reason = ("%s does not lead to PM2's package" % self.pm2_bin) if package is None \
                else "no node in PATH"
            return False
        environ_update = dict(getattr(self.module, "run_command_environ_update", None) or {}, PM2_HOME=self.pm2_home)
        argv, environ_update = self.wrap([node, "-e", DRIVER_JS, package], environ_update)
        env = dict(os.environ, **(environ_update or {}))
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, env=env, cwd="/", close_fds=True)
        except OSError as exc:
            self.cli_reason = "node could not start: %s" % exc
            return False
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        hello = self._read_line(time.monotonic() + self.ready_timeout)
        if not hello or not hello.get("ready"):
            self.cli_reason = "the driver did not connect: %s" % (
                (hello or {}).get("err") or self._stderr_text() or "no answer in %ds" % self.ready_timeout)
            self._kill()
            return False
        self.version = str(hello.get("version") or "?")
        return True

    def _drain_stderr(self):
        for line in iter(self.proc.stderr.readline, b""):
            self.stderr.append(line.decode("utf-8", "replace").rstrip("\n"))

    def _stderr_text(self):
        return scrub_output("\n".join(self.stderr), self.secrets, limit=600)

    def _read_line(self, deadline):
        """The next JSON line from the driver, or None on timeout or end of output."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            doc = json.loads(line.decode("utf-8"))
        except ValueError:
            return None
        return doc if isinstance(doc, dict) else None

    def _kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def close(self):
        """End the driver: stdin closed, it disconnects from the daemon (which keeps running) and exits."""
        if self.proc is None:
            return
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self._kill()

    # -- the runner interface -----------------------------------------------------------------------

    def run(self, args, cwd=None, env_remove=()):
        request = request_of(args, cwd, env_remove)
        if request is None or not self.connect():
            return super().run(args, cwd=cwd, env_remove=env_remove)
        self.record(args)
        self._next_id += 1
        request["id"] = self._next_id
        try:
            self.proc.stdin.write((json.dumps(request) + "\n").encode("utf-8"))
            self.proc.stdin.flush()
        except OSError:
            # Nothing reached PM2: the CLI runs the command as it always did.
            self.cli_reason = "the driver exited: %s" % (self._stderr_text() or "no output")
            self._kill()
            self.commands.pop()
            return super().run(args, cwd=cwd, env_remove=env_remove)
        answer = self._read_line(time.monotonic() + self.answer_timeout)
        if answer is None or answer.get("id") != request["id"]:
            # The command may have run: say so rather than run it again.
            detail = self._stderr_text() or "no output"
            self.cli_reason = "the driver stopped answering"
            self._kill()
            return 1, "", "PM2 driver gave no answer to `pm2 %s` within %ds: %s" % (
                " ".join(args), self.answer_timeout, detail)
        return int(answer.get("rc", 1)), str(answer.get("out") or ""), str(answer.get("err") or "")
