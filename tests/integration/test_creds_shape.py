"""Creds of a shape Baileys cannot start on (issue 17, Baileys version awareness): the export, the standby refresh and
the import refuse the company by name and name the fields (never values), instead of writing creds the reader would
fail on; Baileys' own initAuthCreds() passes in both Buffer forms."""

from __future__ import annotations

import copy
import json
import os

import pytest
from test_identity_guard import app_root, db_creds, export, failback, fresh, manifest, overwrite_db_creds, rows, seed  # noqa: F401

from ansible.module_utils import baileys_dr_codec as codec
from ansible.module_utils.baileys_dr_identity import creds_identity


def without_signed_identity_key(creds):
    broken = copy.deepcopy(creds)
    del broken["signedIdentityKey"]
    return broken


def with_text_noise_public(creds):
    broken = copy.deepcopy(creds)
    broken["noiseKey"]["public"] = "not-a-buffer-value"
    return broken


# (how the creds are broken, the field the refusal names)
BROKEN = [(without_signed_identity_key, "signedIdentityKey is missing"),
          (with_text_noise_public, "noiseKey.public is not a Buffer"),
          (lambda creds: ["a", "list"], "the creds are not a JSON object")]


def assert_names_no_value(msg, creds):
    for field in ("noiseKey", "pairingEphemeralKeyPair"):
        raw = codec.buffer_bytes(creds[field]["private"])
        assert codec.to_base64_form(creds[field]["private"])["data"] not in msg and json.dumps(list(raw))[1:-1] not in msg
    assert creds["advSecretKey"] not in msg and "not-a-buffer-value" not in msg


def test_real_initauthcreds_have_no_problems_in_either_buffer_form(fresh):
    creds = fresh[0]  # JSON.stringify's form: {"type": "Buffer", "data": [bytes]}, as the application stores them
    assert creds["noiseKey"]["public"]["data"][0] is not None
    assert codec.creds_shape_problems(creds) == []
    assert codec.creds_shape_problems(codec.to_base64_form(creds)) == []  # BufferJSON.replacer's, as files hold them
    assert codec.creds_shape_problems(without_signed_identity_key(creds)) == ["signedIdentityKey is missing"]


@pytest.mark.parametrize("breaks, named", BROKEN, ids=["no-signedIdentityKey", "public-not-a-buffer", "not-an-object"])
def test_the_export_refuses_creds_baileys_cannot_start_on_naming_the_company_and_field(db, db_params, app_root, breaks, named):
    seed(db)
    good = db_creds(db, "bravo")
    overwrite_db_creds(db, "bravo", breaks(good))
    sessions = app_root / "baileys_sessions"
    ok, result = export(db_params, sessions)
    assert not ok
    assert "company bravo, creds: " in result["msg"] and named in result["msg"] and "company acme" not in result["msg"]
    assert_names_no_value(result["msg"], good)
    assert sorted(os.listdir(app_root)) == ["node_modules"]  # nothing written, no staging left


def test_the_standby_refresh_refuses_creds_baileys_cannot_start_on_and_leaves_the_company_as_it_was(db, db_params, app_root):
    seed(db)
    standby = app_root / "baileys_sessions.standby"
    ok, result = export(db_params, standby, mode="standby")
    assert ok, result.get("msg")
    before = manifest(standby), (standby / "company_acme" / "creds.json").read_bytes()
    good = db_creds(db, "acme")
    for breaks, named in BROKEN[1:]:  # a missing signedIdentityKey is another identity: the identity guard refuses it
        overwrite_db_creds(db, "acme", breaks(good))
        ok, result = export(db_params, standby, mode="standby")
        assert not ok
        assert "company acme, creds: " in result["msg"] and named in result["msg"]
        assert_names_no_value(result["msg"], good)
        assert (manifest(standby), (standby / "company_acme" / "creds.json").read_bytes()) == before


@pytest.mark.parametrize("breaks, named", BROKEN, ids=["no-signedIdentityKey", "public-not-a-buffer", "not-an-object"])
def test_the_import_refuses_a_creds_json_baileys_cannot_start_on_naming_the_company_and_field(db, db_params, app_root, failback,
                                                                                              breaks, named):
    seed(db)
    sessions = app_root / "baileys_sessions"
    assert export(db_params, sessions)[0]
    path = sessions / "company_acme" / "creds.json"
    good = json.loads(path.read_bytes())
    path.write_text(json.dumps(breaks(good), separators=(",", ":")))
    before = rows(db)
    for check_mode in (True, False):
        ok, result = failback(check_mode=check_mode)
        assert not ok
        assert "acme" in result["msg"] and named in result["msg"] and "bravo" not in result["msg"]
        assert_names_no_value(result["msg"], good)
        assert rows(db) == before


def test_real_initauthcreds_are_exported_and_imported_in_both_buffer_forms(db, db_params, app_root, fresh, failback):
    seed(db)
    array_form, base64_form = fresh[0], codec.to_base64_form(fresh[1])
    with db.cursor() as cur:
        for company_id, creds in (("fresh-array", array_form), ("fresh-base64", base64_form)):
            cur.execute("INSERT INTO whatsapp_auth (company_id, creds) VALUES (%s, %s)", (company_id, json.dumps(creds)))
    db.commit()
    sessions = app_root / "baileys_sessions"
    ok, result = export(db_params, sessions)
    assert ok, result.get("msg")
    for company_id, creds in (("fresh-array", array_form), ("fresh-base64", base64_form)):
        written = json.loads((sessions / ("company_" + company_id) / "creds.json").read_bytes())
        assert creds_identity(written) == creds_identity(creds)
    # Files in either form (Baileys before 7.0.0-rc.4 also wrote byte arrays) are imported.
    (sessions / "company_fresh-array" / "creds.json").write_text(json.dumps(fresh[1]))
    (sessions / "company_fresh-base64" / "creds.json").write_text(json.dumps(codec.to_base64_form(fresh[0])))
    ok, result = failback()
    assert ok, result.get("msg")
    assert creds_identity(db_creds(db, "fresh-array")) == creds_identity(fresh[1])
    assert creds_identity(db_creds(db, "fresh-base64")) == creds_identity(fresh[0])
