#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: baileys_auth_import
short_description: Fail back from Baileys file sessions to the PostgreSQL auth-state store, or undo such a failback
description:
  - O(mode=import) makes the rows of C(whatsapp_auth) and C(whatsapp_keys) equal to the files of a sessions tree
    (docs/architecture.md, "The sessions tree and its manifest (format 1)"), company by company, each company in one
    C(REPEATABLE READ) transaction; companies are independent.
  - "Files are verified against the tree's manifest before any database write: a file whose sha256 equals the manifest's
    is the exported file; any other file (changed by Baileys, or new: keys created while the service ran on files) must be
    a regular file of valid JSON (not empty, no byte order mark, UTF-8, no C(NaN), no C(\\u0000)), and C(creds.json) a
    JSON object with C(noiseKey), C(signedIdentityKey) and C(registrationId). A file of an unknown type, an unreadable or
    invalid file, a missing C(creds.json), a missing company directory, or a company manifest whose sha256 differs from the
    top manifest's refuses the company, naming company and file."
  - The first pass reads and plans every company in read-only transactions before the first write, so by default
    (O(continue_on_error=false)) any refused company refuses the whole run before anything is written.
  - Ids of files the manifest lists come from the manifest. Ids of new files are recovered by a type-aware reverse of
    Baileys' C(fixFileName) (C(/) becomes C(__), C(:) becomes C(-)); the type is the longest type prefix of the name
    (C(sender-key-memory-) before C(sender-key-)). C(pre-key) names must be digits, C(lid-mapping) names C(<digits>) or
    C(<digits>_reverse), C(app-state-sync-key) names base64 once C(__) is read as C(/), C(sender-key) names
    C(<group jid>--<user>--<device>) (read as C(::)); C(sender-key-memory) names that are group JIDs and C(session) and
    C(identity-key) names of the shape C(<user>.<device>) are their own ids; any other name without C(-) and C(__) is its
    own id. Every other name could come from several ids and is reported in RV(ambiguous) (company, file, candidates,
    rows of the database that give the same file name); see O(ambiguous). Nothing is guessed silently.
  - "Rows: a key whose file is new gets an INSERT, a key whose value differs (canonical JSON, both Buffer encodings equal)
    an UPDATE, a row whose file Baileys deleted a DELETE; C(creds) is inserted or updated when it differs. A row whose file
    is unchanged (manifest sha256) and whose C(md5(value::text)) equals the manifest's C(row_md5), or whose canonical
    value equals the file's, is not written at all: its JSONB text, C(created_at), C(updated_at) and C(expires_at) stay
    byte for byte. Written rows get C(expires_at) by the application's policy (now + 7 days for C(lid-mapping),
    C(pre-key), C(session), C(sender-key), now + 14 days otherwise) and C(updated_at) from the trigger (or the default)."
  - "Buffers: files hold Baileys' base64 form; written rows get the application's own form
    (C({\"type\": \"Buffer\", \"data\": [..]})) unless O(buffer_format=base64). C(app-state-sync-key) values are written as
    the files hold them."
  - Before the COMMIT of a company (written while the server does its writes), the rows it replaces or deletes and the ids
    it inserts are saved in C(<undo_dir>/failback-<company>-<UTC time>.jsonl.gz) with a C(.sha256) sidecar, both synced
    (RV(undo_files)); see docs/failback-undo.md. An undo file of a company whose transaction did not commit is removed.
  - Values are written through one C(COPY) into a temporary staging table, then one C(INSERT) and one C(UPDATE) from it.
    After the writes, the company's rows must be exactly the keys of its files, every written row byte for byte the JSONB
    of the text sent (made from the file's parsed value, from which its digest line is computed too; when the files are
    exactly the exported ones, their digest is the manifest's), the creds equal to C(creds.json), and the company
    directory unchanged since it was read; otherwise the transaction is rolled back.
  - "Conflict guard: rows changed in PostgreSQL after O(since) (C(updated_at) later than it) that the import would
    overwrite or delete are listed in RV(conflicts) and refuse the company unless O(force). Rows changed after O(since)
    that already equal the files are not conflicts (so a re-run after a partial failback completes)."
  - O(mode=undo) re-applies undo files, one transaction per file (see docs/failback-undo.md); the saved rows come back
    exactly (value text, C(created_at), C(updated_at), C(expires_at)), rows the failback inserted are deleted. Idempotent.
    Rows changed after the failback that the undo would overwrite refuse the file unless O(force).
  - Keys of types that are not Baileys key types are never touched (nor counted in the digests).
  - "Two passes (the switch rule, docs/failback-undo.md): a bulk pass while the service still runs on the files
    (O(changed_during_read=defer), O(pass_record)), then, once the service is stopped and fenced, a delta pass
    (O(delta_from)) that proves the companies unchanged since the bulk pass without reading their files and, in the
    others, reads only the files changed since the bulk pass (its pass files records). In a bulk or delta pass a dropped
    database connection is retried (RV(retries))."
version_added: "0.1.0"
author: baileys-dr contributors
extends_documentation_fragment:
  - baileys_dr_postgres
options:
  mode:
    description: C(import) (files to PostgreSQL) or C(undo) (re-apply undo files).
    type: str
    choices: [import, undo]
    default: import
  src:
    description:
      - The sessions tree, for example C(/srv/baileys-app/baileys_sessions). Required with O(mode=import).
      - Must not be a symbolic link. Read under a shared C(flock) on its parent (no export or refresh of the same parent
        runs meanwhile).
    type: path
    aliases: [path]
  companies:
    description: Only these company ids (each must be in the tree, unless O(missing_companies=skip)).
    type: list
    elements: str
  missing_companies:
    description:
      - What a company of O(companies) that the tree does not hold (no directory, not in the manifest) does. C(fail)
        refuses the run naming them. C(skip) leaves them out - their rows, if any, stay as they are - and lists them in
        RV(absent_companies) (a host's company with no data yet, which the failover exported nothing of).
    type: str
    choices: [fail, skip]
    default: fail
  undo_dir:
    description:
      - Directory of the undo files (created 0700 when missing). Required with O(mode=import). Undo files hold key material
        (they are written 0600).
    type: path
  undo_file:
    description:
      - Undo files to re-apply (O(mode=undo)), typically RV(undo_files) of the failback. Every file is checked against its
        C(.sha256) sidecar before the first write; they are applied newest failback first (transaction id), whatever the
        order given.
    type: list
    elements: path
    aliases: [undo_files]
  since:
    description:
      - ISO 8601 time, normally the failover's switch time from the failover state file. Rows with C(updated_at) later than
        it that the import would overwrite or delete are conflicts.
      - Default the C(source.snapshot_at) of the tree's manifest (the database time the export read); without either, no
        conflict guard (a warning says so).
    type: str
  force:
    description: Import companies with conflicts (undo files still save what is overwritten); in O(mode=undo), undo despite rows changed after the failback.
    type: bool
    default: false
  ambiguous:
    description:
      - C(fail) refuses a company holding a file whose original id cannot be told for certain; C(skip) leaves such files out
        (and keeps the database rows that give the same file name untouched).
    type: str
    choices: [fail, skip]
    default: fail
  buffer_format:
    description: Buffer encoding of written rows; C(array) is the application's own (C(JSON.stringify) of a Buffer).
    type: str
    choices: [array, base64]
    default: array
  continue_on_error:
    description:
      - C(false) stops at the first failed company (companies committed before stay committed and are listed in
        RV(committed)); any company refused by the first pass refuses the run before the first write. C(true) imports every
        company it can. The module fails in both cases when a company failed.
      - With worker processes (RV(workers)), C(false) hands out no further company after the first failed one; the
        companies other workers are writing at that moment finish (committed or failed, each listed), the rest are
        not attempted.
    type: bool
    default: false
  allow_other_database:
    description: Import into (or undo on) a database whose system identifier differs from the one in the tree's manifest (or the undo file).
    type: bool
    default: false
  require_manifest:
    description: Refuse a tree without a manifest (C(.baileys-dr/manifest.json) or an older tree's C(manifest.json)).
    type: bool
    default: true
  max_report:
    description: Ambiguous files, conflicts and errors listed at most (counts are complete).
    type: int
    default: 100
  return_digests:
    description: Return RV(digests) also when there are more than 1000 companies.
    type: bool
    default: false
  lock_timeout:
    description: Seconds to wait for the C(flock) on the parent of O(src) that an export or refresh holds.
    type: int
    default: 300
  changed_during_read:
    description:
      - What a company whose directory changes while it is read or imported gets.
      - C(refuse) (a single-pass failback, the service stopped) fails the company, as the service must not write meanwhile.
      - C(defer) (the bulk pass, the service still running on the files) leaves it out - its transaction rolled back, its
        undo file removed - and lists it in RV(deferred); the run succeeds. A file that vanished or could not be parsed
        in a directory that changed meanwhile defers the company too. The delta pass imports deferred companies.
    type: str
    choices: [refuse, defer]
    default: refuse
  pass_record:
    description:
      - Path of the pass record to write at the end of the run (not in check mode), atomically (temporary file, fsync,
        rename), mode 0600; its directory must exist. Give it to the delta pass as O(delta_from).
      - "Per company committed or found equal: the signature of its directory listed before the read (sha256 over the
        sorted name, size, mtime_ns and inode of every entry, no content read), the fingerprint of its rows after the
        COMMIT (Baileys keys, sum of C(hashint8(xmin)), creds C(xmin)), the xid of the transaction that wrote it (null when
        nothing was written) and its digest; the deferred companies, the tree's path, the database's system identifier
        and timeline; per company the xids of every transaction of this failback's passes that wrote it (those of the
        record it replaces, when of the same tree and database, kept)."
      - A company with a file written less than 100 ms (2 s on a file system of whole-second times) before the listing
        gets no signature (a same-size rewrite within one clock tick keeps size and mtime), nor one whose rows changed in
        PostgreSQL after its read or COMMIT (another writer); the delta pass imports them fully.
      - "Beside it, in C(<pass_record>.files/) (mode 0700), one pass files record per company (C(<company>.tsv), 0600,
        its sha256 in the pass record): every file's inode, size and mtime as listed before the read (a file within that
        window of the listing, or changed while read, is marked not provable) and the company's digest lines. Records of
        companies no longer in the pass record are removed. It costs the bulk pass a digest line per file (every file is
        parsed once), which a delta pass then does not pay for the files that did not change."
    type: path
  delta_from:
    description:
      - The pass record of the bulk pass; makes this run the delta pass. Each company directory is listed (stat only) and
        one aggregate query gives every company's fingerprint; a company whose signature and fingerprint are the record's
        is proven unchanged and skipped without reading a file (status C(unchanged_proven), RV(delta)). Every other
        company (files or rows changed, deferred, new, not in the record) is imported as without this option, except that
        a company whose rows are still the bulk pass's (its fingerprint) and whose pass files record is sound has only its
        changed files read - those whose inode, size or mtime differ from the record's, new ones and not provable ones -
        and only their rows and those of the files gone are planned, written and proven; the other rows are proven by the
        company's fingerprint inside the write transaction, and its digest is the recorded digest lines with the changed
        ones spliced in (RV(companies) read, files_read). Such a company is prepared from the listing the proof took (its
        directory is listed once) and written with others, 100 companies a transaction (one COPY, one proof and one
        fingerprint query for the batch, one undo file per company, all synced before the COMMIT); before the COMMIT an
        inotify watch, added before the listing, tells which directories changed since, and only those are listed again
        (all of them where inotify is missing or the tree is on a network file system). A company its batch cannot prove,
        whose rows or files changed meanwhile, is left out of the batch (a warning) and read and written whole, alone. A
        record that fails its checksum, ambiguous file names or rows changed meanwhile read the company whole
        (read_whole_because).
      - The conflict guard does not count rows whose C(xmin) is one of the xids the record holds for their company (row
        versions the bulk pass wrote, or an earlier run of it whose record it replaced; any later write gives a row another
        xmin, so another writer's change still counts).
      - A record of another tree (its path) or another database (system identifier, whatever O(allow_other_database)) is
        refused. On another timeline (a promoted standby, a point-in-time recovery) nothing is proven and nothing exempted.
    type: path
  identity_force_companies:
    description:
      - Companies whose identity may change in this run. Before a company's write transaction, the identity of its
        C(creds.json) (C(registrationId), C(me.id), the sha256 of C(signedIdentityKey.public)) is compared with the
        database's; registered creds (with C(me)) replaced by unregistered ones (fresh creds, no C(me)) or by another
        identity refuse the company (nothing of it is written), naming it and both identities (never a secret value).
      - O(force) does not override this guard.
    type: list
    elements: str
    default: []
attributes:
  check_mode:
    support: full
    details:
      - Reads and checks every file, plans every company in read-only transactions and reports per company the rows it would
        insert, update and delete, the conflicts and ambiguous files, and the digests the rows would have; writes no row and
        no undo file. It fails where a real run would refuse.
  diff_mode:
    support: none
notes:
  - Stop the service (or keep it from writing the files) during the import; a company whose directory changes while it is
    imported is rolled back.
  - One import or undo at a time per database (a session advisory lock); an import of listed O(companies) (a fleet's host)
    excludes only the imports of the same companies (a lock per company, the database's lock shared), so the hosts of a
    fleet import at once, while an import of every company, and an undo, exclude every other.
  - "An import of at least 20,000 keys (the manifest's counts) and 2 companies is shared among forked worker processes,
    one per usable CPU (at most 4, the export's policy; RV(workers)): each has its own database connection and takes
    whole companies, both passes, each company still in its own transaction, its undo file written by the worker before
    the COMMIT. A worker that cannot connect leaves the run to the module's own process. A worker that ends while writing
    a company (killed, say) fails that company: the server rolls its transaction back, unless it ended after the COMMIT
    (the undo file it wrote names the transaction, whose fate C(txid_status) tells); no further company is handed out."
  - The role needs the C(TEMPORARY) privilege on the database (PostgreSQL grants it to PUBLIC by default) for the staging
    table; without it O(mode=import) is refused before any write (check mode does not need it).
  - "In a bulk or delta pass (O(changed_during_read=defer), O(pass_record) or O(delta_from)) a database connection that
    drops (server restart, network cut; never a data or integrity error) is retried up to 3 times after 0.5, 1 and 2 s on
    a new connection, redoing only the company whose transaction it interrupted (one whose COMMIT got no answer only when
    C(txid_status) says it aborted); see RV(retries)."
  - "Test-only fault hooks, never to be set in production: C(BAILEYS_DR_TEST_PAUSE_AT=import_company:<n>) pauses
    C(BAILEYS_DR_TEST_PAUSE_SECONDS) (default 30) after the n-th company's writes (n-th of the companies the run imports:
    a delta pass does not count those proven unchanged), before its COMMIT (in a delta batch, after the batch's writes,
    before its COMMIT); C(BAILEYS_DR_TEST_FAIL_AT=import_company:<n>) fails there (a batch then fails whole). C(undo_company:<n>) is the same point of O(mode=undo)."
requirements:
  - psycopg2
seealso:
  - module: baileys_auth_export
  - module: baileys_sessions_verify
"""

EXAMPLES = r"""
- name: Fail back the files to PostgreSQL
  baileys_auth_import:
    src: /srv/baileys-app/baileys_sessions
    since: "{{ failover_state.switched_at }}"
    undo_dir: /var/lib/baileys-dr/undo
    login_host: db.internal
    login_user: baileys_dr
    login_password: "{{ vault_db_password }}"
    login_db: baileys
  register: failback

- name: What would the failback change?
  baileys_auth_import:
    src: /srv/baileys-app/baileys_sessions
    undo_dir: /var/lib/baileys-dr/undo
    db_url: "{{ vault_db_url }}"
  check_mode: true

- name: Undo the failback
  baileys_auth_import:
    mode: undo
    undo_file: "{{ failback.undo_files }}"
    db_url: "{{ vault_db_url }}"

- name: Bulk pass, the service still running on the files
  baileys_auth_import:
    src: /srv/baileys-app/baileys_sessions
    since: "{{ failover_state.data_at }}"
    undo_dir: /var/lib/baileys-dr/undo
    changed_during_read: defer
    pass_record: /var/lib/baileys-dr/failback-bulk.json
    db_url: "{{ vault_db_url }}"
  register: bulk

# ... the service stopped and fenced ...

- name: Delta pass, the service stopped
  baileys_auth_import:
    src: /srv/baileys-app/baileys_sessions
    since: "{{ failover_state.data_at }}"
    undo_dir: /var/lib/baileys-dr/undo
    delta_from: /var/lib/baileys-dr/failback-bulk.json
    db_url: "{{ vault_db_url }}"
  register: delta

- name: Undo both passes (the delta's undo files are applied first, as undo is newest first)
  baileys_auth_import:
    mode: undo
    undo_file: "{{ delta.undo_files + bulk.undo_files }}"
    db_url: "{{ vault_db_url }}"
"""

RETURN = r"""
changed:
  description: Whether rows were written (check mode, would be).
  returned: always
  type: bool
mode:
  description: C(import) or C(undo).
  returned: always
  type: str
companies:
  description:
    - (import) By company id - status (C(imported), C(unchanged), C(would_change), C(refused), C(failed), C(not_attempted),
      C(deferred) (O(changed_during_read=defer)), C(unchanged_proven) (O(delta_from))), reason (why deferred),
      inserted, updated, deleted, unchanged (rows kept as they were), creds_changed, creds (C(inserted), C(updated),
      C(unchanged), C(absent)), kept (rows of skipped ambiguous files), reverted (updates of rows changed in PostgreSQL
      after the export whose files Baileys did not touch - put back to the exported value, with a warning), conflicts,
      ambiguous, undo_file, digest, error, read (C(whole), or C(changed_files) in a delta pass that read only the files
      changed since the bulk pass), files_read, read_whole_because (why a company that could have been read per file
      was read whole).
  returned: mode=import
  type: dict
totals:
  description: (import) Sums of inserted, updated, deleted, unchanged, kept and creds_changed.
  returned: mode=import
  type: dict
committed:
  description: (import) Companies whose transaction committed in this run.
  returned: mode=import
  type: list
  elements: str
workers:
  description: (import) Worker processes that shared the companies (0 when the module imported alone).
  returned: mode=import
  type: int
failed_companies:
  description: (import) Companies refused or failed.
  returned: mode=import
  type: list
  elements: str
not_attempted:
  description: Companies (import) or undo files (undo) not attempted after a failure.
  returned: always
  type: list
  elements: str
errors:
  description: (import) company, status and error of each refused or failed company (at most O(max_report)).
  returned: mode=import
  type: list
  elements: dict
undo_files:
  description:
    - (import) Undo files written by this run, one per company that changed.
    - (undo) Outcome by undo file - company, status (C(undone), C(already_undone), C(nothing_to_undo) when the failback's
      transaction never committed, C(would_undo), C(refused), C(failed)), restored, deleted, already, creds, conflicts, error.
  returned: always
  type: raw
order:
  description: (undo) The undo files in the order applied, newest failback first (by transaction id).
  returned: mode=undo
  type: list
  elements: str
ambiguous:
  description: (import) Files whose original id cannot be told - company, file, type, reason, candidates (at most 8),
    candidate_count, in_database (ids of rows giving that file name).
  returned: mode=import
  type: list
  elements: dict
ambiguous_count:
  description: (import) All ambiguous files.
  returned: mode=import
  type: int
conflicts:
  description: Rows changed after O(since) (import) or after the failback (undo) that would be overwritten - company, type, id, updated_at.
  returned: always
  type: list
  elements: dict
conflict_count:
  description: (import) All conflicts.
  returned: mode=import
  type: int
digests:
  description: (import) State digest by company after the import (check mode, the digest the rows would have).
  returned: mode=import, when there are at most 1000 companies or O(return_digests)
  type: dict
since:
  description: (import) The time of the conflict guard, and since_from where it came from.
  returned: mode=import
  type: str
untouched_companies:
  description: (import) Companies of the database that are not in the tree (not touched).
  returned: mode=import
  type: int
duration_seconds:
  description: Wall time of the run.
  returned: always
  type: float
deferred:
  description: (import) Companies left to the delta pass because their files changed while they were read or imported (O(changed_during_read=defer)).
  returned: mode=import
  type: list
  elements: str
pass_record:
  description: (import) The pass record written (O(pass_record)), null in check mode or without the option.
  returned: mode=import
  type: str
absent_companies:
  description: (import) Companies of O(companies) the tree does not hold, left out (O(missing_companies=skip)).
  returned: mode=import
  type: list
  elements: str
delta:
  description:
    - (import, O(delta_from)) companies (in the run), unchanged_proven (skipped, no file read), imported (imported fully),
      not_proven (count by reason - files changed, rows changed, deferred by the bulk pass, not in the pass record, ...),
      from (the record), proof_seconds (listing the directories, reading the changed files of the companies written in
      batches, and the aggregate query), seconds (wall time of the run), per_file_candidates (companies whose changed
      files only are read), batched (those of them written in batches), watched (directories under an inotify watch),
      watch_off (why none is watched, or null).
  returned: mode=import, with O(delta_from)
  type: dict
  sample: {companies: 1000, unchanged_proven: 990, imported: 10, not_proven: {files changed: 10}, seconds: 3.2}
retries:
  description:
    - (import) Each retry after a dropped connection (bulk or delta pass) - what (the company and step, or the fingerprint
      query), attempt, waited (seconds), error. A run that completes after retries succeeds.
  returned: mode=import
  type: list
  elements: dict
queries:
  description: The SQL statements run (no parameters).
  returned: always
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.baileys_dr_failback import auth_import_argument_spec, failback, import_failure
from ansible.module_utils.baileys_dr_failback_errors import FailbackError
from ansible.module_utils.baileys_dr_postgres import DatabaseError, connect, describe_target, psycopg2, scrub
from ansible.module_utils.baileys_dr_tree import SessionsError, check_company_id


class AuthImport:
    def __init__(self, module):
        self.module = module
        self.params = module.params

    def run(self):
        for company_id in self.params["companies"] or ():
            check_company_id(company_id)
        return failback(self.params, lambda: connect(self.params, application_name="baileys-dr-import"),
                        describe_target(self.params), self.module.check_mode)

    def summary(self, result):
        """Why the module fails, or None."""
        return import_failure(result, self.module.check_mode)

def main():
    argument_spec = auth_import_argument_spec()
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True,
                           required_if=[("mode", "import", ["src", "undo_dir"]), ("mode", "undo", ["undo_file"])])
    runner = AuthImport(module)
    try:
        result = runner.run()
    except DatabaseError as exc:
        module.fail_json(msg=str(exc))
    except (FailbackError, SessionsError) as exc:
        module.fail_json(msg=scrub(exc, module.params))
    except psycopg2.Error as exc:
        module.fail_json(msg="the failback failed on the database, nothing of the company at hand was committed: %s"
                         % scrub(exc, module.params).strip())
    except OSError as exc:
        module.fail_json(msg="reading the sessions tree or writing an undo file failed: %s" % scrub(exc, module.params))
    # Through module.warn, as ansible-core 2.19 wants (a warnings key of the result is deprecated).
    for warning in result.pop("warnings", None) or ():
        module.warn(scrub(warning, module.params))
    message = runner.summary(result)
    if message:
        module.fail_json(msg=scrub(message, module.params), **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
