#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: baileys_env_file
short_description: Set or remove keys in a dotenv (.env) file, keeping everything else
description:
  - Sets or removes C(KEY=value) assignments in a dotenv file as the Node C(dotenv) package
    (v16, v17) reads it, keeping comments, blank lines, line endings, the order of the lines and
    the layout of the lines it rewrites (C(export) prefix, spacing, trailing comment, quote style
    when the new value can be written in it).
  - A file without a final line break keeps having none (a new key goes on a line of its own, the
    last), so setting keys and setting them back (from RV(previous)) gives the original bytes, with
    LF or CRLF line endings.
  - Values are read with C(dotenv)'s own rules, so a key whose value is already the wanted one is
    left alone, however it is quoted; a second identical run reports no change.
  - The file is rewritten atomically, like M(community.general.ini_file) does it. A temporary file in
    the same directory is written and fsynced, then renamed over the file with
    C(AnsibleModule.atomic_move), and the directory is fsynced. A crash leaves the old file or the new
    one, never a mix (a killed run may leave a hidden C(.<name>.tmp-*) file, mode 0600, beside it).
  - The file keeps its mode, owner and group unless O(mode), O(owner) or O(group) say otherwise; a
    new file is created 0600 (never world-readable, even for an instant).
  - Values may be secrets. They never appear in the result (but in C(previous), on request).
    C(changed_keys) holds names only, the
    echo of the module arguments (C(invocation)) and the diff show C(********) instead of the value
    of every key matching O(secret_keys_regex).
  - A key defined more than once is reported in C(duplicates) and as a warning. C(dotenv) uses the
    last definition, so that is the one updated; removing a key removes every definition of it.
  - Called C(env_file) before 0.4.0; the old name still works, with a warning naming the new one, until 0.5.0.
version_added: "0.1.0"
author: baileys-dr contributors
options:
  path:
    description:
      - The dotenv file, for example C(/srv/app/.env).
      - A symbolic link is followed (the file it points at is edited) unless O(follow=false), which
        replaces the link by a regular file.
    type: path
    required: true
    aliases: [dest]
  values:
    description:
      - Keys to set, with their new value, or to remove, with C(null).
      - Key names must match C([A-Za-z_][A-Za-z0-9_]*). Values are strings; integers are written in
        decimal and booleans as C(true)/C(false) (so an unquoted YAML C(false) gives the C(false) the
        application compares with). A value holding a line break or a NUL byte is refused.
      - A new value is written unquoted when it consists of C([A-Za-z0-9_./:@+-]) only, otherwise in
        double quotes, or in single quotes or backticks when the value holds characters C(dotenv)
        would change inside double quotes (C(") or C(\\)). A value holding all three quote characters
        and a backslash cannot be written so that C(dotenv) reads it back unchanged and is refused.
      - New keys are appended at the end of the file, in the order given.
    type: dict
    default: {}
  state:
    description:
      - V(present) makes the file hold O(values).
      - V(absent) removes the whole file (O(values) must then be empty).
    type: str
    choices: [present, absent]
    default: present
  create:
    description:
      - Create the file when it does not exist. Without it a missing file is an error, unless every
        key in O(values) is to be removed (nothing to do).
    type: bool
    default: false
  backup:
    description:
      - Before changing the file, copy it to C(<path>.<pid>.<YYYY-MM-DD@HH:MM:SS>~) beside it, mode
        0600 and the file's owner and group (it holds the same secrets). Its path is returned as
        C(backup_file).
    type: bool
    default: false
  follow:
    description: Edit the file a symbolic link at O(path) points at, instead of replacing the link.
    type: bool
    default: true
  secret_keys_regex:
    description:
      - Python regular expression, searched case-insensitively in each key name; the values of the
        matching keys are shown as C(********) in the diff and in C(invocation).
      - Set it to C(.) to hide every value. Comments are always shown as they are.
      - Default, the project's one list of secret names (module_utils/baileys_dr_secrets.py C(SECRET_NAME_PATTERN)),
        the same as the audit and the Sentry callback use.
    type: str
  return_previous:
    description:
      - Return C(previous), the value every key of O(values) had before the change (as C(dotenv) reads
        it), so that it can be restored later (failback restores exactly what was there).
      - The values are secrets, so the task must have C(no_log=true). Ansible then hides the result
        from every output while C(register) still gets it. The module fails without it (a module
        cannot hide its own result, Ansible drops an C(_ansible_no_log) a module returns). Store the
        values only where secrets may be stored (the failover state file is 0600).
    type: bool
    default: false
  record_path:
    description:
      - Before the file is changed, write a JSON record to this path, so that whoever undoes the change later
        (a failback, or a person after a crash) knows what was there. It holds O(record_data) and, under
        C(env), what RV(previous) holds (the values before the change, secrets included).
      - It is written, with mode 0600 in a directory created 0700 when missing, staged and renamed into place
        and fsynced, after the edit was planned and found safe and before the dotenv file is touched, even
        when no key changes; a crash leaves the record without the edit, never the edit without the record.
      - One module call instead of three tasks (read the values, create the directory, write the record).
    type: path
  record_data:
    description: The rest of the record written to O(record_path) (shown in the task's arguments, so no secrets).
    type: dict
    default: {}
extends_documentation_fragment:
  - ansible.builtin.files
attributes:
  check_mode:
    support: full
    details: Reports what would change (C(changed), C(changed_keys), the diff) and writes nothing, not even the backup or the record.
  diff_mode:
    support: full
    details: Before and after text of the file, the values of secret keys masked.
notes:
  - Compared with M(community.general.ini_file), this module knows dotenv quoting, so C(KEY="a") and
    C(KEY=a) are the same value.
  - Comments are kept verbatim, so do not keep secrets in comments.
seealso:
  - name: dotenv's parser
    description: The rules this module reads files with.
    link: https://github.com/motdotla/dotenv/blob/master/lib/main.js
"""

EXAMPLES = r"""
- name: Fail over to the file auth store, keeping what was there for the failback
  baileys_env_file:
    path: /srv/baileys/.env
    values:
      USE_LEGACY_SUPABASE: "false"
      USE_DATABASE_AUTH_STATE: "false"
      USE_REPOSITORY_PATTERN: "false"
    backup: true
    return_previous: true
  no_log: true            # required with return_previous
  register: env_switch

- name: Fail back, restoring exactly the previous values (a key that was absent is removed again)
  baileys_env_file:
    path: /srv/baileys/.env
    values: "{{ dict(env_switch.previous.keys()
                     | zip(env_switch.previous.values() | map(attribute='value'))) }}"
  no_log: true

- name: Rotate the database password (never shown in the diff)
  baileys_env_file:
    path: /srv/baileys/.env
    values:
      POSTGRES_PASSWORD: "{{ vault_postgres_password }}"
    mode: "0600"
    owner: baileys
    group: baileys

- name: Remove a stale key
  baileys_env_file:
    path: /srv/baileys/.env
    values:
      OLD_FLAG: null
"""

RETURN = r"""
path:
  description: The file edited (after following a symbolic link).
  returned: always
  type: str
  sample: /srv/baileys/.env
changed_keys:
  description: Names of the keys whose value was (or, in check mode, would be) set or removed. Never values.
  returned: always
  type: list
  elements: str
  sample: [USE_LEGACY_SUPABASE, USE_DATABASE_AUTH_STATE]
created:
  description: Whether the file was (or would be) created.
  returned: always
  type: bool
duplicates:
  description: Keys defined more than once in the file before the change.
  returned: always
  type: list
  elements: str
previous:
  description:
    - By key of O(values), what the file held before the change; C(value) is C(null) when C(present)
      is false. Holds secrets, so it is only returned to a task with C(no_log=true).
  returned: when O(return_previous=true)
  type: dict
  sample: {USE_LEGACY_SUPABASE: {present: true, value: "true"}, USE_REPOSITORY_PATTERN: {present: false, value: null}}
file_changed:
  description: Whether the dotenv file itself was (or would be) changed; C(changed) also counts the record.
  returned: always
  type: bool
record_path:
  description: The record written (or, in check mode, that would be written) before the change.
  returned: when O(record_path) is given
  type: str
backup_file:
  description: The backup made before the change.
  returned: when O(backup=true) and the file was changed
  type: str
  sample: /srv/baileys/.env.4242.2025-11-20@09:00:00~
"""

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.baileys_dr_dotenv import DotenvDocument, EnvFile, EnvFileError, env_file_argument_spec  # noqa: F401
from ansible.module_utils.baileys_dr_secrets import MASK
from ansible.module_utils.common.text.converters import to_native
from ansible.module_utils.baileys_dr_renames import warn_if_renamed


class EnvFileModule(AnsibleModule):
    """AnsibleModule that never logs the values to the target's syslog (values is not no_log:
    masking every value string, such as "false", everywhere in the result would garble it)."""

    def _log_invocation(self):
        params = self.params
        self.params = dict(params, values={key: MASK for key in params.get("values") or {}})
        try:
            super()._log_invocation()
        finally:
            self.params = params


def main():
    module = EnvFileModule(
        argument_spec=env_file_argument_spec(),
        # mode, owner, group, SELinux context, attributes, unsafe_writes: the standard file arguments, as ini_file takes them.
        add_file_common_args=True,
        supports_check_mode=True,
    )
    warn_if_renamed(module)
    # Until the secret pattern is known to compile, the echo of the arguments hides every value.
    invocation = dict(module_args=dict(module.params, values={key: MASK for key in module.params["values"]}))
    try:
        env_file = EnvFile(module)
        invocation = env_file.invocation()
        module.exit_json(invocation=invocation, **env_file.run())
    except EnvFileError as exc:
        module.fail_json(msg=to_native(exc), invocation=invocation)
    except PermissionError as exc:
        module.fail_json(msg="permission denied on %s: %s" % (exc.filename or module.params["path"], exc.strerror),
                         invocation=invocation)


if __name__ == "__main__":
    main()
