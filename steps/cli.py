"""`db-upgrade step NAME`: each upgrade step as a command, configured from the
environment exactly as in the workflow's pods."""

import sys
from typing import Callable

import typer

from steps.errors import StepError

step_app = typer.Typer(no_args_is_help=True, help="Run one upgrade step (configuration from the environment).")


def run_step(fn: Callable, **overrides) -> object:
    """Load settings, run the step, and turn an operator-facing failure into one line."""
    from steps.settings import load_settings

    try:
        return fn(load_settings(**overrides))
    except StepError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise typer.Exit(1)


def _add(name: str, module: str, func: str, doc: str) -> None:
    def command() -> None:
        mod = __import__(f"steps.{module}", fromlist=[func])
        run_step(getattr(mod, func))

    command.__doc__ = doc
    step_app.command(name)(command)


for _name, _module, _func, _doc in [
    ("preflight", "preflight", "preflight", "Check source, target, pgcopydb and the work dir; list every problem."),
    ("grant-replication", "grant", "grant_replication", "Grant REPLICATION to the source role (recorded for cleanup)."),
    ("follow", "follow", "follow", "Run pgcopydb clone --follow until the endpos is reached (resumes a run)."),
    ("wait-caught-up", "catchup", "wait_caught_up", "Wait until the copy is done and the lag is under the threshold."),
    ("freeze", "freeze", "freeze", "Run the readonly SQL on the source and wait for in-flight transactions."),
    ("finish", "finish", "finish", "Set pgcopydb's endpos to the source's current WAL position."),
    ("verify", "verify", "verify", "Compare source and target exactly: objects, row checksums, sequences."),
    ("cleanup", "cleanup", "cleanup", "Drop the slot, origin and pgcopydb schema; revoke replication if granted."),
    ("unfreeze", "freeze", "unfreeze", "Run the unfreeze SQL on the source: application writes come back."),
    ("create-scratch-target", "scratch", "create_scratch_target", "Rehearsal: create the scratch target database."),
    ("drop-scratch-target", "scratch", "drop_scratch_target", "Rehearsal: drop the scratch target database."),
    ("report", "report", "report", "Exit handler: log the outcome of the workflow in one line."),
]:
    _add(_name, _module, _func, _doc)


@step_app.command("restart")
def restart_command() -> None:
    """Restart the application deployments (kubectl rollout restart) and wait for the rollouts."""
    from steps import restart

    try:
        restart.command()
    except StepError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise typer.Exit(1)
