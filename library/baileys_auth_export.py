#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: baileys_auth_export
short_description: Export the PostgreSQL auth-state store as Baileys file sessions, or keep a standby copy up to date
description:
  - Writes the sessions tree Baileys' C(useMultiFileAuthState) reads (docs/architecture.md, "The sessions tree and its
    manifest (format 1)"); per company C(company_<id>/creds.json) and one C(<type>-<fixFileName(id)>.json) per key, in
    compact JSON with Buffers in Baileys' base64 form whichever form the row holds; C(app-state-sync-key) values as stored.
  - Beside the files, C(.baileys-dr/companies/<id>.json) lists every file with its original key id, type, sha256 and
    size, and C(.baileys-dr/manifest.json), written last, lists every company with its state digest and the sha256 of
    its manifest. M(baileys_sessions_verify) checks a tree against them.
  - Every company is read in one C(REPEATABLE READ READ ONLY) transaction (a consistent snapshot), keys through a
    server-side cursor in digest order, so memory follows the largest company, never the table.
  - O(mode=live) writes a complete tree into a sibling staging directory C(.<name>.staging-<random>), syncs it, and swaps
    it in atomically (C(renameat2) C(RENAME_EXCHANGE)); the tree it replaces is kept as C(<name>.before-<UTC time>)
    (or in O(backup_dir)). Files of an earlier export disappear by construction. When the manifest of O(dest) proves the
    database unchanged (same row versions, see O(mode)) and the tree still holds what its manifests list, nothing is
    written and C(changed) is false; when it cannot tell (for example after a PostgreSQL restart) every digest is computed
    from the rows and compared with the manifest before anything is written.
  - The tree is compared with its own manifests first (the rules of M(baileys_sessions_verify) O(depth=structure), one
    listing per company, one C(lstat) per file, the sha256 of files modified after the manifest), because a service
    running on the files creates, rewrites in place and deletes files the database never sees. A tree that differs is
    written anew even when the database did not change; RV(rewrite_reason) says why and RV(replaced_drift) counts and
    names what the service changed. A replaced tree that differs from its manifests (or has none) is kept whatever
    O(keep_backup) says, and the module warns that it holds files the database never received.
  - O(mode=standby) keeps a standby copy up to date in place, writing only what changed since the last refresh, which
    makes failover possible while PostgreSQL is down. The first run (or a run on a tree without a usable manifest)
    builds the tree like O(mode=live). Later runs skip companies whose row versions did not move (one aggregate query
    over C(xmin)), compare the row versions of the other companies with those the last refresh recorded
    (C(.baileys-dr/digest-lines/<id>.rows)), read back only rows whose version moved, rewrite a file only when
    C(md5(value::text)) differs from the manifest's C(row_md5), delete files of deleted keys, recompute the company digest
    from the previous digest input (C(.baileys-dr/digest-lines/<id>.lines), whose sha256 is the digest), then write the
    company manifest, sync the file system once, and rewrite the top manifest with a new C(generation) and
    C(last_good_refresh). Changed files are rewritten in place (the manifests, written after, make a torn file visible). Row versions are only compared within one server lifetime (same system identifier, timeline
    and postmaster start time); otherwise the refresh compares C(md5(value::text)) of every row, which is slower.
  - A refresh that stops half-way leaves the previous top manifest, so the standby does not verify until the next good
    refresh; the next refresh sees C(.baileys-dr/refresh-in-progress), re-checks every company's files against its own
    manifest, and rewrites whole the companies that do not match.
  - A full write (O(mode=live), or the first O(mode=standby) build) of at least 20,000 keys in two or more companies is
    shared among worker processes, one per usable CPU (at most 4). The module exports its snapshot
    (C(pg_export_snapshot())), each worker opens one more connection on that same snapshot and writes whole companies
    into the staging directory, and the module writes the top manifest. A worker that cannot connect makes the module
    write alone. A worker that fails fails the run, every worker is stopped and the staging directory removed.
  - Hostile rows are refused before anything is swapped in, naming company, key type and key id. Refused are company ids outside
    C([A-Za-z0-9_-]{1,50}), key types that are not Baileys key types (see O(unknown_types)), key ids with control
    characters, key ids C(.) or C(..), file names over 255 bytes, and two ids of one company that become the same file
    through Baileys' C(fixFileName) (for example C(a:b) and C(a-b)).
  - With O(companies), the tree holds only those companies (it is still replaced or refreshed as a whole).
  - An existing, non-empty O(dest) without the project's top manifest (C(.baileys-dr/manifest.json)) is refused before
    anything is read, written, moved or deleted, naming O(dest) and its first entries (an application directory given by
    mistake, a tree another tool made), unless O(replace_foreign=true).
  - "Deletion guard (O(mode=standby)): before a refresh writes anything it compares the key counts of the database with
    those of the copy's manifest. It refuses, changing nothing, when the database has no company at all or no key at all
    while the copy has some, when it would delete more than O(max_delete_share) of the copy's keys, or every key of a
    company holding more than O(max_company_keys_removed) keys. The copy, its generation and O(archive_dir) stay as they
    are (no archive is written or removed); the refusal is recorded in C(.baileys-dr/refresh-refused.json) (what would
    have been removed, when, the limits), which M(baileys_db_health) reports as critical and the next good refresh
    removes; the module fails naming the counts and the first companies. O(force=true) overrides it for one run (the
    result's RV(deletion_guard) and a warning say so). The same guard holds for the bulk and final passes of a failover,
    which use this mode."
version_added: "0.1.0"
author: baileys-dr contributors
extends_documentation_fragment:
  - baileys_dr_postgres
options:
  mode:
    description:
      - C(live) writes a complete new tree and swaps it in; C(standby) refreshes a standby tree in place.
    type: str
    choices: [live, standby]
    default: live
  dest:
    description:
      - The sessions tree, for example C(/srv/baileys-app/baileys_sessions) (live) or
        C(/srv/baileys-app/baileys_sessions.standby) (standby).
      - Its parent must exist. O(dest) must not be a symbolic link; a parent component may be one only when root or the
        user running the module owns it.
    type: path
    required: true
  companies:
    description:
      - Only these company ids. The tree then holds only these companies (it is not merged into an existing tree).
    type: list
    elements: str
  unknown_types:
    description:
      - What to do with keys whose type is not a Baileys key type. C(fail) refuses the export naming them; C(skip) leaves
        them out (counted in RV(skipped_keys)); the manifest's digests then cover only the exported keys.
      - Keys of a type the application's Baileys (O(app_root)) does not know yet (C(lid-mapping) before 7.0.0-rc.1,
        C(device-list) rc.5, C(tctoken) rc.7, C(identity-key) rc.10) are refused by C(fail), naming the types and the
        version; C(skip) writes them and reports them in RV(baileys).
    type: str
    choices: [fail, skip]
    default: fail
  backup_dir:
    description:
      - Directory for the tree a live export replaces (same file system as O(dest)). Default the parent of O(dest).
    type: path
  keep_backup:
    description:
      - Keep the replaced tree (returned as RV(backup)); when false it is removed after the swap, but only when it held exactly
        what its manifests list (a tree a service wrote into, or one without a manifest, is always kept).
    type: bool
    default: true
  owner:
    description: User (name or uid) owning every written file and directory.
    type: str
  group:
    description: Group (name or gid) owning every written file and directory.
    type: str
  space_margin:
    description:
      - The file system of O(dest) must have the estimated size of what will be written times this margin free (and as
        many free inodes as files times the margin).
    type: float
    default: 1.5
  force:
    description:
      - O(mode=live) writes a new tree even when the manifest of O(dest) proves the database unchanged.
      - "O(mode=standby) refreshes even when the deletion guard (O(max_delete_share), O(max_company_keys_removed), an empty
        database) would refuse: the deletion is copied into the standby. For the one run that is meant to do it."
    type: bool
    default: false
  max_delete_share:
    description:
      - O(mode=standby). A refresh that would delete more than this share (0 to 1) of the keys the copy holds is refused and
        changes nothing (see the deletion guard above). C(1) turns this rule off.
    type: float
    default: 0.1
  max_company_keys_removed:
    description:
      - O(mode=standby). A refresh that would delete every key of a company holding more than this many keys (the company
        gone from the database, or left without a key) is refused and changes nothing.
    type: int
    default: 10
  replace_foreign:
    description:
      - Replace an existing, non-empty O(dest) that has no C(.baileys-dr/manifest.json) (a directory this project did not
        write). The replaced directory is moved beside O(dest) as C(<name>.before-<UTC time>) (or into O(backup_dir)) and
        kept whatever O(keep_backup) says. Without it such a O(dest) is refused.
    type: bool
    default: false
  identity_force_companies:
    description:
      - Companies whose identity may change in this run. Before anything is written, each company's identity in the
        database (C(registrationId), C(me.id), the sha256 of C(creds.signedIdentityKey.public)) is compared with the one
        O(dest) holds (its C(creds.json), else what its manifest recorded); registered creds (with C(me)) replaced by
        unregistered ones (fresh creds, no C(me)) or by another identity are refused, naming the company and both
        identities (never a secret value), and nothing is written. Listed companies pass (the result's C(identity.forced)).
      - O(force) does not override this guard.
    type: list
    elements: str
    default: []
  app_root:
    description:
      - The application's root, where the Baileys version it has installed is read (C(node_modules/baileys/package.json),
        C(node_modules/@whiskeysockets/baileys/package.json), else C(package-lock.json)) and recorded in the top manifest
        (C(baileys)). Defaults to the parent directory of O(dest) (the application's layout).
    type: path
  return_digests:
    description: Return RV(digests) also when there are more than 1000 companies.
    type: bool
    default: false
  lock_timeout:
    description:
      - Seconds to wait for the lock (C(flock) on the parent of O(dest)) another export, refresh or verification holds.
    type: int
    default: 300
  archive_dir:
    description:
      - O(mode=standby) only. After a good refresh, when the newest archive is older than O(archive_every), write the
        generation as C(sessions-<generation>-<UTC time>.jsonl.gz) (one JSON line per file with company, name, type, id
        and content, after a header line holding the top manifest) and a C(.sha256) sidecar, both synced; every file is
        checked against its manifest while archiving. Keeps the newest O(archive_keep).
    type: path
  archive_keep:
    description: Archives to keep in O(archive_dir).
    type: int
    default: 4
  archive_every:
    description: Minimum seconds between two archives.
    type: int
    default: 3600
attributes:
  check_mode:
    support: full
    details:
      - Connects, counts, estimates the bytes it would write, checks the free space and reports whether the tree differs
        from the database (live, comparing every company's digest with the manifest; standby, the files it would write and
        delete, comparing row versions and md5s); writes nothing. A refresh the deletion guard refuses, or a foreign
        O(dest), fails in check mode too (nothing is recorded).
  diff_mode:
    support: none
notes:
  - Files are written 0600 and directories 0700 (the module runs with umask 077).
  - Durability comes from one C(syncfs(2)) of the file system of O(dest) before the swap (live) or before the top manifest
    (standby), instead of one C(fsync) per file.
  - The lock is an C(flock) on the parent directory of O(dest), so one writer (export or refresh) or several verifications at
    a time per parent directory.
  - "Test-only fault hooks, never to be set in production: C(BAILEYS_DR_TEST_PAUSE_AT=<point>) makes the module sleep
    C(BAILEYS_DR_TEST_PAUSE_SECONDS) (default 30) at that point, C(BAILEYS_DR_TEST_FAIL_AT=<point>) makes it fail there.
    Points: C(after_company:<n>) (after the n-th company, both modes), C(before_swap) (live),
    C(before_company_manifest:<n>) and C(before_manifest) (standby refresh)."
requirements:
  - psycopg2
seealso:
  - module: baileys_sessions_verify
"""

EXAMPLES = r"""
- name: Export the auth state for failover
  baileys_auth_export:
    dest: /srv/baileys-app/baileys_sessions
    owner: baileys
    group: baileys
    login_host: db.internal
    login_user: baileys_dr
    login_password: "{{ vault_db_password }}"
    login_db: baileys
  register: export

- name: Keep the standby copy up to date (every 15 minutes)
  baileys_auth_export:
    mode: standby
    dest: /srv/baileys-app/baileys_sessions.standby
    archive_dir: /var/backups/baileys-sessions
    archive_keep: 4
    db_url: "{{ vault_db_url }}"

- name: Accept a deletion the guard refused (one run, after checking it was intended)
  baileys_auth_export:
    mode: standby
    dest: /srv/baileys-app/baileys_sessions.standby
    force: true
    db_url: "{{ vault_db_url }}"

- name: What would an export change?
  baileys_auth_export:
    dest: /srv/baileys-app/baileys_sessions
    db_url: "{{ vault_db_url }}"
  check_mode: true
"""

RETURN = r"""
changed:
  description: Whether session files were written or deleted (a standby refresh also rewrites its top manifest when nothing changed, to record RV(last_good_refresh)).
  returned: always
  type: bool
dest:
  description: The tree.
  returned: always
  type: str
backup:
  description: Where the replaced tree went (live), or null.
  returned: always
  type: str
companies:
  description: Companies in the database (after O(companies)).
  returned: always
  type: int
keys:
  description: Keys of those companies (exported keys after a live export).
  returned: always
  type: int
files:
  description: Session files written by this run.
  returned: always
  type: int
bytes:
  description: Bytes of session files written by this run.
  returned: always
  type: int
estimated_bytes:
  description: Estimated size of what is written (content, per-file block overhead, manifests); the free-space check uses it.
  returned: when something is to be written
  type: int
digests:
  description: State digest by company id, of the tree as written (or as the manifest lists when nothing was written).
  returned: when there are at most 1000 companies, or O(return_digests)
  type: dict
manifest:
  description: Path of the top manifest.
  returned: always
  type: str
generation:
  description: Generation of the tree (incremented by every export or refresh that changed it).
  returned: always
  type: int
snapshot_at:
  description: The database's now() of the read transaction.
  returned: always
  type: str
system_identifier:
  description: The PostgreSQL system identifier (pg_control_system()).
  returned: always
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
workers:
  description: Worker processes that wrote the tree, or shared a standby refresh's companies (0 when the module worked alone).
  returned: when a tree was written in full (O(mode=live), first O(mode=standby) build) or a standby refresh ran
  type: int
skipped_keys:
  description: Keys of unknown types left out (O(unknown_types=skip)).
  returned: when rows were read
  type: int
differs:
  description: (live) Whether the database differs from the manifest of O(dest).
  returned: mode=live
  type: bool
rewrite_reason:
  description:
    - "(live) Why the tree is (or, in check mode, would be) written anew, in one line, for example C(the service changed the tree
      since its manifest: 1 file added (company_x/session-1.2.json), 1 changed (company_x/pre-key-7.json), 1 deleted
      (company_x/pre-key-3.json))."
  returned: mode=live, when a tree is or would be written
  type: str
replaced_drift:
  description:
    - (live) How the replaced tree (now at RV(backup)) differed from its own manifests; in check mode, the tree at O(dest). Null
      when O(dest) did not exist.
    - C(clean), C(manifest) (a top manifest was read), C(added), C(changed), C(deleted) (file counts), C(companies) (per drifted
      company, the first file names of each kind), C(extra_companies), C(missing_companies), C(problems), C(reason).
  returned: mode=live, when a tree is or would be written
  type: dict
would_write:
  description: (live, check mode) Companies, keys, files and estimated bytes a run would write.
  returned: check mode, when the tree differs
  type: dict
would_change:
  description: (standby, check mode) Files to write and delete, companies to rebuild or remove, per company (capped at 100).
  returned: check mode, mode=standby, after the first build
  type: dict
last_good_refresh:
  description: (standby) Time of the last refresh that completed.
  returned: mode=standby
  type: str
age_seconds:
  description: (standby) Seconds since RV(last_good_refresh).
  returned: mode=standby
  type: float
files_written:
  description: (standby) Files written; also files_deleted, rows_fetched, rows_unchanged_content, companies_refreshed,
    companies_rebuilt, companies_skipped, companies_added, companies_removed.
  returned: mode=standby, after the first build
  type: int
deletion_guard:
  description:
    - (standby refresh) What the refresh removes, counted before anything is written, and the guard's decision
      (a refused refresh fails instead, with these counts in its message).
    - C(keys_in_copy), C(keys_in_database), C(keys_removed), C(share), C(companies_in_copy), C(companies_in_database),
      C(companies_losing_all_keys), C(companies) (the largest such companies, at most 5, each C(company_id), C(keys),
      C(gone)), C(limits), C(reasons) (empty when within the limits), C(refused), C(overridden) (true when O(force) let
      a refresh the guard would have refused go through).
  returned: mode=standby, after the first build
  type: dict
identity:
  description:
    - The identity guard's report, before anything is written -- C(changed) (per company whose identity changes, at most
      100, C(company), C(kind) C(unregistered) or C(other), C(before), C(after) identities) and C(forced) (those let
      through by O(identity_force_companies)). A change that is not forced fails the run instead, naming the company
      and both identities (C(registrationId), C(me.id), the key hash's first 12 hex characters).
  returned: when the database was read
  type: dict
baileys:
  description:
    - The Baileys package the application has installed (O(app_root)), recorded in the top manifest -- C(package),
      C(version), C(source), C(types_unknown) (rows per key type this version does not know; refused unless
      O(unknown_types=skip)); null when no package.json or package-lock.json names it.
  returned: when the database was read
  type: dict
archive:
  description: (standby) The archive written by this run, or null.
  returned: when O(archive_dir) is set
  type: str
archives:
  description: (standby) Archives kept, newest first.
  returned: when O(archive_dir) is set
  type: list
  elements: str
"""

import grp
import os
import pwd

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.baileys_dr_postgres import DatabaseError, connect, describe_target, psycopg2, scrub
from ansible.module_utils.baileys_dr_auth_export import auth_export_argument_spec, export_tree
from ansible.module_utils.baileys_dr_drift import drift_warning
from ansible.module_utils.baileys_dr_tree import SessionsError, check_company_id


def resolve_owner(module):
    """(uid, gid) to chown written paths to (-1 keeps), or None."""
    owner, group = module.params["owner"], module.params["group"]
    if owner is None and group is None:
        return None
    try:
        uid = -1 if owner is None else (int(owner) if owner.isdigit() else pwd.getpwnam(owner).pw_uid)
        gid = -1 if group is None else (int(group) if group.isdigit() else grp.getgrnam(group).gr_gid)
    except KeyError as exc:
        module.fail_json(msg="unknown owner or group: %s" % exc)
    if os.geteuid() != 0 and uid not in (-1, os.geteuid()):
        module.fail_json(msg="only root can give the files to another owner (uid %d)" % uid)
    return uid, gid


class AuthExport:
    def __init__(self, module):
        self.module = module
        self.params = module.params

    def run(self):
        for company_id in self.params["companies"] or ():
            check_company_id(company_id)
        owner = resolve_owner(self.module)
        target = describe_target(self.params)
        result = export_tree(self.params, lambda: connect(self.params, application_name="baileys-dr-export"), target, owner,
                             self.module.check_mode)
        warning = None if self.module.check_mode else drift_warning(result.get("replaced_drift"), result.get("backup"))
        if warning:
            self.module.warn(warning)
        guard = result.get("deletion_guard") or {}
        if guard.get("overridden"):
            self.module.warn("force=true overrode the deletion guard: %s" % "; ".join(guard["reasons"]))
        return result


def main():
    argument_spec = auth_export_argument_spec()
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    try:
        module.exit_json(**AuthExport(module).run())
    except DatabaseError as exc:
        module.fail_json(msg=str(exc))
    except SessionsError as exc:
        module.fail_json(msg=scrub(exc, module.params))
    except psycopg2.Error as exc:
        # Name the server: "server closed the connection" alone does not say which one died.
        module.fail_json(msg="reading the auth-state store at %s failed: %s"
                         % (describe_target(module.params), scrub(exc, module.params).strip()))
    except OSError as exc:
        module.fail_json(msg="writing the sessions tree failed: %s" % scrub(exc, module.params))


if __name__ == "__main__":
    main()
