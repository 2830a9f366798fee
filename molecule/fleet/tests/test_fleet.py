"""A fleet of three application hosts sharing one PostgreSQL, each with its own companies (issue 18): the hosts fail
over at once, not in turn, each with no acknowledged write lost and serving only its companies; a broken host is refused
alone while the others fail over; everything fails back. converge.yml ran the switches and kept what is read here."""

import json
import os
import sys

import yaml

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "shared"))

import verify_helpers  # noqa: E402
from verify_helpers import (  # noqa: E402
    APP_ROOT, TAG, as_app_user, assert_no_acknowledged_write_lost, assert_writer_saw_the_switch, database_digests, env_values,
    epoch, git_commit_of, git_head, pm2_process, readiness, writer_ledger,
)

# This scenario's own containers (molecule.yml).
APPS = ["baileys-dr-fleet-app1", "baileys-dr-fleet-app2", "baileys-dr-fleet-app3"]
testinfra_hosts = ["ansible://" + name for name in APPS]
verify_helpers.DB_CONTAINER = "baileys-dr-fleet-db"
# converge.yml: the host whose tag was removed before the fourth run.
BROKEN = "baileys-dr-fleet-app2"

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLEET_DIR = os.environ.get("BAILEYS_DR_FLEET_DIR") or os.path.join(os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY", ""), "fleet")


def companies_of(name):
    with open(os.path.join(HERE, "host_vars", name + ".yml"), encoding="utf-8") as fh:
        return yaml.safe_load(fh)["baileys_dr_companies"]


def name_of(host):
    return host.backend.get_hostname()


def runs():
    with open(os.path.join(FLEET_DIR, "runs.json"), encoding="utf-8") as fh:
        return json.load(fh)


def outcomes(run):
    return {h["host"]: h["outcome"] for h in run["report"]["hosts"]}


def kept(host, run):
    """The writer's check converge kept on the host after a run (molecule/shared/tasks/writer_check.yml)."""
    return json.loads(host.file("/root/fleet-writer-%s.json" % run).content_string)


def run_output(name):
    """A run's output, its line breaks and indentation folded (the output callback wraps messages)."""
    with open(os.path.join(FLEET_DIR, name + ".log"), encoding="utf-8") as fh:
        return " ".join(fh.read().split())


# -- the wall times ----------------------------------------------------------------------------------------------------
def test_the_one_host_and_the_three_host_failovers_each_switched_the_hosts_they_ran_on():
    # Not vacuous: the timed runs really failed over (an RTO and a downtime each), the first one host alone.
    one, three = runs()["one-failover"], runs()["all-failover"]
    assert one["rc"] == 0 and outcomes(one) == {APPS[0]: "ok"}, one["report"]
    assert three["rc"] == 0 and outcomes(three) == dict.fromkeys(APPS, "ok"), three["report"]
    for run in (one, three):
        for entry in run["report"]["hosts"]:
            assert entry["rto_seconds"] > 0 and entry["downtime_seconds"] > 0, entry
            assert entry["companies"] == 2 and entry["scope"] == companies_of(entry["host"]), entry


def test_the_timed_failovers_started_armed_from_the_refresh_the_schedule_would_have_made():
    # converge refreshed the standby copies (snapshot.yml) just before each timed run, as the schedule does: each host
    # confirmed its arming record instead of the full preflight, and the refresh is not in the wall time.
    for snapshot, failover, hosts in (("one-snapshot", "one-failover", 1), ("all-snapshot", "all-failover", 3)):
        assert runs()[snapshot]["rc"] == 0 and runs()[snapshot]["ended_at"] <= runs()[failover]["started_at"]
        output = run_output(failover)
        assert output.count("armed since") == hosts and "Not armed" not in output, output[-3000:]


def test_the_three_hosts_failed_over_at_the_same_time_not_in_turn():
    hosts = runs()["all-failover"]["report"]["hosts"]
    # Every host's run overlaps every other's: the last to start started before the first to end ended.
    assert max(h["started_at"] for h in hosts) < min(h["ended_at"] for h in hosts), hosts


# -- all three at once -------------------------------------------------------------------------------------------------
def test_no_write_acknowledged_by_any_host_is_lost_when_all_three_fail_over_at_once(host):
    result = kept(host, "all-failover")
    assert_no_acknowledged_write_lost(result, "files")
    assert_writer_saw_the_switch(result)


def test_the_writer_wrote_to_each_of_the_hosts_companies_before_the_stop_and_after_the_switch(host):
    result, companies = kept(host, "all-failover"), companies_of(name_of(host))
    window, switch = result["stats"]["window"], result["switch"]
    acked = [r for r in writer_ledger(host) if r["outcome"] == "ack"
             and epoch(window["from"]) <= epoch(r["done"]) <= epoch(window["to"])]
    before = {r["company"] for r in acked if epoch(r["done"]) < switch["stop_began_at"]}
    after = {r["company"] for r in acked if epoch(r["sent"]) >= switch["ready_at"]}
    assert before == after == set(companies), (before, after, companies)


def test_each_writer_wrote_only_to_its_hosts_companies(host):
    written = {r["company"] for r in writer_ledger(host)}
    assert written == set(companies_of(name_of(host)))


def test_each_host_on_files_served_only_its_companies_with_the_digests_of_its_files(host):
    quiet, companies = kept(host, "all-failover")["quiet"], companies_of(name_of(host))
    assert sorted(quiet["service"]) == sorted(companies), quiet["service"]
    assert quiet["service"] == quiet["store"]


# -- one host broken ---------------------------------------------------------------------------------------------------
def test_the_broken_hosts_tag_was_really_gone(host):
    if name_of(host) == BROKEN:
        assert json.loads(host.file("/root/fleet-broken.json").content_string)["rev_parse_rc"] == 1
        assert as_app_user(host, "git -C %s rev-parse -q --verify refs/tags/%s" % (APP_ROOT, TAG)).rc == 1
    else:
        assert git_commit_of(host, TAG), "the other hosts keep their tag"


def test_a_run_with_one_broken_host_refuses_only_that_host_and_names_it():
    run = runs()["broken-failover"]
    assert run["rc"] != 0, "a refused host fails the run"
    assert outcomes(run) == {APPS[0]: "ok", BROKEN: "refused", APPS[2]: "ok"}, run["report"]
    assert run["report"]["failed_hosts"] == [BROKEN]
    refused = next(h for h in run["report"]["hosts"] if h["host"] == BROKEN)
    assert TAG in refused["message"], refused
    output = run_output("broken-failover")
    # The run names the host and why: the fleet summary's row and line, and the host's own failure; no other host failed.
    assert "%s REFUSED" % BROKEN in output and "failover of 3 hosts: 2 ok, 1 refused" in output, output[-3000:]
    assert "fatal: [%s]: FAILED!" % BROKEN in output and "tag %s not found" % TAG in output, output[-3000:]
    assert not [name for name in APPS if name != BROKEN and "fatal: [%s]" % name in output]


def test_in_the_broken_run_the_others_failed_over_and_the_refused_host_kept_serving_on_postgresql_with_nothing_lost(host):
    result = kept(host, "broken-failover")
    if name_of(host) != BROKEN:
        assert_no_acknowledged_write_lost(result, "files")
        assert_writer_saw_the_switch(result)
        assert sorted(result["quiet"]["service"]) == sorted(companies_of(name_of(host)))
        return
    check, window, span = result["check"], result["stats"]["window"], result["switch"]
    assert result["store"] == check["store"] == "postgres" and check["passed"] and check["lost"] == 0, check
    # Its service was never stopped: the process PM2 ran before the run still runs, never restarted (the last failback
    # had nothing to do on it), and the writer kept being acknowledged. A request may time out on a loaded machine while
    # the service is slow to answer: not a stop, and not a loss (the check above found every acknowledged write).
    before, process = json.loads(host.file("/root/fleet-broken.json").content_string), pm2_process(host)
    assert (process["pid"], process["pm2_env"]["restart_time"]) == (before["pid"], before["restart_time"]), before
    assert window["acknowledged"] >= 10, window
    ledger = writer_ledger(host)
    during = [r for r in ledger if span["stop_began_at"] <= epoch(r["sent"]) and epoch(r["done"]) <= span["ready_at"]]
    acked = [r for r in during if r["outcome"] == "ack"]
    assert {r["company"] for r in acked} == set(companies_of(BROKEN)), "the writer wrote to both its companies during the run"


# -- all back ----------------------------------------------------------------------------------------------------------
def test_every_failback_brought_its_hosts_back(host):
    assert outcomes(runs()["one-failback"]) == {APPS[0]: "ok"}
    assert outcomes(runs()["all-failback"]) == dict.fromkeys(APPS, "ok")


def test_after_the_last_failback_every_host_is_on_postgresql_with_every_acknowledged_write(host):
    result, companies = kept(host, "last-failback"), companies_of(name_of(host))
    assert_no_acknowledged_write_lost(result, "postgres")
    if name_of(host) != BROKEN:
        # The refused host had nothing to fail back: its service never stopped.
        assert_writer_saw_the_switch(result)
    # The service's digests of the host's own companies (it changed them) equal the database's, then and now.
    digests = database_digests()
    assert {c: result["quiet"]["service"][c] for c in companies} == {c: digests[c] for c in companies}
    status, report = readiness(host)
    assert status == 200 and report["store"] == "postgres", report.get("errors")
    assert {c: report["digests"][c] for c in companies} == {c: digests[c] for c in companies}


def test_every_host_runs_main_with_the_database_flags_again(host):
    assert git_head(host) == git_commit_of(host, "main")
    values = env_values(host)
    assert values["USE_DATABASE_AUTH_STATE"] == "true" and values["USE_REPOSITORY_PATTERN"] == "true"
