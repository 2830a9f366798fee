# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Each company's identity across every copy, the application's credentials cache, the Baileys version.

The worst quiet failure of an auth store: a store that cannot be read at start-up makes Baileys (or the store's own
fallback to initAuthCreds()) create fresh credentials, which then overwrite the real ones: a new registrationId, a new
signed identity key pair and no `me` (../shared/DOMAIN.md section 6). A copy that carries such creds over registered
ones unpairs the phone. So every snapshot records each company's identity, health compares the stores with it, and
every copy (export, standby refresh, import) refuses to replace one identity by another unless forced for that company.

An identity is never a secret: registrationId (a public Signal value), me.id (the account's JID) and the sha256 of the
signed identity *public* key. No private key, no advSecretKey, nothing else of the creds is read into it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import stat

from ansible.module_utils.baileys_dr_codec import COMPANY_ID_RE, buffer_bytes
from ansible.module_utils.baileys_dr_failback_errors import FileProblem
from ansible.module_utils.baileys_dr_source_files import read_file_at

KEY_HASH_SHOWN = 12  # hex characters of the key hash in messages (enough to tell two keys apart)
COMPANY_PREFIX = "company_"
CREDS_FILE = "creds.json"
CACHE_FILE = ".baileys-cache.json"  # the application's credentials cache (seed review 2.2), at its root
CACHE_MODE = 0o600
IDENTITY_FIELDS = ("registrationId", "me", "identity_key_sha256")

# Each company's identity, computed by the server (the creds are never loaded whole): JSON text, one row a company.
IDENTITY_SQL = (
    "SELECT company_id, jsonb_build_object('registrationId', creds->'registrationId', 'me', creds->'me'->'id', "
    "'key', creds->'signedIdentityKey'->'public')::text FROM whatsapp_auth"
)
IDENTITY_SQL_COMPANIES = IDENTITY_SQL + " WHERE company_id = ANY(%(companies)s)"


class IdentityRefused(Exception):
    """A copy that would replace a company's identity by another (or registered creds by unregistered ones)."""


def _key_sha256(public):
    raw = buffer_bytes(public) if isinstance(public, dict) else None
    return hashlib.sha256(raw).hexdigest() if raw else None


def identity(registration_id, me_id, public_key):
    """{"registrationId": int or None, "me": str or None, "identity_key_sha256": hex or None}."""
    return {"registrationId": registration_id if isinstance(registration_id, int) and not isinstance(registration_id, bool) else None,
            "me": me_id if isinstance(me_id, str) else None,
            "identity_key_sha256": _key_sha256(public_key)}


def creds_identity(creds):
    """The identity of a creds value (any shape: what is missing or odd is None)."""
    if not isinstance(creds, dict):
        return identity(None, None, None)
    me = creds.get("me")
    key = creds.get("signedIdentityKey")
    return identity(creds.get("registrationId"), me.get("id") if isinstance(me, dict) else None,
                    key.get("public") if isinstance(key, dict) else None)


def identities_from_rows(rows):
    """{company: identity} of IDENTITY_SQL's rows; companies with an invalid id are left out (hostile input)."""
    out = {}
    for company_id, text in rows:
        if not isinstance(company_id, str) or not COMPANY_ID_RE.match(company_id):
            continue
        fields = json.loads(text) if isinstance(text, str) else (text or {})
        out[company_id] = identity(fields.get("registrationId"), fields.get("me"), fields.get("key"))
    return out


def database_identities(cursor, companies=None):
    """{company: identity} from the whatsapp_auth rows, read with a psycopg2 cursor (in the caller's transaction)."""
    if companies:
        cursor.execute(IDENTITY_SQL_COMPANIES, {"companies": list(companies)})
    else:
        cursor.execute(IDENTITY_SQL)
    return identities_from_rows(cursor.fetchall())


def _read_regular(path):
    """Bytes of a regular file, no symbolic link followed, no FIFO waited on (the import's reader); else OSError or
    ValueError naming the problem."""
    try:
        return read_file_at(None, path)[0]
    except FileProblem as exc:
        raise ValueError(str(exc)) from None


def tree_identities(tree, companies=None):
    """{company: identity} from the creds.json of each company directory of a sessions tree ({} when there is no tree).

    A creds.json that is missing or cannot be parsed has no identity (None): Baileys would start that company with
    fresh creds, which the import and the service report on their own.
    """
    out = {}
    try:
        names = os.listdir(tree)
    except (FileNotFoundError, NotADirectoryError):
        return out
    for name in names:
        company_id = name[len(COMPANY_PREFIX):]
        if not name.startswith(COMPANY_PREFIX) or not COMPANY_ID_RE.match(company_id):
            continue
        if companies is not None and company_id not in companies:
            continue
        try:
            out[company_id] = creds_identity(json.loads(_read_regular(os.path.join(tree, name, CREDS_FILE))))
        except (OSError, ValueError, RecursionError):
            out[company_id] = None
    return out


def manifest_identities(top):
    """{company: identity} a top manifest recorded ({} for a manifest written before identities were recorded)."""
    recorded = top.get("identities") if isinstance(top, dict) else None
    if not isinstance(recorded, dict):
        return {}
    return {c: {f: i.get(f) for f in IDENTITY_FIELDS} for c, i in recorded.items() if isinstance(i, dict) and COMPANY_ID_RE.match(c)}


def describe(ident):
    """registrationId, me.id and the key hash's prefix of an identity, for messages (nothing secret)."""
    if ident is None:
        return "no readable creds"
    key = ident.get("identity_key_sha256")
    return "registrationId %s, me %s, identity key sha256 %s" % (
        ident.get("registrationId"), ident.get("me") or "none (unregistered)", key[:KEY_HASH_SHOWN] + "..." if key else "none")


def change(old, new):
    """How new differs from old: None (same, or nothing registered to lose), "unregistered" (registered creds replaced by
    creds without me) or "other" (another registrationId, identity key or account)."""
    if old is None or new is None or not old.get("me"):
        # Nothing registered to lose: an unpaired identity may be replaced (pairing completes on the new one).
        return None
    if not any(new.values()):
        # Not Baileys creds at all (no registrationId, key or account): no identity to compare; the value checks and the
        # import's creds check refuse such a value by name.
        return None
    if not new.get("me"):
        return "unregistered"
    if any(old.get(f) != new.get(f) for f in IDENTITY_FIELDS):
        return "other"
    return None


def changes(old, new):
    """[(company, kind, old identity, new identity)] of the companies in both maps whose identity would change, sorted."""
    out = []
    for company_id in sorted(set(old) & set(new), key=lambda c: c.encode("utf-8")):
        kind = change(old[company_id], new[company_id])
        if kind:
            out.append((company_id, kind, old[company_id], new[company_id]))
    return out


def check_force_list(force_companies):
    """The list of forced companies as a set; invalid ids are refused by name."""
    forced = set()
    for company_id in force_companies or ():
        if not isinstance(company_id, str) or not COMPANY_ID_RE.match(company_id):
            raise IdentityRefused("identity_force_companies names an invalid company id %r ([A-Za-z0-9_-]{1,50})" % (company_id,))
        forced.add(company_id)
    return forced


def change_line(company_id, kind, old, new, old_where, new_where):
    what = "registered credentials would be replaced by unregistered ones (fresh creds?)" if kind == "unregistered" \
        else "one identity would be replaced by another (re-paired?)"
    return "company %s: %s: %s has %s; %s has %s" % (company_id, what, old_where, describe(old), new_where, describe(new))


def guard(old, new, force_companies, old_where, new_where, action):
    """Refuse (IdentityRefused, nothing written by the caller) when a company's identity in old would be replaced by
    another in new, unless the company is forced. Returns {"changed": [...], "forced": [company, ...]} for the result."""
    forced = check_force_list(force_companies)
    found = changes(old, new)
    refused = [c for c in found if c[0] not in forced]
    if refused:
        lines = [change_line(c, k, o, n, old_where, new_where) for c, k, o, n in refused[:20]]
        raise IdentityRefused(
            "refusing to %s: %d compan%s would lose %s identity: %s%s. Nothing was written. If the new identity is intended "
            "(the phone was paired again), force it for those companies only: identity_force_companies=[%s]" % (
                action, len(refused), "y" if len(refused) == 1 else "ies", "its" if len(refused) == 1 else "their",
                "; ".join(lines), "; ..." if len(refused) > 20 else "", ", ".join(c[0] for c in refused)))
    return {"changed": [{"company": c, "kind": k, "before": o, "after": n} for c, k, o, n in found[:100]],
            "forced": [c for c, *_ in found if c in forced]}


# -- the application's credentials cache (.baileys-cache.json) ------------------------------------


def cache_companies(document):
    """{company: creds} of a cache document: {company: {creds, keys, timestamp}} as the service writes it (a Map's
    entries as an object), the {version, data} wrapper its review recommends, or a list of [company, entry] pairs."""
    if isinstance(document, dict) and isinstance(document.get("version"), int) and isinstance(document.get("data"), dict):
        document = document["data"]
    if isinstance(document, list):
        document = dict(e for e in document if isinstance(e, list) and len(e) == 2 and isinstance(e[0], str))
    if not isinstance(document, dict):
        return {}
    return {c: e.get("creds") for c, e in document.items()
            if isinstance(c, str) and COMPANY_ID_RE.match(c) and isinstance(e, dict) and "creds" in e}


def inspect_cache(app_root, store_identities=None, now=None):
    """Read-only view of <app_root>/.baileys-cache.json: {"path", "present", "age_seconds", "mode" ("0600"), "mode_ok",
    "companies": {company: {"cached": identity, "store": identity or None, "equal": bool}}, "differ": [company...],
    "error"}. Only identities are taken from it: the cached creds themselves are never returned."""
    path = os.path.join(app_root, CACHE_FILE)
    out = {"path": path, "present": False, "age_seconds": None, "mode": None, "mode_ok": None, "companies": {},
           "differ": [], "error": None}
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return out
    except OSError as exc:
        out.update(present=None, error="cannot be examined: %s" % exc.strerror)
        return out
    out.update(present=True, mode="%04o" % stat.S_IMODE(info.st_mode), mode_ok=stat.S_IMODE(info.st_mode) == CACHE_MODE,
               age_seconds=round(max(0.0, (now if now is not None else datetime.datetime.now().timestamp()) - info.st_mtime), 3))
    try:
        companies = cache_companies(json.loads(_read_regular(path)))
    except (OSError, ValueError, RecursionError) as exc:
        out["error"] = "cannot be read: %s" % (exc.strerror if isinstance(exc, OSError) else str(exc).split(":")[0])
        return out
    for company_id, creds in sorted(companies.items()):
        cached = creds_identity(creds)
        store = (store_identities or {}).get(company_id)
        equal = store is not None and all(cached.get(f) == store.get(f) for f in IDENTITY_FIELDS)
        out["companies"][company_id] = {"cached": cached, "store": store, "equal": equal}
        if not equal:
            out["differ"].append(company_id)
    return out


def set_cache_aside(app_root, warn=None, now=None):
    """Before the service starts on restored creds: move <app_root>/.baileys-cache.json aside (kept, renamed
    .baileys-cache.json.set-aside-<UTC time>), so that a cache of the old store cannot shadow them. Returns
    {"path", "moved_to"} or None when there is no cache. warn(text) names it (the run's report)."""
    path = os.path.join(app_root, CACHE_FILE)
    try:
        os.lstat(path)
    except FileNotFoundError:
        return None
    stamp = (now or datetime.datetime.now(datetime.timezone.utc)).strftime("%Y%m%dT%H%M%S%fZ")
    target = "%s.set-aside-%s" % (path, stamp)
    try:
        os.rename(path, target)  # same directory: atomic, the mode and contents kept
        fd = os.open(app_root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        # Not worth failing the failover over (it would roll back onto the store that failed): said loudly instead.
        if warn:
            warn("the application's credentials cache %s could not be moved aside (%s): remove it, or the service may "
                 "serve its creds instead of the restored ones while PostgreSQL is unreachable" % (path, exc.strerror))
        return {"path": path, "moved_to": None, "error": exc.strerror}
    if warn:
        warn("the application's credentials cache %s was moved aside to %s so that it cannot shadow the restored creds"
             % (path, target))
    return {"path": path, "moved_to": target}


# -- the Baileys version the application has installed ---------------------------------------------

BAILEYS_PACKAGES = ("baileys", "@whiskeysockets/baileys")


def baileys_version(app_root):
    """{"package", "version", "source"} of the Baileys package installed in the application (its
    node_modules/<package>/package.json, else its package-lock.json), or None when neither names one."""
    if not app_root:
        return None
    for package in BAILEYS_PACKAGES:
        source = os.path.join("node_modules", package, "package.json")
        try:
            document = json.loads(_read_regular(os.path.join(app_root, source)))
        except (OSError, ValueError):
            continue
        if isinstance(document, dict) and isinstance(document.get("version"), str):
            return {"package": package, "version": document["version"], "source": source}
    try:
        lock = json.loads(_read_regular(os.path.join(app_root, "package-lock.json")))
    except (OSError, ValueError):
        return None
    packages = lock.get("packages") if isinstance(lock, dict) else None
    for package in BAILEYS_PACKAGES:
        entry = (packages or {}).get("node_modules/" + package)
        if isinstance(entry, dict) and isinstance(entry.get("version"), str):
            return {"package": package, "version": entry["version"], "source": "package-lock.json"}
    return None


def copy_guard(cursor, tree, top, companies, params, action):
    """Before a copy of the database into the sessions tree `tree` (export, standby refresh), in the copy's transaction:
    each company's identity in the database, refused (IdentityRefused) when it would replace another one the tree holds
    (its creds.json, else what its manifest `top` recorded), and the key types the application's Baileys does not know
    (version_guard). Returns (the top manifest's extra fields (snapshot_fields), the identity guard's report)."""
    new = database_identities(cursor, companies)
    old = manifest_identities(top)
    old.update((c, i) for c, i in tree_identities(tree, set(new)).items() if i is not None)
    report = guard(old, new, params.get("identity_force_companies"), "the copy %s" % tree, "the database", action)
    extra = snapshot_fields(new, params.get("app_root") or os.path.dirname(tree))
    if extra["baileys"]:
        extra["baileys"]["types_unknown"] = version_guard(cursor, extra["baileys"], companies, params.get("unknown_types"))
    return extra, report


# Key types Baileys added after 6.7 (../shared/DOMAIN.md section 2): an application with an older Baileys never reads
# them, so files of those types would be dropped silently.
KEY_TYPE_SINCE = {"lid-mapping": "7.0.0-rc.1", "device-list": "7.0.0-rc.5", "tctoken": "7.0.0-rc.7", "identity-key": "7.0.0-rc.10"}
_VERSION_RE = re.compile(r"\A[v=]?(\d+)\.(\d+)\.(\d+)(?:-([A-Za-z]+)\.?(\d+)?)?")


def version_key(text):
    """A comparable form of a Baileys version (6.7.18, 7.0.0-rc.4, 7.0.0-rc14), or None when it is not one."""
    match = _VERSION_RE.match(text or "")
    if not match:
        return None
    major, minor, patch, label, number = match.groups()
    # A pre-release sorts before its release: (0, n) before (1, 0).
    return (int(major), int(minor), int(patch)) + ((0, int(number or 0)) if label else (1, 0))


def types_unknown_to(version):
    """The key types the Baileys version does not know yet ([] when the version cannot be read: nothing to say)."""
    have = version_key(version)
    if have is None:
        return []
    return sorted(t for t, since in KEY_TYPE_SINCE.items() if version_key(since) > have)


def version_guard(cursor, baileys, companies, unknown_types):
    """{type: rows} of the keys whose type the application's Baileys does not know; refused (IdentityRefused, nothing
    written) unless unknown_types is "skip" (then reported only). One index lookup on whatsapp_keys(key_type)."""
    types = types_unknown_to(baileys.get("version"))
    if not types:
        return {}
    sql = "SELECT key_type, count(*) FROM whatsapp_keys WHERE key_type = ANY(%(types)s)"
    args = {"types": types}
    if companies:
        sql += " AND company_id = ANY(%(companies)s)"
        args["companies"] = list(companies)
    cursor.execute(sql + " GROUP BY key_type ORDER BY key_type", args)
    found = {key_type: count for key_type, count in cursor.fetchall()}
    if found and unknown_types != "skip":
        raise IdentityRefused(
            "refusing to write keys that the application's Baileys %s (%s) does not know: %s. Its reader would never use "
            "those files. Nothing was written. Check app_root (the application whose Baileys reads the files), upgrade "
            "Baileys, or run with unknown_types=skip to write them anyway" % (
                baileys["version"], baileys["source"], ", ".join("%s (%d rows, Baileys %s and later)" % (t, n, KEY_TYPE_SINCE[t])
                                                                for t, n in sorted(found.items()))))
    return found


def snapshot_fields(identities, app_root):
    """What a top manifest records beside the companies: {"identities": {...}, "baileys": {...} or None}."""
    return {"identities": {c: identities[c] for c in sorted(identities, key=lambda c: c.encode("utf-8"))},
            "baileys": baileys_version(app_root)}


def import_refusal(company_id, database_text, file_creds, force_companies):
    """The import's check of one company, before its write transaction: the refusal text when the creds of the files
    would replace the database's identity (not forced for that company), else None."""
    try:
        guard({company_id: creds_identity(json.loads(database_text))}, {company_id: creds_identity(file_creds)},
              force_companies, "the database", "the files", "import company %s" % company_id)
    except IdentityRefused as exc:
        return str(exc)
    return None


# -- health: identities changed since the last snapshot, and the cache ------------------------------

TOP_MANIFEST = os.path.join(".baileys-dr", "manifest.json")


def recorded_identities(tree):
    """(identities the tree's top manifest recorded, else its creds.json's; the manifest's generation or None)."""
    try:
        top = json.loads(_read_regular(os.path.join(tree, TOP_MANIFEST)))
    except (OSError, ValueError, RecursionError):
        top = None
    recorded = manifest_identities(top)
    if not recorded:
        recorded = {c: i for c, i in tree_identities(tree).items() if i is not None}
    return recorded, top.get("generation") if isinstance(top, dict) else None


def health_view(database, standby_dir=None, sessions_dir=None, app_root=None, sample=10, now=None):
    """What health reports (read-only): (report, checks). database: {company: identity} of PostgreSQL, or None when it
    was not read. Compared: the database with the standby copy's last snapshot, the sessions tree's creds.json with its
    own manifest (a service on files that wrote fresh creds), and the credentials cache with the store.
    checks: [(name, value, status, message)]."""
    changed = []
    for where, tree, current in (("the database", standby_dir, database),
                                 ("the sessions tree", sessions_dir, None)):
        if not tree or not os.path.isdir(tree):
            continue
        recorded, generation = recorded_identities(tree)
        if tree == sessions_dir:
            current = {c: i for c, i in tree_identities(tree).items() if i is not None}
        if current is None:
            continue
        for company_id, kind, old, new in changes(recorded, current):
            changed.append({"company": company_id, "kind": kind, "where": where, "snapshot": tree, "generation": generation,
                            "snapshot_identity": old, "identity": new})
    lines = ["company %s: %s has %s, the snapshot %s%s recorded %s" % (
        c["company"], c["where"], describe(c["identity"]), c["snapshot"],
        " (generation %s)" % c["generation"] if c["generation"] is not None else "", describe(c["snapshot_identity"]))
        for c in changed[:sample]]
    checks = [("identity", len(changed), "critical" if changed else "healthy",
               "%d compan%s changed identity since the last snapshot (re-paired, or fresh creds written over real ones): %s"
               % (len(changed), "y" if len(changed) == 1 else "ies", "; ".join(lines)) if changed
               else "every company has the identity of the last snapshot")]
    report = {"changed": changed[:100], "changed_count": len(changed)}
    if app_root:
        store = database if database is not None else tree_identities(sessions_dir) if sessions_dir else {}
        cache = inspect_cache(app_root, store, now)
        report["credentials_cache"] = cache
        checks.append(cache_check(cache, sample))
    return report, checks


def cache_check(cache, sample=10):
    """(name, value, status, message) of the credentials cache: warning when its mode is not 0600, when it cannot be
    read, or when a company's cached identity differs from the store's (a PostgreSQL outage would serve it)."""
    if not cache["present"]:
        return ("credentials_cache", 0, "healthy" if cache["present"] is False else "warning",
                cache["error"] or "no credentials cache at %s" % cache["path"])
    problems = []
    if not cache["mode_ok"]:
        problems.append("mode %s, not 0600 (it holds private keys)" % cache["mode"])
    if cache["error"]:
        problems.append(cache["error"])
    if cache["differ"]:
        problems.append("the cached identity differs from the store's for %s" % ", ".join(cache["differ"][:sample]))
    return ("credentials_cache", len(cache["differ"]), "warning" if problems else "healthy",
            "%s (%d companies, %.0f s old)%s" % (cache["path"], len(cache["companies"]), cache["age_seconds"] or 0,
                                                ": " + "; ".join(problems) if problems else ", mode 0600, identities equal to the store's"))
