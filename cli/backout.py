"""`db-upgrade rollback | end-backout NAME --config ENV`: answer the workflow's `backout` step.

After the cutover the workflow waits at the `backout` suspend node for the back-out
window (its duration; the timeout's default is `end`). These commands answer it exactly
as `db-upgrade approve` answers `approve` (cli/argo.py): set the node's `decision`
output, then resume that node; a decision set earlier whose resume did not go through
is resumed; another decision already set cannot be changed (Argo refuses a second set).
"""

from __future__ import annotations

from pathlib import Path

import typer

from cli.argo import ConfigOption, _run, _setup

BACKOUT_NODE = "backout"
DECISIONS = ("rollback", "end")


def backout_state(wf: dict) -> tuple[bool, str]:
    """(waiting in the back-out window?, why not): the workflow Running and its backout node Running."""
    from cli import argo_client as ac

    return ac.suspend_state(wf, BACKOUT_NODE, "the cutover has not opened the back-out window")


def decide(client, name: str, decision: str) -> str:
    """Set `decision` on the backout node and resume it: "set", or "resumed" when the same
    decision had been set before and only its resume had not gone through."""
    from cli import argo_client as ac

    if decision not in DECISIONS:
        raise ValueError(decision)
    wf = client.get_workflow(name)
    waiting, why = backout_state(wf)
    if not waiting:
        what = "roll back" if decision == "rollback" else "end"
        raise ac.ArgoError(f"workflow {name} is not in its back-out window ({why}): nothing to {what}")
    return client.answer_suspend(name, wf, BACKOUT_NODE, decision, "back-out")


def _already_set(name: str, current: str, config_path: Path) -> str:
    if current == "rollback":
        return (f"workflow {name} already holds the decision rollback (set earlier; its resume did not go through), "
                f"and Argo refuses to change it: to roll back, run db-upgrade rollback {name} --config {config_path}; "
                "left alone the window's timeout resumes it, and the rollback step then refuses (a rollback nobody "
                "resumed does not count) and ends the window")
    return (f"workflow {name} already holds the decision end (set earlier; its resume did not go through), and Argo "
            f"refuses to change it: the window is ending; run db-upgrade end-backout {name} --config {config_path} "
            "to resume it now")


def _answer(name: str, config_path: Path, decision: str) -> None:
    def body() -> None:
        from cli.argo_client import ArgoError, DecisionAlreadySet

        _, _, client = _setup(config_path)
        try:
            how = decide(client, name, decision)
        except DecisionAlreadySet as exc:
            raise ArgoError(_already_set(name, exc.current, config_path)) from None
        if how == "resumed":
            typer.echo(f"{name}: the decision {decision} was already set but its resume had not gone through: "
                       "resumed it now")
        if decision == "rollback":
            typer.echo(f"{name}: rollback starts: the new database is frozen, drained to the old one, verified, and "
                       "the applications go back to the old database (write-downtime as at the cutover)")
        else:
            typer.echo(f"{name}: the back-out window ends: the reverse stream is dropped, the new database stays the "
                       "primary for good")
        typer.echo(f"follow with: db-upgrade status {name} --config {config_path}")

    _run(body)


def rollback(name: str = typer.Argument(..., help="Workflow name."), config_path: Path = ConfigOption) -> None:
    """Go back to the old database, losing nothing (a workflow in its back-out window)."""
    _answer(name, config_path, "rollback")


def end_backout(name: str = typer.Argument(..., help="Workflow name."), config_path: Path = ConfigOption) -> None:
    """End the back-out window now: the new database stays the primary for good."""
    _answer(name, config_path, "end")


def register(app: typer.Typer) -> None:
    app.command("rollback")(rollback)
    app.command("end-backout")(end_backout)
