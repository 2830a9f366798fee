"""baileys_keys_cleanup against the throwaway PostgreSQL cluster: retention, archive, caps, restore, concurrency."""

from __future__ import annotations

import datetime
import gzip
import json
import os
import random
import threading
import time

import pytest

import baileys_keys_cleanup
from module_harness import run_module

from ansible.module_utils.baileys_dr_ages import bucket_of
from ansible.module_utils.baileys_dr_cleanup import Cleanup, read_sidecar
from ansible.module_utils.baileys_dr_postgres import connect

NOW = datetime.datetime.now(datetime.timezone.utc)
DAY = datetime.timedelta(days=1)
ALL_COLUMNS = "company_id, key_type, key_id, value::text, created_at, updated_at, expires_at"
# The application's batched upsert (DOMAIN.md section 1): updated_at comes from the BEFORE UPDATE trigger.
APP_UPSERT = (
    "INSERT INTO whatsapp_keys (company_id, key_type, key_id, value, expires_at) VALUES %s "
    "ON CONFLICT (company_id, key_type, key_id) DO UPDATE SET value = EXCLUDED.value, expires_at = EXCLUDED.expires_at"
)


def add_key(cur, company, key_type, key_id, age_days, value=None, expires_in_days=7):
    updated = NOW - DAY * age_days
    cur.execute(
        "INSERT INTO whatsapp_keys (company_id, key_type, key_id, value, created_at, updated_at, expires_at) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s)",
        (company, key_type, key_id, json.dumps(value if value is not None else {"k": {"type": "Buffer", "data": [1, 2, 255]}}),
         updated - DAY, updated, updated + DAY * expires_in_days))


def seed(db, companies=("acme", "beta"), per_type=6):
    """Every key type at ages 0.5, 3, 10, 20, 45, 90 days for each company, plus their creds."""
    ages = [0.5, 3, 10, 20, 45, 90][:per_type]
    with db.cursor() as cur:
        for company in companies:
            cur.execute("INSERT INTO whatsapp_auth (company_id, creds) VALUES (%s, %s)", (company, json.dumps({"registrationId": 7})))
            for key_type in ("pre-key", "session", "sender-key", "sender-key-memory", "app-state-sync-key", "app-state-sync-version",
                             "lid-mapping", "device-list", "tctoken", "identity-key"):
                for n, age in enumerate(ages):
                    value = {"n": n, "big": 12345678901234567, "f": 1.5e-7, "s": "ü\u2028\"x", "b": {"type": "Buffer", "data": "AQID"}}
                    if key_type == "tctoken":  # received when the row was written: expired from 28 days at most (ages 45, 90)
                        value = dict(value, token={"type": "Buffer", "data": [1, 2]}, timestamp=str(int((NOW - DAY * age).timestamp())))
                    add_key(cur, company, key_type, "%s.%d" % (key_type, n), age, value=value)
    db.commit()


def rows(db, where="TRUE"):
    with db.cursor() as cur:
        cur.execute("SELECT %s FROM whatsapp_keys WHERE %s ORDER BY company_id, key_type, key_id" % (ALL_COLUMNS, where))
        out = cur.fetchall()
    db.commit()
    return out


def auth_rows(db):
    with db.cursor() as cur:
        cur.execute("SELECT company_id, creds::text, created_at, updated_at FROM whatsapp_auth ORDER BY company_id")
        out = cur.fetchall()
    db.commit()
    return out


def cleanup(db_params, tmp_path, check_mode=False, **args):
    params = dict(db_params, archive_dir=str(tmp_path / "archive"), **args)
    return run_module(baileys_keys_cleanup, params, check_mode=check_mode)


def test_check_mode_counts_exactly_per_company_and_type_and_deletes_nothing(db, db_params, tmp_path):
    seed(db)
    before = rows(db)
    ok, result = cleanup(db_params, tmp_path, check_mode=True)
    assert ok, result
    assert result["changed"] is False
    # Default retention 30 days on the five rebuildable types: ages 45 and 90 go.
    expected = {t: 2 for t in ("device-list", "sender-key", "sender-key-memory", "session", "tctoken")}
    assert result["plan"]["by_company"] == {"acme": expected, "beta": expected}
    assert result["plan"]["keys"] == 20
    assert result["plan"]["buckets"] == {"0-1d": 0, "1-7d": 0, "7-14d": 0, "14-30d": 0, "30d+": 20, "unknown": 0}
    assert result["before"]["buckets"] == {"0-1d": 20, "1-7d": 20, "7-14d": 20, "14-30d": 20, "30d+": 40, "unknown": 0}
    assert result["before"]["keys"] == 120 and result["before"]["protected"] == 60
    assert rows(db) == before
    assert not (tmp_path / "archive").exists()


def test_delete_archives_then_deletes_only_old_rebuildable_keys(db, db_params, tmp_path):
    seed(db)
    protected_before = rows(db, "key_type IN ('pre-key','app-state-sync-key','app-state-sync-version','identity-key','lid-mapping')")
    auth_before = auth_rows(db)
    ok, result = cleanup(db_params, tmp_path, retention={"session": 7, "tctoken": 60})
    assert ok, result
    # tctoken's 60 days are not used: Baileys' expiry takes the tokens received 45 and 90 days ago.
    assert result["changed"] and result["keys_deleted"] == 2 * (4 + 2)
    assert result["deleted"] == {"acme": {"session": 4, "tctoken": 2}, "beta": {"session": 4, "tctoken": 2}}
    # Protected types, types without retention and whatsapp_auth are untouched.
    assert rows(db, "key_type IN ('pre-key','app-state-sync-key','app-state-sync-version','identity-key','lid-mapping')") == protected_before
    assert len(rows(db, "key_type = 'sender-key'")) == 12
    assert auth_rows(db) == auth_before
    archive = result["archive"]
    assert archive["rows"] == 12 and os.stat(archive["path"]).st_mode & 0o777 == 0o600
    assert read_sidecar(archive["path"]) == archive["sha256"]
    with gzip.open(archive["path"], "rt") as fh:
        lines = fh.read().rstrip("\n").split("\n")  # not splitlines(): values hold U+2028
    header = json.loads(lines[0])
    assert header["kind"] == "baileys-dr-keys-archive" and header["columns"][:3] == ["company_id", "key_type", "key_id"]
    assert sorted((json.loads(x)["company_id"], json.loads(x)["key_id"]) for x in lines[1:]) == sorted(
        (c, "%s.%d" % (t, n)) for c in ("acme", "beta") for t, ns in (("session", (2, 3, 4, 5)), ("tctoken", (4, 5))) for n in ns)
    assert result["after"]["keys"] == 108
    assert result["vacuum"]["ran"] is True and result["vacuum"]["warnings"] == []
    assert result["after_delete"]["dead_tuples"] >= 12 and result["after"]["dead_tuples"] == 0
    assert any(q.startswith("VACUUM (ANALYZE)") for q in result["queries"])


def test_delete_then_restore_gives_back_identical_rows(db, db_params, tmp_path):
    seed(db)
    with db.cursor() as cur:  # an odd row: hostile-looking id, null expires_at, both Buffer forms
        cur.execute("INSERT INTO whatsapp_keys (company_id, key_type, key_id, value, created_at, updated_at, expires_at) "
                    "VALUES ('acme', 'session', E'x\\n../y''\"', %s, now() - interval '100 days', "
                    "'2020-02-29 12:34:56.789012+00', NULL)", (json.dumps([{"type": "Buffer", "data": [0, 1]}, "\u0001\u2029"]),))
    db.commit()
    original = rows(db)
    ok, deleted = cleanup(db_params, tmp_path, max_delete_share=0.9)
    assert ok and deleted["keys_deleted"] == 21
    assert len(rows(db)) == len(original) - 21
    ok, restored = run_module(baileys_keys_cleanup, dict(db_params, mode="restore", archive=deleted["archive"]["path"]))
    assert ok, restored
    assert restored["changed"] and restored["inserted"] == 21 and restored["already_present"] == 0
    assert rows(db) == original
    # A second restore finds every row present and changes nothing.
    ok, again = run_module(baileys_keys_cleanup, dict(db_params, mode="restore", archive=deleted["archive"]["path"]))
    assert ok and again["changed"] is False and again["inserted"] == 0 and again["already_present"] == 21
    assert rows(db) == original


def test_restore_never_overwrites_a_key_the_application_rewrote(db, db_params, tmp_path):
    seed(db, companies=("acme",))
    ok, deleted = cleanup(db_params, tmp_path, retention={"session": 30})
    assert ok and deleted["keys_deleted"] == 2
    with db.cursor() as cur:
        cur.execute(APP_UPSERT % "('acme', 'session', 'session.4', '{\"new\": true}', now() + interval '7 days')")
    db.commit()
    ok, restored = run_module(baileys_keys_cleanup, dict(db_params, mode="restore", archive=deleted["archive"]["path"]))
    assert ok and restored["inserted"] == 1 and restored["already_present"] == 1 and restored["already_present_differs"] == 1
    assert rows(db, "key_id = 'session.4'")[0][3] == '{"new": true}'


def test_restore_refuses_an_archive_that_does_not_match_its_sidecar(db, db_params, tmp_path):
    seed(db, companies=("acme",))
    ok, deleted = cleanup(db_params, tmp_path, retention={"session": 30})
    path = deleted["archive"]["path"]
    with open(path, "ab") as fh:
        fh.write(gzip.compress(b'{"company_id":"acme","key_type":"session","key_id":"evil","value":{}}\n'))
    ok, result = run_module(baileys_keys_cleanup, dict(db_params, mode="restore", archive=path))
    assert not ok and "does not match its sidecar" in result["msg"]
    assert rows(db, "key_type = 'session' AND company_id = 'acme'") == rows(db, "key_type = 'session' AND company_id = 'acme'")
    assert len(rows(db, "key_type = 'session'")) == 4
    os.unlink(path + ".sha256")
    ok, result = run_module(baileys_keys_cleanup, dict(db_params, mode="restore", archive=path))
    assert not ok and "no sha256 sidecar" in result["msg"]


def test_restore_in_check_mode_counts_and_writes_nothing(db, db_params, tmp_path):
    seed(db, companies=("acme",))
    ok, deleted = cleanup(db_params, tmp_path, retention={"session": 30})
    ok, result = run_module(baileys_keys_cleanup, dict(db_params, mode="restore", archive=deleted["archive"]["path"]), check_mode=True)
    assert ok and result["changed"] is False and result["inserted"] == 2
    assert len(rows(db, "key_type = 'session'")) == 4


def test_caps_refuse_with_the_numbers_and_delete_nothing(db, db_params, tmp_path):
    seed(db)
    before = rows(db)
    ok, result = cleanup(db_params, tmp_path, max_delete=19)
    assert not ok and result["refused"] is True
    assert "it would delete 20 keys, more than max_delete=19" in result["msg"]
    assert result["plan"]["keys"] == 20
    ok, result = cleanup(db_params, tmp_path, retention={"session": 1, "sender-key": 1, "sender-key-memory": 1, "device-list": 1,
                                                          "tctoken": 1}, max_delete_share=0.3)
    assert not ok and result["refused"]
    # 4 x 5 by age, and the 2 tokens Baileys considers expired (its 1 day is not used).
    assert "acme: 22 of 60 keys (36.7%)" in result["msg"] and "beta: 22 of 60 keys" in result["msg"]
    assert rows(db) == before
    assert not (tmp_path / "archive").exists()
    ok, result = cleanup(db_params, tmp_path, retention={"session": 1}, max_delete_share=0.3)  # raised enough
    assert ok and result["keys_deleted"] == 10


def test_expires_at_rule_is_off_by_default_and_applies_only_to_retention_types(db, db_params, tmp_path):
    with db.cursor() as cur:
        # Fresh rows whose expires_at passed long ago.
        add_key(cur, "acme", "session", "s1", 2, expires_in_days=-10)
        add_key(cur, "acme", "pre-key", "1", 2, expires_in_days=-10)
        add_key(cur, "acme", "session", "s2", 2, expires_in_days=7)
        for n in range(10):
            add_key(cur, "acme", "identity-key", "i%d" % n, 1)
    db.commit()
    ok, result = cleanup(db_params, tmp_path, check_mode=True)
    assert ok and result["plan"]["keys"] == 0
    ok, result = cleanup(db_params, tmp_path, delete_expired=True, expired_grace_days=5)
    assert ok and result["deleted"] == {"acme": {"session": 1}}
    assert [r[2] for r in rows(db, "key_type <> 'identity-key'")] == ["1", "s2"]


def test_companies_filter_limits_the_cleanup(db, db_params, tmp_path):
    seed(db)
    ok, result = cleanup(db_params, tmp_path, companies=["beta"])
    assert ok and list(result["deleted"]) == ["beta"] and result["keys_deleted"] == 10
    assert result["before"]["keys"] == 60 and result["before"]["companies"] == 1
    assert len(rows(db, "company_id = 'acme'")) == 60


def test_second_run_deletes_nothing(db, db_params, tmp_path):
    seed(db)
    ok, first = cleanup(db_params, tmp_path)
    ok, second = cleanup(db_params, tmp_path)
    assert first["changed"] and ok and second["changed"] is False and second["keys_deleted"] == 0 and second["archive"] is None
    assert second["vacuum"] is None and second["after"] == second["before"]


def test_bad_policy_is_refused_naming_the_types(db_params, tmp_path):
    ok, result = cleanup(db_params, tmp_path, retention={"sesion": 30, "pre-key": 30}, protected_types=["pre-key", "nope"])
    assert not ok
    assert "'sesion'" in result["msg"] and "'nope'" in result["msg"] and "both protected and given a retention: pre-key" in result["msg"]


def test_a_key_the_application_updates_after_the_plan_is_not_deleted(db, db_params, tmp_path):
    seed(db, companies=("acme",))
    conn = connect(db_params)
    try:
        job = Cleanup(conn, {"retention": {"session": 30}, "protected_types": [], "batch_size": 1})
        job.prepare()
        plan = job.plan()
        assert plan["keys"] == 2
        with db.cursor() as cur:
            cur.execute(APP_UPSERT % "('acme', 'session', 'session.5', '{\"fresh\": 1}', now() + interval '7 days')")
        db.commit()
        total, deleted, archive, _ = job.delete(str(tmp_path / "a"), plan["keys"], {"kind": "test"})
    finally:
        conn.close()
    assert total == 1 and deleted == {"acme": {"session": 1}}
    assert rows(db, "key_id = 'session.5'")[0][3] == '{"fresh": 1}'


def test_a_row_locked_by_the_application_is_skipped_not_waited_for(db, db_params, tmp_path):
    seed(db, companies=("acme",))
    app = connect(db_params)
    try:
        with app.cursor() as cur:  # an open application transaction holding one candidate row
            cur.execute("UPDATE whatsapp_keys SET value = value WHERE company_id = 'acme' AND key_id = 'session.4'")
        started = time.monotonic()
        ok, result = cleanup(db_params, tmp_path, retention={"session": 30})
        assert ok and time.monotonic() - started < 5
        assert result["keys_deleted"] == 1 and result["skipped"] == 1
    finally:
        app.rollback()
        app.close()


def test_a_concurrent_application_writer_never_waits_a_second(db, db_params, tmp_path):
    """The application's batched upserts run against the keys being deleted; their worst wait stays under 1 s."""
    companies = ["c%02d" % i for i in range(10)]
    with db.cursor() as cur:
        for company in companies:
            cur.execute("INSERT INTO whatsapp_auth (company_id, creds) VALUES (%s, '{}')", (company,))
        cur.execute(
            "INSERT INTO whatsapp_keys (company_id, key_type, key_id, value, updated_at, expires_at) "
            "SELECT c, 'session', 's' || n, jsonb_build_object('pad', repeat('x', 300), 'n', n), now() - interval '60 days', now() "
            "FROM unnest(%s::text[]) c, generate_series(1, 2000) n", (companies,))
        cur.execute(
            "INSERT INTO whatsapp_keys (company_id, key_type, key_id, value) "
            "SELECT c, 'pre-key', n::text, '{}' FROM unnest(%s::text[]) c, generate_series(1, 2000) n", (companies,))
    db.commit()
    stop = threading.Event()
    waits, written = [], {}
    errors = []

    def writer():
        conn = connect(db_params)
        rng = random.Random(5)
        try:
            serial = 0
            while not stop.is_set():
                serial += 1
                keys = {(rng.choice(companies), "s%d" % rng.randrange(1, 2001)) for _ in range(50)}
                values = ",".join(conn.cursor().mogrify("(%s, 'session', %s, %s, now() + interval '7 days')",
                                                        (c, k, json.dumps({"w": serial}))).decode() for c, k in sorted(keys))
                started = time.monotonic()
                with conn.cursor() as cur:
                    cur.execute(APP_UPSERT % values)
                conn.commit()
                waits.append(time.monotonic() - started)
                for key in keys:
                    written[key] = serial
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)
        finally:
            conn.close()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.3)
        ok, result = cleanup(db_params, tmp_path, max_delete=100000, batch_size=2000)
    finally:
        stop.set()
        thread.join()
    assert ok, result
    assert not errors
    assert result["keys_deleted"] > 10000 and len(waits) > 20
    assert max(waits) < 1.0, "worst upsert wait %.3f s" % max(waits)
    # Every key the application wrote is there with its last value: cleanup lost no write.
    with db.cursor() as cur:
        cur.execute("SELECT company_id, key_id, (value->>'w')::int FROM whatsapp_keys WHERE key_type = 'session' AND value ? 'w'")
        present = {(c, k): w for c, k, w in cur.fetchall()}
    db.commit()
    assert {k: present.get(k) for k in written} == written
    # And the archive holds exactly the rows deleted.
    assert result["archive"]["rows"] == result["keys_deleted"]


def test_sql_buckets_agree_with_bucket_of_at_the_boundaries(db, db_params):
    ages = [0, 0.999, 1, 1.001, 6.999, 7, 13.5, 14, 29.999, 30, 30.001, 400, -1]
    with db.cursor() as cur:
        for n, age in enumerate(ages):
            add_key(cur, "acme", "session", "b%d" % n, age)
    db.commit()
    conn = connect(db_params)
    try:
        job = Cleanup(conn, {"retention": {}, "protected_types": []})
        job.prepare()
        job.run_at = NOW  # the ages above are counted from NOW
        stats = job.key_stats()
    finally:
        conn.close()
    expected = dict.fromkeys(stats["buckets"], 0)
    for age in ages:
        expected[bucket_of(age)] += 1
    assert stats["buckets"] == expected
    assert expected["0-1d"] == 3 and expected["30d+"] == 3


def test_round_trip_of_generated_state_gives_back_every_row(db, db_params, tmp_path):
    """The generator's values (both Buffer forms, unicode, big numbers, every key type) survive delete then restore."""
    from ansible.module_utils import baileys_dr_testdata as testdata

    testdata.load(db, "cleanup-round-trip", 3, 300)
    original = rows(db)
    ok, deleted = cleanup(db_params, tmp_path, max_delete_share=0.9)
    assert ok and deleted["keys_deleted"] > 100
    ok, restored = run_module(baileys_keys_cleanup, dict(db_params, mode="restore", archive=deleted["archive"]["path"]))
    assert ok and restored["inserted"] == deleted["keys_deleted"]
    assert rows(db) == original


def test_a_run_that_stops_half_way_says_where_the_archive_of_what_it_deleted_is(db, db_params, tmp_path, monkeypatch):
    seed(db)
    original = rows(db)
    monkeypatch.setenv("BAILEYS_DR_TEST_FAIL_AT", "cleanup_after_batch:2")
    ok, result = cleanup(db_params, tmp_path, batch_size=3)
    assert not ok and "stopped after deleting 6 keys, all archived in " in result["msg"]
    monkeypatch.delenv("BAILEYS_DR_TEST_FAIL_AT")
    assert len(rows(db)) == len(original) - 6
    archive = result["msg"].split("archived in ")[1].split(" (it verifies")[0]
    ok, restored = run_module(baileys_keys_cleanup, dict(db_params, mode="restore", archive=archive))
    assert ok and restored["inserted"] == 6
    assert rows(db) == original
