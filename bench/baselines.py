#!/usr/bin/env python3
"""Baselines of the baileys-dr benchmark: the least work that moves the same rows (bench/run runs them).

    baselines.py write-files --dest DIR     PostgreSQL -> per-key files
    baselines.py read-copy-in --src DIR     per-key files -> COPY ... FROM into copy_auth / copy_keys

Connection: libpq environment (PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE).

What they do, so that the ratios in docs/benchmarks.md can be judged:
- write-files: one REPEATABLE READ READ ONLY transaction; creds, then every key through a server-side cursor in table
  order (no ORDER BY); per key one file company_<id>/<type>-<fixFileName(id)>.json (Baileys' names, from
  module_utils/baileys_dr_codec.py: the only thing reused) holding compact JSON with Buffers in Baileys' base64 form,
  written with a plain open/write like Baileys' writeFile (no temporary file, no fsync per file), 0600; then one
  syncfs(2) of the file system, the same durability point as the export's. No manifest, no digest, no staging, no checks.
- read-copy-in: walks the tree, reads and parses every file, turns Buffers back into the array form the
  application writes (the same rows), takes the key id from the file name without reversing fixFileName, and
  streams the rows through COPY ... FROM STDIN into fresh tables made LIKE whatsapp_auth / whatsapp_keys
  INCLUDING ALL (same indexes, no triggers), emptied first; one transaction. No verification, no id recovery,
  no comparison with existing rows, no undo file, no digest.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "module_utils"))

from baileys_dr_codec import KEY_TYPES, key_file_name  # noqa: E402  (naming only)

import psycopg2  # noqa: E402


def dumps(value):
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def to_base64(value):
    if isinstance(value, dict):
        if value.get("type") == "Buffer" and isinstance(value.get("data"), list) and len(value) == 2:
            return {"type": "Buffer", "data": base64.b64encode(bytes(value["data"])).decode("ascii")}
        return {k: to_base64(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_base64(v) for v in value]
    return value


def to_array(value):
    if isinstance(value, dict):
        if value.get("type") == "Buffer" and isinstance(value.get("data"), str) and len(value) == 2:
            return {"type": "Buffer", "data": list(base64.b64decode(value["data"]))}
        return {k: to_array(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_array(v) for v in value]
    return value


def write_files(dest):
    os.umask(0o077)
    os.makedirs(dest)
    conn = psycopg2.connect("", application_name="bench-baseline-write")
    conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
    made = set()

    def company_dir(company):
        path = os.path.join(dest, "company_" + company)
        if company not in made:
            os.mkdir(path)
            made.add(company)
        return path

    files = 0
    with conn.cursor() as cur:
        cur.execute("SELECT company_id, creds FROM whatsapp_auth")
        for company, creds in cur.fetchall():
            with open(os.path.join(company_dir(company), "creds.json"), "w", encoding="utf-8") as fh:
                fh.write(dumps(to_base64(creds)))
            files += 1
    with conn.cursor(name="keys") as cur:
        cur.itersize = 2000
        cur.execute("SELECT company_id, key_type, key_id, value FROM whatsapp_keys")
        for company, key_type, key_id, value in cur:
            with open(os.path.join(company_dir(company), key_file_name(key_type, key_id)), "w", encoding="utf-8") as fh:
                fh.write(dumps(to_base64(value)))
            files += 1
    conn.rollback()
    conn.close()
    syncfs(dest)
    return {"files": files, "companies": len(made)}


def syncfs(path):
    """syncfs(2) of the file system holding path (what the export does once), else sync(2)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if getattr(libc, "syncfs", None) is None or libc.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def copy_text(text):
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


class LineStream:
    """File-like object feeding COPY FROM STDIN from an iterator of text lines."""

    def __init__(self, lines):
        self._lines = iter(lines)
        self._rest = b""

    def read(self, size=65536):
        parts, length = [self._rest], len(self._rest)
        for line in self._lines:
            data = line.encode("utf-8")
            parts.append(data)
            length += len(data)
            if length >= size:
                break
        chunk = b"".join(parts)
        self._rest = chunk[size:]
        return chunk[:size]

    readline = read


def read_copy_in(src):
    prefixes = sorted(KEY_TYPES, key=len, reverse=True)
    creds_rows = []
    counts = {"keys": 0, "creds": 0}

    def key_lines():
        for entry in sorted(os.scandir(src), key=lambda e: e.name):
            if not entry.name.startswith("company_"):
                continue
            company = entry.name[len("company_"):]
            for item in os.scandir(entry.path):
                with open(item.path, encoding="utf-8") as fh:
                    value = dumps(to_array(json.loads(fh.read())))
                if item.name == "creds.json":
                    creds_rows.append("%s\t%s\n" % (company, copy_text(value)))
                    continue
                key_type = next(t for t in prefixes if item.name.startswith(t + "-"))
                key_id = item.name[len(key_type) + 1:-len(".json")]
                counts["keys"] += 1
                yield "%s\t%s\t%s\t%s\n" % (company, key_type, copy_text(key_id), copy_text(value))

    conn = psycopg2.connect("", application_name="bench-baseline-copy-in")
    with conn.cursor() as cur:
        cur.execute("TRUNCATE copy_keys, copy_auth")
        cur.copy_expert("COPY copy_keys (company_id, key_type, key_id, value) FROM STDIN", LineStream(key_lines()))
        cur.copy_expert("COPY copy_auth (company_id, creds) FROM STDIN", LineStream(creds_rows))
        counts["creds"] = len(creds_rows)
    conn.commit()
    conn.close()
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("write-files").add_argument("--dest", required=True)
    sub.add_parser("read-copy-in").add_argument("--src", required=True)
    args = parser.parse_args(argv)
    result = write_files(args.dest) if args.command == "write-files" else read_copy_in(args.src)
    print(json.dumps({"ok": True, "result": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
