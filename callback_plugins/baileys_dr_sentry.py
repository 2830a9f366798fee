# -*- coding: utf-8 -*-
# Sentry reporting for baileys-dr playbooks (notification callback).

from __future__ import annotations

DOCUMENTATION = r"""
name: baileys_dr_sentry
type: notification
short_description: Sends failed and unreachable tasks and cron check-ins of DR playbooks to Sentry
description:
  - Reports every failed or unreachable task of a playbook run to Sentry as an event of level C(error), tagged with
    C(playbook), C(play), C(role), C(task), C(host), C(component) and C(operation), with one breadcrumb per task result
    (status, task name and host; never arguments).
  - The message of an event is the task name and the C(msg) of its result. Results of C(no_log) tasks are never
    forwarded; their events say "output hidden by no_log" instead. Anything that looks like a secret (C(password=...),
    credentials in URLs, bearer tokens, Telegram bot tokens, private keys, values of secret-looking variables and
    environment variables) is masked before the event is built and again in C(before_send).
  - When a monitor slug is set, sends a Sentry Cron check-in C(in_progress) when the first play of a playbook starts
    and C(ok) or C(error) (any host failed or unreachable) with the duration at its recap, so a scheduled playbook that
    stops running, fails or hangs raises an alert. A run that ends before its recap (SIGINT, SIGTERM, SIGHUP,
    internal error) sends C(error) as the process exits.
  - Flushes the events before C(ansible-playbook) exits.
  - Without a DSN the callback disables itself with one warning.
  - Traces, default PII and all Sentry SDK integrations are off; the SDK only carries what this callback builds.
requirements:
  - sentry-sdk >= 2.0 on the control node (the AWX execution environment)
  - enabled through C(callbacks_enabled) in ansible.cfg or C(ANSIBLE_CALLBACKS_ENABLED)
options:
  dsn:
    description:
      - Sentry DSN of the project receiving the events. Without one the callback does nothing.
      - C(BAILEYS_DR_SENTRY_DSN) wins over C(SENTRY_DSN).
    type: str
    env:
      - name: SENTRY_DSN
      - name: BAILEYS_DR_SENTRY_DSN
    ini:
      - section: callback_baileys_dr_sentry
        key: dsn
  environment:
    description:
      - Sentry environment of the events and check-ins.
      - When unset, the play variable C(baileys_dr_environment) is used, then C(production).
    type: str
    env:
      - name: SENTRY_ENVIRONMENT
      - name: BAILEYS_DR_SENTRY_ENVIRONMENT
    ini:
      - section: callback_baileys_dr_sentry
        key: environment
  release:
    description:
      - Release the events belong to. When unset, the Sentry SDK's default applies (C(SENTRY_RELEASE), then the
        commit of the git checkout the playbook runs from).
    type: str
    env:
      - name: SENTRY_RELEASE
      - name: BAILEYS_DR_SENTRY_RELEASE
    ini:
      - section: callback_baileys_dr_sentry
        key: release
  component:
    description: Value of the C(component) tag, to tell baileys-dr events from others sent to the same project.
    type: str
    default: baileys-dr
    env:
      - name: BAILEYS_DR_SENTRY_COMPONENT
    ini:
      - section: callback_baileys_dr_sentry
        key: component
  monitor_slug:
    description:
      - Slug of the Sentry Cron monitor of this run. Empty sends no check-ins.
      - The variable C(baileys_dr_sentry_monitor_slug) (extra var or play var) takes precedence, so that one
        configuration serves several scheduled playbooks (for example C(-e baileys_dr_sentry_monitor_slug=snapshot)).
    type: str
    env:
      - name: BAILEYS_DR_SENTRY_MONITOR_SLUG
    ini:
      - section: callback_baileys_dr_sentry
        key: monitor_slug
  monitor_schedule:
    description:
      - Crontab schedule of the monitor (for example C(*/15 * * * *)). When set, check-ins carry a monitor
        configuration, so that Sentry creates or updates the monitor; when empty, the monitor must exist in Sentry.
      - The variable C(baileys_dr_sentry_monitor_schedule) takes precedence.
    type: str
    env:
      - name: BAILEYS_DR_SENTRY_MONITOR_SCHEDULE
    ini:
      - section: callback_baileys_dr_sentry
        key: monitor_schedule
  monitor_timezone:
    description: Time zone of O(monitor_schedule).
    type: str
    default: UTC
    env:
      - name: BAILEYS_DR_SENTRY_MONITOR_TIMEZONE
    ini:
      - section: callback_baileys_dr_sentry
        key: monitor_timezone
  monitor_checkin_margin:
    description: Minutes a check-in may be late before Sentry reports a missed run (with O(monitor_schedule)).
    type: int
    default: 5
    env:
      - name: BAILEYS_DR_SENTRY_MONITOR_CHECKIN_MARGIN
    ini:
      - section: callback_baileys_dr_sentry
        key: monitor_checkin_margin
  monitor_max_runtime:
    description: Minutes a run may stay in progress before Sentry reports a timeout (with O(monitor_schedule)).
    type: int
    default: 30
    env:
      - name: BAILEYS_DR_SENTRY_MONITOR_MAX_RUNTIME
    ini:
      - section: callback_baileys_dr_sentry
        key: monitor_max_runtime
  max_breadcrumbs:
    description: Task results kept as breadcrumbs; an event carries the last ones.
    type: int
    default: 100
    env:
      - name: BAILEYS_DR_SENTRY_MAX_BREADCRUMBS
    ini:
      - section: callback_baileys_dr_sentry
        key: max_breadcrumbs
  flush_timeout:
    description: Seconds to wait, at the end of the run, for pending events to reach Sentry.
    type: float
    default: 10
    env:
      - name: BAILEYS_DR_SENTRY_FLUSH_TIMEOUT
    ini:
      - section: callback_baileys_dr_sentry
        key: flush_timeout
"""

import atexit
import functools
import os
import re
import signal
import time

from ansible import context
from ansible.module_utils.common.text.converters import to_text
from ansible.plugins.callback import CallbackBase
from ansible.release import __version__ as ansible_version

try:
    import sentry_sdk
    import sentry_sdk.crons
    import sentry_sdk.scope
    from sentry_sdk.transport import HttpTransport
    from sentry_sdk.utils import BadDsn
except ImportError:
    sentry_sdk = None
    HttpTransport = object

    class BadDsn(Exception):
        pass

try:
    from ansible.template import Templar
except ImportError:  # pragma: no cover - every supported ansible-core has it
    Templar = None


def _project_module_util(name):
    """module_utils/<name>.py of this project, as the modules import it: from the module_utils path, else beside
    callback_plugins/ (a callback is not a module: ansible.module_utils does not reach the project's files)."""
    import importlib.util

    from ansible.plugins.loader import module_utils_loader

    path = module_utils_loader.find_plugin(name, mod_type=".py") or \
        os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "module_utils", name + ".py")
    spec = importlib.util.spec_from_file_location("ansible.module_utils." + name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The names, the mask and the shapes of secrets: the same as the modules' and the audit's.
dr_secrets = _project_module_util("baileys_dr_secrets")
NO_LOG_TEXT = "output hidden by no_log"
# Shorter values are not learnt as secrets: masking "yes" or "5432" everywhere helps no one.
MIN_SECRET_LENGTH = 6
# Hosts of a play whose variables are read for secrets (DR inventories have a handful).
MAX_HOSTS_LEARNT = 50
TAG_VALUE_MAX = 200
MESSAGE_MAX = 4000


class SecretScrubber:
    """Masks secrets in text: by shape (SECRET_TEXT of baileys_dr_secrets) and by value (values learnt from secret-looking names)."""

    def __init__(self):
        self._values = set()

    def learn(self, name, value, _depth=0):
        """Remember the values under secret-looking names, at any depth of a mapping or list."""
        if _depth > 20:
            return
        if isinstance(value, dict):
            for key, item in value.items():
                self.learn(key, item, _depth + 1)
            return
        if isinstance(value, (list, tuple)):
            for item in value:
                self.learn(name, item, _depth + 1)
            return
        if name is None or not dr_secrets.is_secret_name(to_text(name)) or isinstance(value, (bool, int, float)) or value is None:
            return
        try:
            text = to_text(value)  # decrypts vaulted values: they are the ones most worth masking
        except Exception:
            return
        if len(text) >= MIN_SECRET_LENGTH and "{{" not in text:
            self._values.add(text)

    def learn_environment(self, environ):
        for name, value in environ.items():
            self.learn(name, value)

    def text(self, value):
        text = to_text(value, errors="surrogate_or_replace")
        return dr_secrets.mask_shapes(dr_secrets.mask_values(text, self._values))

    def deep(self, value, _depth=0):
        """Scrub every string of a JSON-like structure (an event, a breadcrumb)."""
        if _depth > 50:
            return value
        if isinstance(value, dict):
            return {key: self.deep(item, _depth + 1) for key, item in value.items()}
        if isinstance(value, list):
            return [self.deep(item, _depth + 1) for item in value]
        if isinstance(value, tuple):
            return tuple(self.deep(item, _depth + 1) for item in value)
        if isinstance(value, str):
            return self.text(value)
        return value


class _Transport(HttpTransport):
    """Sentry's HTTP transport without the envelope's dynamic sampling header.

    That header exists for trace sampling, which is off here, and carries the DSN's public key: the key
    belongs in the authentication header only, not in stored envelopes.
    """

    def capture_envelope(self, envelope):
        envelope.headers.pop("trace", None)
        super().capture_envelope(envelope)


class SentryNotifier:
    """Everything that talks to Sentry: a private client and scope, so the callback only maps Ansible events.

    The client is not installed globally (no sentry_sdk.init): nothing else in the controller process reports
    through it, and no SDK integration (argv, logging, excepthook, modules...) adds data of its own.
    """

    def __init__(self, dsn, scrubber, environment=None, release=None, max_breadcrumbs=100):
        self._scrubber = scrubber
        self._client = sentry_sdk.Client(
            dsn=dsn,
            environment=environment,
            release=release,
            transport=_Transport,
            default_integrations=False,
            auto_enabling_integrations=False,
            integrations=[],
            traces_sample_rate=None,
            traces_sampler=None,
            send_default_pii=False,
            include_local_variables=False,
            attach_stacktrace=False,
            max_breadcrumbs=max_breadcrumbs,
            before_send=self._before_send,
            before_breadcrumb=self._before_breadcrumb,
            debug=False,
            spotlight=False,
        )
        self._scope = sentry_sdk.Scope()
        self._scope.set_client(self._client)
        self._closed = False
        # True while the main thread is inside the SDK: a signal handler must not re-enter it (its queue locks).
        self.busy = False

    def _sdk(self, call, *args, **kwargs):
        self.busy = True
        try:
            with sentry_sdk.scope.use_scope(self._scope):
                return call(*args, **kwargs)
        finally:
            self.busy = False

    def _before_send(self, event, hint):
        # Second line of defence: whatever reached the event, scrub it all again.
        return self._scrubber.deep(event)

    def _before_breadcrumb(self, crumb, hint):
        return self._scrubber.deep(crumb)

    def breadcrumb(self, message, level, data):
        self._sdk(self._scope.add_breadcrumb, category="ansible.task", message=message, level=level, data=data)

    def event(self, message, tags, fingerprint, contexts, level="error"):
        event = {"message": message, "level": level, "logger": "ansible", "tags": tags,
                 "fingerprint": fingerprint, "contexts": contexts}
        return self._sdk(self._scope.capture_event, event)

    def checkin(self, slug, status, check_in_id=None, duration=None, monitor_config=None):
        return self._sdk(sentry_sdk.crons.capture_checkin, monitor_slug=slug, check_in_id=check_in_id, status=status,
                         duration=duration, monitor_config=monitor_config)

    def flush(self, timeout):
        self._sdk(self._client.flush, timeout=timeout)

    def close(self, timeout):
        if not self._closed:
            self._closed = True
            self._sdk(self._client.close, timeout=timeout)


def _task_of(result):
    # ansible-core 2.19 made these public (`task`, `host`, `result`); older cores only have the private names.
    return getattr(result, "task", None) or result._task


def _host_of(result):
    return getattr(result, "host", None) or result._host


def _data_of(result):
    data = getattr(result, "result", None)
    return data if isinstance(data, dict) else result._result


def _tag(value):
    text = to_text(value).strip().replace("\n", " ")
    return text[:TAG_VALUE_MAX] if text else None


class CallbackModule(CallbackBase):
    """Maps playbook events to Sentry events, breadcrumbs and check-ins (see DOCUMENTATION)."""

    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "notification"
    CALLBACK_NAME = "baileys_dr_sentry"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, display=None):
        super().__init__(display=display)
        self._notifier = None
        self._scrubber = SecretScrubber()
        self._playbook = None
        self._operation = None
        self._play = None
        self._started = None
        self._monitor = None  # (slug, check_in_id, monitor_config) from in_progress to the playbook's end
        self._vars_warned = False
        self._awx_job_id = None

    def set_options(self, task_keys=None, var_options=None, direct=None):
        super().set_options(task_keys=task_keys, var_options=var_options, direct=direct)
        if sentry_sdk is None:
            self._disable("the Python library sentry-sdk is not installed on the control node")
        elif not self.get_option("dsn"):
            self._disable("no DSN (set BAILEYS_DR_SENTRY_DSN, SENTRY_DSN or dsn in [callback_baileys_dr_sentry])")

    def _disable(self, why):
        self.disabled = True
        self._display.warning("baileys_dr_sentry callback disabled: %s; nothing is sent to Sentry." % why)

    # -- playbook structure -------------------------------------------------------------------

    def v2_playbook_on_start(self, playbook):
        name = os.path.basename(to_text(playbook._file_name))
        self._playbook = name
        self._operation = os.path.splitext(name)[0]
        self._started = time.monotonic()

    def v2_playbook_on_play_start(self, play):
        self._play = play.get_name().strip() or "(unnamed play)"
        play_vars = self._play_vars(play)
        self._operation = self._var(play, play_vars, "baileys_dr_operation") or os.path.splitext(self._playbook or "")[0]
        # AWX passes its job id as an extra var: the tag links a Sentry issue to the job's output.
        self._awx_job_id = self._var(play, play_vars, "awx_job_id")
        if self._notifier is None and not self._start_notifier(play_vars, play):
            return
        if self._monitor is None:
            self._start_checkin(play, play_vars)

    def _play_vars(self, play):
        """The variables of the play's first host (inventory, play, role defaults, extra vars); {} if unreadable.

        Settings such as baileys_dr_environment usually live in inventory group_vars, which only exist per host.
        The secrets of the play's other hosts are learnt too, so that none of them reaches an event.
        """
        manager = play.get_variable_manager()
        try:
            inventory = getattr(manager, "_inventory", None)
            hosts = inventory.get_hosts(play.hosts) if inventory is not None else []
            play_vars = manager.get_vars(play=play, host=hosts[0]) if hosts else manager.get_vars(play=play)
            self._scrubber.learn(None, play_vars)
            for host in hosts[1:MAX_HOSTS_LEARNT]:
                self._scrubber.learn(None, manager.get_vars(play=play, host=host))
        except Exception as exc:  # reporting must never break a DR run
            self._warn_vars(exc)
            return {}
        return play_vars

    def _var(self, play, play_vars, name):
        value = play_vars.get(name)
        if value in (None, ""):
            return None
        if Templar is not None and isinstance(value, str) and "{{" in value:
            try:
                value = Templar(loader=play._loader, variables=play_vars).template(value)
            except Exception as exc:
                self._warn_vars(exc)
                return None
        return to_text(value).strip() or None

    def _warn_vars(self, exc):
        if not self._vars_warned:
            self._vars_warned = True
            self._display.warning("baileys_dr_sentry: cannot read play variables (%s); using configuration only"
                                  % type(exc).__name__)

    def _start_notifier(self, play_vars, play):
        self._scrubber.learn_environment(os.environ)
        dsn = self.get_option("dsn")
        self._scrubber.learn("dsn", dsn)
        environment = self.get_option("environment") or self._var(play, play_vars, "baileys_dr_environment") or "production"
        try:
            self._notifier = SentryNotifier(dsn, self._scrubber, environment=environment,
                                            release=self.get_option("release"),
                                            max_breadcrumbs=self.get_option("max_breadcrumbs"))
        except BadDsn as exc:
            # The exception text may quote the DSN: name the problem only.
            self._disable("the DSN is not valid (%s)" % type(exc).__name__)
            return False
        atexit.register(self._at_exit)
        self._trap_termination()
        return True

    def _trap_termination(self):
        """Report before SIGTERM (timeout(1), a stopped systemd unit, a deleted pod) or SIGHUP (a lost terminal)
        ends the process.

        Both kill the process without running atexit; the previous handler (ansible's, which stops the
        workers) still runs afterwards.
        """
        owner = os.getpid()
        for signum in (signal.SIGTERM, signal.SIGHUP):
            try:
                signal.signal(signum, functools.partial(self._on_termination, owner, signal.getsignal(signum)))
            except (ValueError, OSError):  # not the main thread: leave signals alone
                return

    def _on_termination(self, owner, previous, signum, frame):
        # Forked workers inherit the handler: only the controller process reports.
        if os.getpid() == owner and not self._notifier.busy:
            self._at_exit()
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def _start_checkin(self, play, play_vars):
        slug = self._var(play, play_vars, "baileys_dr_sentry_monitor_slug") or self.get_option("monitor_slug")
        if not slug:
            return
        schedule = self._var(play, play_vars, "baileys_dr_sentry_monitor_schedule") or self.get_option("monitor_schedule")
        config = None
        if schedule:
            config = {"schedule": {"type": "crontab", "value": schedule},
                      "timezone": self.get_option("monitor_timezone"),
                      "checkin_margin": self.get_option("monitor_checkin_margin"),
                      "max_runtime": self.get_option("monitor_max_runtime")}
        check_in_id = self._notifier.checkin(slug, "in_progress", monitor_config=config)
        self._monitor = (slug, check_in_id, config)

    # -- task results ------------------------------------------------------------------------

    def v2_runner_on_ok(self, result):
        self._breadcrumb(result, "changed" if _data_of(result).get("changed") else "ok", "info")

    def v2_runner_on_skipped(self, result):
        self._breadcrumb(result, "skipped", "info")

    def v2_runner_on_failed(self, result, ignore_errors=False):
        if ignore_errors:
            self._breadcrumb(result, "failed (ignored)", "warning")
            return
        self._breadcrumb(result, "failed", "error")
        self._report(result, "failed")

    def v2_runner_on_unreachable(self, result):
        self._breadcrumb(result, "unreachable", "error")
        self._report(result, "unreachable")

    def _where(self, result):
        task = _task_of(result)
        role = getattr(task, "_role", None)
        return {
            "task": to_text(getattr(result, "task_name", None) or task.get_name()).strip() or to_text(task.action),
            "host": to_text(_host_of(result).get_name()),
            "role": to_text(role.get_name()) if role is not None else None,
        }

    def _breadcrumb(self, result, status, level):
        if self._notifier is None:
            return
        where = self._where(result)
        data = {"status": status, "host": where["host"], "play": self._play}
        if where["role"]:
            data["role"] = where["role"]
        self._notifier.breadcrumb(self._scrubber.text(where["task"]), level, data)

    def _report(self, result, status):
        if self._notifier is None:
            return
        where = self._where(result)
        data = _data_of(result)
        if getattr(_task_of(result), "no_log", False) or data.get("_ansible_no_log"):
            detail = NO_LOG_TEXT
        else:
            detail = to_text(data.get("msg") or ("rc=%s" % data["rc"] if "rc" in data else "no message"))
            # A loop says only "One or more items failed": add what the first failed items said.
            items = [item for item in data.get("results") or [] if isinstance(item, dict) and item.get("failed")]
            if items:
                detail += " (%s)" % "; ".join(
                    NO_LOG_TEXT if item.get("_ansible_no_log") else to_text(item.get("msg") or "no message")
                    for item in items[:3])
        message = self._scrubber.text("%s: %s" % (where["task"], detail))[:MESSAGE_MAX]
        tags = {
            "component": self.get_option("component"),
            "operation": self._operation,
            "playbook": self._playbook,
            "play": self._play,
            "role": where["role"],
            "task": where["task"],
            "host": where["host"],
            "status": status,
            "check_mode": "true" if context.CLIARGS.get("check") else "false",
            "awx_job_id": self._awx_job_id,
        }
        tags = {key: _tag(self._scrubber.text(value)) for key, value in tags.items() if value}
        contexts = {"ansible": {"status": status, "ansible_version": ansible_version}}
        if isinstance(data.get("rc"), int):
            contexts["ansible"]["rc"] = data["rc"]
        # One Sentry issue per failing task, whatever the message or host: hosts show up in the tag breakdown.
        fingerprint = [tags.get("component", ""), tags.get("operation", ""), tags.get("role", ""), tags["task"], status]
        self._notifier.event(message, tags, fingerprint, contexts)

    # -- end of run --------------------------------------------------------------------------

    def v2_playbook_on_stats(self, stats):
        # Sent once per playbook file: ansible-playbook a.yml b.yml gives each its own check-ins.
        if self._notifier is None:
            return
        self._finish_checkin(failed=any(stats.failures.values()) or any(stats.dark.values()))
        self._notifier.flush(self.get_option("flush_timeout"))

    def _at_exit(self):
        # ansible-playbook ended before the recap (interrupted, terminated, or an internal error): the run did not
        # complete, which the monitor must hear now as an error rather than after Sentry's max_runtime.
        self._finish_checkin(failed=True)
        self._notifier.close(self.get_option("flush_timeout"))

    def _finish_checkin(self, failed):
        if self._monitor is None:
            return
        slug, check_in_id, config = self._monitor
        self._monitor = None
        duration = time.monotonic() - self._started if self._started is not None else None
        self._notifier.checkin(slug, "error" if failed else "ok", check_in_id=check_in_id,
                               duration=duration, monitor_config=config)
