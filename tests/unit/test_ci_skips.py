"""A skip is never silent in CI: CI=true makes it a failure naming the reason; elsewhere it stays a skip."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT

ENVIRONMENT_DEPENDENT = '''
import shutil

import pytest


@pytest.mark.skipif(True, reason="git is not installed (pretend)")
def test_marked_skip():
    pass


def test_imperative_skip():
    pytest.skip("mounting a tmpfs needs root (pretend)")


@pytest.mark.xfail(reason="a known bug, not an environment")
def test_expected_failure():
    assert False
'''


def run_pytest(tmp_path, ci):
    (tmp_path / "test_environment.py").write_text(ENVIRONMENT_DEPENDENT, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = os.path.join(ROOT, "tests")
    # The suite's own conftest loaded as a plugin; the run's rootdir is tmp_path, so nothing else of the suite is collected.
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "conftest", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), str(tmp_path)],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("ci", ["true", "1", "TRUE"])
def test_under_ci_every_skip_fails_with_its_reason(tmp_path, ci):
    done = run_pytest(tmp_path, ci)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "git is not installed (pretend)" in done.stdout and "mounting a tmpfs needs root (pretend)" in done.stdout
    assert "skipped under CI=true" in done.stdout
    assert "1 xfailed" in done.stdout, "an expected failure is not an environment skip"


def test_outside_ci_a_skip_stays_a_skip_and_is_listed(tmp_path):
    done = run_pytest(tmp_path, None)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 skipped" in done.stdout and "git is not installed (pretend)" in done.stdout
