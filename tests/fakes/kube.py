"""A tiny Kubernetes API server for apps/v1 Deployments, on 127.0.0.1 in a thread.

It speaks the real wire format (objects, lists, `kind: Status` errors), so the real
`kubernetes` client runs against it unchanged. A patched deployment rolls out one
step per GET until `polls_to_complete` GETs have happened (never if None).
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import yaml

PATH = re.compile(r"^/apis/apps/v1/namespaces/(?P<ns>[^/]+)/deployments(?:/(?P<name>[^/]+))?$")


def deployment(name: str, namespace: str, replicas: int = 2, labels: dict | None = None) -> dict:
    labels = labels or {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "generation": 1, "labels": labels, "uid": f"uid-{name}"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": "example/app:1"}]},
            },
        },
        "status": {
            "observedGeneration": 1,
            "replicas": replicas,
            "updatedReplicas": replicas,
            "readyReplicas": replicas,
            "availableReplicas": replicas,
            "conditions": [{"type": "Available", "status": "True"}, {"type": "Progressing", "status": "True",
                                                                     "reason": "NewReplicaSetAvailable"}],
        },
    }


def status(code: int, reason: str, message: str, name: str | None = None) -> dict:
    details = {"group": "apps", "kind": "deployments"}
    if name:
        details["name"] = name
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "details": details, "code": code}


@dataclass
class FakeKube:
    deployments: dict = field(default_factory=dict)  # (namespace, name) -> object
    forbidden: set = field(default_factory=set)  # (verb, name or None)
    polls_to_complete: int | None = 2
    requests: list = field(default_factory=list)  # (method, path, headers, body)
    _polls: dict = field(default_factory=dict)

    def add(self, name: str, namespace: str = "shop", **kw) -> dict:
        obj = deployment(name, namespace, **kw)
        self.deployments[(namespace, name)] = obj
        return obj

    # --- behaviour -------------------------------------------------------------
    def _forbid(self, verb: str, ns: str, name: str | None) -> dict | None:
        if (verb, name) in self.forbidden:
            target = f'deployments.apps "{name}"' if name else "deployments.apps"
            return status(403, "Forbidden",
                          f'{target} is forbidden: User "system:serviceaccount:db-upgrade:db-upgrade" cannot '
                          f'{verb} resource "deployments" in API group "apps" in the namespace "{ns}"', name)
        return None

    def _advance(self, obj: dict) -> None:
        """One rollout step per GET after a patch: observed, then updated, then available."""
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        if key not in self._polls:
            return
        self._polls[key] += 1
        n, st, want = self._polls[key], obj["status"], obj["spec"]["replicas"]
        if self.polls_to_complete is None or n < self.polls_to_complete:
            st["observedGeneration"] = obj["metadata"]["generation"]
            st["updatedReplicas"], st["replicas"], st["availableReplicas"] = 1, want + 1, want
            return
        st.update(observedGeneration=obj["metadata"]["generation"], replicas=want, updatedReplicas=want,
                  availableReplicas=want, readyReplicas=want)
        del self._polls[key]

    def handle(self, method: str, path: str, query: dict, body: bytes) -> tuple[int, dict]:
        m = PATH.match(path)
        if not m:
            return 404, status(404, "NotFound", f"the server could not find the requested resource ({path})")
        ns, name = m["ns"], m["name"]
        if name is None and method == "GET":
            if denied := self._forbid("list", ns, None):
                return 403, denied
            wanted = dict(p.split("=", 1) for p in query.get("labelSelector", [""])[0].split(",") if p)
            items = [o for (n, _), o in sorted(self.deployments.items())
                     if n == ns and all(o["metadata"]["labels"].get(k) == v for k, v in wanted.items())]
            return 200, {"apiVersion": "apps/v1", "kind": "DeploymentList", "metadata": {"resourceVersion": "1"},
                         "items": items}
        verb = {"GET": "get", "PATCH": "patch"}.get(method)
        if verb is None or name is None:
            return 405, status(405, "MethodNotAllowed", f"{method} not allowed")
        if denied := self._forbid(verb, ns, name):
            return 403, denied
        obj = self.deployments.get((ns, name))
        if obj is None:
            return 404, status(404, "NotFound", f'deployments.apps "{name}" not found', name)
        if verb == "get":
            self._advance(obj)
            return 200, obj
        patch = json.loads(body)
        annotations = patch["spec"]["template"]["metadata"]["annotations"]
        obj["spec"]["template"]["metadata"].setdefault("annotations", {}).update(annotations)
        obj["metadata"]["generation"] += 1
        self._polls[(ns, name)] = 0
        return 200, obj

    # --- server ----------------------------------------------------------------
    def __enter__(self) -> FakeKube:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self):
                url = urlsplit(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fake.requests.append((self.command, url.path, dict(self.headers), body))
                code, obj = fake.handle(self.command, url.path, parse_qs(url.query), body)
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PATCH = do_POST = _serve

            def log_message(self, *args):  # keep test output quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def write_kubeconfig(self, path: Path) -> Path:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "fake-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": "shop"}}],
            "current-context": "fake",
        }))
        return path
