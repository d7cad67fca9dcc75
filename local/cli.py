"""`db-upgrade run` and `db-upgrade rehearse`: the workflow on this machine (README.md, "Running locally")."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

APPROVE = ("manual", "auto", "cutover", "abort")
SIZES = ("tiny", "small", "medium", "large")


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _summary(console, result) -> None:
    from rich.table import Table

    t = Table(title=f"db-upgrade run: {result.status}" + (" (aborted at approval)" if result.aborted else "")
              + (" (interrupted)" if result.interrupted else ""))
    t.add_column("task")
    t.add_column("result")
    t.add_column("seconds", justify="right")
    t.add_column("note")
    for nodes in (result.nodes, result.exit_nodes):
        for n in nodes.values():
            secs = f"{n.finished - n.started:.1f}" if n.started and n.finished else ""
            t.add_row(n.name, n.phase, secs, n.message)
    console.print(t)


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run(
        source: str = typer.Option(None, "--source", envvar="PGCOPYDB_SOURCE_PGURI", show_envvar=True,
                                   show_default=False, help="source URI (PostgreSQL 15)"),
        target: str = typer.Option(None, "--target", envvar="PGCOPYDB_TARGET_PGURI", show_envvar=True,
                                   show_default=False, help="target URI (PostgreSQL 17)"),
        workdir: Path = typer.Option(None, "--dir", help="pgcopydb work directory: new or empty"),
        readonly_sql: Path = typer.Option(None, "--readonly-sql", help="SQL that freezes application writes"),
        unfreeze_sql: Path = typer.Option(None, "--unfreeze-sql", help="SQL that restores them"),
        approve: str = typer.Option("manual", "--approve",
                                    help="manual (ask), auto (cut over when caught up), cutover or abort (answer the approve step)"),
        mode: str = typer.Option("upgrade", "--mode", help="workflow parameter mode: upgrade or rehearsal"),
        keep_slot_on_failure: bool = typer.Option(False, "--keep-slot-on-failure",
                                                  help="on failure keep the slot and the work dir"),
        restart_command: str = typer.Option(None, "--restart-command",
                                            help="shell command run at the restart step (applications to the target)"),
        config: Path = typer.Option(None, "--config", "-c",
                                    help="environment file whose template and tunables to use (default: built in)"),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="also show pgcopydb's own log lines"),
        rollback: bool = typer.Option(False, "--rollback",
                                      help="open the back-out window at the cutover, keep writing on the new "
                                           "database, then roll back (native engine)"),
        cluster_transition_seconds: float = typer.Option(
            None, "--cluster-transition-seconds", show_default=False,
            help="what a cluster adds each time the DAG moves on, for the modelled timeline"
                 " (default 15: the controller's 10 s requeue plus a 5 s pod start; nothing sleeps)"),
    ) -> None:
        """Run the upgrade workflow here: the WorkflowTemplate's DAG, each step as `db-upgrade step NAME`.

        Exit codes: 0 cut over, 3 aborted at the approval, 1 failed, 130 interrupted (cleaned up)."""
        from rich.console import Console

        from local.runner import RunError, execute, load_template
        from workflows.config import ConfigError

        if cluster_transition_seconds is not None and not cluster_transition_seconds >= 0:
            _fail("--cluster-transition-seconds must be 0 or more seconds")
        if not source or not target:
            _fail("give --source and --target (or PGCOPYDB_SOURCE_PGURI and PGCOPYDB_TARGET_PGURI)")
        if workdir is None:
            _fail("give --dir: a new or empty directory for pgcopydb's work files")
        if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())):
            _fail(f"--dir {workdir} is not an empty directory: each run needs its own (as the workflow's volume)")
        for opt, path in (("--readonly-sql", readonly_sql), ("--unfreeze-sql", unfreeze_sql)):
            if path is None:
                _fail(f"give {opt}: the file with the SQL")
            if not path.is_file() or not os.access(path, os.R_OK):
                _fail(f"{opt} {path} is not a readable file")
        if approve not in APPROVE:
            _fail(f"--approve must be one of {', '.join(APPROVE)}, not {approve!r}")
        if approve == "manual" and not sys.stdin.isatty():
            _fail("--approve manual needs a terminal to ask: use --approve auto, cutover or abort")
        console = Console(stderr=True)
        try:
            template = load_template(config)
            result = execute(
                template, console=console, approve=approve, verbose=verbose,
                params={"mode": mode, "keep-slot-on-failure": "true" if keep_slot_on_failure else "false"},
                source=source, target=target, workdir=workdir, readonly_sql=readonly_sql,
                unfreeze_sql=unfreeze_sql, restart_command=restart_command,
                **({} if cluster_transition_seconds is None else {"transition_seconds": cluster_transition_seconds}),
            )
        except (RunError, ConfigError) as exc:
            _fail(str(exc))
        _summary(console, result)
        console.print(f"step logs: {workdir.resolve() / 'local-run' / 'logs'}", highlight=False)
        raise typer.Exit(result.exit_code)

    @app.command("rehearse")
    def rehearse(
        size: str = typer.Option("small", "--size", help="sample size: tiny, small, medium or large"),
        write_rate: float = typer.Option(50, "--write-rate", help="application writes per second during the run"),
        report: Path = typer.Option(None, "--report", help="also write the report as JSON here"),
        keep: bool = typer.Option(False, "--keep", help="keep the servers' directory (for inspection)"),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="also show pgcopydb's own log lines"),
        engine: str = typer.Option("native", "--engine", help="native (default) or pgcopydb-follow"),
        switch: str = typer.Option("restart", "--switch",
                                   help="restart (the application reconnects to the target) or pgbouncer "
                                        "(it writes through a real PgBouncer, which the cutover repoints)"),
        rollback: bool = typer.Option(False, "--rollback",
                                      help="open the back-out window at the cutover, keep writing on the new "
                                           "database, then roll back (native engine)"),
        cluster_transition_seconds: float = typer.Option(
            None, "--cluster-transition-seconds",
            help="what a cluster adds per DAG transition, for the modelled write-downtime (default 15)"),
    ) -> None:
        """A full upgrade rehearsal with nothing to set up, ending with a report.

        Throwaway PostgreSQL 15 and 17, the sample database under a steady write load, then
        `run` with automatic approval; the servers are removed at the end."""
        from local.rehearse import rehearse as do_rehearse

        if size not in SIZES:
            _fail(f"--size must be one of {', '.join(SIZES)}, not {size!r}")
        if write_rate < 0:
            _fail("--write-rate must be 0 or more writes per second")
        from local.rehearse import ENGINES, SWITCHES

        if engine not in ENGINES:
            _fail(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}")
        if switch not in SWITCHES:
            _fail(f"--switch must be one of {', '.join(SWITCHES)}, not {switch!r}")
        if rollback and engine != "native":
            _fail("--rollback needs --engine native (reverse logical replication)")
        if cluster_transition_seconds is not None and cluster_transition_seconds < 0:
            _fail("--cluster-transition-seconds must be 0 or more")
        raise typer.Exit(do_rehearse(size=size, write_rate=write_rate, report_path=report, keep=keep,
                                     verbose=verbose, engine=engine, switch=switch,
                                     transition_seconds=cluster_transition_seconds, rollback=rollback))
