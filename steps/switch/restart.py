"""restart: `kubectl rollout restart` the application deployments, then wait for them
exactly as `kubectl rollout status` decides, so traffic is on the new connections.

Every deployment is read before any is patched: a missing name or a missing
permission stops the step before half of the applications have restarted.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from steps.errors import StepError
from steps.log import log
from steps.switch.base import Switch

RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"


class RestartSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DB_UPGRADE_RESTART_", extra="ignore", populate_by_name=True)

    namespace: str = ""
    deployments: str = ""  # comma-separated names
    selector: str = ""
    timeout: float = Field(600, gt=0)
    poll_interval: float = Field(2.0, gt=0)
    outputs: Path | None = Field(None, validation_alias=AliasChoices("DB_UPGRADE_OUTPUTS", "outputs"))
    # Unix seconds written by freeze; empty when no freeze ran.
    frozen_at: float | None = Field(None, validation_alias=AliasChoices("DB_UPGRADE_FROZEN_AT", "frozen_at"))

    @field_validator("frozen_at", mode="before")
    @classmethod
    def _empty_is_none(cls, value):
        return None if isinstance(value, str) and not value.strip() else value

    def names(self) -> list[str]:
        return [n.strip() for n in self.deployments.split(",") if n.strip()]

    def write_output(self, name: str, value: object) -> None:
        if self.outputs is not None:
            self.outputs.mkdir(parents=True, exist_ok=True)
            (self.outputs / name).write_text(f"{value}\n")


def load_restart_settings(**overrides) -> RestartSettings:
    try:
        s = RestartSettings(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise StepError(f"restart settings: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    if not s.namespace:
        raise StepError("DB_UPGRADE_RESTART_NAMESPACE is not set: the namespace of the deployments to restart")
    if s.names() and s.selector.strip():
        raise StepError("set DB_UPGRADE_RESTART_DEPLOYMENTS or DB_UPGRADE_RESTART_SELECTOR, not both")
    if not s.names() and not s.selector.strip():
        raise StepError(
            "no deployment to restart: DB_UPGRADE_RESTART_DEPLOYMENTS (comma-separated names) "
            "and DB_UPGRADE_RESTART_SELECTOR are both empty"
        )
    return s


def _apps_api():
    from kubernetes import client

    from steps.kube import api_client

    return client.AppsV1Api(api_client())


def _call(verb: str, namespace: str, name: str | None, fn, *args, **kwargs):
    """Runs one API call; turns its failure into one line an operator can act on."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    what = f"deployment {name!r} in namespace {namespace!r}" if name else f"deployments in namespace {namespace!r}"
    try:
        return fn(*args, **kwargs)
    except ApiException as exc:
        if exc.status == 404:
            raise StepError(f"{what} not found") from None
        if exc.status == 403:
            raise StepError(
                f"forbidden to {verb} {what}: the workflow's service account needs "
                f"verb '{verb}' on resource 'deployments' (apiGroup apps) in namespace {namespace!r}"
            ) from None
        raise StepError(f"cannot {verb} {what}: HTTP {exc.status} {exc.reason}") from None
    except HTTPError as exc:
        raise StepError(f"cannot reach the Kubernetes API to {verb} {what}: {type(exc).__name__}") from None


def rollout_status(dep) -> tuple[bool, str]:
    """(done, message) exactly as `kubectl rollout status` decides for a Deployment."""
    name = dep.metadata.name
    status = dep.status
    if (dep.metadata.generation or 0) > (status.observed_generation or 0):
        return False, f"{name}: waiting for the deployment spec update to be observed"
    for cond in status.conditions or []:
        if cond.type == "Progressing" and cond.reason == "ProgressDeadlineExceeded":
            raise StepError(f"deployment {name!r} exceeded its progress deadline: {cond.message}")
    updated = status.updated_replicas or 0
    replicas = status.replicas or 0
    available = status.available_replicas or 0
    wanted = dep.spec.replicas
    if wanted is not None and updated < wanted:
        return False, f"{name}: {updated} of {wanted} new replicas updated"
    if replicas > updated:
        return False, f"{name}: {replicas - updated} old replicas pending termination"
    if available < updated:
        return False, f"{name}: {available} of {updated} updated replicas available"
    return True, f"{name}: successfully rolled out"


def _targets(api, s: RestartSettings) -> list[str]:
    ns = s.namespace
    if s.selector.strip():
        found = _call("list", ns, None, api.list_namespaced_deployment, ns, label_selector=s.selector)
        names = sorted(d.metadata.name for d in found.items)
        if not names:
            raise StepError(f"no deployment in namespace {ns!r} matches selector {s.selector!r}")
        return names
    for name in s.names():
        _call("get", ns, name, api.read_namespaced_deployment, name, ns)
    return s.names()


def restart(s: RestartSettings, api=None) -> list[str]:
    """Restarts and waits; returns the names of the restarted deployments."""
    api = api or _apps_api()
    ns = s.namespace
    names = _targets(api, s)
    log(f"restart: {len(names)} deployment(s) in namespace {ns}: {', '.join(names)}")
    # From here on the applications move: the exit handler must no longer unfreeze the source.
    s.write_output("restart-started", f"{time.time():.3f}")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: stamp}}}}}
    for name in names:
        # A dict body is sent as a strategic merge patch, as `kubectl rollout restart` does.
        _call("patch", ns, name, api.patch_namespaced_deployment, name, ns, body)
        log(f"restart: {name}: restartedAt={stamp}")

    deadline = time.monotonic() + s.timeout
    pending = list(names)
    last: dict[str, str] = {}
    while True:
        for name in list(pending):
            done, message = rollout_status(_call("get", ns, name, api.read_namespaced_deployment, name, ns))
            if message != last.get(name):
                log(f"restart: {message}")
                last[name] = message
            if done:
                pending.remove(name)
        if not pending:
            break
        if time.monotonic() >= deadline:
            raise StepError(
                f"rollout not complete after {s.timeout:g}s in namespace {ns!r}: "
                + "; ".join(last[n] for n in pending)
            )
        time.sleep(s.poll_interval)

    if s.frozen_at is not None:
        downtime = time.time() - s.frozen_at
        s.write_output("write-downtime-seconds", f"{downtime:.1f}")
        log(f"restart: all rollouts complete; writes were frozen for {downtime:.1f}s")
    else:
        log("restart: all rollouts complete")
    return names


def command() -> None:
    """Restart the application deployments and wait for the rollouts (configuration from the environment)."""
    restart(load_restart_settings())


class RestartSwitch(Switch):
    """The applications move by restarting: they read the target's address from their
    own configuration when they start. Nothing is held: writes fail from the freeze
    until each new pod is ready."""

    name = "restart"

    def __init__(self, s: RestartSettings, api=None):
        self.s = s
        self._api = api

    def api(self):
        if self._api is None:
            self._api = _apps_api()
        return self._api

    def describe(self) -> str:
        which = f"selector {self.s.selector!r}" if self.s.selector.strip() else ", ".join(self.s.names())
        return (f"restart: kubectl rollout restart the deployments ({which}) in namespace {self.s.namespace} "
                f"and wait for them (at most {self.s.timeout:g}s)")

    def check(self) -> None:
        names = _targets(self.api(), self.s)
        log(f"restart: will restart {len(names)} deployment(s) in namespace {self.s.namespace}: {', '.join(names)}")

    def hold(self) -> None:
        pass  # nothing to hold: the applications keep their connections until their restart

    def release(self) -> None:
        pass  # the undo of a hold that held nothing

    def switch(self) -> None:
        restart(self.s, self.api())
