"""A fake Argo Server: the REST endpoints db-upgrade calls, with Argo's wire format, on 127.0.0.1.

Argo Server answers errors as grpc-gateway JSON, `{"code": <grpc code>, "message": "..."}`, with the
matching HTTP status; a workflow created with `generateName` gets a random suffix; a workflow's
`status.nodes` is keyed by node id, each node with displayName, type, phase and times.

A test scripts a workflow's life as a list of statuses: each GET of the workflow serves the next one
(the last repeats), which is how `submit --wait` sees Pending → Running → approval → Succeeded.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

NS = "db"
GRPC_NOT_FOUND, GRPC_ALREADY_EXISTS, GRPC_INVALID_ARGUMENT, GRPC_UNAUTHENTICATED = 5, 6, 3, 16


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

    # -- test helpers --------------------------------------------------------------------

    def script(self, ns: str, name: str, statuses: list[dict], template: str = "db-upgrade") -> None:
        self.workflows[(ns, name)] = {
            "metadata": {"name": name, "namespace": ns, "uid": "0b8c-" + name},
            "spec": {"workflowTemplateRef": {"name": template}},
        }
        self.scripts[(ns, name)] = list(statuses)

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
        if method == "GET" and len(rest) == 1:
            script = self.scripts[key]
            status = script.pop(0) if len(script) > 1 else script[0]
            return 200, {**self.workflows[key], "status": status}
        if method == "PUT" and rest[1:] in (["set"], ["resume"]):
            return 200, {**self.workflows[key], "status": self.scripts[key][0]}
        return 404, {"code": GRPC_NOT_FOUND, "message": "no route"}


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
