"""The type-aware reverse of fixFileName without a database: key types from file names, ids from their shapes, ambiguous
names with their candidates, and the same answers as the application's reverse."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess

import pytest

from conftest import ROOT

from ansible.module_utils import baileys_dr_codec as codec
from ansible.module_utils import baileys_dr_reverse_names as reverse_names
from ansible.module_utils import baileys_dr_testdata as testdata


# -- the type of a file ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, expected", [
    ("sender-key-memory-120363@g.us.json", ("sender-key-memory", "120363@g.us")),
    ("sender-key-120363@g.us--4917--1.json", ("sender-key", "120363@g.us--4917--1")),
    ("app-state-sync-version-regular_high.json", ("app-state-sync-version", "regular_high")),
    ("app-state-sync-key-AAAA__w==.json", ("app-state-sync-key", "AAAA__w==")),
    ("pre-key-12.json", ("pre-key", "12")),
    ("identity-key-4917.1.json", ("identity-key", "4917.1")),
    ("lid-mapping-123_reverse.json", ("lid-mapping", "123_reverse")),
])
def test_the_type_is_the_longest_known_prefix(name, expected):
    assert reverse_names.parse_key_file_name(name) == expected


@pytest.mark.parametrize("name", ["creds.json.bak", "evil-type-1.json", "pre-key-.json", "pre-key-1.json.tmp", "pre-key1.json",
                                  ".DS_Store", "session.json", "manifest.json"])
def test_names_of_no_known_type_are_not_key_files(name):
    assert reverse_names.parse_key_file_name(name) is None


# -- ids from names ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key_type, name, key_id", [
    ("pre-key", "100001", "100001"),
    ("session", "4915550001.3", "4915550001.3"),
    ("session", "123456789012345_1.12", "123456789012345_1.12"),
    ("identity-key", "4917600000000.1", "4917600000000.1"),
    ("sender-key", "120363025814453019@g.us--491710600547--3", "120363025814453019@g.us::491710600547::3"),
    ("sender-key", "4917612345678-1600000000@g.us--123456789012345_1--0", "4917612345678-1600000000@g.us::123456789012345_1::0"),
    ("sender-key", "status@broadcast--4917--2", "status@broadcast::4917::2"),
    ("sender-key-memory", "4917612345678-1600000000@g.us", "4917612345678-1600000000@g.us"),
    ("app-state-sync-key", "AAAA__w==", "AAAA/w=="),
    ("app-state-sync-key", "AAb__cd+e", "AAb/cd+e"),
    ("app-state-sync-key", "____AAAA", "//AAAA"),
    ("lid-mapping", "4917600000000", "4917600000000"),
    ("lid-mapping", "123456789012345_reverse", "123456789012345_reverse"),
    ("app-state-sync-version", "critical_unblock_low", "critical_unblock_low"),
    ("tctoken", "4917@s.whatsapp.net", "4917@s.whatsapp.net"),
    ("device-list", "4917", "4917"),
])
def test_ids_are_recovered_by_the_shape_of_their_type(key_type, name, key_id):
    reverse = reverse_names.reverse_key_name(key_type, name)
    assert reverse.key_id == key_id and reverse.rule
    assert codec.fix_file_name(key_id) == name


@pytest.mark.parametrize("key_type, name, candidates", [
    ("session", "4917-3.1", ["4917-3.1", "4917:3.1"]),
    ("tctoken", "4917-0000@s.whatsapp.net", ["4917-0000@s.whatsapp.net", "4917:0000@s.whatsapp.net"]),
    ("device-list", "a__b", ["a__b", "a/b"]),
    ("tctoken", "a___b", ["a___b", "a_/b", "a/_b"]),
    ("sender-key-memory", "4917-3@s.whatsapp.net", ["4917-3@s.whatsapp.net", "4917:3@s.whatsapp.net"]),
    ("pre-key", "planted", ["planted"]),  # not an integer: no Baileys pre-key
    ("sender-key", "120363@g.us--4917", ["120363@g.us--4917", "120363@g.us-:4917", "120363@g.us:-4917", "120363@g.us::4917"]),
    ("sender-key", "a--b--c--1", None),
    ("app-state-sync-key", "AA-A", ["AA-A", "AA:A"]),
    ("app-state-sync-key", "AA___A", ["AA___A", "AA_/A", "AA/_A"]),
    ("lid-mapping", "4917-1", ["4917-1", "4917:1"]),
    ("session", "..__..__etc__passwd.0", None),
    ("app-state-sync-key", "AAb__cd+e==", ["AAb__cd+e==", "AAb/cd+e=="]),  # 10 characters: not base64 either way
])
def test_names_that_could_come_from_several_ids_are_ambiguous_with_their_candidates(key_type, name, candidates):
    reverse = reverse_names.reverse_key_name(key_type, name)
    assert reverse.key_id is None and reverse.reason
    if candidates is not None:
        assert reverse.candidates == candidates and reverse.candidate_count == len(candidates)
    assert all(codec.fix_file_name(c) == name for c in reverse.candidates)
    assert len(reverse.candidates) <= reverse_names.MAX_CANDIDATES <= reverse.candidate_count or len(reverse.candidates) == reverse.candidate_count


@pytest.mark.parametrize("name", ["a-b", "a__b", "a___b", "a____b", "x-y__z-", "--__--", "_-_-__"])
def test_preimages_are_exactly_the_ids_fixfilename_maps_to_the_name(name):
    found = reverse_names.preimages(name, limit=10 ** 6)
    assert len(found) == len(set(found)) == reverse_names.preimage_count(name)
    assert all(codec.fix_file_name(c) == name for c in found)
    # brute force over the alphabet of the name and its preimage characters
    import itertools
    alphabet = sorted(set(name) | {":", "/"})
    brute = {"".join(p) for n in range(len(name) + 1) for p in itertools.product(alphabet, repeat=n)
             if codec.fix_file_name("".join(p)) == name} if len(name) <= 6 else set(found)
    assert set(found) == brute


def generated_ids():
    """Every id the test data generator makes (all key types), plus odd ones."""
    ids = set()
    for gen in testdata.generate("names", 5, 400):
        for key_type, key_id, *_rest in gen.key_rows():
            ids.add((key_type, key_id))
    ids |= {("session", "4917:3.1"), ("app-state-sync-key", "AAb/cd+e=="), ("tctoken", "4917-0000@s.whatsapp.net"),
            ("sender-key-memory", "120363-1@g.us"), ("session", "../../etc/passwd.0"), ("sender-key", "a::b::c::1"),
            ("device-list", "x/y:z"), ("pre-key", "1:2")}
    return sorted(ids)


def outside_baileys_shapes(key_type, key_id):
    """Ids Baileys never makes, the assumptions of the rules: app-state-sync-key ids are base64, group JIDs hold no ':'."""
    if key_type == "app-state-sync-key":
        return codec.decode_base64(key_id) is None
    if key_type in ("sender-key", "sender-key-memory"):
        return ":" in key_id.split("::")[0]
    return False


def test_the_reverse_never_gives_a_wrong_id_for_ids_of_baileys_shapes():
    """For any id: its file name reverses to that id, or is ambiguous; another id only when the id breaks a shape rule."""
    rng = random.Random(7)
    pieces = ["4917", "-", ":", "/", "_", "__", "@g.us", ".", "1", "A", "=", "+", "::", "status@broadcast", "_reverse"]
    cases = generated_ids() + [(rng.choice(codec.KEY_TYPES), "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 8))))
                               for _ in range(20000)]
    resolved = 0
    for key_type, key_id in cases:
        name = codec.fix_file_name(key_id)
        reverse = reverse_names.reverse_key_name(key_type, name)
        if reverse.key_id is None:
            assert key_id in reverse.candidates or reverse.candidate_count > reverse_names.MAX_CANDIDATES
            continue
        assert codec.fix_file_name(reverse.key_id) == name
        if not outside_baileys_shapes(key_type, key_id):
            assert reverse.key_id == key_id, (key_type, key_id, reverse.key_id)
            resolved += 1
    assert resolved > 2000


def test_every_id_the_generator_makes_is_recovered():
    for gen in testdata.generate("names", 5, 400):
        for key_type, key_id, *_rest in gen.key_rows():
            assert reverse_names.reverse_key_name(key_type, codec.fix_file_name(key_id)).key_id == key_id, (key_type, key_id)


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_ids_python_recovers_are_the_ids_the_applications_reverse_gives():
    """The Node twin (testbed/app/src/digest.js, what the application reports as guessed) never disagrees on a recovered id."""
    names = [(t, codec.fix_file_name(i)) for t, i in generated_ids()]
    names += [("sender-key", "4917612345678-1600000000@g.us--123456789012345_1--0"), ("session", "4917-3.1"),
              ("app-state-sync-key", "AA___A"), ("sender-key", "a--b--c--1"), ("pre-key", "planted")]
    script = ("const d = require(process.argv[1]); const names = JSON.parse(require('fs').readFileSync(0, 'utf8'));"
              "process.stdout.write(JSON.stringify(names.map(([t, n]) => d.reverseFileName(t, n))));")
    out = subprocess.run(["node", "-e", script, os.path.join(ROOT, "testbed", "app", "src", "digest.js")],
                         input=json.dumps(names), capture_output=True, text=True, check=True).stdout
    for (key_type, name), node in zip(names, json.loads(out)):
        ours = reverse_names.reverse_key_name(key_type, name).key_id
        if ours is not None:
            assert not node["ambiguous"] and node["id"] == ours, (key_type, name, node)
