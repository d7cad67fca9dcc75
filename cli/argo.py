"""`db-upgrade submit | approve | abort`: the Argo Server side of the command line (`status`: cli/status.py).

A thin typer layer over cli.argo_client: parse options, call, print. Errors are one line,
`error: ...`, on stderr with exit code 1; `submit --wait` exits 0 only for a finished cutover run.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

ConfigOption = typer.Option(..., "--config", "-c", help="Environment file, e.g. environments/prod.yaml.")

EXIT_FAILED = 1
EXIT_ABORTED = 3


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def load_environment(path: Path) -> tuple[Any, Any]:
    """(config, WorkflowTemplate) for an environment file; the template is what `submit` applies."""
    from workflows.config import load_config
    from workflows.upgrade import build

    config = load_config(path)
    return config, build(config)


def _setup(config_path: Path, with_template: bool = False):
    """(config, template dict or None, client); every failure here is a one-line error."""
    from cli import argo_client as ac
    from workflows.config import ConfigError, load_config

    if not config_path.is_file():
        _fail(f"environment file {config_path} not found: pass --config environments/NAME.yaml")
    template = None
    try:
        if with_template:
            config, built = load_environment(config_path)
            template = ac._as_dict(built)
        else:
            config = load_config(config_path)
    except ConfigError as exc:  # already one line naming file and field
        _fail(str(exc))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        _fail(f"cannot build the WorkflowTemplate from {config_path}: {first}")
    settings = ac.ArgoSettings.from_env(default_namespace=ac.config_namespace(config))
    return config, template, ac.ArgoClient(settings)


def _run(body: Callable[[], Optional[int]]) -> None:
    from cli.argo_client import ArgoError

    try:
        code = body()
    except ArgoError as exc:
        _fail(str(exc))
    if code:
        raise typer.Exit(code)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%H:%M:%S")


def submit(
    config_path: Path = ConfigOption,
    param: List[str] = typer.Option([], "--parameter", "-p", help="Template parameter, name=value (repeatable)."),
    wait: bool = typer.Option(False, "--wait", help="Follow the run to its end; the exit code reflects the outcome."),
    poll: float = typer.Option(10.0, "--poll", help="Seconds between polls with --wait."),
) -> None:
    """Create or update the WorkflowTemplate, then submit a Workflow that runs it."""

    def body() -> Optional[int]:
        from cli import argo_client as ac
        from workflows.rehearsal import RUN_LABEL

        _, template, client = _setup(config_path, with_template=True)
        name = template["metadata"]["name"]
        # Checked before anything is sent: a typo must not half-apply.
        parameters = ac.parse_parameters(param, ac.template_parameters(template))
        action = client.apply_template(template)
        typer.echo(f"workflowtemplate {name} {action}")
        # Same label as the scheduled rehearsals: `argo list -l db-upgrade/run=rehearsal` finds both.
        mode = parameters.get("mode") or ac.template_parameters(template).get("mode", {}).get("value", "upgrade")
        wf = client.submit(name, parameters, labels={RUN_LABEL: mode})
        wf_name = wf["metadata"]["name"]
        typer.echo(f"submitted {wf_name}")
        typer.echo(f"link {client.settings.workflow_link(wf_name)}")
        if not wait:
            return None
        try:
            return follow(client, wf_name, config_path, poll)
        except KeyboardInterrupt:
            # Only the watching stops: the workflow runs on in the cluster.
            typer.echo(f"stopped following {wf_name}, which keeps running:"
                       f" db-upgrade status {wf_name} --config {config_path}", err=True)
            return 130

    _run(body)


def follow(client, name: str, config_path: Path, poll: float, sleep: Callable[[float], None] = time.sleep) -> int:
    """Print workflow and node phase changes until the run ends; return the exit code."""
    from cli import argo_client as ac

    seen: dict[str, tuple] = {}
    announced_approval = False
    wf: dict = {}
    for wf in client.watch(name, poll, sleep=sleep):
        status = wf.get("status") or {}
        state = (ac.workflow_phase(wf), status.get("message") or "")
        # The workflow's own phase first, except its final phase: that reads best after the last steps.
        if seen.get("") != state and state[0] not in ac.FINISHED:
            seen[""] = state
            typer.echo(f"[{_now()}] workflow {state[0]}" + (f": {state[1]}" if state[1] else ""))
        for node in ac.step_nodes(wf):
            key = node.get("id") or node.get("name")
            phase = node.get("phase") or "Pending"
            if seen.get(key) == (phase,):
                continue
            seen[key] = (phase,)
            line = f"[{_now()}] {node.get('displayName')} {phase}"
            if phase in ac.FINISHED or phase in ("Skipped", "Omitted"):
                line += f" ({ac.node_timing(node)[2]})" if node.get("finishedAt") else ""
                if node.get("message") and phase != "Succeeded":
                    line += f": {node['message']}"
            typer.echo(line)
        waiting, _ = ac.approval_state(wf)
        if waiting and not announced_approval:
            announced_approval = True
            lag = ac.lag(wf)
            typer.echo(f"[{_now()}] waiting for approval" + (f" ({lag})" if lag else ""))
            typer.echo(f"  cut over: db-upgrade approve {name} --config {config_path}")
            typer.echo(f"  abort:    db-upgrade abort {name} --config {config_path}")

    phase = ac.workflow_phase(wf)
    status = wf.get("status") or {}
    started, finished = ac.parse_time(status.get("startedAt")), ac.parse_time(status.get("finishedAt"))
    took = f" in {ac.format_duration((finished - started).total_seconds())}" if started and finished else ""
    if phase != "Succeeded":
        message = status.get("message")
        typer.echo(f"error: workflow {name} {phase}{took}" + (f": {message}" if message else ""), err=True)
        return EXIT_FAILED
    approve = ac.find_node(wf, ac.APPROVE_NODE)
    if approve and approve.get("phase") == "Succeeded" and ac.decision(wf) == "abort":
        typer.echo(f"error: workflow {name} finished{took} without cutover: the approval decision was abort", err=True)
        return EXIT_ABORTED
    typer.echo(f"workflow {name} Succeeded{took}")
    return 0


def _decide(name: str, config_path: Path, decision: str) -> None:
    def body() -> None:
        from cli.argo_client import ArgoError, DecisionAlreadySet

        _, _, client = _setup(config_path)
        try:
            how = client.decide(name, decision)
        except DecisionAlreadySet as exc:
            raise ArgoError(_already_set(exc, config_path)) from None
        if how == "resumed":
            typer.echo(f"{name}: the decision {decision} was already set but its resume had not gone through:"
                       " resumed it now")
        if decision == "cutover":
            typer.echo(f"{name}: approved, the cutover starts")
        else:
            typer.echo(f"{name}: aborted at approval, the source stays the primary")
        typer.echo(f"follow with: db-upgrade status {name} --config {config_path}")

    _run(body)


def _already_set(exc, config_path: Path) -> str:
    """What to do when the approve node holds the other decision (Argo refuses a second set)."""
    name, current = exc.workflow, exc.current
    if current == "cutover":
        # Nothing is frozen while the approve node waits: stopping the run only cleans up.
        return (f"workflow {name} already holds the decision cutover (set earlier; its resume did not go through),"
                " and Argo refuses to change it: to cut over, run db-upgrade approve"
                f" {name} --config {config_path}; not to cut over, run argo stop {name}"
                " (nothing is frozen yet, the exit handler cleans up) or let the approval time out"
                " (the cutover refuses a decision that timed out)")
    return (f"workflow {name} already holds the decision {current} (set earlier; its resume did not go through),"
            f" and Argo refuses to change it: finish it with db-upgrade abort {name} --config {config_path}"
            " (or argo stop), then submit a new run to cut over")


def approve(name: str = typer.Argument(..., help="Workflow name."), config_path: Path = ConfigOption) -> None:
    """Approve the cutover of a workflow waiting at the approve step."""
    _decide(name, config_path, "cutover")


def abort(name: str = typer.Argument(..., help="Workflow name."), config_path: Path = ConfigOption) -> None:
    """Abort a workflow waiting at the approve step (no cutover)."""
    _decide(name, config_path, "abort")


def recover(name: str = typer.Argument(..., help="The terminated workflow's name."),
            config_path: Path = ConfigOption,
            wait: bool = typer.Option(False, "--wait", help="Follow the recovery to its end.")) -> None:
    """After `argo terminate` (which skips the exit handler): restore writes if that run froze the
    source and never began its switch, and drop its replication objects. Runs the template's
    `recover` entrypoint against that run's record."""

    def body() -> Optional[int]:
        from cli import argo_client as ac

        _, template, client = _setup(config_path, with_template=True)
        wf = client.get_workflow(name)
        phase = ac.workflow_phase(wf)
        if phase not in ac.FINISHED:
            raise ac.ArgoError(f"workflow {name} is {phase}: recover only a run that has ended "
                               "(argo stop runs the exit handler itself; prefer it over argo terminate)")
        tname = template["metadata"]["name"]
        client.apply_template(template)
        created = client.submit(tname, {"run-id": name}, entrypoint="recover")
        wf_name = created["metadata"]["name"]
        typer.echo(f"submitted {wf_name} to recover {name}")
        typer.echo(f"link {client.settings.workflow_link(wf_name)}")
        return follow(client, wf_name, config_path, 10.0) if wait else None

    _run(body)


def register(app: typer.Typer) -> None:
    app.command("recover")(recover)
    # `lint --server` lives in cli_manifests' `lint` (one lint command), via argo_client.server_problems.
    app.command("submit")(submit)
    app.command("approve")(approve)
    app.command("abort")(abort)
    # `status` is cli/status.py
