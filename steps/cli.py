"""`db-upgrade step NAME`: each upgrade step as a command, configured from the
environment exactly as in the workflow's pods."""

import os
import sys
from pathlib import Path
from typing import Callable, NoReturn

import typer

from steps.errors import StepError

step_app = typer.Typer(no_args_is_help=True, help="Run one upgrade step (configuration from the environment).")

# Where the kubelet reads a container's termination message (the pod's
# terminationMessagePath, default /dev/termination-log). Argo puts it in the
# node's message: "main: Error (exit code 1): <message>"
# (workflow/controller/operator.go, inferFailedReason).
TERMINATION_LOG = "/dev/termination-log"
TERMINATION_LOG_MAX = 4096  # bytes the kubelet keeps of it


def write_termination_message(message: str) -> None:
    """The failure's one line, for the pod's status; silently nothing where there is no such file.

    The default path is written only when it exists (the kubelet mounts it in every
    container): on a laptop, as root, /dev must not get a stray file.
    """
    path = os.environ.get("DB_UPGRADE_TERMINATION_LOG") or TERMINATION_LOG
    if path == TERMINATION_LOG and not os.path.exists(path):
        return
    data = " ".join(message.split()).encode()[:TERMINATION_LOG_MAX].decode(errors="ignore")
    try:
        Path(path).write_text(data)
    except OSError:
        pass  # not writable: the line on stderr is still in the log


def fail(message: str) -> NoReturn:
    """How a step fails: `error: <message>` on stderr and, without the `error: ` that Argo's own
    "Error (exit code 1)" already says, as the container's termination message; exit 1."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    write_termination_message(message)
    raise typer.Exit(1)


def _unexpected(exc: BaseException) -> None:
    """A bug, not an operator-facing failure: the traceback goes to the log, one line to the node."""
    from steps.pg import scrub

    first = (str(exc).strip().splitlines() or [""])[0]
    write_termination_message(scrub(f"unexpected {type(exc).__name__}: {first}"[:500] + " (traceback in the log)"))


def run_step(fn: Callable, **overrides) -> object:
    """Load settings, run the step, and turn an operator-facing failure into one line."""
    from steps.settings import load_settings

    try:
        return fn(load_settings(**overrides))
    except StepError as exc:
        fail(str(exc))
    except typer.Exit:  # click's Exit is a RuntimeError: a step's own exit code is not a bug
        raise
    except Exception as exc:
        _unexpected(exc)
        raise


def _add(name: str, module: str, func: str, doc: str) -> None:
    def command() -> None:
        mod = __import__(f"steps.{module}", fromlist=[func])
        run_step(getattr(mod, func))

    command.__doc__ = doc
    step_app.command(name)(command)


for _name, _module, _func, _doc in [
    ("preflight", "preflight", "preflight", "Check source, target, the engine and the work dir; list every problem."),
    ("grant-replication", "grant", "grant_replication", "Grant REPLICATION to the source role (recorded for cleanup)."),
    ("follow", "follow", "follow", "Copy, then stream changes until the end position is reached on the target."),
    ("wait-caught-up", "catchup", "wait_caught_up", "Wait until the copy is done and the lag is under the threshold."),
    ("verify-prepare", "verify", "reconcile", "Prepare the exact comparison and keep it current until the cutover."),
    ("verify-ready", "verify", "ready", "Wait for the verify preparation; report it and the lag for the approval."),
    ("cutover", "cutover", "cutover", "The frozen window in one step: freeze, drain, verify, switch, downtime."),
    ("freeze", "freeze", "freeze", "Run the readonly SQL on the source and wait for in-flight transactions."),
    ("finish", "finish", "finish", "Set the end position: follow applies everything before it, then exits."),
    ("verify", "verify", "verify", "Compare source and target exactly: objects, rows, sequences."),
    ("cleanup", "cleanup", "cleanup", "Drop the replication objects of the run on both sides; revoke what was granted."),
    ("unfreeze", "freeze", "unfreeze", "Run the unfreeze SQL on the source: application writes come back."),
    ("unfreeze-after-failure", "freeze", "unfreeze_after_failure",
     "Exit handler: restore writes if this run froze the source and the switch never began."),
    ("create-scratch-target", "scratch", "create_scratch_target", "Rehearsal: create the scratch target database."),
    ("drop-scratch-target", "scratch", "drop_scratch_target", "Rehearsal: drop the scratch target database."),
    ("report", "report", "report", "Exit handler: the run's report, in the log, the outputs and the history."),
    ("rollback", "backout", "rollback", "Go back to the old database: freeze the new one, drain, verify, switch back."),
    ("end-backout", "backout", "end", "Drop the back-out window's reverse replication on both sides."),
    ("backout-status", "backout", "status_step", "The back-out window: lag, WAL kept, time left."),
    ("backout-verify-prepare", "backout", "verify_prepare", "Prepare the rollback's exact comparison during the window."),
]:
    _add(_name, _module, _func, _doc)


@step_app.command("restart")
def restart_command() -> None:
    """Restart the application deployments (kubectl rollout restart) and wait for the rollouts."""
    from steps.switch import restart

    try:
        restart.command()
    except StepError as exc:
        fail(str(exc))
    except typer.Exit:
        raise
    except Exception as exc:
        _unexpected(exc)
        raise
