"""Every role documents each default in meta/argument_specs.yml, with the same value."""

from __future__ import annotations

import os

import pytest
import yaml

from conftest import ROOT

ROLES = sorted(os.listdir(os.path.join(ROOT, "roles")))


def load(role, *parts):
    path = os.path.join(ROOT, "roles", role, *parts)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh) or {}


@pytest.mark.parametrize("role", ROLES)
def test_argument_specs_match_the_defaults(role):
    specs = load(role, "meta", "argument_specs.yml")
    assert specs, "roles/%s has no meta/argument_specs.yml" % role
    options = specs["argument_specs"]["main"].get("options", {})
    defaults = load(role, "defaults", "main.yml") or {}
    assert set(defaults) == set(options), "defaults and argument_specs differ for %s" % role
    for name, value in defaults.items():
        assert options[name].get("default") == value, name
        assert options[name].get("description"), "%s has no description" % name


@pytest.mark.parametrize("role", ROLES)
def test_private_variables_are_prefixed_with_the_role_name(role):
    for part in ("vars", "defaults"):
        for name in load(role, part, "main.yml") or {}:
            prefix = role if part == "defaults" else "__" + role
            assert name.startswith(prefix), "%s/%s: %s" % (role, part, name)
