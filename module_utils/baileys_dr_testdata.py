# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Deterministic Baileys auth state for tests, rehearsals and benchmarks.

Every company is generated from (seed, company index) alone, so any subset
can be regenerated and compared. Values have the shapes the application
writes: creds with initAuthCreds' field types, every key type of
SignalDataTypeMap with realistic ids, Buffers in both JSON encodings (the
application's byte array and the base64 form of rows migrated from files).
"""

from __future__ import annotations

import base64
import datetime
import json
import random

from ansible.module_utils.baileys_dr_codec import KEY_TYPES, expiry_days
from ansible.module_utils.baileys_dr_postgres import CopyStream, copy_text

DAY = datetime.timedelta(days=1)
APP_STATE_COLLECTIONS = ("critical_block", "critical_unblock_low", "regular", "regular_high", "regular_low")
# Share of each key type in a company's keys (app-state-sync-version is fixed at 5).
TYPE_WEIGHTS = (
    ("pre-key", 30),
    ("session", 28),
    ("sender-key", 14),
    ("sender-key-memory", 5),
    ("app-state-sync-key", 3),
    ("lid-mapping", 8),
    ("device-list", 5),
    ("tctoken", 4),
    ("identity-key", 3),
)
def company_id(prefix, index):
    return "%s%05d" % (prefix, index)


class CompanyGenerator:
    """The creds and keys of one company."""

    def __init__(self, seed, index, prefix="company", keys=150, now=None, max_age_days=90):
        self.seed = "%s:%d" % (seed, index)
        self.rng = random.Random(self.seed)
        self.company_id = company_id(prefix, index)
        self.keys = keys
        self.now = now or datetime.datetime.now(datetime.timezone.utc)
        self.max_age_days = max_age_days
        self.phone = "49%010d" % self.rng.randrange(10**10)
        self.lid = "%015d" % self.rng.randrange(10**14, 10**15)

    # -- values --------------------------------------------------------------------
    def _bytes(self, n):
        return self.rng.randbytes(n)

    def _buffer(self, n):
        raw = self._bytes(n)
        if self.rng.random() < 0.7:
            return {"type": "Buffer", "data": list(raw)}
        return {"type": "Buffer", "data": base64.b64encode(raw).decode("ascii")}

    def _b64(self, n):
        return base64.b64encode(self._bytes(n)).decode("ascii")

    def _key_pair(self):
        return {"private": self._buffer(32), "public": self._buffer(32)}

    def creds(self):
        # Own random streams for creds and keys: either can be generated alone.
        self.rng = random.Random(self.seed + ":creds")
        registered = self.rng.random() < 0.9
        creds = {
            "noiseKey": self._key_pair(),
            "pairingEphemeralKeyPair": self._key_pair(),
            "signedIdentityKey": self._key_pair(),
            "signedPreKey": {"keyPair": self._key_pair(), "signature": self._buffer(64), "keyId": 1},
            "registrationId": self.rng.randrange(1, 16384),
            "advSecretKey": self._b64(32),
            "processedHistoryMessages": [],
            "nextPreKeyId": 1,
            "firstUnuploadedPreKeyId": 1,
            "accountSyncCounter": self.rng.randrange(0, 5),
            "accountSettings": {"unarchiveChats": False},
            "registered": registered,
            "pairingCode": None,
            "lastPropHash": None,
            "routingInfo": None,
        }
        if registered:
            device = self.rng.randrange(1, 40)
            creds.update({
                "me": {"id": "%s:%d@s.whatsapp.net" % (self.phone, device), "lid": "%s:%d@lid" % (self.lid, device), "name": "Empresa ñ %d" % device},
                "account": {"details": self._b64(60), "accountSignatureKey": self._b64(32), "accountSignature": self._b64(64), "deviceSignature": self._b64(64)},
                "signalIdentities": [{"identifier": {"name": "%s:%d@s.whatsapp.net" % (self.phone, device), "deviceId": 0}, "identifierKey": self._buffer(33)}],
                "myAppStateKeyId": self._b64(6),
                "routingInfo": self._buffer(12),
                "platform": self.rng.choice(["android", "smba", "iphone"]),
            })
        return creds

    def _contact(self):
        return "49%010d" % self.rng.randrange(10**10)

    def _group(self):
        return "120363%012d@g.us" % self.rng.randrange(10**12)

    def _key(self, key_type, serial):
        """(id, value) of one key of key_type; serial makes ids unique per type."""
        rng = self.rng
        if key_type == "pre-key":
            return str(serial + 1), {"private": self._buffer(32), "public": self._buffer(32)}
        if key_type == "session":
            user = self._contact() if rng.random() < 0.6 else "%015d_1" % rng.randrange(10**15)
            ident = "%s.%d" % (user, serial % 7)
            record = {"_sessions": {self._b64(33): {
                "registrationId": rng.randrange(1, 16384),
                "currentRatchet": {"ephemeralKeyPair": {"pubKey": self._b64(33), "privKey": self._b64(32)},
                                   "lastRemoteEphemeralKey": self._b64(33), "previousCounter": rng.randrange(50), "rootKey": self._b64(32)},
                "indexInfo": {"baseKey": self._b64(33), "baseKeyType": rng.choice([1, 2]), "closed": -1,
                              "used": 1_700_000_000_000 + serial, "created": 1_700_000_000_000, "remoteIdentityKey": self._b64(33)},
                "_chains": {self._b64(33): {"chainKey": {"counter": rng.randrange(10), "key": self._b64(32)}, "chainType": 1, "messageKeys": {}}},
            }}, "version": "v1"}
            return ident, record
        if key_type == "sender-key":
            ident = "%s::%s::%d" % (self._group(), self._contact(), serial % 5)
            return ident, [{"senderKeyId": rng.randrange(2**31), "senderChainKey": {"iteration": rng.randrange(100), "seed": self._buffer(32)},
                            "senderSigningKey": {"public": self._buffer(33)}, "senderMessageKeys": []}]
        if key_type == "sender-key-memory":
            return self._group(), {"%s:%d@s.whatsapp.net" % (self._contact(), rng.randrange(5)): True for _ in range(rng.randrange(1, 4))}
        if key_type == "app-state-sync-key":
            # Base64 ids: some contain '/' (a sub-directory for a naive exporter).
            ident = base64.b64encode(serial.to_bytes(2, "big") + self._bytes(4)).decode("ascii")
            return ident, {"keyData": self._b64(32), "fingerprint": {"rawId": rng.randrange(2**31), "currentIndex": rng.randrange(10),
                                                                       "deviceIndexes": [0, rng.randrange(1, 10)]},
                           "timestamp": str(1_700_000_000_000 + rng.randrange(10**9))}
        if key_type == "app-state-sync-version":
            return APP_STATE_COLLECTIONS[serial], {"version": rng.randrange(1, 500), "hash": self._buffer(128),
                                                    "indexValueMap": {self._b64(32): {"valueMac": self._buffer(32)} for _ in range(3)}}
        if key_type == "lid-mapping":
            pn, lid = self._contact(), "%015d" % rng.randrange(10**15)
            return (pn, lid) if serial % 2 == 0 else ("%s_reverse" % lid, pn)
        if key_type == "device-list":
            return self._contact(), [str(d) for d in sorted(rng.sample(range(30), rng.randrange(1, 4)))]
        if key_type == "tctoken":
            return "%s@s.whatsapp.net" % self._contact(), {"token": self._buffer(24), "timestamp": str(1_700_000_000 + rng.randrange(10**7))}
        if key_type == "identity-key":
            return "%s.%d" % (self._contact(), serial % 3), self._buffer(33)
        raise ValueError("unknown key type %r" % key_type)

    def _plan(self):
        """How many keys of each type: every type present when keys >= len(KEY_TYPES)."""
        counts = dict.fromkeys(KEY_TYPES, 0)
        counts["app-state-sync-version"] = min(len(APP_STATE_COLLECTIONS), self.keys)
        rest = self.keys - counts["app-state-sync-version"]
        total_weight = sum(w for _, w in TYPE_WEIGHTS)
        for key_type, weight in TYPE_WEIGHTS:
            counts[key_type] = rest * weight // total_weight
        counts["pre-key"] += rest - sum(counts[t] for t, _ in TYPE_WEIGHTS)
        for key_type, _ in TYPE_WEIGHTS:
            if rest >= len(TYPE_WEIGHTS) and counts[key_type] == 0:
                counts[key_type] = 1
                counts["pre-key"] -= 1
        return counts

    def key_rows(self):
        """(type, id, value, created_at, updated_at, expires_at) for every key, ids unique per type."""
        self.rng = random.Random(self.seed + ":keys")
        for key_type, count in self._plan().items():
            seen = set()
            serial = 0
            while len(seen) < count:
                key_id, value = self._key(key_type, serial)
                serial += 1
                if key_id in seen:
                    continue
                seen.add(key_id)
                updated = self.now - DAY * (self.rng.random() * self.max_age_days)
                created = updated - DAY * (self.rng.random() * 5)
                yield key_type, key_id, value, created, updated, updated + DAY * expiry_days(key_type)




def _dumps(value):
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def generate(seed, companies, keys_per_company, prefix="company", first=1, now=None):
    """Yield CompanyGenerator objects for companies first..first+companies-1."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    for index in range(first, first + companies):
        yield CompanyGenerator(seed, index, prefix=prefix, keys=keys_per_company, now=now)


def load(conn, seed, companies, keys_per_company, prefix="company", first=1, now=None):
    """Replace the generated companies' rows with freshly generated ones (one transaction, COPY)."""
    gens = list(generate(seed, companies, keys_per_company, prefix, first, now))
    ids = [g.company_id for g in gens]
    with conn.cursor() as cur:
        cur.execute("DELETE FROM whatsapp_keys WHERE company_id = ANY(%s)", (ids,))
        cur.execute("DELETE FROM whatsapp_auth WHERE company_id = ANY(%s)", (ids,))
        cred_lines = ("%s\t%s\n" % (gen.company_id, copy_text(_dumps(gen.creds()))) for gen in gens)
        cur.copy_expert("COPY whatsapp_auth (company_id, creds) FROM STDIN", CopyStream(cred_lines))

        def key_lines():
            for gen in gens:
                for key_type, key_id, value, created, updated, expires in gen.key_rows():
                    yield "%s\t%s\t%s\t%s\t%s\t%s\t%s\n" % (
                        gen.company_id, key_type, copy_text(key_id), copy_text(_dumps(value)),
                        created.isoformat(), updated.isoformat(), expires.isoformat())

        cur.copy_expert(
            "COPY whatsapp_keys (company_id, key_type, key_id, value, created_at, updated_at, expires_at) FROM STDIN",
            CopyStream(key_lines()),
        )
    conn.commit()
    return {"companies": len(ids), "keys": companies * keys_per_company}
