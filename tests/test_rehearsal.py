"""The rehearsal CronWorkflow: valid Argo, runs the real template with its real parameter names."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
from hera.workflows import CronWorkflow
from hera.workflows.models import WorkflowTemplateRef

from tests.fakes.argo import assert_valid, load_environment, write_environment
from cli import argo_client as ac
from workflows.rehearsal import ARGUMENTS, DEFAULT_SCHEDULE, build_rehearsal, check_rehearsal


@pytest.fixture
def environment(tmp_path):
    """(Config, the real WorkflowTemplate as a dict)."""
    return load_environment(write_environment(tmp_path))


@pytest.fixture
def template(environment) -> dict:
    return environment[1]


def test_rehearsal_runs_the_template_unattended(environment):
    config, template = environment
    cron = build_rehearsal(config, template).to_dict()
    assert_valid(cron)
    spec = cron["spec"]
    assert spec["schedules"] == [DEFAULT_SCHEDULE]
    assert spec["timezone"] == "UTC"
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["workflowSpec"]["workflowTemplateRef"] == {"name": template["metadata"]["name"]}
    args = {p["name"]: p["value"] for p in spec["workflowSpec"]["arguments"]["parameters"]}
    assert args == {"mode": "rehearsal", "approval": "auto", "keep-scratch": "false"}
    # The real names: every argument is a parameter the template declares, with an allowed value.
    params = ac.template_parameters(template)
    for name, value in args.items():
        assert name in params
        assert value in params[name].get("enum", [value])
    assert check_rehearsal(cron, template) == []


def test_the_template_carries_the_shared_mutex(environment):
    _, template = environment
    mutexes = template["spec"]["synchronization"]["mutexes"]
    assert mutexes and all("workflow.name" not in m["name"] for m in mutexes)
    if hasattr(environment[0], "mutex_name"):
        assert {"name": environment[0].mutex_name} in mutexes


def test_schedule_and_timezone_come_from_the_config(template):
    config = SimpleNamespace(rehearsal=SimpleNamespace(schedule="30 2 * * 0", timezone="Europe/Berlin", suspend=True))
    spec = build_rehearsal(config, template).to_dict()["spec"]
    assert (spec["schedules"], spec["timezone"], spec["suspend"]) == (["30 2 * * 0"], "Europe/Berlin", True)
    # Not suspended: no `suspend` field, so a GitOps sync leaves a manual `argo cron suspend` alone.
    assert "suspend" not in build_rehearsal(SimpleNamespace(), template).to_dict()["spec"]


def _cron(template: dict, **arguments) -> dict:
    return CronWorkflow(
        name="db-upgrade-prod-rehearsal",
        schedules=[DEFAULT_SCHEDULE],
        concurrency_policy="Forbid",
        workflow_template_ref=WorkflowTemplateRef(name=template["metadata"]["name"]),
        arguments=arguments,
    ).to_dict()


def test_a_misspelt_parameter_is_rejected(template):
    cron = _cron(template, **{"mode": "rehearsal", "approval": "auto", "keep-scrach": "false"})
    assert_valid(cron)  # the schema cannot know the template's parameter names...
    errors = check_rehearsal(cron, template)  # ...the checker does
    assert any("'keep-scrach' is not a template parameter" in e for e in errors), errors
    assert check_rehearsal(_cron(template, **ARGUMENTS), template) == []


def test_unsafe_rehearsals_are_rejected(template):
    manual = _cron(template, **{**ARGUMENTS, "approval": "manual"})
    assert any("approval must be 'auto'" in e for e in check_rehearsal(manual, template))
    assert any("one of" in e for e in check_rehearsal(_cron(template, **{**ARGUMENTS, "mode": "rehersal"}), template))
    no_mutex = copy.deepcopy(template)
    del no_mutex["spec"]["synchronization"]
    with pytest.raises(ValueError, match="no synchronization mutex"):
        build_rehearsal(None, no_mutex)
    per_run = copy.deepcopy(template)
    per_run["spec"]["synchronization"]["mutexes"] = [{"name": "{{workflow.name}}"}]
    assert any("differs between runs" in e for e in check_rehearsal(_cron(template, **ARGUMENTS), per_run))
    allow = _cron(template, **ARGUMENTS)
    allow["spec"]["concurrencyPolicy"] = "Allow"
    assert "concurrencyPolicy must be Forbid" in check_rehearsal(allow, template)


def test_render_includes_the_rehearsal(environment):
    from workflows.render import render_documents

    config, template = environment
    crons = [d for d in render_documents(config) if d["kind"] == "CronWorkflow"]
    assert [c["metadata"]["name"] for c in crons] == [f"{template['metadata']['name']}-rehearsal"]
    assert crons[0]["metadata"]["namespace"] == template["metadata"]["namespace"]
