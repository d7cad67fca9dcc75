"""verify: compare the frozen source with the target, exactly.

- the sets of tables, columns (name, type), indexes, constraints and sequences;
- per table: row count and an order-independent 128-bit checksum of the rows'
  text (md5 of each row, summed as two 64-bit halves: no duplicate cancels out);
- sequences: the target's last_value must not be behind the source's.

Bounded work in the frozen window
---------------------------------
Checksumming every row of a large database while writes are refused would make
the write downtime grow with the database. So the bulk of the comparison runs
before the freeze, and the window only re-checks what changed since, by key
range. `prepare()` runs in the follow step once wait-caught-up has recorded the
catch-up (steps/drain.py starts it); `verify()` uses its record when present.

Buckets: a table whose primary key starts with an integer column k (and whose
replica identity is the default or full, so that every decoded change carries
k) is split into buckets floor(k / W), W chosen for about 512 kB per bucket; a
table's checksum is the sum of its buckets'. Any other table is one bucket.

prepare():
  1. Source: create a logical slot `<slot>_verify` (test_decoding). Its
     consistent point is L0: every transaction committing after L0 will be
     decoded from it, independently of pgcopydb.
  2. Target: ALWAYS triggers (pgcopydb applies with session_replication_role =
     replica) record, in the same transaction as the change, which bucket of
     which table a row change touched (old and new row), or the whole table
     for TRUNCATE, statements on a partitioned parent and tables without buckets.
  3. Wait until the target's replication origin (pgcopydb applies in source
     commit order, one transaction at a time) is at or past L0.
  4. Take a fresh xid N on each side, then a REPEATABLE READ snapshot on each
     side whose xmin is past N: every transaction with an xid up to N is then
     visible or aborted, so the source snapshot S holds every commit up to L0,
     and the target snapshot T every transaction applied up to L0 (both may
     hold later ones).
  5. Checksum every bucket of every table in S and in T; record them with L0.

verify(), after the drain (source frozen, pgcopydb stopped at its endpos):
  - Ds = buckets named by the changes decoded from the slot, L0 to now (old and
    new key of each change; until the freeze, track() decodes them every few
    seconds into the record and advances the slot, so the window decodes only
    the last seconds; a change without the key, a TRUNCATE, an unknown
    table or an unlogged table: the whole table);
  - Dt = buckets the target's triggers recorded (since before T was taken);
  - every bucket in Ds or Dt, or whose recorded checksums differ, and every
    table not in the record, is checksummed again on both sides, now;
  - every other bucket B keeps its recorded checksum, because
      source now  = source at S  (no source change in B committed after L0, and
                                 S holds every commit up to L0, none after now)
      source at S = target at T  (equal recorded checksums)
      target at T = target now   (no change in B recorded on the target since
                                 the triggers, which existed before T was taken);
  - a table matches when its bucket sums match on both sides. A table re-read
    whole inside the window is compared by sums of hash_record_extended (the
    types' binary hash functions, same values on 15 and 17, ~3x cheaper than
    md5 of the row text); any difference is confirmed or refuted by md5.
  DDL is not decoded: the column list in the object comparison catches a
  changed table definition. The window's work is bounded by the changes since
  prepare (decoding them, re-reading the small buckets they touched by index
  range), plus whole tables without an integer key that changed. Afterwards the
  slot, the triggers and the record are dropped: a second verify compares all.

The db_upgrade schema (heartbeat, counters) and pgcopydb's are not compared.

In rehearsal mode the source keeps taking writes after the endpos, so row
counts are reported with their drift and only missing or extra objects, or an
empty side where the other has rows, fail the step; nothing is prepared.
"""

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import psycopg
from psycopg import sql

from steps import state
from steps.errors import StepError
from steps.log import log
from steps.pg import USER_SCHEMAS, connect, fmt_lsn, lsn
from steps.settings import StepSettings

OWN_SCHEMA = "db_upgrade"
SCHEMA_FILTER = USER_SCHEMAS  # every comparison covers the same schemas

OBJECTS = f"""
SELECT 'table ' || format('%%I.%%I', n.nspname, c.relname) FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p') AND {SCHEMA_FILTER}
UNION ALL
SELECT 'column ' || format('%%I.%%I', n.nspname, c.relname) || ' ' || format('%%I', a.attname) || ' '
       || format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
  JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped AND {SCHEMA_FILTER}
UNION ALL
SELECT 'index ' || format('%%I.%%I', n.nspname, c.relname) FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('i', 'I') AND {SCHEMA_FILTER}
UNION ALL
SELECT 'sequence ' || format('%%I.%%I', n.nspname, c.relname) FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'S' AND {SCHEMA_FILTER}
UNION ALL
SELECT 'constraint ' || format('%%I.%%I', n.nspname, cl.relname) || ' ' || format('%%I', co.conname)
       || ' ' || co.contype::text FROM pg_constraint co
  JOIN pg_class cl ON cl.oid = co.conrelid JOIN pg_namespace n ON n.oid = cl.relnamespace
  WHERE {SCHEMA_FILTER}
"""

# Queries holding %% run with params=() so that psycopg turns %% into %.
# Leaf tables only: a partitioned parent's rows are its partitions' rows.
TABLES = f"""
SELECT n.nspname, c.relname, format('%%I.%%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND {SCHEMA_FILTER} ORDER BY 1, 2
"""

# Every table (partitioned parents too) with its leaf partitions, and whether
# its changes are WAL-logged (unlogged tables are never decoded).
TABLE_TREE = f"""
SELECT format('%%I.%%I', n.nspname, c.relname), c.oid::bigint, c.relkind::text, c.relpersistence::text,
       coalesce((SELECT array_agg(format('%%I.%%I', ln.nspname, l.relname))
                 FROM pg_partition_tree(c.oid) t JOIN pg_class l ON l.oid = t.relid
                 JOIN pg_namespace ln ON ln.oid = l.relnamespace WHERE t.isleaf AND l.relkind = 'r'),
                '{{}}')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND {SCHEMA_FILTER}
"""

SEQUENCES = f"""
SELECT format('%%I.%%I', schemaname, sequencename), last_value FROM pg_sequences n
WHERE {SCHEMA_FILTER.replace('n.nspname', 'n.schemaname')}
"""

RECORD = "db-upgrade-verify.json"


def tracking_slot(s: StepSettings) -> str:
    return f"{s.slot_name}_verify"[:63]


TRIGGER = "db_upgrade_changes"
WHOLE = -(2 ** 63)  # "the whole table" in db_upgrade.changed
BUCKET_PAGES = 64  # about 512 kB of heap per bucket: ~30 ms to re-read
PREPARE_TIMEOUT = 1800.0
TRACKING = f"""
CREATE SCHEMA IF NOT EXISTS {OWN_SCHEMA};
CREATE TABLE IF NOT EXISTS {OWN_SCHEMA}.changed (rel oid NOT NULL, bucket bigint NOT NULL,
                                                      PRIMARY KEY (rel, bucket));
CREATE OR REPLACE FUNCTION {OWN_SCHEMA}.note_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP <> 'INSERT' THEN
    INSERT INTO {OWN_SCHEMA}.changed VALUES (TG_RELID,
      coalesce(floor((to_jsonb(OLD) ->> TG_ARGV[0])::numeric / TG_ARGV[1]::numeric)::bigint, {WHOLE}))
      ON CONFLICT DO NOTHING;
  END IF;
  IF TG_OP <> 'DELETE' THEN
    INSERT INTO {OWN_SCHEMA}.changed VALUES (TG_RELID,
      coalesce(floor((to_jsonb(NEW) ->> TG_ARGV[0])::numeric / TG_ARGV[1]::numeric)::bigint, {WHOLE}))
      ON CONFLICT DO NOTHING;
  END IF;
  RETURN NULL;
END$$;
CREATE OR REPLACE FUNCTION {OWN_SCHEMA}.note_whole() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO {OWN_SCHEMA}.changed VALUES (TG_RELID, {WHOLE}) ON CONFLICT DO NOTHING;
  RETURN NULL;
END$$;
"""
# Leaf tables whose primary key starts with an integer column and whose changes
# always carry it (replica identity default or full).
BUCKET_KEYS = f"""
SELECT format('%%I.%%I', n.nspname, c.relname), a.attname, greatest(c.relpages, 1)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = i.indkey[0]
WHERE c.relkind = 'r' AND c.relreplident IN ('d', 'f') AND c.relpersistence = 'p'
  AND a.atttypid IN ('int2'::regtype, 'int4'::regtype, 'int8'::regtype) AND {SCHEMA_FILTER}
"""
KEY_PATTERN = r'\s("(?:[^"]|"")+"|[^\s\[]+)\[(?:smallint|integer|bigint)\]:(-?\d+)'
CHANGES = r"""
WITH c AS (
  SELECT substring(data FROM '^table (.*?): (?:INSERT|UPDATE|DELETE|TRUNCATE)') AS tbl,
         data ~ '^table .*?: TRUNCATE' AS trunc, data
  FROM {fn}(%(slot)s, %(upto)s::pg_lsn, NULL, 'skip-empty-xacts', '1', 'include-xids', '0')
  WHERE data NOT LIKE 'BEGIN%%' AND data NOT LIKE 'COMMIT%%'
), k AS (
  SELECT c.tbl, c.trunc, s.spec,
         (SELECT array_agg(floor(m[2]::numeric / (s.spec ->> 'w')::numeric)::bigint)
          FROM regexp_matches(c.data, %(pattern)s, 'g') m WHERE m[1] = s.spec ->> 'q') AS buckets
  FROM c CROSS JOIN LATERAL (SELECT %(specs)s::jsonb -> c.tbl AS spec) s
)
SELECT tbl, trunc OR spec IS NULL OR buckets IS NULL, b
FROM k LEFT JOIN LATERAL unnest(buckets) b ON true
GROUP BY 1, 2, 3
"""


def _quote(name: str) -> str:
    """quote_identifier, as test_decoding prints column names."""
    if name and (name[0].islower() or name[0] == "_") and all(ch.islower() or ch.isdigit() or ch in "_$" for ch in name):
        return name
    return '"' + name.replace('"', '""') + '"'


def checksum_query(schema: str, table: str, key: str | None = None, width: int | None = None,
                   buckets: list[int] | None = None) -> sql.Composed:
    """Rows: bucket, count, two 64-bit half sums of the rows' md5 (as text).
    Without a key, one bucket (0) for the whole table; with buckets, only those
    (read by index range on the key)."""
    bucket = (sql.SQL("floor({}::numeric / {})::bigint").format(sql.Identifier(key), sql.Literal(width))
              if key else sql.SQL("0::bigint"))
    where = sql.SQL("")
    if key and buckets is not None:
        ranges = [sql.SQL("({k} >= {lo} AND {k} < {hi})").format(
            k=sql.Identifier(key), lo=sql.Literal(b * width), hi=sql.Literal((b + 1) * width)) for b in sorted(buckets)]
        where = sql.SQL(" WHERE ") + sql.SQL(" OR ").join(ranges)
    return sql.SQL(
        "SELECT b, count(*), coalesce(sum(('x' || substr(h, 1, 16))::bit(64)::bigint::numeric), 0)::text,"
        " coalesce(sum(('x' || substr(h, 17, 16))::bit(64)::bigint::numeric), 0)::text"
        " FROM (SELECT {bucket} AS b, md5(t::text) AS h FROM ONLY {table} AS t{where}) AS rows GROUP BY b"
    ).format(bucket=bucket, table=sql.Identifier(schema, table), where=where)


Buckets = dict[int, tuple[int, int, int]]  # bucket -> (rows, sum1, sum2)


FAST = -1  # the bucket key of a whole-table fast hash (see _table_sums)


def fast_query(schema: str, table: str) -> sql.Composed:
    """A whole table's count and two 64-bit sums of hash_record_extended (seeds 0
    and 1): the types' own binary hash functions, no text output, about 3x
    faster than md5 of the row text. Used only to compare the two sides now
    (never against the preparation); a difference is confirmed with md5."""
    return sql.SQL(
        "SELECT count(*), coalesce(sum(hash_record_extended(t, 0)::numeric), 0)::text,"
        " coalesce(sum(hash_record_extended(t, 1)::numeric), 0)::text FROM ONLY {} AS t"
    ).format(sql.Identifier(schema, table))


def _table_sums(conn, schema, table, spec, buckets=None, fast=False) -> Buckets:
    if fast:
        try:
            with conn.transaction():  # a savepoint: a type without a hash function fails here only
                n, s1, s2 = conn.execute(fast_query(schema, table)).fetchone()
            return {FAST: (int(n), int(s1), int(s2))}
        except psycopg.errors.UndefinedFunction:
            pass
    key, width = (spec["col"], spec["w"]) if spec else (None, None)
    rows = conn.execute(checksum_query(schema, table, key, width, buckets)).fetchall()
    return {int(b): (int(n), int(s1), int(s2)) for b, n, s1, s2 in rows}


def _total(b: Buckets) -> tuple[int, str]:
    return (sum(v[0] for v in b.values()),
            f"{sum(v[1] for v in b.values())}:{sum(v[2] for v in b.values())}")


@dataclass
class TableResult:
    table: str
    source_rows: int
    target_rows: int
    match: bool


@dataclass
class VerifyReport:
    ok: bool
    mode: str
    tables: list[TableResult] = field(default_factory=list)
    missing_on_target: list[str] = field(default_factory=list)
    extra_on_target: list[str] = field(default_factory=list)
    sequences_behind: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.ok:
            return (f"verified: {len(self.tables)} tables, "
                    f"{sum(t.target_rows for t in self.tables)} rows"
                    + (" (rehearsal: counts drift with writes after endpos)" if self.mode == "rehearsal"
                       else ", checksums and sequences match"))
        parts = []
        if self.missing_on_target:
            parts.append(f"missing on target: {', '.join(self.missing_on_target[:5])}")
        if self.extra_on_target:
            parts.append(f"extra on target: {', '.join(self.extra_on_target[:5])}")
        if self.mismatched:
            parts.append(f"tables differ: {', '.join(self.mismatched[:10])}")
        if self.sequences_behind:
            parts.append(f"sequences behind: {', '.join(self.sequences_behind[:5])}")
        return "verification FAILED: " + "; ".join(parts)


def _objects(conn: psycopg.Connection) -> set[str]:
    return {r[0] for r in conn.execute(OBJECTS, ())}


def _sums(uri: str, role: str, work: list[tuple], past_xid: int | None = None,
          deadline: float | None = None, stop: threading.Event | None = None) -> dict[str, Buckets]:
    """work: (schema, table, label, spec, buckets or None for all). All in one
    snapshot on this side; with past_xid, one whose xmin is past that xid.
    Setting stop cancels the running query (the preparation gives way to the
    cutover)."""
    out = {}
    with connect(uri, role, autocommit=False) as conn:
        done = threading.Event()
        if stop is not None:
            def cancel():
                while not done.wait(0.2):
                    if stop.is_set():
                        try:
                            conn.cancel()
                        except Exception:
                            pass
                        return
            threading.Thread(target=cancel, daemon=True).start()
        try:
            return _sums_in(conn, role, work, past_xid, deadline, out)
        except psycopg.errors.QueryCanceled:
            if stop is not None and stop.is_set():
                raise InterruptedError from None
            raise
        finally:
            done.set()


def _sums_in(conn, role, work, past_xid, deadline, out):
    while True:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        if past_xid is None:
            break
        xmin = int(conn.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text").fetchone()[0])
        if xmin > past_xid:
            break
        conn.rollback()
        if deadline is not None and time.monotonic() > deadline:
            raise StepError(f"verify: the {role} still has transactions older than the preparation")
        time.sleep(0.1)
    for item in work:
        schema, table, label, spec, buckets = item[:5]
        out[label] = _table_sums(conn, schema, table, spec, buckets, fast=len(item) > 5 and item[5])
    conn.rollback()
    return out


def _both_sums(s: StepSettings, work, xids: tuple[int, int] | None = None, deadline: float | None = None,
               stop: threading.Event | None = None):
    with ThreadPoolExecutor(2) as pool:
        fs = pool.submit(_sums, s.source(), "source", work, xids[0] if xids else None, deadline, stop)
        ft = pool.submit(_sums, s.target(), "target", work, xids[1] if xids else None, deadline, stop)
        return fs.result(), ft.result()


# --- preparation, before the freeze -------------------------------------------------------------

def _record_path(s: StepSettings):
    return s.workdir() / RECORD


def _run_id(s: StepSettings) -> str | None:
    return state.read(s.workdir()).get("follow_started_at")


def prepared(s: StepSettings) -> dict | None:
    """The preparation record of this run, if complete."""
    try:
        data = json.loads(_record_path(s).read_text())
    except (OSError, ValueError):
        return None
    if not data.get("complete") or data.get("run") != _run_id(s):
        return None
    return data


def _bucket_specs(src: psycopg.Connection) -> dict[str, dict]:
    specs = {}
    for label, col, pages in src.execute(BUCKET_KEYS, ()).fetchall():
        lo, hi = src.execute(sql.SQL("SELECT min({k}), max({k}) FROM ONLY {t}").format(
            k=sql.Identifier(col), t=sql.SQL(label))).fetchone()
        if lo is None:
            lo = hi = 0
        nb = max(1, pages // BUCKET_PAGES)
        width = max(1, -(-(hi - lo + 1) // nb))
        specs[label] = {"col": col, "q": _quote(col), "w": width}
    return specs


def _install_tracking(tgt: psycopg.Connection, specs: dict, stop: threading.Event) -> None:
    """ALWAYS triggers on every target table noting which buckets changed."""
    tgt.execute(TRACKING)
    tgt.execute(f"TRUNCATE {OWN_SCHEMA}.changed")
    tgt.execute("SET lock_timeout = '2s'")
    for label, _oid, kind, _persistence, _leaves in tgt.execute(TABLE_TREE, ()).fetchall():
        spec = specs.get(label) if kind == "r" else None
        stmts = [sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(TRIGGER), sql.SQL(label)),
                 sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(TRIGGER + "_t"), sql.SQL(label))]
        if spec:
            stmts.append(sql.SQL("CREATE TRIGGER {} AFTER INSERT OR UPDATE OR DELETE ON {} FOR EACH ROW "
                                 "EXECUTE FUNCTION {}.note_row({}, {})").format(
                sql.Identifier(TRIGGER), sql.SQL(label), sql.Identifier(OWN_SCHEMA),
                sql.Literal(spec["col"]), sql.Literal(str(spec["w"]))))
            stmts.append(sql.SQL("CREATE TRIGGER {} AFTER TRUNCATE ON {} FOR EACH STATEMENT "
                                 "EXECUTE FUNCTION {}.note_whole()").format(
                sql.Identifier(TRIGGER + "_t"), sql.SQL(label), sql.Identifier(OWN_SCHEMA)))
        else:
            stmts.append(sql.SQL("CREATE TRIGGER {} AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {} "
                                 "FOR EACH STATEMENT EXECUTE FUNCTION {}.note_whole()").format(
                sql.Identifier(TRIGGER), sql.SQL(label), sql.Identifier(OWN_SCHEMA)))
        stmts.append(sql.SQL("ALTER TABLE {} ENABLE ALWAYS TRIGGER {}").format(sql.SQL(label), sql.Identifier(TRIGGER)))
        if spec:
            stmts.append(sql.SQL("ALTER TABLE {} ENABLE ALWAYS TRIGGER {}").format(
                sql.SQL(label), sql.Identifier(TRIGGER + "_t")))
        for attempt in range(30):
            if stop.is_set():
                raise InterruptedError
            try:
                with tgt.transaction():
                    for st in stmts:
                        tgt.execute(st)
                break
            except psycopg.errors.LockNotAvailable:
                if attempt == 29:
                    raise


def _wait(cond, stop: threading.Event, deadline: float, what: str) -> None:
    while not cond():
        if stop.is_set():
            raise InterruptedError
        if time.monotonic() > deadline:
            raise StepError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _origin(tgt: psycopg.Connection, origin: str) -> int:
    from steps.pg import origin_progress

    return origin_progress(tgt, origin)


def prepare(s: StepSettings, stop: threading.Event | None = None) -> dict | None:
    """Checksum every table on both sides before the freeze, with what verify
    needs to re-check only what changes afterwards (module docstring)."""
    stop = stop or threading.Event()
    if s.mode == "rehearsal":
        return None
    started = time.monotonic()
    deadline = started + PREPARE_TIMEOUT
    slot = tracking_slot(s)
    run = _run_id(s)
    try:
        _record_path(s).unlink()
    except FileNotFoundError:
        pass
    log("verify-prepare: checksumming source and target ahead of the freeze")
    try:
        with connect(s.source(), "source") as src, connect(s.target(), "target") as tgt:
            row = src.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
            if row is not None and row[0] is None:
                src.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            l0 = lsn(src.execute("SELECT lsn::text FROM pg_create_logical_replication_slot(%s, 'test_decoding')",
                                 (slot,)).fetchone()[0])
            specs = _bucket_specs(src)
            _install_tracking(tgt, specs, stop)
            _wait(lambda: _origin(tgt, s.slot_name) >= l0, stop, deadline, f"the target to apply up to {fmt_lsn(l0)}")
            xid_src = int(src.execute("SELECT pg_current_xact_id()::text").fetchone()[0])
            xid_tgt = int(tgt.execute("SELECT pg_current_xact_id()::text").fetchone()[0])
            tables = src.execute(TABLES, ()).fetchall()
        if stop.is_set():
            raise InterruptedError
        work = [(sch, tbl, label, specs.get(label), None) for sch, tbl, label in tables]
        src_sums, tgt_sums = _both_sums(s, work, (xid_src, xid_tgt), deadline, stop)
    except InterruptedError:
        log("verify-prepare: stopped before it finished (the freeze came first, or follow is restarting pgcopydb "
            "and prepares again); without a finished preparation verify compares everything")
        _teardown(s)
        return None
    except Exception:
        _teardown(s)
        raise
    if stop.is_set():
        _teardown(s)
        return None
    enc = lambda b: {str(k): [v[0], str(v[1]), str(v[2])] for k, v in b.items()}  # noqa: E731
    data = {
        "complete": True, "run": run, "slot": slot, "l0": fmt_lsn(l0), "specs": specs,
        "source": {k: enc(v) for k, v in src_sums.items()},
        "target": {k: enc(v) for k, v in tgt_sums.items()},
        "prepared_at": state.now(), "seconds": round(time.monotonic() - started, 2),
    }
    tmp = _record_path(s).with_suffix(".tmp")
    tmp.write_text(json.dumps(data, sort_keys=True))
    os.replace(tmp, _record_path(s))
    nb = sum(len(v) for v in src_sums.values())
    log(f"verify-prepare: {len(src_sums)} tables ({nb} buckets) checksummed at {fmt_lsn(l0)} in {data['seconds']}s; "
        "verify will re-check only what changes from now on")
    return data


def _teardown(s: StepSettings) -> None:
    """Drop the tracking slot, the target's triggers and change table, and the record."""
    try:
        _record_path(s).unlink()
    except (FileNotFoundError, StepError):
        pass
    slot = tracking_slot(s)
    try:
        with connect(s.source(), "source") as src:
            row = src.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
            if row is not None:
                if row[0] is not None:
                    src.execute("SELECT pg_terminate_backend(%s)", (row[0],))
                    time.sleep(0.2)
                src.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    except psycopg.Error as exc:
        log(f"verify: could not drop the tracking slot {slot!r} ({type(exc).__name__}); cleanup drops it")
    try:
        with connect(s.target(), "target") as tgt:
            # The triggers depend on the functions.
            tgt.execute(f"DROP FUNCTION IF EXISTS {OWN_SCHEMA}.note_row() CASCADE")
            tgt.execute(f"DROP FUNCTION IF EXISTS {OWN_SCHEMA}.note_whole() CASCADE")
            tgt.execute(f"DROP TABLE IF EXISTS {OWN_SCHEMA}.changed")
    except psycopg.Error as exc:
        log(f"verify: could not drop the change tracking on the target ({type(exc).__name__}); cleanup drops it")


def drop_tracking(s: StepSettings) -> None:
    """For cleanup (abort paths): drop the tracking slot, which would otherwise
    keep WAL on the source, and the target's triggers. Idempotent."""
    _teardown(s)


# --- inside the window ---------------------------------------------------------------------------

def _changed_on_source(src: psycopg.Connection, record: dict, tree: dict) -> dict[str, set] | None:
    """Leaf table -> buckets changed since L0 (WHOLE for all); None: cannot tell."""
    # Decoding reads only flushed WAL, and a commit made with synchronous_commit
    # off may not be flushed yet: wait for the WAL writer (wal_writer_delay) to
    # flush past every commit made so far.
    if src.execute(f"SELECT to_regclass('{OWN_SCHEMA}.heartbeat') IS NOT NULL").fetchone()[0]:
        try:  # a commit that wrote WAL, with synchronous_commit on, flushes at once
            with src.transaction():
                src.execute("SET LOCAL synchronous_commit = on")
                src.execute(f"UPDATE {OWN_SCHEMA}.heartbeat SET beat = beat + 1 WHERE id = 1")
        except psycopg.Error:
            pass
    upto = src.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]
    deadline = time.monotonic() + 10
    while not src.execute("SELECT pg_current_wal_flush_lsn() >= %s::pg_lsn", (upto,)).fetchone()[0]:
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)
    if record.get("changed_unknown"):
        return None
    deadline = time.monotonic() + 15
    while src.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s",
                      (record["slot"],)).fetchone()[0] is not None:  # a tracking call still finishing
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)
    changed = _decode(src, record, tree, None, "pg_logical_slot_get_changes")
    if changed is None:
        return None
    for label, buckets in record.get("changed", {}).items():  # decoded before the freeze by track()
        changed.setdefault(label, set()).update(buckets)
    return changed


def _decode(src, record: dict, tree: dict, upto: str | None, fn: str) -> dict[str, set] | None:
    changed: dict[str, set] = {}
    params = {"slot": record["slot"], "pattern": KEY_PATTERN, "specs": json.dumps(record["specs"]), "upto": upto}
    query = CHANGES.replace("{fn}", fn)
    for names, whole, bucket in src.execute(query, params).fetchall():
        if names is None:
            return None
        for name in names.split(", ") if whole else [names]:
            if name.startswith((f"{OWN_SCHEMA}.", "pgcopydb.")):
                continue
            if name not in tree:
                return None
            for leaf in tree[name][4] or [name]:
                changed.setdefault(leaf, set()).add(WHOLE if whole or bucket is None else int(bucket))
    return changed


def track(s: StepSettings) -> bool:
    """Before the freeze (called every few seconds by the drain thread): decode
    the tracking slot's changes so far, add their buckets to the record, then
    advance the slot past them, so that verify decodes only the last seconds.
    The record is written before the slot moves: a crash in between decodes the
    same changes again (a set union), never loses any."""
    record = prepared(s)
    if record is None or record.get("changed_unknown"):
        return False
    with connect(s.source(), "source") as src:
        tree = {r[0]: r for r in src.execute(TABLE_TREE, ()).fetchall()}
        upto = src.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()[0]  # decoding reads flushed WAL only
        changed = _decode(src, record, tree, upto, "pg_logical_slot_peek_changes")
        if changed is None:
            record["changed_unknown"] = True
        else:
            merged = record.setdefault("changed", {})
            for label, buckets in changed.items():
                merged[label] = sorted(set(merged.get(label, [])) | buckets)
        tmp = _record_path(s).with_suffix(".tmp")
        tmp.write_text(json.dumps(record, sort_keys=True))
        os.replace(tmp, _record_path(s))
        src.execute("SELECT pg_replication_slot_advance(%s, %s::pg_lsn)", (record["slot"], upto))
    return True


def _changed_on_target(tgt: psycopg.Connection, tree: dict) -> dict[str, set] | None:
    if not tgt.execute(f"SELECT to_regclass('{OWN_SCHEMA}.changed') IS NOT NULL").fetchone()[0]:
        return None
    changed: dict[str, set] = {}
    rows = tgt.execute(f"SELECT format('%I.%I', n.nspname, c.relname), ch.bucket FROM {OWN_SCHEMA}.changed ch "
                       "JOIN pg_class c ON c.oid = ch.rel JOIN pg_namespace n ON n.oid = c.relnamespace").fetchall()
    for label, bucket in rows:
        for leaf in tree.get(label, (None,) * 4 + ([label],))[4] or [label]:
            changed.setdefault(leaf, set()).add(int(bucket))
    # A target table without its ALWAYS trigger (dropped and created again, e.g.
    # a copy started over) has changes nobody recorded: the whole table.
    watched = {r[0] for r in tgt.execute(
        "SELECT format('%%I.%%I', n.nspname, c.relname) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE t.tgname = %s AND t.tgenabled = 'A'",
        (TRIGGER,)).fetchall()}
    for label, row in tree.items():
        if row[2] == "r" and label not in watched:
            changed.setdefault(label, set()).add(WHOLE)
    return changed


def _plan(tables, record, changed) -> tuple[list, dict]:
    """What to checksum now: (work items, kept buckets per table)."""
    work, kept = [], {}
    dec = lambda b: {int(k): (v[0], int(v[1]), int(v[2])) for k, v in b.items()}  # noqa: E731
    for schema, table, label in tables:
        spec = record["specs"].get(label) if record else None
        if record is None or label not in record["source"] or label not in record["target"]:
            work.append((schema, table, label, spec, None))
            continue
        ps, pt = dec(record["source"][label]), dec(record["target"][label])
        redo = set(changed.get(label, ()))
        redo |= {b for b in set(ps) | set(pt) if ps.get(b, (0, 0, 0)) != pt.get(b, (0, 0, 0))}
        if WHOLE in redo or (redo and spec is None):
            work.append((schema, table, label, spec, None))
            continue
        kept[label] = {b: v for b, v in ps.items() if b not in redo}
        if redo:
            work.append((schema, table, label, spec, sorted(redo)))
    return work, kept


def verify(s: StepSettings) -> VerifyReport:
    rehearsal = s.mode == "rehearsal"
    report = VerifyReport(ok=True, mode=s.mode)
    record = None if rehearsal or s.dir is None else prepared(s)
    log(f"verify: comparing source and target ({'rehearsal: schema exact, counts with drift' if rehearsal else 'exact'}"
        + (f", re-checking what changed since {record['l0']}" if record else "") + ")")
    started = time.monotonic()
    try:
        with connect(s.source(), "source") as src, connect(s.target(), "target") as tgt:
            so, to = _objects(src), _objects(tgt)
            report.missing_on_target = sorted(so - to)
            report.extra_on_target = sorted(to - so)
            tables = src.execute(TABLES, ()).fetchall()
            src_seq = dict(src.execute(SEQUENCES, ()).fetchall())
            tgt_seq = dict(tgt.execute(SEQUENCES, ()).fetchall())
            changed = None
            if record is not None:
                tree = {r[0]: r for r in src.execute(TABLE_TREE, ()).fetchall()}
                cs = _changed_on_source(src, record, tree)
                ct = _changed_on_target(tgt, tree)
                if cs is not None and ct is not None:
                    changed = cs
                    for label, bs in ct.items():
                        changed.setdefault(label, set()).update(bs)
                    for r in tree.values():  # unlogged tables are never decoded
                        if r[3] != "p":
                            for leaf in r[4] or [r[0]]:
                                changed.setdefault(leaf, set()).add(WHOLE)
                else:
                    log("verify: the changes since the preparation cannot be told apart; comparing everything")
        log(f"verify: {len(so)} objects on the source, {len(to)} on the target"
            + (f"; changes since the preparation read in {time.monotonic() - started:.2f}s" if changed is not None else ""))
        present = [t for t in tables if f"table {t[2]}" not in report.missing_on_target]
        work, kept = _plan(present, record if changed is not None else None, changed or {})
        if changed is not None:
            n_buckets = sum(len(w[4]) for w in work if w[4] is not None)
            whole = [w[2] for w in work if w[4] is None]
            log(f"verify: re-checking {n_buckets} changed key ranges and {len(whole)} whole tables"
                + (f" ({', '.join(whole[:5])})" if whole else "")
                + f"; the rest of {len(present)} tables stands as checksummed at {record['l0']}")
        t_sums = time.monotonic()
        if changed is not None:  # inside the window: whole tables by the fast hash first
            work = [w + (w[4] is None,) for w in work]
        src_sums, tgt_sums = _both_sums(s, work) if work else ({}, {})
        # A fast-hash difference (or one side without it) is confirmed with md5.
        again = [w[:5] for w in work if w[4] is None and (FAST in src_sums.get(w[2], {}) or FAST in tgt_sums.get(w[2], {}))
                 and src_sums.get(w[2]) != tgt_sums.get(w[2])]
        if again:
            log(f"verify: {len(again)} table(s) differ by the fast hash; comparing them by md5")
            s2, t2 = _both_sums(s, again)
            src_sums.update(s2)
            tgt_sums.update(t2)
        t_sums = time.monotonic() - t_sums
    finally:
        if not rehearsal and s.dir is not None:
            t_down = time.monotonic()
            _teardown(s)
            t_down = time.monotonic() - t_down
    for schema, table, key in present:
        base = kept.get(key, {})
        sc, sd = _total({**base, **src_sums.get(key, {})})
        tc, td = _total({**base, **tgt_sums.get(key, {})})
        if rehearsal:
            match = (sc == 0) == (tc == 0)
        else:
            match = sc == tc and sd == td
        report.tables.append(TableResult(key, sc, tc, match))
        drift = f" (drift {tc - sc:+d})" if rehearsal and sc != tc else ""
        log(f"  {'ok  ' if match else 'DIFF'} {key}: source {sc} rows, target {tc} rows{drift}"
            + ("" if rehearsal or match else " (checksums differ)" if sc == tc else ""))
        if not match:
            report.mismatched.append(key)
    for name, last in src_seq.items():
        tl = tgt_seq.get(name)
        if last is not None and (tl is None or tl < last):
            if not rehearsal:
                report.sequences_behind.append(f"{name} ({tl} < {last})")
    report.ok = not (report.missing_on_target or report.extra_on_target or report.mismatched or report.sequences_behind)
    if s.dir is not None:
        state.try_update(s.dir, verify=asdict(report), verified_at=state.now(),
                     verify_seconds=round(time.monotonic() - started, 2),
                     verify_rechecked_buckets=None if changed is None else sum(
                         len(w[4]) for w in work if w[4] is not None),
                     verify_rechecked_tables=None if changed is None else [w[2] for w in work if w[4] is None])
    s.write_output("verify", report.summary())
    if not report.ok:
        raise StepError(f"verify: {report.summary()}")
    log(f"verify: {report.summary()} ({time.monotonic() - started:.2f}s; checksums {t_sums:.2f}s"
        + (f", dropping the change tracking {t_down:.2f}s" if not rehearsal and s.dir is not None else "") + ")")
    return report
