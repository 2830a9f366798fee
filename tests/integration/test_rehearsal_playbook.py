"""rehearsal.yml refuses an inventory marked production unless told otherwise, before it touches anything."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading

import yaml

from conftest import ROOT


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def readiness_endpoint(doc):
    """An HTTP server answering every GET with doc, as the application's /health does."""
    body = json.dumps(doc).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the http.server API)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def run_rehearsal(tmp_path, environment, *extra, health_port=None):
    state = tmp_path / "state"
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(yaml.safe_dump({"all": {"children": {"baileys_app": {"hosts": {"app1": {
        "ansible_connection": "local", "ansible_python_interpreter": sys.executable,
        "baileys_dr_environment": environment,
        # Nothing listens there: a run that got past the refusal stops at the readiness check.
        "baileys_dr_health_port": health_port or free_port(),
        "baileys_dr_app_root": str(tmp_path / "app"), "baileys_dr_state_dir": str(state),
        "baileys_dr_report_dir": str(tmp_path / "reports"), "baileys_dr_lock_dir": str(tmp_path / "locks"),
        "baileys_dr_audit_log": str(tmp_path / "audit.jsonl"), "baileys_dr_archive_dir": str(tmp_path / "archives"),
        "baileys_dr_metrics_dir": "", "baileys_dr_controller_audit_log": str(tmp_path / "controller-audit.jsonl"),
    }}}}}}))
    env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"), ANSIBLE_NOCOLOR="1")
    playbook = os.path.join(os.path.dirname(sys.executable), "ansible-playbook")
    return subprocess.run([playbook, "-i", str(inventory), os.path.join(ROOT, "playbooks", "rehearsal.yml"), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_a_production_inventory_is_refused_and_nothing_is_touched(tmp_path):
    run = run_rehearsal(tmp_path, "production")
    assert run.returncode != 0
    assert "refusing to rehearse on app1: baileys_dr_environment is 'production'" in run.stdout
    assert "baileys_rehearsal_allow_production=true" in run.stdout
    assert not (tmp_path / "reports").exists() and not (tmp_path / "locks").exists()


def test_an_environment_of_unknown_kind_is_refused(tmp_path):
    run = run_rehearsal(tmp_path, "prod-eu")
    assert run.returncode != 0
    assert "baileys_dr_environment" in run.stdout and "prod-eu" in run.stdout
    assert not (tmp_path / "reports").exists() and not (tmp_path / "locks").exists()


def test_the_explicit_variable_lets_a_production_rehearsal_past_the_refusal(tmp_path):
    run = run_rehearsal(tmp_path, "production", "-e", "baileys_rehearsal_allow_production=true")
    assert run.returncode != 0
    assert "refusing to rehearse" not in run.stdout
    # It went on to the next check: the service must be ready on PostgreSQL before anything is done.
    assert "the rehearsal starts from the normal state" in run.stdout
    assert not (tmp_path / "reports").exists()


def test_check_mode_is_refused_before_anything_is_read(tmp_path):
    run = run_rehearsal(tmp_path, "test", "--check")
    assert run.returncode != 0
    assert "rehearsal.yml cannot run in check mode" in run.stdout
    assert not (tmp_path / "reports").exists() and not (tmp_path / "locks").exists()


def test_a_service_already_on_files_is_refused_asking_for_a_failback_first(tmp_path):
    with readiness_endpoint({"ready": True, "store": "files", "digests": {}}) as port:
        run = run_rehearsal(tmp_path, "test", health_port=port)
    assert run.returncode != 0
    assert "a failover is in effect, run failback.yml first" in run.stdout
    assert not (tmp_path / "reports").exists() and not (tmp_path / "locks").exists()
