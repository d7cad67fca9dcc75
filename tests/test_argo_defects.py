"""The Argo v4.1.2 behaviours that broke real runs (issue 12), each with a test that fails before its fix.

1. `{{workflow.failures}}` arrives quoted (strconv.Quote in workflow/controller/operator.go).
2. The UI's resume dialog sets every input of the suspended node as an output, and the server
   refuses the whole call for one it does not expect (workflow/util/util.go updateSuspendedNode).
3. A decision that was set but whose resume failed is kept through the suspend timeout, and a
   second set is refused: `approve`/`abort` resume or refuse, and the cutover refuses a timed-out
   approval.
4. A Skipped or Omitted task's output resolves to its default, or is an absent optional
   (workflow/controller/scope.go addSkippedNodeOutputsToScope): the local runner does the same.
5. (`timeout` replacing activeDeadlineSeconds: tests/test_workflow_structure.py, on the template.)

The Argo Server is tests/fakes/argo.py, holding the real rendered template's suspend node.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess

import pytest
from typer.testing import CliRunner

from cli import argo_client as ac
from local.runner import TimedOut, go_json, go_quote, load_template, workflow_failures
from steps.report import parse_failures
from tests.conftest import DB_UPGRADE
from tests.fakes.argo import cli_invoker, served, NS, load_environment, write_environment
from tests.test_cli_argo import TOKEN, one_line_error, wf_path
from tests.test_local_run import run_fake

WF = "db-upgrade-prod-x7k2q"
LAG = "lag 12 kB (caught up, threshold 1 MB)"
AWKWARD = "it's 'null' \\ back\\slash \"quoted\" <b>&amp; é ✓ 𝄞\nline two\ttab \x01"


@pytest.fixture(scope="module")
def wt():
    return load_template()


@pytest.fixture
def server():
    """The fake Argo Server."""
    yield from served(TOKEN)


@pytest.fixture
def env_path(tmp_path):
    return write_environment(tmp_path)


@pytest.fixture
def rendered(env_path) -> dict:
    """The real rendered WorkflowTemplate of the test environment."""
    return load_environment(env_path)[1]


@pytest.fixture
def cli(server, env_path, monkeypatch):
    """`db-upgrade ARGS --config ENV` against the fake server; the token never shows."""
    from cli.main import app

    return cli_invoker(app, server, env_path, TOKEN, monkeypatch)


def client_for(fake) -> ac.ArgoClient:
    return ac.ArgoClient(ac.ArgoSettings.from_env(
        {"ARGO_SERVER": fake.address, "ARGO_SECURE": "false", "ARGO_TOKEN": TOKEN}, NS))


# --- 1. quoted failures ---------------------------------------------------------------------------

def test_report_step_reads_what_argo_sends_when_nothing_failed(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_UPGRADE_", "PGCOPYDB_"))}
    env.update(DB_UPGRADE_WORKFLOW_FAILURES='"null"', DB_UPGRADE_WORKFLOW_STATUS="Succeeded",
               DB_UPGRADE_OUTPUTS=str(tmp_path))
    proc = subprocess.run([DB_UPGRADE, "step", "report"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "Succeeded" in proc.stdout + proc.stderr
    assert "not readable" not in proc.stdout + proc.stderr


def test_report_step_lists_a_quoted_array(tmp_path, monkeypatch):
    from cli.main import app as main_app

    failures = [{"displayName": "cutover", "message": AWKWARD, "templateName": "cutover", "phase": "Failed",
                 "podName": "db-upgrade-prod-x7k2q-cutover-1234", "finishedAt": "2026-11-24T22:31:00Z"}]
    env = {"DB_UPGRADE_WORKFLOW_FAILURES": workflow_failures(failures), "DB_UPGRADE_WORKFLOW_STATUS": "Failed",
           "DB_UPGRADE_OUTPUTS": str(tmp_path)}
    result = CliRunner().invoke(main_app, ["step", "report"], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "cutover: it's 'null' \\ back\\slash \"quoted\" <b>&amp; é" in result.output, result.output


def test_parse_failures_decodes_every_form():
    entry = {"displayName": "cutover", "message": AWKWARD, "phase": "Failed"}
    # As Go writes them: strconv.Quote(json.Marshal(...)); json.Marshal escapes <, > and &.
    assert go_json([{"m": "<&>"}]) == '[{"m":"\\u003c\\u0026\\u003e"}]'
    assert go_quote('a"b\\c\n\x01é') == '"a\\"b\\\\c\\n\\x01é"'
    assert parse_failures('"null"') == []
    assert parse_failures('"[{\\"displayName\\":\\"x\\",\\"message\\":\\"a \\\\u003cb\\\\u003e\\"}]"') == [
        {"displayName": "x", "message": "a <b>"}]
    assert parse_failures(workflow_failures([entry])) == [entry]
    assert parse_failures(json.dumps([entry])) == [entry]  # plain JSON
    for nothing in ("", "null", "[]", '""', '"[]"'):
        assert parse_failures(nothing) == []
    # Never raises: an unreadable value is shown, not lost.
    [odd] = parse_failures("{{workflow.failures}}")
    assert "not readable" in odd["message"] and "{{workflow.failures}}" in odd["message"]
    assert parse_failures('"[1, \\"x\\"]"') == [{"displayName": "?", "message": "1"},
                                                  {"displayName": "?", "message": "x"}]


def test_the_local_runner_sends_the_exit_handler_what_argo_sends(wt, tmp_path):
    result, fake = run_fake(wt, tmp_path, params={"approval": "auto"})
    assert result.status == "Succeeded"
    assert fake.env["report"]["DB_UPGRADE_WORKFLOW_FAILURES"] == '"null"'
    result, fake = run_fake(wt, tmp_path / "b", params={"approval": "auto"}, fail={"cutover": "Failed"})
    sent = fake.env["report"]["DB_UPGRADE_WORKFLOW_FAILURES"]
    assert sent.startswith('"[{\\"displayName\\":')  # quoted once more, as strconv.Quote does
    failures = parse_failures(sent)
    assert failures[0]["displayName"] == "cutover"
    assert failures[1]["displayName"].startswith("local-")  # the main DAG node (the workflow's name) fails too
    assert set(failures[0]) == {"displayName", "message", "templateName", "phase", "podName", "finishedAt"}
    assert failures[0]["message"] == "boom" and failures[0]["phase"] == "Failed"


# --- 2. the UI's resume ---------------------------------------------------------------------------

def test_the_ui_resume_works_with_the_real_template(server, rendered):
    node = server.run_to_approval(rendered, name=WF, values={"tasks.verify-ready.outputs.parameters.lag": LAG, "tasks.verify-ready.outputs.parameters.verification": "verification: prepared"})
    assert {p["name"] for p in node["inputs"]["parameters"]} == {"lag", "verification", "decision"}
    wf = client_for(server).ui_resume(WF, choices={"decision": "cutover"})
    done = ac.find_node(wf, "approve")
    assert done["phase"] == "Succeeded"
    assert ac.decision(wf) == "cutover" and ac.node_output(done, "lag") == LAG
    # Exactly the UI's two calls: set with every input as an output, then resume, both by node id.
    assert server.calls("PUT") == [("PUT", wf_path(WF, "set")), ("PUT", wf_path(WF, "resume"))]
    [body] = server.bodies("PUT", wf_path(WF, "set"))
    assert body["nodeFieldSelector"] == f"id={node['id']}"
    assert json.loads(body["outputParameters"]) == {"lag": LAG, "verification": "verification: prepared",
                                                    "decision": "cutover"}


def test_the_ui_resume_fails_for_an_input_that_is_not_a_supplied_output(server, rendered):
    broken = copy.deepcopy(rendered)
    approve = next(t for t in broken["spec"]["templates"] if t["name"] == "approve")
    approve["outputs"]["parameters"] = [p for p in approve["outputs"]["parameters"] if p["name"] != "lag"]
    server.run_to_approval(broken, name=WF, values={"tasks.verify-ready.outputs.parameters.lag": LAG, "tasks.verify-ready.outputs.parameters.verification": "verification: prepared"})
    with pytest.raises(ac.ArgoError, match="node is not expecting output parameter 'lag'"):
        client_for(server).ui_resume(WF, choices={"decision": "cutover"})
    # The whole call was refused: nothing set, the node still waits.
    node = server.live_node(NS, WF, "approve")
    assert node["phase"] == "Running" and ac.set_output(node, "decision") is None


def test_the_cli_approval_is_accepted_by_the_server_model(cli, server, rendered):
    server.run_to_approval(rendered, name=WF, values={"tasks.verify-ready.outputs.parameters.lag": LAG, "tasks.verify-ready.outputs.parameters.verification": "verification: prepared"})
    result = cli("approve", WF)
    assert result.exit_code == 0, result.output
    node = server.live_node(NS, WF, "approve")
    assert node["phase"] == "Succeeded" and ac.set_output(node, "decision") == "cutover"
    # A resume by node selector leaves the other supplied outputs unset (util.go updateSuspendedNode):
    # nothing in the rendered may depend on them.
    assert ac.set_output(node, "lag") is None


# --- 3. a decision set, its resume lost -----------------------------------------------------------

def set_only(server, decision: str) -> None:
    """What a failed `approve` leaves: the set went through, the resume did not."""
    client = client_for(server)
    client._call("set", client.service.set_workflow, WF, ac.m.WorkflowSetRequest(
        node_field_selector="displayName=approve", output_parameters=json.dumps({"decision": decision})))


def test_a_second_set_is_refused_and_the_set_value_survives_the_timeout(server, rendered):
    server.run_to_approval(rendered, name=WF, values={"tasks.verify-ready.outputs.parameters.lag": LAG, "tasks.verify-ready.outputs.parameters.verification": "verification: prepared"})
    set_only(server, "cutover")
    with pytest.raises(ac.ArgoError, match="already set"):
        set_only(server, "abort")
    node = server.time_out(NS, WF)
    assert node["phase"] == "Succeeded"
    assert ac.set_output(node, "decision") == "cutover"  # not the default abort: the trap
    assert ac.set_output(node, "lag") == ""  # an unset output takes its default
    # Without a set, the timeout gives the default.
    server.run_to_approval(rendered, name="other", values={})
    assert ac.set_output(server.time_out(NS, "other"), "decision") == "abort"


def test_approve_again_only_resumes_the_decision_already_set(cli, server, rendered):
    server.run_to_approval(rendered, name=WF, values={"tasks.verify-ready.outputs.parameters.lag": LAG, "tasks.verify-ready.outputs.parameters.verification": "verification: prepared"})
    set_only(server, "cutover")
    server.requests.clear()
    result = cli("approve", WF)
    assert result.exit_code == 0, result.output
    assert "already set but its resume had not gone through: resumed it now" in result.stdout
    assert server.calls() == [("GET", wf_path(WF)), ("PUT", wf_path(WF, "resume"))]
    assert server.live_node(NS, WF, "approve")["phase"] == "Succeeded"


@pytest.mark.parametrize("held, command, advice", [
    ("cutover", "abort", "not to cut over, run argo stop"),
    ("abort", "approve", "then submit a new run to cut over"),
])
def test_the_other_decision_is_refused_in_one_line(cli, server, rendered, held, command, advice):
    server.run_to_approval(rendered, name=WF, values={"tasks.verify-ready.outputs.parameters.lag": LAG, "tasks.verify-ready.outputs.parameters.verification": "verification: prepared"})
    set_only(server, held)
    server.requests.clear()
    line = one_line_error(cli(command, WF))
    assert f"already holds the decision {held}" in line and advice in line
    assert server.calls("PUT") == []  # nothing sent: the node waits as it was
    assert server.live_node(NS, WF, "approve")["phase"] == "Running"


def _approval_settings(env: dict):
    from steps.settings import StepSettings

    return StepSettings(approval_started_at=env["DB_UPGRADE_APPROVAL_STARTED_AT"],
                        approval_finished_at=env["DB_UPGRADE_APPROVAL_FINISHED_AT"],
                        approval_timeout=env["DB_UPGRADE_APPROVAL_TIMEOUT"])


def test_the_cutover_refuses_a_decision_that_timed_out(wt, tmp_path):
    from steps.cutover import check_approval
    from steps.errors import StepError

    # Set but never resumed: the approve node ends at its duration, keeping `cutover`.
    result, fake = run_fake(wt, tmp_path, decision=TimedOut("cutover"))
    approve = result.nodes["approve"]
    duration = float(next(t for t in wt["spec"]["templates"] if t["name"] == "approve")["suspend"]["duration"])
    assert approve.outputs["decision"] == "cutover" and approve.finished - approve.started == duration
    assert result.nodes["cutover"].phase == "Succeeded"  # Argo starts it: the step itself must refuse
    with pytest.raises(StepError, match="timed out"):
        check_approval(_approval_settings(fake.env["cutover"]))
    # Resumed in time: the same check lets it through.
    result, fake = run_fake(wt, tmp_path / "b", decision="cutover")
    check_approval(_approval_settings(fake.env["cutover"]))
    # Nothing set at all: the default abort, no cutover.
    result, _ = run_fake(wt, tmp_path / "c", decision=TimedOut())
    assert result.nodes["approve"].outputs["decision"] == "abort" and result.nodes["cutover"].phase == "Skipped"


# --- 4. outputs of tasks that did not run ---------------------------------------------------------

def _pod(name: str, outputs: list[dict] | None = None, inputs: list[dict] | None = None) -> dict:
    t = {"name": name, "container": {"image": "x", "args": ["step", name],
                                     "env": [{"name": "V", "value": "{{inputs.parameters.v}}"}] if inputs else []}}
    if outputs:
        t["outputs"] = {"parameters": outputs}
    if inputs:
        t["inputs"] = {"parameters": inputs}
    return t


def _mini(tasks: list[dict], produced: dict, consumer_input: dict | None = None) -> dict:
    return {"metadata": {"name": "mini"}, "spec": {
        "entrypoint": "main",
        "arguments": {"parameters": [{"name": "run-p", "value": "no"}]},
        "templates": [{"name": "main", "dag": {"tasks": tasks}},
                      _pod("p", [{"name": "v", "valueFrom": {"path": "/tmp/outputs/v", **produced}}]),
                      _pod("q"), _pod("c", inputs=[consumer_input] if consumer_input else None)]}}


def _run_mini(wt, tmp_path):
    return run_fake(wt, tmp_path, params={})


P_SKIPPED = {"name": "p", "template": "p", "when": "'{{workflow.parameters.run-p}}' == 'yes'"}


def test_a_skipped_tasks_output_is_its_default(tmp_path):
    wt = _mini([P_SKIPPED, {"name": "c", "template": "c", "depends": "p.Skipped",
                            "when": "'{{tasks.p.outputs.parameters.v}}' == 'fallback'"}], {"default": "fallback"})
    result, fake = _run_mini(wt, tmp_path)
    assert result.nodes["p"].phase == "Skipped" and result.nodes["c"].phase == "Succeeded"


def test_a_skipped_tasks_output_without_default_errors_the_consumer(tmp_path):
    wt = _mini([P_SKIPPED, {"name": "c", "template": "c", "depends": "p.Skipped",
                            "when": "'{{tasks.p.outputs.parameters.v}}' == 'x'"}], {})
    result, fake = _run_mini(wt, tmp_path)
    assert result.nodes["c"].phase == "Errored" and "absent optional" in result.nodes["c"].message
    assert "c" not in fake.order and result.status == "Error"


def test_a_pure_reference_to_an_absent_output_takes_the_inputs_default(tmp_path):
    args = {"parameters": [{"name": "v", "value": "{{tasks.p.outputs.parameters.v}}"}]}
    wt = _mini([P_SKIPPED, {"name": "c", "template": "c", "depends": "p.Skipped", "arguments": args}], {},
               consumer_input={"name": "v", "default": "from-input"})
    result, fake = _run_mini(wt, tmp_path)
    assert result.nodes["c"].phase == "Succeeded" and fake.env["c"]["V"] == "from-input"
    # No input default either: the node errors (common.ProcessArgs).
    wt = _mini([P_SKIPPED, {"name": "c", "template": "c", "depends": "p.Skipped", "arguments": args}], {},
               consumer_input={"name": "v"})
    result, fake = _run_mini(wt, tmp_path / "b")
    assert result.nodes["c"].phase == "Errored" and "c" not in fake.order


def test_a_value_argo_would_wait_for_forever_errors_locally(tmp_path):
    # c reads p's output but does not depend on p: not in its scope, Argo requeues c forever.
    wt = _mini([{"name": "p", "template": "p"}, {"name": "q", "template": "q"},
                {"name": "c", "template": "c", "depends": "q.Succeeded",
                 "when": "'{{tasks.p.outputs.parameters.v}}' == 'x'"}], {})
    result, _ = _run_mini(wt, tmp_path)
    assert result.nodes["c"].phase == "Errored" and "requeued forever" in result.nodes["c"].message


def test_the_real_template_resolves_a_skipped_approval(wt, tmp_path):
    """approval=auto skips approve: its decision is the default, its times resolve (not left literal)."""
    result, fake = run_fake(wt, tmp_path, params={"approval": "auto"})
    assert result.nodes["approve"].phase == "Skipped" and result.nodes["cutover"].phase == "Succeeded"
    env = fake.env["cutover"]
    stamp = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$"
    assert re.match(stamp, env["DB_UPGRADE_APPROVAL_STARTED_AT"]), env["DB_UPGRADE_APPROVAL_STARTED_AT"]
    assert env["DB_UPGRADE_APPROVAL_STARTED_AT"] == env["DB_UPGRADE_APPROVAL_FINISHED_AT"]
