"""module_utils/baileys_dr_identity.py without services: identities of creds in either Buffer form, the replacement rule,
the refusal's words, the credentials cache's shapes and checks, the Baileys version."""

from __future__ import annotations

import base64
import hashlib
import json
import os

import pytest

from ansible.module_utils import baileys_dr_identity as identity
from ansible.module_utils.baileys_dr_codec import to_base64_form

PUBLIC = bytes(range(1, 33))
PRIVATE = bytes(range(100, 132))


def creds(registration_id=4711, me="4915550000:3@s.whatsapp.net", public=PUBLIC):
    value = {"registrationId": registration_id, "advSecretKey": base64.b64encode(b"secret-adv-key").decode(),
             "signedIdentityKey": {"private": {"type": "Buffer", "data": list(PRIVATE)}, "public": {"type": "Buffer", "data": list(public)}}}
    if me:
        value["me"] = {"id": me, "name": "Acme"}
    return value


def test_an_identity_is_the_registration_id_the_account_and_the_public_keys_hash_in_either_buffer_form():
    expected = {"registrationId": 4711, "me": "4915550000:3@s.whatsapp.net", "identity_key_sha256": hashlib.sha256(PUBLIC).hexdigest()}
    assert identity.creds_identity(creds()) == expected
    assert identity.creds_identity(to_base64_form(creds())) == expected  # as useMultiFileAuthState writes it


@pytest.mark.parametrize("value", [None, [], "text", {"registrationId": True, "me": "not an object", "signedIdentityKey": 5}])
def test_odd_creds_have_an_empty_identity(value):
    assert identity.creds_identity(value) == {"registrationId": None, "me": None, "identity_key_sha256": None}


def test_the_replacement_rule():
    registered, fresh = identity.creds_identity(creds()), identity.creds_identity(creds(99, None, bytes(32)))
    other = identity.creds_identity(creds(5, "4917600000:1@s.whatsapp.net", bytes(range(50, 82))))
    assert identity.change(registered, registered) is None
    assert identity.change(registered, fresh) == "unregistered"
    assert identity.change(registered, other) == "other"
    assert identity.change(registered, identity.creds_identity(creds(public=bytes(32)))) == "other"  # same id, other key
    assert identity.change(fresh, registered) is None  # pairing completed: nothing registered was lost
    assert identity.change(registered, identity.creds_identity({})) is None  # no creds at all: the value checks name it
    assert identity.change(None, fresh) is None and identity.change(registered, None) is None


def test_the_refusal_names_company_and_both_identities_and_no_secret():
    old, new = {"acme": identity.creds_identity(creds())}, {"acme": identity.creds_identity(creds(99, None, bytes(32)))}
    with pytest.raises(identity.IdentityRefused) as refused:
        identity.guard(old, new, [], "the copy /x", "the database", "refresh the standby copy /x")
    msg = str(refused.value)
    assert msg.startswith("refusing to refresh the standby copy /x: 1 company would lose its identity")
    assert "company acme: registered credentials would be replaced by unregistered ones" in msg
    assert "registrationId 4711, me 4915550000:3@s.whatsapp.net, identity key sha256 %s..." % hashlib.sha256(PUBLIC).hexdigest()[:12] in msg
    assert "registrationId 99, me none (unregistered)" in msg and "identity_force_companies=[acme]" in msg
    for secret in (PRIVATE.hex(), base64.b64encode(PRIVATE).decode(), base64.b64encode(b"secret-adv-key").decode(), hashlib.sha256(PUBLIC).hexdigest()):
        assert secret not in msg


def test_forcing_is_per_company_and_invalid_ids_are_refused_by_name():
    old = {c: identity.creds_identity(creds()) for c in ("a", "b")}
    new = {c: identity.creds_identity(creds(99, None, bytes(32))) for c in ("a", "b")}
    with pytest.raises(identity.IdentityRefused) as refused:
        identity.guard(old, new, ["a"], "x", "y", "copy")
    assert "company b:" in str(refused.value) and "company a:" not in str(refused.value)
    assert identity.guard(old, new, ["a", "b"], "x", "y", "copy")["forced"] == ["a", "b"]
    with pytest.raises(identity.IdentityRefused, match=r"invalid company id '\.\./x'"):
        identity.guard(old, new, ["../x"], "x", "y", "copy")


def test_the_import_check_of_one_company():
    database = json.dumps(creds())
    assert identity.import_refusal("acme", database, to_base64_form(creds()), []) is None
    assert "company acme" in identity.import_refusal("acme", database, creds(99, None), [])
    assert identity.import_refusal("acme", database, creds(99, None), ["acme"]) is None


@pytest.mark.parametrize("document", [
    {"acme": {"creds": "C", "keys": {"_isCached": True}, "timestamp": 1}},
    {"version": 1, "data": {"acme": {"creds": "C"}}},
    [["acme", {"creds": "C"}]],
])
def test_the_cache_file_shapes_the_service_may_write(document):
    document = json.loads(json.dumps(document).replace('"C"', json.dumps(creds())))
    assert identity.cache_companies(document) == {"acme": creds()}


def test_a_cache_entry_under_a_hostile_company_id_is_left_out():
    assert identity.cache_companies({"../x": {"creds": {}}, "ok": {"creds": {}}, "bad": "x"}) == {"ok": {}}


def test_the_cache_inspection_reads_identities_only(tmp_path):
    path = tmp_path / identity.CACHE_FILE
    path.write_text(json.dumps({"acme": {"creds": creds()}, "bravo": {"creds": creds(7)}}))
    os.chmod(path, 0o640)
    store = {"acme": identity.creds_identity(creds()), "bravo": identity.creds_identity(creds())}
    seen = identity.inspect_cache(str(tmp_path), store, now=os.stat(path).st_mtime + 30)
    assert seen["present"] and seen["mode"] == "0640" and seen["mode_ok"] is False and seen["age_seconds"] == 30
    assert seen["differ"] == ["bravo"] and seen["companies"]["acme"]["equal"]
    assert "secret-adv-key" not in json.dumps(seen) and str(list(PRIVATE))[1:-1] not in json.dumps(seen)
    name, value, status, message = identity.cache_check(seen)
    assert (name, value, status) == ("credentials_cache", 1, "warning") and "not 0600" in message and "bravo" in message
    path.write_text("{truncated")
    assert identity.inspect_cache(str(tmp_path), store)["error"].startswith("cannot be read")
    assert identity.inspect_cache(str(tmp_path / "none"), store)["present"] is False


def test_a_symbolic_link_as_cache_is_not_followed(tmp_path):
    (tmp_path / "elsewhere").write_text("{}")
    os.symlink(tmp_path / "elsewhere", tmp_path / identity.CACHE_FILE)
    assert "cannot be read" in identity.inspect_cache(str(tmp_path), {})["error"]


def test_the_baileys_version_from_node_modules_else_the_package_lock(tmp_path):
    assert identity.baileys_version(str(tmp_path)) is None
    (tmp_path / "package-lock.json").write_text(json.dumps({"packages": {"node_modules/@whiskeysockets/baileys": {"version": "6.7.18"}}}))
    assert identity.baileys_version(str(tmp_path)) == {"package": "@whiskeysockets/baileys", "version": "6.7.18", "source": "package-lock.json"}
    (tmp_path / "node_modules" / "baileys").mkdir(parents=True)
    (tmp_path / "node_modules" / "baileys" / "package.json").write_text(json.dumps({"name": "baileys", "version": "7.0.0-rc14"}))
    assert identity.baileys_version(str(tmp_path))["version"] == "7.0.0-rc14"


@pytest.mark.parametrize("version, unknown", [
    ("6.7.18", ["device-list", "identity-key", "lid-mapping", "tctoken"]),
    ("7.0.0-rc.4", ["device-list", "identity-key", "tctoken"]),
    ("7.0.0-rc9", ["identity-key"]),
    ("7.0.0-rc14", []),
    ("7.0.0", []),
    ("not a version", []),
])
def test_key_types_each_baileys_version_does_not_know(version, unknown):
    assert identity.types_unknown_to(version) == unknown
