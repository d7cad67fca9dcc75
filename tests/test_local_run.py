"""`db-upgrade run`: the WorkflowTemplate's DAG executed locally.

The order tests run the real rendered template with a fake step executor; the
others run the real steps against the session's PostgreSQL 15 and 17."""

from __future__ import annotations

import copy
import itertools
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from local import workload
from local.runner import Runner, RunError, evaluate_depends, evaluate_when, load_template
from tests.conftest import DB_UPGRADE
from tests.test_workflow_helpers import simulate


@pytest.fixture(scope="module")
def wt():
    return load_template()


class Fake:
    """Stands in for the pods: records the start order, writes declared outputs,
    and lets follow run until finish has set the endpos (as the real one does)."""

    def __init__(self, fail: dict[str, str] | None = None):
        self.fail = fail or {}
        self.order: list[str] = []
        self.endpos = threading.Event()
        self.concurrent_with_follow: set[str] = set()
        self.lock = threading.Lock()

    def __call__(self, call, runner):
        with self.lock:
            self.order.append(call.task)
            if runner.nodes.get("follow") and runner.nodes["follow"].phase == "Running" and call.task != "follow":
                self.concurrent_with_follow.add(call.task)
        node = runner.nodes.get(call.task) or runner.exit_nodes[call.task]
        for p in runner.templates[node.template].get("outputs", {}).get("parameters", []):
            (call.outputs_dir / p["name"]).write_text("1764000000.5\n" if p["name"] == "frozen-at" else "x\n")
        if call.task == "follow" and call.task not in self.fail:
            assert self.endpos.wait(10), "follow was never stopped by finish"
        if call.task == "finish":
            self.endpos.set()
        if call.task in self.fail:
            return self.fail[call.task], "boom"
        return "Succeeded", ""


def run_fake(wt, tmp_path, *, params=None, decision="cutover", fail=None, on_restart=None):
    fake = Fake(fail)
    runner = Runner(wt, source="postgres://s", target="postgres://t", workdir=tmp_path / "w",
                    readonly_sql=tmp_path / "r.sql", unfreeze_sql=tmp_path / "u.sql", params=params,
                    approver=lambda lag: decision, executor=fake, emit=lambda t, line: None, on_restart=on_restart)
    if fail and "follow" in fail:
        fake.endpos.set()
    return runner.run(), fake


RUNS = list(itertools.product(("manual", "auto"), ("upgrade", "rehearsal"), ("cutover", "abort")))


@pytest.mark.parametrize("approval, mode, decision", RUNS)
def test_local_run_takes_the_templates_branches(wt, tmp_path, approval, mode, decision):
    """Same node states as the model of Argo's semantics in the template tests, for every run shape."""
    params = {"approval": approval, "mode": mode}
    result, fake = run_fake(wt, tmp_path, params=params, decision=decision)
    assert {n: x.phase for n, x in result.nodes.items()} == simulate(wt, params=params, decision=decision)
    # Parallel branches really run in parallel: finish (which stops follow) ran while follow ran.
    assert {"wait-caught-up", "finish"} <= fake.concurrent_with_follow
    # Each task starts after every task its `depends` names has ended.
    started = {name: i for i, name in enumerate(result.order)}
    for task in wt["spec"]["templates"][[t["name"] for t in wt["spec"]["templates"]].index("upgrade")]["dag"]["tasks"]:
        if task["name"] in started and task.get("depends"):
            for dep in {w.split(".")[0] for w in task["depends"].replace("(", " ").replace(")", " ").split()
                        if "." in w}:
                if result.nodes[dep].phase not in ("Omitted", "Skipped"):
                    assert started[dep] < started[task["name"]], (dep, task["name"])
    assert result.status == "Succeeded"
    assert result.exit_code == (3 if approval == "manual" and decision == "abort" else 0)


@pytest.mark.parametrize("failing", ["wait-caught-up", "freeze", "finish", "verify", "follow"])
def test_failures_take_the_templates_failure_paths(wt, tmp_path, failing):
    result, _ = run_fake(wt, tmp_path, params={"approval": "auto"}, fail={failing: "Failed"})
    assert {n: x.phase for n, x in result.nodes.items()} == simulate(
        wt, params={"approval": "auto"}, outcomes={failing: "Failed"})
    assert result.status == "Failed" and result.exit_code == 1
    frozen = result.nodes["freeze"].phase in ("Succeeded", "Failed")
    values = {"workflow.status": "Failed"}
    if frozen:
        values["workflow.outputs.parameters.frozen-at"] = "1764000000.5"
    expected_exit = simulate(wt, dag="exit-handler", params={"approval": "auto"}, extra_values=values)
    assert {n: x.phase for n, x in result.exit_nodes.items()} == expected_exit
    assert result.exit_nodes["cleanup-after-failure"].phase == "Succeeded"
    assert result.exit_nodes["unfreeze-after-failure"].phase == ("Succeeded" if frozen else "Skipped")


def test_a_changed_depends_changes_the_local_order(wt, tmp_path):
    result, _ = run_fake(wt, tmp_path, params={"approval": "auto"})
    assert result.order.index("cleanup") < result.order.index("restart")
    # Swap cleanup and restart in the template: the local run follows.
    changed = copy.deepcopy(wt)
    dag = next(t for t in changed["spec"]["templates"] if t["name"] == "upgrade")["dag"]["tasks"]
    tasks = {t["name"]: t for t in dag}
    tasks["restart"]["depends"] = "verify.Succeeded && freeze.Succeeded"
    tasks["cleanup"]["depends"] = "restart.Succeeded || restart.Omitted"
    result, _ = run_fake(changed, tmp_path / "b", params={"approval": "auto"})
    assert result.order.index("restart") < result.order.index("cleanup")
    # And a `when` too: verify never runs when its condition says so.
    tasks["verify"]["when"] = "'{{workflow.parameters.mode}}' == 'never'"
    result, _ = run_fake(changed, tmp_path / "c", params={"approval": "auto"})
    assert result.nodes["verify"].phase == "Skipped" and "verify" not in result.order


def test_restart_hook_runs_in_place_of_the_restart_step(wt, tmp_path):
    seen = []
    fake = Fake()
    runner = Runner(wt, source="postgres://s", target="postgres://t", workdir=tmp_path / "w",
                    readonly_sql=tmp_path / "r.sql", unfreeze_sql=tmp_path / "u.sql", params={"approval": "auto"},
                    executor=fake, emit=lambda t, line: None,
                    on_restart=lambda: seen.append({n: x.phase for n, x in runner.nodes.items()}))
    result = runner.run()
    assert len(seen) == 1 and seen[0]["cleanup"] == "Succeeded" and seen[0]["restart"] == "Running"
    assert result.nodes["restart"].phase == "Succeeded" and "restart" not in fake.order
    # Once restart began, a failure must not unfreeze the source: the global output is there.
    assert re_number(runner.values["workflow.outputs.parameters.restart-started"])
    assert result.nodes["restart"].outputs["write-downtime-seconds"]


def re_number(text: str) -> bool:
    import re

    return re.match(r"^[0-9]+", text) is not None


def test_expressions():
    states = {"a": "Succeeded", "b": "Skipped", "c": "Failed"}
    assert evaluate_depends("a.Succeeded && (b.Succeeded || b.Skipped)", states)
    assert not evaluate_depends("c.Succeeded || a.Failed", states)
    assert evaluate_depends("b", states) and not evaluate_depends("c", states)
    with pytest.raises(RunError):
        evaluate_depends("x.Succeeded", states)
    values = {"workflow.status": "Failed", "workflow.outputs.parameters.frozen-at": "12.5"}
    assert evaluate_when("'{{workflow.status}}' != 'Succeeded' && '{{workflow.outputs.parameters.frozen-at}}' "
                         "=~ '^[0-9]+' && !('{{workflow.outputs.parameters.restart-started}}' =~ '^[0-9]+')", values)


def test_every_step_of_the_template_is_run_by_its_container_args(wt, tmp_path):
    changed = copy.deepcopy(wt)
    next(t for t in changed["spec"]["templates"] if t["name"] == "verify")["container"]["args"] = ["sh", "-c", "x"]
    with pytest.raises(RunError, match="verify"):
        run_fake(changed, tmp_path)


def test_step_env_is_the_pods_env_with_local_paths(wt, tmp_path):
    runner = Runner(wt, source="postgres://s", target="postgres://t", workdir=tmp_path / "w",
                    readonly_sql=tmp_path / "r.sql", unfreeze_sql=tmp_path / "u.sql", base_env={"PATH": "/bin"})
    tpl = runner.templates["freeze"]
    env = runner.step_env(tpl, {}, tmp_path / "out", "freeze")
    assert env["PGCOPYDB_SOURCE_PGURI"] == "postgres://s" and env["PGCOPYDB_TARGET_PGURI"] == "postgres://t"
    assert env["DB_UPGRADE_DIR"] == str((tmp_path / "w").resolve())
    assert env["DB_UPGRADE_OUTPUTS"] == str(tmp_path / "out")
    assert env["DB_UPGRADE_READONLY_SQL"] == str((tmp_path / "r.sql").resolve())
    assert env["DB_UPGRADE_MODE"] == "upgrade"
    assert env["DB_UPGRADE_LAG_THRESHOLD_BYTES"] == "1048576"
    assert "HOME" not in env


# --- Real servers ---------------------------------------------------------------------

def _prepare(pair, dbs, tmp_path, size="small"):
    src, tgt = dbs
    workload.ensure_app_role(pair.source.uri())
    workload.ensure_app_role(pair.target.uri())
    workload.load_sample(src, size)
    readonly, unfreeze = workload.freeze_sql_files(tmp_path / "sql")
    slot = "t_" + secrets.token_hex(4)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_UPGRADE_", "PGCOPYDB_"))}
    env.update(PGCOPYDB_SOURCE_PGURI=src, PGCOPYDB_TARGET_PGURI=tgt, DB_UPGRADE_SLOT_NAME=slot,
               DB_UPGRADE_POLL_INTERVAL="0.5", DB_UPGRADE_TABLE_JOBS="2", DB_UPGRADE_INDEX_JOBS="2")
    argv = [DB_UPGRADE, "run", "--dir", str(tmp_path / "work"), "--readonly-sql", str(readonly),
            "--unfreeze-sql", str(unfreeze)]
    return src, tgt, slot, env, argv


def _app_can_write(src: str) -> None:
    with psycopg.connect(workload.app_uri(src), autocommit=True) as app:
        app.execute(sql.SQL("INSERT INTO {}.customers (email) VALUES (%s)").format(sql.Identifier(workload.SCHEMA)),
                    (f"after-{secrets.token_hex(4)}@example.com",))


def _slots(src: str, slot: str) -> int:
    with psycopg.connect(src) as conn:
        return conn.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()[0]


def _no_secret(text: str, *uris: str) -> None:
    from psycopg.conninfo import conninfo_to_dict

    for uri in uris:
        assert conninfo_to_dict(uri)["password"] not in text


@pytest.mark.slow
def test_run_abort_leaves_the_source_as_the_primary(pair, dbs, tmp_path):
    src, tgt, slot, env, argv = _prepare(pair, dbs, tmp_path)
    proc = subprocess.run([*argv, "--approve", "abort"], env=env, capture_output=True, text=True, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out[-4000:]
    assert "approve: decision abort" in out
    _no_secret(out, src, tgt)
    _app_can_write(src)
    assert _slots(src, slot) == 0
    with psycopg.connect(tgt) as conn:
        # The target keeps what was copied, but nothing of pgcopydb's machinery.
        assert conn.execute("SELECT count(*) FROM pg_replication_origin WHERE roname = %s", (slot,)).fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'pgcopydb'").fetchone()[0] == 0
    record = json.loads((tmp_path / "work" / "db-upgrade-state.json").read_text())
    assert "frozen_at" not in record and "verify" not in record


@pytest.mark.slow
def test_ctrl_c_during_the_copy_cleans_up(pair, dbs, tmp_path):
    src, tgt, slot, env, argv = _prepare(pair, dbs, tmp_path)
    proc = subprocess.Popen([*argv, "--approve", "auto"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    state_file = tmp_path / "work" / "db-upgrade-state.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if state_file.exists() and "follow_started_at" in state_file.read_text() and _slots(src, slot):
            break
        time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("follow never started: " + "".join(lines)[-3000:])
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=120)
    reader.join(5)
    out = "".join(lines)
    assert rc == 130, out[-4000:]
    record = json.loads(state_file.read_text())
    assert not record.get("copy_done_at"), "the copy had already finished: the test did not interrupt it"
    assert "frozen_at" not in record
    assert "interrupted" in out and "cleanup-after-failure" in out
    _no_secret(out, src, tgt)
    assert _slots(src, slot) == 0
    _app_can_write(src)


def test_bad_input_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_UPGRADE_", "PGCOPYDB_"))}
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    (tmp_path / "r.sql").write_text("SELECT 1;")
    base = [DB_UPGRADE, "run", "--readonly-sql", str(tmp_path / "r.sql"), "--unfreeze-sql", str(tmp_path / "r.sql")]
    cases = [
        ([*base, "--dir", str(tmp_path / "w")], "give --source and --target"),
        ([*base, "--source", "postgres://a:Secret-9@h/d", "--target", "postgres://h/d", "--dir", str(tmp_path / "full")],
         "not an empty directory"),
        ([*base, "--source", "postgres://h/d", "--target", "postgres://h/d", "--dir", str(tmp_path / "w"),
          "--approve", "maybe"], "--approve must be one of"),
        ([*base, "--source", "postgres://h/d", "--target", "postgres://h/d", "--dir", str(tmp_path / "w")],
         "needs a terminal"),
    ]
    for argv, expected in cases:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
        assert proc.returncode == 2, (argv, proc.stderr)
        assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert expected in proc.stderr
        assert "Secret-9" not in proc.stdout + proc.stderr


def test_a_bad_expression_stops_the_run_before_anything_starts(wt, tmp_path):
    changed = copy.deepcopy(wt)
    dag = next(t for t in changed["spec"]["templates"] if t["name"] == "upgrade")["dag"]["tasks"]
    next(t for t in dag if t["name"] == "verify")["depends"] = "follow.Succeeded && nosuch.Succeeded"
    with pytest.raises(RunError, match="nosuch"):
        run_fake(changed, tmp_path)
