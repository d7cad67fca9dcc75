"""`db-upgrade submit / approve / abort / status / lint --server` against a fake Argo Server.

The fake (tests/fake_argo.py) speaks Argo's REST wire format on 127.0.0.1; these tests assert the
exact paths and bodies sent, that every Workflow/WorkflowTemplate/CronWorkflow body validates
against the Argo schema, that errors are one line with a non-zero exit, and that the token never
appears in any output.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from tests.fakes.argo import served, NS, assert_valid, load_environment, node, status, write_environment
from cli import argo_client as ac
from cli import argo as cli_argo

TOKEN = "tok-MARKER-5f1e9c"  # must never show up in any output
WF = "db-upgrade-prod-x7k2q"


@pytest.fixture
def env_file(tmp_path) -> Path:
    return write_environment(tmp_path)


@pytest.fixture
def template(env_file) -> dict:
    return load_environment(env_file)[1]


@pytest.fixture
def fake():
    yield from served(TOKEN)


@pytest.fixture
def app() -> typer.Typer:
    from cli import status as cli_status

    a = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    cli_argo.register(a)
    cli_status.register(a)  # `status` lives in cli/status.py; the error tests below go through it
    return a


@pytest.fixture
def run(app, fake, env_file, monkeypatch):
    """Invoke `db-upgrade ARGS --config ENV` with the argo env pointing at the fake; check no token leaks."""
    for var in ("ARGO_SERVER", "ARGO_TOKEN", "ARGO_NAMESPACE", "ARGO_SECURE", "ARGO_BASE_HREF", "ARGO_INSECURE_SKIP_VERIFY"):
        monkeypatch.delenv(var, raising=False)
    base = {"ARGO_SERVER": fake.address, "ARGO_SECURE": "false", "ARGO_TOKEN": TOKEN}
    outputs = []

    def invoke(*args: str, env: dict | None = None):
        result = CliRunner().invoke(app, [*args, "--config", str(env_file)], env={**base, **(env or {})}, catch_exceptions=False)
        outputs.append(result.output)
        assert TOKEN not in result.output
        return result

    yield invoke
    assert all(TOKEN not in o for o in outputs)


def one_line_error(result) -> str:
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert TOKEN not in result.output
    return lines[0]


def wf_path(*rest: str) -> str:
    return "/".join([f"/api/v1/workflows/{NS}", *rest])


TPL = f"/api/v1/workflow-templates/{NS}"


# -- submit ----------------------------------------------------------------------------------


def test_submit_creates_template_and_workflow(run, fake, template):
    name = template["metadata"]["name"]
    result = run("submit", "-p", "approval=manual", "-p", "keep-slot-on-failure=true")
    assert result.exit_code == 0, result.output
    wf_name = f"{name}-{fake.next_suffix}"
    assert fake.calls() == [("GET", f"{TPL}/{name}"), ("POST", TPL), ("POST", f"/api/v1/workflows/{NS}")]
    assert all(r.headers["Authorization"] == f"Bearer {TOKEN}" for r in fake.requests)
    sent_template = fake.bodies("POST", TPL)[0]["template"]
    assert sent_template == template  # nothing lost on the way through Hera's models
    assert_valid(sent_template)
    workflow = fake.bodies("POST", f"/api/v1/workflows/{NS}")[0]["workflow"]
    assert_valid(workflow)
    assert workflow["metadata"] == {"generateName": f"{name}-", "namespace": NS, "labels": {"db-upgrade/run": "upgrade"}}
    assert workflow["spec"] == {
        "workflowTemplateRef": {"name": name},
        "arguments": {"parameters": [{"name": "approval", "value": "manual"}, {"name": "keep-slot-on-failure", "value": "true"}]},
    }
    assert result.stdout.splitlines() == [
        f"workflowtemplate {name} created",
        f"submitted {wf_name}",
        f"link http://{fake.address}/workflows/{NS}/{wf_name}",
    ]


def test_submit_updates_an_existing_template_with_its_resource_version(run, fake, template):
    name = template["metadata"]["name"]
    fake.templates[(NS, name)] = {**template, "metadata": {**template["metadata"], "resourceVersion": "41"}}
    result = run("submit")
    assert result.exit_code == 0, result.output
    assert fake.calls() == [("GET", f"{TPL}/{name}"), ("PUT", f"{TPL}/{name}"), ("POST", f"/api/v1/workflows/{NS}")]
    sent = fake.bodies("PUT", f"{TPL}/{name}")[0]["template"]
    assert sent["metadata"]["resourceVersion"] == "41"
    assert_valid({k: v for k, v in sent.items()})
    assert "arguments" not in fake.bodies("POST", f"/api/v1/workflows/{NS}")[0]["workflow"]["spec"]
    assert f"workflowtemplate {name} updated" in result.stdout


@pytest.mark.parametrize(
    "pair, expected",
    [
        ("mod=rehearsal", "unknown parameter 'mod': the template accepts {accepted}"),
        ("mode=rehersal", "parameter mode='rehersal' is not allowed: choose one of upgrade, rehearsal"),
        ("mode", "parameter 'mode' is not name=value: write -p name=value"),
    ],
)
def test_submit_checks_parameters_before_sending_anything(run, fake, template, pair, expected):
    result = run("submit", "-p", pair)
    accepted = ", ".join(sorted(ac.template_parameters(template)))
    assert "approval, " in accepted and "mode" in accepted
    assert one_line_error(result) == f"error: {expected.format(accepted=accepted)}"
    assert fake.requests == []


def test_submit_wait_follows_the_run_through_approval(run, fake, env_file):
    wf = WF
    t0, t1 = "2026-11-24T22:00:00Z", "2026-11-24T22:10:00Z"
    t_follow = "2026-11-24T22:00:31Z"
    pre = node("preflight", "Succeeded", started=t0, finished="2026-11-24T22:00:30Z")
    lag = node("wait-caught-up", "Succeeded", started=t_follow, finished=t1, outputs={"lag": "lag 12 kB (caught up, threshold 1 MB)"})
    fake.scripts[(NS, wf)] = [
        status("Pending", message=f"Waiting for {NS}/Mutex/db-upgrade-orders lock. Lock status: 0/1", started=None),
        status("Running", node("preflight", "Running", started=t0)),
        status("Running", pre, node("follow", "Running", started=t_follow), lag, node("approve", "Running", type="Suspend", started=t1)),
        status("Running", pre, node("follow", "Running", started=t_follow), lag, node("approve", "Running", type="Suspend", started=t1)),
        status(
            "Succeeded",
            pre,
            node("follow", "Succeeded", started=t_follow, finished="2026-11-24T22:20:00Z"),
            lag,
            node("approve", "Succeeded", type="Suspend", started=t1, finished="2026-11-24T22:15:00Z", outputs={"decision": "cutover"}),
            finished="2026-11-24T22:21:00Z",
        ),
    ]
    result = run("submit", "--wait", "--poll", "0")
    assert result.exit_code == 0, result.output
    lines = [line.split("] ", 1)[-1] for line in result.stdout.splitlines()[3:]]
    assert lines == [
        f"workflow Pending: Waiting for {NS}/Mutex/db-upgrade-orders lock. Lock status: 0/1",
        "workflow Running",
        "preflight Running",
        "preflight Succeeded (30s)",
        "follow Running",
        "wait-caught-up Succeeded (9m29s)",
        "approve Running",
        "waiting for approval (lag 12 kB (caught up, threshold 1 MB))",
        f"  cut over: db-upgrade approve {wf} --config {env_file}",
        f"  abort:    db-upgrade abort {wf} --config {env_file}",
        "follow Succeeded (19m29s)",
        "approve Succeeded (5m00s)",
        f"workflow {wf} Succeeded in 21m00s",
    ]
    # Polled until the end, although the workflow sat Pending first (Hera's wait=True would not).
    assert fake.calls("GET").count(("GET", wf_path(wf))) == 5


def test_submit_wait_failed_run_exits_non_zero(run, fake):
    fake.scripts[(NS, WF)] = [
        status("Running", node("preflight", "Running")),
        status("Failed", node("preflight", "Failed", finished="2026-11-24T22:00:05Z", message="Error (exit code 1)"), message="child 'preflight' failed", finished="2026-11-24T22:00:06Z"),
    ]
    result = run("submit", "--wait", "--poll", "0")
    assert result.exit_code == 1
    assert "preflight Failed (5s): Error (exit code 1)" in result.stdout
    assert result.stderr.strip() == f"error: workflow {WF} Failed in 6s: child 'preflight' failed"


def test_submit_wait_aborted_at_approval_exits_non_zero(run, fake):
    fake.scripts[(NS, WF)] = [
        status("Succeeded", node("approve", "Succeeded", type="Suspend", finished="2026-11-24T22:01:00Z", outputs={"decision": "abort"}), finished="2026-11-24T22:02:00Z"),
    ]
    result = run("submit", "--wait", "--poll", "0")
    assert result.exit_code == cli_argo.EXIT_ABORTED
    assert "without cutover: the approval decision was abort" in result.stderr


# -- approve / abort -------------------------------------------------------------------------


def waiting_at_approval() -> dict:
    return status("Running", node("follow", "Running"), node("approve", "Running", type="Suspend"))


@pytest.mark.parametrize("command, decision", [("approve", "cutover"), ("abort", "abort")])
def test_approve_and_abort_make_the_ui_calls(run, fake, command, decision):
    fake.script(NS, WF, [waiting_at_approval()])
    result = run(command, WF)
    assert result.exit_code == 0, result.output
    assert fake.calls() == [("GET", wf_path(WF)), ("PUT", wf_path(WF, "set")), ("PUT", wf_path(WF, "resume"))]
    assert fake.bodies("PUT", wf_path(WF, "set")) == [
        {"nodeFieldSelector": "displayName=approve", "outputParameters": json.dumps({"decision": decision})}
    ]
    assert json.loads(fake.bodies("PUT", wf_path(WF, "set"))[0]["outputParameters"]) == {"decision": decision}
    assert fake.bodies("PUT", wf_path(WF, "resume")) == [{"nodeFieldSelector": "displayName=approve"}]


@pytest.mark.parametrize(
    "wf_status, why",
    [
        (status("Running", node("follow", "Running"), node("wait-caught-up", "Running")), "the approve step has not started yet"),
        (status("Running", node("approve", "Succeeded", type="Suspend")), "the approve step is Succeeded"),
        (status("Failed", node("approve", "Running", type="Suspend")), "workflow is Failed"),
    ],
)
def test_approve_refuses_when_not_waiting(run, fake, wf_status, why):
    fake.script(NS, WF, [wf_status])
    result = run("approve", WF)
    assert one_line_error(result) == f"error: workflow {WF} is not waiting for approval ({why}): nothing to approve"
    assert fake.calls("PUT") == []


def test_wait_survives_a_few_failed_polls(fake):
    fake.script(NS, WF, [status("Succeeded", finished="2026-11-24T22:01:00Z")])
    client = ac.ArgoClient(ac.ArgoSettings.from_env({"ARGO_SERVER": fake.address, "ARGO_SECURE": "false", "ARGO_TOKEN": TOKEN}, NS))
    real_get, failures = client.get_workflow, iter([True, True])

    def flaky(name):
        if next(failures, False):
            raise ac.ArgoError("cannot connect")
        return real_get(name)

    client.get_workflow = flaky
    assert [ac.workflow_phase(w) for w in client.watch(WF, 0, sleep=lambda s: None)] == ["Succeeded"]
    client.get_workflow = lambda name: (_ for _ in ()).throw(ac.ArgoError("cannot connect"))
    with pytest.raises(ac.ArgoError):
        list(client.watch(WF, 0, sleep=lambda s: None))


# -- status ----------------------------------------------------------------------------------


# moved to tests/test_status.py


# -- errors: one line, non-zero, no token --------------------------------------------------------


def test_wrong_token_is_a_one_line_401(run, fake):
    fake.script(NS, WF, [waiting_at_approval()])
    result = run("status", WF, env={"ARGO_TOKEN": "not-the-token"})
    line = one_line_error(result)
    assert "rejected the credentials (401)" in line and "ARGO_TOKEN" in line


def test_unknown_workflow_is_a_one_line_404(run, fake):
    result = run("approve", "nope")
    assert one_line_error(result) == f"error: workflow nope not found in namespace {NS}: check the name (submit prints it)"


def test_connection_refused_is_one_line(run):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run("submit", env={"ARGO_SERVER": f"127.0.0.1:{port}"})
    assert one_line_error(result) == f"error: cannot connect to Argo server http://127.0.0.1:{port}: check ARGO_SERVER (and ARGO_SECURE=false for plain http)"


def test_missing_argo_server_and_missing_config(run, app, tmp_path):
    result = run("status", WF, env={"ARGO_SERVER": ""})
    assert one_line_error(result).startswith("error: ARGO_SERVER is not set")
    missing = CliRunner().invoke(app, ["status", WF, "--config", str(tmp_path / "nope.yaml")])
    assert one_line_error(missing) == f"error: environment file {tmp_path / 'nope.yaml'} not found: pass --config environments/NAME.yaml"


# -- lint --server -------------------------------------------------------------------------------


def server_env(fake, **extra) -> dict:
    return {"ARGO_SERVER": fake.address, "ARGO_SECURE": "false", "ARGO_TOKEN": TOKEN, **extra}


def test_server_lint_posts_templates_to_the_lint_endpoints(fake, env_file):
    from workflows.render import render_documents

    config, template = load_environment(env_file)
    name = template["metadata"]["name"]
    documents = render_documents(config)
    assert ac.server_problems(config, documents, server_env(fake)) == []
    # Template first: the server resolves the CronWorkflow's workflowTemplateRef in the cluster.
    assert fake.calls() == [("POST", f"{TPL}/lint"), ("POST", f"/api/v1/cron-workflows/{NS}/lint")]
    sent = fake.bodies("POST", f"{TPL}/lint")[0]["template"]
    assert_valid(sent)
    assert sent == template
    cron = fake.bodies("POST", f"/api/v1/cron-workflows/{NS}/lint")[0]["cronWorkflow"]
    assert_valid(cron)
    assert cron["spec"]["workflowSpec"]["workflowTemplateRef"] == {"name": name}


def test_server_lint_reports_the_verdict_and_transport_errors_as_problem_lines(fake, env_file):
    from workflows.render import render_documents

    config, template = load_environment(env_file)
    name = template["metadata"]["name"]
    documents = render_documents(config)
    fake.lint_errors[name] = "templates.upgrade.tasks.follow failed to resolve {{inputs.parameters.nope}}"
    assert ac.server_problems(config, documents, server_env(fake)) == [
        f"WorkflowTemplate/{name}: argo server lint: templates.upgrade.tasks.follow failed to resolve {{{{inputs.parameters.nope}}}}"
    ]
    [line] = ac.server_problems(config, documents, server_env(fake, ARGO_TOKEN="wrong"))
    assert line.startswith("argo server lint: Argo server http://") and "(401)" in line and TOKEN not in line


def test_lint_server_through_the_cli(fake, env_file, template):
    """`db-upgrade lint --server` (cli_manifests' lint, calling argo_client.server_problems)."""
    from cli.main import app

    name = template["metadata"]["name"]
    result = CliRunner().invoke(app, ["lint", "--server", "--config", str(env_file)], env=server_env(fake))
    assert result.exit_code == 0, result.output
    assert fake.calls() == [("POST", f"{TPL}/lint"), ("POST", f"/api/v1/cron-workflows/{NS}/lint")]
    fake.lint_errors[name] = "spec.entrypoint: template not found"
    result = CliRunner().invoke(app, ["lint", "--server", "--config", str(env_file)], env=server_env(fake))
    assert result.exit_code == 1
    assert f"WorkflowTemplate/{name}: argo server lint: spec.entrypoint: template not found" in result.output
    assert TOKEN not in result.output


def test_commands_are_registered_on_the_real_entry_point():
    from cli.main import app

    names = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert {"submit", "approve", "abort", "status", "lint"} <= names
    assert sum(1 for c in app.registered_commands if (c.name or c.callback.__name__) == "lint") == 1


# -- argo CLI environment conventions ------------------------------------------------------------


def test_settings_follow_the_argo_cli_environment():
    s = ac.ArgoSettings.from_env({"ARGO_SERVER": "argo.example.com:443"}, default_namespace="db")
    assert (s.url, s.namespace, s.token, s.verify) == ("https://argo.example.com:443/", "db", None, True)
    env = {"ARGO_SERVER": "argo:2746", "ARGO_SECURE": "false", "ARGO_NAMESPACE": "db", "ARGO_BASE_HREF": "/argo/",
           "ARGO_INSECURE_SKIP_VERIFY": "true", "ARGO_HTTP1": "true", "ARGO_TOKEN": "abc"}
    s = ac.ArgoSettings.from_env(env, default_namespace="db")
    assert (s.url, s.namespace, s.token, s.verify) == ("http://argo:2746/argo/", "db", "abc", False)
    assert s.workflow_link("wf") == "http://argo:2746/argo/workflows/db/wf"
    with pytest.raises(ac.ArgoError, match="ARGO_SERVER is not set"):
        ac.ArgoSettings.from_env({}, default_namespace="db")
    # A CI-wide ARGO_NAMESPACE must not send the template away from its Secrets.
    with pytest.raises(ac.ArgoError, match="ARGO_NAMESPACE=argo differs from the environment's namespace db"):
        ac.ArgoSettings.from_env({**env, "ARGO_NAMESPACE": "argo"}, default_namespace="db")


def test_token_prefix_and_base_href_on_the_wire(fake, template):
    fake.token = None
    s = ac.ArgoSettings.from_env({"ARGO_SERVER": fake.address, "ARGO_SECURE": "false", "ARGO_TOKEN": f"Bearer {TOKEN}"}, "db")
    ac.ArgoClient(s).get_template("x")
    assert fake.requests[-1].headers["Authorization"] == f"Bearer {TOKEN}"  # not "Bearer Bearer ..."
    s = ac.ArgoSettings.from_env({"ARGO_SERVER": fake.address, "ARGO_SECURE": "false", "ARGO_BASE_HREF": "/argo"}, "db")
    with pytest.raises(ac.ArgoError):
        ac.ArgoClient(s).get_workflow("x")
    assert fake.requests[-1].path == "/argo/api/v1/workflows/db/x"
    assert "Authorization" not in fake.requests[-1].headers


def test_something_that_is_not_argo_is_one_line(run, fake, monkeypatch):
    # e.g. an ingress answering with an HTML login page
    for payload in (b"<html>login</html>", ["not", "a", "workflow"], {"status": {"nodes": 3}}):
        monkeypatch.setattr(fake, "route", lambda method, path, body: (200, payload))
        line = one_line_error(run("status", WF))
        assert "did not answer like an Argo Server" in line and "ARGO_BASE_HREF" in line


def test_recover_runs_the_recover_entrypoint_against_the_terminated_run(run, fake, template):
    """`argo terminate` skips the exit handler: `recover` does its work for that run's record."""
    name = template["metadata"]["name"]
    fake.templates[(NS, name)] = {**template, "metadata": {**template["metadata"], "namespace": NS,
                                                           "resourceVersion": "1"}}
    fake.script(NS, "db-upgrade-prod-dead1", [status("Failed", message="Stopped with strategy 'Terminate'")],
                template=name)
    result = run("recover", "db-upgrade-prod-dead1")
    assert result.exit_code == 0, result.output
    workflow = fake.bodies("POST", f"/api/v1/workflows/{NS}")[0]["workflow"]
    assert_valid(workflow)
    assert workflow["spec"]["entrypoint"] == "recover"
    assert workflow["spec"]["arguments"] == {"parameters": [{"name": "run-id", "value": "db-upgrade-prod-dead1"}]}
    assert "recover db-upgrade-prod-dead1" in result.stdout


def test_recover_refuses_a_run_that_is_still_going(run, fake, template):
    fake.script(NS, "db-upgrade-prod-live1", [status("Running")], template=template["metadata"]["name"])
    result = run("recover", "db-upgrade-prod-live1")
    assert result.exit_code == 1 and "is Running: recover only a run that has ended" in result.output
    assert not fake.bodies("POST", f"/api/v1/workflows/{NS}")
