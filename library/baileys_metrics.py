#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: baileys_metrics
short_description: Write baileys-dr metrics to a Prometheus textfile (node_exporter textfile collector)
description:
  - Sets gauges and counters in a C(.prom) file that node_exporter's textfile collector exposes.
  - With O(merge) (the default) the existing file is parsed with prometheus_client's parser and every sample this call
    does not set is kept, so, for example, the last success timestamp survives a failed run. A metric with
    C(increment) adds its value to the sample already in the file (cumulative counters such as keys exported).
  - The text is rendered by prometheus_client (a C(CollectorRegistry) with one collector yielding the families), sorted
    so that the same metrics always give the same text; C(changed) is true when the text, owner, group or mode differ
    (a timestamp metric therefore changes the file on every run).
  - The file is replaced atomically and durably (temporary file in the same directory, fsync, rename, fsync of the
    directory); node_exporter never reads a half-written file, and the temporary name does not end in C(.prom).
    prometheus_client's own C(write_to_textfile) renames too but does not fsync nor set the mode before the rename,
    so it is not used.
  - Bad input fails naming it; names must start with C(baileys_dr_), counters must end with C(_total) and gauges must
    not, label names must be valid Prometheus label names (not starting with C(__)).
version_added: "0.1.0"
author: baileys-dr contributors
requirements:
  - prometheus_client on the target (Debian package C(python3-prometheus-client))
options:
  path:
    description: The textfile; it should end in C(.prom). Its directory must exist, unless O(create_dir).
    type: path
    required: true
  create_dir:
    description:
      - Create the textfile's directory (and its parents, mode C(0755)) when it is missing, so that a report costs one
        module run. In check mode the directory is reported as to be created, not made.
    type: bool
    default: false
  metrics:
    description: The samples to set.
    type: list
    elements: dict
    required: true
    suboptions:
      name:
        description: Metric (sample) name, C(baileys_dr_...); counters end with C(_total).
        type: str
        required: true
      type:
        description: Prometheus type.
        type: str
        choices: [gauge, counter]
        default: gauge
      help:
        description: HELP text of the family (the same for every file holding the family).
        type: str
        required: true
      value:
        description: The value (a number).
        type: raw
        required: true
      labels:
        description: Label names and values of the sample.
        type: dict
        default: {}
      increment:
        description: Add O(metrics[].value) to the value the file holds for the same name and labels (with O(merge)).
        type: bool
        default: false
  merge:
    description: Keep the samples of the existing file that this call does not set; when false the file holds only O(metrics).
    type: bool
    default: true
extends_documentation_fragment:
  - ansible.builtin.files
attributes:
  check_mode:
    support: full
    details: Reports whether the file would change (and the diff); writes nothing.
  diff_mode:
    support: full
    details: Shows the text before and after.
notes:
  - O(mode) defaults to C(0644) so that node_exporter, running as its own user, can read the file.
"""

EXAMPLES = r"""
- name: Record the failover in the textfile collector directory
  baileys_metrics:
    path: /var/lib/prometheus/node-exporter/baileys_dr_failover.prom
    metrics:
      - name: baileys_dr_last_success_timestamp_seconds
        help: When the DR operation last succeeded (Unix time).
        value: "{{ now().timestamp() }}"
        labels: {operation: failover}
      - name: baileys_dr_keys_exported_total
        type: counter
        help: Keys written to session files by DR exports.
        value: 4500
        increment: true
        labels: {operation: failover}
"""

RETURN = r"""
path:
  description: The textfile.
  returned: always
  type: str
samples:
  description: Every sample the file holds after the call (or would hold, in check mode).
  returned: always
  type: list
  elements: dict
  sample: [{name: baileys_dr_keys_exported_total, type: counter, labels: {operation: failover}, value: 9000.0}]
content_changed:
  description: Whether the text differs from the file's (owner/group/mode changes aside).
  returned: always
  type: bool
created_dir:
  description: The directory O(create_dir) created (or would create, in check mode).
  returned: when the directory was missing
  type: str
"""

import os

from ansible.module_utils.basic import AnsibleModule, missing_required_lib
from ansible.module_utils.baileys_dr_fs import write_file_atomic
from ansible.module_utils.baileys_dr_metrics import (
    HAS_PROMETHEUS_CLIENT, PROMETHEUS_CLIENT_IMPORT_ERROR, MetricsError, merge, parse, render, samples, validate,
)


class Textfile:
    def __init__(self, module):
        self.module = module
        self.params = module.params
        self.path = self.params["path"]

    def _read(self):
        try:
            with open(self.path, "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            self.module.fail_json(msg="cannot read %s: %s" % (self.path, exc))

    def _initial_mode(self):
        # The mode the temporary file gets before the rename; symbolic modes are applied after it.
        mode = self.params["mode"]
        if mode is None:
            return 0o644
        if isinstance(mode, int):
            return mode
        return int(mode, 8) if str(mode).isdigit() else 0o600

    def run(self):
        directory = os.path.dirname(os.path.abspath(self.path))
        created_dir = None
        if not os.path.isdir(directory):
            if not self.params["create_dir"]:
                self.module.fail_json(msg="path %s: directory %s does not exist" % (self.path, directory))
            try:
                if not self.module.check_mode:
                    os.makedirs(directory, mode=0o755)
            except OSError as exc:
                self.module.fail_json(msg="path %s: directory %s cannot be created: %s"
                                          % (self.path, directory, exc.strerror or exc))
            created_dir = directory
        if os.path.isdir(self.path):
            self.module.fail_json(msg="path %s is a directory" % self.path)
        try:
            wanted = [validate(m, i) for i, m in enumerate(self.params["metrics"])]
            before = self._read()
            existing = parse(before.decode("utf-8"), self.path) if before and self.params["merge"] else {}
            merged = merge(existing, wanted)
        except (MetricsError, UnicodeDecodeError) as exc:
            self.module.fail_json(msg=str(exc))
        after = render(merged)
        content_changed = after != before
        result = dict(path=self.path, samples=samples(merged), content_changed=content_changed,
                      changed=content_changed or created_dir is not None)
        if created_dir is not None:
            result["created_dir"] = created_dir
        if self.module._diff:
            result["diff"] = dict(before_header=self.path, after_header=self.path,
                                  before=(before or b"").decode("utf-8", "replace"), after=after.decode("utf-8"))
        if content_changed and not self.module.check_mode:
            write_file_atomic(self.path, after, mode=self._initial_mode())
        file_args = self.module.load_file_common_arguments(self.params)
        if file_args["mode"] is None:
            file_args["mode"] = "0644"
        if os.path.exists(self.path):
            result["changed"] = self.module.set_fs_attributes_if_different(file_args, result["changed"])
        return result


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", required=True),
            metrics=dict(type="list", elements="dict", required=True, options=dict(
                name=dict(type="str", required=True),
                type=dict(type="str", default="gauge", choices=["gauge", "counter"]),
                help=dict(type="str", required=True),
                value=dict(type="raw", required=True),
                labels=dict(type="dict", default={}),
                increment=dict(type="bool", default=False),
            )),
            merge=dict(type="bool", default=True),
            create_dir=dict(type="bool", default=False),
        ),
        add_file_common_args=True,
        supports_check_mode=True,
    )
    if not HAS_PROMETHEUS_CLIENT:
        module.fail_json(msg=missing_required_lib("prometheus_client (Debian: python3-prometheus-client)"),
                         exception=PROMETHEUS_CLIENT_IMPORT_ERROR)
    module.exit_json(**Textfile(module).run())


if __name__ == "__main__":
    main()
