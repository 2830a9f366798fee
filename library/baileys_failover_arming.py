#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: baileys_failover_arming
short_description: Check ahead what a failover needs and record it (arming record), or confirm the record still holds
description:
  - Every second of a failover's preflight is outage when PostgreSQL is down. With O(state=present) (run by each standby
    refresh, role C(baileys_snapshot)) the module checks what a failover will need and writes it, atomically, as JSON at
    O(path) on the application host (beside the failover state file) -- the tag and the commit it points at, verified as
    M(baileys_git_tag) does (annotated, O(tag_commit), the file-auth code at O(marker_path) matching O(marker_regex)),
    the C(.env) changes the failover will make (O(store_flags) from their current values to C(false)), the PM2 process
    definition (app name, pm2 binary, daemon home, the ecosystem file's sha256, and a sha256 of all of them), the standby
    copy's manifest generation and sha256, the free space, the time.
  - A check that fails is recorded too (C(armed) false, C(problems)) and shown as a warning; the module does not fail
    for it, since the refresh itself succeeded.
  - With O(state=verify) (the failover's preflight) it confirms cheaply that the record still holds -- the tag points at
    the same commit, the standby manifest has the same generation and sha256, the PM2 definition has the same hash, and
    the record is younger than O(max_age) -- and returns RV(armed) and, when not, RV(reasons). It never fails for a
    stale record; the play then runs its full preflight and prints the reasons.
  - Git runs as M(baileys_git_tag) runs it (as the repository's owner when the module runs as root; no program the
    repository configures).
version_added: "0.2.0"
author: baileys-dr contributors
options:
  path:
    description: The arming record, for example C(<state dir>/failover-arming.json).
    type: path
    required: true
  state:
    description: V(present) checks and writes the record; V(verify) confirms it and changes nothing.
    type: str
    choices: [present, verify]
    default: present
  app_root:
    description: The application's git work tree (its C(.env), its ecosystem file).
    type: path
    required: true
  tag:
    description: The emergency tag the failover checks out (checked with the rules of C(git check-ref-format)).
    type: str
    required: true
  tag_commit:
    description: The commit the tag must point at, full or abbreviated (V("") accepts any).
    type: str
    default: ""
  annotated:
    description: Refuse a lightweight tag.
    type: bool
    default: true
  marker_path:
    description: A file at the tag that must hold the file-auth code (read from the tag's commit).
    type: str
  marker_regex:
    description: What O(marker_path) must contain (Python regular expression, multiline).
    type: str
  allow_dirty:
    description: Arm even when tracked files of the work tree are modified (as the failover's O(allow_dirty)).
    type: bool
    default: false
  app_name:
    description: The PM2 process name of the service.
    type: str
    required: true
  app_user:
    description: The account whose PM2 daemon runs the service (its C(~/.pm2) unless O(pm2_home)).
    type: str
  pm2_bin:
    description: The pm2 executable (a name looked up in C(PATH), or a path).
    type: str
    default: pm2
  pm2_home:
    description: The PM2 daemon's home directory, when not the default of O(app_user).
    type: path
  ecosystem:
    description: The ecosystem file the failover starts the service from, relative to O(app_root).
    type: str
    default: ecosystem.config.js
  store_flags:
    description: The C(.env) variables the failover sets to C(false); the record keeps their values now.
    type: list
    elements: str
    default: []
  standby_dir:
    description: The standby copy of the sessions tree (its C(.baileys-dr/manifest.json) is read).
    type: path
    required: true
  sessions_dir:
    description: The live sessions tree; the free space is read on its file system (else on O(standby_dir)'s).
    type: path
  verified_generation:
    description: With O(state=present), the generation the refresh just verified; another generation is a problem.
    type: int
  min_free_bytes:
    description: With O(state=present), fewer free bytes than this on the sessions file system is a problem (0 never).
    type: int
    default: 0
  max_age:
    description: With O(state=verify), a record older than this many seconds no longer holds.
    type: int
    default: 3600
  state_file:
    description:
      - With O(state=verify), the failover state file whose switch journal to read (RV(journal)), in the same module
        run as the record (every module run before the switch is outage when PostgreSQL is gone).
    type: path
  health_url:
    description: With O(state=verify), the service's readiness endpoint, read once (RV(service)).
    type: str
  ping_database:
    description:
      - With O(state=verify), connect once to PostgreSQL with the connection options (RV(database)), to tell whether the failover
        can copy from the live database, without a module run of its own before the switch.
    type: bool
    default: false
  lease:
    description:
      - Take this lease of M(baileys_lock) first, in the same module run (the failover's preflight then runs one
        module before the switch); a live lease of another run fails the module, naming its holder, before anything
        is read.
      - The keys of M(baileys_lock)'s options C(name), C(lock_dir), C(operation), C(ttl), C(wait) and C(holder); the
        action plugin of this module fills C(holder) on the control node.
    type: dict
extends_documentation_fragment:
  - baileys_dr_postgres
attributes:
  check_mode:
    support: full
    details: V(present) reports the record it would write and writes nothing; V(verify) only reads.
  diff_mode:
    support: full
    details: V(present) returns the record before and after (no secret is in it).
notes:
  - The record holds no secret; C(.env) values are only those of O(store_flags).
seealso:
  - module: baileys_git_tag
  - module: baileys_sessions_verify
"""

EXAMPLES = r"""
- name: Arm the failover after a standby refresh
  baileys_failover_arming:
    path: /var/lib/baileys-dr/failover-arming.json
    app_root: /srv/baileys
    tag: emergency-file-fallback-v1
    marker_path: src/stores/files.js
    marker_regex: useMultiFileAuthState
    app_name: baileys-whatsapp-service
    app_user: baileys
    store_flags: [USE_LEGACY_SUPABASE, USE_DATABASE_AUTH_STATE, USE_REPOSITORY_PATTERN]
    standby_dir: /srv/baileys/baileys_sessions.standby
    verified_generation: "{{ refreshed.generation }}"

- name: Confirm the record before a failover
  baileys_failover_arming:
    state: verify
    path: /var/lib/baileys-dr/failover-arming.json
    app_root: /srv/baileys
    tag: emergency-file-fallback-v1
    app_name: baileys-whatsapp-service
    app_user: baileys
    standby_dir: /srv/baileys/baileys_sessions.standby
    max_age: 3600
  register: arming
"""

RETURN = r"""
database:
  description: With O(ping_database), whether PostgreSQL answered (C(available)) and why not (C(problem), no secret).
  returned: when O(ping_database)
  type: dict
  sample: {available: false, problem: "cannot connect to PostgreSQL at db:5432/baileys: Connection refused"}
armed:
  description: V(present), whether every check passed; V(verify), whether the record still holds.
  returned: always
  type: bool
problems:
  description: V(present), the checks that failed (empty when armed).
  returned: state is present
  type: list
  elements: str
record:
  description: The record written (or, in check mode, that would be).
  returned: state is present
  type: dict
reasons:
  description: V(verify), why the record no longer holds (empty when armed).
  returned: state is verify
  type: list
  elements: str
  sample: ["tag emergency-file-fallback-v1 moved: it points at 5d0c2bd..., the record armed 9a1f0c3..."]
armed_since:
  description: V(verify), since when the host has been armed without a break (ISO 8601 UTC), or null.
  returned: state is verify
  type: str
age_seconds:
  description: V(verify), the record's age in seconds, or null without a record.
  returned: state is verify
  type: float
tag_commit:
  description: V(verify), the commit the record armed.
  returned: state is verify and a record was read
  type: str
env_changes:
  description: V(verify), the C(.env) changes the record planned, by flag (its C(from) and C(to) values).
  returned: state is verify and a record was read
  type: dict
journal:
  description:
    - V(verify) with O(state_file), the switch journal -- C(readable), C(exists), C(operation) and C(phase) (an interrupted
      switch's last phase); C(problem) when the file cannot be read. Never a C(.env) value.
  returned: state is verify and state_file is given
  type: dict
  sample: {readable: true, exists: true, operation: failover, phase: switched}
service:
  description: V(verify) with O(health_url), one read of the endpoint -- C(answered), C(store), C(ready).
  returned: state is verify and health_url is given
  type: dict
  sample: {answered: true, store: postgres, ready: true}
lease:
  description: With O(lease), what M(baileys_lock) returns for the lease taken (C(holder), C(stale_holder)...).
  returned: lease is given
  type: dict
standby:
  description: V(verify), when the standby copy is the one the record armed -- C(verified), C(generation), C(snapshot_at),
    C(age_seconds) and C(digests) (by company id, from the manifest), as M(baileys_sessions_verify) returns them.
  returned: state is verify and the standby copy holds
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.baileys_dr_arming import ArmingError, ArmingRecord, arming_argument_spec
from ansible.module_utils.baileys_dr_lockfile import LEASE_OPTION, take_lease
from ansible.module_utils.baileys_dr_postgres import postgres_argument_spec


def main():
    module = AnsibleModule(argument_spec=dict(arming_argument_spec(), lease=LEASE_OPTION, **postgres_argument_spec()),
                           required_by=dict(marker_regex="marker_path"), supports_check_mode=True)
    lease = take_lease(module, module.params["lease"]) if module.params["lease"] else None
    engine = ArmingRecord(module)
    try:
        result = engine.run()
    except ArmingError as exc:
        module.fail_json(msg=str(exc), **{k: v for k, v in engine.result.items() if k != "msg"})
    if lease is not None:
        result["lease"] = lease
    module.exit_json(**result)


if __name__ == "__main__":
    main()
