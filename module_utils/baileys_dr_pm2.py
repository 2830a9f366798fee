# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""PM2 for the baileys-dr modules: the CLI runner, `pm2 jlist` parsing and readiness.

Nothing here ever returns an environment value: `pm2 jlist` carries every
variable of every process (pm2_env.env, and the same variables again at the top
level of pm2_env), secrets included. Process summaries pick named fields only;
command output shown in an error goes through scrub_output first.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import urllib.error as urllib_error
import urllib.request as urllib_request

from ansible.module_utils.baileys_dr_dotenv import DotenvDocument
from ansible.module_utils.baileys_dr_secrets import MASK, is_secret_name, mask_values

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Statuses in which PM2 keeps the process up (or is bringing it up again).
RUNNING_STATUSES = frozenset(["online", "launching", "waiting restart"])
# Statuses in which the process is not running and PM2 will not start it by itself.
DOWN_STATUSES = frozenset(["stopped", "errored", "one-launch-status"])


class Pm2Error(Exception):
    """An error whose message is safe to show (no environment values)."""


# --- pm2 jlist ------------------------------------------------------------------------------------

def _is_process_list(value):
    return isinstance(value, list) and all(isinstance(item, dict) and "name" in item for item in value)


def parse_jlist(text):
    """The process list in the output of `pm2 jlist`.

    The output can carry other lines before and after the array: the first-run
    banner (lines starting with "[PM2]", coloured or not), ">>>> In-memory PM2 is
    out-of-date" and PM2 notices, some holding bracketed text such as "[ 0, 1 ]".
    Every "[" is tried as the start of a JSON value; the longest decoded list of
    process objects wins (an empty list counts when nothing else is found).
    """
    decoder = json.JSONDecoder()
    best = None
    position = text.find("[")
    while position != -1:
        try:
            value, end = decoder.raw_decode(text, position)
        except ValueError:
            position = text.find("[", position + 1)
            continue
        if _is_process_list(value) and (best is None or end - position > best[0]):
            best = (end - position, value)
        # Arrays nested in this value are parts of it, never the list itself.
        position = text.find("[", end)
    if best is None:
        raise Pm2Error("pm2 jlist printed no JSON process list")
    return best[1]


def find_instances(processes, name):
    """Entries of processes named name (one per instance), by pm_id."""
    found = [proc for proc in processes if proc.get("name") == name]
    return sorted(found, key=lambda proc: proc.get("pm_id") if isinstance(proc.get("pm_id"), int) else 0)


def _env(proc):
    return proc.get("pm2_env") or {}


def status_of(instances):
    """One status for all instances: the first that is not online, else online."""
    statuses = [_env(proc).get("status") or "unknown" for proc in instances]
    for status in statuses:
        if status != "online":
            return status
    return "online" if statuses else "absent"


def restart_count(instances):
    return sum(int(_env(proc).get("restart_time") or 0) for proc in instances)


def uptime_seconds(proc, now):
    """Seconds since PM2 last started the process (pm_uptime is an epoch in ms), or None when not running."""
    env = _env(proc)
    started = env.get("pm_uptime")
    if env.get("status") not in RUNNING_STATUSES or not isinstance(started, (int, float)):
        return None
    return max(0.0, round(now - started / 1000.0, 3))


def summarize(proc, now):
    """The safe facts about one PM2 process: never any environment value."""
    env = _env(proc)
    started = env.get("pm_uptime")
    versioning = env.get("versioning") if isinstance(env.get("versioning"), dict) else {}
    started_at = None
    if isinstance(started, (int, float)):
        started_at = datetime.datetime.fromtimestamp(started / 1000.0, datetime.timezone.utc).isoformat()
    return {
        "name": proc.get("name"),
        "pid": proc.get("pid") or None,
        "pm_id": proc.get("pm_id"),
        "status": env.get("status"),
        "restarts": env.get("restart_time"),
        "unstable_restarts": env.get("unstable_restarts"),
        "uptime_seconds": uptime_seconds(proc, now),
        "started_at": started_at,
        "revision": versioning.get("revision"),
        "exec_cwd": env.get("pm_cwd") or env.get("cwd"),
    }


def env_names(proc):
    """Names (only) of the variables PM2 gives the process."""
    env = _env(proc).get("env")
    return set(env) if isinstance(env, dict) else set()


def secret_values(pairs):
    """Values to hide in messages: of secret-looking names, and any long value, but never a path.

    Short common values ("false" of USE_DATABASE_AUTH_STATE, "postgres") are left alone, or every message would be masked;
    messages never carry NAME=value or JSON anyway (scrub_output).
    """
    values = set()
    for name, value in pairs:
        if not isinstance(value, str):
            continue
        if value.startswith("/"):
            continue
        if (is_secret_name(name) and len(value) >= 6) or len(value) >= 12:
            values.add(value)
    return values


def env_values(processes):
    """The values of process environments that scrub_output must hide."""
    pairs = []
    for proc in processes:
        # pm2_env repeats these variables at its top level, among PM2's own fields (names, paths).
        env = _env(proc).get("env")
        if isinstance(env, dict):
            pairs.extend(env.items())
    return secret_values(pairs) - {proc.get("name") for proc in processes}


# --- .env files ------------------------------------------------------------------------------------

def read_env_file(path):
    """(names, secret values) of a dotenv file, read by the project's one dotenv reader (baileys_dr_dotenv: dotenv's
    own rules): the names to keep out of the environment PM2 gives the process, so that the file wins, and the
    values to hide in messages."""
    try:
        with open(path, "rb") as handle:
            text = handle.read().decode("utf-8", "surrogateescape")
    except OSError as exc:
        raise Pm2Error("env_file %s cannot be read: %s" % (path, exc.strerror or exc)) from None
    values = DotenvDocument(text).values()
    return list(values), secret_values(values.items())


# --- messages ----------------------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_ASSIGNMENT = re.compile(r"\b([A-Za-z_][A-Za-z0-9_]*)=(\"[^\"]*\"|'[^']*'|\S+)")


def scrub_output(text, secrets=(), limit=1500):
    """Command output fit for an error message: no JSON (jlist dumps environments), no
    NAME=value, no known secret value, no colour codes, at most limit characters."""
    text = _ANSI.sub("", text or "")
    kept = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if "{" in stripped or '":' in stripped:
            kept.append("[a line with JSON data was removed]")
            continue
        kept.append(_ASSIGNMENT.sub(lambda m: m.group(1) + "=" + MASK, stripped))
    text = mask_values("\n".join(kept), secrets)
    if len(text) > limit:
        text = text[:limit] + " [...]"
    return text


# --- the CLI -------------------------------------------------------------------------------------------

class Pm2Runner:
    """Runs the pm2 CLI through module.run_command for one PM2_HOME; keeps every argv run."""

    description = "pm2 CLI"

    def __init__(self, module, pm2_bin, pm2_home):
        self.module = module
        self.pm2_bin = pm2_bin
        self.pm2_home = pm2_home
        self.commands = []
        self.secrets = set()

    def daemon_running(self):
        """Whether a daemon listens in PM2_HOME. `pm2 jlist` would spawn one otherwise."""
        return os.path.exists(os.path.join(self.pm2_home, "rpc.sock"))

    def record(self, args):
        """Keep the argv run (a run of identical `jlist` samples once)."""
        argv = [self.pm2_bin] + list(args)
        if not self.commands or self.commands[-1] != argv or list(args) != ["jlist"]:
            self.commands.append(argv)
        return argv

    def run(self, args, cwd=None, env_remove=()):
        argv = self.record(args)
        with _without_environ(self.module, env_remove):
            return self.module.run_command(argv, cwd=cwd, environ_update={"PM2_HOME": self.pm2_home})

    def check(self, args, cwd=None, env_remove=()):
        """Run; Pm2Error naming the command and its scrubbed output when it fails."""
        rc, out, err = self.run(args, cwd=cwd, env_remove=env_remove)
        if rc != 0:
            detail = scrub_output((err or "") + "\n" + (out or ""), self.secrets)
            raise Pm2Error("`pm2 %s` failed (rc=%d, PM2_HOME=%s): %s"
                           % (" ".join(args), rc, self.pm2_home, detail or "no output"))
        return out

    def jlist(self):
        """The process list of the daemon ([] without a daemon: none is spawned for reading)."""
        if not self.daemon_running():
            return []
        out = self.check(["jlist"])
        try:
            processes = parse_jlist(out)
        except Pm2Error:
            raise Pm2Error("pm2 jlist (PM2_HOME=%s) printed no JSON process list: %s"
                           % (self.pm2_home, scrub_output(out, self.secrets) or "no output")) from None
        self.secrets.update(env_values(processes))
        return processes


@contextlib.contextmanager
def _without_environ(module, names):
    """Leave names out of the environment of the commands run inside the block.

    run_command starts from os.environ and can add variables but not remove
    them, so they are taken out of os.environ (and of the module's own update)
    for the duration of the call, then put back.
    """
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    update = getattr(module, "run_command_environ_update", None) or {}
    saved_update = {name: update.pop(name) for name in names if name in update}
    try:
        yield
    finally:
        os.environ.update(saved)
        update.update(saved_update)


# --- readiness ------------------------------------------------------------------------------------------



def safe_health(doc, secrets=(), limit=65536):
    """The /health document without secret-looking fields or known secret values, and no bigger than
    limit bytes of JSON."""
    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if not (is_secret_name(k) or k == "env")}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return mask_values(value, secrets) if isinstance(value, str) else value

    if not isinstance(doc, dict):
        return {"unexpected": scrub_output(json.dumps(doc)[:200])}
    doc = clean(doc)
    if isinstance(doc.get("errors"), list) and len(doc["errors"]) > 20:
        doc["errors"] = doc["errors"][:20] + ["... %d more" % (len(doc["errors"]) - 20)]
    omitted = []
    while len(json.dumps(doc)) > limit:
        sizes = [(len(json.dumps(v)), k) for k, v in doc.items() if isinstance(v, (dict, list)) and k != "omitted"]
        if not sizes:
            break
        _, key = max(sizes)
        doc[key] = "<%d entries omitted>" % len(doc[key])
        omitted.append(key)
    if omitted:
        doc["omitted"] = omitted
    return doc


def digest_differences(expected, actual):
    """Company ids whose digest differs, or is missing on one side, sorted."""
    actual = actual if isinstance(actual, dict) else {}
    return sorted(name for name in set(expected) | set(actual) if expected.get(name) != actual.get(name))


def health_field_differences(expect, doc):
    """Fields of expect the document does not have with that exact value (names and values are not secret)."""
    return ["%s is %s, expected %s" % (key, json.dumps(doc.get(key)), json.dumps(value))
            for key, value in sorted(expect.items()) if doc.get(key) != value]


class ReadinessTracker:
    """Readiness from successive PM2 samples: status online, restart count (and pids) the same in the last two
    samples, and uptime past the window. PM2 resets pm_uptime at every start, so an uptime past the window
    means no restart during the window; the second sample guards against one between the two."""

    def __init__(self, window):
        self.window = window
        self.first_restarts = None
        self.streak_restarts = None
        self.streak_pids = None
        self.streak_samples = 0

    def observe(self, instances, now):
        """Checks of one sample: list of (name, ok, detail)."""
        status = status_of(instances)
        restarts = restart_count(instances)
        pids = tuple(proc.get("pid") for proc in instances)
        if self.first_restarts is None:
            self.first_restarts = restarts
        if restarts != self.streak_restarts or pids != self.streak_pids:
            self.streak_restarts, self.streak_pids, self.streak_samples = restarts, pids, 0
        self.streak_samples += 1
        checks = [("status", status == "online", "PM2 status %s" % status)]
        uptimes = [uptime_seconds(proc, now) for proc in instances]
        uptime = min(uptimes) if uptimes and None not in uptimes else None
        went = "went from %d to %d while waiting" % (self.first_restarts, restarts)
        # A count that changed during the wait is stable again only once the new run has lasted the window.
        recovered = restarts == self.first_restarts or (uptime is not None and uptime >= self.window)
        if self.streak_samples >= 2 and recovered:
            detail = "restart count stable at %d" % restarts
            checks.append(("restarts_stable", True, detail + (" (it %s)" % went if restarts != self.first_restarts else "")))
        elif restarts != self.first_restarts:
            checks.append(("restarts_stable", False, "restart count not stable: %s (crash loop?)" % went))
        else:
            checks.append(("restarts_stable", False, "restart count %d seen once so far" % restarts))
        if uptime is None:
            checks.append(("uptime", False, "not running"))
        else:
            checks.append(("uptime", uptime >= self.window,
                           "up %.1fs (ready_window %ss)" % (uptime, _number(self.window))))
        return checks


def _number(value):
    return int(value) if float(value).is_integer() else value


class HealthClient:
    """GET of the application's readiness endpoint, never through a proxy."""

    def __init__(self, max_bytes=1048576):
        self.max_bytes = max_bytes

    def get(self, url, timeout):
        """(status, body bytes); status None and the reason as body when nothing answered."""
        opener = urllib_request.build_opener(urllib_request.ProxyHandler({}))
        try:
            with opener.open(url, timeout=timeout) as resp:
                return resp.status, resp.read(self.max_bytes)
        except urllib_error.HTTPError as exc:
            body = exc.read(self.max_bytes)
            exc.close()
            return exc.code, body
        except Exception as exc:  # connection refused, reset, timeout: not answering yet
            return None, str(getattr(exc, "reason", exc)).encode("utf-8", "replace")
