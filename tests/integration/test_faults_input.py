"""Hostile and corrupt input (issue 8, points 6, 7, 9 and 10).

Corrupt session files, hostile ids and planted symbolic links, a tree of
another database, a read-only standby as the failback target. Each: refused
before any write naming the cause, nothing lost (rows and digests unchanged,
nothing written outside the tree), and the run succeeds once the cause is gone.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import pytest

import baileys_auth_export
import baileys_auth_import
from faults_helpers import database_digests, execute, full_rows, listing, scratch, scratch_cluster, wait_until  # noqa: F401
from module_harness import run_module
from test_import import baileys_changes, manifest_of

from ansible.module_utils import baileys_dr_testdata as testdata


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "srv" / "baileys-app"
    root.mkdir(parents=True)
    return root / "baileys_sessions"


def export(params, dest, **args):
    ok, result = run_module(baileys_auth_export, dict(params, dest=str(dest), keep_backup=False, **args))
    assert ok, result.get("msg")
    return result


def failback(params, src, undo_dir, **args):
    return run_module(baileys_auth_import, dict(params, src=str(src), undo_dir=str(undo_dir), **args))


def changed_on_files(conn, params, tree, seed):
    """Two companies exported, then changed on files the way Baileys does: what a failback must bring back."""
    testdata.load(conn, seed, 2, 40)
    export(params, tree)
    for company in ("company00001", "company00002"):
        baileys_changes(tree, company, manifest_of(tree, company))


# -- 6. corrupt files ----------------------------------------------------------------------------------------------


def _truncated_creds(d):
    return "creds.json", (d / "creds.json").read_bytes()[:40]


def _invalid_json(d):
    name = sorted(n for n in os.listdir(d) if n.startswith("session-"))[0]
    return name, b'{"_sessions": {"BQ==": '


def _byte_order_mark(d):
    name = sorted(n for n in os.listdir(d) if n.startswith("pre-key-"))[0]
    return name, b"\xef\xbb\xbf" + (d / name).read_bytes()


def _zero_bytes(d):
    name = sorted(n for n in os.listdir(d) if n.startswith("sender-key-memory-"))[0]
    return name, b""


@pytest.mark.parametrize("damage", [_truncated_creds, _invalid_json, _byte_order_mark, _zero_bytes])
def test_a_corrupt_session_file_refuses_the_failback_before_any_write_and_the_repaired_tree_fails_back(
        db, db_params, tree, tmp_path, damage):
    changed_on_files(db, db_params, tree, "corrupt")
    directory = tree / "company_company00002"
    name, bad = damage(directory)
    good = (directory / name).read_bytes()
    (directory / name).write_bytes(bad)
    before, digests = full_rows(db), database_digests(db)

    ok, result = failback(db_params, tree, tmp_path / "undo")
    assert not ok and "company00002" in result["msg"] and name in result["msg"] and "nothing was written" in result["msg"], result["msg"]
    assert full_rows(db) == before and database_digests(db) == digests, "company00001 is valid, yet nothing of it was written"

    (directory / name).write_bytes(good)
    ok, result = failback(db_params, tree, tmp_path / "undo")
    assert ok and result["committed"] == ["company00001", "company00002"], result.get("msg")
    assert result["digests"] == database_digests(db)


def test_a_company_manifest_whose_sha256_does_not_match_refuses_the_failback_and_the_restored_one_fails_back(db, db_params, tree, tmp_path):
    changed_on_files(db, db_params, tree, "sha")
    manifest = tree / ".baileys-dr" / "companies" / "company00002.json"
    good = manifest.read_bytes()
    # One file's recorded checksum edited: the company manifest no longer has the sha256 the top manifest lists.
    manifest.write_bytes(good.replace(b'"sha256":"', b'"sha256":"0', 1))
    before = full_rows(db)
    ok, result = failback(db_params, tree, tmp_path / "undo")
    assert not ok and "company00002" in result["msg"] and "checksum mismatch" in result["msg"], result["msg"]
    assert full_rows(db) == before
    manifest.write_bytes(good)
    ok, result = failback(db_params, tree, tmp_path / "undo")
    assert ok and result["digests"] == database_digests(db), result.get("msg")


# -- 7. hostile ids and planted symbolic links ---------------------------------------------------------------------


@pytest.mark.parametrize("company_id", ["../../outside", "/tmp/absolute", "a\nb", "x" * 51, "nul\x00byte"])
def test_a_hostile_company_id_asked_for_is_refused_and_nothing_is_written(db, db_params, tree, tmp_path, company_id):
    testdata.load(db, "hostile", 1, 5)
    export(db_params, tree)
    before = listing(tmp_path)
    ok, result = run_module(baileys_auth_export, dict(db_params, dest=str(tree), companies=[company_id]))
    assert not ok and "company id" in result["msg"] and "\n" not in result["msg"], result["msg"]
    ok, result = failback(db_params, tree, tmp_path / "undo", companies=[company_id])
    assert not ok and "company id" in result["msg"] and "\n" not in result["msg"], result["msg"]
    assert listing(tmp_path) == before


def test_hostile_key_ids_in_the_database_never_write_outside_the_tree(db, db_params, tree, tmp_path):
    """Traversal and absolute ids become Baileys' own (flattened) file names inside the company directory; ids that
    cannot be files (a newline, over 255 bytes, two ids for one file) refuse the export naming them."""
    testdata.load(db, "hostkeys", 1, 5)
    rows = [("session", "../../../../outside.0", {"a": 1}), ("session", "/tmp/absolute.0", {"a": 2}),
            ("pre-key", "line\nbreak", {}), ("session", "ü" * 130, {}),
            ("session", "4917:1.0", {"a": 3}), ("session", "4917-1.0", {"a": 4})]
    execute(db, *[("INSERT INTO whatsapp_keys (company_id, key_type, key_id, value) VALUES ('company00001', %s, %s, %s)",
                   (t, i, json.dumps(v))) for t, i, v in rows])
    outside = listing(tmp_path)
    ok, result = run_module(baileys_auth_export, dict(db_params, dest=str(tree)))
    assert not ok and repr("line\nbreak") in result["msg"], result["msg"]
    assert listing(tmp_path) == outside
    execute(db, ("DELETE FROM whatsapp_keys WHERE key_id = %s", ("line\nbreak",)))
    ok, result = run_module(baileys_auth_export, dict(db_params, dest=str(tree)))
    assert not ok and "bytes" in result["msg"], result["msg"]
    execute(db, ("DELETE FROM whatsapp_keys WHERE key_id = %s", ("ü" * 130,)))
    ok, result = run_module(baileys_auth_export, dict(db_params, dest=str(tree)))
    assert not ok and "'4917:1.0'" in result["msg"] and "'4917-1.0'" in result["msg"], result["msg"]
    assert listing(tmp_path) == outside
    execute(db, "DELETE FROM whatsapp_keys WHERE key_id = '4917-1.0'")
    result = export(db_params, tree)
    assert result["digests"] == database_digests(db)
    company = tree / "company_company00001"
    assert (company / "session-..__..__..__..__outside.0.json").is_file() and (company / "session-__tmp__absolute.0.json").is_file()
    written = {os.path.relpath(os.path.join(d, n), tmp_path) for d, _, files in os.walk(tmp_path) for n in files}
    assert all(p.startswith("srv/baileys-app/baileys_sessions/") for p in written), sorted(written)[:5]


def _symlinked_company_directory(tree, outside):
    shutil.copytree(tree / "company_company00002", outside / "company_company00002")
    shutil.rmtree(tree / "company_company00002")
    os.symlink(outside / "company_company00002", tree / "company_company00002")
    return "company_company00002"


def _symlinked_key_file(tree, outside):
    directory = tree / "company_company00002"
    name = sorted(n for n in os.listdir(directory) if n.startswith("session-"))[0]
    shutil.copy(directory / name, outside / name)
    os.unlink(directory / name)
    os.symlink(outside / name, directory / name)
    return name


def _symlinked_new_key_file(tree, outside):
    (outside / "secret").write_text('{"stolen": true}')
    os.symlink(outside / "secret", tree / "company_company00002" / "pre-key-424242.json")
    return "pre-key-424242.json"


def _symlinked_company_manifest(tree, outside):
    path = tree / ".baileys-dr" / "companies" / "company00002.json"
    shutil.copy(path, outside / "company00002.json")
    os.unlink(path)
    os.symlink(outside / "company00002.json", path)
    return "company00002"


@pytest.mark.parametrize("plant", [_symlinked_company_directory, _symlinked_key_file, _symlinked_new_key_file,
                                   _symlinked_company_manifest])
def test_symbolic_links_planted_in_the_sessions_tree_are_refused_and_never_followed(db, db_params, tree, tmp_path, plant):
    changed_on_files(db, db_params, tree, "links")
    pristine = tmp_path / "pristine"
    shutil.copytree(tree, pristine, symlinks=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    named = plant(tree, outside)
    before, outside_before = full_rows(db), listing(outside)
    ok, result = failback(db_params, tree, tmp_path / "undo")
    assert not ok and named in result["msg"], result["msg"]
    assert full_rows(db) == before and listing(outside) == outside_before
    shutil.rmtree(tree)
    shutil.copytree(pristine, tree, symlinks=True)
    ok, result = failback(db_params, tree, tmp_path / "undo")
    assert ok and result["digests"] == database_digests(db), result.get("msg")


# -- 9. another database -------------------------------------------------------------------------------------------


def test_a_failback_into_another_database_is_refused_naming_both_system_identifiers(db, db_params, scratch, tree, tmp_path):
    """Exported from the session cluster, failed back into the scratch cluster: a real other system identifier."""
    _cluster, other_params, other = scratch
    changed_on_files(db, db_params, tree, "otherdb")
    testdata.load(other, "otherdb", 2, 40)
    before = full_rows(other)
    ok, result = failback(other_params, tree, tmp_path / "undo")
    top = json.loads((tree / ".baileys-dr" / "manifest.json").read_text())
    assert not ok and "system identifier %s" % top["source"]["system_identifier"] in result["msg"], result["msg"]
    assert "allow_other_database" in result["msg"]
    assert full_rows(other) == before
    ok, result = failback(db_params, tree, tmp_path / "undo")
    assert ok and result["digests"] == database_digests(db), result.get("msg")


# -- 10. a read-only standby -----------------------------------------------------------------------------------------


@pytest.fixture
def standby(scratch):
    """A hot standby of the scratch cluster (pg_basebackup -R), read-only by nature."""
    import pgcluster

    cluster, params, conn = scratch
    # Not under pytest's tmp_path: its 0700 parents keep the server's account out.
    base = tempfile.mkdtemp(prefix="baileys-dr-faults-standby-")
    os.chmod(base, 0o755)
    replica = pgcluster.Cluster(os.path.join(base, "cluster"))
    os.makedirs(replica.rundir, mode=0o700)
    os.makedirs(replica.datadir, mode=0o700)
    for path in (replica.base, replica.rundir, replica.datadir):
        replica._chown(path)
    replica._as_owner([replica._bin("pg_basebackup"), "-h", cluster.rundir, "-p", str(cluster.port), "-U", "postgres",
                       "-D", replica.datadir, "-R", "-X", "stream", "-c", "fast"])
    # Its own socket directory (the copied settings name the primary's).
    replica._as_owner(["sh", "-c", "echo \"unix_socket_directories = '%s'\" >> %s/postgresql.auto.conf"
                       % (replica.rundir, replica.datadir)])
    replica._as_owner([replica._bin("pg_ctl"), "-D", replica.datadir, "-l", replica.logfile, "-w", "-t", "60",
                       "-o", "-p %d" % replica.port, "start"])
    replica.wait_ready()
    try:
        yield replica, dict(params, login_port=replica.port)
    finally:
        replica.destroy()
        os.rmdir(base)


def test_a_read_only_standby_as_failback_target_is_refused_with_a_clear_error(scratch, standby, tree, tmp_path):
    from ansible.module_utils.baileys_dr_postgres import connect

    cluster, params, conn = scratch
    changed_on_files(conn, params, tree, "standby")
    replica, replica_params = standby
    expected = database_digests(conn)
    replica_conn = connect(replica_params)
    wait_until(lambda: database_digests(replica_conn) == expected, what="the standby to replay the primary")
    before = full_rows(replica_conn)
    ok, result = failback(replica_params, tree, tmp_path / "undo")
    assert not ok, "a standby cannot take writes"
    assert "read-only" in result["msg"] and "standby" in result["msg"] and "127.0.0.1:%d" % replica.port in result["msg"], result["msg"]
    assert "nothing was written" in result["msg"]
    assert full_rows(replica_conn) == before and full_rows(conn)["keys"] == before["keys"]
    assert not (tmp_path / "undo").exists() or not os.listdir(tmp_path / "undo")
    replica_conn.close()
    # The primary (what the standby replicates from) takes the failback.
    ok, result = failback(params, tree, tmp_path / "undo")
    assert ok and result["committed"] == ["company00001", "company00002"], result.get("msg")
    assert result["digests"] == database_digests(conn)


# -- issue 15: values nested deeper than Python reads, the option a link names ------------------------------------

# 3,000 arrays inside each other: PostgreSQL's JSONB and Node's JSON.parse accept it, Python's parser stops at 1,000.
DEEP = "[" * 3000 + "]" * 3000
DEEP_ID = "4915550009.1"


def put_deep_key(conn, company, key_type="session", key_id=DEEP_ID):
    execute(conn, ("INSERT INTO whatsapp_keys (company_id, key_type, key_id, value) VALUES (%s, %s, %s, %s::jsonb) "
                   "ON CONFLICT (company_id, key_type, key_id) DO UPDATE SET value = excluded.value",
                   (company, key_type, key_id, DEEP)))


def test_a_value_nested_3000_deep_fails_the_state_digest_naming_company_type_and_id(db, db_params):
    import baileys_state_digest

    testdata.load(db, "deep", 2, 5)
    put_deep_key(db, "company00002")
    ok, result = run_module(baileys_state_digest, dict(db_params))
    assert not ok
    assert result["msg"].startswith("company company00002, session key id '%s': the value is nested too deeply to be "
                                    "read" % DEEP_ID), result["msg"]
    assert result["msg"].endswith("the state digest cannot be computed")
    execute(db, ("DELETE FROM whatsapp_keys WHERE key_id = %s", (DEEP_ID,)),
            ("UPDATE whatsapp_auth SET creds = %s::jsonb WHERE company_id = 'company00001'", ('{"me": %s}' % DEEP,)))
    ok, result = run_module(baileys_state_digest, dict(db_params, companies=["company00001"]))
    assert not ok and result["msg"].startswith("company company00001, creds: the value is nested too deeply"), result["msg"]


def _deep_changed_key_file(directory):
    name = sorted(n for n in os.listdir(directory) if n.startswith("session-"))[0]
    return name


def _deep_new_key_file(directory):
    return "pre-key-777777.json"


def _deep_creds(directory):
    return "creds.json"


@pytest.mark.parametrize("which", [_deep_changed_key_file, _deep_new_key_file, _deep_creds])
def test_a_session_file_nested_3000_deep_refuses_the_failback_naming_company_and_file(db, db_params, tree, tmp_path, which):
    changed_on_files(db, db_params, tree, "deepfile")
    directory = tree / "company_company00002"
    name = which(directory)
    good = (directory / name).read_bytes() if (directory / name).exists() else None
    (directory / name).write_text('{"me": %s}' % DEEP if name == "creds.json" else DEEP)
    before, digests = full_rows(db), database_digests(db)

    ok, result = failback(db_params, tree, tmp_path / "undo")
    assert not ok and "nothing was written" in result["msg"], result["msg"]
    depth = 3001 if name == "creds.json" else 3000  # creds.json: the arrays inside an object
    assert ("company company00002: refused before any write: %s nests arrays or objects %d levels deep; baileys-dr "
            "reads up to 512" % (name, depth)) in result["msg"], result["msg"]
    assert full_rows(db) == before and database_digests(db) == digests

    if good is None:
        os.unlink(directory / name)
    else:
        (directory / name).write_bytes(good)
    ok, result = failback(db_params, tree, tmp_path / "undo")
    assert ok and result["committed"] == ["company00001", "company00002"], result.get("msg")


def test_a_database_value_nested_3000_deep_refuses_its_company_naming_type_and_id(db, db_params, tree, tmp_path):
    changed_on_files(db, db_params, tree, "deeprow")
    manifest = manifest_of(tree, "company00002")
    name, entry = next((n, e) for n, e in sorted(manifest["files"].items())
                       if e["type"] == "pre-key" and (tree / "company_company00002" / n).exists())
    put_deep_key(db, "company00002", "pre-key", entry["id"])
    before = full_rows(db)

    ok, result = failback(db_params, tree, tmp_path / "undo", force=True)
    assert not ok
    assert ("company company00002: the database's value of pre-key key id %r is nested too deeply to be read"
            % entry["id"]) in result["msg"], result["msg"]
    assert "nothing of it is written" in result["msg"]
    assert full_rows(db) == before
    assert not (tmp_path / "undo").exists() or not os.listdir(tmp_path / "undo")


def test_a_symbolic_link_as_src_is_refused_naming_src(db, db_params, tree, tmp_path):
    changed_on_files(db, db_params, tree, "srclink")
    link = tmp_path / "sessions-link"
    os.symlink(tree, link)
    ok, result = failback(db_params, link, tmp_path / "undo")
    assert not ok
    assert result["msg"] == ("src %s is a symbolic link: refusing to read through it (give the directory it points to)"
                             % link)
    ok, result = failback(db_params, tmp_path / "missing" / "sessions", tmp_path / "undo")
    assert not ok and result["msg"] == "the parent directory %s of src does not exist" % (tmp_path / "missing")
