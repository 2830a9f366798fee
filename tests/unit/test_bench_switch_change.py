"""bench/switch_bench.change_files: the benchmark's "1% of the key files changed after the bulk pass" before a failback."""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench"))

from switch_bench import change_files  # noqa: E402

PRE_KEY = {"private": {"type": "Buffer", "data": "AQID"}, "public": {"type": "Buffer", "data": "BAUG"}}


def make_tree(root, companies=2, pre_keys=50):
    contents = {}
    for index in range(companies):
        company = os.path.join(root, "company_co%d" % index)
        os.makedirs(company)
        files = {"creds.json": {"registrationId": 7}, "identity-key-1.json": {"type": "Buffer", "data": "AQID"},
                 "sender-key-g--u--0.json": [{"senderKeyId": 1}], "session-4915550000.1.json": {"_sessions": {}, "version": "v1"}}
        files.update({"pre-key-%d.json" % n: PRE_KEY for n in range(1, pre_keys + 1)})
        for name, value in files.items():
            with open(os.path.join(company, name), "w", encoding="utf-8") as fh:
                json.dump(value, fh, separators=(",", ":"))
            contents[(os.path.basename(company), name)] = value
    return contents


def read_tree(root):
    out = {}
    for company in os.listdir(root):
        for name in os.listdir(os.path.join(root, company)):
            with open(os.path.join(root, company, name), encoding="utf-8") as fh:
                out[(company, name)] = json.load(fh)
    return out


def test_rewrites_the_share_of_key_files_in_place_with_values_baileys_still_reads(tmp_path):
    before = make_tree(str(tmp_path))
    result = change_files(str(tmp_path), 10.0, {}, time.time() + 60)
    after = read_tree(str(tmp_path))
    assert set(after) == set(before), "no file created or deleted"
    changed = {key for key in before if after[key] != before[key]}
    assert result["key_files"] == 2 * 53 and result["rewritten"] == 10 == len(changed)
    for company, name in changed:
        assert name.startswith(("pre-key-", "session-")), "never creds, a Buffer value or a list"
        value = dict(after[(company, name)])
        assert isinstance(value.pop("baileysDrBench"), str) and value == before[(company, name)]


def test_leaves_the_writers_keys_and_files_written_after_the_cutoff_alone(tmp_path):
    before = make_tree(str(tmp_path), companies=1, pre_keys=100)
    mine = {"company_co0": {"pre-key-%d.json" % n for n in range(1, 51)}}
    recent = os.path.join(str(tmp_path), "company_co0", "pre-key-99.json")
    os.utime(recent, (time.time() + 100, time.time() + 100))
    result = change_files(str(tmp_path), 100.0, mine, time.time() + 50)
    after = read_tree(str(tmp_path))
    changed = {name for (_, name) in before if after[("company_co0", name)] != before[("company_co0", name)]}
    assert not changed & mine["company_co0"]
    assert "pre-key-99.json" not in changed and result["skipped"] == 1
    assert changed == {"pre-key-%d.json" % n for n in range(51, 101) if n != 99} | {"session-4915550000.1.json"}
