#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: baileys_store_switch
short_description: Switch the running Baileys service between PostgreSQL and file sessions (the critical section)
description:
  - The part of a failover or failback during which the service is down, in one module call (engine
    C(module_utils/baileys_dr_switch.py)). The bulk copy ran before, while the service served
    (M(baileys_auth_export) O(mode=standby) into the standby copy for a failover from a live database,
    M(baileys_auth_import) with C(changed_during_read=defer) and C(pass_record) for a failback).
  - "Steps: stop every PM2 instance of O(app_name) gracefully (in-flight writes finish) and fence: no PM2 instance
    alive, nothing answering O(health_url), no process left running in O(app_root); otherwise the service is started
    again and the module fails with nothing copied or changed."
  - "O(store=files): with O(source=live), the standby copy O(standby_dir) is refreshed from the stopped database (only
    what changed since the bulk pass) and proven equal to it (every company's row fingerprint, and the tree exactly
    what its manifests list); with O(source=standby), it is verified as it is. It is then swapped in as
    O(sessions_dir) (the replaced tree is kept as C(<sessions_dir>.before-<time>); files the service wrote into it
    are counted and named in a warning), the .env values of O(store_flags) are recorded in O(state_file) and set to
    C(false), the emergency O(tag) is checked out (verified: annotated, O(tag_commit), marker)."
  - "O(store=postgres): the delta pass of the import (O(import_options), normally C(delta_from) the bulk pass's
    record) makes PostgreSQL equal to the files of every company that changed since the bulk pass (each company in
    one transaction with its own proof; the others are proven unchanged by their directory signature and row
    fingerprint), then the git ref and .env values recorded at failover are restored."
  - "Then the service is started with a fresh environment (PM2 delete + start from O(ecosystem), so a stale variable
    cannot beat .env) and must be online, stable for O(ready_window) seconds and ready on the expected store, with
    every company's identity (creds C(registrationId) and C(me.id)) equal to the frozen state's. Digests of the
    serving application are not compared: they change as soon as it serves."
  - Every step is journaled in O(state_file) (C(switch.phase)) before the next begins, so a run killed between the
    stop and the start is finished by the next run.
  - A failure after the stop rolls back onto the old store only when it answers (PostgreSQL is connected to first;
    the file store must be present), with every write made before the stop; otherwise the service is left on the
    new store (or stopped) and the message says so in one line.
  - PM2 and git run as O(app_user) (C(setpriv) when the module runs as root), never running the application's
    programs as root.
version_added: "0.2.0"
author: baileys-dr contributors
extends_documentation_fragment:
  - baileys_dr_postgres
options:
  store:
    description: The store the service is switched to.
    type: str
    choices: [files, postgres]
    required: true
  source:
    description:
      - O(store=files) only. C(live) refreshes O(standby_dir) from the stopped database first; C(standby) uses it as
        it is (PostgreSQL down).
    type: str
    choices: [live, standby]
    default: live
  app_root:
    description: The application's root (git work tree, C(.env), C(ecosystem.config.js)).
    type: path
    required: true
  app_name:
    description: PM2 process name of the service.
    type: str
    default: baileys-whatsapp-service
  app_user:
    description: The account whose PM2 daemon runs the service and who owns the repository and the sessions.
    type: str
    required: true
  pm2_bin:
    description: The pm2 executable.
    type: str
    default: pm2
  pm2_home:
    description: PM2_HOME of the daemon (default C(~app_user/.pm2)).
    type: path
  ecosystem:
    description: The ecosystem file the service is started from, relative to O(app_root).
    type: path
    default: ecosystem.config.js
  health_url:
    description: The application's readiness endpoint.
    type: str
    required: true
  ready_window:
    description: Seconds the process must stay online without restarts to be ready.
    type: float
    default: 1
  ready_timeout:
    description: Seconds to wait for readiness.
    type: float
    default: 90
  state_file:
    description:
      - The failover state (docs/architecture.md, "Failover state file"); also the journal of this module.
    type: path
    required: true
  record_data:
    description: O(store=files) only. Members recorded in O(state_file) beside what the module records itself.
    type: dict
    default: {}
  store_flags:
    description: The .env keys that select the store; a failover sets them to C(false).
    type: list
    elements: str
    default: [USE_LEGACY_SUPABASE, USE_DATABASE_AUTH_STATE, USE_REPOSITORY_PATTERN]
  tag:
    description: The annotated tag whose code reads file sessions.
    type: str
    default: emergency-file-fallback-v1
  tag_commit:
    description: The commit O(tag) must point at (empty accepts any).
    type: str
    default: ""
  marker_path:
    description: A file at O(tag) that must hold the file-auth code.
    type: str
  marker_regex:
    description: What O(marker_path) must contain.
    type: str
  allow_dirty:
    description: Check O(tag) out even when tracked files are modified.
    type: bool
    default: false
  sessions_dir:
    description: The live sessions tree.
    type: path
    required: true
  standby_dir:
    description: The standby copy (O(store=files)).
    type: path
  space_margin:
    description: Free-space margin of the final copy (see M(baileys_auth_export)).
    type: float
    default: 1.5
  import_options:
    description:
      - O(store=postgres) only. Options of M(baileys_auth_import) for the delta pass (for example C(delta_from),
        C(since), C(undo_dir), C(force)); O(sessions_dir) is its C(src) and the connection options are this module's.
    type: dict
    default: {}
  companies:
    description:
      - Only these company ids (default all), the companies of this application host when several share one database.
      - O(store=files) with O(source=live), the final copy holds only them and the proof compares only their rows; the
        other companies are other hosts' and keep changing. O(store=postgres), the delta import touches only them
        (unless O(import_options) gives its own C(companies)).
    type: list
    elements: str
attributes:
  check_mode:
    support: full
    details:
      - Reports what it would do and changes nothing (the playbooks show the plan in check mode).
  diff_mode:
    support: none
requirements:
  - psycopg2
  - setpriv (util-linux) when run as root for another O(app_user)
seealso:
  - module: baileys_auth_export
  - module: baileys_auth_import
  - module: baileys_pm2_process
"""

EXAMPLES = r"""
- name: Switch to file sessions (stop, final copy, swap, .env, tag, start)
  baileys_store_switch:
    store: files
    source: live
    app_root: /srv/baileys-app
    app_user: baileys
    health_url: http://127.0.0.1:3011/health
    state_file: /var/lib/baileys-dr/failover-state.json
    sessions_dir: /srv/baileys-app/baileys_sessions
    standby_dir: /srv/baileys-app/baileys_sessions.standby
    login_host: db.internal
    login_user: baileys_dr
    login_password: "{{ vault_db_password }}"
    login_db: baileys

- name: Switch back to PostgreSQL after the bulk import
  baileys_store_switch:
    store: postgres
    app_root: /srv/baileys-app
    app_user: baileys
    health_url: http://127.0.0.1:3011/health
    state_file: /var/lib/baileys-dr/failover-state.json
    sessions_dir: /srv/baileys-app/baileys_sessions
    import_options:
      delta_from: /var/lib/baileys-dr/failback-bulk.json
      undo_dir: /var/lib/baileys-dr/undo
    db_url: "{{ vault_db_url }}"
"""

RETURN = r"""
store:
  description: The store switched to.
  returned: always
  type: str
steps:
  description: The steps done, each with its time in seconds since the module started (C(at)).
  returned: always
  type: list
  elements: dict
  sample: [{step: stopped, at: 0.9}, {step: copied, at: 1.4}, {step: swapped, at: 1.5}, {step: switched, at: 1.6}, {step: ready, at: 3.1}]
pm2_driver:
  description:
    - What ran the PM2 commands of the run, once it got that far. One Node process connected to the daemon through
      PM2's API for the whole run (no C(pm2) CLI start while the service is down), or the CLI and why.
  returned: when PM2 was used
  type: str
  sample: one node process (pm2 7.0.4 API)
readiness:
  description: The readiness wait of the start (see M(baileys_pm2_process)); C(ready_at) ends the downtime.
  returned: when the service was started
  type: dict
final_copy:
  description: What the final copy (delta) wrote, and its retries.
  returned: when it ran
  type: dict
proof:
  description:
    - (O(store=files), O(source=live)) Companies proven equal to the stopped database, and their digests (up to 1000 companies).
    - C(database) says how the database side was proven, V(unchanged since the copy's snapshot) (a snapshot taken after
      the copy sees what the refresh's snapshot saw) or V(fingerprints) (every company's row fingerprint compared).
  returned: when it ran
  type: dict
identities:
  description: Companies whose identity was compared after the start, and differences.
  returned: when the service was started
  type: dict
sessions_backup:
  description: (O(store=files)) Where the replaced sessions tree was kept.
  returned: when a tree was replaced
  type: str
replaced_drift:
  description: (O(store=files)) Files the service had added, changed and deleted in the replaced tree (writes the database never received).
  returned: when there were some
  type: dict
undo_files:
  description: (O(store=postgres)) Undo files of the delta import (apply them before those of the bulk pass).
  returned: O(store=postgres)
  type: list
  elements: str
resumed_from:
  description: The journal phase an interrupted earlier run had reached, when this run finished it.
  returned: when resuming
  type: str
failed_step:
  description: The step that failed.
  returned: on failure
  type: str
rollback:
  description: What the rollback did, or why it did not roll back.
  returned: on failure after the stop
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.baileys_dr_postgres import postgres_argument_spec, scrub
from ansible.module_utils.baileys_dr_switch import StoreSwitch
from ansible.module_utils.baileys_dr_switch_parts import SwitchError


def main():
    argument_spec = postgres_argument_spec()
    argument_spec.update(
        store=dict(type="str", choices=["files", "postgres"], required=True),
        source=dict(type="str", choices=["live", "standby"], default="live"),
        app_root=dict(type="path", required=True),
        app_name=dict(type="str", default="baileys-whatsapp-service"),
        app_user=dict(type="str", required=True),
        pm2_bin=dict(type="str", default="pm2"),
        pm2_home=dict(type="path"),
        ecosystem=dict(type="path", default="ecosystem.config.js"),
        health_url=dict(type="str", required=True),
        ready_window=dict(type="float", default=1),
        ready_timeout=dict(type="float", default=90),
        state_file=dict(type="path", required=True),
        record_data=dict(type="dict", default={}),
        store_flags=dict(type="list", elements="str", default=["USE_LEGACY_SUPABASE", "USE_DATABASE_AUTH_STATE",
                                                              "USE_REPOSITORY_PATTERN"]),
        tag=dict(type="str", default="emergency-file-fallback-v1"),
        tag_commit=dict(type="str", default=""),
        marker_path=dict(type="str"),
        marker_regex=dict(type="str"),
        allow_dirty=dict(type="bool", default=False),
        sessions_dir=dict(type="path", required=True),
        standby_dir=dict(type="path"),
        space_margin=dict(type="float", default=1.5),
        import_options=dict(type="dict", default={}),
        companies=dict(type="list", elements="str"),
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True,
                           required_if=[("store", "files", ["standby_dir"])])
    try:
        result = StoreSwitch(module).run()
    except SwitchError as exc:
        module.fail_json(msg=scrub("%s: %s" % (exc.step, exc), module.params), failed_step=exc.step)
    if result.pop("failed", False):
        module.fail_json(**dict(result, msg=scrub(result["msg"], module.params)))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
