"""`db-upgrade history --config environments/X.yaml`: the stored runs of one database, as a trend.

Reads the ConfigMap the report step appends to (steps/history.py) with the
kubernetes client (in a pod: its service account; else KUBECONFIG or
~/.kube/config, as kubectl does) and prints one row per run, oldest first, then
sparklines of copy time and write-downtime where the terminal can draw them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

SPARKS = "▁▂▃▄▅▆▇█"
ConfigOption = typer.Option(..., "--config", "-c", help="Environment file, e.g. environments/prod.yaml.")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


# -- pure: the rows and the sparklines ---------------------------------------------------------


def seconds(value) -> str:
    if value is None:
        return "-"
    value = float(value)
    if value < 60:
        return f"{value:.1f}s"
    total = int(round(value))
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def date(report: dict) -> str:
    when = report.get("started_at") or report.get("finished_at") or ""
    return when.replace("T", " ").removesuffix("Z")[:16] or "-"


def downtime(report: dict) -> float | None:
    """What the run says about the frozen window: measured when it cut over, else the prediction."""
    measured = report.get("write_downtime_seconds")
    return measured if measured is not None else report.get("predicted_write_downtime_seconds")


def verification(report: dict) -> str:
    ok, summary = report.get("verify_ok"), report.get("verify_summary")
    if ok is None and not summary:
        return "-"
    return summary or ("ok" if ok else "FAILED")


def row(report: dict) -> list[str]:
    outcome = report.get("outcome") or "?"
    failures = report.get("failures") or []
    if failures:
        outcome += f" ({', '.join(str(f.get('step', '?')) for f in failures[:3])})"
    return [
        date(report),
        str(report.get("run_id") or "-"),
        str(report.get("mode") or "-"),
        outcome,
        seconds(report.get("copy_seconds")),
        seconds(report.get("catchup_seconds")),
        seconds(report.get("predicted_write_downtime_seconds")),
        seconds(report.get("write_downtime_seconds")),
        verification(report),
    ]


COLUMNS = ["date (UTC)", "run", "mode", "outcome", "copy", "catch-up", "predicted downtime",
           "measured downtime", "verification"]


def sparkline(values: list[float | None]) -> str:
    """One block per value, scaled from the smallest to the largest; a gap where a run has none."""
    known = [v for v in values if v is not None]
    if not known:
        return ""
    low, high = min(known), max(known)
    span = high - low
    out = []
    for v in values:
        if v is None:
            out.append(" ")
        else:
            out.append(SPARKS[-1] if span == 0 else SPARKS[round((v - low) / span * (len(SPARKS) - 1))])
    return "".join(out)


def can_draw(console) -> bool:
    """Block characters need a Unicode encoding (not e.g. a C/ASCII locale's)."""
    return (console.encoding or "").lower().replace("-", "").startswith("utf")


def trend_lines(reports: list[dict]) -> list[str]:
    lines = []
    for label, values in (("copy time", [r.get("copy_seconds") for r in reports]),
                          ("write-downtime", [downtime(r) for r in reports])):
        known = [v for v in values if v is not None]
        if len(known) < 2:
            continue
        lines.append(f"{label:<15} {sparkline(values)}  min {seconds(min(known))}, max {seconds(max(known))}, "
                     f"last {seconds(known[-1])}")
    return lines


# -- the command -------------------------------------------------------------------------------


def history(
    config_path: Path = ConfigOption,
    limit: Optional[int] = typer.Option(None, "--limit", "-n", min=1, help="Show only the last N runs."),
    as_json: bool = typer.Option(False, "--json", help="Print the stored reports as JSON."),
) -> None:
    """The stored runs of the environment's database: outcome, copy, catch-up, downtime, verification."""
    from rich.console import Console
    from rich.table import Table

    from steps import history as h
    from steps.errors import StepError
    from workflows.config import ConfigError, load_config

    if not config_path.is_file():
        _fail(f"environment file {config_path} not found: pass --config environments/NAME.yaml")
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        _fail(str(exc))
    name, namespace = h.configmap_name(config.database_id), config.namespace
    try:
        reports = h.read(name, namespace)
    except StepError as exc:
        _fail(str(exc))
    if limit:
        reports = reports[-limit:]
    if as_json:
        typer.echo(json.dumps(reports, indent=2))
        return
    if not reports:
        typer.echo(f"no runs stored yet in ConfigMap {namespace}/{name}: the report step of each run "
                   "appends to it")
        return
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # a log or a pipe: never wrap a row
    table = Table(title=f"db-upgrade history of {config.database_id} ({namespace}/{name})", title_justify="left")
    for column in COLUMNS:
        table.add_column(column, overflow="fold")
    for report in reports:
        table.add_row(*row(report))
    console.print(table)
    if can_draw(console):
        for line in trend_lines(reports):
            console.print(line, markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    app.command("history")(history)
