# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The arming record of a failover: what a failover needs, checked ahead by each standby refresh.

When PostgreSQL dies the service is already down, so each check the failover's preflight runs is outage. The
standby refresh (snapshot.yml) has time: it verifies the emergency tag (TagVerifier: annotated, expected commit,
file-auth marker), reads the standby copy's manifest generation, the PM2 process definition, the .env changes
and the free space, and records them on the application host (JSON beside the failover state file, written
atomically). The failover then only confirms (ArmingRecord.verify) what can have changed since, with reads that
cost milliseconds: the tag's commit (one `git rev-parse`), the manifest's generation and sha256 (one small file),
the PM2 definition's hash (one file) and the record's age. Anything else -- a missing or broken record, one that
says the checks failed -- is a reason, and the failover runs its full preflight, naming the reasons.

The record holds no secret: .env values only of the store flags (booleans), PM2 facts without any environment.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import os
import pwd
import shutil
import time

from ansible.module_utils.baileys_dr_dotenv import DotenvDocument
from ansible.module_utils.baileys_dr_fs import write_file_atomic
from ansible.module_utils.baileys_dr_git import GitError, GitRunner, TagVerifier, check_ref_name, git_tag_argument_spec
from ansible.module_utils.baileys_dr_pm2 import HealthClient
from ansible.module_utils.baileys_dr_postgres import DatabaseError, connect

RECORD_FORMAT = 1
# The standby copy's top manifest (docs/architecture.md, "The sessions tree and its manifest").
MANIFEST = (".baileys-dr", "manifest.json")
# A manifest bigger than this is not one this project wrote (about 200 bytes per company).
MANIFEST_MAX_BYTES = 64 << 20
RECORD_MAX_BYTES = 1 << 20


class ArmingError(Exception):
    """Bad input; the message names it and holds no secret."""


def utc_iso(epoch):
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def sha256_hex(data):
    return hashlib.sha256(data).hexdigest()


def read_small(path, limit):
    """Bytes of a regular file (no symbolic link followed), or None when it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None
        if exc.errno == errno.ELOOP:
            raise ArmingError("%s is a symbolic link: refusing to follow it" % path) from None
        raise ArmingError("%s cannot be read: %s" % (path, exc.strerror)) from None
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise ArmingError("%s is bigger than %d bytes" % (path, limit))
    return data


def read_manifest(standby_dir):
    """{generation, snapshot_at, manifest_sha256, digests} of the standby copy's top manifest, or None when absent."""
    path = os.path.join(standby_dir, *MANIFEST)
    data = read_small(path, MANIFEST_MAX_BYTES)
    if data is None:
        return None
    try:
        document = json.loads(data)
    except ValueError:
        raise ArmingError("the manifest %s is not JSON" % path) from None
    if not isinstance(document, dict) or not isinstance(document.get("generation"), int):
        raise ArmingError("the manifest %s has no generation" % path)
    companies = document.get("companies") if isinstance(document.get("companies"), dict) else {}
    digests = {str(c): e.get("digest") for c, e in companies.items() if isinstance(e, dict)}
    return {"generation": document["generation"], "snapshot_at": document.get("snapshot_at"),
            "manifest_sha256": sha256_hex(data), "companies": len(companies), "digests": digests}


def manifest_or_problem(standby_dir, problems, missing):
    """read_manifest, or None with the problem appended (missing, a format with the directory, when there is none)."""
    try:
        manifest = read_manifest(standby_dir)
    except ArmingError as exc:
        problems.append("standby: %s" % exc)
        return None
    if manifest is None:
        problems.append(missing % standby_dir)
    return manifest


def pm2_definition(params):
    """What PM2 starts the service from (app name, pm2 binary, daemon home, ecosystem file and its sha256), and the
    sha256 of all of it: the switch starts the service fresh from that ecosystem file in that daemon."""
    app_root = params["app_root"]
    ecosystem = params["ecosystem"]
    if not os.path.isabs(ecosystem):
        ecosystem = os.path.join(app_root, ecosystem)
    content = read_small(ecosystem, RECORD_MAX_BYTES)
    pm2_bin = params["pm2_bin"]
    found = pm2_bin if os.path.isabs(pm2_bin) else shutil.which(pm2_bin)
    definition = {
        "app_name": params["app_name"],
        "pm2_bin": os.path.realpath(found) if found else None,
        "pm2_home": pm2_home(params),
        "ecosystem": ecosystem,
        "ecosystem_sha256": sha256_hex(content) if content is not None else None,
    }
    definition["sha256"] = sha256_hex(json.dumps(definition, sort_keys=True).encode("utf-8"))
    return definition


def pm2_home(params):
    """The daemon of app_user, as the switch finds it: pm2_home, else PM2_HOME when this process is that user, else
    ~app_user/.pm2."""
    if params.get("pm2_home"):
        return params["pm2_home"]
    user = params.get("app_user")
    me = pwd.getpwuid(os.geteuid())
    if not user or user == me.pw_name:
        return os.environ.get("PM2_HOME") or os.path.join(me.pw_dir, ".pm2")
    try:
        return os.path.join(pwd.getpwnam(user).pw_dir, ".pm2")
    except KeyError:
        raise ArmingError("app_user %s does not exist on this host" % user) from None


def env_changes(app_root, flags):
    """{flag: {from: value now or None when absent, to: "false"}}: what the failover writes into .env."""
    data = read_small(os.path.join(app_root, ".env"), 16 << 20)
    values = DotenvDocument(data.decode("utf-8", "surrogateescape")).values() if data is not None else {}
    return {name: {"from": values.get(name), "to": "false"} for name in flags}


class _TagParams:
    """The module as TagVerifier and GitRunner see it: its commands and check mode, baileys_git_tag's parameters."""

    def __init__(self, module, params):
        self._module = module
        self.params = params
        self.check_mode = module.check_mode

    def __getattr__(self, name):
        return getattr(self._module, name)


class ArmingRecord:
    """state=present writes the record; state=verify says whether it still holds, and why not."""

    def __init__(self, module, clock=time.time):
        self.module = module
        self.params = module.params
        self.clock = clock
        self.result = {"changed": False, "path": self.params["path"]}

    def validate(self):
        p = self.params
        check_ref_name(p["tag"], "tag")
        if p["max_age"] is not None and p["max_age"] <= 0:
            raise ArmingError("max_age must be a positive number of seconds (it is %s)" % p["max_age"])
        for name in p["store_flags"]:
            if not name or not all(c.isalnum() or c == "_" for c in name):
                raise ArmingError("store_flags holds %r, which is not a variable name" % name)

    def run(self):
        try:
            self.validate()
            if self.params["state"] == "present":
                self.present()
            else:
                self.verify()
        except GitError as exc:
            raise ArmingError(str(exc)) from None
        return self.result

    # -- reading -----------------------------------------------------------------------------------

    def _git(self, **values):
        params = {name: spec.get("default") for name, spec in git_tag_argument_spec().items()}
        params.update(repo=self.params["app_root"], **values)
        sub = _TagParams(self.module, params)
        return sub, GitRunner(sub, self.params["app_root"])

    def tag_commit(self):
        """The commit the tag points at now (one git command), or None when the tag is gone."""
        _, runner = self._git()
        return runner.resolve("refs/tags/%s^{commit}" % self.params["tag"], what="looking up the tag")

    def load(self):
        """(record or None, problem or None)."""
        path = self.params["path"]
        try:
            data = read_small(path, RECORD_MAX_BYTES)
        except ArmingError as exc:
            return None, str(exc)
        if data is None:
            return None, "no arming record at %s (no standby refresh armed this host)" % path
        try:
            record = json.loads(data)
        except ValueError:
            return None, "the arming record %s is not JSON" % path
        if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
            return None, "the arming record %s is not of format %d" % (path, RECORD_FORMAT)
        return record, None

    # -- state=present -----------------------------------------------------------------------------

    def check(self):
        """The record of what a failover needs now, with the problems found (armed when there are none)."""
        p = self.params
        now = self.clock()
        problems = []
        record = {"format": RECORD_FORMAT, "checked_at": utc_iso(now), "checked_at_epoch": round(now, 3), "tag": {"name": p["tag"]}}
        sub, runner = self._git(tag=p["tag"], annotated=p["annotated"], expected_commit=p["tag_commit"] or None,
                                marker_path=p["marker_path"], marker_regex=p["marker_regex"], allow_dirty=p["allow_dirty"])
        verifier = TagVerifier(sub, runner)
        try:
            verified = verifier.run()
            record["tag"].update(commit=verified.get("tag_commit"), type=verified.get("tag_type"), marker_path=p["marker_path"],
                                 file_auth_code=p["marker_path"] is not None)
        except GitError as exc:
            problems.append("tag: %s" % exc)
            record["tag"]["commit"] = verifier.result.get("tag_commit")
        try:
            record["env_changes"] = env_changes(p["app_root"], p["store_flags"])
        except ArmingError as exc:
            problems.append(".env: %s" % exc)
        try:
            record["pm2"] = pm2_definition(p)
            if record["pm2"]["ecosystem_sha256"] is None:
                problems.append("pm2: the ecosystem file %s does not exist" % record["pm2"]["ecosystem"])
            if record["pm2"]["pm2_bin"] is None:
                problems.append("pm2: %s is not found" % p["pm2_bin"])
        except ArmingError as exc:
            problems.append("pm2: %s" % exc)
        manifest = manifest_or_problem(p["standby_dir"], problems, "standby: no manifest in %s (no standby copy yet)")
        if manifest is not None:
            record["standby"] = dict({k: v for k, v in manifest.items() if k != "digests"}, path=p["standby_dir"])
            wanted = p["verified_generation"]
            if wanted is not None and manifest["generation"] != wanted:
                problems.append("standby: the copy is at generation %d, not the generation %d the refresh verified"
                                % (manifest["generation"], wanted))
        record["space"] = self.space(problems)
        record["armed"] = not problems
        record["problems"] = problems
        return record

    def space(self, problems):
        p = self.params
        where = os.path.dirname(os.path.abspath(p["sessions_dir"] or p["standby_dir"]))
        try:
            stat = os.statvfs(where)
        except OSError as exc:
            problems.append("space: %s cannot be read: %s" % (where, exc.strerror))
            return {"path": where}
        free = stat.f_bavail * stat.f_frsize
        if free < p["min_free_bytes"]:
            problems.append("space: %d bytes free on %s, fewer than min_free_bytes %d" % (free, where, p["min_free_bytes"]))
        return {"path": where, "free_bytes": free}

    def present(self):
        before, _ = self.load()
        record = self.check()
        # Armed without a break since: the same tag commit and PM2 definition armed the previous refresh too.
        same = before is not None and before.get("armed") and record["armed"] and \
            (before.get("tag") or {}).get("commit") == record["tag"].get("commit") and \
            (before.get("pm2") or {}).get("sha256") == (record.get("pm2") or {}).get("sha256")
        if record["armed"]:
            record["armed_since"] = before.get("armed_since") if same and before.get("armed_since") else record["checked_at"]
            record["armed_since_epoch"] = before.get("armed_since_epoch") if same and before.get("armed_since_epoch") \
                else record["checked_at_epoch"]
        else:
            record["armed_since"] = record["armed_since_epoch"] = None
        text = json.dumps(record, indent=2, sort_keys=True) + "\n"
        self.result.update(changed=True, armed=record["armed"], problems=record["problems"], record=record)
        if self.module._diff:
            self.result["diff"] = {"before": json.dumps(before, indent=2, sort_keys=True) + "\n" if before else "",
                                   "after": text, "before_header": self.params["path"], "after_header": self.params["path"]}
        if record["problems"]:
            self.module.warn("the failover is not armed: %s" % "; ".join(record["problems"]))
        if not self.module.check_mode:
            directory = os.path.dirname(os.path.abspath(self.params["path"]))
            os.makedirs(directory, mode=0o700, exist_ok=True)
            write_file_atomic(self.params["path"], text.encode("utf-8"), mode=0o600)

    # -- state=verify ------------------------------------------------------------------------------

    def verify(self):
        p = self.params
        # What the preflight reads besides the record, in this same module run (each module run before the switch is
        # outage when PostgreSQL is gone): the switch journal's phase and the store the service says it serves.
        if p["state_file"]:
            self.result["journal"] = read_journal(p["state_file"])
        if p["health_url"]:
            self.result["service"] = read_service(p["health_url"])
        if p["ping_database"]:
            self.result["database"] = ping_database(p)
        record, problem = self.load()
        reasons = [problem] if problem else []
        now = self.clock()
        self.result.update(armed=False, armed_since=None, age_seconds=None)
        if record is not None:
            reasons += self._compare(record, now)
            self.result.update(age_seconds=round(now - float(record.get("checked_at_epoch") or 0), 3),
                               checked_at=record.get("checked_at"),
                               tag_commit=(record.get("tag") or {}).get("commit"),
                               env_changes=record.get("env_changes") or {})
        self.result["reasons"] = reasons
        if not reasons:
            self.result.update(armed=True, armed_since=record.get("armed_since"))
            self.result["msg"] = "armed since %s (checked %s s ago)" % (record.get("armed_since"), self.result["age_seconds"])
        else:
            self.result["msg"] = "not armed: %s" % "; ".join(reasons)
            self.result.pop("standby", None)

    def _compare(self, record, now):
        """Why the record no longer holds ([] when it does)."""
        p = self.params
        reasons = []
        if not record.get("armed"):
            found = "; ".join(str(r) for r in record.get("problems") or []) or "no reason recorded"
            return ["the last standby refresh found the failover not ready: %s" % found]
        age = now - float(record.get("checked_at_epoch") or 0)
        if age > p["max_age"]:
            reasons.append("the arming record is %d s old, older than max_age %d s (is the standby refresh running?)"
                           % (age, p["max_age"]))
        tag = record.get("tag") or {}
        if tag.get("name") != p["tag"]:
            reasons.append("the record armed tag %s, this failover checks out %s" % (tag.get("name"), p["tag"]))
        else:
            commit = self.tag_commit()
            if commit != tag.get("commit"):
                reasons.append("tag %s moved: it points at %s, the record armed %s" % (p["tag"], commit or "nothing (deleted)",
                                                                                     tag.get("commit")))
            elif p["tag_commit"] and not commit.startswith(p["tag_commit"].strip().lower()):
                reasons.append("tag %s points at %s, not at tag_commit %s" % (p["tag"], commit, p["tag_commit"]))
        recorded = record.get("standby") or {}
        manifest = manifest_or_problem(p["standby_dir"], reasons, "the standby copy %s has no manifest any more")
        if manifest is not None:
            if recorded.get("path") != p["standby_dir"]:
                reasons.append("the record armed the standby copy %s, this failover uses %s" % (recorded.get("path"), p["standby_dir"]))
            elif manifest["generation"] != recorded.get("generation") or manifest["manifest_sha256"] != recorded.get("manifest_sha256"):
                reasons.append("the standby copy's manifest changed: generation %s (sha256 %s...), the record armed generation %s "
                               "(sha256 %s...)" % (manifest["generation"], manifest["manifest_sha256"][:12], recorded.get("generation"),
                                                   str(recorded.get("manifest_sha256"))[:12]))
            else:
                self.result["standby"] = {"verified": True, "generation": manifest["generation"], "digests": manifest["digests"],
                                          "snapshot_at": manifest["snapshot_at"], "age_seconds": self._age_of(manifest["snapshot_at"], now)}
        try:
            definition = pm2_definition(p)
        except ArmingError as exc:
            reasons.append("pm2: %s" % exc)
        else:
            if definition["sha256"] != (record.get("pm2") or {}).get("sha256"):
                changed = [k for k in sorted(definition) if k != "sha256" and definition[k] != (record.get("pm2") or {}).get(k)]
                reasons.append("the PM2 definition of %s changed (%s)" % (p["app_name"], ", ".join(changed) or "its hash"))
        return reasons

    @staticmethod
    def _age_of(iso, now):
        try:
            return round(now - datetime.datetime.fromisoformat(str(iso).replace("Z", "+00:00")).timestamp(), 1)
        except ValueError:
            return None


def read_arming_state(path, max_age, now=None):
    """What health reports, from the record alone (no git, no PM2): {armed, armed_since, checked_at, age_seconds, problems}.
    Armed means the last refresh found everything a failover needs and did so less than max_age seconds ago."""
    now = time.time() if now is None else now
    state = {"path": path, "armed": False, "armed_since": None, "armed_since_epoch": None, "checked_at": None,
             "age_seconds": None, "problems": []}
    try:
        data = read_small(path, RECORD_MAX_BYTES)
        record = json.loads(data) if data is not None else None
    except (ArmingError, ValueError) as exc:
        state["problems"] = ["the arming record cannot be read: %s" % (exc if isinstance(exc, ArmingError) else "not JSON")]
        return state
    if not isinstance(record, dict):
        state["problems"] = ["no arming record (no standby refresh armed this host)"]
        return state
    age = now - float(record.get("checked_at_epoch") or 0)
    state.update(checked_at=record.get("checked_at"), age_seconds=round(age, 1))
    problems = [str(p) for p in record.get("problems") or []] if isinstance(record.get("problems"), list) else []
    if record.get("armed") and age > max_age:
        problems.append("the arming record is %d s old, older than %d s" % (age, max_age))
    state["problems"] = problems if problems or record.get("armed") else ["the record is not armed"]
    if not state["problems"]:
        state.update(armed=True, armed_since=record.get("armed_since"), armed_since_epoch=record.get("armed_since_epoch"))
    return state


def read_journal(path):
    """{readable, exists, operation, phase} of the failover state file's switch journal; never a .env value."""
    try:
        data = read_small(path, RECORD_MAX_BYTES)
    except (OSError, ArmingError) as exc:
        return {"readable": False, "exists": True, "problem": str(exc)}
    if data is None:
        return {"readable": True, "exists": False, "operation": None, "phase": None}
    try:
        switch = (json.loads(data.decode("utf-8")) or {}).get("switch") or {}
    except (ValueError, AttributeError, UnicodeDecodeError):
        return {"readable": False, "exists": True, "problem": "%s is not a JSON object" % path}
    if not isinstance(switch, dict):
        switch = {}
    return {"readable": True, "exists": True, "operation": switch.get("operation"), "phase": switch.get("phase")}


def read_service(url, timeout=2.0):
    """{answered, store, ready} from one read of the readiness endpoint (whatever it answers)."""
    if not str(url).startswith(("http://", "https://")):
        raise ArmingError("health_url %r is not an http:// or https:// URL" % url)
    status, body = HealthClient().get(url, timeout=timeout)
    try:
        doc = json.loads(body.decode("utf-8")) if status is not None else {}
    except (ValueError, UnicodeDecodeError):
        doc = {}
    doc = doc if isinstance(doc, dict) else {}
    return {"answered": status is not None, "store": doc.get("store"), "ready": doc.get("ready") is True}


def ping_database(params, connector=None):
    """{available, problem} of one connection to PostgreSQL (the connection options of params): whether a failover can
    copy from the live database, answered in the arming run instead of a module run of its own."""
    try:
        conn = (connector or connect)(params, application_name="baileys-dr-failover-ping", autocommit=True)
    except DatabaseError as exc:
        return {"available": False, "problem": str(exc)}
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            cur.fetchone()
    except Exception as exc:  # a server that accepts the connection but cannot answer is not available
        return {"available": False, "problem": "PostgreSQL accepted the connection but did not answer: %s" % type(exc).__name__}
    finally:
        conn.close()
    return {"available": True, "problem": None}


def arming_argument_spec():
    """The options of baileys_failover_arming (a new dict per call)."""
    return dict(
        path=dict(type="path", required=True),
        state=dict(type="str", default="present", choices=["present", "verify"]),
        app_root=dict(type="path", required=True),
        tag=dict(type="str", required=True),
        tag_commit=dict(type="str", default=""),
        annotated=dict(type="bool", default=True),
        marker_path=dict(type="str"),
        marker_regex=dict(type="str"),
        allow_dirty=dict(type="bool", default=False),
        app_name=dict(type="str", required=True),
        app_user=dict(type="str"),
        pm2_bin=dict(type="str", default="pm2"),
        pm2_home=dict(type="path"),
        ecosystem=dict(type="str", default="ecosystem.config.js"),
        store_flags=dict(type="list", elements="str", default=[]),
        standby_dir=dict(type="path", required=True),
        sessions_dir=dict(type="path"),
        verified_generation=dict(type="int"),
        min_free_bytes=dict(type="int", default=0),
        max_age=dict(type="int", default=3600),
        state_file=dict(type="path"),
        health_url=dict(type="str"),
        ping_database=dict(type="bool", default=False),
    )
