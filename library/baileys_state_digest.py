#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: baileys_state_digest
short_description: State digest of every company in the PostgreSQL auth-state store
description:
  - Computes, per company, the baileys-dr state digest (docs/architecture.md) over the creds in
    C(whatsapp_auth) and every key in C(whatsapp_keys).
  - Both Buffer encodings give the same digest, so a database, a file export and the running
    application can be compared; equal digests mean no key was lost or altered.
  - Read-only; reads one company at a time, so memory does not grow with the table.
  - A value that cannot be read (for example nested deeper than Python reads, which PostgreSQL accepts)
    fails the module naming its company, key type and id.
version_added: "0.1.0"
author: baileys-dr contributors
extends_documentation_fragment:
  - baileys_dr_postgres
options:
  companies:
    description: Only these company ids (default all).
    type: list
    elements: str
  expected:
    description:
      - Digests to compare with, by company id (for example the readiness report of the application).
      - The module fails naming every company whose digest differs or is missing on either side.
    type: dict
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
"""

EXAMPLES = r"""
- name: Digests of the database
  baileys_state_digest:
    login_host: db.internal
    login_user: baileys
    login_password: "{{ vault_db_password }}"
    login_db: baileys
  register: db_state

- name: The running application holds exactly what the database holds
  baileys_state_digest:
    db_url: "{{ vault_db_url }}"
    expected: "{{ (readiness.content | from_json).digests }}"
"""

RETURN = r"""
digests:
  description: State digest by company id.
  returned: always
  type: dict
  sample: {company00001: 3ebec4798e968640...}
keys:
  description: Number of keys by company id.
  returned: always
  type: dict
total_keys:
  description: Keys over all companies.
  returned: always
  type: int
mismatches:
  description: Company ids whose digest differs from O(expected) (or is missing on one side).
  returned: when O(expected) is given
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.baileys_dr_postgres import DatabaseError, connect, postgres_argument_spec, psycopg2, scrub
from ansible.module_utils.baileys_dr_store import StoreValueError, company_digest, list_companies


class StateDigests:
    def __init__(self, module):
        self.module = module
        self.params = module.params

    def run(self):
        digests, keys = {}, {}
        conn = connect(self.params, application_name="baileys-dr-digest")
        try:
            conn.set_session(readonly=True)
            for company in list_companies(conn, self.params["companies"]):
                digests[company], keys[company] = company_digest(conn, company)
                # Each company is read in its own short transaction.
                conn.rollback()
        finally:
            conn.close()
        result = dict(changed=False, digests=digests, keys=keys, total_keys=sum(keys.values()))
        expected = self.params["expected"]
        if expected is not None:
            names = sorted(set(expected) | set(digests))
            result["mismatches"] = [name for name in names if expected.get(name) != digests.get(name)]
            if result["mismatches"]:
                shown = ", ".join(result["mismatches"][:20])
                result["msg"] = "state digests differ for %d companies: %s" % (len(result["mismatches"]), shown)
                self.module.fail_json(**result)
        return result


def main():
    argument_spec = postgres_argument_spec()
    argument_spec.update(
        companies=dict(type="list", elements="str"),
        expected=dict(type="dict"),
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    try:
        module.exit_json(**StateDigests(module).run())
    except (DatabaseError, StoreValueError) as exc:
        module.fail_json(msg=str(exc))
    except psycopg2.Error as exc:
        module.fail_json(msg="reading the auth-state store failed: %s" % scrub(exc, module.params).strip())


if __name__ == "__main__":
    main()
