#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: baileys_db_health
short_description: Read-only health check of the PostgreSQL auth-state store, with Prometheus samples
description:
  - Reports what an operator needs before a failover, read from the service's database (the replaced dashboard read
    its own process, DOMAIN.md section 5) -- reachability, server version, whether the server is a
    standby, latency of the application's key lookup, connections against C(max_connections) by application and state,
    waiting locks, key counts by type, age and expiry, protected keys, table and index sizes, dead tuples, last
    (auto)vacuum and (auto)analyze, companies with creds but no keys and keys without creds.
  - Each figure with a threshold gets C(healthy), C(warning) or C(critical) (RV(checks)); RV(status) is the worst of them.
    A value strictly above a level gets it, as the original dashboard alerted on "over 500 ms", "over 80 %" and
    "over 5 waiting".
  - Never fails for an unhealthy result, only for bad arguments or a missing psycopg2; an unreachable or frozen server is
    a result (RV(reachable) false, RV(status) critical). The play decides (role C(baileys_health), C(baileys_health_fail_on)).
  - Read-only. The session runs with C(default_transaction_read_only) on, every figure comes from one aggregate query
    (no rows are loaded into the module), and the latency probes run the application's own lookup
    C(SELECT value FROM whatsapp_keys WHERE company_id = $1 AND key_type = $2 AND key_id = $3) on ids of existing keys.
  - Every wait on the server has a client-side deadline of O(statement_timeout) plus O(connect_timeout), so a frozen server
    (which enforces no C(statement_timeout)) gives a critical result instead of a hung play.
  - RV(metrics) holds the figures as Prometheus samples for M(baileys_metrics) (prefix C(baileys_dr_), base units).
  - With O(standby_dir), the check C(standby_refresh) is critical while the last refresh of the standby copy was refused
    by the deletion guard of M(baileys_auth_export) (its C(.baileys-dr/refresh-refused.json)); it only reads files.
version_added: "0.1.0"
author: baileys-dr contributors
extends_documentation_fragment:
  - baileys_dr_postgres
options:
  statement_timeout:
    description:
      - Statement timeout in milliseconds; here it defaults to 10 s so that a slow server cannot hold the check.
      - The client also stops waiting O(statement_timeout) plus O(connect_timeout) seconds after each query (0 waits forever).
    type: int
    default: 10000
    aliases: [statement_timeout_ms]
  probes:
    description:
      - Number of key lookups timed for the latency quantiles (nearest rank, so p50 <= p95 <= p99).
    type: int
    default: 20
  thresholds:
    description:
      - "Levels per check, merged over the defaults per check and level, for example
        C({latency_p95_seconds: {warning: 0.05}}). A level set to null is disabled."
      - "Checks and defaults (from the original dashboard where it had one): C(latency_p95_seconds) 0.1 / 0.5;
        C(connections_ratio) (client connections / max_connections) 0.8 / 0.95; C(waiting_locks) 5 / 20;
        C(lock_wait_seconds) 10 / 60; C(dead_tuple_ratio) 0.2 / 0.5; C(companies_without_keys) 0 / null;
        C(companies_keys_without_creds) 0 / null; C(expired_keys) null / null (C(expires_at) is not a deletion signal);
        C(pre_keys_stored) (stored pre-keys of the company holding most) 2000 / null."
    type: dict
    default: {}
  protected_types:
    description: Key types counted as protected (a cleanup must never delete them).
    type: list
    elements: str
    default: [pre-key, app-state-sync-key, app-state-sync-version, identity-key, lid-mapping]
  expected_role:
    description: C(primary) rates a standby critical (the application cannot write to it), C(standby) the reverse, C(any) neither.
    type: str
    choices: [primary, standby, any]
    default: primary
  sample_size:
    description: At most this many company ids (and waiting locks) are listed in the samples.
    type: int
    default: 10
  dead_tuples_floor:
    description: A table with fewer dead tuples counts as clean whatever its ratio (small tables reach any ratio).
    type: int
    default: 1000
  arming_record:
    description:
      - The failover's arming record written by M(baileys_failover_arming) (each standby refresh). Adds RV(arming) --
        whether the host is armed (the last refresh found what a failover needs, less than O(arming_max_age) seconds
        ago) and since when -- and the samples C(baileys_dr_failover_armed) and
        C(baileys_dr_failover_armed_since_timestamp_seconds). Not a check, it changes no status. Read-only.
    type: path
  arming_max_age:
    description: A record older than this many seconds does not arm the host.
    type: int
    default: 3600
  standby_dir:
    description:
      - The standby copy kept by M(baileys_auth_export) O(mode=standby) on this host. Adds the check C(standby_refresh)
        (value 1 when refused) -- critical while its last refresh was refused by the deletion guard (the copy keeps the
        state before a mass deletion; the message gives the reasons and the generation it keeps), warning when the copy
        cannot be read, healthy otherwise (also when there is no copy, for example while the service runs on it after a
        failover). Read-only, no lock taken.
      - Also compared with the database for the check C(identity) (see O(sessions_dir)).
    type: path
  sessions_dir:
    description:
      - The application's sessions tree. With O(standby_dir), adds the check C(identity) -- critical when a company's
        identity (C(registrationId), C(me.id), the sha256 of its signed identity public key) differs from the one the last
        snapshot recorded (the database against the standby copy's manifest, this tree's C(creds.json) against its
        own manifest) -- re-paired, or fresh credentials written over the real ones. A company that was not registered
        before is not reported. Read-only.
    type: path
  app_root:
    description:
      - The application's root. Adds the check C(credentials_cache) on its C(.baileys-cache.json) (the service's credentials
        cache, written while PostgreSQL is unreachable) -- presence, age, mode (must be 0600) and whether each company's
        cached identity equals the store's (the database, else O(sessions_dir)); warning otherwise. Only identities are
        read from it, never returned. Read-only.
    type: path
  companies:
    description:
      - Only these company ids (default all), the companies of this application host when several share one database.
        The key counts and age buckets, companies without keys or creds, pre-keys, the latency probe's sample keys and
        the identities then count only theirs; the server, connections, locks and table sizes stay the database's.
    type: list
    elements: str
attributes:
  check_mode:
    support: full
    details: The module only reads; it runs the same in check mode.
  diff_mode:
    support: none
notes:
  - Per-state connection counts of other users' sessions need the C(pg_monitor) (or C(pg_read_all_stats)) role; without it
    their state is C(unknown).
  - Server version 14 or later gives lock wait times from C(pg_locks.waitstart); older servers use the waiting query's start.
requirements:
  - psycopg2
seealso:
  - module: baileys_metrics
"""

EXAMPLES = r"""
- name: Check the auth-state store
  baileys_db_health:
    login_host: db.internal
    login_user: baileys_monitor
    login_password: "{{ vault_db_password }}"
    login_db: baileys
    probes: 50
    thresholds:
      latency_p95_seconds: {warning: 0.05, critical: 0.25}
      expired_keys: {warning: 100000}
  register: health

- name: Fail when critical (after writing the reports)
  ansible.builtin.fail:
    msg: "{{ health.checks | dict2items | selectattr('value.status', 'eq', 'critical') | map(attribute='key') | list }}"
  when: health.status == 'critical'
"""

RETURN = r"""
status:
  description: The worst status of RV(checks) (C(healthy), C(warning) or C(critical)).
  returned: always
  type: str
reachable:
  description: Whether a connection was made.
  returned: always
  type: bool
target:
  description: host:port/database checked (never the password).
  returned: always
  type: str
error:
  description: Why no connection was made.
  returned: when not reachable
  type: str
checks:
  description:
    - Per check C(status), C(value), C(warning), C(critical) and a readable C(message). Checks C(reachability), C(role),
      C(schema) (only when a table is missing) and those of O(thresholds). A check whose query failed is critical.
      C(standby_refresh) with O(standby_dir); C(identity) with O(standby_dir) or O(sessions_dir); C(credentials_cache)
      with O(app_root).
  returned: always
  type: dict
identity:
  description:
    - C(changed) (per company C(company), C(kind) C(unregistered) or C(other), C(where), C(snapshot), C(generation),
      C(snapshot_identity), C(identity)), C(changed_count), and C(credentials_cache) (C(path), C(present), C(age_seconds),
      C(mode), C(mode_ok), C(companies) with each company's C(cached) and C(store) identity and C(equal), C(differ), C(error)).
  returned: when O(standby_dir), O(sessions_dir) or O(app_root) is set
  type: dict
arming:
  description:
    - C(armed), C(armed_since) (ISO 8601 UTC) and C(armed_since_epoch), C(checked_at) (the last refresh that checked),
      C(age_seconds), C(problems) (why not armed), C(path).
  returned: when O(arming_record) is set
  type: dict
standby:
  description:
    - The standby copy as read for C(standby_refresh) -- C(path), C(exists), C(generation), C(last_good_refresh),
      C(snapshot_at), C(refused) (the refusal record, or null), C(error).
  returned: when O(standby_dir) is set
  type: dict
errors:
  description: Query errors by section (server, latency, connections, locks, keys, companies, tables).
  returned: always
  type: dict
server:
  description: version, version_num, in_recovery, replay_lag_seconds, max_connections, superuser_reserved_connections, database_size_bytes.
  returned: when reachable
  type: dict
schema_present:
  description: Whether both tables (whatsapp_auth, whatsapp_keys) exist in the search path.
  returned: when reachable
  type: bool
latency:
  description: probes, shape, p50_seconds, p95_seconds, p99_seconds, avg_seconds, min_seconds, max_seconds.
  returned: when reachable
  type: dict
connections:
  description: total, max_connections, ratio, by_application (list of application, state, count).
  returned: when reachable
  type: dict
locks:
  description: waiting, longest_wait_seconds, sample (pid, locktype, mode, relation, application, wait_seconds, blocked_by).
  returned: when reachable
  type: dict
keys:
  description:
    - total, by_type (types that are not Baileys key types under C((unknown))), age_buckets (by time since the last write
      C(0-1d), C(1-7d), C(7-14d), C(14-30d), C(30d+)), expired, expired_by_type, protected, expired_protected,
      protected_types, unknown_types.
  returned: when the tables exist
  type: dict
pre_keys:
  description:
    - "Pre-keys (never deleted by default): total, max_stored, over_warning (companies above the C(pre_keys_stored) warning)
      and companies, per company stored, creds (whether it has creds), next_pre_key_id and first_unuploaded_pre_key_id (from
      its creds), uploaded (stored ids below firstUnuploadedPreKeyId), not_uploaded (from it to nextPreKeyId),
      at_or_above_next (ids Baileys has not generated yet: should be 0), min_id, max_id, oldest_age_seconds (since the
      oldest was written)."
  returned: when the tables exist
  type: dict
companies:
  description: total, without_keys, without_keys_sample, keys_without_creds (companies, keys, sample of company_id and keys).
  returned: when the tables exist
  type: dict
tables:
  description:
    - Per table size_bytes, indexes_size_bytes, total_size_bytes, live_tuples, dead_tuples, dead_tuple_ratio, last_vacuum,
      last_autovacuum, last_analyze, last_autoanalyze (epoch seconds or null), vacuum/analyze counts and indexes (name to bytes).
  returned: when the tables exist
  type: dict
thresholds:
  description: The levels in effect (defaults merged with O(thresholds)).
  returned: always
  type: dict
metrics:
  description:
    - Prometheus samples for M(baileys_metrics), each C({name, type, help, value, labels}), names prefixed C(baileys_dr_)
      in base units, for example C(baileys_dr_db_up), C(baileys_dr_db_latency_seconds{quantile}),
      C(baileys_dr_db_connections{application,state}), C(baileys_dr_keys{key_type}), C(baileys_dr_keys_age{bucket}),
      C(baileys_dr_table_size_bytes{table}), C(baileys_dr_pre_keys{company}) (also C(_uploaded), C(_not_uploaded),
      C(_next_id), C(_first_unuploaded_id), C(_oldest_age_seconds)), C(baileys_dr_health_status{check}) (0 healthy, 1 warning, 2 critical),
      C(baileys_dr_health_last_run_timestamp_seconds).
  returned: always
  type: list
  elements: dict
check_mode:
  description: Whether the module ran in check mode (also when set by the C(check_mode) keyword, which C(ansible_check_mode) does not show).
  returned: always
  type: bool
checked_at:
  description: Epoch seconds when the check started.
  returned: always
  type: float
duration_seconds:
  description: Wall time of the check.
  returned: always
  type: float
queries:
  description: The SQL statements run (no parameters).
  returned: always
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.baileys_dr_health import PROTECTED_TYPES, DbHealth, HealthArgumentError
from ansible.module_utils.baileys_dr_postgres import HAS_PSYCOPG2, PSYCOPG2_IMPORT_ERROR, postgres_argument_spec


class DbHealthModule:
    def __init__(self, module):
        self.module = module
        self.params = module.params

    def run(self):
        for name, minimum in (("probes", 1), ("sample_size", 0), ("dead_tuples_floor", 0), ("statement_timeout", 0)):
            if self.params[name] < minimum:
                raise HealthArgumentError("%s must be %d or more, got %d" % (name, minimum, self.params[name]))
        if self.params["probes"] > 10000:
            raise HealthArgumentError("probes must be 10000 or less, got %d" % self.params["probes"])
        result = DbHealth(self.params).run()
        # Roles applied with the check_mode keyword do not see it in ansible_check_mode: they read it here.
        result["check_mode"] = self.module.check_mode
        return result


def main():
    argument_spec = postgres_argument_spec()
    argument_spec.update(
        statement_timeout=dict(type="int", default=10000, aliases=["statement_timeout_ms"]),
        probes=dict(type="int", default=20),
        thresholds=dict(type="dict", default={}),
        protected_types=dict(type="list", elements="str", default=list(PROTECTED_TYPES)),
        expected_role=dict(type="str", choices=["primary", "standby", "any"], default="primary"),
        sample_size=dict(type="int", default=10),
        dead_tuples_floor=dict(type="int", default=1000),
        arming_record=dict(type="path"),
        arming_max_age=dict(type="int", default=3600),
        standby_dir=dict(type="path"),
        sessions_dir=dict(type="path"),
        app_root=dict(type="path"),
        companies=dict(type="list", elements="str"),
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    if not HAS_PSYCOPG2:
        module.fail_json(msg="the Python library psycopg2 is required on the host running this module: %s" % PSYCOPG2_IMPORT_ERROR)
    try:
        module.exit_json(changed=False, **DbHealthModule(module).run())
    except HealthArgumentError as exc:
        module.fail_json(msg=str(exc))


if __name__ == "__main__":
    main()
