"""`ansible-builder create` turns execution-environment.yml into a build context, offline.

No image is built (no registry is reachable here); the context is what
`podman build`/`docker build` would get, and it is checked for what AWX jobs
need: the pinned Python packages with the `ansible` bundle (the collections),
no Galaxy step, the project's callback plugins, and the environment that
enables them under ansible-runner.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT

BUILDER = os.path.join(os.path.dirname(sys.executable), "ansible-builder")


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    out = tmp_path_factory.mktemp("ee") / "context"
    # No proxy, no DNS needed: create never touches the network.
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    run = subprocess.run(
        [BUILDER, "create", "-f", os.path.join(ROOT, "execution-environment.yml"), "-c", str(out),
         "--output-filename", "Containerfile", "-v", "3"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    return out


def containerfile(context):
    return (context / "Containerfile").read_text()


def test_create_writes_a_containerfile_from_the_chosen_base_image(context):
    text = containerfile(context)
    definition = yaml.safe_load(open(os.path.join(ROOT, "execution-environment.yml"), encoding="utf-8"))
    assert definition["version"] == 3
    assert 'ARG EE_BASE_IMAGE="%s"' % definition["images"]["base_image"]["name"] in text
    assert re.search(r'ARG ANSIBLE_INSTALL_REFS="ansible-core==[\d.]+ ansible-runner==[\d.]+"', text)


def test_the_build_never_asks_ansible_galaxy(context):
    text = containerfile(context)
    assert "ansible-galaxy" not in text
    assert not (context / "_build" / "requirements.yml").exists()


def test_python_requirements_include_the_ansible_bundle_and_the_runtime_packages(context):
    shipped = (context / "_build" / "requirements.txt").read_text()
    with open(os.path.join(ROOT, "awx", "ee", "requirements.txt"), encoding="utf-8") as fh:
        assert shipped == fh.read()
    for package in ("ansible==", "psycopg2-binary==", "sentry-sdk==", "prometheus-client=="):
        assert re.search(r"^%s" % re.escape(package), shipped, re.M), package
    assert "COPY _build/requirements.txt requirements.txt" in containerfile(context)


def test_system_packages_come_from_bindep(context):
    bindep = (context / "_build" / "bindep.txt").read_text()
    assert "openssh-clients" in bindep
    assert "--user-bindep=bindep.txt" in containerfile(context)


def test_the_sentry_callback_is_baked_in_and_enabled_through_the_environment(context):
    baked = context / "_build" / "callback_plugins" / "baileys_dr_sentry.py"
    with open(os.path.join(ROOT, "callback_plugins", "baileys_dr_sentry.py"), "rb") as fh:
        assert baked.read_bytes() == fh.read()
    text = containerfile(context)
    assert "COPY _build/callback_plugins/ /usr/share/ansible/plugins/callback/" in text
    env = dict(re.findall(r"^ENV (ANSIBLE_\w+)=(\S+)$", text, re.M))
    assert env["ANSIBLE_CALLBACK_PLUGINS"] == "/runner/project/callback_plugins:/usr/share/ansible/plugins/callback"
    assert "baileys_dr_sentry" in env["ANSIBLE_CALLBACKS_ENABLED"].split(",")
    # The final stage runs as a non-root user, as AWX expects.
    assert text.rstrip().splitlines()[-3:][0] == "USER 1000"


def ee_env():
    with open(os.path.join(ROOT, "execution-environment.yml"), encoding="utf-8") as fh:
        steps = yaml.safe_load(fh)["additional_build_steps"]["append_final"]
    return dict(step[4:].split("=", 1) for step in steps if step.startswith("ENV "))


def run_like_ansible_runner(tmp_path, callback_plugins, callbacks_enabled):
    """Run a playbook from the project directory with the environment ansible-runner gives it in the EE.

    ansible-runner (AWX) sets ANSIBLE_STDOUT_CALLBACK to its own display callback and
    ANSIBLE_CALLBACK_PLUGINS to the image's value followed by its own directory; the
    project's ansible.cfg is read as usual (AWX runs in the project checkout).
    """
    runner_dir = tmp_path / "runner-callbacks"
    runner_dir.mkdir(exist_ok=True)
    playbook = tmp_path / "probe.yml"
    playbook.write_text("---\n- name: Probe\n  hosts: localhost\n  gather_facts: false\n  tasks:\n"
                        "    - name: Say hello\n      ansible.builtin.debug:\n        msg: hello\n")
    audit = tmp_path / "audit.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "SENTRY_", "BAILEYS_DR_"))}
    env.update({
        "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.minimal",
        "ANSIBLE_CALLBACK_PLUGINS": ":".join(filter(None, (callback_plugins, str(runner_dir)))),
        "BAILEYS_DR_AUDIT_LOG": str(audit),
        "ANSIBLE_NOCOLOR": "1",
    })
    if callbacks_enabled is not None:
        env["ANSIBLE_CALLBACKS_ENABLED"] = callbacks_enabled
    run = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ansible-playbook"), str(playbook),
                          "-i", "localhost,", "-c", "local"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    return run, audit


def test_the_ee_environment_loads_the_project_callbacks_under_ansible_runner(tmp_path):
    env = ee_env()
    # /runner/project is where AWX checks the project out; here it is this checkout.
    plugins = env["ANSIBLE_CALLBACK_PLUGINS"].replace("/runner/project", ROOT)
    run, audit = run_like_ansible_runner(tmp_path, plugins, env["ANSIBLE_CALLBACKS_ENABLED"])
    events = [json.loads(line)["event"] for line in audit.read_text().splitlines()]
    assert events[0] == "playbook_start" and events[-1] == "playbook_end"
    # The Sentry callback loaded too: without a DSN it says once that it is disabled.
    assert (run.stdout + run.stderr).count("baileys_dr_sentry callback disabled: no DSN") == 1


def test_without_the_project_directory_in_the_variable_the_callbacks_are_lost(tmp_path):
    # ansible.cfg names callback_plugins, but ansible-runner's variable replaces it:
    # a plain image gets only ansible-runner's directory.
    run, audit = run_like_ansible_runner(tmp_path, "", ee_env()["ANSIBLE_CALLBACKS_ENABLED"])
    assert not audit.exists()
    assert "baileys_dr_audit" in run.stdout + run.stderr  # ansible-core warns that it cannot load it


def test_the_debian_recipe_of_the_test_bed_has_every_final_step_of_the_generated_containerfile(context):
    """testbed/images/ee/Dockerfile (the EE on the test bed's Debian base) ends like ansible-builder's final stage.

    ansible-builder's own steps (its scripts, bindep, the entrypoint that adds a passwd entry) need dnf; the
    definition's steps, the runner directory, the labels, the user and the command must be the same.
    """
    with open(os.path.join(ROOT, "testbed", "images", "ee", "Dockerfile"), encoding="utf-8") as fh:
        recipe = {line.strip() for line in fh if line.strip() and not line.startswith("#")}
    final = containerfile(context).split("FROM base AS final", 1)[1].splitlines()
    for line in final:
        if line.startswith(("COPY _build/", "ENV ANSIBLE_", "LABEL ", "USER ", "WORKDIR ", "CMD ")):
            assert line in recipe, line
    refs = re.search(r'^ARG ANSIBLE_INSTALL_REFS="([^"]+)"', containerfile(context), re.M).group(1).split()
    definition = yaml.safe_load(open(os.path.join(ROOT, "execution-environment.yml"), encoding="utf-8"))
    assert refs == [definition["dependencies"][k]["package_pip"] for k in ("ansible_core", "ansible_runner")]
