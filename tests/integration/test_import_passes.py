"""The two-pass failback of baileys_auth_import (bulk pass while the service writes, delta pass once it is stopped),
against the throwaway PostgreSQL cluster."""

from __future__ import annotations

import base64
import gzip
import json
import os
import random
import threading
import time

import pytest

from test_import import (  # noqa: F401 - fixtures
    baileys_changes,
    database_digests,
    execute,
    exported,
    export,
    failback,
    files_digest,
    full_rows,
    manifest_of,
    row,
    sessions,
    undo,
    undo_dir,
    wait_until,
    warned,
)

from ansible.module_utils import baileys_dr_failback as engine
from ansible.module_utils import baileys_dr_source_scan as source_scan
from ansible.module_utils import baileys_dr_source_tree as source_tree
from ansible.module_utils import baileys_dr_undo as undo_files
from ansible.module_utils import baileys_dr_passfiles as passfiles
from ansible.module_utils.baileys_dr_postgres import DatabaseError, connect, psycopg2, retry_on_disconnect
from ansible.module_utils.baileys_dr_tree import file_content

COMPANIES = ("company00001", "company00002", "company00003")


@pytest.fixture
def record(tmp_path):
    (tmp_path / "state").mkdir(exist_ok=True)
    return tmp_path / "state" / "failback-bulk.json"


def age(sessions, seconds=60):
    """Every file of the tree written a minute ago: no listing is within the racy window of a write."""
    past = time.time_ns() - seconds * 10**9
    for company in COMPANIES:
        directory = sessions / ("company_" + company)
        for name in os.listdir(directory):
            os.utime(directory / name, ns=(past, past), follow_symlinks=False)


def reads_of_companies(monkeypatch):
    """Company ids whose directory the module reads (the files, not a listing)."""
    seen = []
    original = source_tree.SourceTree.read_company

    def spy(self, company_id, mode):
        seen.append(company_id)
        return original(self, company_id, mode)

    monkeypatch.setattr(source_tree.SourceTree, "read_company", spy)
    return seen


def digests_of_files(sessions, new_ids):
    """The state digest of each company's files, computed without the module (ids: the export's manifest, or given)."""
    return {c: files_digest(sessions / ("company_" + c), manifest_of(sessions, c), new_ids.get(c, {})) for c in COMPANIES}


def new_pre_key(directory, key_id, seed):
    raw = random.Random(seed).randbytes(32)
    value = {"private": {"type": "Buffer", "data": base64.b64encode(raw).decode()},
             "public": {"type": "Buffer", "data": base64.b64encode(raw[::-1]).decode()}}
    name = "pre-key-%s.json" % key_id
    (directory / name).write_bytes(file_content(value))
    return name


class Writer(threading.Thread):
    """The service still running on files: creates pre-keys and rewrites a session in place (no temp file, as Baileys'
    writeFile does), until stopped."""

    def __init__(self, directory, session_file):
        super().__init__(daemon=True)
        self.directory, self.session_file = directory, session_file
        self.created = {}
        self.stop = threading.Event()
        self.writes = 0

    def run(self):
        n = 0
        while not self.stop.is_set():
            n += 1
            name = new_pre_key(self.directory, 900000 + n, n)
            self.created[name] = ("pre-key", str(900000 + n))
            with open(self.directory / self.session_file, "wb") as fh:
                fh.write(file_content({"_sessions": {}, "version": "v%d" % n}))
            self.writes += 1
            self.stop.wait(0.002)


def load_record(path):
    return json.loads(path.read_text())


# -- (a) the bulk pass defers the company being written, the delta pass imports only it ---------------------------


def test_a_company_written_during_the_bulk_pass_is_deferred_and_only_it_is_read_by_the_delta_pass(
        db, exported, failback, sessions, undo_dir, record, monkeypatch):
    new_ids = {}
    for company in ("company00001", "company00003"):
        new_ids[company] = baileys_changes(sessions, company, manifest_of(sessions, company))[0]
    age(sessions)
    before = full_rows(db)
    busy = sessions / "company_company00002"
    session_file = next(n for n, e in manifest_of(sessions, "company00002")["files"].items() if e["type"] == "session")
    writer = Writer(busy, session_file)
    # The service writes all along; a pause before company00002's COMMIT makes sure a write lands after its read.
    monkeypatch.setenv("BAILEYS_DR_TEST_PAUSE_AT", "import_company:2")
    monkeypatch.setenv("BAILEYS_DR_TEST_PAUSE_SECONDS", "0.3")
    writer.start()
    try:
        wait_until(lambda: writer.writes > 3)
        ok, bulk = failback(changed_during_read="defer", pass_record=str(record))
    finally:
        writer.stop.set()
        writer.join(10)
    monkeypatch.delenv("BAILEYS_DR_TEST_PAUSE_AT")
    assert ok, bulk.get("msg")
    assert bulk["deferred"] == ["company00002"] and bulk["committed"] == ["company00001", "company00003"]
    assert bulk["companies"]["company00002"]["status"] == "deferred"
    assert "changed while" in bulk["companies"]["company00002"]["reason"]
    assert not any("company00002" in name for name in os.listdir(undo_dir)), "the deferred company's undo file is removed"
    assert [r for r in full_rows(db)["keys"] if r[0] == "company00002"] == [r for r in before["keys"] if r[0] == "company00002"]
    # The record: written atomically, 0600, what the delta pass needs.
    assert bulk["pass_record"] == str(record) and oct(os.stat(record).st_mode & 0o777) == "0o600"
    document = load_record(record)
    assert document["deferred"] == ["company00002"] and sorted(document["companies"]) == ["company00001", "company00003"]
    assert document["tree"] == str(sessions) and document["system_identifier"] == bulk["system_identifier"]
    for company in ("company00001", "company00003"):
        entry = document["companies"][company]
        assert len(entry["signature"]) == 64 and isinstance(entry["xid"], int) and entry["fingerprint"].count(":") == 2
    # The service is stopped: the delta pass reads company00002 only and proves the others unchanged.
    reads = reads_of_companies(monkeypatch)
    ok, delta = failback(delta_from=str(record))
    assert ok, delta.get("msg")
    assert set(reads) == {"company00002"}, "proven companies are not read"
    assert {k: delta["delta"][k] for k in ("companies", "unchanged_proven", "imported")} == {
        "companies": 3, "unchanged_proven": 2, "imported": 1}
    assert delta["delta"]["not_proven"] == {"deferred by the bulk pass": 1} and delta["delta"]["seconds"] > 0
    assert delta["committed"] == ["company00002"] and delta["deferred"] == []
    assert {c: o["status"] for c, o in delta["companies"].items()} == {
        "company00001": "unchanged_proven", "company00002": "imported", "company00003": "unchanged_proven"}
    assert delta["undo_files"] and all("company00002" in p for p in delta["undo_files"])
    new_ids["company00002"] = writer.created
    expected = digests_of_files(sessions, new_ids)
    assert database_digests(db) == expected == delta["digests"]


# -- (b) what changed after the bulk pass ------------------------------------------------------------------------------


def test_a_file_created_one_rewritten_in_place_and_one_deleted_after_the_bulk_pass_are_in_postgresql_after_the_delta(
        db, exported, failback, sessions, record, monkeypatch):
    monkeypatch.setattr(source_scan, "SCAN_MIN_FORK", 1)  # the directories listed by forked workers, as in a large tree
    age(sessions)
    ok, bulk = failback(changed_during_read="defer", pass_record=str(record))
    assert ok and bulk["committed"] == [] and bulk["deferred"] == [], bulk.get("msg")
    assert sorted(load_record(record)["companies"]) == list(COMPANIES), "companies found equal are recorded too"
    directory = sessions / "company_company00003"
    manifest = manifest_of(sessions, "company00003")
    created = new_pre_key(directory, "777001", "created")
    pre_keys = sorted(n for n, e in manifest["files"].items() if e["type"] == "pre-key")
    rewritten, deleted = pre_keys[0], pre_keys[1]
    old = (directory / rewritten).read_bytes()
    value = json.loads(old)
    value["private"]["data"] = base64.b64encode(random.Random(1).randbytes(len(base64.b64decode(value["private"]["data"])))).decode()
    with open(directory / rewritten, "r+b") as fh:  # in place: same inode, same size, a new mtime
        fh.write(file_content(value))
    assert os.path.getsize(directory / rewritten) == len(old) and (directory / rewritten).read_bytes() != old
    os.unlink(directory / deleted)
    ok, delta = failback(delta_from=str(record))
    assert ok, delta.get("msg")
    assert delta["delta"]["unchanged_proven"] == 2 and delta["delta"]["not_proven"] == {"files changed": 1}
    company = delta["companies"]["company00003"]
    assert (company["inserted"], company["updated"], company["deleted"]) == (1, 1, 1)
    # Only the two changed files were read: the others are the bulk pass's (stat and row fingerprint unchanged).
    assert (company["read"], company["files_read"], company["read_whole_because"]) == ("changed_files", 2, None)
    assert row(db, "company00003", "pre-key", "777001") is not None
    rewritten_id = manifest["files"][rewritten]["id"]
    assert json.loads(row(db, "company00003", "pre-key", rewritten_id)[0])["private"]["data"] == list(
        base64.b64decode(value["private"]["data"])), "written in the application's byte-array form"
    assert row(db, "company00003", "pre-key", manifest["files"][deleted]["id"]) is None
    expected = digests_of_files(sessions, {"company00003": {created: ("pre-key", "777001")}})
    assert database_digests(db) == expected == delta["digests"]


def test_a_file_written_just_before_its_listing_is_not_trusted_to_its_size_and_mtime(db, exported, failback, sessions, record):
    """Two same-size writes within one tick of the file system's clock keep size and mtime: a file that new at the
    bulk pass's listing leaves the company unproven, and the delta pass reads it."""
    age(sessions)
    directory = sessions / "company_company00001"
    name = sorted(n for n in os.listdir(directory) if n.startswith("pre-key-"))[0]
    now = time.time_ns() + 10**9  # "just written" (and still inside the window when the bulk pass lists it)
    os.utime(directory / name, ns=(now, now))
    ok, bulk = failback(changed_during_read="defer", pass_record=str(record))
    assert ok, bulk.get("msg")
    entry = load_record(record)["companies"]["company00001"]
    assert entry["signature"] is None and "ms of the listing" in entry["unproven"]
    value = json.loads((directory / name).read_bytes())
    value["private"]["data"] = base64.b64encode(random.Random(2).randbytes(32)).decode()
    inode = os.stat(directory / name).st_ino
    with open(directory / name, "r+b") as fh:
        fh.write(file_content(value))
    os.utime(directory / name, ns=(now, now))  # the second write of the same tick: same size, same mtime, same inode
    assert os.stat(directory / name).st_ino == inode
    ok, delta = failback(delta_from=str(record))
    assert ok, delta.get("msg")
    assert delta["delta"]["not_proven"] == {"not provable from the bulk pass": 1}
    assert delta["companies"]["company00001"]["updated"] == 1
    # The rest of the company was provable: the racy file alone is read.
    assert (delta["companies"]["company00001"]["read"], delta["companies"]["company00001"]["files_read"]) == ("changed_files", 1)
    key_id = manifest_of(sessions, "company00001")["files"][name]["id"]
    assert json.loads(row(db, "company00001", "pre-key", key_id)[0])["private"]["data"] == list(base64.b64decode(value["private"]["data"]))


def test_the_delta_pass_listing_gives_the_bulk_pass_signature_whatever_the_names(tmp_path):
    """The delta pass lists with its own loop (the stat calls are most of its time): same signature as the bulk pass's,
    for hostile names too; any stat change changes it."""
    root = tmp_path / "tree"
    directory = root / "company_acme"
    directory.mkdir(parents=True)
    for name in (b"creds.json", b"pre-key-1.json", b"a\nnewline.json", b"\xff\xfe-not-utf8.json", "ünï.json".encode()):
        with open(os.path.join(os.fsencode(directory), name), "wb") as fh:
            fh.write(b"{}")
    os.symlink("/etc/passwd", directory / "link.json")
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        dir_fd = os.open("company_acme", os.O_RDONLY | os.O_DIRECTORY, dir_fd=root_fd)
        stats = source_scan.dir_stats(dir_fd)
        os.close(dir_fd)
        signature = source_scan.directory_signature(stats)
        assert source_scan.scan_company(root_fd, "acme") == (signature, None)
        assert source_scan.directory_signature(stats, time.time_ns()) is None, "files written just now: no signature recorded"
        assert source_scan.directory_signature(stats, time.time_ns() + 10**9) == signature, "listed a second after the writes"
        os.utime(directory / "pre-key-1.json", ns=(1, 1))
        assert source_scan.scan_company(root_fd, "acme")[0] != signature
        assert source_scan.scan_company(root_fd, "gone") == (None, "absent")
    finally:
        os.close(root_fd)


# -- (c) a dropped connection is retried, a data error is not -------------------------------------------------------


def kill_when_paused(db, undo_dir, company):
    """Wait until the import pauses before company's COMMIT, then terminate its backend from this connection."""

    def paused():
        with db.cursor() as cur:
            cur.execute("SELECT pid FROM pg_stat_activity WHERE application_name = 'baileys-dr-import' AND state = 'idle in transaction'")
            found = cur.fetchall()
        db.rollback()
        return len(found) == 1 and undo_dir.is_dir() and any(n.startswith("failback-%s-" % company) for n in os.listdir(undo_dir))

    wait_until(paused)
    execute(db, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'baileys-dr-import'")


@pytest.mark.parametrize("which", ["bulk", "delta"])
def test_a_connection_killed_once_during_a_pass_is_retried_and_the_pass_completes(
        db, exported, failback, sessions, undo_dir, record, monkeypatch, which):
    new_ids = {}
    if which == "delta":
        age(sessions)
        ok, bulk = failback(changed_during_read="defer", pass_record=str(record))
        assert ok, bulk.get("msg")
    for company in COMPANIES:
        new_ids[company] = baileys_changes(sessions, company, manifest_of(sessions, company))[0]
    args = dict(changed_during_read="defer", pass_record=str(record)) if which == "bulk" else dict(delta_from=str(record))
    # The delta pass writes the companies it prepared per file in one batch (one transaction): the whole batch is retried.
    what = "company company00002 (writes)" if which == "bulk" else "a delta batch of 3 companies (writes)"
    monkeypatch.setenv("BAILEYS_DR_TEST_PAUSE_AT", "import_company:2")
    monkeypatch.setenv("BAILEYS_DR_TEST_PAUSE_SECONDS", "2")
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(result=failback(**args)))
    worker.start()
    kill_when_paused(db, undo_dir, "company00002")
    monkeypatch.delenv("BAILEYS_DR_TEST_PAUSE_AT")  # the retry does not pause again
    worker.join(60)
    ok, result = outcome["result"]
    assert ok, result.get("msg")
    assert result["committed"] == list(COMPANIES)
    (retry,) = result["retries"]
    assert retry["what"] == what and retry["attempt"] == 1 and retry["waited"] == 0.5
    assert "closed" in retry["error"] or "terminat" in retry["error"]
    undo_files = sorted(n for n in os.listdir(undo_dir) if n.endswith(".gz") and "company00002" in n)
    assert [os.path.basename(p) for p in result["undo_files"] if "company00002" in p] == undo_files, \
        "the undo file of the killed transaction is removed, the retry wrote its own"
    assert database_digests(db) == digests_of_files(sessions, new_ids) == result["digests"]


def test_a_data_error_during_a_pass_is_not_retried(db, exported, failback, sessions, undo_dir, record):
    baileys_changes(sessions, "company00001", manifest_of(sessions, "company00001"))
    before = full_rows(db)
    execute(db, "CREATE FUNCTION pytest_bad_data() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "IF NEW.key_id = '100001' THEN PERFORM 1 / 0; END IF; RETURN NEW; END; $$",
                "CREATE TRIGGER pytest_bad_data BEFORE INSERT ON whatsapp_keys FOR EACH ROW EXECUTE FUNCTION pytest_bad_data()")
    try:
        ok, result = failback(changed_during_read="defer", pass_record=str(record))
    finally:
        execute(db, "DROP TRIGGER pytest_bad_data ON whatsapp_keys", "DROP FUNCTION pytest_bad_data()")
    assert not ok and "division by zero" in result["msg"] and "nothing of it was committed" in result["msg"], result["msg"]
    assert result["retries"] == [] and result["companies"]["company00001"]["status"] == "failed"
    assert full_rows(db) == before and not list(undo_dir.iterdir())


def test_the_retry_helper_retries_only_a_dropped_connection_and_only_a_few_times(db_params, db):
    conns = [connect(db_params, application_name="pytest-retry")]
    log, waits = [], []

    def reconnect():
        conns.append(connect(db_params, application_name="pytest-retry"))

    def query(sql):
        def action():
            with conns[-1].cursor() as cur:
                cur.execute(sql)
                found = cur.fetchone()[0]
            conns[-1].rollback()
            return found
        return action

    execute(db, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'pytest-retry'")
    assert retry_on_disconnect(query("SELECT 42"), "the answer", reconnect, conn=lambda: conns[-1], log=log,
                               sleep=waits.append) == 42
    assert [(e["what"], e["attempt"]) for e in log] == [("the answer", 1)] and waits == [0.5] and len(conns) == 2
    with pytest.raises(psycopg2.DataError):
        retry_on_disconnect(query("SELECT 1 / 0"), "a division", reconnect, conn=lambda: conns[-1], log=log, sleep=waits.append)
    assert len(log) == 1, "a data error is not retried"

    def unreachable():
        raise DatabaseError("cannot connect to PostgreSQL at test: connection refused")

    execute(db, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'pytest-retry'")
    waits.clear()
    with pytest.raises(DatabaseError):
        retry_on_disconnect(query("SELECT 1"), "while the server is down", unreachable, conn=lambda: conns[-1], log=log,
                            sleep=waits.append)
    assert waits == [0.5, 1.0, 2.0], "bounded, exponential"
    for conn in conns:
        conn.close()


# -- (d) the conflict guard and the bulk pass's own rows ------------------------------------------------------------


def test_the_since_guard_exempts_rows_the_bulk_pass_wrote_but_not_a_row_someone_else_changed(
        db, exported, failback, sessions, record):
    since = exported["snapshot_at"]
    changes = {c: baileys_changes(sessions, c, manifest_of(sessions, c)) for c in ("company00001", "company00002")}
    age(sessions)
    ok, bulk = failback(changed_during_read="defer", pass_record=str(record), since=since)
    assert ok and bulk["committed"] == ["company00001", "company00002"], bulk.get("msg")
    # After the bulk pass Baileys rewrites, in company00001, a session the bulk pass wrote: the delta pass overwrites a
    # row changed after since, which is the bulk pass's own.
    session_file, session_id = next((n, i) for n, (t, i) in changes["company00001"][0].items() if t == "session")
    (sessions / "company_company00001" / session_file).write_bytes(file_content({"_sessions": {}, "version": "after-bulk"}))
    # Someone else changes a row of company00002 that the bulk pass wrote.
    execute(db, "UPDATE whatsapp_keys SET value = '{\"someone\": \"else\"}' WHERE company_id = 'company00002' "
                "AND key_type = 'pre-key' AND key_id = '100001'")
    ok, plain = failback(check_mode=True, since=since, companies=["company00001"])
    assert not ok and plain["conflicts"][0]["id"] == session_id, "without the pass record the bulk pass's row is a conflict"
    ok, delta = failback(delta_from=str(record), since=since, continue_on_error=True)
    assert not ok
    assert delta["delta"]["not_proven"] == {"files changed": 1, "rows changed": 1}
    assert delta["companies"]["company00001"]["status"] == "imported" and delta["committed"] == ["company00001"]
    assert json.loads(row(db, "company00001", "session", session_id)[0]) == {"_sessions": {}, "version": "after-bulk"}
    assert delta["companies"]["company00002"]["status"] == "refused"
    assert [(c["company"], c["type"], c["id"]) for c in delta["conflicts"]] == [("company00002", "pre-key", "100001")]
    assert json.loads(row(db, "company00002", "pre-key", "100001")[0]) == {"someone": "else"}


def test_a_bulk_pass_run_again_keeps_the_first_runs_rows_exempt(db, exported, failback, sessions, record):
    """The second run finds the rows the first one wrote equal (it writes nothing): the record it replaces passes its
    xids on, so the delta pass still does not take them for someone else's."""
    since = exported["snapshot_at"]
    new_ids, _consumed, _rewritten = baileys_changes(sessions, "company00001", manifest_of(sessions, "company00001"))
    age(sessions)
    ok, first = failback(changed_during_read="defer", pass_record=str(record), since=since)
    assert ok and first["committed"] == ["company00001"], first.get("msg")
    xid = load_record(record)["companies"]["company00001"]["xid"]
    ok, again = failback(changed_during_read="defer", pass_record=str(record), since=since)
    assert ok and again["committed"] == [], again.get("msg")
    document = load_record(record)
    assert document["companies"]["company00001"]["xid"] is None and document["xids"] == {"company00001": [xid]}
    session_file, session_id = next((n, i) for n, (t, i) in new_ids.items() if t == "session")
    (sessions / "company_company00001" / session_file).write_bytes(file_content({"_sessions": {}, "version": "later"}))
    ok, delta = failback(delta_from=str(record), since=since)
    assert ok and delta["committed"] == ["company00001"] and delta["conflict_count"] == 0, delta.get("msg")
    assert json.loads(row(db, "company00001", "session", session_id)[0]) == {"_sessions": {}, "version": "later"}


# -- (e) undo of both passes --------------------------------------------------------------------------------------------


def test_undoing_both_passes_applies_the_delta_first_and_restores_the_database_as_before_the_bulk_pass(
        db, exported, failback, undo, sessions, record):
    before, digests_before = full_rows(db), database_digests(db)
    for company in ("company00001", "company00002"):
        baileys_changes(sessions, company, manifest_of(sessions, company))
    age(sessions)
    ok, bulk = failback(changed_during_read="defer", pass_record=str(record))
    assert ok and len(bulk["undo_files"]) == 2, bulk.get("msg")
    # After the bulk pass: company00001 rewrites a key the bulk pass inserted, deletes another one and an exported one;
    # company00003 changes for the first time.
    directory = sessions / "company_company00001"
    new_pre_key(directory, "100001", "rewritten after the bulk pass")
    os.unlink(directory / "lid-mapping-987654321098765_reverse.json")
    os.unlink(next(directory / n for n in sorted(os.listdir(directory)) if n.startswith("sender-key-memory-")))
    baileys_changes(sessions, "company00003", manifest_of(sessions, "company00003"))
    ok, delta = failback(delta_from=str(record))
    assert ok and sorted(delta["committed"]) == ["company00001", "company00003"], delta.get("msg")
    assert full_rows(db) != before
    ok, undone = undo(bulk["undo_files"] + delta["undo_files"])  # the order given does not matter
    assert ok, undone.get("msg")
    assert undone["order"][:2] == sorted(delta["undo_files"], key=lambda p: -undone_txid(p)), "the delta's files first"
    assert set(undone["order"][2:]) == set(bulk["undo_files"])
    assert {o["status"] for o in undone["undo_files"].values()} == {"undone"}
    assert database_digests(db) == digests_before and full_rows(db) == before


def undone_txid(path):
    with gzip.open(path, "rt") as fh:
        return json.loads(fh.readline())["txid"]


# -- the record is checked ----------------------------------------------------------------------------------------------


def test_a_pass_record_of_another_tree_or_database_is_refused_naming_it(db, exported, failback, sessions, record, tmp_path):
    age(sessions)
    ok, bulk = failback(changed_during_read="defer", pass_record=str(record))
    assert ok, bulk.get("msg")
    document = load_record(record)
    other_tree = tmp_path / "other.json"
    other_tree.write_text(json.dumps(dict(document, tree="/srv/other-app/baileys_sessions")))
    ok, result = failback(delta_from=str(other_tree))
    assert not ok and str(other_tree) in result["msg"] and "/srv/other-app/baileys_sessions" in result["msg"], result["msg"]
    other_database = tmp_path / "other-db.json"
    other_database.write_text(json.dumps(dict(document, system_identifier="1")))
    ok, result = failback(delta_from=str(other_database), allow_other_database=True)
    assert not ok and str(other_database) in result["msg"] and "system identifier 1" in result["msg"], result["msg"]
    damaged = tmp_path / "damaged.json"
    damaged.write_text(json.dumps(dict(document, companies={"../etc": {}})))
    ok, result = failback(delta_from=str(damaged))
    assert not ok and str(damaged) in result["msg"] and "not a format 1" in result["msg"], result["msg"]
    ok, result = failback(delta_from=str(record), check_mode=True)
    assert ok and result["delta"]["unchanged_proven"] == 3 and result["pass_record"] is None


# -- (f) the delta pass reads only the files changed since the bulk pass ---------------------------------------------


def bulk_then(failback, sessions, record, company="company00002"):
    """A bulk pass of an aged tree, then Baileys' changes to one company: (its new ids, the pass files record path)."""
    age(sessions)
    ok, bulk = failback(changed_during_read="defer", pass_record=str(record))
    assert ok and bulk["deferred"] == [], bulk.get("msg")
    entry = load_record(record)["companies"][company]
    files = record.parent / (record.name + ".files") / (company + ".tsv")
    assert len(entry["files"]) == 64 and oct(os.stat(files).st_mode & 0o777) == "0o600"
    new_ids, _consumed, _session = baileys_changes(sessions, company, manifest_of(sessions, company))
    return new_ids, files


def test_the_delta_pass_reads_only_the_changed_files_and_gives_the_digest_of_the_whole_directory(
        db, exported, failback, sessions, record):
    new_ids, _files = bulk_then(failback, sessions, record)
    ok, delta = failback(delta_from=str(record))
    assert ok, delta.get("msg")
    company = delta["companies"]["company00002"]
    # New keys, the rewritten session and creds.json; not the consumed pre-key (gone) nor any unchanged file.
    assert (company["read"], company["files_read"]) == ("changed_files", len(new_ids) + 2)
    assert company["creds_changed"] and company["deleted"] == 1 and company["inserted"] == len(new_ids)
    assert delta["delta"]["per_file_candidates"] == 1
    expected = digests_of_files(sessions, {"company00002": new_ids})
    assert database_digests(db) == expected == delta["digests"]


def test_a_damaged_pass_files_record_makes_the_delta_pass_read_the_company_whole(db, exported, failback, sessions, record):
    new_ids, files = bulk_then(failback, sessions, record)
    data = bytearray(files.read_bytes())
    data[-3] ^= 1  # a digest line changed: the record no longer matches its checksum in the pass record
    files.write_bytes(bytes(data))
    ok, delta = failback(delta_from=str(record))
    assert ok, delta.get("msg")
    company = delta["companies"]["company00002"]
    assert company["read"] == "whole" and "checksum" in company["read_whole_because"], company
    expected = digests_of_files(sessions, {"company00002": new_ids})
    assert database_digests(db) == expected == delta["digests"]


def test_rows_changed_between_the_delta_proof_and_the_company_write_make_it_read_whole(
        db, exported, failback, sessions, record, monkeypatch):
    """Another writer touches a row of the company after the delta pass's aggregate: the per-company check inside the
    write transaction sees it, and the company is read and planned whole (its since guard then sees the change)."""
    new_ids, _files = bulk_then(failback, sessions, record)
    proven = engine.Failback._prove_unchanged

    def then_a_writer(self, *args):
        todo = proven(self, *args)
        execute(db, "UPDATE whatsapp_keys SET value = value WHERE company_id = 'company00002' AND key_type = 'pre-key' "
                    "AND key_id = (SELECT min(key_id) FROM whatsapp_keys WHERE company_id = 'company00002' AND key_type = 'pre-key')")
        return todo

    monkeypatch.setattr(engine.Failback, "_prove_unchanged", then_a_writer)
    ok, delta = failback(delta_from=str(record), force=True)
    assert ok, delta.get("msg")
    company = delta["companies"]["company00002"]
    assert (company["read"], company["read_whole_because"]) == ("whole", "its rows changed since the bulk pass"), company
    expected = digests_of_files(sessions, {"company00002": new_ids})
    assert database_digests(db) == expected == delta["digests"]


# -- (g) the delta pass writes the companies it prepared per file in batches ------------------------------------------


def changed_everywhere(failback, sessions, record):
    """A bulk pass of the aged tree, then Baileys' changes to every company: {company: {file name: (type, id)}}."""
    age(sessions)
    ok, bulk = failback(changed_during_read="defer", pass_record=str(record))
    assert ok and bulk["deferred"] == [], bulk.get("msg")
    return {c: baileys_changes(sessions, c, manifest_of(sessions, c))[0] for c in COMPANIES}


def counts_of(result):
    return {c: {k: o[k] for k in ("inserted", "updated", "deleted", "unchanged", "creds")} for c, o in result["companies"].items()}


def undo_files_of(undo_dir):
    return sorted(str(undo_dir / n) for n in os.listdir(undo_dir) if n.endswith(".jsonl.gz")) if undo_dir.is_dir() else []


def test_the_delta_pass_writes_its_companies_in_one_transaction_with_an_undo_file_each_that_undo_reads(
        db, exported, failback, undo, sessions, record):
    new_ids = changed_everywhere(failback, sessions, record)
    after_bulk = full_rows(db)
    ok, checked = failback(delta_from=str(record), check_mode=True)
    assert ok and {o["status"] for o in checked["companies"].values()} == {"would_change"}, checked.get("msg")
    assert full_rows(db) == after_bulk and checked["undo_files"] == [], "check mode writes nothing"
    ok, delta = failback(delta_from=str(record))
    assert ok, delta.get("msg")
    assert checked["digests"] == delta["digests"] and counts_of(checked) == counts_of(delta)
    assert delta["delta"]["batched"] == 3 and delta["delta"]["watched"] == 3 and delta["committed"] == list(COMPANIES)
    assert {o["read"] for o in delta["companies"].values()} == {"changed_files"}
    assert len(delta["undo_files"]) == 3 and len({undone_txid(p) for p in delta["undo_files"]}) == 1, "one transaction"
    assert database_digests(db) == digests_of_files(sessions, new_ids) == delta["digests"]
    ok, undone = undo(delta["undo_files"])
    assert ok and {o["status"] for o in undone["undo_files"].values()} == {"undone"}, undone.get("msg")
    assert full_rows(db) == after_bulk


def test_a_company_its_batch_cannot_prove_is_left_out_and_the_others_of_the_batch_are_committed(
        db, exported, failback, sessions, record, undo_dir, warned):
    """The database changes what the import writes for one company (a trigger): the batch's proof sees it, the batch is
    done again without that company, which is then read whole and written alone (and refused there too)."""
    new_ids = changed_everywhere(failback, sessions, record)
    after_bulk = full_rows(db)
    execute(db, "CREATE FUNCTION pytest_mangle() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "IF NEW.company_id = 'company00002' THEN NEW.value = jsonb_build_object('mangled', true); END IF; RETURN NEW; END; $$",
                "CREATE TRIGGER pytest_mangle BEFORE INSERT OR UPDATE ON whatsapp_keys FOR EACH ROW EXECUTE FUNCTION pytest_mangle()")
    try:
        ok, delta = failback(delta_from=str(record))
    finally:
        execute(db, "DROP TRIGGER pytest_mangle ON whatsapp_keys", "DROP FUNCTION pytest_mangle()")
    assert not ok and "company00002" in delta["msg"] and "rolled back" in delta["msg"], delta["msg"]
    assert delta["committed"] == ["company00001", "company00003"] and delta["failed_companies"] == ["company00002"]
    assert undo_files_of(undo_dir) == sorted(delta["undo_files"]), "the undo files of the batch rolled back are removed"
    assert any("company company00002: left out of its delta batch (after the writes" in w for w in warned), warned
    company = delta["companies"]["company00002"]
    assert company["read"] == "whole" and company["read_whole_because"].startswith("after the writes"), company
    files = digests_of_files(sessions, new_ids)
    now = database_digests(db)
    assert {c: now[c] for c in ("company00001", "company00003")} == {c: files[c] for c in ("company00001", "company00003")}
    assert [r for r in full_rows(db)["keys"] if r[0] == "company00002"] == [r for r in after_bulk["keys"] if r[0] == "company00002"]


@pytest.mark.parametrize("touched", ["a row it keeps", "a row it rewrites"])
def test_rows_changed_between_the_batch_plan_and_its_transaction_make_that_company_read_whole(
        db, exported, failback, sessions, record, monkeypatch, touched):
    """Another writer touches a row of company00003 after its batch was planned: one it keeps (the fingerprint after the
    writes sees it) or one it rewrites (the batch reads its version when saving it for the undo): the company is left out
    and read whole (its since guard then sees the change)."""
    new_ids = changed_everywhere(failback, sessions, record)
    session = next(e["id"] for e in manifest_of(sessions, "company00003")["files"].values() if e["type"] == "session")
    where = ("key_type = 'pre-key' AND key_id = (SELECT max(key_id) FROM whatsapp_keys WHERE company_id = 'company00003' "
             "AND key_type = 'pre-key')") if touched == "a row it keeps" else "key_type = 'session' AND key_id = %(id)s"
    write_batch = engine.Failback._write_batch

    def after_the_plan(self, *args):
        if not getattr(self, "pytest_touched", False):
            self.pytest_touched = True
            with db.cursor() as cur:
                cur.execute("UPDATE whatsapp_keys SET value = value WHERE company_id = 'company00003' AND " + where, {"id": session})
                assert cur.rowcount == 1
            db.commit()
        return write_batch(self, *args)

    monkeypatch.setattr(engine.Failback, "_write_batch", after_the_plan)
    ok, delta = failback(delta_from=str(record), force=True)
    assert ok, delta.get("msg")
    company = delta["companies"]["company00003"]
    assert (company["read"], company["read_whole_because"]) == ("whole", "its rows changed since the bulk pass"), company
    assert {delta["companies"][c]["read"] for c in ("company00001", "company00002")} == {"changed_files"}
    assert database_digests(db) == digests_of_files(sessions, new_ids) == delta["digests"]


def paused_in_transaction(db, undo_dir, count):
    """The import idle in its transaction (held at the hook) with count undo files synced whole."""
    def paused():
        with db.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'baileys-dr-import' "
                        "AND state = 'idle in transaction'")
            (found,) = cur.fetchone()
        db.rollback()
        return found == 1 and len([n for n in os.listdir(undo_dir) if n.endswith(".jsonl.gz.sha256")]) == count \
            if undo_dir.is_dir() else False
    return paused


def test_a_delta_killed_between_its_batch_undo_files_and_the_commit_commits_nothing_and_a_rerun_completes(
        db, exported, failback, undo, sessions, record, undo_dir, monkeypatch):
    new_ids = changed_everywhere(failback, sessions, record)
    after_bulk = full_rows(db)
    monkeypatch.setenv("BAILEYS_DR_TEST_PAUSE_AT", "import_company:1")
    monkeypatch.setenv("BAILEYS_DR_TEST_PAUSE_SECONDS", "60")
    pid = os.fork()
    if pid == 0:  # the module, killed at the hook: after the undo files are synced, before the COMMIT
        try:
            failback(delta_from=str(record))
        finally:
            os._exit(0)
    try:
        wait_until(paused_in_transaction(db, undo_dir, 3), timeout=60, what="the delta held before its batch's COMMIT")
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    monkeypatch.delenv("BAILEYS_DR_TEST_PAUSE_AT")
    leftover = undo_files_of(undo_dir)
    assert len(leftover) == 3 and all(undo_files.read_undo_file(p) for p in leftover), "synced whole before the COMMIT"
    assert wait_until(lambda: full_rows(db) == after_bulk, what="the server rolled the batch back"), "nothing committed"
    ok, delta = failback(delta_from=str(record))
    assert ok and delta["committed"] == list(COMPANIES), delta.get("msg")
    assert database_digests(db) == digests_of_files(sessions, new_ids) == delta["digests"]
    ok, undone = undo(leftover)
    assert ok and {o["status"] for o in undone["undo_files"].values()} == {"nothing_to_undo"}, undone
    assert database_digests(db) == delta["digests"], "the killed run's undo files change nothing"


@pytest.mark.parametrize("watch", ["inotify", "listing"])
def test_a_file_rewritten_between_the_listing_and_the_commit_is_caught_and_its_company_imported_as_it_is_now(
        db, exported, failback, sessions, record, undo_dir, monkeypatch, tmp_path, warned, watch):
    """A file the delta pass did not read (unchanged since the bulk pass) rewritten in place, same size, while the batch
    holds its writes: the check before the COMMIT sees it (an inotify event, or without inotify a listing again), the
    company is left out and read whole, and PostgreSQL gets the file as it is now."""
    new_ids = changed_everywhere(failback, sessions, record)
    if watch == "listing":
        monkeypatch.setattr(passfiles, "_libc", lambda: None)
    release = tmp_path / "release"
    monkeypatch.setenv("BAILEYS_DR_TEST_PAUSE_AT", "import_company:1")
    monkeypatch.setenv("BAILEYS_DR_TEST_PAUSE_SECONDS", "60")
    monkeypatch.setenv("BAILEYS_DR_TEST_PAUSE_UNTIL", str(release))
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(result=failback(delta_from=str(record))))
    runner.start()
    try:
        wait_until(paused_in_transaction(db, undo_dir, 3), timeout=60, what="the delta held before its batch's COMMIT")
        directory = sessions / "company_company00002"
        manifest = manifest_of(sessions, "company00002")
        name = max((n for n, e in manifest["files"].items() if e["type"] == "pre-key"), key=lambda n: int(manifest["files"][n]["id"]))
        value = json.loads((directory / name).read_bytes())
        old = (directory / name).read_bytes()
        value["private"]["data"] = base64.b64encode(random.Random(3).randbytes(len(base64.b64decode(value["private"]["data"])))).decode()
        with open(directory / name, "r+b") as fh:  # in place: same inode, same size
            fh.write(file_content(value))
        assert os.path.getsize(directory / name) == len(old)
    finally:
        release.touch()
        runner.join(60)
    ok, delta = outcome["result"]
    assert ok, delta.get("msg")
    assert delta["delta"]["watch_off"] == (None if watch == "inotify" else "no inotify")
    company = delta["companies"]["company00002"]
    assert company["read"] == "whole" and company["read_whole_because"] == "its files changed after they were listed", company
    assert any("company company00002: left out of its delta batch" in w for w in warned), warned
    assert {delta["companies"][c]["read"] for c in ("company00001", "company00003")} == {"changed_files"}
    assert json.loads(row(db, "company00002", "pre-key", manifest["files"][name]["id"])[0])["private"]["data"] == list(
        base64.b64decode(value["private"]["data"]))
    assert database_digests(db) == digests_of_files(sessions, new_ids) == delta["digests"]
