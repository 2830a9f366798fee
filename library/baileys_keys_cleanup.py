#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: baileys_keys_cleanup
short_description: Type-aware retention of the Baileys key table, archive before delete, and restore of an archive
description:
  - O(mode=delete) removes from C(whatsapp_keys) the keys that can be rebuilt and are old, never the keys Baileys still
    needs. A key is a candidate when its type has an entry in O(retention) and it was not updated for that many days
    (C(updated_at) before the run's start minus the retention). Types in O(protected_types) are never candidates; types with
    no retention entry are kept. C(whatsapp_auth) is never read or written.
  - C(tctoken) rows follow Baileys' own rule, not their age (docs/cleanup.md). The sentinel row C(__index)
    (C(TC_TOKEN_INDEX_KEY) in Baileys' src/Utils/tc-token-utils.ts, the list of JIDs Baileys' pruning walks) is never a
    candidate, in any mode and at any age. Another C(tctoken) row is a candidate exactly when Baileys' C(pruneExpiredTcTokens)
    would delete it, holding neither a non-empty token whose C(timestamp) is unexpired nor an unexpired C(senderTimestamp), by
    C(isTcTokenExpired) (4 buckets of 7 days counted from the run's start), whatever its C(updated_at) or C(expires_at).
  - Before anything is deleted the module counts the candidates exactly (per company and type, with age buckets) and
    refuses, deleting nothing, when they exceed O(max_delete) rows or O(max_delete_share) of any company's keys.
  - Every deleted row is first archived. Deletes run in batches of O(batch_size) rows in short transactions. One statement
    takes the next candidates in primary-key order (keyset pagination, so nothing is held in memory but one batch), locks
    them with C(FOR UPDATE SKIP LOCKED) (a row the application is writing is skipped, never waited for), re-checks their
    age on the version it locked (a key the application just updated is not deleted) and deletes them. The rows
    C(RETURNING) gives are appended to the archive (one gzip member), the archive and its sha256 sidecar are fsynced
    (file and directory), and only then does the batch commit. A batch that held its locks longer than
    O(max_transaction_seconds) halves the batch size for the next ones.
  - The archive C(<archive_dir>/whatsapp_keys-<UTC time>-<pid>.jsonl.gz) is gzip of JSON lines, a header line then one
    line per row as PostgreSQL's C(to_jsonb(row)) writes it (every column), so a restore gives back identical rows. Its
    sidecar C(.sha256) reads C(<hex>  <archive name>).
  - After deleting, C(VACUUM (ANALYZE)) (O(vacuum)) so that the sizes and dead tuples reported after are honest. Key
    counts, age buckets, table and index sizes and dead tuples are returned before (RV(before)), after the delete
    (RV(after_delete)) and after the vacuum (RV(after)).
  - O(mode=restore) re-inserts the rows of O(archive) that are missing (C(INSERT ... ON CONFLICT DO NOTHING)); present
    rows are never overwritten (the application may have written a newer version), and counted. The sidecar is verified
    and the whole archive parsed before the first write; a mismatch refuses the restore. Running it twice changes nothing.
  - One cleanup or restore runs per database at a time (a PostgreSQL advisory lock).
  - A run that fails after its first batch says how many keys it deleted and where their archive is (it verifies).
version_added: "0.1.0"
author: baileys-dr contributors
extends_documentation_fragment:
  - baileys_dr_postgres
options:
  mode:
    description: C(delete) applies the retention; C(restore) re-inserts an archive.
    type: str
    choices: [delete, restore]
    default: delete
  retention:
    description:
      - Days since C(updated_at) after which a key of that type may be deleted, by key type. Types not named are kept.
      - For C(tctoken) the entry only enables the cleanup of expired tokens; its number is not used (Baileys' expiry decides).
      - Only Baileys key types; an unknown type, a type also in O(protected_types), or fewer than 1 day is refused, naming it.
    type: dict
    default: {session: 30, sender-key: 30, sender-key-memory: 30, device-list: 30, tctoken: 30}
  protected_types:
    description:
      - Key types never deleted, whatever their age or C(expires_at). The defaults are the keys Baileys needs however old
        they are (unused pre-keys, app-state keys and versions, identity keys, LID mappings).
    type: list
    elements: str
    default: [pre-key, app-state-sync-key, app-state-sync-version, identity-key, lid-mapping]
  delete_expired:
    description:
      - Also delete keys of a O(retention) type whose C(expires_at) passed more than O(expired_grace_days) ago. Off by
        default, as the application sets C(expires_at) 7 or 14 days ahead on every write (it is no deletion signal).
    type: bool
    default: false
  expired_grace_days:
    description: Days after C(expires_at) before O(delete_expired) deletes a key.
    type: int
    default: 0
  companies:
    description: Only keys of these company ids (all companies when omitted).
    type: list
    elements: str
  archive_dir:
    description: Directory of the archives (created 0700). Required with O(mode=delete).
    type: path
  archive:
    description: The archive to restore. Required with O(mode=restore); its C(.sha256) sidecar must be beside it.
    type: path
  batch_size:
    description: Rows per delete transaction (and per restore insert).
    type: int
    default: 2000
  max_transaction_seconds:
    description:
      - A delete batch whose transaction took longer halves the batch size (down to 50), so that the application's upserts
        of those rows never wait long.
    type: float
    default: 0.5
  lock_timeout_ms:
    description:
      - C(lock_timeout) of the module's session. The module never waits longer than this for a lock (for example behind a
        schema change), so it never queues the application behind it; a batch that times out is retried after 0.5 s.
    type: int
    default: 1000
  lock_retries:
    description: Batches retried after a lock timeout before the run fails (what was deleted so far stays archived).
    type: int
    default: 5
  max_delete:
    description: Refuse, deleting nothing, when more keys than this would be deleted.
    type: int
    default: 10000
  max_delete_share:
    description: Refuse, deleting nothing, when more than this share (0 to 1) of any company's keys would be deleted.
    type: float
    default: 0.5
  vacuum:
    description: Run C(VACUUM (ANALYZE)) on the table after deleting (needs the table's owner).
    type: bool
    default: true
attributes:
  check_mode:
    support: full
    details:
      - O(mode=delete) returns the exact candidates per company and type, their age buckets, the statistics and whether
        the caps would refuse (as a real run, it then fails with RV(refused)); it deletes and writes nothing.
      - O(mode=restore) verifies the archive and returns how many rows would be inserted; it writes nothing.
  diff_mode:
    support: none
notes:
  - "Test-only fault hooks, never to be set in production: C(BAILEYS_DR_TEST_FAIL_AT=cleanup_after_batch:<n>) makes the
    run fail after the n-th batch committed, C(BAILEYS_DR_TEST_PAUSE_AT=cleanup_after_batch:<n>) makes it sleep
    C(BAILEYS_DR_TEST_PAUSE_SECONDS) there."
  - The archive holds key material, so it is written 0600 in a 0700 directory. Keep O(archive_dir) on storage as protected
    as the database.
  - Age buckets (days since C(updated_at) at the run's start, lower bound included) are C(0-1d), C(1-7d), C(7-14d),
    C(14-30d), C(30d+), and C(unknown) for rows without C(updated_at); the buckets of M(baileys_db_health) too
    (module_utils/baileys_dr_ages.py).
  - C(pg_stat_user_tables) counters are collected asynchronously; the module asks the server to flush its own counters
    (PostgreSQL 15 and later) before reading them.
requirements:
  - psycopg2
seealso:
  - module: baileys_auth_export
"""

EXAMPLES = r"""
- name: What would the cleanup delete?
  baileys_keys_cleanup:
    archive_dir: /var/backups/baileys-dr/keys
    db_url: "{{ vault_db_url }}"
  check_mode: true
  register: plan

- name: Delete rebuildable keys older than their retention, archived first
  baileys_keys_cleanup:
    archive_dir: /var/backups/baileys-dr/keys
    retention: {session: 30, sender-key: 30, sender-key-memory: 30, device-list: 14, tctoken: 14}
    max_delete: 50000
    login_host: db.internal
    login_user: baileys_dr
    login_password: "{{ vault_db_password }}"
    login_db: baileys

- name: Give back what a cleanup took
  baileys_keys_cleanup:
    mode: restore
    archive: /var/backups/baileys-dr/keys/whatsapp_keys-20261128T030000123456Z-4242.jsonl.gz
    db_url: "{{ vault_db_url }}"
"""

RETURN = r"""
changed:
  description: Whether rows were deleted (delete) or inserted (restore).
  returned: always
  type: bool
mode:
  description: O(mode).
  returned: always
  type: str
check_mode:
  description: Whether the run was a check (also when check mode was set on the task only, which C(ansible_check_mode) does not show).
  returned: always
  type: bool
run_at:
  description: The database's now() at the start; retention is counted from it.
  returned: always
  type: str
plan:
  description: >-
    (delete) The candidates before deleting: keys, companies, by_company ({company: {type: n}}), by_type, by_rule ({rule: n}),
    rules ({company: {type: {rule: n}}}: the rule that selected each row, C(age>30d), C(expires_at+0d) or C(tctoken-expired)),
    buckets, row_bytes (their size in the table) and company_keys (every key of those companies, for the share cap).
  returned: mode=delete
  type: dict
refused:
  description: (delete) Whether a cap refused the run; RV(msg) says why, with the numbers.
  returned: mode=delete
  type: bool
keys_deleted:
  description: (delete) Rows deleted (and archived).
  returned: mode=delete
  type: int
deleted:
  description: (delete) Rows deleted per company and type.
  returned: mode=delete
  type: dict
deleted_by_type:
  description: (delete) Rows deleted per type.
  returned: mode=delete
  type: dict
skipped:
  description: (delete) Planned candidates not deleted (the application wrote them meanwhile, or they were locked).
  returned: mode=delete
  type: int
archive:
  description: (delete) The archive written (path, sha256, sidecar, rows, bytes), or null when nothing was deleted.
  returned: mode=delete
  type: dict
batches:
  description: (delete) batches, max_transaction_seconds, lock_timeouts and batch_size_final.
  returned: mode=delete, not in check mode
  type: dict
before:
  description: >-
    (delete) keys, companies, protected (keys of protected types), by_type ({type: {keys, buckets}}), buckets, table_bytes, index_bytes,
    total_bytes, live_tuples, dead_tuples and the last (auto)vacuum and (auto)analyze times. Keys in the scope of O(companies).
  returned: mode=delete
  type: dict
after_delete:
  description: (delete) The same, after the delete and before the vacuum.
  returned: mode=delete, when rows were deleted
  type: dict
after:
  description: (delete) The same, at the end (after the vacuum; RV(before) when nothing was deleted).
  returned: mode=delete, not in check mode
  type: dict
vacuum:
  description: (delete) ran, seconds, warnings (for example when the user does not own the table), or null when not run.
  returned: mode=delete
  type: dict
rows:
  description: (restore) Rows in the archive.
  returned: mode=restore
  type: int
inserted:
  description: (restore) Rows inserted (check mode, rows that would be).
  returned: mode=restore
  type: int
already_present:
  description: (restore) Rows already in the table (left as they are); already_present_differs counts those whose content differs.
  returned: mode=restore
  type: int
sha256:
  description: (restore) The verified sha256 of the archive.
  returned: mode=restore
  type: str
duration_seconds:
  description: Wall time of the run.
  returned: always
  type: float
queries:
  description: The SQL statements run (no parameters).
  returned: always
  type: list
  elements: str
"""

import os
import time

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.baileys_dr_cleanup import (
    ARCHIVE_FORMAT, ARCHIVE_KIND, DEFAULT_PROTECTED, DEFAULT_RETENTION, TABLE, Cleanup, CleanupError, check_cap, validate_policy,
)
from ansible.module_utils.baileys_dr_postgres import DatabaseError, connect, describe_target, postgres_argument_spec, psycopg2, scrub


class KeysCleanup:
    def __init__(self, module, connector=None):
        self.module = module
        self.params = module.params
        self.queries = []
        self.connector = connector or (lambda: connect(self.params, application_name="baileys-dr-cleanup"))

    def run(self):
        started = time.monotonic()
        # Bad maps are refused before connecting: the error names them, not the database.
        validate_policy(self.params["retention"], self.params["protected_types"], self.params["companies"],
                        self.params["expired_grace_days"])
        conn = self.connector()
        try:
            job = Cleanup(conn, self.params, self.queries)
            job.prepare()
            if self.params["mode"] == "restore":
                result = self.restore(job)
            else:
                result = self.delete(job)
        finally:
            conn.close()
        result.update(mode=self.params["mode"], check_mode=self.module.check_mode, run_at=job.run_at.isoformat(), queries=self.queries,
                      duration_seconds=round(time.monotonic() - started, 3))
        return result

    def delete(self, job):
        archive_dir = self.params["archive_dir"]
        if not self.module.check_mode:
            job.take_lock()
        before = job.stats()
        plan = job.plan()
        result = dict(changed=False, plan=plan, before=before, refused=False, keys_deleted=0, deleted={}, deleted_by_type={},
                      skipped=0, archive=None, vacuum=None)
        refusal = check_cap(plan["by_company"], plan["company_keys"], self.params["max_delete"], self.params["max_delete_share"])
        if refusal:
            raise CleanupError(refusal, refused=True, details=result)
        if self.module.check_mode:
            return result
        if plan["keys"] == 0:
            result["after"] = before
            return result
        self.check_space(archive_dir, plan["row_bytes"])
        header = {
            "format": ARCHIVE_FORMAT, "kind": ARCHIVE_KIND, "table": TABLE, "columns": job.columns(),
            "run_at": job.run_at.isoformat(), "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": {"target": describe_target(self.params), "system_identifier": self.system_identifier(job)},
            "policy": {"retention": job.retention, "protected_types": job.protected, "delete_expired": self.params["delete_expired"],
                       "expired_grace_days": self.params["expired_grace_days"], "companies": self.params["companies"] or None},
        }
        total, deleted, archive, batches = job.delete(archive_dir, plan["keys"], header)
        by_type = {}
        for types in deleted.values():
            for key_type, count in types.items():
                by_type[key_type] = by_type.get(key_type, 0) + count
        result.update(changed=total > 0, keys_deleted=total, deleted=deleted, deleted_by_type=dict(sorted(by_type.items())),
                      skipped=plan["keys"] - total, archive=archive, batches=batches)
        if total:
            job.flush_stats()
            result["after_delete"] = job.stats()
            if self.params["vacuum"]:
                result["vacuum"] = job.vacuum()
                job.flush_stats()
        result["after"] = job.stats() if total else before
        return result

    def restore(self, job):
        if not self.module.check_mode:
            job.take_lock()
        result = job.restore(self.params["archive"], check_mode=self.module.check_mode)
        result["changed"] = result["inserted"] > 0 and not self.module.check_mode
        return result

    @staticmethod
    def system_identifier(job):
        try:
            return job._one("SELECT (SELECT system_identifier FROM pg_control_system())::text")[0]
        except psycopg2.Error:
            job.conn.rollback()
            return None

    @staticmethod
    def check_space(archive_dir, row_bytes):
        """The archive compresses well below the rows' size in the table: that size must be free."""
        probe = archive_dir
        while not os.path.isdir(probe):
            probe = os.path.dirname(probe) or "/"
        info = os.statvfs(probe)
        free = info.f_bavail * info.f_frsize
        if free < row_bytes:
            raise CleanupError("not enough free space for the archive in %s: %d bytes free, the rows take %d" % (archive_dir, free, row_bytes))


def main():
    argument_spec = postgres_argument_spec()
    argument_spec.update(
        mode=dict(type="str", choices=["delete", "restore"], default="delete"),
        retention=dict(type="dict", default=dict(DEFAULT_RETENTION)),
        protected_types=dict(type="list", elements="str", default=list(DEFAULT_PROTECTED)),
        delete_expired=dict(type="bool", default=False),
        expired_grace_days=dict(type="int", default=0),
        companies=dict(type="list", elements="str"),
        archive_dir=dict(type="path"),
        archive=dict(type="path"),
        batch_size=dict(type="int", default=2000),
        max_transaction_seconds=dict(type="float", default=0.5),
        lock_timeout_ms=dict(type="int", default=1000),
        lock_retries=dict(type="int", default=5),
        max_delete=dict(type="int", default=10000),
        max_delete_share=dict(type="float", default=0.5),
        vacuum=dict(type="bool", default=True),
    )
    module = AnsibleModule(
        argument_spec=argument_spec,
        supports_check_mode=True,
        required_if=[("mode", "delete", ["archive_dir"]), ("mode", "restore", ["archive"])],
    )
    params = module.params
    if params["batch_size"] < 1 or params["batch_size"] > 100000:
        module.fail_json(msg="batch_size must be between 1 and 100000, not %d" % params["batch_size"])
    if params["max_delete"] < 0:
        module.fail_json(msg="max_delete must be 0 or more, not %d" % params["max_delete"])
    if not 0 < params["max_delete_share"] <= 1:
        module.fail_json(msg="max_delete_share must be above 0 and at most 1, not %s" % params["max_delete_share"])
    try:
        module.exit_json(**KeysCleanup(module).run())
    except CleanupError as exc:
        extra = dict(exc.details, refused=exc.refused) if exc.refused else {}
        module.fail_json(msg=scrub(exc, params), **extra)
    except DatabaseError as exc:
        module.fail_json(msg=str(exc))
    except psycopg2.Error as exc:
        module.fail_json(msg="cleanup of %s at %s failed: %s" % (TABLE, describe_target(params), scrub(exc, params).strip()))
    except OSError as exc:
        module.fail_json(msg="writing the archive failed: %s" % scrub(exc, params))


if __name__ == "__main__":
    main()
