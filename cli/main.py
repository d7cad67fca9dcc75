"""The `db-upgrade` command line: one entry point for operators, CI and the pods.

Sub-commands live in the module of their concern and register themselves here;
imports inside commands stay lazy so that `db-upgrade step ...` starts fast in a pod.
"""

import typer

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Near-zero-downtime PostgreSQL major-version upgrades with pgcopydb and Argo Workflows.",
)


def _register() -> None:
    from steps.cli import step_app

    app.add_typer(step_app, name="step")
    for module in ("cli.manifests", "cli.argo", "cli.status", "cli.history", "cli.backout", "local.cli"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ModuleNotFoundError as exc:  # a concern not built yet
            if exc.name != module:
                raise
            continue
        mod.register(app)


_register()


def main() -> None:
    app()
