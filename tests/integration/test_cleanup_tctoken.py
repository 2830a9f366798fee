"""Cleanup follows Baileys' own tctoken rules, with values made by the real Baileys of the test application.

src/Utils/tc-token-utils.ts: TC_TOKEN_INDEX_KEY ('__index', a sentinel row, never deleted), isTcTokenExpired (4 buckets
of 7 days), storeTcTokensFromIqResult (how a received token is stored) and buildMergedTcTokenIndexWrite (the sentinel's
value); src/Socket/messages-recv.ts pruneExpiredTcTokens (which rows Baileys itself deletes).
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import time

import pytest

from faults_helpers import wait_until
from test_app_digest import node_modules  # noqa: F401
from test_cleanup import DAY, NOW, add_key, cleanup, rows

from ansible.module_utils.baileys_dr_codec import TC_TOKEN_BUCKET_SECONDS, TC_TOKEN_INDEX_KEY, tctoken_cutoff, tctoken_prunable_sql

# Stores tokens through Baileys' own code paths into an in-memory key store, then prints each stored value as the
# application writes it (plain JSON.stringify) with Baileys' verdict on it.
BAILEYS_SCRIPT = r"""
const [utils, specs] = [await import(process.argv[1]), JSON.parse(process.argv[2])];
const store = {};
const keys = {
  get: async (type, ids) => Object.fromEntries(ids.filter(id => store[id] !== undefined).map(id => [id, store[id]])),
  set: async data => { for (const [id, value] of Object.entries(data.tctoken || {})) store[id] = value; },
};
const out = [];
for (const spec of specs) {
  if (spec.t !== undefined) {  // a token received in an IQ result or notification
    const result = {tag: 'iq', attrs: {}, content: [{tag: 'tokens', attrs: {}, content: [
      {tag: 'token', attrs: {type: 'trusted_contact', t: spec.t}, content: Uint8Array.from([7, 1, 200, 3])}]}]};
    await utils.storeTcTokensFromIqResult({result, fallbackJid: spec.jid, keys, getLIDForPN: async () => null});
  }
  if (spec.sender !== undefined) {  // messages-send.ts: what it keeps after issuing our own token
    store[spec.jid] = {...(store[spec.jid] || {token: Buffer.alloc(0)}), senderTimestamp: spec.sender};
  }
  const entry = store[spec.jid];
  const keepToken = !!entry.token?.length && !utils.isTcTokenExpired(entry.timestamp);
  const keepSender = entry.senderTimestamp !== undefined && !utils.isTcTokenExpired(entry.senderTimestamp);
  out.push({jid: spec.jid, value: JSON.stringify(entry), baileys_prunes: !keepToken && !keepSender});
}
const index = await utils.buildMergedTcTokenIndexWrite(keys, specs.map(s => s.jid));
out.push({jid: utils.TC_TOKEN_INDEX_KEY, value: JSON.stringify(index[utils.TC_TOKEN_INDEX_KEY]), baileys_prunes: null});
const forms = JSON.parse(process.argv[3]).map(ts => utils.isTcTokenExpired(ts));
console.log(JSON.stringify({values: out, forms, now: Math.floor(Date.now() / 1000)}));
"""


def baileys(node_modules, specs, forms=()):  # noqa: F811
    module = os.path.join(node_modules, "baileys", "lib", "Utils", "tc-token-utils.js")
    done = subprocess.run(["node", "--input-type=module", "-e", BAILEYS_SCRIPT, module, json.dumps(specs), json.dumps(list(forms))],
                          capture_output=True, text=True, timeout=60, check=True)
    return json.loads(done.stdout)


@pytest.fixture
def away_from_a_bucket_edge():
    """Node's clock and the database's must see the same 7-day bucket: not within a minute of an edge.

    Near an edge (two minutes a week) the test waits until past it rather than skipping: a skip fails under CI=true."""
    def away():
        into = time.time() % TC_TOKEN_BUCKET_SECONDS
        return 60 <= into <= TC_TOKEN_BUCKET_SECONDS - 60

    wait_until(away, timeout=150, what="the clock a minute past a tctoken bucket edge")


def ago(days):
    return str(int((NOW - DAY * days).timestamp()))


# jid -> (what Baileys stored, days since updated_at)
CASES = {
    "101@lid": ({"t": ago(1)}, 90),  # valid token in a row untouched for 90 days: kept
    "102@lid": ({"t": ago(40)}, 0),  # expired token in a row written just now: deleted
    "103@lid": ({"t": ago(19)}, 45),  # valid (the window is 21 to 28 days)
    "104@lid": ({"t": ago(29)}, 2),  # expired whatever the bucket
    "105@lid": ({"t": ago(40), "sender": int(ago(2))}, 60),  # peer token expired, our sender timestamp valid: Baileys keeps it
    "106@lid": ({"sender": int(ago(40))}, 3),  # only an expired sender timestamp: deleted
    "107@lid": ({"sender": int(ago(5))}, 80),  # only a valid sender timestamp: kept
}


@pytest.fixture
def seeded(db, node_modules, away_from_a_bucket_edge):  # noqa: F811
    made = baileys(node_modules, [dict(spec, jid=jid) for jid, (spec, _) in CASES.items()])
    with db.cursor() as cur:
        cur.execute("INSERT INTO whatsapp_auth (company_id, creds) VALUES ('acme', '{}'), ('solo', '{}')")
        for item in made["values"]:
            age = CASES[item["jid"]][1] if item["jid"] in CASES else 400
            add_key(cur, "acme", "tctoken", item["jid"], age, value=json.loads(item["value"]), expires_in_days=-300)
            if item["jid"] == TC_TOKEN_INDEX_KEY:
                # A company whose only tctoken row is a fresh sentinel.
                add_key(cur, "solo", "tctoken", item["jid"], 0, value=json.loads(item["value"]))
        for n in range(20):  # keeps the share cap out of the way
            add_key(cur, "acme", "identity-key", "i%d" % n, 1)
    db.commit()
    return {item["jid"]: item["baileys_prunes"] for item in made["values"]}


def tctoken_ids(db, company="acme"):
    return [r[2] for r in rows(db, "key_type = 'tctoken' AND company_id = '%s'" % company)]


def sentinel_rows(db):
    return rows(db, "key_type = 'tctoken' AND key_id = '%s'" % TC_TOKEN_INDEX_KEY)


def test_baileys_values_are_what_the_cases_say(seeded):
    """The verdicts come from Baileys itself; the cases below rely on them."""
    assert {jid for jid, prunes in seeded.items() if prunes} == {"102@lid", "104@lid", "106@lid"}


def test_check_mode_plans_expired_tokens_by_baileys_rule_and_never_the_index(db, db_params, tmp_path, seeded):
    ok, result = cleanup(db_params, tmp_path, check_mode=True, delete_expired=True, retention={"tctoken": 1})
    assert ok, result
    assert result["plan"]["by_company"] == {"acme": {"tctoken": 3}}
    assert result["plan"]["rules"] == {"acme": {"tctoken": {"tctoken-expired": 3}}}
    assert result["plan"]["by_rule"] == {"tctoken-expired": 3}
    assert result["plan"]["buckets"]["0-1d"] == 1 and result["plan"]["buckets"]["1-7d"] == 2


def test_delete_takes_expired_tokens_whatever_their_age_and_keeps_valid_ones_and_the_index(db, db_params, tmp_path, seeded):
    index_before = sentinel_rows(db)
    ok, result = cleanup(db_params, tmp_path, retention={"tctoken": 1}, delete_expired=True, expired_grace_days=0)
    assert ok, result
    assert result["deleted"] == {"acme": {"tctoken": 3}}
    assert tctoken_ids(db) == sorted([TC_TOKEN_INDEX_KEY] + [jid for jid, prunes in seeded.items() if prunes is False])
    assert sentinel_rows(db) == index_before and len(index_before) == 2
    # What Baileys still considers valid survives a second run too; nothing else is left to take.
    ok, again = cleanup(db_params, tmp_path, retention={"tctoken": 1})
    assert ok and again["keys_deleted"] == 0


def test_restore_gives_back_the_tokens_and_leaves_the_index_as_it_is(db, db_params, tmp_path, seeded):
    before = rows(db)
    ok, result = cleanup(db_params, tmp_path)
    assert ok and result["keys_deleted"] == 3
    # The application rewrites its index meanwhile: the restore must not put an older one back.
    with db.cursor() as cur:
        cur.execute("UPDATE whatsapp_keys SET value = %s WHERE key_type = 'tctoken' AND key_id = %s",
                    (json.dumps({"token": {"type": "Buffer", "data": list(b'["101@lid"]')}}), TC_TOKEN_INDEX_KEY))
    db.commit()
    index_now = sentinel_rows(db)
    for check_mode in (True, False):
        ok, restored = cleanup(db_params, tmp_path, mode="restore", archive=result["archive"]["path"], check_mode=check_mode)
        assert ok and restored["inserted"] == 3, restored
    assert sentinel_rows(db) == index_now
    assert [r for r in rows(db) if r[2] != TC_TOKEN_INDEX_KEY] == [r for r in before if r[2] != TC_TOKEN_INDEX_KEY]


def test_the_index_survives_at_any_age_in_every_mode_even_when_everything_else_goes(db, db_params, tmp_path, seeded):
    with db.cursor() as cur:
        cur.execute("UPDATE whatsapp_keys SET updated_at = now() - interval '3650 days', expires_at = now() - interval '3000 days' "
                    "WHERE key_id = %s", (TC_TOKEN_INDEX_KEY,))
    db.commit()
    index_before = sentinel_rows(db)
    ok, plan = cleanup(db_params, tmp_path, check_mode=True, retention={"tctoken": 1}, delete_expired=True, max_delete_share=1)
    assert ok and plan["plan"]["company_keys"].get("solo") is None  # the sentinel-only company has no candidate
    ok, result = cleanup(db_params, tmp_path, retention={"tctoken": 1}, delete_expired=True, max_delete_share=1)
    assert ok and sentinel_rows(db) == index_before
    assert tctoken_ids(db, "solo") == [TC_TOKEN_INDEX_KEY]


# Timestamp forms Baileys may meet, as a value's "timestamp" (stored string t, or a number), next to a non-empty token.
FORMS = [None, "", "abc", "Infinity", "0", "-5", "+{now}", " {now}", "{now}abc", "{now}.9", "{cut}", "{cut_1}", "{now}", 0, -1,
         "{cut}e0", 1.5, True, False, {"n": 1}]


def test_the_sql_rule_agrees_with_baileys_is_tc_token_expired_on_every_form(db, node_modules, away_from_a_bucket_edge):  # noqa: F811
    now = int(time.time())
    cut = tctoken_cutoff(now)
    fill = {"now": now, "cut": cut, "cut_1": cut - 1}
    forms = [f.format(**fill) if isinstance(f, str) else f for f in FORMS]
    forms += [now, cut, cut - 1, cut - 0.5, [str(now)]]  # JavaScript compares ["<now>"] as <now>: valid
    expired = baileys(node_modules, [], forms)["forms"]
    with db.cursor() as cur:
        for form, baileys_expired in zip(forms, expired):
            value = {"token": {"type": "Buffer", "data": [1]}, "timestamp": form}
            cur.execute("SELECT %s FROM (SELECT %%(v)s::jsonb AS value) k" % tctoken_prunable_sql(), {"v": json.dumps(value), "tc_cutoff": cut})
            assert cur.fetchone()[0] is baileys_expired, form
    db.rollback()
