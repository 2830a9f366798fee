# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""baileys_auth_export's engine: its options, and its run (a full export for mode=live, a standby refresh for
mode=standby)."""

from __future__ import annotations

import os

from ansible.module_utils.baileys_dr_export import Exporter
from ansible.module_utils.baileys_dr_postgres import postgres_argument_spec
from ansible.module_utils.baileys_dr_refresh import Refresher


def export_tree(params, connect, target, owner, check_mode, observe=None):
    """Entry point of baileys_auth_export. observe (a dict), when given, receives "source": what Snapshot.begin read
    of the server (its txid snapshot included) for a caller that proves the copy afterwards (baileys_dr_switch)."""
    previous = os.umask(0o077)  # files 0600, directories 0700, whatever mode a create asks for
    try:
        engine = (Refresher if params["mode"] == "standby" else Exporter)(params, connect, target, owner, check_mode)
        try:
            return engine.run()
        finally:
            if observe is not None:
                observe["source"] = engine.source_meta
    finally:
        os.umask(previous)


def auth_export_argument_spec():
    """The options of baileys_auth_export, connection options included (a new dict per call)."""
    argument_spec = postgres_argument_spec()
    argument_spec.update(
        mode=dict(type="str", choices=["live", "standby"], default="live"),
        dest=dict(type="path", required=True),
        companies=dict(type="list", elements="str"),
        unknown_types=dict(type="str", choices=["fail", "skip"], default="fail"),
        backup_dir=dict(type="path"),
        keep_backup=dict(type="bool", default=True),
        owner=dict(type="str"),
        group=dict(type="str"),
        space_margin=dict(type="float", default=1.5),
        force=dict(type="bool", default=False),
        return_digests=dict(type="bool", default=False),
        lock_timeout=dict(type="int", default=300),
        archive_dir=dict(type="path"),
        archive_keep=dict(type="int", default=4),
        archive_every=dict(type="int", default=3600),
        max_delete_share=dict(type="float", default=0.1),
        max_company_keys_removed=dict(type="int", default=10),
        replace_foreign=dict(type="bool", default=False),
        identity_force_companies=dict(type="list", elements="str", default=[]),
        app_root=dict(type="path"),
    )
    return argument_spec
