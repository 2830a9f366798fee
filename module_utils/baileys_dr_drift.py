# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What a service running on the files did to a tree (its drift), the proof of a switch, and the swap of trees.

tree_drift compares a tree with its own manifests by the rules of depth=structure (the Verifier); prove_tree does the
same for a switch, also hashing what changed since an earlier proof, in worker processes for a large tree;
swap_in_tree (baileys_sessions_swap's engine) swaps a tree in and removes the replaced one only when it held exactly
what its manifests list.
"""

from __future__ import annotations

import os
import shutil

from ansible.module_utils.baileys_dr_files import ParentLock, open_dir
from ansible.module_utils.baileys_dr_fs import swap_in
from ansible.module_utils.baileys_dr_manifests import load_top_manifest
from ansible.module_utils.baileys_dr_tree import MAX_SHOWN, SessionsError, compact_stamp, utc_now
from ansible.module_utils.baileys_dr_verify import DRIFT_SHOWN, DriftReport, Verifier
from ansible.module_utils.baileys_dr_workers import Workers, export_workers, in_thread


def tree_drift(path, lock_timeout=None):
    """How the sessions tree at path differs from its own manifests: what a service running on the files did to it.

    The rules of baileys_sessions_verify depth=structure (one implementation, Verifier): a file on disk that no
    manifest lists is added; a listed file that is absent is deleted; a listed file that is not a regular file, or
    whose size differs, or that was modified at or after the top manifest's own mtime and whose sha256 differs
    from the manifest's, is changed. Symbolic links, sub-directories and hostile names are reported, never
    followed. One company's listing at a time: one scandir per company, one lstat per file, a read only of the
    files modified since the manifest.

    Read-only. Takes no lock unless lock_timeout is given (a shared ParentLock): a caller that writes the tree
    holds the exclusive one already.

    Returns {"clean": bool, "manifest": bool (a top manifest was read), "added": n, "changed": n, "deleted": n,
    "drifted_companies": n, "companies": {id: {"added": [names], "changed": [...], "deleted": [...], "counts":
    {...}}} (drifted companies only, at most MAX_SHOWN, DRIFT_SHOWN names each), "extra_companies": [entries of the
    tree that are no company of the manifest, their files counted as added], "missing_companies": [ids, their files
    counted as deleted], "problems": [the first problems that are not files: manifests, markers], "reason": one line}.
    A tree without a manifest, or with manifests that do not chain, is not clean.
    """
    path = os.path.normpath(path)
    verifier = Verifier(path, depth="structure", max_problems=MAX_SHOWN)
    try:
        if lock_timeout is None or not os.path.isdir(os.path.dirname(path)):
            verifier.run()
        else:
            with ParentLock(os.path.dirname(path), exclusive=False, timeout=lock_timeout):
                verifier.run()
    except (OSError, SessionsError) as exc:
        # After a swap the tree is only reported on: a tree that cannot be read is not clean, and says why.
        verifier.tree_problem("%s cannot be read: %s" % (path, exc))
    return verifier.drift.summary(verifier.problem_count)


# prove_tree: companies per task handed to a worker, and the fewest companies worth forking for.
PROOF_CHUNK_COMPANIES = 50
PROOF_PARALLEL_MIN_COMPANIES = 100


def _prove_chunk(path, changed_since_ns, companies, extras):
    verifier = Verifier(path, depth="structure", max_problems=MAX_SHOWN, changed_since_ns=changed_since_ns,
                        companies=companies, extras=extras)
    try:
        verifier.run()
    except (OSError, SessionsError) as exc:
        verifier.tree_problem("%s cannot be read: %s" % (path, exc))
    return verifier.drift.summary(verifier.problem_count), verifier.problem_count


def merge_drift(parts):
    """One tree_drift summary of [(summary, problem count)] of disjoint sets of companies of one tree."""
    report, problems = DriftReport(), 0
    report.manifest = bool(parts) and all(summary["manifest"] for summary, _count in parts)
    for summary, count in parts:
        problems += count
        for kind in DriftReport.KINDS:
            report.counts[kind] += summary[kind]
        report.drifted_companies += summary["drifted_companies"]
        for company_id, entry in summary["companies"].items():
            if len(report.companies) < MAX_SHOWN:
                report.companies[company_id] = entry
        for field, limit in (("extra_companies", MAX_SHOWN), ("missing_companies", MAX_SHOWN)):
            shown = getattr(report, field)
            shown.extend(name for name in summary[field] if name not in shown)
            del shown[limit:]
        report.other.extend(problem for problem in summary["problems"] if problem not in report.other)
        del report.other[DRIFT_SHOWN:]
    return report.summary(problems)


def prove_tree(path, changed_since_ns=None, workers=None, beside=None):
    """tree_drift(path) as the proof of a switch: a file modified (mtime) or changed at all (ctime) at or after
    changed_since_ns is read and hashed (default: the top manifest's own mtime, as tree_drift), so that a file
    edited in place in a tree since it was last proven (changed_since_ns: that proof's manifest mtime) is caught
    even when a later refresh rewrote the top manifest without reading the file.

    A large tree (PROOF_PARALLEL_MIN_COMPANIES companies or more) is walked by forked worker processes, a chunk of
    companies at a time (one listing and one lstat per file is kernel time: every core helps). beside(), when given,
    runs in this process while they walk (after the fork) and its result is returned with the drift:
    (tree_drift summary, beside's result or None). Read-only; takes no lock (the caller holds it or owns the tree).
    """
    path = os.path.normpath(path)
    count = export_workers() if workers is None else workers
    companies = None
    try:
        root_fd = open_dir(path)
        try:
            companies = sorted(load_top_manifest(root_fd)[1]["companies"], key=lambda c: c.encode("utf-8"))
        finally:
            os.close(root_fd)
    except (OSError, SessionsError):
        pass  # the single walk below says what is wrong
    if companies is None or count < 2 or len(companies) < PROOF_PARALLEL_MIN_COMPANIES:
        drift = _prove_chunk(path, changed_since_ns, None, True)
        return merge_drift([drift]), (beside() if beside is not None else None)
    chunks = [companies[i:i + PROOF_CHUNK_COMPANIES] for i in range(0, len(companies), PROOF_CHUNK_COMPANIES)]
    with Workers(count, "a proof worker") as pool:
        pool.start(lambda: None, lambda _state, position: _prove_chunk(path, changed_since_ns, chunks[position], position == 0))
        # After the fork: a thread of beside() is never copied into a worker.
        waiting = in_thread(beside) if beside is not None else None
        try:
            results = pool.map(list(range(len(chunks))))
            pool.finish()
        except BaseException:
            if waiting is not None:
                try:
                    waiting()  # not left running behind the error
                except Exception:  # noqa: BLE001 - the walk's error is the one raised
                    pass
            raise
    return merge_drift([results[i] for i in range(len(chunks))]), (waiting() if waiting is not None else None)


def drift_files(drift):
    """Files a service added, changed or deleted in a tree (0 for None)."""
    return drift["added"] + drift["changed"] + drift["deleted"] if drift else 0


def drift_warning(drift, kept):
    """The warning a module gives when the tree it replaced (now at kept) is not what its manifests say, else None."""
    if drift is None or drift["clean"]:
        return None
    if drift_files(drift):
        return ("the replaced tree held %d files the service wrote that the database never received (%d added, %d changed, "
                "and %d deleted by it; kept in %s)" % (drift["added"] + drift["changed"], drift["added"], drift["changed"],
                                                       drift["deleted"], kept))
    return "the replaced tree does not match its manifests (%s): what a service wrote into it cannot be told (kept in %s)" % (
        drift["reason"], kept)


def backup_path(dest, backup_dir, moment):
    base = os.path.join(backup_dir or os.path.dirname(dest), "%s.before-%s" % (os.path.basename(dest), compact_stamp(moment)))
    path, serial = base, 1
    while os.path.lexists(path):
        serial += 1
        path = "%s-%d" % (base, serial)
    return path


def swap_in_tree(src, dest, backup=None, backup_dir=None, keep_backup=True, lock_timeout=None):
    """Make the tree src the tree at dest (one atomic exchange, baileys_dr_fs.swap_in) and say what the replaced tree held.

    The replaced tree goes to backup (default <backup_dir or parent of dest>/<name>.before-<UTC time>) and is
    compared with its manifests there (tree_drift). It is removed only when keep_backup is false and it held exactly
    what its manifests list: a tree a service wrote into, or one without a usable manifest, may hold state the
    database never received, and is never deleted. src, dest and backup must be on one file system.

    The caller holds ParentLock(parent of dest) unless lock_timeout is given (then this takes it, exclusive).
    Returns {"backup": path of the kept tree or None, "replaced_drift": tree_drift() of the replaced tree (None when
    dest did not exist), "warning": drift_warning() or None}.
    """
    if lock_timeout is not None:
        with ParentLock(os.path.dirname(os.path.abspath(dest)), exclusive=True, timeout=lock_timeout):
            return swap_in_tree(src, dest, backup, backup_dir, keep_backup)
    if backup is None and os.path.lexists(dest):
        backup = backup_path(dest, backup_dir, utc_now())
    kept = swap_in(src, dest, backup)
    if kept is None:
        return {"backup": None, "replaced_drift": None, "warning": None}
    drift = tree_drift(kept)
    if drift["clean"] and not keep_backup:
        shutil.rmtree(kept)
        return {"backup": None, "replaced_drift": drift, "warning": None}
    return {"backup": kept, "replaced_drift": drift, "warning": drift_warning(drift, kept)}
