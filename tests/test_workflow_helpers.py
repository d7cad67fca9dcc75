"""Shared helpers for the workflow tests (no tests here): configurations and a small DAG simulator."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from workflows.config import load_config
from workflows.upgrade import render

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "environments/example.yaml"

BASE = {
    "name": "t",
    "database_id": "orders",
    "namespace": "db-upgrade",
    "image": {"repository": "registry.example/db-upgrade", "tag": "1.2.3"},
    "connections": {
        "source": {"secret": "source-uri", "key": "uri"},
        "target": {"secret": "target-uri", "key": "uri"},
    },
    "sql_config_map": "db-upgrade-sql",
    "restart": {"deployments": ["api", "worker"]},
}


def write_config(tmp_path: Path, data: dict, name: str = "env.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def config(tmp_path: Path, **overrides):
    return load_config(write_config(tmp_path, {**BASE, **overrides}))


def example_template() -> dict:
    return render(load_config(EXAMPLE))


def templates(wt: dict) -> dict[str, dict]:
    return {t["name"]: t for t in wt["spec"]["templates"]}


def dag_tasks(wt: dict, dag: str) -> list[dict]:
    return templates(wt)[dag]["dag"]["tasks"]


# --- A small model of Argo's DAG semantics, enough to check every branch ---------------
RESULTS = ("Succeeded", "Failed", "Errored", "Skipped", "Omitted")


def _to_python(expr: str) -> str:
    expr = re.sub(r"('[^']*')\s*=~\s*('[^']*')", r"bool(__import__('re').search(\2, \1))", expr)
    return expr.replace("&&", " and ").replace("||", " or ").replace("!(", " not (")


def evaluate_when(when: str, values: dict[str, str]) -> bool:
    """Substitutes {{...}} as Argo does, leaving unknown references literal, then evaluates."""
    text = re.sub(r"\{\{([^}]+)\}\}", lambda m: values.get(m[1].strip(), m[0]), when)
    return bool(eval(_to_python(text), {}))  # noqa: S307 - our own template text


def evaluate_depends(depends: str, states: dict[str, str]) -> bool:
    def result(m):
        task, res = m[1], m[2]
        return repr(states[task] == res)

    return bool(eval(_to_python(re.sub(r"([a-z][a-z0-9-]*)\.(" + "|".join(RESULTS) + ")", result, depends)), {}))


def simulate(wt: dict, *, params: dict | None = None, decision: str = "cutover", outcomes: dict | None = None,
             dag: str = "upgrade", extra_values: dict | None = None) -> dict[str, str]:
    """Node states of one run: tasks listed in dependency order; a task that runs ends with
    outcomes.get(name, 'Succeeded'); `approve` yields `decision`."""
    params = {"approval": "manual", "mode": "upgrade", "keep-slot-on-failure": "false", "keep-scratch": "false",
              "skip-verify-preparation": "false", "run-id": "",
              **(params or {})}
    values = {f"workflow.parameters.{k}": v for k, v in params.items()} | (extra_values or {})
    outcomes = outcomes or {}
    states: dict[str, str] = {}
    for task in dag_tasks(wt, dag):
        name = task["name"]
        if "depends" in task and not evaluate_depends(task["depends"], states):
            states[name] = "Omitted"
            continue
        if "when" in task and not evaluate_when(task["when"], values):
            states[name] = "Skipped"
            continue
        states[name] = outcomes.get(name, "Succeeded")
        if name == "approve" and states[name] == "Succeeded":
            values["tasks.approve.outputs.parameters.decision"] = decision
    return states
