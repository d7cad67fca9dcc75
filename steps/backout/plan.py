"""The back-out window's pure logic: verdicts of check(), the status, the deadline,
the switch back's destination, the rollback's report. No database here."""

from __future__ import annotations

from steps.log import duration

import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from steps.pg import pretty_bytes

# -- check(): verdicts (facts in, (ok, text) out) ---------------------------------------------------

def judge_engine(engine: str) -> tuple[bool, str]:
    if engine == "native":
        return True, "back-out: the native engine (reverse logical replication) is in use"
    return False, (f"back-out needs the native engine (DB_UPGRADE_ENGINE=native), not {engine}: turn the back-out "
                   "window off or use the native engine")


def judge_old_subscriber(major: int, name: str, superuser: bool, create_role: bool) -> tuple[bool, str]:
    """The reverse subscription is created on the OLD server by the migration role."""
    if superuser:
        return True, f"back-out: role {name!r} is a superuser on the old server: it may create the reverse subscription"
    if major < 16:
        return False, (f"back-out: on PostgreSQL {major} only a superuser may create a subscription, and the "
                       f"back-out window subscribes the OLD database to the new one: connect to the source as a "
                       f"superuser (the apply then runs as it, unaffected by the readonly SQL), or turn the back-out "
                       f"window off")
    if not create_role:
        return False, (f"back-out: role {name!r} may not create a subscription on the old server: GRANT "
                       f"pg_create_subscription TO it, or connect as a superuser")
    return True, f"back-out: role {name!r} may create the reverse subscription (pg_create_subscription)"


def judge_old_workers(max_apply: int, used: int) -> tuple[bool, str]:
    if max_apply - used >= 1:
        return True, (f"back-out: {used} of {max_apply} logical replication workers in use on the old server "
                      "(the reverse subscription needs 1)")
    return False, (f"back-out: max_logical_replication_workers = {max_apply} on the old server with {used} in use: "
                   "the reverse subscription needs 1; raise it (restart)")


def judge_new_server(wal_level: str, max_slots: int, used_slots: int, max_senders: int, used_senders: int,
                     keep_size: str) -> list[tuple[bool, str]]:
    out = []
    if wal_level != "logical":
        out.append((False, f"back-out: wal_level = {wal_level} on the NEW server: the reverse slot needs "
                           "wal_level = logical there (restart), or turn the back-out window off"))
    if max_slots - used_slots < 1:
        out.append((False, f"back-out: no free replication slot on the new server ({used_slots} of {max_slots} "
                           "in use): raise max_replication_slots there (restart)"))
    if max_senders - used_senders < 1:
        out.append((False, f"back-out: no free WAL sender on the new server ({used_senders} of {max_senders} in "
                           "use): raise max_wal_senders there (restart)"))
    if not out:
        out.append((True, f"back-out: new server wal_level = logical, {used_slots} of {max_slots} slots and "
                          f"{used_senders} of {max_senders} WAL senders in use (the window needs 1 of each)"))
        if keep_size.strip() == "-1":
            out.append((True, "back-out: note: max_slot_wal_keep_size = -1 on the new server: only the window's "
                              "deadline bounds the WAL the reverse slot keeps; a limit there is a second guard"))
    return out


def judge_new_role(name: str, superuser: bool, replication: bool, unusable_owners: list[str]) -> list[tuple[bool, str]]:
    """The migration role on the NEW server creates the slot (REPLICATION) and publishes
    the tables (their owner's privileges; the copy keeps the source's owners)."""
    out = []
    if not (superuser or replication):
        out.append((False, f"back-out: role {name!r} on the new server can create no replication slot: ALTER ROLE "
                           f"{name} REPLICATION there, or connect as a superuser"))
    if not superuser and unusable_owners:
        out.append((False, f"back-out: role {name!r} cannot act as {', '.join(map(repr, unusable_owners))} on the "
                           f"new server, who own application tables, so it cannot publish them: GRANT "
                           f"{', '.join(unusable_owners)} TO {name} there"))
    if not out:
        out.append((True, f"back-out: role {name!r} may create the reverse slot and publication on the new database"))
    return out


def judge_test_subscription(error: str | None, uri_var: str) -> tuple[bool, str]:
    """What the OLD server's test connection to the NEW one says (`error` already scrubbed)."""
    if error is None:
        return True, (f"back-out: the old server connects to the new one with {uri_var} (a test subscription "
                      "connected; rolled back, nothing left)")
    low = error.lower()
    if "replication" in low and ("role" in low or "attribute" in low or "wal sender" in low):
        return False, (f"back-out: the old server reaches the new one with {uri_var}, but the role it logs in as "
                       "lacks REPLICATION on the NEW server: ALTER ROLE ... REPLICATION there")
    if "statement timeout" in low:
        return False, (f"back-out: the old server did not reach the new one within the test's timeout with "
                       f"{uri_var}: a firewall or route drops it; the URI must work from the old server's network")
    return False, (f"back-out: the old server cannot connect to the new one with {uri_var} ({error}): set "
                   "DB_UPGRADE_BACKOUT_PGURI to the address the OLD server reaches the new one by; pg_hba.conf on "
                   "the new server must allow it; keep the password in a passfile on the old server, not in the URI "
                   "(it is stored in pg_subscription there)")


# -- the deadline, and the decision --------------------------------------------------------------------

def deadline(started_at: float, window_seconds: float) -> float:
    return round(started_at + window_seconds, 3)


def time_left(deadline_at: float | None, now: float | None = None) -> float | None:
    if deadline_at is None:
        return None
    return max(0.0, deadline_at - (time.time() if now is None else now))


from steps.suspend import decided_by_timeout, parse_time  # noqa: E402,F401  (the rule is shared with the cutover)


# -- the switch back ------------------------------------------------------------------------------------

def switch_back_overrides(entry: dict[str, str], database: str) -> dict:
    """DB_UPGRADE_PGBOUNCER_TARGET_* for the switch back: the old database's entry as it
    was in PgBouncer's include file before the cutover (a missing dbname is the entry's name)."""
    host = entry.get("host")
    if not host:
        raise ValueError(f"the entry of {database} before the cutover had no host (a Unix socket default): "
                         "the switch back cannot repoint to it")
    return {"target_host": host, "target_port": int(entry.get("port") or 5432),
            "target_dbname": entry.get("dbname") or database, "target_user": entry.get("user") or ""}


# -- status ---------------------------------------------------------------------------------------------

@dataclass
class BackoutStatus:
    phase: str  # off | prepared | open | rolled back | ended
    deadline_at: float | None = None
    time_left_seconds: float | None = None
    lag_bytes: int | None = None  # new database WAL the old one has not confirmed
    retained_bytes: int | None = None  # new database WAL the reverse slot keeps
    wal_status: str | None = None  # pg_replication_slots.wal_status (reserved, extended, unreserved, lost)
    applying: bool | None = None  # the old database's apply worker is running
    apply_errors: int | None = None
    problems: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        if self.phase in ("off", "ended", "rolled back"):
            return [f"back-out: {self.phase}"]
        out = [f"back-out: {self.phase}"
               + (f", {duration(self.time_left_seconds)} left (until "
                  f"{datetime.fromtimestamp(self.deadline_at, tz=timezone.utc):%Y-%m-%d %H:%M:%S} UTC, then end)"
                  if self.deadline_at is not None and self.time_left_seconds is not None else "")]
        if self.lag_bytes is not None:
            out.append(f"back-out: the old database is {pretty_bytes(self.lag_bytes)} behind the new one; the reverse "
                       f"slot keeps {pretty_bytes(self.retained_bytes or 0)} of WAL on the new server"
                       + (f" (wal_status {self.wal_status})" if self.wal_status and self.wal_status != "reserved" else ""))
        if self.phase == "open" and self.applying is False:
            out.append("back-out: THE OLD DATABASE'S APPLY WORKER IS NOT RUNNING: the reverse stream does not move; "
                       "its cause is in the old server's log")
        if self.apply_errors:
            out.append(f"back-out: the reverse apply failed {self.apply_errors} time(s) (it retries; the cause is in "
                       "the old server's log)")
        out += [f"back-out: PROBLEM {p}" for p in self.problems]
        return out

    def as_dict(self) -> dict:
        return asdict(self)


# -- the rollback's report -------------------------------------------------------------------------------

def writes_total(changes: dict[str, int]) -> int:
    return sum(changes.values())


def report(status: str, verification: str, writes: dict[str, int], downtime: float | None,
           timings: dict[str, float]) -> dict:
    """What rollback() returns (the rehearsal prints it as `rollback: {...}`)."""
    return {"status": status, "verification": verification, "writes_after_cutover": writes_total(writes),
            "writes_after_cutover_by_table": dict(writes), "write_downtime_seconds": downtime,
            "timings": {k: round(v, 3) for k, v in timings.items()}}
