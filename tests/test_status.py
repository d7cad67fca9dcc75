"""`db-upgrade status` against the fake Argo Server, and the termination messages that give
each failed node its one-line message (steps/cli.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
import typer

from cli import status as cli_status
from tests.fakes.argo import cli_invoker, served, NS, node, status, write_environment

TOKEN = "tok-MARKER-7d0c2a"  # must never show up in any output
WF = "db-upgrade-prod-x7k2q"
DB_UPGRADE = str(Path(sys.executable).parent / "db-upgrade")


@pytest.fixture
def env_file(tmp_path) -> Path:
    return write_environment(tmp_path)


@pytest.fixture
def fake():
    yield from served(TOKEN)


@pytest.fixture
def run(fake, env_file, monkeypatch):
    """`db-upgrade status WF --config ENV` with the argo env pointing at the fake; no token in any output."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    cli_status.register(app)
    app.command("unused")(lambda: None)  # two commands: typer then keeps `status` as a sub-command
    return cli_invoker(app, fake, env_file, TOKEN, monkeypatch)


# -- moved from tests/test_cli_argo.py (the times now say UTC; progress is MiB, steps/progress.py) --


def test_status_shows_phase_current_steps_lag_and_timings(run, fake, env_file):
    fake.script(NS, WF, [status(
        "Running",
        node("preflight", "Succeeded", started="2026-11-24T22:00:00Z", finished="2026-11-24T22:00:30Z"),
        node("follow", "Running", started="2026-11-24T22:00:31Z", progress="12/40"),
        node("wait-caught-up", "Succeeded", started="2026-11-24T22:00:31Z", finished="2026-11-24T22:30:31Z", outputs={"lag": "lag 12 kB (caught up, threshold 1 MB)"}),
        node("approve", "Running", type="Suspend", started="2026-11-24T22:30:32Z"),
    )])
    fake.scripts[(NS, WF)][0]["outputs"] = {"parameters": [{"name": "copy-seconds", "value": "1800"}]}
    result = run("status", WF)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"workflow  {WF}" in out
    assert "phase     Running" in out
    assert "current   follow, approve (waiting for approval)" in out
    assert "progress  12/40 MiB copied (30%)" in out
    assert "lag       lag 12 kB (caught up, threshold 1 MB) (measured by wait-caught-up at 2026-11-24 22:30:31 UTC" in out
    assert "output    copy-seconds = 1800" in out
    assert "steps     (times UTC)" in out
    assert "  preflight       Succeeded  2026-11-24 22:00:00  2026-11-24 22:00:30  30s" in out
    assert "  wait-caught-up  Succeeded  2026-11-24 22:00:31  2026-11-24 22:30:31  30m00s" in out
    assert "  follow          Running    2026-11-24 22:00:31  -" in out
    assert f"approve:  db-upgrade approve {WF} --config {env_file}" in out
    assert fake.calls() == [("GET", f"/api/v1/workflows/{NS}/{WF}")]


def test_status_of_a_finished_rehearsal_reports_its_numbers(run, fake):
    fake.script(NS, WF, [status(
        "Succeeded",
        node("follow", "Succeeded", started="2026-11-24T03:00:40Z", finished="2026-11-24T04:31:12Z",
             outputs={"copy-seconds": "3600", "catchup-seconds": "1500.5"}),
        node("wait-caught-up", "Succeeded", started="2026-11-24T03:00:40Z", finished="2026-11-24T04:30:40Z"),
        node("approve", "Skipped", type="Skipped", started=None),
        node("finish", "Succeeded", started="2026-11-24T04:31:00Z", finished="2026-11-24T04:31:02Z"),
        node("verify", "Succeeded", started="2026-11-24T04:31:20Z", finished="2026-11-24T04:32:00Z",
             outputs={"verify": "ok: 42 tables, schema equal, counts within drift"}),
        started="2026-11-24T03:00:00Z", finished="2026-11-24T04:33:00Z",
    )])
    out = run("status", WF).stdout
    assert "current   -" in out
    assert "timing    started 2026-11-24 03:00:00 UTC, finished 2026-11-24 04:33:00 UTC, 1h33m" in out
    assert "report    caught up after: 1h30m" in out
    assert "report    copy: 1h00m" in out
    assert "report    catch-up: 25m00s" in out  # 1500.5 s, rounded
    assert "report    verify: ok: 42 tables, schema equal, counts within drift" in out


# -- new: downtime, failed steps' lines, UTC instead of epochs, honest lag --------------------------


def test_failed_run_shows_each_failed_step_downtime_and_utc_times(run, fake):
    report = {"run_id": WF, "outcome": "Failed", "mode": "upgrade", "write_downtime_seconds": 3.24,
              "write_downtime_cluster_seconds": 14.1, "verify_summary": "ok: 3 tables, 30 rows"}
    fake.script(NS, WF, [status(
        "Failed",
        node("follow", "Failed", finished="2026-11-24T22:10:00Z",
             message="main: Error (exit code 1): follow: pgcopydb lost its replication connection"),
        node("cutover", "Error", finished="2026-11-24T22:20:00Z", message="pod deleted"),
        node("report", "Succeeded", finished="2026-11-24T22:21:00Z", outputs={"report": json.dumps(report)}),
        message="child 'follow' failed", finished="2026-11-24T22:21:00Z",
    )])
    fake.scripts[(NS, WF)][0]["outputs"] = {"parameters": [{"name": "frozen-at", "value": "1795557660.5"},
                                                           {"name": "restart-started", "value": ""}]}
    out = run("status", WF).stdout
    assert "phase     Failed: child 'follow' failed" in out
    assert "failed    follow: main: Error (exit code 1): follow: pgcopydb lost its replication connection" in out
    assert "failed    cutover: pod deleted" in out
    assert "downtime  measured 3.2s, cluster-modelled 14.1s" in out
    assert "verify    ok: 3 tables, 30 rows" in out
    assert "output    frozen-at = 2026-11-24 22:01:00 UTC" in out  # not 1795557660.5
    assert "1795557660" not in out


def test_downtime_from_node_outputs_when_there_is_no_report_yet(run, fake):
    fake.script(NS, WF, [status(
        "Running",
        node("cutover", "Succeeded", finished="2026-11-24T22:20:00Z",
             outputs={"write-downtime-seconds": "2.5", "write-downtime-cluster-seconds": "3.9"}),
        node("cleanup", "Running"),
    )])
    out = run("status", WF).stdout
    assert "downtime  measured 2.5s, cluster-modelled 3.9s" in out


def test_lag_during_the_copy_says_it_is_not_measured_yet(run, fake):
    fake.script(NS, WF, [status("Running", node("follow", "Running", progress="1024/4096"))])
    out = run("status", WF).stdout
    assert "progress  1024/4096 MiB copied (25%)" in out
    assert "lag       not measured yet: the initial copy is running" in out
    assert "downtime" not in out and "failed " not in out


def test_pure_helpers():
    assert cli_status.epoch_to_utc("1795557660.5") == "2026-11-24 22:01:00 UTC"
    assert cli_status.epoch_to_utc("12") is None and cli_status.epoch_to_utc("x") is None
    assert cli_status.show_output("frozen-at", "1795557660") == "2026-11-24 22:01:00 UTC"
    assert cli_status.show_output("lag-bytes", "1795557660") == "1795557660"
    wf = {"metadata": {"name": WF}, "status": status(
        "Running", node("cutover", "Succeeded", finished="2026-11-24T22:20:00Z", outputs={"lag": "lag 3 kB"}),
        node("wait-caught-up", "Succeeded", finished="2026-11-24T22:10:00Z", outputs={"lag": "lag 900 kB"}))}
    now = datetime(2026, 11, 24, 22, 25, tzinfo=timezone.utc)
    assert cli_status.lag(wf, now) == "lag 3 kB (measured by cutover at 2026-11-24 22:20:00 UTC, 5m00s ago)"


# -- termination messages: the node's one line ----------------------------------------------------


def step(name: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DB_UPGRADE_", "PGCOPYDB_"))}
    return subprocess.run([DB_UPGRADE, "step", name], capture_output=True, text=True, timeout=60,
                          env={**base, **env}, cwd=tmp_path)


def test_a_failing_step_writes_its_line_as_the_termination_message(tmp_path):
    log = tmp_path / "termination-log"
    proc = step("verify", tmp_path, DB_UPGRADE_TERMINATION_LOG=str(log))
    assert proc.returncode == 1
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert line.startswith("error: PGCOPYDB_SOURCE_PGURI is not set")
    # Argo makes the node's message "main: Error (exit code 1): <this>" (operator.go inferFailedReason).
    assert log.read_text() == line.removeprefix("error: ")


def test_termination_message_is_one_bounded_line_and_an_unwritable_path_is_ignored(tmp_path, monkeypatch, capsys):
    from steps.cli import TERMINATION_LOG_MAX, run_step
    from steps.errors import StepError

    log = tmp_path / "termination-log"
    monkeypatch.setenv("DB_UPGRADE_TERMINATION_LOG", str(log))

    def fails(s):
        raise StepError("verify: tables differ:\n public.a " + "x" * 5000)

    with pytest.raises(typer.Exit):
        run_step(fails)
    text = log.read_text()
    assert "\n" not in text and len(text.encode()) <= TERMINATION_LOG_MAX and text.startswith("verify: tables differ: public.a x")

    def bug(s):
        raise KeyError("oops")

    with pytest.raises(KeyError):  # a bug keeps its traceback in the log
        run_step(bug)
    assert log.read_text() == "unexpected KeyError: 'oops' (traceback in the log)"

    monkeypatch.setenv("DB_UPGRADE_TERMINATION_LOG", str(tmp_path / "no-such-dir" / "log"))
    with pytest.raises(typer.Exit):
        run_step(fails)
    assert capsys.readouterr().err.startswith("error: verify: tables differ:")


def test_default_termination_log_is_only_written_where_the_kubelet_made_it(monkeypatch, tmp_path):
    from steps import cli

    monkeypatch.delenv("DB_UPGRADE_TERMINATION_LOG", raising=False)
    monkeypatch.setattr(cli, "TERMINATION_LOG", str(tmp_path / "termination-log"))
    cli.write_termination_message("x")
    assert not (tmp_path / "termination-log").exists()  # on a laptop (even as root): no stray file
    (tmp_path / "termination-log").write_text("")
    cli.write_termination_message("follow: failed")
    assert (tmp_path / "termination-log").read_text() == "follow: failed"


# -- copy progress: Argo's N/M, the log line, the local bar (steps/progress.py, local/display.py) ------

MiB = 1024 * 1024


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def argo_accepts(text: str) -> bool:
    """What Argo's executor does with the file: the last line, N/M with 0 <= N <= M and M > 0
    (workflow/executor/executor.go monitorProgress, pkg/apis/workflow/v1alpha1/progress.go)."""
    import re

    last = text.strip().split("\n")[-1].strip()
    m = re.fullmatch(r"(\d+)/(\d+)", last)
    return bool(m) and 0 <= int(m[1]) <= int(m[2]) and int(m[2]) > 0


def test_copy_progress_rate_and_eta_over_a_sliding_window(tmp_path, capsys):
    from steps.progress import CopyProgress, read_file

    clock, path = Clock(), tmp_path / "progress"
    cp = CopyProgress(window=60, log_every=30, clock=clock)
    first = cp.report(0, 1000 * MiB, str(path))
    assert first.rate is None and path.read_text().splitlines() == [f"bytes 0/{1000 * MiB}", "0/1000"]
    for _ in range(12):  # 2 minutes at 1 MiB/s, then 10 MiB/s: the window sees only the new rate
        clock.t += 10
        cp.report(cp.samples[-1][1] + 10 * MiB, 1000 * MiB, str(path))
    for _ in range(7):
        clock.t += 10
        p = cp.report(cp.samples[-1][1] + 100 * MiB, 1000 * MiB, str(path))
    assert p.done == 820 * MiB and p.rate == pytest.approx(10 * MiB) and p.eta == pytest.approx(18)
    assert argo_accepts(path.read_text()) and path.read_text().splitlines()[-1] == "820/1000"
    assert read_file(path) == type(p)(820 * MiB, 1000 * MiB, round(p.rate), 18.0)
    logged = [line for line in capsys.readouterr().err.splitlines() if "follow: copy" in line]
    assert len(logged) == 7  # one every 30 s of 200 s, not one per call
    assert logged[-1].endswith("follow: copy 72% (720.0 MB of 1000.0 MB), 10.0 MB/s, about 28s left")  # at 180 s
    clock.t += 10
    cp.report(1000 * MiB, 1000 * MiB, str(path))  # done: logged at once
    assert "data copied" in capsys.readouterr().err and path.read_text().splitlines()[-1] == "1000/1000"


def test_copy_progress_stays_valid_for_argo_at_the_edges(tmp_path):
    from steps.progress import CopyProgress

    clock, path = Clock(), tmp_path / "progress"
    cp = CopyProgress(clock=clock)
    cp.report(5, 0, str(path))
    assert not path.exists()  # no total yet: "N/0" would be refused
    cp.report(3 * MiB + 1, 3 * MiB + 2, str(path))
    assert path.read_text().splitlines()[-1] == "3/4" and argo_accepts(path.read_text())
    cp.report(9 * MiB, 8 * MiB, str(path))  # an estimate of the total that was low
    assert path.read_text().splitlines()[-1] == "8/8" and argo_accepts(path.read_text())
    clock.t += 5
    p = cp.report(1 * MiB, 8 * MiB, str(path))  # the copy started over: a new window
    assert p.rate is None and len(cp.samples) == 1
    assert [f.name for f in tmp_path.iterdir()] == ["progress"]  # no temp file left beside it
    (tmp_path / "a-file").write_text("")
    cp.report(1, 2, str(tmp_path / "a-file" / "progress"))  # unwritable: never raises


def test_the_local_panel_shows_a_bar_with_bytes_rate_and_eta(tmp_path):
    from rich.console import Console

    from local.display import Display
    from local.runner import Node
    from steps.progress import Progress, write_file

    class FakeRunner:
        nodes = {"follow": Node("follow", "follow", phase="Running")}
        exit_nodes: dict = {}
        in_exit_handler = False
        values = {"tasks.wait-caught-up.outputs.parameters.lag": "lag 3 kB"}
        uris = {"PGCOPYDB_SOURCE_PGURI": "postgres://nobody@127.0.0.1:1/none"}

        def progress_file(self, task):
            return tmp_path / "progress" / task

    console = Console(record=True, width=120, force_terminal=True, color_system=None)
    display = Display(console)
    display.runner = FakeRunner()
    assert display.snapshot()["copied"] == "-"
    write_file(tmp_path / "progress" / "follow", Progress(12 * 1024 * MiB, 40 * 1024 * MiB, 50 * MiB, 573))
    console.print(display._render())
    text = console.export_text()
    assert "follow (initial copy)" in text
    assert "12.0 GB of 40.0 GB (30%), 50.0 MB/s, about 9m33s left" in text
    assert "━" in text  # the bar itself
    assert "lag 3 kB" in text
    display._copy_done = True  # the run's record says the copy is done: the engine stopped short of 100%
    assert display.snapshot() == {**display.snapshot(), "phase": "follow", "copied": "40.0 GB of 40.0 GB (100%), done"}
    (tmp_path / "progress" / "follow").write_text("12/40\n")  # a writer without bytes: shown as it is
    assert display.snapshot()["copied"] == "12/40"
