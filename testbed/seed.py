#!/usr/bin/env python3
"""Load generated Baileys auth state into PostgreSQL (testbed/bin/seed).

The same generator backs the `baileys_testdata` module; this command exists
for benchmarks and for loading millions of keys without Ansible in the way.
Connection: libpq environment (PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE).
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_module_utils():
    """Make ansible.module_utils.baileys_dr_* importable outside Ansible."""
    import ansible.module_utils

    path = os.path.join(ROOT, "module_utils")
    if path not in ansible.module_utils.__path__:
        ansible.module_utils.__path__.append(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", default="baileys-dr")
    parser.add_argument("--companies", type=int, default=10)
    parser.add_argument("--keys-per-company", type=int, default=150)
    parser.add_argument("--prefix", default="company")
    parser.add_argument("--first", type=int, default=1)
    args = parser.parse_args(argv)
    import_module_utils()
    from ansible.module_utils.baileys_dr_postgres import connect
    from ansible.module_utils.baileys_dr_testdata import load

    started = time.monotonic()
    conn = connect({}, application_name="baileys-dr-seed")
    try:
        result = load(conn, args.seed, args.companies, args.keys_per_company, args.prefix, args.first)
    finally:
        conn.close()
    result["seconds"] = round(time.monotonic() - started, 2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
