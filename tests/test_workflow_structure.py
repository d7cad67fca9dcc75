"""The rendered WorkflowTemplate as a real Argo v4.1.2 would run it, checked from its structure.

- The frozen window holds no pod start: the task whose step freezes is the one that switches, and
  no other task can start while it runs unless it was due before it (issue 12: each transition
  costs the controller's requeue plus a pod start, 10-15 s).
- Cleanup and reports come after the switch, and cleanup after every other task of the DAG: it
  drops the slots and triggers the others still use (a verify-prepare still running when cleanup
  drops its tracking slot fails, and fails the run).
- Every pod template has a deadline, and never both `timeout` and `activeDeadlineSeconds`: on a
  container template `timeout` replaces the pod's activeDeadlineSeconds
  (workflow/controller/workflowpod.go, checkTemplateTimeouts in operator.go).
- Every `{{tasks.X.outputs.parameters.Y}}` resolves: X is an ancestor (dag.go
  buildLocalScopeFromTask; else the task is requeued forever); when X can be Skipped or Omitted
  while the consumer still runs, Y has a valueFrom.default (scope.go addSkippedNodeOutputsToScope;
  in an argument the consumer's input default also serves, markAbsentOptionalArgs), else the node
  errors.
- Every input of a suspend template is also a supplied output (the UI sets them all).

Each check is a pure function returning problem lines, tested on small templates that break it.
"""

from __future__ import annotations

import itertools
import re

import pytest

from local.runner import FREEZE_STEPS, SWITCH_STEPS, evaluate_depends, depends_on
from tests.test_workflow_helpers import example_template

# Steps that must wait for the switch: they need nothing frozen, and they must not run before it.
AFTER_SWITCH_STEPS = ("cleanup", "report", "history", "metrics")
STATES = ("Succeeded", "Failed", "Errored", "Skipped", "Omitted")
_REF = re.compile(r"\{\{\s*tasks\.([a-z0-9][a-z0-9-]*)\.outputs\.parameters\.([A-Za-z0-9_-]+)\s*\}\}")


@pytest.fixture(scope="module")
def wt() -> dict:
    return example_template()


# --- reading the template -----------------------------------------------------------------------

def templates(wt: dict) -> dict[str, dict]:
    return {t["name"]: t for t in wt["spec"]["templates"]}


def dag(wt: dict, name: str | None = None) -> dict[str, dict]:
    name = name or wt["spec"]["entrypoint"]
    return {t["name"]: t for t in templates(wt)[name]["dag"]["tasks"]}


def direct_deps(task: dict) -> set[str]:
    if task.get("depends"):
        return depends_on(task["depends"])
    return set(task.get("dependencies") or [])


def ancestors(tasks: dict[str, dict], name: str) -> set[str]:
    seen: set[str] = set()
    todo = list(direct_deps(tasks[name]))
    while todo:
        d = todo.pop()
        if d in tasks and d not in seen:
            seen.add(d)
            todo.extend(direct_deps(tasks[d]))
    return seen


def step_of(wt: dict, task: dict) -> str | None:
    c = templates(wt)[task["template"]].get("container") or {}
    args = c.get("args") or []
    return args[1] if len(args) == 2 and args[0] == "step" else None


def possible_states(tasks: dict[str, dict], fixed: dict[str, set[str]]) -> dict[str, set[str]]:
    """Every end state each task can reach when the tasks in `fixed` end only in the given states
    (Argo's rules: a false `depends` omits, a false `when` skips, a run ends in any result)."""
    states: dict[str, set[str]] = {}

    def of(name: str) -> set[str]:
        if name in states:
            return states[name]
        if name in fixed:
            states[name] = set(fixed[name])
            return states[name]
        task = tasks[name]
        ran = {"Succeeded", "Failed", "Errored"} | ({"Skipped"} if task.get("when") else set())
        deps = sorted(d for d in direct_deps(task) if d in tasks)
        if not deps:
            states[name] = ran
            return ran
        result: set[str] = set()
        for combo in itertools.product(*(sorted(of(d)) for d in deps)):
            assignment = dict(zip(deps, combo))
            expr = task.get("depends") or " && ".join(f"{d}.Succeeded" for d in deps)
            result |= ran if evaluate_depends(expr, assignment) else {"Omitted"}
        states[name] = result
        return result

    for name in tasks:
        of(name)
    return states


def can_run_while(tasks: dict[str, dict], consumer: str, producer: str, producer_states: set[str]) -> bool:
    """Can `consumer` start (its `depends` hold) when `producer` ended in one of producer_states?"""
    states = possible_states(tasks, {producer: producer_states})
    return bool(states[consumer] & {"Succeeded", "Failed", "Errored", "Skipped"})


# --- the checks ----------------------------------------------------------------------------------

def window_problems(wt: dict) -> list[str]:
    tasks = dag(wt)
    freezing = [n for n, t in tasks.items() if step_of(wt, t) in FREEZE_STEPS]
    switching = [n for n, t in tasks.items() if step_of(wt, t) in SWITCH_STEPS]
    if len(freezing) != 1 or len(switching) != 1:
        return [f"expected one task that freezes and one that switches, found {freezing} and {switching}"]
    freeze, switch = freezing[0], switching[0]
    if freeze != switch:
        between = sorted((n for n in tasks if freeze in ancestors(tasks, n) and n in ancestors(tasks, switch)),
                         key=lambda n: len(ancestors(tasks, n)))
        chain = " -> ".join([freeze, *between, switch])
        return [f"the frozen window spans {len(between) + 2} pods ({chain}): each start inside it costs"
                " the controller's requeue and a pod start"]
    problems = []
    if templates(wt)[tasks[freeze]["template"]].get("daemon"):
        problems.append(f"{freeze} is a daemon: its dependents would start while it holds the writes")
    before = ancestors(tasks, freeze)
    for name, task in tasks.items():
        if name == freeze or name in before or freeze in ancestors(tasks, name):
            continue
        # Concurrent with the window's pod: fine if due at the latest when it starts (all its
        # dependencies are the window pod's ancestors), else it may start inside the window.
        late = sorted(d for d in direct_deps(task) if d in tasks and d not in before)
        if late:
            problems.append(f"{name} may start while {freeze} holds the writes frozen: it waits for"
                            f" {', '.join(late)}, not for {freeze}")
    return problems


def after_switch_problems(wt: dict) -> list[str]:
    tasks = dag(wt)
    switching = [n for n, t in tasks.items() if step_of(wt, t) in SWITCH_STEPS]
    problems = []
    for name, task in tasks.items():
        if step_of(wt, task) in AFTER_SWITCH_STEPS and not set(switching) <= ancestors(tasks, name):
            problems.append(f"{name} ({step_of(wt, task)}) does not wait for the switch ({', '.join(switching)})")
    return problems


def runs(tasks: dict[str, dict]) -> list[dict[str, str]]:
    """Every way a run of the DAG can end: each task that starts ends Succeeded or Failed, each
    `when` is true or false; the rest follows from `depends` (false: Omitted)."""
    order: list[str] = []

    def visit(n: str) -> None:
        if n not in order:
            for d in sorted(direct_deps(tasks[n]) & set(tasks)):
                visit(d)
            order.append(n)

    for n in tasks:
        visit(n)
    choices = {n: ("Succeeded", "Failed", "Skipped") if tasks[n].get("when") else ("Succeeded", "Failed")
               for n in order}
    exprs = {n: tasks[n].get("depends") or " && ".join(f"{d}.Succeeded" for d in sorted(direct_deps(tasks[n])))
             for n in order}
    deps = {n: sorted(direct_deps(tasks[n]) & set(tasks)) for n in order}
    out: list[dict[str, str]] = []

    def expand(i: int, states: dict[str, str]) -> None:
        # Depth first: an Omitted task has one outcome, so only reachable runs are built.
        if i == len(order):
            out.append(dict(states))
            return
        n = order[i]
        runs_ = not exprs[n] or evaluate_depends(exprs[n], {d: states[d] for d in deps[n]})
        for pick in (choices[n] if runs_ else ("Omitted",)):
            states[n] = pick
            expand(i + 1, states)
        del states[n]

    expand(0, {})
    return out


def cleanup_last_problems(wt: dict) -> list[str]:
    tasks = dag(wt)
    cleanups = [n for n, t in tasks.items() if step_of(wt, t) == "cleanup"]
    problems: set[str] = set()
    for states in runs(tasks) if cleanups else ():
        ran = {n for n, s in states.items() if s in ("Succeeded", "Failed")}
        for name in cleanups:
            if name not in ran:
                continue
            before = ancestors(tasks, name)
            for other in ran - before - {name}:
                if name not in ancestors(tasks, other):
                    problems.add(f"{name} may run while {other} still runs: it removes what {other} uses")
    return sorted(problems)


def deadline_problems(wt: dict) -> list[str]:
    problems = []
    for t in wt["spec"]["templates"]:
        if "container" in t or "script" in t or "containerSet" in t:
            has_deadline, has_timeout = t.get("activeDeadlineSeconds") is not None, bool(t.get("timeout"))
            if has_deadline and has_timeout:
                problems.append(f"template {t['name']} has both timeout ({t['timeout']}) and activeDeadlineSeconds"
                                f" ({t['activeDeadlineSeconds']}): the timeout replaces the deadline")
            elif not (has_deadline or has_timeout):
                problems.append(f"template {t['name']} runs a pod without a deadline")
        if "suspend" in t and not t["suspend"].get("duration"):
            problems.append(f"suspend template {t['name']} has no duration: it can wait forever")
    return problems


def reference_problems(wt: dict) -> list[str]:
    tmpls = templates(wt)
    problems = []
    dags = [n for n in (wt["spec"]["entrypoint"], wt["spec"].get("onExit")) if n]
    for dag_name in dags:
        tasks = dag(wt, dag_name)
        for name, task in tasks.items():
            consumer_inputs = {p["name"]: p for p in (tmpls[task["template"]].get("inputs") or {}).get("parameters") or []}
            refs = [("when", None, task.get("when") or "")]
            refs += [("argument", a["name"], str(a.get("value", "")))
                     for a in (task.get("arguments") or {}).get("parameters") or []]
            for where, arg, text in refs:
                for m in _REF.finditer(text):
                    producer, param = m[1], m[2]
                    what = f"{dag_name}/{name} {where}{' ' + arg if arg else ''} {{{{tasks.{producer}.outputs.parameters.{param}}}}}"
                    if producer not in tasks or producer not in ancestors(tasks, name):
                        problems.append(f"{what}: {producer} is not among the task's dependencies,"
                                        " Argo requeues it forever")
                        continue
                    out = next((p for p in (tmpls[tasks[producer]["template"]].get("outputs") or {}).get("parameters")
                                or [] if p["name"] == param), None)
                    if out is None:
                        problems.append(f"{what}: {producer} declares no output {param}")
                        continue
                    has_default = "default" in (out.get("valueFrom") or {})
                    pure = m[0] == text.strip() and where == "argument"
                    rescued = pure and "default" in consumer_inputs.get(arg, {})
                    if not (has_default or rescued) and can_run_while(tasks, name, producer, {"Skipped", "Omitted"}):
                        problems.append(f"{what}: {producer} can be skipped or omitted while {name} runs, and"
                                        f" {param} has no default: the node errors")
                    if not has_default and can_run_while(tasks, name, producer, {"Failed", "Errored"}):
                        problems.append(f"{what}: {name} also runs after {producer} failed, which may leave"
                                        f" {param} unset: give it a default")
    return problems


def suspend_problems(wt: dict) -> list[str]:
    problems = []
    for t in wt["spec"]["templates"]:
        if "suspend" not in t:
            continue
        supplied = {p["name"] for p in (t.get("outputs") or {}).get("parameters") or []
                    if "supplied" in (p.get("valueFrom") or {})}
        for p in (t.get("inputs") or {}).get("parameters") or []:
            if p["name"] not in supplied:
                problems.append(f"suspend template {t['name']}: input {p['name']} is not a supplied output, so"
                                f" the UI's resume fails (node is not expecting output parameter '{p['name']}')")
    return problems


# --- on the real template ------------------------------------------------------------------------

def test_no_pod_starts_inside_the_frozen_window(wt):
    assert window_problems(wt) == []


def test_cleanup_and_reports_come_after_the_switch(wt):
    assert after_switch_problems(wt) == []


def test_cleanup_waits_for_every_other_task(wt):
    assert cleanup_last_problems(wt) == []


def test_every_pod_has_one_deadline(wt):
    assert deadline_problems(wt) == []


def test_every_task_output_reference_resolves(wt):
    assert reference_problems(wt) == []


def test_the_ui_can_resume_every_suspend(wt):
    assert suspend_problems(wt) == []


# --- each check fails on a template that breaks it -----------------------------------------------

def _wt(tasks: list[dict], extra: list[dict] | None = None, on_exit: list[dict] | None = None) -> dict:
    names = {t["template"] for t in tasks + (on_exit or [])}
    pods = [{"name": n, "container": {"image": "x", "args": ["step", n]}, "activeDeadlineSeconds": 60}
            for n in sorted(names) if n not in {e["name"] for e in extra or []}]
    spec = {"entrypoint": "main", "templates": [{"name": "main", "dag": {"tasks": tasks}}, *pods, *(extra or [])]}
    if on_exit:
        spec["onExit"] = "exit"
        spec["templates"].append({"name": "exit", "dag": {"tasks": on_exit}})
    return {"spec": spec}


def _t(name: str, depends: str | None = None, **extra) -> dict:
    return {"name": name, "template": extra.pop("template", name), **({"depends": depends} if depends else {}), **extra}


def test_window_check_names_the_pods_of_a_five_pod_window():
    old = _wt([_t("approve"), _t("freeze", "approve.Succeeded"), _t("finish", "freeze.Succeeded"),
               _t("verify", "finish.Succeeded"), _t("cleanup", "verify.Succeeded"),
               _t("restart", "cleanup.Succeeded && freeze.Succeeded")])
    assert window_problems(old) == [
        "the frozen window spans 5 pods (freeze -> finish -> verify -> cleanup -> restart): each start inside"
        " it costs the controller's requeue and a pod start"]
    assert after_switch_problems(old) == ["cleanup (cleanup) does not wait for the switch (restart)"]


def test_window_check_catches_a_pod_that_may_start_inside_the_window():
    one = [_t("follow"), _t("approve"), _t("cutover", "approve.Succeeded"),
           _t("cleanup", "cutover.Succeeded && follow.Succeeded")]
    assert window_problems(_wt(one)) == [] and after_switch_problems(_wt(one)) == []
    assert cleanup_last_problems(_wt(one)) == []
    parallel = _wt([*one, _t("verify-prepare", template="prepare")])
    assert cleanup_last_problems(parallel) == ["cleanup may run while verify-prepare still runs: it removes what"
                                               " verify-prepare uses"]
    # follow ends when the drain inside the window is done: a task waiting only for it starts there.
    late = _wt([*one, _t("metrics", "follow.Succeeded")])
    assert window_problems(late) == ["metrics may start while cutover holds the writes frozen: it waits for"
                                     " follow, not for cutover"]
    assert after_switch_problems(late) == ["metrics (metrics) does not wait for the switch (cutover)"]


def test_deadline_check():
    wt = _wt([_t("a"), _t("b")])
    assert deadline_problems(wt) == []
    pods = templates(wt)
    pods["a"]["timeout"] = "720s"
    del pods["b"]["activeDeadlineSeconds"]
    assert deadline_problems(wt) == [
        "template a has both timeout (720s) and activeDeadlineSeconds (60): the timeout replaces the deadline",
        "template b runs a pod without a deadline"]


def test_reference_check():
    produce = {"name": "p", "container": {"image": "x", "args": ["step", "p"]}, "activeDeadlineSeconds": 60,
               "outputs": {"parameters": [{"name": "v", "valueFrom": {"path": "/tmp/outputs/v"}}]}}
    consume = {"name": "c", "container": {"image": "x", "args": ["step", "c"]}, "activeDeadlineSeconds": 60,
               "inputs": {"parameters": [{"name": "v"}]}}
    ref = "{{tasks.p.outputs.parameters.v}}"
    ok = _wt([_t("p"), _t("c", "p.Succeeded", arguments={"parameters": [{"name": "v", "value": ref}]})],
             extra=[produce, consume])
    assert reference_problems(ok) == []
    # p skipped by its `when`, and c runs on p.Skipped: the node would error.
    skipped = _wt([_t("p", when="'a' == 'b'"),
                   _t("c", "p.Succeeded || p.Skipped", arguments={"parameters": [{"name": "v", "value": ref}]})],
                  extra=[produce, consume])
    assert reference_problems(skipped) == [
        "main/c argument v {{tasks.p.outputs.parameters.v}}: p can be skipped or omitted while c runs, and v has"
        " no default: the node errors"]
    consume["inputs"]["parameters"][0]["default"] = ""  # a consumer default serves a pure reference
    assert reference_problems(skipped) == []
    # In `when` only the producer's default serves.
    when = _wt([_t("p", when="'a' == 'b'"), _t("c", "p.Succeeded || p.Skipped", when=f"'{ref}' == 'x'")],
               extra=[produce, consume])
    assert len(reference_problems(when)) == 1
    produce["outputs"]["parameters"][0]["valueFrom"]["default"] = ""
    assert reference_problems(when) == []
    # Not an ancestor: requeued forever; after a failure: maybe unset.
    other = _wt([_t("p"), _t("q"), _t("c", "q.Succeeded", when=f"'{ref}' == 'x'")], extra=[produce, consume])
    assert reference_problems(other) == [
        f"main/c when {ref}: p is not among the task's dependencies, Argo requeues it forever"]
    del produce["outputs"]["parameters"][0]["valueFrom"]["default"]
    failed = _wt([_t("p"), _t("c", "p.Succeeded || p.Failed", when=f"'{ref}' == 'x'")], extra=[produce, consume])
    assert reference_problems(failed) == [
        f"main/c when {ref}: c also runs after p failed, which may leave v unset: give it a default"]


def test_suspend_check():
    approve = {"name": "approve", "suspend": {"duration": "60"},
               "inputs": {"parameters": [{"name": "lag"}, {"name": "decision", "default": "abort"}]},
               "outputs": {"parameters": [{"name": "decision", "valueFrom": {"supplied": {}, "default": "abort"}}]}}
    wt = _wt([_t("approve")], extra=[approve])
    assert suspend_problems(wt) == [
        "suspend template approve: input lag is not a supplied output, so the UI's resume fails"
        " (node is not expecting output parameter 'lag')"]
    approve["outputs"]["parameters"].append({"name": "lag", "valueFrom": {"supplied": {}, "default": ""}})
    assert suspend_problems(wt) == []
    del approve["suspend"]["duration"]
    assert deadline_problems(wt) == ["suspend template approve has no duration: it can wait forever"]
