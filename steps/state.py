"""The run's shared state: one typed record, kept in the source database.

Every key a step writes for another step is a field of `RunState`, here and
nowhere else. The record lives in `db_upgrade.run_state` on the source, one
row per key and run (`DB_UPGRADE_RUN_ID`, the workflow's name), so that:

- it outlives every pod and needs no volume: `argo retry` keeps the workflow
  name, so a retried step finds what the run did so far;
- two steps writing different keys at the same time never overwrite each other;
- the exit handler decides whether to restore writes from the very database it
  would unfreeze (frozen, and the switch not begun), not from an Argo output a
  failed pod may never have published.

Our connections are read-write even while the application's writes are frozen
(steps.pg.connect sets it), so the record can be written during the cutover.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any

import psycopg
from pydantic import BaseModel, ConfigDict, ValidationError

from steps.errors import StepError

SCHEMA = "db_upgrade"
TABLE = "run_state"
DDL = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
CREATE TABLE IF NOT EXISTS {SCHEMA}.{TABLE} (
    run_id text NOT NULL,
    key text NOT NULL,
    value jsonb,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (run_id, key)
);
"""


class RunState(BaseModel):
    """What the steps of one run tell each other. Times are unix seconds."""

    model_config = ConfigDict(extra="ignore")  # a key a newer version wrote: not ours to judge

    started_at: float | None = None  # preflight began the run
    engine: str | None = None  # the change engine that copied and streams (native | pgcopydb-follow)
    # grant-replication
    granted_replication: bool | None = None
    # follow
    follow_started_at: float | None = None
    follow_attempt_at: float | None = None  # steps/follow.py: each start of the follow step (a retry too)
    copy_done_at: float | None = None
    copy_bytes_total: int | None = None
    copy_bytes_done: int | None = None  # pgcopydb-follow: bytes of the tables copied so far (for pods without its volume)
    copy_restarts: list[dict] = []
    follow_failed_at: float | None = None
    follow_error: str | None = None
    follow_done_at: float | None = None
    follow_alive_at: float | None = None  # the follow step's pulse (steps/follow.py): an OOM kill records no failure
    stream_started_at: float | None = None  # the change stream runs (native: the subscription exists)
    new_objects: list[str] = []  # tables or sequences created on the source after the copy began (DDL)
    fenced_roles: dict[str, bool] | None = None  # steps/fence.py: role -> could it log in before the fence
    # wait-caught-up
    caught_up_at: float | None = None
    lag_at_catchup: int | None = None
    # verification before the freeze (steps/verify)
    verify_prepared_at: float | None = None
    verify_prepare_seconds: float | None = None
    verify_skipped_preparation: bool | None = None  # the operator chose not to wait for it
    verify_prepare_failed_at: float | None = None
    verify_prepare_error: str | None = None
    verify_rounds: int | None = None  # steps/verify: rounds run since the preparation (reconcile, the settle)
    verify_last_round_at: float | None = None
    verify_last_round: dict | None = None  # steps.verify.RoundResult as a dict
    # cutover
    cutover_started_at: float | None = None
    settle_seconds: float | None = None
    frozen_at: float | None = None
    unfrozen_at: float | None = None
    end_position: str | None = None  # the engine's end: an LSN (pgcopydb endpos) or a barrier id
    end_position_set_at: float | None = None
    drained_at: float | None = None
    sequences_synced_at: float | None = None
    verified_at: float | None = None
    verify: dict | None = None  # steps.verify.VerifyReport as a dict
    verify_seconds: float | None = None
    verify_keys_rechecked: int | None = None  # steps/verify: changed rows the final check compared by key
    verify_whole_tables: list[str] = []  # steps/verify: tables the final check re-read whole
    switch_started_at: float | None = None  # from here on the source must never be unfrozen
    switched_at: float | None = None
    write_downtime_seconds: float | None = None  # freeze committed -> switch done
    cutover_failed_at: float | None = None
    predicted_write_downtime_seconds: float | None = None  # rehearsal: what a cutover now would freeze
    late_writes: dict[str, int] | None = None  # steps/late_writes.py: table -> row changes after the freeze
    cutover_error: str | None = None
    finished_at: float | None = None
    # the back-out window (steps/backout/): prepare() in the cutover's frozen window, start() after the switch
    backout_prepared_at: float | None = None  # reverse publication and slot exist on the new database
    backout_prepare_seconds: float | None = None  # what prepare() added to the cutover's write-downtime
    backout_slot_lsn: str | None = None  # where the reverse slot starts on the new database (before its first write)
    backout_counters: dict[str, int] | None = None  # the new database's write counters at prepare (writes_after_cutover)
    backout_switch_back: dict[str, str] | None = None  # pgbouncer: the entry of the old database before the cutover
    backout_started_at: float | None = None  # the old database's subscription replays the new one's writes
    backout_deadline_at: float | None = None  # end() runs by then (the backout suspend's timeout)
    backout_error: str | None = None  # why start() could not open the window (it ended it)
    backout_ended_at: float | None = None  # end(): nothing of the back-out left on either side
    # rollback (steps/backout/): the cutover in reverse
    rollback_started_at: float | None = None
    rollback_frozen_at: float | None = None  # the readonly SQL committed on the NEW database
    rollback_unfrozen_at: float | None = None  # writes restored on the new database (a failed rollback)
    rollback_drained_at: float | None = None  # the old database shows the rollback's barrier row
    rollback_verify: dict | None = None  # steps.verify.VerifyReport (new vs old) as a dict
    rollback_switch_started_at: float | None = None  # the old database unfrozen: from here the new one stays frozen
    rollback_switched_at: float | None = None
    rollback_write_downtime_seconds: float | None = None  # new database frozen -> applications back on the old one
    rollback_writes_after_cutover: dict[str, int] | None = None  # table -> row changes made on the new database
    rollback_failed_at: float | None = None
    rollback_error: str | None = None
    rolled_back_at: float | None = None

    def follow_pulse_age(self, fresh: float) -> float | None:
        """Seconds since the follow step's pulse while it runs (started, no end recorded since,
        pulsed within `fresh` seconds), else None: an OOM-killed pod records no end, so a stale
        pulse counts as stopped."""
        if not self.follow_attempt_at or not self.follow_alive_at:
            return None
        if max(self.follow_done_at or 0, self.follow_failed_at or 0) >= self.follow_attempt_at:
            return None
        age = time.time() - self.follow_alive_at
        return age if age < fresh else None


FIELDS = frozenset(RunState.model_fields)


def now() -> float:
    return round(time.time(), 3)


# One connection per source for the whole process, reused: the cutover records a
# few keys inside the frozen window, and a new connection costs 10-20 ms each.
_CACHE: "OrderedDict[str, psycopg.Connection]" = OrderedDict()
_LOCK = threading.RLock()
_CACHE_SIZE = 4  # tests touch many databases in one process: never hold many idle connections


@contextmanager
def _connect(s, purpose: str):
    """The process's connection to this source, under a lock (threads share it).
    A connection that broke is dropped, and the caller retries once (_retrying)."""
    from steps.pg import open_connection

    uri = s.source()
    with _LOCK:
        conn = _CACHE.pop(uri, None)
        if conn is None or conn.closed or conn.broken:
            conn = open_connection(uri, "source", purpose=purpose)
        _CACHE[uri] = conn
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)[1].close()
        try:
            yield conn
        except psycopg.OperationalError:
            _CACHE.pop(uri, None)
            conn.close()
            raise


def _retrying(fn):
    """Run fn once more on a fresh connection if the cached one had died (a server restart)."""
    try:
        return fn()
    except psycopg.OperationalError:
        return fn()


def record(s, **values: Any) -> None:
    """Set these keys of the run's record (upsert, one row each)."""
    unknown = sorted(set(values) - FIELDS)
    if unknown:
        raise TypeError(f"not RunState fields: {', '.join(unknown)}")
    try:
        RunState.model_validate(values)
    except ValidationError as exc:
        raise TypeError(f"RunState: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from None
    rows = [(s.run_id, k, json.dumps(v)) for k, v in values.items()]

    def upsert() -> None:
        with _connect(s, "state") as conn:
            for attempt in range(3):
                try:
                    with conn.transaction():
                        conn.cursor().executemany(
                            f"INSERT INTO {SCHEMA}.{TABLE} (run_id, key, value) VALUES (%s, %s, %s::jsonb) "
                            "ON CONFLICT (run_id, key) DO UPDATE SET value = EXCLUDED.value, "
                            "updated_at = clock_timestamp()", rows)
                    return
                except psycopg.errors.UndefinedTable:
                    _create(conn)
                except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateObject):
                    continue  # another step created the table at the same moment
            raise StepError(f"cannot record the run state in {SCHEMA}.{TABLE} on the source")

    _retrying(upsert)


def _create(conn) -> None:
    try:
        with conn.transaction():
            conn.execute(DDL)
    except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateObject):
        pass


def load(s) -> RunState:
    """The run's record; an empty one when nothing was recorded yet."""
    def read() -> RunState:
        with _connect(s, "state") as conn:
            return load_from(conn, s.run_id)

    return _retrying(read)


def load_from(conn, run_id: str) -> RunState:
    try:
        rows = conn.execute(f"SELECT key, value FROM {SCHEMA}.{TABLE} WHERE run_id = %s", (run_id,)).fetchall()
    except psycopg.errors.UndefinedTable:
        return RunState()
    return RunState.model_validate({k: v for k, v in rows})


def try_load(s) -> RunState | None:
    """For pollers and reports: None when the source cannot be read right now."""
    try:
        return load(s)
    except (StepError, psycopg.Error):
        return None


def begin(s) -> None:
    """A new run: forget whatever an earlier attempt with this run id recorded."""
    with _connect(s, "state") as conn:
        try:
            conn.execute(f"DELETE FROM {SCHEMA}.{TABLE} WHERE run_id = %s", (s.run_id,))
        except psycopg.errors.UndefinedTable:
            pass
    record(s, started_at=now())


def other_runs(s) -> list[str]:
    """Run ids with a record on the source other than this one (an earlier run not cleaned up)."""
    with _connect(s, "state") as conn:
        try:
            return [r[0] for r in conn.execute(
                f"SELECT DISTINCT run_id FROM {SCHEMA}.{TABLE} WHERE run_id <> %s ORDER BY 1", (s.run_id,))]
        except psycopg.errors.UndefinedTable:
            return []


def forget(s) -> None:
    """The run is over: remove its record, and the table when no run is left in it."""
    with _connect(s, "state") as conn:
        try:
            with conn.transaction():
                conn.execute(f"DELETE FROM {SCHEMA}.{TABLE} WHERE run_id = %s", (s.run_id,))
                if not conn.execute(f"SELECT 1 FROM {SCHEMA}.{TABLE} LIMIT 1").fetchone():
                    conn.execute(f"DROP TABLE {SCHEMA}.{TABLE}")
                    # The schema goes too when nothing else of ours is left in it.
                    if not conn.execute("SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                                        "WHERE n.nspname = %s LIMIT 1", (SCHEMA,)).fetchone():
                        conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA}")
        except psycopg.errors.UndefinedTable:
            pass
