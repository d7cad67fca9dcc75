"""Typed step configuration, read from the environment as in the pods."""

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from steps.errors import StepError

MiB = 1024 * 1024


class StepSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DB_UPGRADE_", extra="ignore", populate_by_name=True)

    # Connection strings are secrets: SecretStr keeps them out of reprs and logs.
    source_pguri: SecretStr | None = Field(None, validation_alias=AliasChoices("PGCOPYDB_SOURCE_PGURI", "source_pguri"))
    target_pguri: SecretStr | None = Field(None, validation_alias=AliasChoices("PGCOPYDB_TARGET_PGURI", "target_pguri"))
    # What the target server uses to reach the source (native engine: the
    # subscription's CONNECTION, stored in pg_subscription). Default: the source URI.
    subscription_pguri: SecretStr | None = None
    # The key of this run's record in the source (steps/state.py): the workflow's
    # name, or another run's (the recover entrypoint, -p run-id=NAME).
    run_id: str = Field("", max_length=200)
    workflow_name: str = ""
    # How the target is kept in sync: PostgreSQL's own logical replication
    # (native), or pgcopydb's change stream (pgcopydb-follow). steps/engines/.
    engine: Literal["native", "pgcopydb-follow"] = "native"
    dir: Path | None = None
    readonly_sql: Path | None = None
    unfreeze_sql: Path | None = None
    plugin: Literal["test_decoding", "wal2json"] = "test_decoding"  # pgcopydb-follow only
    table_jobs: int = Field(4, ge=1)
    index_jobs: int = Field(4, ge=1)
    # Replication slot (and publication, subscription, origin) name on both servers.
    slot_name: str = Field("db_upgrade", pattern=r"^[a-z0-9_]{1,52}$")
    lag_threshold_bytes: int = Field(1 * MiB, ge=0)
    catchup_timeout: float = Field(6 * 3600, gt=0)
    freeze_timeout: float = Field(60, gt=0)
    # Before revoking writes, wait (writes still allowed) until the target is this
    # close: what is in flight at the freeze is what the frozen window must drain.
    settle_lag_bytes: int = Field(128 * 1024, ge=0)
    settle_timeout: float = Field(20, ge=0)
    poll_interval: float = Field(2.0, gt=0)
    # The cutover: how long the drain to the end position may take inside the
    # window, and how long to wait (writes allowed) for the verify preparation.
    drain_timeout: float = Field(120, gt=0)
    verify_prepare_timeout: float = Field(6 * 3600, gt=0)
    skip_verify_preparation: bool = False
    # The approve node's times and timeout ({{tasks.approve.startedAt}} ...): a
    # decision that was set but never resumed must not count (steps/cutover.py).
    approval_started_at: str | None = None
    approval_finished_at: str | None = None
    approval_timeout: float | None = None
    mode: Literal["upgrade", "rehearsal"] = "upgrade"
    keep_slot: bool = False
    # The roles the applications log in as: fenced on the target until the switch (steps/fence.py).
    app_roles: str = ""
    # The back-out window (steps/backout/): after the cutover the old database replays the
    # new one's writes until end-backout or the deadline, so that a rollback loses nothing.
    backout: bool = False
    backout_window_seconds: float = Field(2 * 24 * 3600, gt=0)
    # What the OLD server uses to reach the NEW one (the reverse subscription's CONNECTION,
    # stored in pg_subscription on the old side). Default: the target URI.
    backout_pguri: SecretStr | None = None
    # The backout suspend node's times ({{tasks.backout.startedAt}} ...): a rollback set but
    # resumed only by the window's timeout must not count (steps/backout/).
    backout_decision_started_at: str | None = None
    backout_decision_finished_at: str | None = None
    outputs: Path | None = None
    scratch_database: str | None = None

    @model_validator(mode="after")
    def _default_run_id(self):
        if not self.run_id.strip() or "{{" in self.run_id:
            self.run_id = self.workflow_name.strip() if self.workflow_name.strip() and "{{" not in self.workflow_name \
                else "local"
        return self

    @field_validator("approval_started_at", "approval_finished_at", "approval_timeout",
                     "backout_decision_started_at", "backout_decision_finished_at", mode="before")
    @classmethod
    def _empty_optional(cls, value):
        # The template passes Argo values that are empty (or unresolved) when there was no approval.
        return None if isinstance(value, str) and (not value.strip() or "{{" in value) else value

    def source(self) -> str:
        return _required(self.source_pguri, "PGCOPYDB_SOURCE_PGURI", "the source database URI")

    def target(self) -> str:
        """The database the upgrade writes to: in rehearsal mode, the scratch
        database on the target server (created fresh by create-scratch-target)."""
        uri = self.target_server()
        if self.mode == "rehearsal" and self.scratch_database:
            from steps.scratch import scratch_uri

            return scratch_uri(uri, self.scratch_database)
        return uri

    def subscription_source(self) -> str:
        """The source as the target server connects to it (native engine)."""
        if self.subscription_pguri is not None and self.subscription_pguri.get_secret_value().strip():
            return self.subscription_pguri.get_secret_value()
        return self.source()

    def target_server(self) -> str:
        """The configured target URI as given (for rehearsals: the maintenance database)."""
        return _required(self.target_pguri, "PGCOPYDB_TARGET_PGURI", "the target database URI")

    def workdir(self) -> Path:
        if self.dir is None:
            raise StepError("DB_UPGRADE_DIR is not set: point it at pgcopydb's work directory (the shared volume)")
        return self.dir

    def sql_file(self, which: Literal["readonly", "unfreeze"]) -> str:
        path = self.readonly_sql if which == "readonly" else self.unfreeze_sql
        var = f"DB_UPGRADE_{which.upper()}_SQL"
        if path is None:
            raise StepError(f"{var} is not set: point it at the {which} SQL file")
        try:
            text = path.read_text()
        except OSError as exc:
            raise StepError(f"{var}={path} cannot be read: {exc.strerror}") from None
        if not text.strip():
            raise StepError(f"{var}={path} is empty: it must hold the {which} SQL")
        return text

    def write_output(self, name: str, value: object) -> None:
        """Small files that Argo picks up as output parameters (shown in the UI)."""
        if self.outputs is None:
            return
        self.outputs.mkdir(parents=True, exist_ok=True)
        (self.outputs / name).write_text(f"{value}\n")


def _required(value: SecretStr | None, var: str, what: str) -> str:
    if value is None or not value.get_secret_value().strip():
        raise StepError(f"{var} is not set: it must hold {what} (a libpq URI, e.g. postgres://?service=db)")
    return value.get_secret_value()


def load_settings(**overrides: object) -> StepSettings:
    try:
        return StepSettings(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        var = field.upper() if field.upper().startswith("PGCOPYDB") else f"DB_UPGRADE_{field.upper()}"
        # Never echo the input value: it may be a connection string with a password.
        raise StepError(f"{var}: {err['msg']}") from None
