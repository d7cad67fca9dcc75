"""A fake Argo Server: the REST endpoints db-upgrade calls, with Argo's wire format, on 127.0.0.1.

Argo Server answers errors as grpc-gateway JSON, `{"code": <grpc code>, "message": "..."}`, with the
matching HTTP status (server/apiserver/argoserver.go serves the gRPC services through grpc-gateway);
a workflow created with `generateName` gets a random suffix (the Kubernetes API server does that);
a workflow's `status.nodes` is keyed by node id, each node with displayName, type, phase and times
(pkg/apis/workflow/v1alpha1/workflow_types.go NodeStatus). Templates: create refuses an existing
name, update a stale resourceVersion (Kubernetes' optimistic concurrency, through
server/workflowtemplate/workflow_template_server.go); lint answers InvalidArgument
(LintWorkflowTemplate there, LintCronWorkflow in server/cronworkflow/cron_workflow_server.go).

A test scripts a workflow's life as a list of statuses: each GET of the workflow serves the next one
(the last repeats), which is how `submit --wait` sees Pending → Running → approval → Succeeded.

Or a test brings a workflow to its approval from the real rendered template (`run_to_approval`):
the fake then holds the suspend node as the controller builds it, and `set`, `resume` and the
suspend timeout act on it as Argo v4.1.2 does (each behaviour names the file it mirrors), so that
a template the real server would refuse fails here too.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import zlib
from datetime import datetime, timedelta, timezone
from pathlib import Path
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

NS = "db"
GRPC_NOT_FOUND, GRPC_ALREADY_EXISTS, GRPC_INVALID_ARGUMENT, GRPC_UNAUTHENTICATED = 5, 6, 3, 16
GRPC_INTERNAL = 13  # server/workflow/workflow_server.go: SetWorkflow/ResumeWorkflow errors are codes.Internal


@dataclass
class Request:
    method: str
    path: str
    body: Any
    headers: dict


@dataclass
class FakeArgo:
    token: str | None = None  # when set, requests must carry `Authorization: Bearer <token>`
    templates: dict = field(default_factory=dict)  # (ns, name) -> WorkflowTemplate
    workflows: dict = field(default_factory=dict)  # (ns, name) -> Workflow (without status)
    scripts: dict = field(default_factory=dict)  # (ns, name) -> [status, ...] served one per GET
    lint_errors: dict = field(default_factory=dict)  # name -> message for a 400 from a lint endpoint
    next_suffix: str = "x7k2q"
    requests: list = field(default_factory=list)
    live: dict = field(default_factory=dict)  # (ns, name) -> status the fake's controller model owns
    live_templates: dict = field(default_factory=dict)  # (ns, name) -> the rendered WorkflowTemplate

    # -- test helpers --------------------------------------------------------------------

    def script(self, ns: str, name: str, statuses: list[dict], template: str = "db-upgrade") -> None:
        self.workflows[(ns, name)] = {
            "metadata": {"name": name, "namespace": ns, "uid": "0b8c-" + name},
            "spec": {"workflowTemplateRef": {"name": template}},
        }
        self.scripts[(ns, name)] = list(statuses)

    def run_to_approval(self, template: dict, *, ns: str = NS, name: str = "db-upgrade-prod-x7k2q",
                        values: dict[str, str] | None = None, started: str = "2026-11-24T22:30:00Z",
                        suspend_task: str = "approve") -> dict:
        """A workflow of `template` whose DAG has reached the suspend task `suspend_task`.

        Its ancestors are Succeeded; the suspend node is built as the controller builds it from the
        template: inputs are the task's arguments (resolved from `values`, e.g.
        {"tasks.wait-caught-up.outputs.parameters.lag": "lag 12 kB"}) or the input's default
        (workflow/common/util.go ProcessArgs, overwriteWithDefaultParams); outputs are the template's
        outputs with valueFrom.supplied, taking a same-named input's default when they have none
        (workflow/controller/operator.go initializeExecutableNode, addRawOutputFields).
        """
        spec = template["spec"]
        tmpls = {t["name"]: t for t in spec["templates"]}
        tasks = {t["name"]: t for t in tmpls[spec["entrypoint"]]["dag"]["tasks"]}
        task = tasks[suspend_task]
        tmpl = tmpls[task["template"]]
        assert "suspend" in tmpl, f"task {suspend_task} does not run a suspend template"
        values = values or {}
        args = {a["name"]: a.get("value") for a in (task.get("arguments") or {}).get("parameters") or []}
        inputs = []
        for p in (tmpl.get("inputs") or {}).get("parameters") or []:
            p = copy.deepcopy(p)
            if p["name"] in args:
                p["value"] = re.sub(r"\{\{([^}]+)\}\}", lambda m: values.get(m[1].strip(), m[0]), str(args[p["name"]]))
            elif "value" not in p and "default" in p:
                p["value"] = p["default"]
            assert "value" in p, f"input {p['name']} of {tmpl['name']} has no value: Argo fails the node"
            inputs.append(p)
        input_defaults = {p["name"]: p["default"] for p in inputs if "default" in p}
        outputs = []
        for p in (tmpl.get("outputs") or {}).get("parameters") or []:
            vf = p.get("valueFrom") or {}
            if "supplied" not in vf:
                continue
            p = copy.deepcopy(p)
            if "default" not in vf and p["name"] in input_defaults:
                p["valueFrom"]["default"] = input_defaults[p["name"]]
            outputs.append(p)
        root = name
        nodes = {root: {"id": root, "name": root, "displayName": root, "type": "DAG", "phase": "Running",
                        "templateName": spec["entrypoint"], "startedAt": "2026-11-24T22:00:00Z"}}
        for ancestor in _ancestry(tasks, suspend_task):
            n = _node_ref(name, ancestor, tasks[ancestor]["template"], "Pod", "Succeeded")
            n.update(startedAt="2026-11-24T22:00:00Z", finishedAt=started)
            prefix = f"tasks.{ancestor}.outputs.parameters."
            outs = [{"name": k[len(prefix):], "value": v} for k, v in values.items() if k.startswith(prefix)]
            if outs:
                n["outputs"] = {"parameters": outs}
            nodes[n["id"]] = n
        node = _node_ref(name, suspend_task, task["template"], "Suspend", "Running")
        node.update(startedAt=started, boundaryID=root)
        if inputs:
            node["inputs"] = {"parameters": inputs}
        if outputs:
            node["outputs"] = {"parameters": outputs}
        nodes[node["id"]] = node
        self.workflows[(ns, name)] = {
            "metadata": {"name": name, "namespace": ns, "uid": "0b8c-" + name},
            "spec": {"workflowTemplateRef": {"name": template["metadata"]["name"]}},
        }
        self.live[(ns, name)] = {"phase": "Running", "startedAt": "2026-11-24T22:00:00Z", "nodes": nodes}
        self.live_templates[(ns, name)] = template
        return copy.deepcopy(node)

    def live_node(self, ns: str, name: str, display: str) -> dict:
        return next(n for n in self.live[(ns, name)]["nodes"].values() if n["displayName"] == display)

    def time_out(self, ns: str, name: str, display: str = "approve") -> dict:
        """The suspend duration passed: outputs still unset take their default, set ones keep their
        value; no default fails the node (workflow/controller/operator.go executeSuspend, then
        workflow/util/util.go OverrideOutputParametersWithDefault)."""
        node = self.live_node(ns, name, display)
        tmpl = _template_of(self.live_templates[(ns, name)], node)
        duration = _seconds(tmpl["suspend"]["duration"])
        finished = _time(node["startedAt"]) + timedelta(seconds=duration)
        error = _override_with_defaults(node)
        node["finishedAt"] = _iso(finished)
        if error:
            node.update(phase="Error", message=error)
        else:
            node["phase"] = "Succeeded"
        return copy.deepcopy(node)

    def calls(self, method: str | None = None) -> list[tuple[str, str]]:
        return [(r.method, r.path) for r in self.requests if method in (None, r.method)]

    def bodies(self, method: str, path: str) -> list:
        return [r.body for r in self.requests if r.method == method and r.path == path]

    # -- server --------------------------------------------------------------------------

    def start(self) -> str:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                path = self.path.split("?", 1)[0]
                fake.requests.append(Request(self.command, path, body, dict(self.headers)))
                if fake.token and self.headers.get("Authorization") != f"Bearer {fake.token}":
                    message = "token not valid. see https://argo-workflows.readthedocs.io/en/latest/faq/"
                    return self._send(401, {"code": GRPC_UNAUTHENTICATED, "message": message})
                status, payload = fake.route(self.command, path, body)
                self._send(status, payload)

            def _send(self, status: int, payload: Any):
                raw = isinstance(payload, bytes)  # e.g. an ingress's HTML page
                data = payload if raw else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/html" if raw else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return f"127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- the Argo Server API -------------------------------------------------------------

    def route(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        parts = path.strip("/").split("/")
        if parts[:2] != ["api", "v1"] or len(parts) < 4:
            return 404, {"code": GRPC_NOT_FOUND, "message": f"no route {path}"}
        kind, ns, rest = parts[2], parts[3], parts[4:]
        if kind == "workflow-templates":
            return self._templates(method, ns, rest, body)
        if kind == "workflows":
            return self._workflows(method, ns, rest, body)
        if kind == "cron-workflows" and method == "POST" and rest == ["lint"]:
            return self._lint(body["cronWorkflow"])
        return 404, {"code": GRPC_NOT_FOUND, "message": f"no route {method} {path}"}

    def _lint(self, doc: dict) -> tuple[int, Any]:
        name = doc["metadata"]["name"]
        if name in self.lint_errors:
            return 400, {"code": GRPC_INVALID_ARGUMENT, "message": self.lint_errors[name]}
        return 200, doc

    def _templates(self, method, ns, rest, body):
        if method == "POST" and rest == ["lint"]:
            return self._lint(body["template"])
        if method == "POST" and not rest:
            tmpl = body["template"]
            key = (ns, tmpl["metadata"]["name"])
            if key in self.templates:
                message = f'workflowtemplates.argoproj.io "{key[1]}" already exists'
                return 409, {"code": GRPC_ALREADY_EXISTS, "message": message}
            tmpl = json.loads(json.dumps(tmpl))
            tmpl["metadata"].update(namespace=ns, resourceVersion="1", uid="tmpl-uid")
            self.templates[key] = tmpl
            return 200, tmpl
        if len(rest) == 1:
            key = (ns, rest[0])
            if key not in self.templates:
                return 404, {"code": GRPC_NOT_FOUND, "message": f'workflowtemplates.argoproj.io "{rest[0]}" not found'}
            if method == "GET":
                return 200, self.templates[key]
            if method == "PUT":
                tmpl = json.loads(json.dumps(body["template"]))
                current = self.templates[key]["metadata"]["resourceVersion"]
                if tmpl["metadata"].get("resourceVersion") != current:
                    message = ("the object has been modified;"
                               " please apply your changes to the latest version and try again")
                    return 409, {"code": 10, "message": message}
                tmpl["metadata"]["resourceVersion"] = str(int(current) + 1)
                self.templates[key] = tmpl
                return 200, tmpl
        return 404, {"code": GRPC_NOT_FOUND, "message": "no route"}

    def _workflows(self, method, ns, rest, body):
        if method == "POST" and not rest:
            wf = json.loads(json.dumps(body["workflow"]))
            ref = (wf.get("spec") or {}).get("workflowTemplateRef", {}).get("name")
            if (ns, ref) not in self.templates:
                return 404, {"code": GRPC_NOT_FOUND, "message": f'workflowtemplates.argoproj.io "{ref}" not found'}
            name = wf["metadata"].get("name") or wf["metadata"]["generateName"] + self.next_suffix
            wf["metadata"].update(name=name, namespace=ns, uid="wf-uid")
            self.workflows[(ns, name)] = wf
            self.scripts.setdefault((ns, name), [{"phase": "Pending"}])
            return 200, wf
        if not rest:
            return 404, {"code": GRPC_NOT_FOUND, "message": "no route"}
        key = (ns, rest[0])
        if key not in self.workflows:
            return 404, {"code": GRPC_NOT_FOUND, "message": f'workflows.argoproj.io "{rest[0]}" not found'}
        if key in self.live:
            return self._live(method, key, rest[1:], body)
        if method == "GET" and len(rest) == 1:
            script = self.scripts[key]
            status = script.pop(0) if len(script) > 1 else script[0]
            return 200, {**self.workflows[key], "status": status}
        if method == "PUT" and rest[1:] in (["set"], ["resume"]):
            return 200, {**self.workflows[key], "status": self.scripts[key][0]}
        return 404, {"code": GRPC_NOT_FOUND, "message": "no route"}


    def _live(self, method: str, key: tuple, rest: list, body: Any) -> tuple[int, Any]:
        status = self.live[key]
        if method == "GET" and not rest:
            return 200, {**self.workflows[key], "status": copy.deepcopy(status)}
        if method == "PUT" and rest in (["set"], ["resume"]):
            body = body or {}
            selector = body.get("nodeFieldSelector") or ""
            try:
                if rest == ["set"]:
                    error = self._set(status, selector, body)
                else:
                    error = self._resume(status, selector)
            except ValueError as exc:
                error = str(exc)
            if error:
                return 500, {"code": GRPC_INTERNAL, "message": error}
            return 200, {**self.workflows[key], "status": copy.deepcopy(status)}
        return 404, {"code": GRPC_NOT_FOUND, "message": "no route"}

    @staticmethod
    def _set(status: dict, selector: str, body: dict) -> str | None:
        """server/workflow/workflow_server.go SetWorkflow, then workflow/util/util.go SetWorkflow."""
        if not selector:
            return "'set' currently only targets suspend nodes, use a node field selector to target them"
        try:
            params = json.loads(body.get("outputParameters") or "{}")
        except ValueError as exc:
            return f"unable to parse output parameter set request: {exc}"
        if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
            return "unable to parse output parameter set request: json: cannot unmarshal into Go value of type string"
        return _update_suspended(status, selector, None, params)

    @staticmethod
    def _resume(status: dict, selector: str) -> str | None:
        """workflow/util/util.go ResumeWorkflow: with a selector, only the phase of the matching nodes
        (their unset outputs stay unset); without, every active suspend node, unset outputs taking
        their default (OverrideOutputParametersWithDefault)."""
        if selector:
            return _update_suspended(status, selector, "Succeeded", {})
        for node in status["nodes"].values():
            if _active_suspend(node):
                error = _override_with_defaults(node)
                if error:
                    return error
                node.update(phase="Succeeded", finishedAt=_iso(datetime.now(timezone.utc)))
        return None


# -- the controller's and server's rules, each from the file it mirrors ------------------------


def _node_ref(wf: str, task: str, template: str, type: str, phase: str) -> dict:
    node_name = f"{wf}.{task}"
    # Node ids are <workflow>-<fnv32a of the node name> (workflow/util/util.go GetNodeID); any stable
    # number serves a fake.
    return {"id": f"{wf}-{zlib.crc32(node_name.encode())}", "name": node_name, "displayName": task,
            "type": type, "phase": phase, "templateName": template}


def _ancestry(tasks: dict, name: str) -> list[str]:
    seen: list[str] = []
    todo = [name]
    while todo:
        t = tasks[todo.pop()]
        deps = set(t.get("dependencies") or []) | set(re.findall(r"([a-z0-9][a-z0-9-]*)(?=\.|\b)", t.get("depends") or ""))
        for d in sorted(deps & set(tasks)):
            if d not in seen:
                seen.append(d)
                todo.append(d)
    return seen


def _template_of(template: dict, node: dict) -> dict:
    return next(t for t in template["spec"]["templates"] if t["name"] == node["templateName"])


def _active_suspend(node: dict) -> bool:
    # pkg/apis/workflow/v1alpha1 IsActiveSuspendNode
    return node.get("type") == "Suspend" and node.get("phase") == "Running"


def _selector_terms(selector: str) -> list[tuple[str, str, str]]:
    """k8s.io/apimachinery fields.ParseSelector: `key=value`, `key==value`, `key!=value`, comma-joined."""
    terms = []
    for part in filter(None, (s.strip() for s in selector.split(","))):
        m = re.fullmatch(r"([^=!]+)(==|!=|=)(.*)", part)
        if not m:
            raise ValueError(f"invalid selector: '{selector}'; can't understand '{part}'")
        terms.append((m[1].strip(), "!=" if m[2] == "!=" else "=", m[3].strip()))
    return terms


def _matches(terms: list, node: dict) -> bool:
    """workflow/util/util.go SelectorMatchesNode: displayName, templateName, phase, name, id and
    inputs.parameters.<name>.value."""
    fields = {k: node.get(k, "") for k in ("displayName", "templateName", "phase", "name", "id")}
    for p in (node.get("inputs") or {}).get("parameters") or []:
        fields[f"inputs.parameters.{p['name']}.value"] = str(p.get("value", ""))
    return all((fields.get(k, "") == v) == (op == "=") for k, op, v in terms)


def _update_suspended(status: dict, selector: str, phase: str | None, params: dict[str, str]) -> str | None:
    """workflow/util/util.go updateSuspendedNode: all or nothing. Each given output must be one of
    the node's outputs that still has valueFrom.supplied (a set one lost it: a second set is
    refused), else the whole call fails and nothing changes."""
    terms = _selector_terms(selector)
    changed = copy.deepcopy(status["nodes"])
    updated = False
    for node in changed.values():
        if not (_active_suspend(node) and _matches(terms, node)):
            continue
        if phase:
            node["phase"] = phase
            node["finishedAt"] = _iso(datetime.now(timezone.utc))
            updated = True
        if params:
            if not node.get("outputs"):
                return "cannot set output parameters because node is not expecting any raw parameters"
            for name, value in params.items():
                out = next((p for p in node["outputs"].get("parameters") or [] if p["name"] == name), None)
                if out is None:
                    return f"node is not expecting output parameter '{name}'"
                if "supplied" not in (out.get("valueFrom") or {}):
                    return (f"cannot set output parameter '{name}' because it does not use valueFrom.raw"
                            " or it was already set")
                out["value"] = value
                out.pop("valueFrom", None)
                updated = True
    if not updated:
        return ("currently, set only targets suspend nodes: no suspend nodes matching nodeFieldSelector: "
                + selector)
    status["nodes"] = changed
    return None


def _override_with_defaults(node: dict) -> str | None:
    """workflow/util/util.go OverrideOutputParametersWithDefault: only outputs that still have
    valueFrom.supplied, i.e. that nobody set."""
    for p in (node.get("outputs") or {}).get("parameters") or []:
        vf = p.get("valueFrom") or {}
        if "supplied" in vf:
            if "default" not in vf:
                return f"raw output parameter '{p['name']}' has not been set and does not have a default value"
            p["value"] = vf["default"]
            p.pop("valueFrom")
    return None


def _seconds(duration: Any) -> float:
    # pkg/apis/workflow/v1alpha1 ParseStringToDuration: a number is seconds, else a Go duration.
    text = str(duration).strip()
    if text.isdigit():
        return float(text)
    units = {"h": 3600, "m": 60, "s": 1}
    return float(sum(float(n) * units[u] for n, u in re.findall(r"([0-9.]+)([hms])", text)))


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _iso(value: datetime) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def node(display: str, phase: str, *, wf: str = "db-upgrade-x7k2q", type: str = "Pod",
         started: str | None = "2026-11-24T22:00:00Z", finished: str | None = None,
         outputs: dict | None = None, **extra) -> dict:
    """One entry of status.nodes as Argo writes it."""
    n = {
        "id": f"{wf}-{display}",
        "name": f"{wf}.{display}",
        "displayName": display,
        "type": type,
        "phase": phase,
        "templateName": display,
        **extra,
    }
    if started:
        n["startedAt"] = started
    if finished:
        n["finishedAt"] = finished
    if outputs:
        n["outputs"] = {"parameters": [{"name": k, "value": v} for k, v in outputs.items()]}
    return n


def status(phase: str, *nodes: dict, wf: str = "db-upgrade-x7k2q", message: str | None = None,
           started: str | None = "2026-11-24T22:00:00Z", finished: str | None = None) -> dict:
    """A workflow status: the root DAG node plus the given step nodes."""
    root = {"id": wf, "name": wf, "displayName": wf, "type": "DAG", "phase": phase, "templateName": "main"}
    st: dict = {"phase": phase, "nodes": {wf: root, **{n["id"]: n for n in nodes}}}
    if started:
        st["startedAt"] = started
    if finished:
        st["finishedAt"] = finished
    if message:
        st["message"] = message
    return st


# -- the environment the CLI tests run with ------------------------------------------------------

CONFIG_YAML = """\
name: prod
database_id: orders
namespace: db
image: {repository: registry.example.com/db-upgrade, tag: "1.0.0"}
connections:
  source: {secret: orders-pg15, key: uri}
  target: {secret: orders-pg17, key: uri}
sql_config_map: orders-upgrade-sql
restart: {deployments: [orders-api]}
"""


def assert_valid(doc: dict) -> None:
    """The strict (patched) Argo schema of workflows/schema.py."""
    from workflows.schema import validate

    errors = validate(doc)
    assert not errors, errors


def write_environment(tmp_path: Path) -> Path:
    path = tmp_path / "prod.yaml"
    path.write_text(CONFIG_YAML)
    return path


def load_environment(path: Path) -> tuple:
    """(Config, WorkflowTemplate dict) as the CLI builds them."""
    from workflows import upgrade
    from workflows.config import load_config

    config = load_config(path)
    return config, upgrade.render(config)


# -- running the CLI against a fake -----------------------------------------------------------

ARGO_VARS = ("ARGO_SERVER", "ARGO_TOKEN", "ARGO_NAMESPACE", "ARGO_SECURE", "ARGO_BASE_HREF", "ARGO_INSECURE_SKIP_VERIFY")


def served(token: str | None = None):
    """A started FakeArgo (a generator for pytest fixtures: `yield from served(TOKEN)`)."""
    f = FakeArgo(token=token)
    f.address = f.start()
    try:
        yield f
    finally:
        f.stop()


def cli_invoker(app, fake: FakeArgo, env_file: Path, token: str, monkeypatch):
    """`db-upgrade ARGS --config ENV` through `app`, the argo env pointing at the fake (nothing of
    the developer's own ARGO_* leaks in); asserts that the token never reaches the output."""
    from typer.testing import CliRunner

    for var in ARGO_VARS:
        monkeypatch.delenv(var, raising=False)
    base = {"ARGO_SERVER": fake.address, "ARGO_SECURE": "false", "ARGO_TOKEN": token}

    def invoke(*args: str, env: dict | None = None):
        result = CliRunner().invoke(app, [*args, "--config", str(env_file)], env={**base, **(env or {})},
                                    catch_exceptions=False)
        assert token not in result.output
        return result

    return invoke
