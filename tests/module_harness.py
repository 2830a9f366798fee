"""community.general's unit-test harness for modules: set_module_args, exit/fail as exceptions."""

from __future__ import annotations

import contextlib
import json

from ansible.module_utils import basic
from ansible.module_utils.common.text.converters import to_bytes


class AnsibleExitJson(Exception):
    def __init__(self, kwargs):
        super().__init__(kwargs)
        self.result = kwargs


class AnsibleFailJson(Exception):
    def __init__(self, kwargs):
        super().__init__(kwargs)
        self.result = kwargs


def _exit_json(self, **kwargs):
    kwargs.setdefault("changed", False)
    raise AnsibleExitJson(kwargs)


def _fail_json(self, **kwargs):
    kwargs["failed"] = True
    raise AnsibleFailJson(kwargs)


@contextlib.contextmanager
def set_module_args(args, check_mode=False):
    """Run a module's main() with these arguments inside the block."""
    args = dict(args)
    args["_ansible_check_mode"] = check_mode
    args.setdefault("_ansible_remote_tmp", "/tmp")
    args.setdefault("_ansible_keep_remote_files", False)
    # Imported here: bench/benchmark.py runs modules through this harness, and unittest.mock costs ~0.1 s to import.
    from unittest import mock

    serialized = to_bytes(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
    with mock.patch.object(basic, "_ANSIBLE_ARGS", serialized), \
            mock.patch.object(basic, "_ANSIBLE_PROFILE", "legacy", create=True), \
            mock.patch.multiple(basic.AnsibleModule, exit_json=_exit_json, fail_json=_fail_json):
        yield


def run_module(module, args, check_mode=False):
    """main() of module with args: (True, result) on exit_json, (False, result) on fail_json."""
    with set_module_args(args, check_mode=check_mode):
        try:
            module.main()
        except AnsibleExitJson as exc:
            return True, exc.result
        except AnsibleFailJson as exc:
            return False, exc.result
    raise AssertionError("the module returned without exit_json or fail_json")
