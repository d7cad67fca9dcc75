"""The run history: the report step appends to a ConfigMap, `db-upgrade history` shows the trend.

The Kubernetes API is tests/fakes/kube.py (the real `kubernetes` client against the
apiserver's wire format and its optimistic concurrency); the run state the report is
built from lives in a real PostgreSQL 15 source.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time

import psycopg
import pytest
from typer.testing import CliRunner

from steps import history as h
from steps import state
from steps.errors import StepError
from steps.report import RunReport, build, verify_summary
from steps.settings import load_settings
from tests.conftest import DB_UPGRADE, step_env
from tests.fakes.argo import write_environment

NS = "db"  # the namespace of tests/fakes/argo.py's environment file (database_id: orders)
CM = h.configmap_name("orders")


def stored(kube) -> list[dict]:
    return json.loads(kube.configmaps[(NS, CM)]["data"][h.KEY])


def a_report(run_id: str, **kw) -> dict:
    return {"run_id": run_id, "outcome": "Succeeded", "mode": "rehearsal", **kw}


# -- pure ------------------------------------------------------------------------------------


def test_appended_replaces_the_same_run_keeps_the_last_n_and_fits_a_configmap():
    reports = [a_report(f"r{i}") for i in range(5)]
    out = h.appended(reports, a_report("r2", outcome="Failed"), limit=10)
    assert [r["run_id"] for r in out] == ["r0", "r1", "r3", "r4", "r2"]  # a retried exit handler: once
    assert out[-1]["outcome"] == "Failed"
    assert [r["run_id"] for r in h.appended(reports, a_report("new"), limit=3)] == ["r3", "r4", "new"]
    big = [a_report(f"b{i}", verify_summary="x" * 1000) for i in range(20)]
    fitted = h.appended(big, a_report("last", verify_summary="x" * 1000), limit=52, max_bytes=5000)
    assert len(h.encode(fitted)) <= 5000 and fitted[-1]["run_id"] == "last" and len(fitted) < 21


def test_decode_reads_damage_as_empty():
    assert h.decode(None) == [] and h.decode({}) == []
    assert h.decode({h.KEY: "{not json"}) == []
    assert h.decode({h.KEY: '{"a": 1}'}) == []
    assert h.decode({h.KEY: '[{"run_id": "a"}, 3]'}) == [{"run_id": "a"}]


def test_sparkline_scales_and_leaves_gaps():
    from cli.history import sparkline, trend_lines

    assert sparkline([1, 2, 3, 4, 5, 6, 7, 8]) == "▁▂▃▄▅▆▇█"
    assert sparkline([5, None, 5]) == "█ █"
    assert sparkline([None]) == ""
    lines = trend_lines([{"copy_seconds": 60}, {"copy_seconds": 120, "write_downtime_seconds": 2.0},
                         {"copy_seconds": 90, "predicted_write_downtime_seconds": 3.0}])
    assert lines[0].startswith("copy time") and "min 1m00s, max 2m00s, last 1m30s" in lines[0]
    assert lines[1].startswith("write-downtime") and "last 3.0s" in lines[1]  # measured, else predicted


def test_verify_summary_from_the_recorded_report():
    ok = {"ok": True, "mode": "upgrade", "tables": [{"table": "a", "target_rows": 3}, {"table": "b", "target_rows": 4}]}
    assert verify_summary(ok) == (True, "ok: 2 tables, 7 rows")
    bad = {"ok": False, "mismatched": [f"t{i}" for i in range(7)], "sequences_behind": ["s"]}
    assert verify_summary(bad) == (False, "FAILED: tables differ: t0, t1, t2, t3, t4 and 2 more; sequences behind: s")
    assert verify_summary({"ok": True, "summary": "verified: 1 table"}) == (True, "verified: 1 table")
    assert verify_summary(None) == (None, None)


def test_build_measures_spans_from_the_run_state():
    st = state.RunState(started_at=1000.0, engine="native", follow_started_at=1010.0, copy_done_at=1070.0,
                        copy_bytes_total=600 * 1024 * 1024, caught_up_at=1100.0, end_position_set_at=1200.0,
                        drained_at=1201.5, verified_at=1203.0, verify_seconds=1.5, finished_at=1210.0,
                        verify={"ok": True, "tables": []})
    r = build(st, run_id="wf-1", mode="rehearsal", engine="native", status="Succeeded",
              failures=[{"displayName": "x", "message": " two\n lines "}], now=2000.0)
    assert (r.copy_seconds, r.catchup_seconds, r.predicted_write_downtime_seconds) == (60.0, 30.0, 3.0)
    assert r.copy_rate_bytes_per_second == 10 * 1024 * 1024
    assert (r.started_at, r.finished_at, r.duration_seconds) == ("1970-01-01T00:16:40Z", "1970-01-01T00:20:10Z", 210.0)
    assert r.failures[0].message == "two lines" and r.write_downtime_seconds is None and not r.switched
    upgrade = build(st.model_copy(update={"write_downtime_seconds": 2.5, "switch_started_at": 1205.0}),
                    run_id="wf-2", mode="upgrade", engine="native", status="Succeeded", failures=[], now=2000.0)
    assert (upgrade.write_downtime_seconds, upgrade.predicted_write_downtime_seconds, upgrade.switched) == (2.5, None, True)
    lost = build(None, run_id="wf-3", mode="upgrade", engine="native", status="Failed", failures=[], now=0.0)
    assert not lost.state_available and lost.finished_at == "1970-01-01T00:00:00Z"


# -- the ConfigMap through the real client ------------------------------------------------


def test_append_creates_then_updates_with_the_resource_version(kube):
    assert h.read(CM, NS) == []
    assert h.append(a_report("r1"), CM, NS) == 1
    created = kube.configmaps[(NS, CM)]
    assert created["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "db-upgrade"
    rv = created["metadata"]["resourceVersion"]
    assert h.append(a_report("r2"), CM, NS, limit=2) == 2
    assert h.append(a_report("r3"), CM, NS, limit=2) == 2
    assert [r["run_id"] for r in h.read(CM, NS)] == ["r2", "r3"]
    puts = [json.loads(b) for m, _, _, b in kube.requests if m == "PUT"]
    assert puts[0]["metadata"]["resourceVersion"] == rv  # the update is conditional on what was read
    assert [m for m, *_ in kube.requests] == ["GET", "GET", "POST", "GET", "PUT", "GET", "PUT", "GET"]


def test_a_write_between_our_read_and_our_update_is_a_409_and_nothing_is_lost(kube):
    h.append(a_report("r1"), CM, NS)
    # Another run's exit handler appends right after our GET, before our PUT.
    kube.before("PUT", "configmaps", lambda: h.append(a_report("other"), CM, NS))
    h.append(a_report("mine"), CM, NS, sleep=lambda s: None)
    assert kube.conflicts == 1
    assert sorted(r["run_id"] for r in stored(kube)) == ["mine", "other", "r1"]


def test_two_first_runs_creating_the_configmap_at_once(kube):
    kube.before("POST", "configmaps", lambda: h.append(a_report("other"), CM, NS))
    h.append(a_report("mine"), CM, NS, sleep=lambda s: None)
    assert kube.conflicts == 1  # AlreadyExists on our POST: read again, then update
    assert sorted(r["run_id"] for r in stored(kube)) == ["mine", "other"]


def test_concurrent_appends_all_land(kube):
    errors = []

    def one(i):
        try:
            h.append(a_report(f"c{i}"), CM, NS, sleep=lambda s: time.sleep(s / 10))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(r["run_id"] for r in stored(kube)) == sorted(f"c{i}" for i in range(8))


def test_the_fake_refuses_a_stale_put_like_the_apiserver(kube):
    from kubernetes.client.exceptions import ApiException

    h.append(a_report("r1"), CM, NS)
    api = h.core_api()
    cm = api.read_namespaced_config_map(CM, NS)
    api.patch_namespaced_config_map(CM, NS, {"data": {"note": "x"}})  # strategic merge patch
    with pytest.raises(ApiException) as exc:
        api.replace_namespaced_config_map(CM, NS, cm)
    body = json.loads(exc.value.body)
    assert (exc.value.status, body["kind"], body["reason"]) == (409, "Status", "Conflict")
    assert body["message"] == (f'Operation cannot be fulfilled on configmaps "{CM}": the object has been '
                               "modified; please apply your changes to the latest version and try again")
    assert api.read_namespaced_config_map(CM, NS).data["note"] == "x"


def test_forbidden_is_one_line_naming_the_permission(kube):
    kube.forbidden.add(("configmaps", "get", None))
    with pytest.raises(StepError) as exc:
        h.append(a_report("r1"), CM, NS)
    msg = str(exc.value)
    assert "\n" not in msg and f"ConfigMap {CM!r} in namespace {NS!r}" in msg
    assert "get, create and update on resource 'configmaps'" in msg


def test_a_missing_namespace_is_named(kube):
    kube.namespaces = {"shop"}
    with pytest.raises(StepError, match=f"^namespace '{NS}' not found$"):
        h.append(a_report("r1"), CM, NS)


def test_store_is_off_without_configuration_or_cluster(monkeypatch, kube):
    said = []
    monkeypatch.delenv("DB_UPGRADE_HISTORY_CONFIGMAP", raising=False)
    monkeypatch.setenv("DB_UPGRADE_NAMESPACE", NS)
    assert not h.store(a_report("r1"), said.append)
    monkeypatch.setenv("DB_UPGRADE_HISTORY_CONFIGMAP", CM)
    monkeypatch.delenv("KUBECONFIG")
    assert not h.store(a_report("r1"), said.append)  # a laptop's ~/.kube/config is not taken implicitly
    assert said == ["report: history not stored (DB_UPGRADE_HISTORY_CONFIGMAP or DB_UPGRADE_NAMESPACE is not set)",
                    "report: history not stored (no cluster: not in a pod, and KUBECONFIG is not set)"]
    assert kube.requests == []


# -- the done-when of issue 15: three rehearsals, then `db-upgrade history` ---------------------


def report_step(source: str, target: str, tmp_path, kube, run_id: str, subprocess_: bool = False,
                **env) -> subprocess.CompletedProcess:
    """`db-upgrade step report` with the exit handler's env: as a process, or (faster) the same
    command in this process with that env."""
    env = {"DB_UPGRADE_RUN_ID": run_id, "DB_UPGRADE_MODE": "rehearsal", "DB_UPGRADE_WORKFLOW_STATUS": "Succeeded",
           "DB_UPGRADE_WORKFLOW_FAILURES": '"null"',  # what Argo sends when nothing failed
           "DB_UPGRADE_HISTORY_CONFIGMAP": CM, "DB_UPGRADE_NAMESPACE": NS, "DB_UPGRADE_OUTPUTS": str(tmp_path / run_id),
           "KUBECONFIG": str(tmp_path / "kubeconfig"), **env}
    full = step_env(source, target, tmp_path / "work", **env)
    if subprocess_:
        return subprocess.run([DB_UPGRADE, "step", "report"], capture_output=True, text=True, timeout=60, env=full)
    from steps.cli import step_app

    result = CliRunner().invoke(step_app, ["report"], env={**{k: None for k in os.environ}, **full})
    return subprocess.CompletedProcess(["report"], result.exit_code, result.stdout, result.stderr)


def record_rehearsal(s, copy: float, downtime: float, ok: bool = True) -> None:
    t = time.time() - 600
    state.begin(s)
    state.record(s, engine="native", follow_started_at=t, copy_done_at=t + copy, copy_bytes_total=5 * 2**30,
                 caught_up_at=t + copy + 20, end_position_set_at=t + copy + 60,
                 drained_at=t + copy + 60 + downtime / 2, verified_at=t + copy + 60 + downtime,
                 verify_seconds=downtime / 2,
                 verify={"ok": ok, "mode": "rehearsal", "tables": [{"table": "public.orders", "target_rows": 10}],
                         "mismatched": [] if ok else ["public.orders"]})


def run_state_rows(source: str) -> list:
    with psycopg.connect(source) as conn:
        if not conn.execute("SELECT to_regclass('db_upgrade.run_state')").fetchone()[0]:
            return []
        return conn.execute("SELECT run_id, key FROM db_upgrade.run_state").fetchall()


@pytest.mark.slow
def test_three_rehearsals_are_stored_and_history_shows_them(dbs, kube, tmp_path):
    source, target = dbs
    env_file = write_environment(tmp_path)
    for i, (copy, downtime) in enumerate([(3600.0, 2.0), (3300.0, 1.5), (3900.0, 2.5)], start=1):
        run_id = f"db-upgrade-prod-rehearsal-{i}"
        record_rehearsal(load_settings(source_pguri=source, run_id=run_id), copy, downtime)
        proc = report_step(source, target, tmp_path, kube, run_id, subprocess_=(i == 1))
        assert proc.returncode == 0, proc.stderr
        assert f"report: db-upgrade rehearsal {run_id}: Succeeded" in proc.stderr
        assert f"report: stored in ConfigMap {NS}/{CM} ({i} run(s) kept, at most 52)" in proc.stderr
        report = RunReport.model_validate_json((tmp_path / run_id / "report").read_text())
        assert (report.copy_seconds, report.predicted_write_downtime_seconds) == (copy, downtime)
        assert run_state_rows(source) == []  # the run is over: its record is gone

    result = CliRunner().invoke(__import__("cli.main", fromlist=["app"]).app,
                                ["history", "--config", str(env_file)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = result.output
    for i in (1, 2, 3):
        assert f"db-upgrade-prod-rehearsal-{i}" in out
    for cell in ("1h00m", "55m00s", "1h05m", "2.0s", "1.5s", "2.5s", "ok: 1 tables, 10 rows"):
        assert cell in out
    assert "copy time       ▅▁█" in out and "write-downtime  ▅▁█" in out
    as_json = CliRunner().invoke(__import__("cli.main", fromlist=["app"]).app,
                                 ["history", "--config", str(env_file), "--json", "-n", "2"])
    assert [r["run_id"] for r in json.loads(as_json.output)] == [f"db-upgrade-prod-rehearsal-{i}" for i in (2, 3)]


@pytest.mark.slow
def test_a_failed_run_keeping_its_slot_keeps_its_record_for_the_retry(dbs, kube, tmp_path):
    source, target = dbs
    run_id = "db-upgrade-prod-failed"
    s = load_settings(source_pguri=source, run_id=run_id)
    record_rehearsal(s, 60.0, 1.0, ok=False)
    failures = json.dumps(json.dumps([{"displayName": "verify", "message": "main: Error (exit code 1): tables differ"}]))
    proc = report_step(source, target, tmp_path, kube, run_id, DB_UPGRADE_WORKFLOW_STATUS="Failed",
                       DB_UPGRADE_WORKFLOW_FAILURES=failures, DB_UPGRADE_KEEP_SLOT="true")
    assert proc.returncode == 0, proc.stderr
    assert "report: the run's record is kept for a retry (DB_UPGRADE_KEEP_SLOT=true)" in proc.stderr
    assert run_state_rows(source)  # still there for `argo retry`
    [entry] = stored(kube)
    assert entry["outcome"] == "Failed" and entry["failures"] == [
        {"step": "verify", "message": "main: Error (exit code 1): tables differ"}]
    assert entry["verify_ok"] is False and entry["verify_summary"] == "FAILED: tables differ: public.orders"
    # Without the slot kept, the same failed run is over: its record goes.
    proc = report_step(source, target, tmp_path, kube, run_id, DB_UPGRADE_WORKFLOW_STATUS="Failed",
                       DB_UPGRADE_WORKFLOW_FAILURES=failures)
    assert proc.returncode == 0, proc.stderr
    assert run_state_rows(source) == [] and len(stored(kube)) == 1  # the retried report replaced its entry


@pytest.mark.slow
def test_a_frozen_source_keeps_its_record_for_the_unfreeze(dbs, kube, tmp_path):
    source, target = dbs
    run_id = "db-upgrade-prod-frozen"
    s = load_settings(source_pguri=source, run_id=run_id)
    state.begin(s)
    state.record(s, frozen_at=time.time())
    proc = report_step(source, target, tmp_path, kube, run_id, DB_UPGRADE_WORKFLOW_STATUS="Failed")
    assert proc.returncode == 0, proc.stderr
    assert "the source is frozen and writes were not restored yet" in proc.stderr
    assert run_state_rows(source)


def test_report_without_a_reachable_source_still_reports_and_exits_0(kube, tmp_path):
    proc = report_step("postgres://nobody@127.0.0.1:1/none", "postgres://nobody@127.0.0.1:1/none", tmp_path, kube,
                       "db-upgrade-prod-lost", DB_UPGRADE_WORKFLOW_STATUS="Error")
    assert proc.returncode == 0, proc.stderr
    assert "record on the source could not be read" in proc.stderr
    [entry] = stored(kube)
    assert (entry["outcome"], entry["state_available"]) == ("Error", False)


def test_history_errors_are_one_line(kube, tmp_path):
    from cli.main import app

    env_file = write_environment(tmp_path)
    empty = CliRunner().invoke(app, ["history", "--config", str(env_file)])
    assert empty.exit_code == 0 and f"no runs stored yet in ConfigMap {NS}/{CM}" in empty.output
    kube.forbidden.add(("configmaps", "get", CM))
    denied = CliRunner().invoke(app, ["history", "--config", str(env_file)])
    assert denied.exit_code == 1
    [line] = denied.stderr.strip().splitlines()
    assert line.startswith("error: forbidden to read ConfigMap")
    missing = CliRunner().invoke(app, ["history", "--config", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 1 and missing.stderr.startswith("error: environment file")
