"""How the applications move to the target, from the environment (prefix DB_UPGRADE_).

DB_UPGRADE_SWITCH picks the strategy; each strategy reads its own variables:
restart: DB_UPGRADE_RESTART_* (steps/switch/restart.py), pgbouncer:
DB_UPGRADE_PGBOUNCER_* (here). Errors are one line naming the variable and never
echo a value (the admin URI holds a password).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import psycopg
from psycopg.conninfo import conninfo_to_dict
from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from steps.errors import StepError

Strategy = Literal["none", "restart", "pgbouncer", "command"]

# A [databases] key PgBouncer 1.18 reads unquoted (its ini parser has no quoting)
# and that its admin console takes double-quoted: PAUSE "orders-db".
DATABASE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,63}$")
# A host name, an IP address (v4 or v6) or a Unix socket directory.
HOST = re.compile(r"^[A-Za-z0-9_.:/%-]{1,255}$")
# PostgreSQL names are at most NAMEDATALEN-1 bytes.
NAME_BYTES = 63


class SwitchSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DB_UPGRADE_", extra="ignore")

    # none: nothing moves (the cutover ends after verify and says so);
    # restart: kubectl rollout restart the deployments; pgbouncer: PAUSE, repoint, RESUME.
    switch: Strategy = "none"


class TargetEntry(BaseModel):
    """Where PgBouncer connects once the applications are switched: the new target as
    PgBouncer reaches it. No password: PgBouncer's auth_file or auth_query logs in."""

    host: str
    port: int = Field(5432, ge=1, le=65535)
    dbname: str
    user: str | None = None  # None: keep the entry's forced user, if it has one

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        if not HOST.match(v):
            raise ValueError("must be a host name, an IP address or a socket directory (no spaces or quotes)")
        return v

    @field_validator("dbname", "user")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v or len(v.encode()) > NAME_BYTES or any(ord(c) < 32 or ord(c) == 127 for c in v):
            raise ValueError(f"must be 1 to {NAME_BYTES} bytes without control characters")
        return v

    def label(self) -> str:
        return f"{self.user + '@' if self.user else ''}{self.host}:{self.port}/{self.dbname}"

    @classmethod
    def from_uri(cls, uri: str, host: str | None = None) -> TargetEntry:
        """The entry for a libpq URI (host, port, dbname; the user is left to the
        application): for local rehearsals, where PgBouncer reaches the target as we do."""
        params = conninfo_to_dict(uri)
        return cls(host=host or params.get("host") or "localhost", port=int(params.get("port") or 5432),
                   dbname=params.get("dbname") or params.get("user") or "postgres")


class PgBouncerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DB_UPGRADE_PGBOUNCER_", extra="ignore", populate_by_name=True)

    # postgres://admin:PASSWORD@pgbouncer:6432/pgbouncer (a Secret in the cluster): a user
    # in PgBouncer's admin_users. SecretStr keeps it out of reprs and logs.
    admin_pguri: SecretStr | None = None
    # The [databases] entry the applications connect to (their dbname on PgBouncer).
    database: str | None = None
    # The file PgBouncer %includes in its [databases] section, holding that entry;
    # the cutover rewrites the entry's line in it (temp file + rename), then RELOADs.
    include_file: Path | None = None
    target_host: str | None = None
    target_port: int = Field(5432, ge=1, le=65535)
    target_dbname: str | None = None
    target_user: str | None = None
    # PAUSE waits for the transactions running through PgBouncer; past this it is
    # RESUMEd and the cutover fails before the freeze.
    pause_timeout: float = Field(10.0, gt=0, le=3600)
    connect_timeout: int = Field(10, ge=1, le=300)

    @field_validator("target_user", mode="before")
    @classmethod
    def _empty_is_none(cls, value):
        return None if isinstance(value, str) and not value.strip() else value

    def admin_uri(self) -> str:
        return self.admin_pguri.get_secret_value() if self.admin_pguri is not None else ""

    def target(self) -> TargetEntry:
        return TargetEntry(host=self.target_host or "", port=self.target_port, dbname=self.target_dbname or "",
                           user=self.target_user)


def _var(prefix: str, loc: tuple) -> str:
    return prefix + "_".join(str(p) for p in loc).upper()


def load_switch_settings(**overrides) -> SwitchSettings:
    try:
        return SwitchSettings(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise StepError(f"{_var('DB_UPGRADE_', err['loc'])}: {err['msg']}") from None


def load_pgbouncer_settings(**overrides) -> PgBouncerSettings:
    """Every DB_UPGRADE_PGBOUNCER_* variable, checked; one line naming the first wrong one."""
    prefix = "DB_UPGRADE_PGBOUNCER_"
    try:
        s = PgBouncerSettings(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise StepError(f"{_var(prefix, err['loc'])}: {err['msg']}") from None

    uri = s.admin_uri().strip()
    if not uri:
        raise StepError(f"{prefix}ADMIN_PGURI is not set: it must hold the URI of PgBouncer's admin console, "
                        "e.g. postgres://admin:PASSWORD@pgbouncer:6432/pgbouncer (from a Secret)")
    try:
        params = conninfo_to_dict(uri)
    except psycopg.ProgrammingError:
        raise StepError(f"{prefix}ADMIN_PGURI is not a valid libpq URI: expected "
                        "postgres://admin:PASSWORD@pgbouncer:6432/pgbouncer") from None
    if params.get("dbname") != "pgbouncer":
        raise StepError(f"{prefix}ADMIN_PGURI must name the database 'pgbouncer' (PgBouncer's admin console), "
                        f"not {params.get('dbname')!r}")
    if not s.database:
        raise StepError(f"{prefix}DATABASE is not set: the [databases] entry the applications connect to")
    if not DATABASE_NAME.match(s.database) or s.database == "pgbouncer":
        raise StepError(f"{prefix}DATABASE={s.database!r} is not a PgBouncer database name this switch can "
                        "repoint: 1-63 of A-Z a-z 0-9 _ . - and not 'pgbouncer'")
    if s.include_file is None:
        raise StepError(f"{prefix}INCLUDE_FILE is not set: the file PgBouncer %includes in [databases], "
                        f"holding the entry for {s.database}")
    if not s.include_file.is_absolute():
        raise StepError(f"{prefix}INCLUDE_FILE={s.include_file} must be an absolute path")
    for field, what in (("target_host", "the new target's host as PgBouncer reaches it"),
                        ("target_dbname", "the database on the new target")):
        if not getattr(s, field):
            raise StepError(f"{_var(prefix, (field,))} is not set: {what}")
    try:
        s.target()
    except ValidationError as exc:
        err = exc.errors()[0]
        raise StepError(f"{_var(prefix + 'TARGET_', err['loc'])}: {err['msg'].removeprefix('Value error, ')}") from None
    return s
