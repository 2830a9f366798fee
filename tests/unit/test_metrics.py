"""Prometheus textfiles: merged, cumulative, validated, atomic, honest in check mode."""

from __future__ import annotations

import os

import pytest
from prometheus_client.parser import text_string_to_metric_families

import baileys_metrics
from module_harness import run_module

LAST_SUCCESS = "baileys_dr_last_success_timestamp_seconds"
LAST_FAILURE = "baileys_dr_last_failure_timestamp_seconds"
EXPORTED = "baileys_dr_keys_exported_total"


def gauge(name, value, **labels):
    return {"name": name, "help": "Help of " + name, "value": value, "labels": labels or {"operation": "failover"}}


def counter(name, value, increment=True, **labels):
    return dict(gauge(name, value, **labels), type="counter", increment=increment)


def values(path):
    """{(sample name, sorted labels): value} read back with prometheus_client's parser."""
    with open(path, encoding="utf-8") as fh:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(fh.read()) for s in family.samples}


def write(path, metrics, check_mode=False, **extra):
    return run_module(baileys_metrics, dict(path=str(path), metrics=metrics, **extra), check_mode=check_mode)


OP = (("operation", "failover"),)


def test_a_failed_run_keeps_the_last_success_timestamp(tmp_path):
    prom = tmp_path / "baileys_dr_failover.prom"
    assert write(prom, [gauge(LAST_SUCCESS, 1000), gauge("baileys_dr_last_run_duration_seconds", 12.5)])[0]
    ok, result = write(prom, [gauge(LAST_FAILURE, 2000), gauge("baileys_dr_last_run_duration_seconds", 3)])
    assert ok and result["changed"]
    found = values(prom)
    assert found[(LAST_SUCCESS, OP)] == 1000
    assert found[(LAST_FAILURE, OP)] == 2000
    assert found[("baileys_dr_last_run_duration_seconds", OP)] == 3


def test_without_merge_the_file_holds_only_this_call(tmp_path):
    prom = tmp_path / "m.prom"
    write(prom, [gauge(LAST_SUCCESS, 1000)])
    write(prom, [gauge(LAST_FAILURE, 2000)], merge=False)
    assert list(values(prom)) == [(LAST_FAILURE, OP)]


def test_counters_accumulate_across_runs_per_label_set(tmp_path):
    prom = tmp_path / "m.prom"
    write(prom, [counter(EXPORTED, 4500)])
    write(prom, [counter(EXPORTED, 300)])
    write(prom, [counter(EXPORTED, 7, operation="snapshot")])
    found = values(prom)
    assert found[(EXPORTED, OP)] == 4800
    assert found[(EXPORTED, (("operation", "snapshot"),))] == 7
    text = prom.read_text()
    assert "# TYPE baileys_dr_keys_exported_total counter" in text or "# TYPE baileys_dr_keys_exported counter" in text


def test_a_counter_without_increment_is_set(tmp_path):
    prom = tmp_path / "m.prom"
    write(prom, [counter(EXPORTED, 4500)])
    write(prom, [counter(EXPORTED, 10, increment=False)])
    assert values(prom)[(EXPORTED, OP)] == 10


@pytest.mark.parametrize("metric, named", [
    (gauge("dr_last_success", 1), "'baileys_dr_'"),
    (gauge("baileys_dr_bad-name", 1), "'baileys_dr_bad-name'"),
    (dict(gauge("baileys_dr_keys_exported", 1), type="counter"), "must end with _total"),
    (gauge("baileys_dr_runs_total", 1), "must not end with _total"),
    (gauge("baileys_dr_age_seconds", 1, **{"bad-label": "x"}), "'bad-label'"),
    (gauge("baileys_dr_age_seconds", 1, __reserved="x"), "'__reserved'"),
    (gauge("baileys_dr_age_seconds", "twelve"), "'twelve' is not a number"),
    (dict(counter(EXPORTED, -1)), "must be zero or positive"),
])
def test_bad_input_is_refused_naming_it_and_nothing_is_written(tmp_path, metric, named):
    prom = tmp_path / "m.prom"
    ok, result = write(prom, [gauge(LAST_SUCCESS, 1), metric])
    assert not ok
    assert named in result["msg"] and "metrics[1]" in result["msg"]
    assert not prom.exists()


def test_a_foreign_file_that_does_not_parse_is_refused_naming_it(tmp_path):
    prom = tmp_path / "m.prom"
    prom.write_text("this is { not prometheus\n")
    ok, result = write(prom, [gauge(LAST_SUCCESS, 1)])
    assert not ok and str(prom) in result["msg"] and "merge=false" in result["msg"]
    assert write(prom, [gauge(LAST_SUCCESS, 1)], merge=False)[0]


def test_the_write_is_atomic_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    prom = tmp_path / "m.prom"
    write(prom, [gauge(LAST_SUCCESS, 1)])
    renames = []
    real_rename = os.rename

    def spy(src, dst):
        renames.append((os.path.dirname(src), os.path.basename(src), dst))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", spy)
    assert write(prom, [gauge(LAST_SUCCESS, 2)])[1]["changed"]
    # Staged in the same directory under a name the collector ignores, then renamed over the file.
    assert renames and renames[0][0] == str(tmp_path) and not renames[0][1].endswith(".prom") and renames[0][2] == str(prom)
    assert sorted(os.listdir(tmp_path)) == ["m.prom"]
    assert oct(prom.stat().st_mode & 0o777) == "0o644"


def test_a_failing_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    prom = tmp_path / "m.prom"
    write(prom, [gauge(LAST_SUCCESS, 1)])

    def broken(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "rename", broken)
    with pytest.raises(OSError):
        write(prom, [gauge(LAST_SUCCESS, 2)])
    assert sorted(os.listdir(tmp_path)) == ["m.prom"]
    assert values(prom)[(LAST_SUCCESS, OP)] == 1


def test_check_mode_writes_nothing_and_diff_shows_the_new_text(tmp_path):
    prom = tmp_path / "m.prom"
    write(prom, [gauge(LAST_SUCCESS, 1)])
    before = prom.read_bytes()
    ok, result = run_module(baileys_metrics, dict(path=str(prom), metrics=[gauge(LAST_SUCCESS, 5)], _ansible_diff=True),
                            check_mode=True)
    assert ok and result["changed"]
    assert prom.read_bytes() == before
    assert 'operation="failover"} 1.0' in result["diff"]["before"] and 'operation="failover"} 5.0' in result["diff"]["after"]
    ok, result = write(tmp_path / "new.prom", [gauge(LAST_SUCCESS, 5)], check_mode=True)
    assert ok and result["changed"] and not (tmp_path / "new.prom").exists()


def test_the_same_metrics_again_change_nothing(tmp_path):
    prom = tmp_path / "m.prom"
    metrics = [gauge("baileys_dr_last_run_companies", 3), gauge(LAST_SUCCESS, 1)]
    assert write(prom, metrics)[1]["changed"]
    assert not write(prom, list(reversed(metrics)))[1]["changed"]


def test_a_missing_directory_is_named(tmp_path):
    ok, result = write(tmp_path / "absent" / "m.prom", [gauge(LAST_SUCCESS, 1)])
    assert not ok and str(tmp_path / "absent") in result["msg"]


def test_create_dir_makes_the_missing_directory_0755_in_the_same_run(tmp_path):
    prom = tmp_path / "collector" / "textfile" / "m.prom"
    ok, result = write(prom, [gauge(LAST_SUCCESS, 1000)], create_dir=True)
    assert ok and result["changed"] and result["created_dir"] == str(prom.parent)
    assert oct(os.stat(prom.parent).st_mode & 0o777) == oct(0o755)
    assert values(prom) == {(LAST_SUCCESS, OP): 1000}
    ok, again = write(prom, [gauge(LAST_SUCCESS, 1000)], create_dir=True)
    assert ok and not again["changed"] and "created_dir" not in again


def test_create_dir_in_check_mode_reports_the_directory_and_makes_nothing(tmp_path):
    prom = tmp_path / "collector" / "m.prom"
    ok, result = write(prom, [gauge(LAST_SUCCESS, 1000)], check_mode=True, create_dir=True)
    assert ok and result["changed"] and result["created_dir"] == str(prom.parent)
    assert result["samples"] and not prom.parent.exists()


def test_a_directory_that_cannot_be_created_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    ok, result = write(blocker / "dir" / "m.prom", [gauge(LAST_SUCCESS, 1)], create_dir=True)
    assert not ok and str(blocker / "dir") in result["msg"] and "cannot be created" in result["msg"]


def test_label_values_are_escaped_and_read_back_unchanged(tmp_path):
    prom = tmp_path / "m.prom"
    hostile = 'a "quoted"\\ value\nwith a newline'
    write(prom, [gauge(LAST_SUCCESS, 1, operation=hostile)])
    write(prom, [gauge(LAST_FAILURE, 2)])
    assert values(prom)[(LAST_SUCCESS, (("operation", hostile),))] == 1
