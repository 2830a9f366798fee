"""Every module documents itself the way ansible-doc and AWX read it."""

from __future__ import annotations

import ast
import glob
import importlib
import os
import sys

import pytest
import yaml

from conftest import ROOT

LIBRARIES = [os.path.join(ROOT, "library")] + sorted(glob.glob(os.path.join(ROOT, "roles", "*", "library")))
# Module name -> its file: the collection's modules and those a role ships (not the links that keep old names).
MODULE_FILES = {
    f[:-3]: os.path.join(directory, f)
    for directory in LIBRARIES for f in sorted(os.listdir(directory))
    if f.endswith(".py") and not os.path.islink(os.path.join(directory, f))
}
MODULES = sorted(MODULE_FILES)
# What ansible-doc assumes when DOCUMENTATION leaves an attribute out, as AnsibleModule does for the spec.
OPTION_DEFAULTS = {"type": "str", "default": None, "choices": None, "aliases": [], "required": False, "elements": None}


def doc_strings(name):
    with open(MODULE_FILES[name], encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and node.targets[0].id in ("DOCUMENTATION", "EXAMPLES", "RETURN"):
            found[node.targets[0].id] = node.value.value
    return found


class _SpecBuilt(Exception):
    """Raised by the patched AnsibleModule.__init__: main() built its spec, nothing else runs."""


def argument_spec_of(name):
    """The argument spec main() really hands to AnsibleModule (its subclasses included), read without running the module."""
    from unittest import mock

    from ansible.module_utils import basic

    def capture(self, argument_spec, **kwargs):
        raise _SpecBuilt(argument_spec)

    directory = os.path.dirname(MODULE_FILES[name])
    if directory not in sys.path:
        sys.path.insert(0, directory)
    module = importlib.import_module(name)
    with mock.patch.object(basic.AnsibleModule, "__init__", capture):
        try:
            module.main()
        except _SpecBuilt as built:
            return built.args[0]
    raise AssertionError("%s: main() never built an AnsibleModule" % name)


def documented_options(name):
    """Options as ansible-doc shows them: the module's own plus those of its doc fragments."""
    documentation = yaml.safe_load(doc_strings(name)["DOCUMENTATION"])
    options = {}
    if "baileys_dr_postgres" in (documentation.get("extends_documentation_fragment") or []):
        options.update(_connection_fragment_options())
    options.update(documentation.get("options") or {})
    return options


def _connection_fragment_options():
    sys.path.insert(0, os.path.join(ROOT, "plugins", "doc_fragments"))
    try:
        from baileys_dr_postgres import ModuleDocFragment
    finally:
        sys.path.remove(os.path.join(ROOT, "plugins", "doc_fragments"))
    return yaml.safe_load(ModuleDocFragment.DOCUMENTATION)["options"]


def _attribute(option, attribute):
    value = option.get(attribute, OPTION_DEFAULTS[attribute])
    return sorted(value or []) if attribute == "aliases" else value


@pytest.mark.parametrize("name", MODULES)
def test_documentation_examples_and_return_parse(name):
    docs = doc_strings(name)
    assert set(docs) == {"DOCUMENTATION", "EXAMPLES", "RETURN"}
    documentation = yaml.safe_load(docs["DOCUMENTATION"])
    assert documentation["module"] == name
    assert {"check_mode", "diff_mode"} <= set(documentation["attributes"])
    yaml.safe_load(docs["EXAMPLES"])
    yaml.safe_load(docs["RETURN"])


@pytest.mark.parametrize("name", MODULES)
def test_documented_options_are_exactly_the_options_the_module_accepts(name):
    """ansible-doc and the argument spec cannot drift apart: a renamed, added or removed option fails here."""
    spec = argument_spec_of(name)
    documented = documented_options(name)
    assert sorted(set(documented) - set(spec)) == [], "%s documents options its argument spec lacks" % name
    assert sorted(set(spec) - set(documented)) == [], "%s accepts options DOCUMENTATION does not describe" % name


@pytest.mark.parametrize("name", MODULES)
def test_documented_type_default_choices_and_aliases_are_those_the_module_applies(name):
    spec = argument_spec_of(name)
    documented = documented_options(name)
    drift = [
        "%s.%s: spec %r, documented %r" % (option, attribute, _attribute(spec[option], attribute), _attribute(documented[option], attribute))
        for option in sorted(set(spec) & set(documented))
        for attribute in OPTION_DEFAULTS
        if _attribute(spec[option], attribute) != _attribute(documented[option], attribute)
    ]
    assert drift == [], "%s: %s" % (name, "; ".join(drift))


def test_the_connection_doc_fragment_documents_exactly_the_shared_connection_options():
    import sys

    sys.path.insert(0, os.path.join(ROOT, "plugins", "doc_fragments"))
    from baileys_dr_postgres import ModuleDocFragment

    from ansible.module_utils.baileys_dr_postgres import postgres_argument_spec

    documented = yaml.safe_load(ModuleDocFragment.DOCUMENTATION)["options"]
    spec = postgres_argument_spec()
    assert set(documented) == set(spec)
    for name, option in spec.items():
        assert documented[name]["type"] == option["type"], name
        assert documented[name].get("default") == option.get("default"), name
        assert sorted(documented[name].get("aliases", [])) == sorted(option.get("aliases", [])), name


@pytest.mark.parametrize("name", MODULES)
def test_modules_with_database_options_use_the_connection_doc_fragment(name):
    from ansible.module_utils.baileys_dr_postgres import postgres_argument_spec

    if set(postgres_argument_spec()) & set(argument_spec_of(name)):
        documentation = yaml.safe_load(doc_strings(name)["DOCUMENTATION"])
        fragments = documentation.get("extends_documentation_fragment") or []
        assert "baileys_dr_postgres" in fragments
        assert "login_password" not in (documentation.get("options") or {}), "document the connection once, in the fragment"


def test_every_old_module_name_is_a_link_to_its_new_module_and_every_link_is_a_listed_rename():
    """A renamed module keeps its old name for one release: a link in library/ the deprecation warning knows."""
    from ansible.module_utils.baileys_dr_renames import RENAMED_MODULES

    links = {
        f[:-3]: os.readlink(os.path.join(directory, f))[:-3]
        for directory in LIBRARIES for f in os.listdir(directory) if os.path.islink(os.path.join(directory, f))
    }
    assert links == RENAMED_MODULES
    assert set(RENAMED_MODULES.values()) <= set(MODULES)
