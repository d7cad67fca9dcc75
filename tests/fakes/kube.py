"""A tiny Kubernetes API server for apps/v1 Deployments and v1 ConfigMaps, on 127.0.0.1 in a thread.

It speaks the real wire format (objects, lists, `kind: Status` errors), so the real
`kubernetes` client runs against it unchanged. A patched deployment rolls out one
step per GET until `polls_to_complete` GETs have happened (never if None).

ConfigMaps (GET, LIST, POST, PUT, PATCH, DELETE) behave as k8s.io/apiserver's generic
registry does (pkg/registry/generic/registry/store.go, with the etcd3 storage of
pkg/storage/etcd3/store.go):

- every write gets a new `metadata.resourceVersion` from one counter for the whole server;
- optimistic concurrency: a PUT, or a PATCH that names a resourceVersion, whose
  resourceVersion differs from the stored one is refused with 409 `Conflict`,
  "Operation cannot be fulfilled on configmaps "NAME": the object has been modified;
  please apply your changes to the latest version and try again" (store.go Update,
  OptimisticLockErrorMsg); a PUT without one is an unconditional update (ConfigMaps
  allow it: AllowUnconditionalUpdate);
- POST of an existing name: 409 `AlreadyExists`; into a namespace that does not exist
  (when `namespaces` is set): 404 (the NamespaceLifecycle admission plugin); PUT or PATCH of a missing one: 404
  (ConfigMaps do not allow create-on-update); a POST carrying a resourceVersion: 500
  "resourceVersion should not be set on objects to be created" (etcd3 store.go Create);
- validation as k8s.io/kubernetes pkg/apis/core/validation ValidateConfigMap: keys
  `[-._a-zA-Z0-9]+`, data plus binaryData at most 1 MiB, else 422 `Invalid`;
- PATCH content types: merge-patch and strategic-merge-patch (the same for a ConfigMap's
  maps), json-patch (add, replace, remove, test); server-side apply is not modelled (415).

`before(method, kind, fn)` runs fn once before the next such request is served
(outside the lock): a test puts another writer exactly between a client's GET and PUT.
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
CM_PATH = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/configmaps(?:/(?P<name>[^/]+))?$")
CM_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
MAX_CONFIGMAP_BYTES = 1024 * 1024  # core.MaxSecretSize, which ValidateConfigMap applies
OPTIMISTIC_LOCK = "the object has been modified; please apply your changes to the latest version and try again"


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


def status(code: int, reason: str, message: str, name: str | None = None, kind: str = "deployments") -> dict:
    details = {"group": "apps", "kind": kind} if kind == "deployments" else {"kind": kind}
    if name:
        details["name"] = name
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "details": details, "code": code}


def cm_status(code: int, reason: str, message: str, name: str | None = None) -> dict:
    return status(code, reason, message, name, kind="configmaps")


def merge_patch(target, patch):
    """RFC 7386 JSON merge patch (also what a strategic merge patch does to a ConfigMap's maps)."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def json_patch(doc: dict, ops: list) -> dict:
    """RFC 6902 add / replace / remove / test on object members (what a ConfigMap needs)."""
    doc = json.loads(json.dumps(doc))
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent = doc
        for part in parts[:-1]:
            parent = parent.setdefault(part, {}) if op["op"] == "add" else parent[part]
        last = parts[-1]
        if op["op"] in ("add", "replace"):
            if op["op"] == "replace" and last not in parent:
                raise KeyError(op["path"])
            parent[last] = op["value"]
        elif op["op"] == "remove":
            del parent[last]
        elif op["op"] == "test":
            if parent.get(last) != op["value"]:
                raise ValueError(op["path"])
        else:
            raise KeyError(op["op"])
    return doc


@dataclass
class FakeKube:
    deployments: dict = field(default_factory=dict)  # (namespace, name) -> object
    # (verb, name or None) for deployments; ("configmaps", verb, name or None) for ConfigMaps
    forbidden: set = field(default_factory=set)
    polls_to_complete: int | None = 2
    requests: list = field(default_factory=list)  # (method, path, headers, body)
    configmaps: dict = field(default_factory=dict)  # (namespace, name) -> object
    namespaces: set = field(default_factory=set)  # when not empty: the only namespaces that exist
    conflicts: int = 0  # 409s served for ConfigMaps (Conflict or AlreadyExists)
    resource_version: int = 100
    _polls: dict = field(default_factory=dict)
    _before: list = field(default_factory=list)  # (method, kind, fn)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def before(self, method: str, kind: str, fn) -> None:
        """Run fn() once, before the next `method` request for `kind` (configmaps|deployments) is served."""
        self._before.append((method, kind, fn))

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

    def handle(self, method: str, path: str, query: dict, body: bytes, content_type: str = "") -> tuple[int, dict]:
        kind = "configmaps" if CM_PATH.match(path) else "deployments"
        for i, (meth, k, fn) in enumerate(self._before):
            if meth == method and k == kind:
                del self._before[i]
                fn()  # outside the lock: fn may call this server
                break
        with self._lock:
            if kind == "configmaps":
                return self._configmaps(method, path, query, body, content_type)
            return self._deployments(method, path, query, body)

    # --- v1 ConfigMaps (see the module docstring for the apiserver behaviour mirrored) --------
    def _next_version(self) -> str:
        self.resource_version += 1
        return str(self.resource_version)

    def _invalid(self, obj: dict, name: str) -> dict | None:
        data, binary = obj.get("data") or {}, obj.get("binaryData") or {}
        for key, value in {**data, **binary}.items():
            if not CM_KEY.match(key) or len(key) > 253:
                return cm_status(422, "Invalid", f'ConfigMap "{name}" is invalid: data[{key}]: Invalid value: '
                                 f'"{key}": a valid config key must consist of alphanumeric characters, '
                                 "'-', '_' or '.'", name)
            if key in data and not isinstance(value, str):
                return cm_status(400, "BadRequest", f"json: cannot unmarshal {type(value).__name__} into Go "
                                 f"struct field ConfigMap.data of type string", name)
        size = sum(len(k) + len(str(v).encode()) for k, v in {**data, **binary}.items())
        if size > MAX_CONFIGMAP_BYTES:
            return cm_status(422, "Invalid", f'ConfigMap "{name}" is invalid: []: Too long: must have at most '
                             f"{MAX_CONFIGMAP_BYTES} bytes", name)
        return None

    def _store(self, ns: str, name: str, obj: dict, old: dict | None) -> dict:
        meta = obj.setdefault("metadata", {})
        meta.update(name=name, namespace=ns, resourceVersion=self._next_version())
        meta["uid"] = (old or {}).get("metadata", {}).get("uid") or f"uid-cm-{name}"
        meta["creationTimestamp"] = (old or {}).get("metadata", {}).get("creationTimestamp") or "2026-12-01T00:00:00Z"
        obj["apiVersion"], obj["kind"] = "v1", "ConfigMap"
        self.configmaps[(ns, name)] = obj
        return obj

    def _conflict(self, name: str) -> tuple[int, dict]:
        self.conflicts += 1
        return 409, cm_status(409, "Conflict", f'Operation cannot be fulfilled on configmaps "{name}": '
                              f"{OPTIMISTIC_LOCK}", name)

    def _configmaps(self, method: str, path: str, query: dict, body: bytes, content_type: str) -> tuple[int, dict]:
        m = CM_PATH.match(path)
        ns, name = m["ns"], m["name"]
        verb = {"GET": "get" if name else "list", "POST": "create", "PUT": "update", "PATCH": "patch",
                "DELETE": "delete"}.get(method)
        if verb is None or (name is None and method not in ("GET", "POST")) or (name and method == "POST"):
            return 405, cm_status(405, "MethodNotAllowed", "the server does not allow this method on the "
                                  "requested resource")
        if ("configmaps", verb, name) in self.forbidden or ("configmaps", verb, None) in self.forbidden:
            target = f'configmaps "{name}"' if name else "configmaps"
            return 403, cm_status(403, "Forbidden", f'{target} is forbidden: User "system:serviceaccount:db-upgrade:'
                                  f'db-upgrade" cannot {verb} resource "configmaps" in API group "" in the '
                                  f'namespace "{ns}"', name)
        if method == "GET" and name is None:
            wanted = dict(p.split("=", 1) for p in query.get("labelSelector", [""])[0].split(",") if p)
            items = [o for (n, _), o in sorted(self.configmaps.items())
                     if n == ns and all((o["metadata"].get("labels") or {}).get(k) == v for k, v in wanted.items())]
            return 200, {"apiVersion": "v1", "kind": "ConfigMapList",
                         "metadata": {"resourceVersion": str(self.resource_version)}, "items": items}
        current = self.configmaps.get((ns, name)) if name else None
        if method == "GET":
            if current is None:
                return 404, cm_status(404, "NotFound", f'configmaps "{name}" not found', name)
            return 200, current
        if method == "DELETE":
            if current is None:
                return 404, cm_status(404, "NotFound", f'configmaps "{name}" not found', name)
            del self.configmaps[(ns, name)]
            return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                         "details": {"name": name, "kind": "configmaps", "uid": current["metadata"]["uid"]}}
        try:
            doc = json.loads(body or b"null")
        except ValueError as exc:
            return 400, cm_status(400, "BadRequest", f"the body of the request was in an unknown format: {exc}")
        if method == "POST":
            new_name = ((doc or {}).get("metadata") or {}).get("name")
            if not new_name:
                return 422, cm_status(422, "Invalid", 'ConfigMap "" is invalid: metadata.name: Required value: '
                                      "name or generateName is required")
            if (doc.get("metadata") or {}).get("resourceVersion"):
                return 500, cm_status(500, "InternalError", "Internal error occurred: resourceVersion should "
                                      "not be set on objects to be created", new_name)
            if self.namespaces and ns not in self.namespaces:  # the namespace lifecycle admission plugin
                return 404, status(404, "NotFound", f'namespaces "{ns}" not found', ns, kind="namespaces")
            if (ns, new_name) in self.configmaps:
                self.conflicts += 1
                return 409, cm_status(409, "AlreadyExists", f'configmaps "{new_name}" already exists', new_name)
            if denied := self._invalid(doc, new_name):
                return denied["code"], denied
            return 201, self._store(ns, new_name, doc, None)
        if current is None:
            return 404, cm_status(404, "NotFound", f'configmaps "{name}" not found', name)
        if method == "PUT":
            body_name = ((doc or {}).get("metadata") or {}).get("name")
            if body_name != name:
                return 400, cm_status(400, "BadRequest", f"the name of the object ({body_name}) does not match "
                                      f"the name on the URL ({name})", name)
            wanted_rv = (doc.get("metadata") or {}).get("resourceVersion")
            if wanted_rv and wanted_rv != current["metadata"]["resourceVersion"]:
                return self._conflict(name)
            new = doc
        else:
            ctype = content_type.split(";")[0].strip()
            try:
                if ctype == "application/json-patch+json":
                    new = json_patch(current, doc)
                elif ctype in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
                    new = merge_patch(current, doc)
                else:
                    return 415, cm_status(415, "UnsupportedMediaType", 'the body of the request was in an '
                                          'unknown format - accepted media types include: application/json-patch+json, '
                                          'application/merge-patch+json, application/strategic-merge-patch+json', name)
            except (KeyError, ValueError, TypeError, IndexError) as exc:
                return 422, cm_status(422, "Invalid", f"the server rejected our request due to an error in our "
                                      f"request: {exc}", name)
            wanted_rv = (new.get("metadata") or {}).get("resourceVersion")
            if wanted_rv != current["metadata"]["resourceVersion"]:
                return self._conflict(name)  # the patch named a resourceVersion that is not the current one
        if denied := self._invalid(new, name):
            return denied["code"], denied
        return 200, self._store(ns, name, json.loads(json.dumps(new)), current)

    # --- apps/v1 Deployments ---------------------------------------------------------
    def _deployments(self, method: str, path: str, query: dict, body: bytes) -> tuple[int, dict]:
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
                code, obj = fake.handle(self.command, url.path, parse_qs(url.query), body,
                                        self.headers.get("Content-Type") or "")
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PATCH = do_POST = do_PUT = do_DELETE = _serve

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
