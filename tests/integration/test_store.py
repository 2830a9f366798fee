"""The test bed's store against a real throwaway PostgreSQL cluster."""

from __future__ import annotations

import time

import baileys_state_digest
import baileys_testdata
from module_harness import run_module

from ansible.module_utils import baileys_dr_codec as codec
from ansible.module_utils import baileys_dr_testdata as testdata


def test_schema_has_the_applications_keys_indexes_and_trigger(db):
    with db.cursor() as cur:
        cur.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'whatsapp_keys' ORDER BY 1")
        indexes = [r[0] for r in cur.fetchall()]
        cur.execute("SELECT pg_get_indexdef('whatsapp_keys_pkey'::regclass)")
        pkey = cur.fetchone()[0]
        cur.execute("INSERT INTO whatsapp_auth (company_id, creds) VALUES ('c1', '{}') RETURNING updated_at")
        inserted = cur.fetchone()[0]
    db.commit()
    time.sleep(0.01)
    with db.cursor() as cur:
        cur.execute("UPDATE whatsapp_auth SET creds = '{\"a\":1}' WHERE company_id = 'c1' RETURNING updated_at")
        updated = cur.fetchone()[0]
    db.commit()
    assert "(company_id, key_type, key_id)" in pkey
    assert len(indexes) == 5
    assert updated > inserted


def test_seeding_loads_every_key_and_is_idempotent(db, db_params):
    args = dict(db_params, companies=4, keys_per_company=120)
    ok, first = run_module(baileys_testdata, args)
    assert ok and first["changed"] and first["keys"] == 480
    ok, second = run_module(baileys_testdata, args)
    assert ok and not second["changed"]
    with db.cursor() as cur:
        cur.execute("SELECT count(*), count(DISTINCT key_type) FROM whatsapp_keys")
        assert cur.fetchone() == (480, len(codec.KEY_TYPES))


def test_check_mode_seeding_writes_nothing(db, db_params):
    ok, result = run_module(baileys_testdata, dict(db_params, companies=2), check_mode=True)
    assert ok and result["changed"]
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM whatsapp_auth")
        assert cur.fetchone()[0] == 0


def test_database_digest_equals_the_digest_of_the_generated_state(db, db_params):
    """Both Buffer encodings survive JSONB and normalise to the generator's digest."""
    ok, _ = run_module(baileys_testdata, dict(db_params, companies=3, keys_per_company=200, seed="vectors"))
    assert ok
    ok, result = run_module(baileys_state_digest, db_params)
    assert ok, result
    assert result["total_keys"] == 600
    for gen in testdata.generate("vectors", 3, 200):
        expected = codec.state_digest(gen.creds(), [(t, i, v) for t, i, v, *_ in gen.key_rows()])
        assert result["digests"][gen.company_id] == expected


def test_digest_comparison_names_every_company_that_differs(db, db_params):
    run_module(baileys_testdata, dict(db_params, companies=2, keys_per_company=20))
    ok, actual = run_module(baileys_state_digest, db_params)
    expected = dict(actual["digests"], company00002="0" * 64, company00009="f" * 64)
    ok, result = run_module(baileys_state_digest, dict(db_params, expected=expected))
    assert not ok
    assert result["mismatches"] == ["company00002", "company00009"]
    assert "company00002" in result["msg"]


def test_a_deleted_key_changes_the_database_digest(db, db_params):
    run_module(baileys_testdata, dict(db_params, companies=1, keys_per_company=30))
    _, before = run_module(baileys_state_digest, db_params)
    with db.cursor() as cur:
        cur.execute("DELETE FROM whatsapp_keys WHERE ctid = (SELECT ctid FROM whatsapp_keys WHERE key_type = 'pre-key' LIMIT 1)")
    db.commit()
    _, after = run_module(baileys_state_digest, db_params)
    assert after["digests"]["company00001"] != before["digests"]["company00001"]
    assert after["keys"]["company00001"] == 29


def test_wrong_password_error_names_the_target_but_not_the_password(db_params):
    params = dict(db_params, login_password="S3cret-wrong-pw")
    ok, result = run_module(baileys_state_digest, params)
    assert not ok
    assert "127.0.0.1:%d/baileys" % db_params["login_port"] in result["msg"]
    assert "S3cret-wrong-pw" not in result["msg"]


def test_company_prefix_that_would_give_hostile_ids_is_refused(db_params):
    ok, result = run_module(baileys_testdata, dict(db_params, company_prefix="../x"))
    assert not ok and "company_prefix" in result["msg"]


def test_absent_removes_only_generated_companies(db, db_params):
    with db.cursor() as cur:
        cur.execute("INSERT INTO whatsapp_auth (company_id, creds) VALUES ('other', '{}')")
    db.commit()
    run_module(baileys_testdata, dict(db_params, companies=2, keys_per_company=10))
    ok, result = run_module(baileys_testdata, dict(db_params, companies=2, state="absent"))
    assert ok and result["changed"]
    with db.cursor() as cur:
        cur.execute("SELECT company_id FROM whatsapp_auth")
        assert cur.fetchall() == [("other",)]
