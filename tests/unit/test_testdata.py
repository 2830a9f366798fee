"""The deterministic data generator (module_utils/baileys_dr_testdata.py)."""

from __future__ import annotations

import datetime
import json

from ansible.module_utils import baileys_dr_codec as codec
from ansible.module_utils import baileys_dr_testdata as testdata

NOW = datetime.datetime(2026, 11, 1, tzinfo=datetime.timezone.utc)


def rows(seed="s", index=1, keys=150):
    gen = testdata.CompanyGenerator(seed, index, keys=keys, now=NOW)
    return gen.creds(), list(gen.key_rows())


def test_same_seed_gives_the_same_state_and_another_seed_does_not():
    assert json.dumps(rows("s"), default=str) == json.dumps(rows("s"), default=str)
    assert json.dumps(rows("s"), default=str) != json.dumps(rows("t"), default=str)


def test_creds_and_keys_can_be_generated_in_either_order():
    gen = testdata.CompanyGenerator("s", 1, keys=50, now=NOW)
    keys_first = list(gen.key_rows())
    creds_after = gen.creds()
    gen2 = testdata.CompanyGenerator("s", 1, keys=50, now=NOW)
    assert gen2.creds() == creds_after
    assert list(gen2.key_rows()) == keys_first


def test_every_key_type_and_exact_count():
    _, keys = rows(keys=150)
    assert len(keys) == 150
    assert {k[0] for k in keys} == set(codec.KEY_TYPES)
    assert len({(k[0], k[1]) for k in keys}) == 150


def test_ids_have_the_awkward_shapes_of_real_data():
    ids = [k[1] for k in rows(keys=1500)[1]]
    assert any("::" in i for i in ids)
    assert any("/" in i for i in ids)
    assert any("@" in i for i in ids)
    assert any(i.endswith("_reverse") for i in ids)
    assert any(i.isdigit() for i in ids)


def test_file_names_of_generated_keys_never_collide():
    for index in range(1, 6):
        _, keys = rows(index=index, keys=1500)
        names = {codec.key_file_name(t, i) for t, i, *_ in keys}
        assert len(names) == len(keys)


def test_both_buffer_encodings_are_mixed():
    creds, keys = rows(keys=300)
    text = json.dumps([creds] + [k[2] for k in keys])
    assert '"data": [' in text
    assert '"data": "' in text


def test_creds_have_init_auth_creds_field_types():
    creds, _ = rows()
    for pair in ("noiseKey", "pairingEphemeralKeyPair", "signedIdentityKey"):
        assert len(codec.buffer_bytes(creds[pair]["private"])) == 32
        assert len(codec.buffer_bytes(creds[pair]["public"])) == 32
    assert len(codec.buffer_bytes(creds["signedPreKey"]["signature"])) == 64
    assert isinstance(creds["registrationId"], int)
    assert isinstance(creds["advSecretKey"], str) and len(codec.decode_base64(creds["advSecretKey"])) == 32


def test_ages_spread_over_ninety_days_and_expiry_follows_the_application_policy():
    _, keys = rows(keys=1500)
    ages = [(NOW - k[4]).days for k in keys]
    assert min(ages) == 0 and max(ages) >= 80
    for key_type, _, _, _, updated, expires in keys:
        assert (expires - updated).days == (7 if key_type in ("pre-key", "session", "sender-key", "lid-mapping") else 14)


def test_company_ids_match_the_application_rule():
    assert codec.COMPANY_ID_RE.match(testdata.company_id("company", 1))
