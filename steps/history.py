"""The run history: the last reports of one database, in a ConfigMap beside its workflows.

A Workflow and its outputs live a day (its TTL); the trend of weekly rehearsals
must outlive them. So the report step appends each run's report to the
ConfigMap `db-upgrade-history-<database_id>` in the workflow's namespace, and
`db-upgrade history` reads it back.

- One key, `reports.json`: a JSON array, oldest first, at most `limit` entries
  (default 52: a year of weekly rehearsals). A ConfigMap holds at most 1 MiB;
  entries are dropped from the front until the array fits well under it.
- Appends are read-modify-write with optimistic concurrency: the PUT carries
  the resourceVersion that was read, the API server refuses it with 409
  Conflict when anyone wrote in between, and we read again and retry. Two
  runs' exit handlers finishing at the same moment both land.
- A run id (the workflow's name) appears once: `argo retry` runs the exit
  handler again, and its report replaces the earlier one.

Configuration: DB_UPGRADE_HISTORY_CONFIGMAP and DB_UPGRADE_NAMESPACE (the
template sets both); the history is off when either is empty, or when there is
no cluster to talk to (not in a pod, and no KUBECONFIG set: a laptop's
~/.kube/config is not taken implicitly, it may point at production).
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any, Callable

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from steps.errors import StepError

KEY = "reports.json"
DEFAULT_LIMIT = 52
MAX_BYTES = 900 * 1024  # the API server refuses a ConfigMap over 1 MiB (data and binaryData together)
ATTEMPTS = 10
MANAGED_BY = {"app.kubernetes.io/managed-by": "db-upgrade", "app.kubernetes.io/component": "history"}


def configmap_name(database_id: str) -> str:
    return f"db-upgrade-history-{database_id}"


class HistorySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DB_UPGRADE_", extra="ignore", populate_by_name=True)

    history_configmap: str = ""
    namespace: str = ""
    history_limit: int = Field(DEFAULT_LIMIT, ge=1, le=1000)

    @property
    def enabled(self) -> bool:
        return bool(self.history_configmap.strip() and self.namespace.strip())


def load_history_settings(**overrides) -> HistorySettings:
    try:
        return HistorySettings(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise StepError(f"DB_UPGRADE_{str(err['loc'][0]).upper()}: {err['msg']}") from None


def cluster_configured() -> bool:
    """In a pod (the service account's token), or KUBECONFIG named explicitly."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST") or os.environ.get("KUBECONFIG"))


def core_api():
    from kubernetes import client

    from steps.kube import api_client

    return client.CoreV1Api(api_client())


# -- pure: the list in the ConfigMap ---------------------------------------------------------


def decode(data: dict | None) -> list[dict]:
    """The reports in a ConfigMap's data; a damaged value reads as empty rather than failing a run."""
    try:
        reports = json.loads((data or {}).get(KEY) or "[]")
    except ValueError:
        return []
    return [r for r in reports if isinstance(r, dict)] if isinstance(reports, list) else []


def appended(reports: list[dict], report: dict, limit: int, max_bytes: int = MAX_BYTES) -> list[dict]:
    """reports + report, the run's earlier entry replaced, at most `limit`, under `max_bytes` as JSON."""
    run_id = report.get("run_id")
    out = [r for r in reports if run_id is None or r.get("run_id") != run_id] + [report]
    out = out[-limit:]
    while len(out) > 1 and len(encode(out)) > max_bytes:
        out = out[1:]
    return out


def encode(reports: list[dict]) -> str:
    return json.dumps(reports, separators=(",", ":"), sort_keys=True)


# -- the API calls ---------------------------------------------------------------------------


def _explain(exc, verb: str, name: str, namespace: str) -> StepError:
    what = f"ConfigMap {name!r} in namespace {namespace!r}"
    if exc.status == 403:
        return StepError(f"forbidden to {verb} {what}: the report step's service account needs verbs "
                         f"get, create and update on resource 'configmaps' in namespace {namespace!r}")
    if exc.status == 404:
        return StepError(f"namespace {namespace!r} not found" if verb == "create" else f"{what} not found")
    return StepError(f"cannot {verb} {what}: HTTP {exc.status} {_reason(exc)}")


def _reason(exc) -> str:
    try:
        return json.loads(exc.body).get("message") or exc.reason
    except (TypeError, ValueError, AttributeError):
        return str(exc.reason)


def read(name: str, namespace: str, api=None) -> list[dict]:
    """The stored reports, oldest first; [] when the ConfigMap does not exist yet."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    api = api or core_api()
    try:
        cm = api.read_namespaced_config_map(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return []
        raise _explain(exc, "read", name, namespace) from None
    except HTTPError as exc:
        raise StepError(f"cannot reach the Kubernetes API to read ConfigMap {name!r}: {type(exc).__name__}") from None
    return decode(cm.data)


def append(report: dict, name: str, namespace: str, limit: int = DEFAULT_LIMIT, api=None,
           sleep: Callable[[float], None] = time.sleep) -> int:
    """Append one report (optimistic concurrency, retried on 409); returns how many are stored."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    api = api or core_api()
    for attempt in range(ATTEMPTS):
        verb = "read"
        try:
            try:
                cm = api.read_namespaced_config_map(name, namespace)
            except ApiException as exc:
                if exc.status != 404:
                    raise
                cm = None
            if cm is None:
                verb = "create"
                reports = appended([], report, limit)
                body = client.V1ConfigMap(
                    metadata=client.V1ObjectMeta(name=name, namespace=namespace, labels=dict(MANAGED_BY)),
                    data={KEY: encode(reports)})
                api.create_namespaced_config_map(namespace, body)
                return len(reports)
            verb = "update"
            reports = appended(decode(cm.data), report, limit)
            cm.data = {**(cm.data or {}), KEY: encode(reports)}
            # cm.metadata.resourceVersion is what we read: a write in between makes this a 409.
            api.replace_namespaced_config_map(name, namespace, cm)
            return len(reports)
        except ApiException as exc:
            # 409: Conflict on the PUT (someone wrote since our GET), or AlreadyExists on
            # the POST (someone created it since our 404). Read again and redo the change.
            if exc.status != 409:
                raise _explain(exc, verb, name, namespace) from None
            sleep(random.uniform(0.05, 0.2) * (attempt + 1))
        except HTTPError as exc:
            raise StepError(f"cannot reach the Kubernetes API to write ConfigMap {name!r}: "
                            f"{type(exc).__name__}") from None
    raise StepError(f"ConfigMap {name!r} in namespace {namespace!r} kept changing under us "
                    f"({ATTEMPTS} conflicts in a row): the report was not stored")


def store(report: dict[str, Any], log: Callable[[str], None]) -> bool:
    """The report step's append: never fails the step (the report is in its outputs anyway)."""
    try:
        hs = load_history_settings()
    except StepError as exc:
        log(f"report: history not stored: {exc}")
        return False
    if not hs.enabled:
        log("report: history not stored (DB_UPGRADE_HISTORY_CONFIGMAP or DB_UPGRADE_NAMESPACE is not set)")
        return False
    if not cluster_configured():
        log("report: history not stored (no cluster: not in a pod, and KUBECONFIG is not set)")
        return False
    try:
        count = append(report, hs.history_configmap, hs.namespace, hs.history_limit)
    except StepError as exc:
        log(f"report: history not stored: {exc}")
        return False
    log(f"report: stored in ConfigMap {hs.namespace}/{hs.history_configmap} ({count} run(s) kept, "
        f"at most {hs.history_limit})")
    return True
