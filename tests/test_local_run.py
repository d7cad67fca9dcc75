"""`db-upgrade run`: the WorkflowTemplate's DAG executed locally.

The order tests run the real rendered template with a fake step executor; the
others run the real steps against the session's PostgreSQL 15 and 17."""

from __future__ import annotations

import copy
import itertools
import os
import re
import secrets
import signal
import subprocess
import threading
import time

import psycopg
import pytest
from psycopg import sql

from local import workload
from steps import state
from local.runner import Node, Runner, RunError, RunResult, evaluate_depends, evaluate_when, load_template
from tests.conftest import DB_UPGRADE
from tests.test_workflow_helpers import simulate


@pytest.fixture(scope="module")
def wt():
    return load_template()


# The steps that set the end position follow runs to (the cutover, or finish when there was none).
ENDS_FOLLOW = ("cutover", "finish", "freeze")


class Fake:
    """Stands in for the pods: records the start order and each step's env, writes declared
    outputs, and lets follow run until the cutover or finish has set its end (as the real one does)."""

    def __init__(self, fail: dict[str, str] | None = None):
        self.fail = fail or {}
        self.order: list[str] = []
        self.env: dict[str, dict] = {}
        self.endpos = threading.Event()
        self.concurrent_with_follow: set[str] = set()
        self.lock = threading.Lock()

    def __call__(self, call, runner):
        with self.lock:
            self.order.append(call.task)
            self.env[call.task] = dict(call.env)
            if runner.nodes.get("follow") and runner.nodes["follow"].phase == "Running" and call.task != "follow":
                self.concurrent_with_follow.add(call.task)
        node = runner.nodes.get(call.task) or runner.exit_nodes[call.task]
        for p in runner.templates[node.template].get("outputs", {}).get("parameters", []):
            (call.outputs_dir / p["name"]).write_text("1764000000.5\n" if p["name"] == "frozen-at" else "x\n")
        if call.task == "follow" and call.task not in self.fail:
            assert self.endpos.wait(10), "follow was never stopped"
        if call.step in ENDS_FOLLOW:
            self.endpos.set()
        if call.task in self.fail:
            return self.fail[call.task], "boom"
        return "Succeeded", ""


def run_fake(wt, tmp_path, *, params=None, decision="cutover", fail=None, on_restart=None, **kwargs):
    fake = Fake(fail)
    runner = Runner(wt, source="postgres://s", target="postgres://t", workdir=tmp_path / "w",
                    readonly_sql=tmp_path / "r.sql", unfreeze_sql=tmp_path / "u.sql", params=params,
                    approver=lambda lag: decision, executor=fake, emit=lambda t, line: None, on_restart=on_restart,
                    **kwargs)
    if fail and "follow" in fail:
        fake.endpos.set()
    return runner.run(), fake


def dag_of(wt, name="upgrade"):
    return next(t for t in wt["spec"]["templates"] if t["name"] == name)["dag"]["tasks"]


RUNS = list(itertools.product(("manual", "auto"), ("upgrade", "rehearsal"), ("cutover", "abort")))


@pytest.mark.parametrize("approval, mode, decision", RUNS)
def test_local_run_takes_the_templates_branches(wt, tmp_path, approval, mode, decision):
    """Same node states as the model of Argo's semantics in the template tests, for every run shape."""
    params = {"approval": approval, "mode": mode}
    result, fake = run_fake(wt, tmp_path, params=params, decision=decision)
    assert {n: x.phase for n, x in result.nodes.items()} == simulate(wt, params=params, decision=decision)
    # Parallel branches really run in parallel: what stops follow ran while follow ran.
    stopper = "cutover" if result.nodes["cutover"].phase == "Succeeded" else "finish"
    assert {"wait-caught-up", stopper} <= fake.concurrent_with_follow
    # Each task starts after every task its `depends` names has ended.
    started = {name: i for i, name in enumerate(result.order)}
    for task in dag_of(wt):
        if task["name"] in started and task.get("depends"):
            for dep in {w.split(".")[0] for w in task["depends"].replace("(", " ").replace(")", " ").split()
                        if "." in w}:
                if result.nodes[dep].phase not in ("Omitted", "Skipped"):
                    assert started[dep] < started[task["name"]], (dep, task["name"])
    assert result.status == "Succeeded"
    assert result.exit_code == (3 if approval == "manual" and decision == "abort" else 0)


@pytest.mark.parametrize("failing", ["wait-caught-up", "verify-prepare", "cutover", "finish", "follow"])
def test_failures_take_the_templates_failure_paths(wt, tmp_path, failing):
    result, _ = run_fake(wt, tmp_path, params={"approval": "auto"}, fail={failing: "Failed"})
    assert {n: x.phase for n, x in result.nodes.items()} == simulate(
        wt, params={"approval": "auto"}, outcomes={failing: "Failed"})
    assert result.status == "Failed" and result.exit_code == 1
    expected_exit = simulate(wt, dag="exit-handler", params={"approval": "auto"},
                             extra_values={"workflow.status": "Failed"})
    assert {n: x.phase for n, x in result.exit_nodes.items()} == expected_exit
    assert result.exit_nodes["cleanup-after-failure"].phase == "Succeeded"
    # It decides from the run's state whether to restore writes: it runs after every failure.
    assert result.exit_nodes["unfreeze-after-failure"].phase == "Succeeded"


def test_a_changed_depends_changes_the_local_order(wt, tmp_path):
    result, _ = run_fake(wt, tmp_path, params={"approval": "auto"})
    assert result.order.index("finish") < result.order.index("cleanup")
    # Swap finish and cleanup in the template: the local run follows.
    changed = copy.deepcopy(wt)
    tasks = {t["name"]: t for t in dag_of(changed)}
    tasks["cleanup"]["depends"] = "(cutover.Succeeded || cutover.Skipped) && follow.Succeeded"
    tasks["finish"]["depends"] = "cleanup.Succeeded"
    result, _ = run_fake(changed, tmp_path / "b", params={"approval": "auto"})
    assert result.order.index("cleanup") < result.order.index("finish")
    # And a `when` too: the cutover never runs when its condition says so.
    changed = copy.deepcopy(wt)
    next(t for t in dag_of(changed) if t["name"] == "cutover")["when"] = "'{{workflow.parameters.mode}}' == 'never'"
    result, _ = run_fake(changed, tmp_path / "c", params={"approval": "auto"})
    assert result.nodes["cutover"].phase == "Skipped" and "cutover" not in result.order


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
    next(t for t in changed["spec"]["templates"] if t["name"] == "cutover")["container"]["args"] = ["sh", "-c", "x"]
    with pytest.raises(RunError, match="cutover"):
        run_fake(changed, tmp_path)


def test_step_env_is_the_pods_env_with_local_paths(wt, tmp_path):
    runner = Runner(wt, source="postgres://s", target="postgres://t", workdir=tmp_path / "w",
                    readonly_sql=tmp_path / "r.sql", unfreeze_sql=tmp_path / "u.sql", base_env={"PATH": "/bin"})
    tpl = runner.templates["cutover"]
    env = runner.step_env(tpl, {}, tmp_path / "out", "cutover")
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


def _record(src: str) -> "state.RunState":
    """The local run's record in the source database (its run id is the runner's
    workflow name, local-<time>-<pid>: the one run of this test's database)."""
    with psycopg.connect(src) as conn:
        try:
            runs = [r[0] for r in conn.execute("SELECT DISTINCT run_id FROM db_upgrade.run_state")]
        except psycopg.errors.UndefinedTable:
            return state.RunState()
        assert len(runs) <= 1, runs
        return state.load_from(conn, runs[0]) if runs else state.RunState()


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
    # Nothing was frozen: the cutover never ran, and the run's record is gone with the run.
    assert re.search(r"cutover\s*│\s*Skipped", out), out[-3000:]
    assert _record(src) == state.RunState()


@pytest.mark.slow
def test_ctrl_c_during_the_copy_cleans_up(pair, dbs, tmp_path):
    src, tgt, slot, env, argv = _prepare(pair, dbs, tmp_path)
    proc = subprocess.Popen([*argv, "--approve", "auto"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        record = _record(src)
        if record.follow_started_at and _slots(src, slot):
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
    assert not record.copy_done_at, "the copy had already finished: the test did not interrupt it"
    assert _record(src).frozen_at is None
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
    next(t for t in dag if t["name"] == "cleanup")["depends"] = "follow.Succeeded && nosuch.Succeeded"
    with pytest.raises(RunError, match="nosuch"):
        run_fake(changed, tmp_path)


# --- The cluster model: what a real controller adds per DAG transition ---------------------------

def _result(durations: dict[str, tuple[float, float]], deps: dict[str, set[str]], steps: dict[str, str | None],
            transition: float = 15.0) -> RunResult:
    """A finished run from (start, end) seconds of each task (None: did not run)."""
    t0 = 1_000.0
    nodes = {n: Node(n, n, phase="Succeeded" if se else "Skipped", started=t0 + se[0] if se else None,
                     finished=t0 + se[1] if se else None) for n, se in durations.items()}
    order = sorted((n for n in nodes if nodes[n].started is not None), key=lambda n: nodes[n].started)
    return RunResult("Succeeded", nodes, {}, False, False, order, deps=deps, exit_deps={}, steps=steps,
                     transition_seconds=transition, started=t0)


FIVE_POD = {"approve": set(), "freeze": {"approve"}, "finish": {"freeze"}, "verify": {"finish"},
            "cleanup": {"verify"}, "restart": {"cleanup", "freeze"}}


def test_the_model_adds_a_transition_per_task_start():
    # Locally each task started 0.3 s after its dependency ended.
    local = {"approve": (0.0, 1.0), "freeze": (1.3, 2.0), "finish": (2.3, 2.5), "verify": (2.8, 4.0),
             "cleanup": (4.3, 4.5), "restart": (4.8, 5.5)}
    r = _result(local, FIVE_POD, {n: n for n in FIVE_POD} | {"approve": None})
    model = r.timeline()
    assert model["approve"] == (15.0, 16.0)
    assert model["freeze"] == pytest.approx((31.0, 31.7))
    assert model["restart"] == pytest.approx((15 * 6 + 1.0 + 0.7 + 0.2 + 1.2 + 0.2, 15 * 6 + 4.0))
    assert r.frozen_window_tasks() == ("freeze", "restart")
    assert r.pod_starts_in_window() == ["finish", "verify", "cleanup", "restart"]
    # Four transitions of 15 s replace four local gaps of 0.3 s.
    assert r.window_extra_seconds() == pytest.approx(4 * 15 - 4 * 0.3)
    assert r.modelled_window_seconds(3.5) == pytest.approx(3.5 + 60 - 1.2)
    assert 50 <= r.modelled_window_seconds(3.5) <= 80
    # A skipped task costs nothing; the option scales the rest.
    skipped = _result({**local, "approve": None}, FIVE_POD, {n: n for n in FIVE_POD} | {"approve": None}, 10.0)
    assert skipped.timeline()["approve"] == (0.0, 0.0) and skipped.timeline()["freeze"][0] == 10.0
    assert skipped.window_extra_seconds() == pytest.approx(4 * 10 - 1.2)


def test_a_task_ending_on_anothers_signal_keeps_its_lag_behind_it():
    # follow runs from the start and ends 0.94 s after finish (which set its end position); verify waits
    # for both. Measured in a HEAD-tree rehearsal (docs/argo.md).
    deps = {"follow": set(), "approve": set(), "freeze": {"approve"}, "finish": {"freeze"},
            "verify": {"finish", "follow"}, "restart": {"verify"}}
    local = {"follow": (0.0, 3.94), "approve": (0.0, 1.0), "freeze": (1.0, 2.0), "finish": (2.0, 3.0),
             "verify": (3.94, 4.5), "restart": (4.5, 5.0)}
    r = _result(local, deps, {n: n for n in deps} | {"approve": None})
    model = r.timeline()
    assert model["follow"][1] == pytest.approx(model["finish"][1] + 0.94)
    assert model["verify"][0] == pytest.approx(model["finish"][1] + 0.94 + 15)
    # The wait for follow stays in the window; only the three starts are added.
    assert r.window_extra_seconds() == pytest.approx(3 * 15)


def test_the_model_of_one_cutover_pod_is_the_measured_window():
    deps = {"approve": set(), "cutover": {"approve"}, "finish": {"cutover"}, "cleanup": {"finish"}}
    r = _result({"approve": (0.0, 1.0), "cutover": (1.3, 9.0), "finish": (9.3, 9.5), "cleanup": (9.8, 10.0)}, deps,
                {"approve": None, "cutover": "cutover", "finish": "finish", "cleanup": "cleanup"})
    assert r.frozen_window_tasks() == ("cutover", "cutover")
    assert r.pod_starts_in_window() == [] and r.window_extra_seconds() == 0.0
    assert r.modelled_window_seconds(3.5) == 3.5
    # No freeze ran (abort): no window to model.
    aborted = _result({"approve": (0.0, 1.0), "cutover": None, "finish": (1.3, 1.5), "cleanup": (1.8, 2.0)}, deps,
                      {"approve": None, "cutover": "cutover", "finish": "finish", "cleanup": "cleanup"})
    assert aborted.window_extra_seconds() is None and aborted.modelled_window_seconds(3.5) is None


def test_the_real_template_freezes_and_switches_in_one_pod(wt, tmp_path):
    result, _ = run_fake(wt, tmp_path, params={"approval": "auto"}, transition_seconds=15)
    assert result.frozen_window_tasks() == ("cutover", "cutover")
    assert abs(result.modelled_window_seconds(3.5) - 3.5) <= 1.5
    # The same run through the five-pod window of the template before issue 12 (its shape only).
    old = copy.deepcopy(wt)
    tasks = {t["name"]: t for t in dag_of(old) if t["name"] not in (
        "backout", "backout-verify-prepare", "rollback", "end-backout")}  # the back-out window came later
    pods = {t["name"]: t for t in old["spec"]["templates"]}
    chain = ["finish", "verify", "cleanup", "restart"]
    for step in ("freeze", "verify", "restart"):
        pods[step] = {**copy.deepcopy(pods["cleanup"]), "name": step}
        pods[step]["container"]["args"] = ["step", step]
    old["spec"]["templates"] = list(pods.values())
    tasks["cutover"]["template"] = "freeze"
    tasks["cutover"]["name"] = "freeze"
    tasks["finish"]["depends"] = "freeze.Succeeded || freeze.Skipped"
    tasks["verify"] = {"name": "verify", "template": "verify", "depends": "finish.Succeeded && follow.Succeeded"}
    tasks["cleanup"]["depends"] = "verify.Succeeded"
    tasks["restart"] = {"name": "restart", "template": "restart", "depends": "cleanup.Succeeded && freeze.Succeeded"}
    next(t for t in old["spec"]["templates"] if t["name"] == "upgrade")["dag"]["tasks"] = list(tasks.values())
    result, fake = run_fake(old, tmp_path / "old", params={"approval": "auto"}, transition_seconds=15)
    assert [n for n in result.order if n in ("freeze", *chain)] == ["freeze", *chain]
    assert result.pod_starts_in_window() == chain
    assert 50 <= result.modelled_window_seconds(3.5) <= 80


def test_the_transition_option(tmp_path):
    from cli.main import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["run", "--cluster-transition-seconds", "-1"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --cluster-transition-seconds must be 0 or more seconds"
    with pytest.raises(RunError, match="0 or more"):
        Runner(load_template(), source="s", target="t", workdir=tmp_path, readonly_sql=tmp_path / "r",
               unfreeze_sql=tmp_path / "u", transition_seconds=-1)
