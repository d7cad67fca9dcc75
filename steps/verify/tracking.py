"""The change tracking verify installs, and its removal, side by side.

Source: a publication of our own for the decodable application tables and a
pgoutput slot, created on a replication connection so that its starting point
comes with an exported snapshot. Target: db_upgrade.verify_* tables and ALWAYS
triggers recording the key of every row the apply changes (a keyless table
kept by checksum: the signed hashes of the rows it gained and lost).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
from psycopg import sql

from steps.errors import StepError
from steps.log import log
from steps.pg import connect, fmt_lsn, lsn, read_write_options, scrub
from steps.settings import StepSettings
from steps.verify import plan
from steps.verify import sql as q

LOCK_TIMEOUT = "2s"
LOCK_ATTEMPTS = 30


def names(s: StepSettings) -> tuple[str, str]:
    """(slot, publication) of verify's tracking on the source."""
    name = f"{s.slot_name}_verify"[:63]
    return name, name


def options(uri: str) -> str:
    return f"{read_write_options(uri)} {q.normalised_options()}"


def source(s: StepSettings, autocommit: bool = True):
    return connect(s.source(), "source", autocommit=autocommit, purpose="verify", options=options(s.source()))


def target(s: StepSettings, autocommit: bool = True):
    return connect(s.target(), "target", autocommit=autocommit, purpose="verify", options=options(s.target()))


# --- the catalogue ---------------------------------------------------------------------------------

def catalogue(src: psycopg.Connection, geometry: bool = True) -> list[plan.Table]:
    """Every leaf table, classified (plan.classify), with its bucket geometry
    (the key's range: one index lookup per table) unless told not to."""
    tables = []
    columns = {label: tuple(rest) for label, *rest in src.execute(q.COLUMNS, ()).fetchall()}
    for (nsp, rel, label, persistence, replident, rnsp, rrel, pages, size, cols, types, oids,
         primary) in src.execute(q.CATALOGUE, ()).fetchall():
        t = plan.classify(nsp, rel, label, persistence, replident, (rnsp, rrel), pages, size, cols, types, oids,
                          primary, columns.get(label))
        if geometry and t.kind == plan.KEYED and t.bucket_kind == "range":
            lo, hi = src.execute(q.key_range(t.parts, t.key_cols[0])).fetchone()
            plan.geometry(t, pages, lo, hi)
        else:
            plan.geometry(t, pages, None, None)
        if t.kind == plan.UNTRACKED:
            t.first_bucket = t.last_bucket = t.next_bucket = None
        tables.append(t)
    plan.publishable_roots(tables)
    return tables


# --- install ---------------------------------------------------------------------------------------

def install_source(s: StepSettings, tables: list[plan.Table]) -> tuple[int, str]:
    """Publication, then the slot (the publication must exist at the slot's
    starting point for pgoutput to find it). Returns (L0, the snapshot of L0
    as pg_snapshot text): every transaction committed before L0 is visible in
    that snapshot, and every one after is decoded from the slot."""
    slot, pub = names(s)
    roots = plan.publishable_roots(tables)
    with source(s) as src:
        src.execute(q.drop_publication(pub))
        try:
            src.execute(q.create_publication(pub, roots))
        except psycopg.errors.InsufficientPrivilege as exc:
            raise StepError(f"verify-prepare: cannot create publication {pub!r} on the source "
                            f"({scrub(_first(exc))}): the role must own the application's tables") from None
    try:
        repl = psycopg.connect(s.source(), autocommit=True, replication="database", connect_timeout=10,
                               application_name="db-upgrade-verify", options=options(s.source()))
    except psycopg.OperationalError as exc:
        raise StepError(f"verify-prepare: cannot open a replication connection to the source: "
                        f"{scrub(_first(exc), s.source())}; the role needs REPLICATION and pg_hba must allow it") from None
    try:
        res = repl.pgconn.exec_(q.create_slot_command(slot))
        if res.status != psycopg.pq.ExecStatus.TUPLES_OK:
            raise StepError(f"verify-prepare: creating the tracking slot {slot!r} failed: "
                            f"{(res.error_message or b'').decode(errors='replace').strip()}")
        l0, exported = res.get_value(0, 1).decode(), res.get_value(0, 2).decode()
        with source(s, autocommit=False) as src:
            src.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            src.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(exported)))
            snapshot = src.execute("SELECT pg_current_snapshot()::text").fetchone()[0]
            src.rollback()
    finally:
        repl.close()
    return lsn(l0), snapshot


def install_target(s: StepSettings, tables: list[plan.Table], l0: int, snapshot: str,
                   stop=None) -> None:
    slot, pub = names(s)
    with target(s) as tgt:
        tgt.execute(q.target_ddl())
        tgt.execute(sql.SQL("TRUNCATE {}, {}, {}, {}").format(q.pending_table(), q.tables_table(),
                                                                       q.meta_table(), q.deltas_table()))
        oids = dict(tgt.execute(q.TABLE_OIDS, ()).fetchall())
        for t in tables:
            t.target_oid = oids.get(t.label)
            if t.target_oid is None and t.kind != plan.UNTRACKED:
                t.kind, t.why = plan.UNTRACKED, "missing on the target when the preparation began"
                t.first_bucket = t.last_bucket = t.next_bucket = None
            if t.kind != plan.UNTRACKED:
                add_triggers(tgt, t, stop)
            save_table(tgt, t)
        tgt.execute(sql.SQL("INSERT INTO {} (run_id, slot, publication, l0, snapshot) "
                                    "VALUES (%s, %s, %s, %s::pg_lsn, %s)").format(q.meta_table()),
                    (s.run_id, slot, pub, fmt_lsn(l0), snapshot))


def add_triggers(tgt: psycopg.Connection, t: plan.Table, stop=None) -> None:
    """The table's triggers, in one transaction (they lock the table briefly;
    retried when the apply holds it)."""
    stmts = []
    fn = None
    if t.kind == plan.KEYED:
        fn = q.key_function_name(t.target_oid)
        stmts.append(q.key_function(t.target_oid, t.key_cols, t.neutral))
    elif t.kind == plan.WHOLE and t.checksum:
        fn = q.NOTE_ROWS
    stmts += q.install_triggers(t.parts, t.label, fn)
    _locked(tgt, stmts, stop, f"installing the change triggers on {t.label}")


def remove_triggers(tgt: psycopg.Connection, parts: tuple[str, str]) -> None:
    _locked(tgt, q.drop_triggers(parts), None, f"dropping the change triggers on {parts[0]}.{parts[1]}")


def _locked(tgt, stmts, stop, what: str) -> None:
    tgt.execute(f"SET lock_timeout = '{LOCK_TIMEOUT}'")
    try:
        for attempt in range(LOCK_ATTEMPTS):
            if stop is not None and stop.is_set():
                raise InterruptedError
            try:
                with tgt.transaction():
                    for st in stmts:
                        tgt.execute(st)
                return
            except psycopg.errors.LockNotAvailable:
                if attempt == LOCK_ATTEMPTS - 1:
                    raise StepError(f"verify: {what}: the table stayed locked for "
                                    f"{LOCK_ATTEMPTS} x {LOCK_TIMEOUT}") from None
    finally:
        tgt.execute("RESET lock_timeout")


TABLE_COLUMNS = ("rel", "nspname", "relname", "kind", "why", "key_cols", "key_types", "neutral", "replident",
                 "bucket_kind", "width", "first_bucket", "last_bucket", "next_bucket", "bytes", "target_oid",
                 *(c for c, _ in q.SUMS_COLUMNS))


def save_table(tgt: psycopg.Connection, t: plan.Table) -> None:
    values = (t.label, t.nspname, t.relname, t.kind, t.why, t.key_cols, t.key_types, t.neutral, t.replident,
              t.bucket_kind, t.width, t.first_bucket, t.last_bucket, t.next_bucket, t.bytes, t.target_oid,
              *(getattr(t, c) for c, _ in q.SUMS_COLUMNS))
    cols = sql.SQL(", ").join(map(sql.Identifier, TABLE_COLUMNS))
    ph = sql.SQL(", ").join(sql.Placeholder() * len(TABLE_COLUMNS))
    upd = sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c))
                                     for c in TABLE_COLUMNS[1:])
    tgt.execute(sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT (rel) DO UPDATE SET {}").format(
        q.tables_table(), cols, ph, upd), values)


def load_tables(tgt: psycopg.Connection) -> list[plan.Table]:
    cols = sql.SQL(", ").join(map(sql.Identifier, TABLE_COLUMNS))
    rows = tgt.execute(sql.SQL("SELECT {} FROM {} ORDER BY rel").format(cols, q.tables_table())).fetchall()
    out = []
    for r in rows:
        d = dict(zip(TABLE_COLUMNS, r))
        d["label"] = d.pop("rel")
        d["checksum"] = bool(d["checksum"])
        out.append(plan.Table(**d))
    return out


def load_meta(tgt: psycopg.Connection) -> dict | None:
    try:
        row = tgt.execute(sql.SQL("SELECT run_id, slot, publication, l0::text, snapshot FROM {}").format(
            q.meta_table())).fetchone()
    except psycopg.errors.UndefinedTable:
        return None
    if row is None:
        return None
    return dict(zip(("run_id", "slot", "publication", "l0", "snapshot"), row))


# --- remove ----------------------------------------------------------------------------------------

def teardown(s: StepSettings) -> None:
    """Drop the slot and publication on the source, the triggers, their
    functions and our tables on the target. Idempotent. Both sides at once,
    each in few round trips: the cutover runs this inside the frozen window
    (the triggers would make the applications' first writes on the target
    fail: they may not write our schema). An unreachable side is left for
    cleanup to retry."""
    with ThreadPoolExecutor(2) as pool:
        for f in (pool.submit(_teardown_source, s), pool.submit(_teardown_target, s)):
            f.result()


def _teardown_source(s: StepSettings) -> None:
    slot, pub = names(s)
    try:
        with source(s) as src:
            deadline = time.monotonic() + 15
            while True:
                row = src.execute(q.SLOT, (slot,)).fetchone()
                if row is None:
                    break
                if row[1] is None:
                    src.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                    log(f"verify: dropped the tracking slot {slot!r} on the source")
                    break
                if time.monotonic() > deadline:  # a round still decoding, or a killed one's backend
                    src.execute("SELECT pg_terminate_backend(%s)", (row[1],))
                time.sleep(0.05)
            src.execute(q.drop_publication(pub))
    except (psycopg.Error, StepError) as exc:
        log(f"verify: could not drop the tracking slot {slot!r} ({type(exc).__name__}); cleanup drops it")


def _teardown_target(s: StepSettings) -> None:
    try:
        with target(s) as tgt:
            tables = [tuple(r) for r in tgt.execute(q.TRIGGERED_TABLES).fetchall()]
            functions = [r[0] for r in tgt.execute(q.OUR_FUNCTIONS, (q.SCHEMA, q.OUR_FUNCTION_NAMES)).fetchall()]
            stmts = [st for parts in tables for st in q.drop_triggers(parts)]
            stmts += [q.drop_function(fn) for fn in functions] + q.drop_target_objects()
            # One transaction, one round trip: on an idle target (the window) the
            # locks are free; under load each table is retried on its own.
            try:
                with tgt.transaction():
                    tgt.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
                    tgt.execute(sql.SQL("; ").join(stmts))
            except psycopg.errors.LockNotAvailable:
                for parts in tables:
                    remove_triggers(tgt, parts)
                for st in [q.drop_function(fn) for fn in functions] + q.drop_target_objects():
                    tgt.execute(st)
    except (psycopg.Error, StepError) as exc:
        log(f"verify: could not drop the change tracking on the target ({type(exc).__name__}); cleanup drops it")


def _first(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
