"""Undo files without a database: gzip JSON lines with a sha256 sidecar, refused when damaged, written by the writer
thread."""

from __future__ import annotations

import gzip
import json
import os

import pytest

from ansible.module_utils import baileys_dr_failback_errors as fb_errors
from ansible.module_utils import baileys_dr_undo as undo_files


# -- undo files -----------------------------------------------------------------------------------------------------


def header():
    return {"format": 1, "kind": undo_files.UNDO_KIND, "company_id": "company00001", "txid": 7, "txn_started_at": "2025-01-01 00:00:00+00"}


RECORDS = [{"table": "whatsapp_auth", "action": "updated", "creds": "{}", "created_at": "x", "updated_at": "y"},
           {"table": "whatsapp_keys", "action": "deleted", "key_type": "pre-key", "key_id": "1", "value": "{}",
            "created_at": "x", "updated_at": "y", "expires_at": None},
           {"table": "whatsapp_keys", "action": "inserted", "key_type": "session", "key_id": "4917.1"}]


def test_an_undo_file_is_gzip_json_lines_with_a_sha256_sidecar_and_reads_back(tmp_path):
    path = undo_files.write_undo_file(str(tmp_path), "company00001", header(), RECORDS)
    assert undo_files.UNDO_RE.match(os.path.basename(path))
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(path), os.path.basename(path) + ".sha256"]
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert undo_files.read_undo_file(path) == (header(), RECORDS)
    second = undo_files.write_undo_file(str(tmp_path), "company00001", header(), [])
    assert second != path and undo_files.read_undo_file(second) == (header(), [])


def test_a_damaged_or_truncated_undo_file_is_refused(tmp_path):
    path = undo_files.write_undo_file(str(tmp_path), "company00001", header(), RECORDS)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-9])
    with pytest.raises(fb_errors.FailbackError, match="checksum mismatch"):
        undo_files.read_undo_file(path)
    # A consistent sidecar does not make a file without its end record acceptable.
    body = gzip.compress(b"\n".join(json.dumps(x).encode() for x in [header()] + RECORDS) + b"\n")
    open(path, "wb").write(body)
    import hashlib
    open(path + ".sha256", "w").write("%s  %s\n" % (hashlib.sha256(body).hexdigest(), os.path.basename(path)))
    with pytest.raises(fb_errors.FailbackError, match="incomplete"):
        undo_files.read_undo_file(path)
    os.unlink(path + ".sha256")
    with pytest.raises(fb_errors.FailbackError, match="sidecar"):
        undo_files.read_undo_file(path)



def test_an_undo_file_written_by_the_writer_thread_reads_back(tmp_path):
    header = {"format": undo_files.UNDO_FORMAT, "kind": undo_files.UNDO_KIND, "company_id": "c1", "txid": 1}
    records = [{"table": "whatsapp_keys", "action": "inserted", "key_type": "pre-key", "key_id": str(i)} for i in range(2500)]
    path = undo_files.UndoWriter(str(tmp_path), "c1", header, records).wait()
    assert undo_files.read_undo_file(path) == (header, records)
    with pytest.raises(FileNotFoundError):
        undo_files.UndoWriter(str(tmp_path / "missing"), "c1", header, records).wait()
