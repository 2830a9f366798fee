# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Action plugin of baileys_lock (and of baileys_dr_lock, its name before 0.4.0, a link to this file): names the run on
the control node, then runs the module on the application host.

The lease lives on the application host (module_utils/baileys_dr_lockfile.py), where every control node sees it. Who
holds it is only known here, on the control node: the outermost ansible-playbook (or ansible-runner) process above
this worker, its machine (boot id, pid namespace) and the AWX job id. That holder is passed to the module, so all
tasks and hosts of one run share one run id, and a host that is its own control node can tell at once that the holder's
process is gone.
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
    """baileys_lock (and its old name baileys_dr_lock), and baileys_failover_arming (the same file under its name):
    the holder of the lease is named here, on the control node, then the module runs on the host."""

    TRANSFERS_FILES = False

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        module_name = self._task.action.rsplit(".", 1)[-1]
        module_args = dict(self._task.args)
        # The lease module under its name or its old one (module_utils/baileys_dr_renames.py).
        if _module_util("baileys_dr_renames").RENAMED_MODULES.get(module_name, module_name) == "baileys_lock":
            lockfile = self._lockfile()
            # Unknown options are refused by the validation (no _VALID_ARGS: the spec lives in module_utils).
            self.validate_argument_spec(argument_spec=lockfile.ARGUMENT_SPEC)
            if not module_args.get("holder"):
                module_args["holder"] = self._holder(lockfile)
        elif isinstance(module_args.get("lease"), dict) and not module_args["lease"].get("holder"):
            # A module that takes a lease in its own run (baileys_failover_arming's lease option).
            module_args["lease"] = dict(module_args["lease"], holder=self._holder(self._lockfile()))
        result.update(self._execute_module(module_name=module_name, module_args=module_args, task_vars=task_vars))
        # As the normal action does: the remote temporary directory a run without pipelining made.
        self._remove_tmp_path(self._connection._shell.tmpdir)
        return result

    @staticmethod
    def _lockfile():
        _module_util("baileys_dr_fs")
        return _module_util("baileys_dr_lockfile")

    @staticmethod
    def _holder(lockfile):
        # Walk up from this worker (a fork of ansible-playbook); an ad-hoc run is held by its ansible process.
        return lockfile.holder_identity(os.getpid(), os.getppid(), fallback_lives=True)
