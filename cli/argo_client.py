"""Calls to the Argo Server (REST, HTTP/1.1) behind `db-upgrade submit/approve/abort/status/lint --server`.

Connection settings follow the `argo` CLI's environment conventions so that one set of CI
secrets serves both tools: ARGO_SERVER (host:port), ARGO_SECURE, ARGO_TOKEN, ARGO_NAMESPACE,
ARGO_INSECURE_SKIP_VERIFY, ARGO_HTTP1 and ARGO_BASE_HREF.

Every call goes through Hera's `WorkflowsService` (one HTTP path); its exceptions, and those of
`requests` below it, become `ArgoError` with a one-line message naming what to do.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Mapping

import pydantic
import requests
from hera import exceptions as hera_exc
from hera.workflows import Workflow as HeraWorkflow
from hera.workflows import models as m
from hera.workflows.service import WorkflowsService


APPROVE_NODE = "approve"
LAG_NODE = "wait-caught-up"
DECISIONS = ("cutover", "abort")
FINISHED = ("Succeeded", "Failed", "Error")
# Node types that only group other nodes: not steps an operator cares about.
_GROUP_NODE_TYPES = {"DAG", "Steps", "StepGroup", "TaskGroup"}
REQUEST_TIMEOUT = 30.0


class ArgoError(Exception):
    """A failure to report as one line, `error: <message>`, with a non-zero exit."""


class DecisionAlreadySet(ArgoError):
    """The approve node already holds another decision: Argo refuses a second `set` of an output
    (workflow/util/util.go updateSuspendedNode), so it cannot be changed any more."""

    def __init__(self, workflow: str, current: str, wanted: str):
        self.workflow, self.current, self.wanted = workflow, current, wanted
        super().__init__(f"workflow {workflow}: the approve step already holds the decision {current},"
                         f" which Argo does not let anyone change to {wanted}")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class ArgoSettings:
    """Where and how to reach the Argo Server."""

    url: str  # scheme://host:port/base-href/ (always ends with "/": Hera urljoins API paths onto it)
    namespace: str
    token: str | None = None
    verify: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, default_namespace: str | None = None) -> "ArgoSettings":
        env = os.environ if env is None else env
        server = (env.get("ARGO_SERVER") or "").strip()
        if not server:
            raise ArgoError(
                "ARGO_SERVER is not set: export ARGO_SERVER=host:port"
                " (the argo-server address, e.g. argo.example.com:443)"
            )
        if "://" not in server:
            # Like the argo CLI: https unless ARGO_SECURE=false.
            scheme = "http" if (env.get("ARGO_SECURE") or "").strip().lower() == "false" else "https"
            server = f"{scheme}://{server}"
        base_href = (env.get("ARGO_BASE_HREF") or "").strip().strip("/")
        url = server.rstrip("/") + "/" + (base_href + "/" if base_href else "")
        env_namespace = (env.get("ARGO_NAMESPACE") or "").strip()
        if env_namespace and default_namespace and env_namespace != default_namespace:
            # The template's Secrets and service account live in the environment's namespace:
            # a CI-wide ARGO_NAMESPACE must not silently send it elsewhere.
            raise ArgoError(
                f"ARGO_NAMESPACE={env_namespace} differs from the environment's namespace {default_namespace}:"
                " unset ARGO_NAMESPACE or fix the environment file"
            )
        namespace = env_namespace or default_namespace
        if not namespace:
            raise ArgoError("no namespace: set ARGO_NAMESPACE or the namespace in the environment file")
        # ARGO_HTTP1 needs nothing here: this client always speaks the REST (HTTP/1.1) API.
        return cls(
            url=url,
            namespace=namespace,
            token=(env.get("ARGO_TOKEN") or "").strip() or None,
            verify=not _truthy(env.get("ARGO_INSECURE_SKIP_VERIFY")),
        )

    def workflow_link(self, name: str) -> str:
        return f"{self.url}workflows/{self.namespace}/{name}"


class _TimeoutSession(requests.Session):
    """requests has no session-wide timeout; without one a dead server hangs CI forever."""

    def request(self, method, url, **kwargs):  # type: ignore[override]
        kwargs.setdefault("timeout", REQUEST_TIMEOUT)
        return super().request(method, url, **kwargs)


from workflows.render import as_dict as _as_dict  # noqa: E402


class ArgoClient:
    def __init__(self, settings: ArgoSettings):
        self.settings = settings
        if not settings.verify:
            import urllib3

            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        self.service = WorkflowsService(
            host=settings.url,
            token=settings.token,
            namespace=settings.namespace,
            verify_ssl=settings.verify,
            session=_TimeoutSession(),
        )

    # -- error translation -------------------------------------------------------------

    def _call(self, what: str, fn: Callable, *args, not_found: str | None = None, none_on_404: bool = False, **kwargs):
        """Run one service call; turn every failure into a one-line ArgoError."""
        server = self.settings.url.rstrip("/")
        try:
            with warnings.catch_warnings():
                # Hera's generated service serialises with pydantic's deprecated `.json()`: not our noise.
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                return fn(*args, **kwargs)
        except hera_exc.NotFound as exc:
            if none_on_404:
                return None
            msg = not_found or f"not found (404) while trying to {what}: {_server_message(exc)}"
        except hera_exc.Unauthorized:
            msg = (f"Argo server {server} rejected the credentials (401) while trying to {what}:"
                   " set ARGO_TOKEN to a valid token")
        except hera_exc.Forbidden as exc:
            msg = (f"Argo server {server} forbids {what} (403) in namespace {self.settings.namespace}:"
                   f" grant the token's service account access ({_server_message(exc)})")
        except hera_exc.HeraException as exc:
            msg = f"Argo server refused to {what}: {_server_message(exc)}"
        except (requests.exceptions.JSONDecodeError, KeyError, TypeError, pydantic.ValidationError) as exc:
            # A proxy or login page, or an API Hera cannot read: not the Argo Server we expect.
            msg = (f"{server} did not answer like an Argo Server while trying to {what} ({type(exc).__name__}):"
                   " check ARGO_SERVER and ARGO_BASE_HREF")
        except requests.exceptions.SSLError:
            msg = (f"TLS verification of {server} failed:"
                   " fix the certificate trust or set ARGO_INSECURE_SKIP_VERIFY=true")
        except requests.exceptions.ConnectionError:
            msg = f"cannot connect to Argo server {server}: check ARGO_SERVER (and ARGO_SECURE=false for plain http)"
        except requests.exceptions.Timeout:
            msg = f"Argo server {server} did not answer within {REQUEST_TIMEOUT:.0f}s while trying to {what}"
        except requests.exceptions.RequestException as exc:
            msg = f"request to Argo server {server} failed while trying to {what}: {type(exc).__name__}"
        raise ArgoError(self._scrub(msg))

    def _scrub(self, msg: str) -> str:
        # Belt and braces: a token must never reach a CI log, even echoed back by a server.
        token = self.settings.token
        for secret in {token, token.split()[-1]} if token else ():
            msg = msg.replace(secret, "***")
        return " ".join(msg.split())

    # -- WorkflowTemplates -------------------------------------------------------------

    def get_template(self, name: str) -> dict | None:
        model = self._call(f"read WorkflowTemplate {name}", self.service.get_workflow_template, name, none_on_404=True)
        return None if model is None else _as_dict(model)

    def apply_template(self, template: Any) -> str:
        """Create the WorkflowTemplate, or update it in place; returns "created" or "updated"."""
        doc = dict(_as_dict(template))
        doc["metadata"] = {**doc.get("metadata", {}), "namespace": self.settings.namespace}
        name = doc["metadata"]["name"]
        current = self.get_template(name)
        if current is None:
            req = m.WorkflowTemplateCreateRequest(template=m.WorkflowTemplate(**doc))
            self._call(f"create WorkflowTemplate {name}", self.service.create_workflow_template, req)
            return "created"
        # An update must carry the stored resourceVersion (optimistic concurrency).
        doc["metadata"]["resourceVersion"] = current.get("metadata", {}).get("resourceVersion")
        req = m.WorkflowTemplateUpdateRequest(template=m.WorkflowTemplate(**doc))
        self._call(f"update WorkflowTemplate {name}", self.service.update_workflow_template, name, req)
        return "updated"

    # -- Workflows ---------------------------------------------------------------------

    def submit(self, template_name: str, parameters: Mapping[str, str], labels: Mapping[str, str] | None = None,
               entrypoint: str | None = None) -> dict:
        """Create a Workflow that runs the template by reference (so the template stays the one source)."""
        wf = HeraWorkflow(
            generate_name=f"{template_name}-" if entrypoint is None else f"{template_name}-{entrypoint}-",
            namespace=self.settings.namespace,
            labels=dict(labels or {}) or None,
            workflow_template_ref=m.WorkflowTemplateRef(name=template_name),
            arguments=dict(parameters) or None,
            entrypoint=entrypoint,
        )
        req = m.WorkflowCreateRequest(workflow=wf.build())
        created = self._call(f"submit a Workflow from template {template_name}", self.service.create_workflow, req)
        return _as_dict(created)

    def get_workflow(self, name: str) -> dict:
        return _as_dict(
            self._call(
                f"read workflow {name}",
                self.service.get_workflow,
                name,
                not_found=f"workflow {name} not found in namespace {self.settings.namespace}:"
                " check the name (submit prints it)",
            )
        )

    def decide(self, name: str, decision: str) -> str:
        """Answer the approval: set the node's `decision` output, then resume that node."""
        if decision not in DECISIONS:
            raise ValueError(decision)
        wf = self.get_workflow(name)
        waiting, why = approval_state(wf)
        if not waiting:
            verb = "approve" if decision == "cutover" else "abort"
            raise ArgoError(f"workflow {name} is not waiting for approval ({why}): nothing to {verb}")
        return self.answer_suspend(name, wf, APPROVE_NODE, decision, "approval")

    def answer_suspend(self, name: str, wf: dict, node_name: str, decision: str, what: str) -> str:
        """Set a suspended node's `decision` output, then resume that node, as the UI does.

        Returns "set" or, when the same decision was set before and only its resume had not gone
        through, "resumed" (a second set would be refused: workflow/util/util.go). Another decision
        already set raises DecisionAlreadySet: left alone, the node would act on it at its timeout.
        """
        current = set_output(find_node(wf, node_name), "decision")
        if current is not None and current != decision:
            raise DecisionAlreadySet(name, current, decision)
        selector = f"displayName={node_name}"
        if current is None:
            self._call(
                f"set the {what} decision on {name}",
                self.service.set_workflow,
                name,
                m.WorkflowSetRequest(node_field_selector=selector,
                                     output_parameters=json.dumps({"decision": decision})),
            )
        self._call(f"resume {name}", self.service.resume_workflow, name,
                   m.WorkflowResumeRequest(node_field_selector=selector))
        return "set" if current is None else "resumed"

    def ui_resume(self, name: str, choices: Mapping[str, str] | None = None,
                  display_name: str = APPROVE_NODE) -> dict:
        """Exactly the Argo UI's resume dialog (v4.1.2, ui/src/workflows/components/workflow-details/
        workflow-details.tsx): every input parameter of the suspended node (an enum without a value
        shows its default), as the operator left them in the dialog (`choices`), goes to `set` as an
        output with `id=<node id>`, then `resume` on that id. For tests of the UI path."""
        wf = self.get_workflow(name)
        node = find_node(wf, display_name)
        if node is None or node.get("type") != "Suspend" or node.get("phase") != "Running":
            raise ArgoError(f"workflow {name} has no suspended node {display_name}: the UI offers no resume")
        parameters = []
        for p in ((node.get("inputs") or {}).get("parameters") or []):
            p = dict(p)
            if p.get("enum") and not p.get("value"):
                p["value"] = p.get("default")
            parameters.append(p)
        unknown = set(choices or {}) - {p["name"] for p in parameters}
        if unknown:
            raise ValueError(f"the dialog shows no field {', '.join(sorted(unknown))}")
        for p in parameters:
            if p["name"] in (choices or {}):
                p["value"] = choices[p["name"]]
        selector = f"id={node['id']}"
        if parameters:  # updateOutputParametersForNodeIfRequired; JSON.stringify drops undefined values
            outputs = {p["name"]: p["value"] for p in parameters if p.get("value") is not None}
            self._call(f"set the outputs of {display_name} on {name}", self.service.set_workflow, name,
                       m.WorkflowSetRequest(node_field_selector=selector,
                                            output_parameters=json.dumps(outputs, separators=(",", ":"))))
        return _as_dict(self._call(f"resume {name}", self.service.resume_workflow, name,
                                   m.WorkflowResumeRequest(node_field_selector=selector)))

    def watch(self, name: str, interval: float, sleep: Callable[[float], None] = time.sleep,
              max_failures: int = 5) -> Iterator[dict]:
        """Yield the workflow on every poll until it finishes (a queued, Pending workflow keeps polling).

        A few consecutive failed polls are tolerated: an hour-long upgrade outlives blips of the API.
        """
        failures = 0
        while True:
            try:
                wf = self.get_workflow(name)
                failures = 0
            except ArgoError:
                failures += 1
                if failures >= max_failures:
                    raise
                sleep(interval)
                continue
            yield wf
            if workflow_phase(wf) in FINISHED:
                return
            sleep(interval)

    # -- lint ----------------------------------------------------------------------------

    def lint(self, document: Any) -> str | None:
        """Server-side lint of one document; None when it passes, else the server's one-line reason.

        Only WorkflowTemplates and CronWorkflows have lint endpoints; other kinds return None.
        """
        doc = dict(_as_dict(document))
        kind = doc.get("kind")
        doc["metadata"] = {**doc.get("metadata", {}), "namespace": self.settings.namespace}
        name = doc["metadata"].get("name", "?")
        if kind == "WorkflowTemplate":
            call = self.service.lint_workflow_template
            req = m.WorkflowTemplateLintRequest(template=m.WorkflowTemplate(**doc))
        elif kind == "CronWorkflow":
            call = self.service.lint_cron_workflow
            req = m.LintCronWorkflowRequest(cron_workflow=m.CronWorkflow(**doc))
        else:
            return None
        return self._call(f"lint {kind} {name}", self._lint_verdict, call, req)

    def _lint_verdict(self, call: Callable, req: Any) -> str | None:
        try:
            call(req)
        except hera_exc.BadRequest as exc:  # the lint verdict itself (gRPC InvalidArgument), not a transport problem
            return self._scrub(_server_message(exc))
        return None


def _server_message(exc: BaseException) -> str:
    """The server's own message out of Hera's 'Server returned status code N with message: `...`'."""
    text = str(exc)
    if "message: `" in text:
        text = text.split("message: `", 1)[1].rstrip("`")
    return " ".join(text.split()) or type(exc).__name__


def server_lint(config: Any, documents: list, env: Mapping[str, str] | None = None
                ) -> list[tuple[str, str, str | None]]:
    """Lint the rendered documents on the Argo server: [(kind, name, None | error)] for each lintable one.

    WorkflowTemplates go first: the server resolves a CronWorkflow's workflowTemplateRef against the
    cluster, so a CronWorkflow lints clean only once its template exists there.
    """
    client = ArgoClient(ArgoSettings.from_env(env, default_namespace=config_namespace(config)))
    docs = [_as_dict(d) for d in documents]
    order = {"WorkflowTemplate": 0, "CronWorkflow": 1}
    results = []
    for doc in sorted((d for d in docs if d.get("kind") in order), key=lambda d: order[d["kind"]]):
        results.append((doc["kind"], doc.get("metadata", {}).get("name", "?"), client.lint(doc)))
    return results


def server_problems(config: Any, documents: list, env: Mapping[str, str] | None = None) -> list[str]:
    """server_lint as `db-upgrade lint` problem lines; an unreachable server is one such line too."""
    try:
        results = server_lint(config, documents, env)
    except ArgoError as exc:
        return [f"argo server lint: {exc}"]
    return [f"{kind}/{name}: argo server lint: {error}" for kind, name, error in results if error]


def config_namespace(config: Any) -> str | None:
    """The namespace the environment deploys its WorkflowTemplate to (ARGO_NAMESPACE must agree)."""
    return getattr(config, "namespace", None)


# -- reading a workflow's status (pure functions over the wire-format dict) -------------------


def workflow_phase(wf: dict) -> str:
    return (wf.get("status") or {}).get("phase") or "Pending"


def step_nodes(wf: dict) -> list[dict]:
    """The nodes that are steps (pods, suspends, retries), in start order; not the DAG groupings."""
    nodes = ((wf.get("status") or {}).get("nodes") or {}).values()
    root = (wf.get("metadata") or {}).get("name")
    steps = [n for n in nodes if n.get("type") not in _GROUP_NODE_TYPES and n.get("id") != root]
    return sorted(steps, key=lambda n: (n.get("startedAt") or "9999", n.get("displayName") or ""))


def find_node(wf: dict, display_name: str) -> dict | None:
    for node in ((wf.get("status") or {}).get("nodes") or {}).values():
        if node.get("displayName") == display_name:
            return node
    return None


def node_output(node: dict | None, name: str) -> str | None:
    for p in ((node or {}).get("outputs") or {}).get("parameters") or []:
        if p.get("name") == name:
            return p.get("value")
    return None


def set_output(node: dict | None, name: str) -> str | None:
    """The value a suspend node's supplied output was set to, None while unset: a set output has a
    value and no valueFrom any more (workflow/util/util.go updateSuspendedNode)."""
    for p in ((node or {}).get("outputs") or {}).get("parameters") or []:
        if p.get("name") == name and "value" in p and not p.get("valueFrom"):
            return p["value"]
    return None


def suspend_state(wf: dict, node_name: str, not_started: str) -> tuple[bool, str]:
    """(waiting at that suspend node?, why not): the workflow Running and the node Running."""
    phase = workflow_phase(wf)
    node = find_node(wf, node_name)
    if phase != "Running":
        return False, f"workflow is {phase}"
    if node is None:
        return False, not_started
    if node.get("phase") != "Running":
        return False, f"the {node_name} step is {node.get('phase')}"
    return True, ""


def approval_state(wf: dict) -> tuple[bool, str]:
    return suspend_state(wf, APPROVE_NODE, "the approve step has not started yet")


def lag(wf: dict) -> str | None:
    return node_output(find_node(wf, LAG_NODE), "lag")


def decision(wf: dict) -> str | None:
    return node_output(find_node(wf, APPROVE_NODE), "decision")


def _span(start: dict | None, end: dict | None) -> float | None:
    a = parse_time((start or {}).get("startedAt"))
    b = parse_time((end or {}).get("finishedAt"))
    return (b - a).total_seconds() if a and b else None


def run_report(wf: dict) -> list[tuple[str, str]]:
    """The numbers a rehearsal is for, from node times and outputs (what is known so far).

    The apply time after the endpos (finish start to follow's end) is the part of a real
    cutover's write downtime a rehearsal can measure; freeze and restart come on top.
    """
    follow, wait, finish = find_node(wf, "follow"), find_node(wf, LAG_NODE), find_node(wf, "finish")
    report = []
    if (caught_up := _span(follow, wait)) is not None:
        report.append(("caught up after", format_duration(caught_up)))
    for name, label in (("copy-seconds", "copy"), ("catchup-seconds", "catch-up")):
        value = node_output(follow, name)
        if value and value.replace(".", "", 1).isdigit():
            report.append((label, format_duration(float(value))))
    if (drain := _span(finish, follow)) is not None:
        report.append(
            ("write downtime", f"{format_duration(drain)} to apply after the endpos, plus freeze and restart")
        )
    if (verified := node_output(find_node(wf, "verify"), "verify")):
        report.append(("verify", verified))
    return report


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


from steps.log import duration as format_duration  # noqa: E402  (one way to print a duration)


def node_timing(node: dict, now: datetime | None = None) -> tuple[str, str, str]:
    """(started, finished, duration) as short strings; a running node's duration counts up to now."""
    started, finished = parse_time(node.get("startedAt")), parse_time(node.get("finishedAt"))
    now = now or datetime.now(timezone.utc)
    fmt = "%Y-%m-%d %H:%M:%S"
    duration = ""
    if started:
        duration = format_duration(((finished or now) - started).total_seconds())
        if not finished:
            duration += " so far"
    return (started.strftime(fmt) if started else "-", finished.strftime(fmt) if finished else "-", duration or "-")


def parse_parameters(pairs: list[str], allowed: Mapping[str, dict]) -> dict[str, str]:
    """`-p name=value` pairs, checked against the template's real parameters (names, and enums where declared)."""
    values: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ArgoError(f"parameter {pair!r} is not name=value: write -p name=value")
        if name not in allowed:
            raise ArgoError(f"unknown parameter {name!r}: the template accepts {', '.join(sorted(allowed)) or 'none'}")
        enum = allowed[name].get("enum")
        if enum and value not in enum:
            raise ArgoError(f"parameter {name}={value!r} is not allowed: choose one of {', '.join(enum)}")
        values[name] = value
    return values


def template_parameters(template: Any) -> dict[str, dict]:
    """{name: parameter} of a WorkflowTemplate's spec.arguments.parameters."""
    doc = _as_dict(template)
    params = ((doc.get("spec") or {}).get("arguments") or {}).get("parameters") or []
    return {p["name"]: p for p in params}
