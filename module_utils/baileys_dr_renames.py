# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The module names 0.4.0 changed (docs/architecture.md, "Names"): the old name still runs the module, as a link in
library/ (and plugins/action/ for the lease), with a warning naming the new name, until REMOVED_IN."""

from __future__ import annotations

REMOVED_IN = "0.5.0"

# Old name -> new name.
RENAMED_MODULES = {
    "baileys_dr_lock": "baileys_lock",
    "baileys_dr_prune": "baileys_prune",
    "env_file": "baileys_env_file",
    "git_tag_verify": "baileys_git_tag",
    "pm2_process": "baileys_pm2_process",
}


def warn_if_renamed(module):
    """Warn a task that calls the module by its old name (AnsibleModule._name: the name the task used)."""
    called = (getattr(module, "_name", None) or "").rsplit(".", 1)[-1]
    new = RENAMED_MODULES.get(called)
    if new:
        # A warning, not module.deprecate(): ansible-core would name itself as the one removing the name.
        module.warn("the module %s is now called %s; the old name stops working in baileys-dr %s"
                    % (called, new, REMOVED_IN))
