"""Per-environment configuration of the upgrade WorkflowTemplate: one YAML file each.

Only names of Secrets and keys live here, never a secret value: the model rejects
a URI that carries a password. Every error is one line naming the file and the field.
"""

from __future__ import annotations

import importlib.metadata
from enum import Enum
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import parse_qs, urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# A DNS-1123 label: the name ends up in resource names, labels and the mutex name.
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
Name = Annotated[str, Field(pattern=_DNS_LABEL, max_length=40)]
Label = Annotated[str, Field(pattern=_DNS_LABEL, max_length=63)]
K8sName = Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", max_length=253)]
Seconds = Annotated[int, Field(gt=0)]


class ConfigError(Exception):
    """A configuration problem, already phrased as one line for the operator."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def package_version() -> str:
    try:
        return importlib.metadata.version("db-upgrade")
    except importlib.metadata.PackageNotFoundError:  # running from a bare checkout
        return "0.0.0"


class Image(_Model):
    repository: str = Field(min_length=1)
    # Template and image are versioned together: the default is the package version.
    tag: str = Field(default_factory=package_version, min_length=1)

    @property
    def ref(self) -> str:
        return f"{self.repository}:{self.tag}"


class Endpoint(_Model):
    """Where one connection URI comes from: a Secret key, or a password-free URI
    (typically `postgres://?service=NAME` with the mounted service file)."""

    secret: K8sName | None = None
    key: str | None = None
    uri: str | None = None

    @field_validator("uri")
    @classmethod
    def _no_password(cls, uri: str | None) -> str | None:
        if uri is None:
            return uri
        parts = urlsplit(uri)
        if parts.scheme not in ("postgres", "postgresql"):
            raise ValueError("must be a postgres:// URI")
        if parts.password or "password" in parse_qs(parts.query):
            raise ValueError("must not contain a password: use a Secret key or the service file")
        return uri

    @model_validator(mode="after")
    def _one_source(self) -> Endpoint:
        if self.uri is not None:
            if self.secret or self.key:
                raise ValueError("give uri, or secret and key, not both")
        elif not (self.secret and self.key):
            raise ValueError("give uri, or secret and key")
        return self


class ServiceFile(_Model):
    """A pg_service.conf in a Secret, mounted and pointed at by PGSERVICEFILE."""

    secret: K8sName
    key: str = "pg_service.conf"


class Connections(_Model):
    source: Endpoint
    target: Endpoint
    # What the target SERVER uses to reach the source (the native engine's
    # subscription; stored in the target's pg_subscription). Default: source.
    subscription: Endpoint | None = None
    service_file: ServiceFile | None = None


class Restart(_Model):
    namespace: Name | None = None  # default: the workflow's namespace
    deployments: list[K8sName] | None = None
    selector: str | None = None
    timeout_seconds: Seconds = 600

    @model_validator(mode="after")
    def _names_or_selector(self) -> Restart:
        if self.deployments is not None and self.selector is not None:
            raise ValueError("give deployments or selector, not both")
        if self.deployments is None and self.selector is None:
            raise ValueError("give deployments or selector")
        if self.deployments is not None and not self.deployments:
            raise ValueError("deployments is empty: name at least one deployment")
        if self.selector is not None and not self.selector.strip():
            raise ValueError("selector is empty")
        return self


class PgBouncerTarget(_Model):
    """The new database as PgBouncer reaches it; no password (PgBouncer's auth_file or auth_query)."""

    host: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:/%-]{1,255}$")]
    port: Annotated[int, Field(ge=1, le=65535)] = 5432
    dbname: Annotated[str, Field(min_length=1, max_length=63)]
    user: Annotated[str, Field(min_length=1, max_length=63)] | None = None


class PgBouncerVolume(_Model):
    claim_name: K8sName  # a PVC in the workflow's namespace, mounted at dirname(include_file)


class PgBouncerSwitch(_Model):
    admin_uri: Endpoint  # a Secret key: the admin console URI holds a password
    database: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,63}$")]
    include_file: Annotated[str, Field(pattern=r"^/\S+$")]  # absolute, in the cutover pod
    volume: PgBouncerVolume
    target: PgBouncerTarget
    pause_timeout_seconds: Seconds = 10

    @field_validator("admin_uri")
    @classmethod
    def _secret_only(cls, v: Endpoint) -> Endpoint:
        if v.uri is not None:
            raise ValueError("must be a Secret key (secret and key): the admin URI holds a password")
        return v


class Switch(_Model):
    """How the applications move at the cutover (steps/switch/, docs/switch.md)."""

    strategy: Literal["none", "restart", "pgbouncer"] = "restart"
    pgbouncer: PgBouncerSwitch | None = None


class Backout(_Model):
    """The back-out window (steps/backout/, native engine): after the cutover the old
    database replays the new one's writes, so that a rollback loses nothing."""

    enabled: bool = False
    window_seconds: Seconds = 2 * 24 * 3600
    # The new database as the OLD server reaches it (stored in its pg_subscription).
    # Default: the target connection.
    connection: Endpoint | None = None


class AccessMode(str, Enum):
    rwo = "ReadWriteOnce"
    rwx = "ReadWriteMany"


class Volume(_Model):
    size: Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$")] = "20Gi"
    storage_class: K8sName | None = None
    access_mode: AccessMode = AccessMode.rwo


class Pgcopydb(_Model):
    plugin: str = "test_decoding"
    table_jobs: Annotated[int, Field(ge=1)] = 4
    index_jobs: Annotated[int, Field(ge=1)] = 4


class Timeouts(_Model):
    # From follow's start to caught up: includes the initial copy.
    catch_up_seconds: Seconds = 86400
    approval_seconds: Seconds = 4 * 3600
    freeze_seconds: Seconds = 120
    # Inside the window: the drain to the end position.
    drain_seconds: Seconds = 120
    # Writes allowed: how long the cutover waits for the verify preparation.
    verify_prepare_seconds: Seconds = 6 * 3600


Quantity = Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")]


class ResourceSpec(_Model):
    """One container's requests and limits. CPU is requested, never limited
    (a throttled cutover is a longer frozen window)."""

    cpu: Quantity
    memory: Quantity
    memory_limit: Quantity


class Resources(_Model):
    """Per template, measured: the bench's peak RSS of the step process was 52-85 MB,
    of pgcopydb's processes 175-212 MB during a copy (README, Performance)."""

    default: ResourceSpec = ResourceSpec(cpu="100m", memory="128Mi", memory_limit="256Mi")
    follow: ResourceSpec = ResourceSpec(cpu="1", memory="512Mi", memory_limit="1Gi")
    verify_prepare: ResourceSpec = ResourceSpec(cpu="250m", memory="256Mi", memory_limit="512Mi")
    cutover: ResourceSpec = ResourceSpec(cpu="500m", memory="256Mi", memory_limit="512Mi")


class Rehearsal(_Model):
    scratch_database: Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_]*$", max_length=63)] = "db_upgrade_scratch"
    # Read by the rehearsal CronWorkflow builder (workflows/rehearsal.py); None = its defaults.
    schedule: Annotated[str, Field(min_length=1)] | None = None
    timezone: str | None = None
    starting_deadline_seconds: Seconds | None = None
    suspend: bool = False


class Engine(str, Enum):
    native = "native"
    pgcopydb_follow = "pgcopydb-follow"


class Config(_Model):
    name: Name
    database_id: Name
    namespace: Name
    service_account: K8sName = "db-upgrade"
    image: Image
    connections: Connections
    sql_config_map: Label  # also the volume name, hence a DNS label
    restart: Restart | None = None  # switch.strategy restart: the deployments to restart
    switch: Switch = Switch()
    # How the target is kept in sync: PostgreSQL's logical replication (native)
    # or pgcopydb's change stream (pgcopydb-follow, known data limits: README).
    engine: Engine = Engine.native
    # The roles the applications log in as: fenced on the target until the switch.
    application_roles: list[Annotated[str, Field(min_length=1, max_length=63)]] = []
    volume: Volume = Volume()
    pgcopydb: Pgcopydb = Pgcopydb()
    lag_threshold_bytes: Annotated[int, Field(ge=0)] = 1024 * 1024
    timeouts: Timeouts = Timeouts()
    follow_grace_period_seconds: Seconds = 300
    rehearsal: Rehearsal = Rehearsal()
    resources: Resources = Resources()
    backout: Backout = Backout()

    @model_validator(mode="after")
    def _switch_configured(self) -> Config:
        if self.switch.strategy == "restart" and self.restart is None:
            raise ValueError("switch.strategy restart needs the restart section (deployments or selector)")
        if self.switch.strategy == "pgbouncer" and self.switch.pgbouncer is None:
            raise ValueError("switch.strategy pgbouncer needs the switch.pgbouncer section")
        if self.backout.enabled and self.engine != Engine.native:
            raise ValueError("backout.enabled needs engine native (reverse logical replication)")
        return self

    @property
    def switch_service_account(self) -> str:
        """The cutover pod's: the only one that may move the applications."""
        return f"{self.service_account}-switch"[:253]

    @property
    def report_service_account(self) -> str:
        """The report pod's: the only one that may write the history ConfigMap."""
        return f"{self.service_account}-report"[:253]

    @property
    def history_config_map(self) -> str:
        return f"db-upgrade-history-{self.database_id}"

    @property
    def template_name(self) -> str:
        return f"db-upgrade-{self.name}"

    @property
    def mutex_name(self) -> str:
        # Upgrades and rehearsals of one source database never overlap.
        return f"db-upgrade-{self.database_id}"

    @property
    def restart_namespace(self) -> str:
        return (self.restart.namespace if self.restart else None) or self.namespace


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _describe(err: dict) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown field"
    if err["type"] == "missing":
        return "missing field"
    msg = err["msg"]
    return msg.removeprefix("Value error, ")


def load_config(path: str | Path) -> Config:
    """Reads and validates one environment file; raises ConfigError (one line)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of fields")
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        where = _loc(first["loc"]) or "(top level)"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ConfigError(f"{path}: {where}: {_describe(first)}{more}") from None


__all__ = ["Config", "ConfigError", "load_config", "package_version"]
