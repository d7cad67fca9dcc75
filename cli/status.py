"""`db-upgrade status NAME --config ...`: where a workflow is, what it measured, what failed.

Everything comes from the Workflow object the Argo Server returns (one GET):
node phases and times, the follow node's `progress` (MiB copied, written by
steps/progress.py), node outputs (lag, write-downtime, the report step's JSON
report) and node messages (each failed step's one line, from its termination
message: steps/cli.py). Every time is UTC and says so; epochs are converted.
Outputs exist only once a node has ended: the lag shown says when and by which
step it was measured.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

import typer

from cli.argo import ConfigOption, _run, _setup

LAG_NODES = ("cutover", "wait-caught-up")  # newest measurement first
REPORT_NODE = "report"
FAILED = ("Failed", "Error")
TIME_FMT = "%Y-%m-%d %H:%M:%S"


# -- pure: reading the workflow ------------------------------------------------------------


def utc(value: datetime | None) -> str:
    return value.astimezone(timezone.utc).strftime(TIME_FMT) + " UTC" if value else "-"


def epoch_to_utc(value: str) -> str | None:
    """'1764627060.123' -> '2025-12-01 22:11:00 UTC'; None when it is not a unix time."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not 1e8 < number < 1e11:
        return None
    return utc(datetime.fromtimestamp(number, timezone.utc))


def is_time_output(name: str) -> bool:
    return name.endswith("-at") or name.endswith("-started")


def show_output(name: str, value: str) -> str:
    if is_time_output(name):
        return epoch_to_utc(value) or value
    return value


def report_of(wf: dict) -> dict | None:
    """The report step's JSON report (steps/report.py), once the exit handler has run it."""
    from cli import argo_client as ac

    raw = ac.node_output(ac.find_node(wf, REPORT_NODE), "report")
    try:
        report = json.loads(raw) if raw else None
    except ValueError:
        return None
    return report if isinstance(report, dict) else None


def _any_output(wf: dict, name: str) -> str | None:
    """An output of any node, else a global output of the workflow; the last node to end wins."""
    from cli import argo_client as ac

    found = None
    for node in ac.step_nodes(wf):
        value = ac.node_output(node, name)
        if value not in (None, ""):
            found = value
    if found is None:
        for p in ((wf.get("status") or {}).get("outputs") or {}).get("parameters") or []:
            if p.get("name") == name and p.get("value") not in (None, ""):
                found = p["value"]
    return found


def _float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def downtime(wf: dict) -> list[tuple[str, float]]:
    """[(label, seconds)] of the write-downtime: measured, modelled for a cluster, predicted."""
    report = report_of(wf) or {}
    out = []
    for label, key, output in (
        ("measured", "write_downtime_seconds", "write-downtime-seconds"),
        ("cluster-modelled", "write_downtime_cluster_seconds", "write-downtime-cluster-seconds"),
        ("predicted", "predicted_write_downtime_seconds", "predicted-write-downtime-seconds"),
    ):
        value = _float(report.get(key))
        if value is None:
            value = _float(_any_output(wf, output))
        if value is not None:
            out.append((label, value))
    return out


def failed_steps(wf: dict) -> list[tuple[str, str]]:
    from cli import argo_client as ac

    return [(n.get("displayName") or "?", " ".join((n.get("message") or n.get("phase") or "").split()))
            for n in ac.step_nodes(wf) if n.get("phase") in FAILED]


def progress(wf: dict) -> str | None:
    """The follow node's N/M (MiB) as `12288/40960 MiB copied (30%)`."""
    from cli import argo_client as ac

    node = ac.find_node(wf, "follow")
    value = (node or {}).get("progress") or ""
    m = re.fullmatch(r"(\d+)/(\d+)", value.strip())
    if not m or int(m[2]) == 0:
        return None
    done, total = int(m[1]), int(m[2])
    state = "" if node.get("phase") == "Running" or done < total else ", copy done"
    return f"{done}/{total} MiB copied ({done * 100 // total}%){state}"


def lag(wf: dict, now: datetime | None = None) -> str:
    """The newest lag measurement and when, by which step, it was taken."""
    from cli import argo_client as ac

    now = now or datetime.now(timezone.utc)
    for name in LAG_NODES:
        node = ac.find_node(wf, name)
        value = ac.node_output(node, "lag")
        if value:
            at = ac.parse_time((node or {}).get("finishedAt"))
            when = ""
            if at:
                ago = ac.format_duration(max(0.0, (now - at).total_seconds()))
                when = f" (measured by {name} at {utc(at)}, {ago} ago)"
            return value + when
    follow = ac.find_node(wf, "follow")
    if follow and follow.get("phase") == "Running" and progress(wf) and "copy done" not in (progress(wf) or ""):
        return "not measured yet: the initial copy is running"
    return "not measured yet"


def timing(node: dict, now: datetime | None = None) -> tuple[str, str, str]:
    """(started, finished, duration): times without a zone label (a header says UTC)."""
    from cli import argo_client as ac

    started, finished = ac.parse_time(node.get("startedAt")), ac.parse_time(node.get("finishedAt"))
    now = now or datetime.now(timezone.utc)
    duration = "-"
    if started:
        duration = ac.format_duration(((finished or now) - started).total_seconds())
        if not finished:
            duration += " so far"
    fmt = lambda t: t.astimezone(timezone.utc).strftime(TIME_FMT) if t else "-"  # noqa: E731
    return fmt(started), fmt(finished), duration


def lines(wf: dict, name: str, link: str, config_path: Path, now: datetime | None = None) -> list[str]:
    """Everything `status` prints, in order."""
    from cli import argo_client as ac

    st = wf.get("status") or {}
    steps = ac.step_nodes(wf)
    out = [f"workflow  {name}",
           f"phase     {ac.workflow_phase(wf)}" + (f": {st['message']}" if st.get("message") else "")]
    start, end, took = timing(st, now)
    label = lambda t: t if t == "-" else f"{t} UTC"  # noqa: E731
    out.append(f"timing    started {label(start)}, finished {label(end)}, {took}")
    running = [n["displayName"] for n in steps if n.get("phase") == "Running"]
    waiting, _ = ac.approval_state(wf)
    current = ", ".join(running) or "-"
    if waiting:
        current += " (waiting for approval)"
    out.append(f"current   {current}")
    if (p := progress(wf)):
        out.append(f"progress  {p}")
    out.append(f"lag       {lag(wf, now)}")
    if (d := downtime(wf)):
        out.append("downtime  " + ", ".join(f"{label_} {v:.1f}s" for label_, v in d))
    for step, message in failed_steps(wf):
        out.append(f"failed    {step}: {message}")
    report = report_of(wf)
    if report:
        verify = report.get("verify_summary")
        if verify:
            out.append(f"verify    {verify}")
    for label_, value in ac.run_report(wf):
        out.append(f"report    {label_}: {value}")
    for p in (st.get("outputs") or {}).get("parameters") or []:  # the workflow's global outputs
        out.append(f"output    {p.get('name')} = {show_output(p.get('name') or '', p.get('value', ''))}")
    if steps:
        width = max(len(n.get("displayName") or "") for n in steps)
        out.append("steps     (times UTC)")
        for n in steps:
            s, f, d = timing(n, now)
            out.append(f"  {n.get('displayName', ''):<{width}}  {n.get('phase', 'Pending'):<9}  {s}  {f}  {d}")
    out.append(f"link      {link}")
    if waiting:
        out.append(f"approve:  db-upgrade approve {name} --config {config_path}")
        out.append(f"abort:    db-upgrade abort {name} --config {config_path}")
    return out


# -- the command ---------------------------------------------------------------------------


def status(name: str = typer.Argument(..., help="Workflow name."), config_path: Path = ConfigOption) -> None:
    """Phase, current step(s), progress, lag, downtime, failed steps and timings of a workflow (UTC)."""

    def body() -> None:
        _, _, client = _setup(config_path)
        wf = client.get_workflow(name)
        for line in lines(wf, name, client.settings.workflow_link(name), config_path):
            typer.echo(line)

    _run(body)


def register(app: typer.Typer) -> None:
    app.command("status")(status)
