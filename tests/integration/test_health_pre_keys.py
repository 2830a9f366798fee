"""Pre-key figures of health (issue 17): per company, stored pre-keys against the creds' counters, in health.json and the
Prometheus textfile, checked against companies whose figures are known."""

from __future__ import annotations

import datetime
import json

from test_db_health_real import QUIET, health, health_playbook, prometheus_samples  # noqa: F401

from ansible.module_utils.baileys_dr_codec import PRE_KEYS_STORED_WARNING

OLDEST_DAYS = 40


def seed_known(db):
    """'big': pre-keys 21..2040 (2020 stored: 1..20 consumed), nextPreKeyId 2031, firstUnuploadedPreKeyId 2001, the oldest
    written 40 days ago. 'small': 1..30, both counters 31. 'orphan': 3 pre-keys and no creds."""
    # The time of the seeding, not of the module's import: a long suite runs this test many minutes after collection.
    now = datetime.datetime.now(datetime.timezone.utc)
    with db.cursor() as cur:
        for company, next_id, first_id in (("big", 2031, 2001), ("small", 31, 31)):
            creds = {"registrationId": 7, "nextPreKeyId": next_id, "firstUnuploadedPreKeyId": first_id}
            cur.execute("INSERT INTO whatsapp_auth (company_id, creds) VALUES (%s, %s)", (company, json.dumps(creds)))
        rows = [("big", str(n), now - datetime.timedelta(days=OLDEST_DAYS) + datetime.timedelta(seconds=n)) for n in range(21, 2041)]
        rows += [("small", str(n), now - datetime.timedelta(days=1)) for n in range(1, 31)]
        rows += [("orphan", str(n), now) for n in range(1, 4)]
        cur.executemany(
            "INSERT INTO whatsapp_keys (company_id, key_type, key_id, value, created_at, updated_at) VALUES (%s, 'pre-key', %s, "
            "'{\"public\": {\"type\": \"Buffer\", \"data\": [5]}}', %s, %s)", [(c, i, t, t) for c, i, t in rows])
    db.commit()


def test_pre_key_figures_match_a_company_whose_figures_are_known(db, db_params):
    seed_known(db)
    result = health(db_params, thresholds=QUIET)
    assert not result["errors"], result["errors"]
    pre = result["pre_keys"]
    big = pre["companies"]["big"]
    assert (big["stored"], big["uploaded"], big["not_uploaded"], big["at_or_above_next"]) == (2020, 1980, 30, 10)
    assert (big["next_pre_key_id"], big["first_unuploaded_pre_key_id"], big["min_id"], big["max_id"]) == (2031, 2001, 21, 2040)
    assert OLDEST_DAYS * 86400 - 120 < big["oldest_age_seconds"] < OLDEST_DAYS * 86400 + 600
    small = pre["companies"]["small"]
    assert (small["stored"], small["uploaded"], small["not_uploaded"], small["at_or_above_next"]) == (30, 30, 0, 0)
    orphan = pre["companies"]["orphan"]
    assert orphan["stored"] == 3 and orphan["creds"] is False and orphan["next_pre_key_id"] is None
    assert pre["total"] == 2053 and pre["max_stored"] == 2020 and pre["over_warning"] == ["big"]
    check = result["checks"]["pre_keys_stored"]
    assert check["status"] == "warning" and check["value"] == 2020 and check["warning"] == PRE_KEYS_STORED_WARNING
    assert "big" in check["message"] and "never deleted" in check["message"]
    # Reported, never deleted.
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM whatsapp_keys WHERE key_type = 'pre-key'")
        assert cur.fetchone()[0] == 2053


def test_the_warning_level_is_a_threshold_like_the_others(db, db_params):
    seed_known(db)
    result = health(db_params, thresholds=dict(QUIET, pre_keys_stored={"warning": 2020}))
    assert result["checks"]["pre_keys_stored"]["status"] == "healthy" and result["pre_keys"]["over_warning"] == []
    result = health(db_params, thresholds=dict(QUIET, pre_keys_stored={"warning": 10, "critical": 1000}))
    assert result["checks"]["pre_keys_stored"]["status"] == "critical"


def test_pre_key_figures_reach_health_json_and_the_textfile(db, db_params, health_playbook):  # noqa: F811
    seed_known(db)
    rc, out, paths = health_playbook()
    assert rc == 0, out  # a warning does not fail the play by default
    report = json.loads(paths["report"].read_text())
    assert report["status"] == "warning" and report["checks"]["pre_keys_stored"]["status"] == "warning"
    assert report["pre_keys"]["companies"]["big"]["stored"] == 2020
    assert report["pre_keys"]["companies"]["big"]["first_unuploaded_pre_key_id"] == 2001
    samples = prometheus_samples(paths["metrics"])
    big = (("company", "big"),)
    assert samples[("baileys_dr_pre_keys", big)] == 2020
    assert samples[("baileys_dr_pre_keys_uploaded", big)] == 1980
    assert samples[("baileys_dr_pre_keys_not_uploaded", big)] == 30
    assert samples[("baileys_dr_pre_keys_next_id", big)] == 2031
    assert samples[("baileys_dr_pre_keys_first_unuploaded_id", big)] == 2001
    assert samples[("baileys_dr_pre_keys_oldest_age_seconds", big)] > (OLDEST_DAYS * 86400 - 120)
    assert samples[("baileys_dr_pre_keys", (("company", "small"),))] == 30
    assert samples[("baileys_dr_health_status", (("check", "pre_keys_stored"),))] == 1
