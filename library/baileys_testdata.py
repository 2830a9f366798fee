#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: baileys_testdata
short_description: Load deterministic Baileys auth state into PostgreSQL for tests and rehearsals
description:
  - Generates creds and Signal keys for C(companies) companies with C(keys_per_company) keys each,
    deterministically from C(seed), and bulk loads them with C(COPY) into C(whatsapp_auth) and C(whatsapp_keys).
  - Values carry every key type of Baileys' SignalDataTypeMap with realistic ids (C(:), C(/), C(::), C(@),
    base64, C(_reverse)) and Buffers in both JSON encodings the application's database holds.
  - Only the generated company ids are touched; their rows are replaced in one transaction.
  - Meant for test environments only; refuses to run against a database whose C(baileys_dr.environment)
    setting says C(production).
version_added: "0.1.0"
author: baileys-dr contributors
extends_documentation_fragment:
  - baileys_dr_postgres
options:
  seed:
    description: Seed of the generator; the same seed, count and prefix always give the same state.
    type: str
    default: baileys-dr
  companies:
    description: Number of companies.
    type: int
    default: 3
  keys_per_company:
    description: Keys per company (every key type is present from 10 keys on).
    type: int
    default: 150
  company_prefix:
    description: Company ids are this prefix followed by a five-digit index.
    type: str
    default: company
  state:
    description:
      - C(present) loads the companies when they are missing or their key counts differ.
      - C(reloaded) always replaces them (fresh timestamps).
      - C(absent) deletes the generated companies' rows.
    type: str
    choices: [present, reloaded, absent]
    default: present
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
"""

EXAMPLES = r"""
- name: Seed 100 companies with 1,500 keys each
  baileys_testdata:
    companies: 100
    keys_per_company: 1500
    login_host: 127.0.0.1
    login_user: baileys
    login_password: "{{ vault_db_password }}"
    login_db: baileys
"""

RETURN = r"""
companies:
  description: Ids of the generated companies.
  returned: always
  type: list
  elements: str
  sample: [company00001, company00002]
keys:
  description: Number of keys the generated companies have after the run.
  returned: always
  type: int
  sample: 4500
seconds:
  description: Time spent loading.
  returned: always
  type: float
"""

import time

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.baileys_dr_codec import COMPANY_ID_RE
from ansible.module_utils.baileys_dr_postgres import DatabaseError, connect, postgres_argument_spec, psycopg2, scrub
from ansible.module_utils.baileys_dr_testdata import company_id, load


class TestData:
    def __init__(self, module):
        self.module = module
        self.params = module.params
        self.ids = [company_id(self.params["company_prefix"], i) for i in range(1, self.params["companies"] + 1)]

    def _current_counts(self, cur):
        cur.execute(
            "SELECT a.company_id, (SELECT count(*) FROM whatsapp_keys k WHERE k.company_id = a.company_id) "
            "FROM whatsapp_auth a WHERE a.company_id = ANY(%s)",
            (self.ids,),
        )
        return dict(cur.fetchall())

    def _refuse_production(self, cur):
        cur.execute("SELECT current_setting('baileys_dr.environment', true)")
        if (cur.fetchone()[0] or "").lower() == "production":
            self.module.fail_json(msg="refusing to load test data: the database says baileys_dr.environment = production")

    def run(self):
        wanted = self.params["keys_per_company"]
        state = self.params["state"]
        started = time.monotonic()
        conn = connect(self.params, application_name="baileys-dr-testdata")
        try:
            with conn.cursor() as cur:
                self._refuse_production(cur)
                counts = self._current_counts(cur)
            if state == "absent":
                changed = bool(counts)
                if changed and not self.module.check_mode:
                    with conn.cursor() as cur:
                        cur.execute("DELETE FROM whatsapp_keys WHERE company_id = ANY(%s)", (self.ids,))
                        cur.execute("DELETE FROM whatsapp_auth WHERE company_id = ANY(%s)", (self.ids,))
                    conn.commit()
                keys = 0
            else:
                complete = len(counts) == len(self.ids) and all(c == wanted for c in counts.values())
                changed = state == "reloaded" or not complete
                if changed and not self.module.check_mode:
                    load(conn, self.params["seed"], len(self.ids), wanted, self.params["company_prefix"])
                keys = len(self.ids) * wanted
        finally:
            conn.close()
        return dict(changed=changed, companies=self.ids, keys=keys, seconds=round(time.monotonic() - started, 3))


def main():
    argument_spec = postgres_argument_spec()
    argument_spec.update(
        seed=dict(type="str", default="baileys-dr"),
        companies=dict(type="int", default=3),
        keys_per_company=dict(type="int", default=150),
        company_prefix=dict(type="str", default="company"),
        state=dict(type="str", default="present", choices=["present", "reloaded", "absent"]),
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    if module.params["companies"] < 0 or module.params["keys_per_company"] < 0:
        module.fail_json(msg="companies and keys_per_company must not be negative")
    if not COMPANY_ID_RE.match(company_id(module.params["company_prefix"], 1)):
        module.fail_json(msg="company_prefix %r does not give company ids matching [A-Za-z0-9_-]{1,50}" % module.params["company_prefix"])
    try:
        module.exit_json(**TestData(module).run())
    except DatabaseError as exc:
        module.fail_json(msg=str(exc))
    except psycopg2.Error as exc:
        module.fail_json(msg="loading test data failed: %s" % scrub(exc, module.params).strip())


if __name__ == "__main__":
    main()
