#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: baileys_pm2_process
short_description: Start, restart, stop or remove one PM2 process, and wait until it is really ready
description:
  - Manages one process of the PM2 daemon of the user the module runs as (use C(become_user) for the
    application's user; each OS user has its own daemon and sees only its own processes).
  - Reads the process list with C(pm2 jlist), whatever banner or notice PM2 prints around it.
  - "Readiness is more than PM2's C(online): the status must be C(online), the restart count must stay the
    same and the uptime must pass O(ready_window), and, with O(health_url), the application's readiness
    endpoint must answer 200 with the expected fields and state digests."
  - "The environment trap: C(pm2 restart --update-env) merges the caller's environment into the one PM2 stored
    and never removes a variable, and dotenv never overrides a variable already in the environment, so a
    stale variable silently beats the new C(.env). With O(fresh_env) (the default of C(restarted)) the module
    deletes the process and starts it again from O(ecosystem) with a clean environment."
  - Never returns an environment value of the process (PM2 holds every variable, secrets included); command
    output shown in an error message is scrubbed.
  - Called C(pm2_process) before 0.4.0; the old name still works, with a warning naming the new one, until 0.5.0.
version_added: "0.1.0"
author: baileys-dr contributors
options:
  name:
    description: PM2 name of the process (not a pm_id, not C(all)).
    type: str
    required: true
  state:
    description:
      - C(started) starts the process when it is not running (from O(ecosystem) when PM2 does not know it).
      - C(restarted) always restarts it, with O(fresh_env) by default; C(reloaded) runs C(pm2 reload) (the
        environment PM2 stored is kept).
      - C(stopped) stops it; C(absent) deletes it from PM2; C(info) only reads.
    type: str
    choices: [started, restarted, reloaded, stopped, absent, info]
    default: started
  pm2_bin:
    description: The pm2 executable, a path or a name looked up in C(PATH).
    type: str
    default: pm2
  pm2_home:
    description:
      - PM2_HOME of the daemon to manage.
      - Default C(PM2_HOME) from the environment, else C(.pm2) in the home directory of the user the module
        runs as.
    type: path
  ecosystem:
    description:
      - Ecosystem file that defines O(name); the process is started with C(pm2 start <ecosystem> --only <name>)
        in O(cwd).
      - Needed to start a process PM2 does not know and for O(fresh_env).
    type: path
  cwd:
    description: Directory C(pm2 start <ecosystem>) runs in; default the directory of O(ecosystem).
    type: path
  fresh_env:
    description:
      - Restart as C(pm2 delete <name>) then C(pm2 start <ecosystem> --only <name>) with the clean environment
        described in O(env_remove), instead of C(pm2 restart), which keeps every variable PM2 stored.
      - Default true for C(restarted), false for the other states; with C(started) it applies to a process
        that is stopped. C(reloaded) cannot have it (a reload keeps the environment).
      - A C(restarted) with it runs C(pm2 delete) straight away, without reading the list first (one C(pm2)
        Node process less while the service is down); a delete that fails is an error unless the list then
        shows PM2 does not know the process. Check mode and diff mode read the list first.
    type: bool
  env_remove:
    description:
      - Variables left out of the environment of every C(pm2 start <ecosystem>) the module runs (the module's
        own environment otherwise), together with every variable O(env_file) defines, so that the
        application's C(.env) wins.
      - C(PATH) and C(PM2_HOME) are never removed.
    type: list
    elements: str
    default: []
  env_file:
    description: The application's C(.env); the names it defines are left out of the environment, see O(env_remove).
    type: path
  env_check:
    description:
      - Variable names to look for in the environment PM2 gives the running process; those present are
        returned in RV(stale_env) (names only, never values).
    type: list
    elements: str
    default: []
  fail_on_stale_env:
    description: Fail when a variable of O(env_check) is in the process environment.
    type: bool
    default: false
  wait:
    description:
      - Wait until the process is ready (see O(ready_window), O(health_url)) and fail after O(ready_timeout).
      - Default true for C(started), C(restarted) and C(reloaded), false for C(info); ignored by C(stopped)
        and C(absent). Skipped in check mode when something would be done.
    type: bool
  ready_window:
    description: Seconds the process must be up, with a restart count that does not change, to count as ready.
    type: float
    default: 5
  ready_timeout:
    description: Seconds to wait for readiness.
    type: float
    default: 60
  health_url:
    description:
      - Readiness endpoint of the application, for example C(http://127.0.0.1:3011/health); it must answer
        200 (no proxy is used). When its JSON has a C(pid), it must be the pid PM2 runs.
      - With C(state=info) and no O(wait), it is read once and its answer returned in RV(health) and
        RV(health_status), whatever it is (a preflight reads PM2 and the application in one task).
    type: str
  health_expect:
    description: "Fields of the O(health_url) JSON that must have these exact values, for example C({store: files})."
    type: dict
  expected_digests:
    description:
      - State digests by company id that the C(digests) of the O(health_url) JSON must equal exactly (no
        company more or less). The failure message names up to 20 differing companies.
      - "An application that answers ready before it has computed every digest says so with
        C(digestsComplete: false): the module then notes the readiness (RV(readiness.ready_at)) and keeps
        reading O(health_url) until C(digestsComplete) is true, for at most O(digests_timeout), before it
        compares. An answer that is no longer ready (an error found meanwhile), another pid, or a
        mismatch fails the task. Without the field the digests are compared as soon as it is ready."
    type: dict
  digests_timeout:
    description:
      - Seconds to wait, after readiness, for the application to report C(digestsComplete) (see
        O(expected_digests)). Separate from O(ready_timeout), since the service already serves meanwhile.
    type: float
    default: 600
attributes:
  check_mode:
    support: full
    details: Only C(pm2 jlist) runs (and, when nothing would be done, the readiness checks); RV(would) tells what would be done.
  diff_mode:
    support: full
    details: The status of the process before and after.
notes:
  - No daemon is spawned just to read; without C(rpc.sock) in PM2_HOME the process list is empty.
  - Every argv run is returned in RV(commands); the environment they ran with is not.
requirements:
  - PM2 (the C(pm2) CLI) and Node.js on the target
"""

EXAMPLES = r"""
- name: Restart the service with the new .env, nothing stale from the old environment
  baileys_pm2_process:
    name: baileys-whatsapp-service
    state: restarted
    ecosystem: /srv/baileys-whatsapp-service/ecosystem.config.js
    env_file: /srv/baileys-whatsapp-service/.env
    env_remove: [USE_LEGACY_SUPABASE, USE_DATABASE_AUTH_STATE, USE_REPOSITORY_PATTERN]
    env_check: [USE_LEGACY_SUPABASE, USE_DATABASE_AUTH_STATE, USE_REPOSITORY_PATTERN]
    fail_on_stale_env: true
    health_url: http://127.0.0.1:3011/health
    health_expect: {store: files}
    expected_digests: "{{ export_result.digests }}"
    ready_timeout: 120
  become: true
  become_user: baileys

- name: Stop the service before the store is switched
  baileys_pm2_process:
    name: baileys-whatsapp-service
    state: stopped
  become: true
  become_user: baileys

- name: What PM2 runs (read-only)
  baileys_pm2_process:
    name: baileys-whatsapp-service
    state: info
  register: pm2_info
"""

RETURN = r"""
would:
  description: What was (or in check mode would be) done.
  returned: always
  type: str
  sample: restart
  choices: [start, restart, reload, stop, delete, none]
process:
  description:
    - The process after the run (before it, in check mode); null when PM2 does not know it.
    - "C(uptime_seconds) is now minus C(pm_uptime) (null when not running); C(restarts) is PM2's restart_time,
      which counts every restart, the module's included. C(revision) is the git revision PM2 recorded (PM2 >= 6
      records it only when its daemon runs with C(PM2_ENABLE_GIT_PARSING=true))."
  returned: always
  type: dict
  sample: {name: baileys-whatsapp-service, pid: 4242, pm_id: 0, status: online, restarts: 1, unstable_restarts: 0,
           uptime_seconds: 12.5, started_at: "2026-11-28T03:00:00+00:00", revision: null, exec_cwd: /srv/app}
instances:
  description: Number of PM2 processes with O(name) (more than one in cluster mode; RV(process) is the first).
  returned: always
  type: int
readiness:
  description: The readiness wait; C(checks) are the checks of the last round.
  returned: when the module waited
  type: dict
  sample: {ready: true, waited_seconds: 6.1, ready_at: "2026-11-28T18:00:01.250Z", ready_at_epoch: 1795888801.25,
           checks: [{name: status, ok: true, detail: PM2 status online}]}
  contains:
    ready_at:
      description:
        - When the module first saw every readiness check pass (UTC, milliseconds), digests apart; the end of
          a restart's downtime. RV(readiness.ready_at_epoch) is the same instant in seconds since the epoch.
      type: str
      returned: when the process became ready
    app_ready_at:
      description: The C(readyAt) the application reported on O(health_url), as it gave it.
      type: str
      returned: when the process became ready and its readiness endpoint gives C(readyAt)
    digests_waited_seconds:
      description: Seconds spent after readiness waiting for C(digestsComplete) and comparing the digests.
      type: float
      returned: when O(expected_digests) was checked
    digests_complete_at:
      description: When the digests were complete and equal (UTC, milliseconds).
      type: str
      returned: when O(expected_digests) matched
health:
  description: The last JSON of O(health_url), without secret-looking fields, big members replaced by a count.
  returned: when O(health_url) was asked
  type: dict
health_status:
  description: HTTP status of the one read of O(health_url) by C(state=info) without O(wait); null when nothing answered.
  returned: when O(state=info) reads O(health_url) without waiting
  type: int
stale_env:
  description: Names of O(env_check) present in the environment of the process (names only).
  returned: when O(env_check) is given
  type: list
  elements: str
commands:
  description:
    - Every pm2 command given, as its CLI argv, in order (repeated C(jlist) runs are listed once).
    - They run in one Node process connected to the daemon (PM2's API) when the daemon runs, else through the CLI
      (RV(pm2_runner) says which).
  returned: always
  type: list
  elements: list
pm2_runner:
  description: What ran the commands; the reason when it was the CLI (no daemon yet, no node, pm2_bin not in PM2's package).
  returned: always
  type: str
  sample: one node process (pm2 7.0.4 API)
pm2_home:
  description: PM2_HOME of the daemon that was used.
  returned: always
  type: str
user:
  description: The user the module ran as, whose daemon it is.
  returned: always
  type: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.baileys_dr_pm2 import Pm2Error
from ansible.module_utils.baileys_dr_pm2_process import Pm2Process, pm2_process_argument_spec
from ansible.module_utils.baileys_dr_renames import warn_if_renamed


def main():
    module = AnsibleModule(
        argument_spec=pm2_process_argument_spec(),
        supports_check_mode=True,
    )
    warn_if_renamed(module)
    try:
        ok, result = Pm2Process(module).run()
    except Pm2Error as exc:
        module.fail_json(msg=str(exc))
    if ok:
        module.exit_json(**result)
    module.fail_json(**result)


if __name__ == "__main__":
    main()
