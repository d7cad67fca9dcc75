"""The rehearsal CronWorkflow: the real upgrade WorkflowTemplate, on a schedule, into a scratch target.

It refers to the template (`workflowTemplateRef`) instead of copying it, so a rehearsal always runs
exactly what an upgrade would run. The arguments make it safe to run unattended:
mode=rehearsal (scratch target, no freeze of the source), approval=auto (nobody waits at `approve`),
keep-scratch=false (drop the scratch database afterwards).

Two rehearsals never overlap (`concurrencyPolicy: Forbid`), and a rehearsal never overlaps a real
upgrade: both take the template's mutex; `check_rehearsal` refuses a template without one.
"""

from __future__ import annotations

from typing import Any

from hera.workflows import CronWorkflow
from hera.workflows.models import WorkflowMetadata, WorkflowTemplateRef

DEFAULT_SCHEDULE = "0 3 * * 6"  # Saturday 03:00
DEFAULT_TIMEZONE = "UTC"
ARGUMENTS = {"mode": "rehearsal", "approval": "auto", "keep-scratch": "false"}
RUN_LABEL = "db-upgrade/run"


def _setting(config: Any, name: str, default: Any) -> Any:
    """config.rehearsal.<name>, tolerating a config without a rehearsal section (or a dict)."""
    section = config.get("rehearsal") if isinstance(config, dict) else getattr(config, "rehearsal", None)
    if section is None:
        return default
    value = section.get(name) if isinstance(section, dict) else getattr(section, name, None)
    return default if value is None else value


def _template(config: Any) -> dict:
    from workflows.render import as_dict as _as_dict
    from workflows.upgrade import build

    return _as_dict(build(config))


def build_rehearsal(config: Any, template: Any = None) -> CronWorkflow:
    """The rehearsal CronWorkflow for an environment; checked against the template it runs."""
    from workflows.render import as_dict as _as_dict

    template = _as_dict(template) if template is not None else _template(config)
    meta = template["metadata"]
    cron = CronWorkflow(
        name=f"{meta['name']}-rehearsal",
        namespace=meta.get("namespace"),
        labels={RUN_LABEL: "rehearsal"},
        schedules=[_setting(config, "schedule", DEFAULT_SCHEDULE)],
        timezone=_setting(config, "timezone", DEFAULT_TIMEZONE),
        concurrency_policy="Forbid",
        # A missed slot (controller down) may still start within the hour, not hours later in business time.
        starting_deadline_seconds=3600,
        successful_jobs_history_limit=3,
        failed_jobs_history_limit=3,
        # Only when set: an absent field leaves a manual `argo cron suspend` alone under GitOps sync.
        cron_suspend=True if _setting(config, "suspend", False) else None,
        workflow_template_ref=WorkflowTemplateRef(name=meta["name"]),
        arguments=dict(ARGUMENTS),
        # Lets dashboards and `argo list -l` tell rehearsals from real upgrades.
        workflow_metadata=WorkflowMetadata(labels={RUN_LABEL: "rehearsal"}),
    )
    errors = check_rehearsal(cron.to_dict(), template)
    if errors:
        raise ValueError(f"rehearsal CronWorkflow does not fit template {meta['name']}: {'; '.join(errors)}")
    return cron


def check_rehearsal(cron: Any, template: Any) -> list[str]:
    """Why this CronWorkflow would not run this template safely; [] when it would."""
    from workflows.render import as_dict as _as_dict

    cron, template = _as_dict(cron), _as_dict(template)
    errors: list[str] = []
    spec = cron.get("spec") or {}
    wf_spec = spec.get("workflowSpec") or {}
    name = (template.get("metadata") or {}).get("name")
    ref = (wf_spec.get("workflowTemplateRef") or {}).get("name")
    if ref != name:
        errors.append(f"workflowTemplateRef {ref!r} is not the template {name!r}")
    params = {p["name"]: p for p in ((template.get("spec") or {}).get("arguments") or {}).get("parameters") or []}
    given = {p.get("name"): p.get("value") for p in (wf_spec.get("arguments") or {}).get("parameters") or []}
    for pname, value in given.items():
        if pname not in params:
            errors.append(f"argument {pname!r} is not a template parameter ({', '.join(sorted(params))})")
        elif params[pname].get("enum") and value not in params[pname]["enum"]:
            errors.append(f"argument {pname}={value!r} is not one of {params[pname]['enum']}")
    for pname, value in ARGUMENTS.items():
        if given.get(pname) != value:
            errors.append(f"argument {pname} must be {value!r} for an unattended rehearsal, not {given.get(pname)!r}")
    if spec.get("concurrencyPolicy") != "Forbid":
        errors.append("concurrencyPolicy must be Forbid")
    mutexes = (((template.get("spec") or {}).get("synchronization") or {}).get("mutexes")) or []
    if not mutexes:
        errors.append("the template has no synchronization mutex: a rehearsal could overlap a real upgrade")
    for mutex in mutexes:
        # A name that varies per run (workflow name, mode) would give each run its own lock.
        if any(v in (mutex.get("name") or "") for v in ("workflow.name", "workflow.uid", "parameters.mode")):
            errors.append(f"mutex {mutex.get('name')!r} differs between runs: rehearsals and upgrades must share it")
    if not spec.get("schedules"):
        errors.append("no schedule")
    return errors


def documents(config: Any) -> list[dict]:
    """What render.py adds to an environment's manifests."""
    return [build_rehearsal(config).to_dict()]
