"""Every module documents itself the way ansible-doc and AWX read it."""

from __future__ import annotations

import ast
import os

import pytest
import yaml

from conftest import ROOT

MODULES = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "library")) if f.endswith(".py"))


def doc_strings(name):
    with open(os.path.join(ROOT, "library", name + ".py"), encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and node.targets[0].id in ("DOCUMENTATION", "EXAMPLES", "RETURN"):
            found[node.targets[0].id] = node.value.value
    return found


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
def test_documented_options_match_the_argument_spec(name):
    """ansible-doc and the argument spec cannot drift apart."""
    import importlib

    module = importlib.import_module(name)
    documentation = yaml.safe_load(module.DOCUMENTATION)
    documented = set(documentation.get("options") or {})
    source = open(os.path.join(ROOT, "library", name + ".py"), encoding="utf-8").read()
    for option in documented:
        assert option in source, "%s documents %s but never uses it" % (name, option)


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
    source = open(os.path.join(ROOT, "library", name + ".py"), encoding="utf-8").read()
    if "postgres_argument_spec()" in source:
        documentation = yaml.safe_load(doc_strings(name)["DOCUMENTATION"])
        fragments = documentation.get("extends_documentation_fragment") or []
        assert "baileys_dr_postgres" in fragments
        assert "login_password" not in (documentation.get("options") or {}), "document the connection once, in the fragment"
