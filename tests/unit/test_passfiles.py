"""The pass files record (module_utils/baileys_dr_passfiles.py): what a failback's delta pass reads to skip unchanged files."""

from __future__ import annotations

import hashlib

import pytest

from ansible.module_utils import baileys_dr_passfiles as passfiles
from ansible.module_utils.baileys_dr_codec import sort_key
from ansible.module_utils.baileys_dr_tree import HEADER_LINE

SECOND = 10**9
NOW = 1_800_000_000 * SECOND + 123_456_789


def record(keys, listing, read_stats=None, creds=None):
    """(bytes, sha256, digest) of a record of keys [(type, id, name)] whose lines are made up from the keys."""
    ordered = sorted(keys, key=lambda k: sort_key(k[0], k[1]))
    lines = HEADER_LINE + b'["creds",null]\n' + b"".join(("[%r,%r]\n" % (t, i)).encode() for t, i, _n in ordered)
    data = passfiles.encode("c1", ordered, creds, listing, listing if read_stats is None else read_stats, NOW, lines)
    return data, hashlib.sha256(data).hexdigest(), hashlib.sha256(lines).hexdigest()


def old(ino, size=10):
    return (ino, size, NOW - 60 * SECOND + ino, 0o100000)


HOSTILE = [("pre-key", "1", "pre-key-1.json"), ("session", 'a\tb"\\c\n', 'session-a\tb"\\c\n.json'),
           ("sender-key", "x/y:z", "sender-key-x__y-z.json"), ("pre-key", "é", "pre-key-é.json")]


def test_names_and_ids_with_tabs_quotes_backslashes_and_newlines_come_back_as_written():
    listing = {name: old(n) for n, (_t, _i, name) in enumerate(HOSTILE, 1)}
    data, sha, digest = record(HOSTILE, listing)
    loaded = passfiles.PassFiles("c1", data, sha, digest)
    assert sorted(loaded.keys) == sorted((t, i) for t, i, _n in HOSTILE)
    for n, (key_type, key_id, name) in enumerate(HOSTILE, 1):
        position = loaded.carried(name, listing[name])
        assert position is not None and loaded.keys[position] == (key_type, key_id)


def test_a_file_written_within_the_racy_window_or_changed_while_read_is_never_carried():
    listing = {"pre-key-1.json": old(1), "pre-key-2.json": (2, 10, NOW - SECOND // 100, 0o100000), "pre-key-3.json": old(3)}
    read = dict(listing, **{"pre-key-3.json": (3, 11, NOW - SECOND, 0o100000)})
    keys = [("pre-key", str(n), "pre-key-%d.json" % n) for n in (1, 2, 3)]
    data, sha, digest = record(keys, listing, read)
    loaded = passfiles.PassFiles("c1", data, sha, digest)
    assert loaded.carried("pre-key-1.json", listing["pre-key-1.json"]) is not None
    assert loaded.carried("pre-key-2.json", listing["pre-key-2.json"]) is None, "10 ms before the listing"
    assert loaded.carried("pre-key-3.json", listing["pre-key-3.json"]) is None, "changed between listing and read"
    assert loaded.carried("pre-key-1.json", (1, 10, listing["pre-key-1.json"][2] + 1)) is None, "another mtime"


def test_changed_lines_are_spliced_in_digest_order_and_the_gone_ones_left_out():
    keys = [("pre-key", str(n), "pre-key-%d.json" % n) for n in (1, 3, 5, 7)]
    listing = {name: old(n) for n, (_t, _i, name) in enumerate(keys, 1)}
    data, sha, digest = record(keys, listing)
    loaded = passfiles.PassFiles("c1", data, sha, digest)
    carried = sorted(loaded.carried(name, listing[name]) for _t, _i, name in keys if name != "pre-key-5.json")
    changed = {("pre-key", "4"): b"four\n", ("pre-key", "0"): b"zero\n", ("session", "s"): b"s\n", ("pre-key", "9"): b"nine\n"}
    lines = loaded.spliced(carried, changed)
    # Digest order is by UTF-8 bytes: "0" < "1" < "3" < "4" < "7" < "9", and pre-key before session.
    assert lines == [b"zero\n", b"['pre-key','1']\n", b"['pre-key','3']\n", b"four\n", b"['pre-key','7']\n", b"nine\n", b"s\n"]
    with pytest.raises(passfiles.PassFilesError, match="both carried and changed"):
        loaded.spliced(carried, {("pre-key", "3"): b"again\n"})
    # The digest of the spliced lines, hashed run by run from the record (a gap where pre-key 5 is gone, none, all).
    creds = b'["creds",null]\n'
    for runs, news in ((carried, changed), (carried, {}), ([0, 1, 2, 3], {}), ([], changed)):
        expected = hashlib.sha256(HEADER_LINE + creds + b"".join(loaded.spliced(runs, news))).hexdigest()
        assert loaded.spliced_digest(creds, runs, news) == expected


@pytest.mark.parametrize("damage, message", [
    (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "checksum"),
    (lambda d: d.replace(b'"company":"c1"', b'"company":"c2"'), "checksum"),
])
def test_a_damaged_record_is_refused_naming_why(damage, message):
    keys = [("pre-key", "1", "pre-key-1.json")]
    data, sha, digest = record(keys, {"pre-key-1.json": old(1)})
    with pytest.raises(passfiles.PassFilesError, match=message):
        passfiles.PassFiles("c1", damage(data), sha, digest)


def test_a_record_of_another_company_or_whose_lines_are_not_the_digest_is_refused():
    keys = [("pre-key", "1", "pre-key-1.json")]
    data, sha, digest = record(keys, {"pre-key-1.json": old(1)})
    with pytest.raises(passfiles.PassFilesError, match="not a format 1 record of this company"):
        passfiles.PassFiles("c2", data, sha, digest)
    with pytest.raises(passfiles.PassFilesError, match="do not give the company's digest"):
        passfiles.PassFiles("c1", data, sha, "0" * 64)
