#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: baileys_audit
short_description: Append one record to the baileys-dr audit log
description:
  - Appends a JSON line (who, what, when, inputs, outcome, duration) to the audit log and fsyncs it,
    so every DR operation leaves a durable trace even when the play fails right after.
  - Input values whose names look secret (password, secret, token, key, dsn, url, by default) are
    replaced by C(********) before anything is written; callers should still pass only what is needed.
version_added: "0.1.0"
author: baileys-dr contributors
options:
  path:
    description: The audit log (JSON lines). Its directory is created 0750; the file is 0600.
    type: path
    default: /var/log/baileys-dr/audit.jsonl
  operation:
    description: The DR operation, for example C(failover).
    type: str
    required: true
  outcome:
    description: How it ended.
    type: str
    required: true
    choices: [ok, failed, rolled_back, refused, check]
  started_at:
    description: When the operation started (ISO 8601 or epoch seconds); gives C(duration_seconds).
    type: raw
  user:
    description: Who ran it (for example the controller user or the AWX user).
    type: str
    default: ""
  inputs:
    description: The operation's inputs. Secret-looking names are redacted.
    type: dict
    default: {}
  details:
    description: Anything else worth keeping (counts, digests, failed step, message).
    type: dict
    default: {}
  secret_keys_regex:
    description:
      - Names (of inputs and details, at any depth) whose values are redacted; a Python regular expression, searched
        case-insensitively.
      - Default, the project's one list of secret names (module_utils/baileys_dr_secrets.py C(SECRET_NAME_PATTERN)),
        the same as baileys_env_file and the Sentry callback use.
    type: str
  redact_values:
    description:
      - Secret values (passwords, tokens, URLs holding tokens) replaced by C(********) wherever they appear in any string
        of the record, for example inside an error message. Values shorter than 4 characters are ignored.
    type: list
    elements: str
    default: []
  event:
    description: What the record is about, for example C(run) (a DR operation) or C(notification_failed).
    type: str
    default: run
  hosts:
    description: The target hosts of the operation (C(host) is the machine writing the record).
    type: list
    elements: str
    default: []
  job_id:
    description: The AWX/AAP job id when the run comes from AWX ("" otherwise).
    type: str
    default: ""
attributes:
  check_mode:
    support: full
    details: In check mode nothing is written; the record is returned.
  diff_mode:
    support: none
"""

EXAMPLES = r"""
- name: Audit the failover
  baileys_audit:
    operation: failover
    outcome: ok
    started_at: "{{ __failover_started }}"
    user: "{{ lookup('ansible.builtin.env', 'USER') }}"
    inputs: {source: live, tag: emergency-file-fallback-v1}
    details: {companies: 3, keys: 4500}

- name: Audit a notification that could not be sent, without its URL or token
  baileys_audit:
    event: notification_failed
    operation: failover
    outcome: ok
    hosts: ["{{ inventory_hostname }}"]
    job_id: "{{ awx_job_id | default('') }}"
    details: {channel: telegram, status: 500}
    redact_values: ["{{ baileys_dr_notify_telegram_bot_token }}"]
"""

RETURN = r"""
record:
  description: The record written.
  returned: always
  type: dict
"""

import datetime
import json
import os
import re
import socket

from ansible.module_utils.baileys_dr_secrets import MASK, SECRET_NAME_PATTERN
from ansible.module_utils.basic import AnsibleModule



def redact(value, pattern):
    if isinstance(value, dict):
        return {k: (MASK if pattern.search(str(k)) and v not in (None, "", {}, []) and not isinstance(v, (bool, int, float))
                    else redact(v, pattern)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, pattern) for v in value]
    return value


def scrub(value, secrets):
    """value with every occurrence of a secret in its strings (keys included) replaced."""
    if not secrets:
        return value
    if isinstance(value, dict):
        return {scrub(k, secrets): scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v, secrets) for v in value]
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, MASK)
    return value


def parse_time(value):
    if value in (None, ""):
        return None
    if isinstance(value, (int, float)) or re.match(r"^\d+(\.\d+)?$", str(value)):
        return datetime.datetime.fromtimestamp(float(value), datetime.timezone.utc)
    parsed = datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.timezone.utc)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", default="/var/log/baileys-dr/audit.jsonl"),
            operation=dict(type="str", required=True),
            outcome=dict(type="str", required=True, choices=["ok", "failed", "rolled_back", "refused", "check"]),
            started_at=dict(type="raw"),
            user=dict(type="str", default=""),
            inputs=dict(type="dict", default={}),
            details=dict(type="dict", default={}),
            secret_keys_regex=dict(type="str"),
            redact_values=dict(type="list", elements="str", default=[], no_log=True),
            event=dict(type="str", default="run"),
            hosts=dict(type="list", elements="str", default=[]),
            job_id=dict(type="str", default=""),
        ),
        supports_check_mode=True,
    )
    params = module.params
    pattern = re.compile(params["secret_keys_regex"] or SECRET_NAME_PATTERN, re.IGNORECASE)
    now = datetime.datetime.now(datetime.timezone.utc)
    try:
        started = parse_time(params["started_at"])
    except ValueError:
        module.fail_json(msg="started_at %r is neither ISO 8601 nor epoch seconds" % params["started_at"])
    # Longest first, so that a secret containing another is replaced whole.
    secrets = sorted({v for v in params["redact_values"] if v and len(v) >= 4}, key=len, reverse=True)
    record = {
        "time": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "event": params["event"],
        "operation": params["operation"],
        "outcome": "check" if module.check_mode else params["outcome"],
        "duration_seconds": round((now - started).total_seconds(), 3) if started else None,
        "user": params["user"],
        "job_id": params["job_id"],
        "host": socket.gethostname(),
        "hosts": params["hosts"],
        "inputs": redact(params["inputs"], pattern),
        "details": redact(params["details"], pattern),
    }
    record = scrub(record, secrets)
    if not module.check_mode:
        directory = os.path.dirname(params["path"])
        os.makedirs(directory, mode=0o750, exist_ok=True)
        fd = os.open(params["path"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (json.dumps(record, sort_keys=True) + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
    module.exit_json(changed=not module.check_mode, record=record)


if __name__ == "__main__":
    main()
