# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Action plugin of baileys_dr_lock: the control-node lock taken inside the controller.

The roles delegate the lock to localhost; running a module for it costs a Python process that imports
AnsibleModule (about 0.3 s per call, before the failover's service is down). This plugin does the same work
(module_utils/baileys_dr_lockfile.py, the code the module runs) in the ansible-playbook worker, always on the
control node. The holder it records is the same outermost ansible-playbook process the module finds, so a
lock taken by either is kept or released by the other, and a killed run still leaves no live lock.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from ansible.errors import AnsibleActionFail
from ansible.plugins.action import ActionBase
from ansible.plugins.loader import module_utils_loader

def _module_util(name):
    """The project's module_utils/<name>.py (found in the configured module_utils path), imported under the
    name modules see it by; the worker process ends with the task, so nothing outlives it."""
    full = "ansible.module_utils." + name
    if full not in sys.modules:
        path = module_utils_loader.find_plugin(name, mod_type=".py")
        if not path:
            raise AnsibleActionFail("module_utils/%s.py is not in the module_utils path (ansible.cfg module_utils, "
                                    "ANSIBLE_MODULE_UTILS)" % name)
        spec = importlib.util.spec_from_file_location(full, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
    return sys.modules[full]


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = False

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        _module_util("baileys_dr_fs")
        lockfile = _module_util("baileys_dr_lockfile")
        # Unknown options are refused by the validation (no _VALID_ARGS: the spec lives in module_utils).
        _, args = self.validate_argument_spec(argument_spec=lockfile.ARGUMENT_SPEC)
        check_mode = bool(self._task.check_mode) if self._task.check_mode is not None else self._play_context.check_mode
        try:
            # Walk up from this worker (a fork of ansible-playbook); an ad-hoc run is held by its ansible process.
            lock = lockfile.Lock(args["name"], args["lock_dir"], operation=args["operation"], force=args["force"],
                                 check_mode=check_mode, start_pid=os.getpid(), fallback_pid=os.getppid())
            result.update(lock.run(args["state"]))
        except lockfile.LockError as exc:
            result.update(exc.fields, failed=True, msg=str(exc))
        return result
