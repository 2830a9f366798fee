"""The test bed's execution environment recipe (testbed/images/ee) builds what execution-environment.yml defines.

ansible-builder's scripts need dnf or microdnf, so the Debian base of the test bed gets an equivalent recipe:
these checks fail when execution-environment.yml changes (a pin, a requirements file, a system package, an
environment variable, the user) and the recipe or its build step does not follow. What the built image holds
is checked by tests/integration/test_awx_jobs.py.
"""

from __future__ import annotations

import os
import re

import yaml

from conftest import ROOT

DOCKERFILE = open(os.path.join(ROOT, "testbed", "images", "ee", "Dockerfile"), encoding="utf-8").read()
BUILD_IMAGES = open(os.path.join(ROOT, "testbed", "bin", "build-images"), encoding="utf-8").read()
DEFINITION = yaml.safe_load(open(os.path.join(ROOT, "execution-environment.yml"), encoding="utf-8"))
# bindep's (dnf) names and their Debian packages.
DEBIAN_NAMES = {"openssh-clients": "openssh-client", "git-core": "git"}


def instructions():
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.splitlines() if not line.lstrip().startswith("#")))
    return [line.strip() for line in text.splitlines() if line.strip()]


def build_ee():
    return re.search(r"^build_ee\(\) \{\n(.*?)^\}", BUILD_IMAGES, re.S | re.M).group(1)


def test_every_final_build_step_of_the_definition_is_in_the_recipe():
    steps = DEFINITION["additional_build_steps"]["append_final"]
    recipe = instructions()
    for step in steps:
        assert step.strip() in recipe, step
    assert not set(DEFINITION["additional_build_steps"]) - {"append_final"}, "a build step the recipe does not mirror"


def test_the_recipe_runs_as_the_definitions_user():
    users = [line.split()[1] for line in instructions() if line.startswith("USER ")]
    assert users == [str(DEFINITION["options"]["user"])]
    assert instructions()[-1].startswith("USER "), "the user of the final stage, as ansible-builder writes it"


def test_the_python_requirements_and_pins_are_the_definitions():
    deps = DEFINITION["dependencies"]
    body = build_ee()
    # The requirements file of the definition is what the recipe installs, with the two pinned packages.
    assert 'cp "$project/%s" "$ctx/requirements.txt"' % deps["python"] in body
    assert "-r /tmp/ee/install-refs.txt -r /tmp/ee/requirements.txt" in " ".join(instructions())
    for key in ("ansible_core", "ansible_runner"):
        assert re.match(r"ansible-(core|runner)==[\d.]+$", deps[key]["package_pip"]), deps[key]
    assert "package_pip:" in body and "ansible-\\(core\\|runner\\)" in body
    assert set(deps) == {"python_interpreter", "ansible_core", "ansible_runner", "python", "system"}, \
        "a dependency section the recipe does not mirror"
    # Bookworm's python3 is the 3.11 the definition asks for.
    assert deps["python_interpreter"]["python_path"] == "/usr/bin/python3.11"


def test_no_collection_comes_from_galaxy():
    assert "galaxy" not in DEFINITION["dependencies"]
    assert "ansible-galaxy collection install" not in DOCKERFILE


def test_every_system_package_of_bindep_has_its_debian_package_in_the_recipe():
    bindep = open(os.path.join(ROOT, DEFINITION["dependencies"]["system"]), encoding="utf-8").read()
    names = [line.split()[0] for line in bindep.splitlines() if line.strip() and not line.startswith("#")]
    install = next(line for line in instructions() if "apt-get install" in line)
    for name in names:
        assert name in DEBIAN_NAMES, "no Debian name for the bindep package %s" % name
        assert re.search(r"\s%s(\s|;)" % re.escape(DEBIAN_NAMES[name]), install), name


def test_the_callback_plugins_are_copied_as_the_definition_says():
    files = DEFINITION["additional_build_files"]
    assert files == [{"src": "callback_plugins/*.py", "dest": "callback_plugins"}]
    assert 'cp "$project"/callback_plugins/*.py "$ctx/_build/callback_plugins/"' in build_ee()


def test_the_image_tag_changes_with_the_definition_its_requirements_and_callbacks():
    body = build_ee()
    for hashed in ('"$project/execution-environment.yml"', '"$project/awx/ee/requirements.txt"',
                   '"$project/callback_plugins"', '"$images/ee"', "${HASH[base]}"):
        assert hashed in body.split("hash=$(", 1)[1].split("| sha_stdin", 1)[0], hashed
