"""verify's SQL, built by small pure functions (tested without a database).

Identifiers go through psycopg.sql. Type names come from the server's own
format_type() (already valid SQL) and are spliced as SQL; nothing here comes
from an Argo parameter.
"""

from __future__ import annotations

from psycopg import sql

from steps.pg import USER_SCHEMAS

SCHEMA = "db_upgrade"
PENDING = "verify_pending"  # (rel, key): a row that changed and is not compared yet; key NULL: the whole table
TABLES = "verify_tables"  # what the preparation found per table, and the baseline's progress
META = "verify_meta"  # one row: this run's tracking (slot, publication, the slot's exported snapshot)
NOTE_WHOLE = "verify_note_whole"  # trigger function: "this table changed" (no usable key, TRUNCATE)
DELTAS = "verify_deltas"  # (rel, n, h0, h1): +1/-1 and the row hashes of each row a keyless table gained or lost
NOTE_ROWS = "verify_note_rows"  # trigger function: a keyless table's row changes as +/- row hashes
KEY_FUNCTION_PREFIX = "verify_k_"  # per table: the trigger function that records the changed rows' keys
ROW_TRIGGER = "db_upgrade_verify"
TRUNCATE_TRIGGER = "db_upgrade_verify_truncate"
DOLLAR = "$db_upgrade_verify$"

# Our sessions print values the same way on both servers: the row text (and
# its md5) is compared across PostgreSQL 15 and 17, and the keys we store are
# read back as values (a date printed DMY and read MDY would be another date).
NORMALISED = {
    "TimeZone": "UTC",
    "DateStyle": "ISO",
    "IntervalStyle": "postgres",
    "extra_float_digits": "1",  # shortest exact text of floats (PostgreSQL 12+)
    "bytea_output": "hex",
    "lc_monetary": "C",
}


def normalised_options() -> str:
    """libpq `options` setting NORMALISED for a session."""
    return " ".join(f"-c {k}={v}" for k, v in NORMALISED.items())


# Types whose text output does not depend on a session setting: keys of these
# types are stored by the target's triggers without setting NORMALISED first.
NEUTRAL_TYPE_OIDS = frozenset({
    16,  # bool
    18,  # char
    19,  # name
    20, 21, 23,  # int8, int2, int4
    25,  # text
    26,  # oid
    1042, 1043,  # bpchar, varchar
    1700,  # numeric
    2950,  # uuid
})
INTEGER_TYPE_OIDS = frozenset({20, 21, 23})
# reg* types print their referent's name as the session's search_path makes it
# (the apply runs with an empty one): a row holding one has no single text.
REG_TYPE_OIDS = (24, 2202, 2203, 2204, 2205, 2206, 3734, 3769, 4089, 4096, 4191)


def ident(label_parts: tuple[str, str]) -> sql.Identifier:
    return sql.Identifier(*label_parts)


# --- the source's catalogue -----------------------------------------------------------------------

# Every leaf table of the application (partitions included, partitioned parents
# not: their rows are their partitions'), with what decides how verify tracks
# it: persistence, replica identity, its key (the replica identity index when
# REPLICA IDENTITY USING INDEX, else the primary key), the top-level table a
# publication names for it, and its size.
CATALOGUE = f"""
SELECT n.nspname, c.relname, format('%%I.%%I', n.nspname, c.relname), c.relpersistence::text,
       c.relreplident::text, rn.nspname, r.relname, greatest(c.relpages, 1)::bigint,
       pg_table_size(c.oid)::bigint,
       k.cols, k.types, k.type_oids, k.is_primary
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_class r ON r.oid = coalesce(pg_partition_root(c.oid), c.oid)
JOIN pg_namespace rn ON rn.oid = r.relnamespace
LEFT JOIN LATERAL (
  SELECT array_agg(a.attname::text ORDER BY x.ord) AS cols,
         array_agg(format_type(a.atttypid, NULL) ORDER BY x.ord) AS types,
         array_agg(a.atttypid::bigint ORDER BY x.ord) AS type_oids,
         bool_and(i.indisprimary) AS is_primary
  FROM (SELECT i.* FROM pg_index i WHERE i.indrelid = c.oid
          AND CASE WHEN c.relreplident = 'i' THEN i.indisreplident ELSE i.indisprimary END
        LIMIT 1) i
  CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS x(attnum, ord)
  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = x.attnum
) k ON true
WHERE c.relkind = 'r' AND {USER_SCHEMAS}
ORDER BY 1, 2
"""


# Per leaf table: its columns as its row text prints them (count and a
# signature: names and types in order), and whether that text can be rebuilt
# from decoded changes: pgoutput leaves out generated columns, and a reg* value
# prints differently under another search_path.
_REG = ", ".join(map(str, REG_TYPE_OIDS))
COLUMNS = f"""
SELECT format('%%I.%%I', n.nspname, c.relname), count(a.attnum)::int,
       coalesce(string_agg(format('%%I %%s', a.attname, format_type(a.atttypid, a.atttypmod)), ', '
                           ORDER BY a.attnum), ''),
       coalesce(bool_or(a.attgenerated <> ''), false),
       coalesce(bool_or(ty.oid IN ({_REG}) OR ty.typelem IN ({_REG}) OR ty.typbasetype IN ({_REG})), false)
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
LEFT JOIN pg_type ty ON ty.oid = a.atttypid
WHERE c.relkind = 'r' AND {USER_SCHEMAS}
GROUP BY n.nspname, c.relname
"""


def key_range(label: tuple[str, str], column: str) -> sql.Composed:
    return sql.SQL("SELECT min({k})::bigint, max({k})::bigint FROM ONLY {t}").format(
        k=sql.Identifier(column), t=ident(label))


# --- tracking on the source -------------------------------------------------------------------------

def create_publication(name: str, tables: list[tuple[str, str]]) -> sql.Composed:
    """FOR TABLE the given top-level tables (partitions come with their root).
    Never a table without a replica identity: UPDATE and DELETE on it would fail."""
    if not tables:
        return sql.SQL("CREATE PUBLICATION {}").format(sql.Identifier(name))
    return sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
        sql.Identifier(name), sql.SQL(", ").join(ident(t) for t in tables))


def drop_publication(name: str) -> sql.Composed:
    return sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(name))


def create_slot_command(slot: str) -> bytes:
    """Replication-protocol command (simple query protocol): a pgoutput slot and
    the snapshot of its starting point, exported while the connection is idle."""
    if not slot.replace("_", "").isalnum() or not slot.islower():
        raise ValueError(f"not a valid slot name: {slot!r}")
    return f"CREATE_REPLICATION_SLOT {slot} LOGICAL pgoutput (SNAPSHOT 'export')".encode()


PUBLISHED = "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = %s"

# Decoding reads only flushed WAL; with synchronous_commit off the last commits
# may not be flushed yet. A catalog write with synchronous_commit on flushes
# everything before it, and no output plugin ever sees it (catalog changes are
# not decoded): the comment on our own publication is such a write.
def flush_nudge(publication: str) -> sql.Composed:
    return sql.SQL("COMMENT ON PUBLICATION {} IS {}").format(
        sql.Identifier(publication), sql.Literal("db-upgrade verify: change tracking"))


def peek_changes(slot: str, publication: str) -> tuple[str, dict]:
    """pgoutput messages of the slot up to %(upto)s, without consuming them."""
    query = ("SELECT lsn::text, xid::text, data FROM pg_logical_slot_peek_binary_changes("
             "%(slot)s, %(upto)s::pg_lsn, NULL, 'proto_version', '1', 'publication_names', %(pub)s)")
    return query, {"slot": slot, "pub": publication}


SLOT = ("SELECT confirmed_flush_lsn::text, active_pid, pg_current_wal_flush_lsn()::text, "
        "coalesce(wal_status, '') FROM pg_replication_slots WHERE slot_name = %s")


# --- tracking on the target ------------------------------------------------------------------------

def target_ddl() -> sql.Composed:
    s = sql.Identifier(SCHEMA)
    return sql.SQL("""
CREATE SCHEMA IF NOT EXISTS {s};
-- No index and no unique constraint: the apply only appends here (an ON
-- CONFLICT would make it wait on our deletes); rounds delete by ctid, and
-- each round reads it whole: vacuumed as soon as a few thousand rows are dead.
CREATE TABLE IF NOT EXISTS {s}.{pending} (rel text NOT NULL, key text[])
  WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000);
CREATE TABLE IF NOT EXISTS {s}.{tables} (
  rel text PRIMARY KEY,
  nspname text NOT NULL,
  relname text NOT NULL,
  kind text NOT NULL,
  why text,
  key_cols text[],
  key_types text[],
  neutral boolean,
  replident text NOT NULL,
  bucket_kind text,
  width bigint,
  first_bucket bigint,
  last_bucket bigint,
  next_bucket bigint,
  bytes bigint NOT NULL DEFAULT 0,
  target_oid bigint);
CREATE TABLE IF NOT EXISTS {s}.{meta} (
  run_id text NOT NULL,
  slot text NOT NULL,
  publication text NOT NULL,
  l0 pg_lsn,
  snapshot text,
  created_at timestamptz NOT NULL DEFAULT clock_timestamp());
-- Appended by the apply (NOTE_ROWS), consumed by the rounds: no index either.
CREATE TABLE IF NOT EXISTS {s}.{deltas} (rel text NOT NULL, n smallint NOT NULL, h0 bigint NOT NULL,
                                         h1 bigint NOT NULL)
  WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000);
{columns}
CREATE OR REPLACE FUNCTION {s}.{whole}() RETURNS trigger LANGUAGE plpgsql AS {d}
BEGIN
  INSERT INTO {s}.{pending} (rel, key) VALUES (TG_ARGV[0], NULL);
  RETURN NULL;
END
{d};
{rows};
""").format(s=s, pending=sql.Identifier(PENDING), tables=sql.Identifier(TABLES), meta=sql.Identifier(META),
            whole=sql.Identifier(NOTE_WHOLE), d=sql.SQL(DOLLAR), deltas=sql.Identifier(DELTAS),
            columns=sql.SQL("").join(sql.SQL("ALTER TABLE {}.{} ADD COLUMN IF NOT EXISTS {} {};\n").format(
                s, sql.Identifier(TABLES), sql.Identifier(c), sql.SQL(ty)) for c, ty in SUMS_COLUMNS),
            rows=note_rows_function())


# What a keyless table's checksum needs in db_upgrade.verify_tables (added to
# a table an earlier version made, too: a run prepared by it resumes).
SUMS_COLUMNS = (("checksum", "boolean"), ("ncols", "int"), ("columns", "text"), ("src_sums", "text"),
                ("tgt_sums", "text"), ("sums_at", "bigint"), ("sums_snapshot", "text"))


def _row_hashes(expr: str) -> str:
    return f'hashtextextended({expr} COLLATE "C", 0), hashtextextended({expr} COLLATE "C", 1)'


def note_rows_function() -> sql.Composed:
    """The row trigger of a keyless table tracked by its checksum: -1 and the
    hashes of the old row's text, +1 and those of the new row's, appended in
    the same transaction as the change. It prints the row as our sessions do
    (SET clauses: the apply's own settings differ), so that the hashes are
    those of the row text the baseline summed."""
    s = sql.Identifier(SCHEMA)
    settings = sql.SQL(" ").join(
        sql.SQL("SET {} TO {}").format(sql.Identifier(k), sql.Literal(v)) for k, v in NORMALISED.items())
    return sql.SQL("""CREATE OR REPLACE FUNCTION {s}.{fn}() RETURNS trigger LANGUAGE plpgsql {settings} AS {d}
DECLARE
  r text;
BEGIN
  IF TG_OP <> 'INSERT' THEN
    r := OLD::text;
    INSERT INTO {s}.{deltas} (rel, n, h0, h1) VALUES (TG_ARGV[0], -1, {hashes});
  END IF;
  IF TG_OP <> 'DELETE' THEN
    r := NEW::text;
    INSERT INTO {s}.{deltas} (rel, n, h0, h1) VALUES (TG_ARGV[0], 1, {hashes});
  END IF;
  RETURN NULL;
END
{d}""").format(s=s, fn=sql.Identifier(NOTE_ROWS), settings=settings, d=sql.SQL(DOLLAR),
               deltas=sql.Identifier(DELTAS), hashes=sql.SQL(_row_hashes("r")))


def drop_target_objects() -> list[sql.Composed]:
    s = sql.Identifier(SCHEMA)
    return [sql.SQL("DROP TABLE IF EXISTS {}.{}").format(s, sql.Identifier(t))
            for t in (PENDING, TABLES, META, DELTAS)]


def key_function_name(target_oid: int) -> str:
    return f"{KEY_FUNCTION_PREFIX}{target_oid}"


def _key_array(row: str, cols: list[str]) -> sql.Composed:
    return sql.SQL("ARRAY[{}]").format(sql.SQL(", ").join(
        sql.SQL("{}.{}::text").format(sql.SQL(row), sql.Identifier(c)) for c in cols))


def _key_row(row: str, cols: list[str]) -> sql.Composed:
    return sql.SQL("ROW({})").format(sql.SQL(", ").join(
        sql.SQL("{}.{}").format(sql.SQL(row), sql.Identifier(c)) for c in cols))


def key_function(target_oid: int, cols: list[str], neutral: bool) -> sql.Composed:
    """The row trigger's function for one table: the key of each changed row
    (old and new when an UPDATE changes the key), appended in the same
    transaction as the change. Only the key columns are read: a large TOASTed
    value elsewhere in the row is never detoasted."""
    s = sql.Identifier(SCHEMA)
    body = sql.SQL("""
BEGIN
  IF TG_OP = 'DELETE' THEN
    INSERT INTO {s}.{pending} (rel, key) VALUES (TG_ARGV[0], {old});
  ELSE
    INSERT INTO {s}.{pending} (rel, key) VALUES (TG_ARGV[0], {new});
    IF TG_OP = 'UPDATE' AND {old_row} IS DISTINCT FROM {new_row} THEN
      INSERT INTO {s}.{pending} (rel, key) VALUES (TG_ARGV[0], {old});
    END IF;
  END IF;
  RETURN NULL;
END
""").format(s=s, pending=sql.Identifier(PENDING), old=_key_array("OLD", cols), new=_key_array("NEW", cols),
            old_row=_key_row("OLD", cols), new_row=_key_row("NEW", cols))
    text = body.as_string()
    if DOLLAR in text:
        raise ValueError(f"a key column name contains {DOLLAR}")
    settings = sql.SQL("") if neutral else sql.SQL(" ").join(
        sql.SQL("SET {} TO {}").format(sql.Identifier(k), sql.Literal(v)) for k, v in NORMALISED.items())
    return sql.SQL("CREATE OR REPLACE FUNCTION {s}.{fn}() RETURNS trigger LANGUAGE plpgsql {settings} AS {d}{body}{d}").format(
        s=s, fn=sql.Identifier(key_function_name(target_oid)), settings=settings, d=sql.SQL(DOLLAR),
        body=sql.SQL(text))


def install_triggers(label: tuple[str, str], label_text: str, key_fn: str | None) -> list[sql.Composed]:
    """ALWAYS triggers (the native apply and pgcopydb's both run with
    session_replication_role = replica, where ordinary triggers do not fire):
    per row, the key (or "the table changed" without a key); TRUNCATE: the whole table."""
    s = sql.Identifier(SCHEMA)
    t = ident(label)
    fn = sql.Identifier(key_fn or NOTE_WHOLE)
    arg = sql.Literal(label_text)
    return [
        *drop_triggers(label),
        sql.SQL("CREATE TRIGGER {} AFTER INSERT OR UPDATE OR DELETE ON {} FOR EACH ROW EXECUTE FUNCTION {}.{}({})")
        .format(sql.Identifier(ROW_TRIGGER), t, s, fn, arg),
        sql.SQL("CREATE TRIGGER {} AFTER TRUNCATE ON {} FOR EACH STATEMENT EXECUTE FUNCTION {}.{}({})")
        .format(sql.Identifier(TRUNCATE_TRIGGER), t, s, sql.Identifier(NOTE_WHOLE), arg),
        sql.SQL("ALTER TABLE {} ENABLE ALWAYS TRIGGER {}").format(t, sql.Identifier(ROW_TRIGGER)),
        sql.SQL("ALTER TABLE {} ENABLE ALWAYS TRIGGER {}").format(t, sql.Identifier(TRUNCATE_TRIGGER)),
    ]


def drop_triggers(label: tuple[str, str]) -> list[sql.Composed]:
    return [sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(name), ident(label))
            for name in (ROW_TRIGGER, TRUNCATE_TRIGGER)]


# Our triggers as they are now, per table: a table created again (a copy that
# started over) has lost them, and its changes since were recorded by nobody.
TRIGGERS = f"""
SELECT format('%%I.%%I', n.nspname, c.relname), c.oid::bigint, count(*) FILTER (WHERE t.tgenabled = 'A')
FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE t.tgname IN ('{ROW_TRIGGER}', '{TRUNCATE_TRIGGER}') GROUP BY 1, 2
"""
TABLE_OIDS = f"""
SELECT format('%%I.%%I', n.nspname, c.relname), c.oid::bigint FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r' AND {USER_SCHEMAS}
"""
OUR_FUNCTIONS = ("SELECT p.proname::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                 "WHERE n.nspname = %s AND (p.proname LIKE 'verify\\_k\\_%%' OR p.proname = ANY(%s))")
OUR_FUNCTION_NAMES = [NOTE_WHOLE, NOTE_ROWS]
TRIGGERED_TABLES = (f"SELECT DISTINCT n.nspname::text, c.relname::text FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
                    f"JOIN pg_namespace n ON n.oid = c.relnamespace WHERE t.tgname IN ('{ROW_TRIGGER}', '{TRUNCATE_TRIGGER}')")


def drop_function(name: str) -> sql.Composed:
    return sql.SQL("DROP FUNCTION IF EXISTS {}.{}() CASCADE").format(sql.Identifier(SCHEMA), sql.Identifier(name))


def pending_table() -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(SCHEMA), sql.Identifier(PENDING))


def tables_table() -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(SCHEMA), sql.Identifier(TABLES))


def meta_table() -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(SCHEMA), sql.Identifier(META))


def deltas_table() -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(SCHEMA), sql.Identifier(DELTAS))


_DELTA_SUMS = ("coalesce(sum(n), 0)::text, coalesce(sum(n * h0::numeric), 0)::text, "
               "coalesce(sum(n * h1::numeric), 0)::text")


def consume_deltas() -> sql.Composed:
    """Per table, the sum of the row deltas visible in this transaction's
    snapshot, deleted in it (rows the apply appends later stay: not visible,
    not deleted)."""
    return sql.SQL("WITH d AS (DELETE FROM {} RETURNING rel, n, h0, h1) SELECT rel, " + _DELTA_SUMS
                   + " FROM d GROUP BY rel").format(deltas_table())


def read_deltas() -> sql.Composed:
    """The same, read only (the final check changes nothing)."""
    return sql.SQL("SELECT rel, " + _DELTA_SUMS + " FROM {} GROUP BY rel").format(deltas_table())


def decoded_row_sums(ncols: int) -> sql.Composed:
    """(count, sum of hash seed 0, sum of hash seed 1), signed, of rows given
    as decoded text values: %s is an int[] of signs (+1 a row gained, -1 a
    row lost), then one text[] per column. ROW() of the values as text prints
    exactly what the table's row prints (record_out quotes each column's text
    the same way whatever its type), and the values are the type's output in a
    session set as ours (pgoutput prints them in the decoding session)."""
    if ncols < 1:
        raise ValueError("a row needs a column")
    names = [f"c{i}" for i in range(ncols)]
    row = "ROW(" + ", ".join(f"x.{c}" for c in names) + ")::text"
    unnests = ", ".join(["unnest(%s::int[])"] + ["unnest(%s::text[])"] * ncols)
    return sql.SQL(f"SELECT coalesce(sum(x.s), 0)::text, "
                   f"coalesce(sum(x.s * hashtextextended({row} COLLATE \"C\", 0)::numeric), 0)::text, "
                   f"coalesce(sum(x.s * hashtextextended({row} COLLATE \"C\", 1)::numeric), 0)::text "
                   f"FROM ROWS FROM ({unnests}) AS x(s, {', '.join(names)})")


def copy_pending() -> sql.Composed:
    return sql.SQL("COPY {} (rel, key) FROM STDIN").format(pending_table())


def read_pending() -> sql.Composed:
    return sql.SQL("SELECT ctid::text, rel, key FROM {}").format(pending_table())


def delete_pending() -> sql.Composed:
    return sql.SQL("DELETE FROM {} WHERE ctid = ANY(%s::tid[])").format(pending_table())


LOCK = "SELECT pg_advisory_lock(hashtext('db_upgrade'), hashtext('verify'))"
UNLOCK = "SELECT pg_advisory_unlock(hashtext('db_upgrade'), hashtext('verify'))"


# --- comparing ------------------------------------------------------------------------------------

def _sums(expr: str) -> str:
    """An order-independent 128-bit checksum of rows' text: two sums of
    hashtextextended (PostgreSQL's hash of the text's bytes, seeds 0 and 1;
    the same on 15 and 17, as hash partitioning needs it to be across
    versions), three times cheaper than md5 of each row. It hashes the row's
    text, so two values that print differently differ (unlike
    hash_record_extended: numeric 1.0 and 1.00 hash the same). A sum, not an
    XOR: a duplicated row does not cancel out."""
    return (f"coalesce(sum(hashtextextended({expr}, 0)), 0)::text, "
            f"coalesce(sum(hashtextextended({expr}, 1)), 0)::text")


def whole_sums(label: tuple[str, str]) -> sql.Composed:
    """count, and the 128-bit checksum of the row text, of a whole table."""
    return sql.SQL("SELECT count(*), " + _sums("x") + ' FROM (SELECT t::text COLLATE "C" AS x FROM ONLY {} AS t) AS r'
                   ).format(ident(label))


def rows_by_key(label: tuple[str, str], cols: list[str], types: list[str]) -> sql.Composed:
    """(ordinal of the requested key, md5 of the row text) for the rows whose
    key is in the given arrays (one text[] per key column, same length): index
    lookups on the key; a requested key without a row returns nothing."""
    n = len(cols)
    unnests = sql.SQL(", ").join(sql.SQL("unnest(%s::text[])") for _ in range(n))
    names = sql.SQL(", ").join(sql.Identifier(f"k{i}") for i in range(n))
    cond = sql.SQL(" AND ").join(
        sql.SQL("t.{c} = x.{k}::{ty}").format(c=sql.Identifier(c), k=sql.Identifier(f"k{i}"), ty=sql.SQL(ty))
        for i, (c, ty) in enumerate(zip(cols, types)))
    return sql.SQL("SELECT x.ord, md5(t::text) FROM ROWS FROM ({unnests}) WITH ORDINALITY AS x({names}, ord) "
                   "JOIN ONLY {table} AS t ON {cond}").format(unnests=unnests, names=names, table=ident(label),
                                                          cond=cond)


def key_text(cols: list[str], row: str = "t") -> sql.Composed:
    return sql.SQL("ARRAY[{}]").format(sql.SQL(", ").join(
        sql.SQL("{}.{}::text").format(sql.Identifier(row), sql.Identifier(c)) for c in cols))


def bucket_expr(kind: str, cols: list[str], width: int) -> sql.Composed:
    """The bucket of a row: floor(k / width) for an integer leading key column,
    else one of `width` buckets by a hash of the key's text (the same on both
    servers: the sessions print values the same way)."""
    if kind == "range":
        return sql.SQL("floor(t.{}::numeric / {})::bigint").format(sql.Identifier(cols[0]), sql.Literal(width))
    return sql.SQL("((hashtextextended({}::text COLLATE \"C\", 2) & 9223372036854775807) % {})").format(
        key_text(cols), sql.Literal(width))


def range_filter(col: str, width: int, lo: int | None, hi: int | None) -> sql.Composed:
    """Bucket ids lo <= b < hi of a range-bucketed table (None: open-ended)."""
    parts = []
    if lo is not None:
        parts.append(sql.SQL("t.{} >= {}").format(sql.Identifier(col), sql.Literal(lo * width)))
    if hi is not None:
        parts.append(sql.SQL("t.{} < {}").format(sql.Identifier(col), sql.Literal(hi * width)))
    return sql.SQL(" AND ").join(parts) if parts else sql.SQL("true")


def bucket_sums(label: tuple[str, str], kind: str, cols: list[str], width: int,
                where: sql.Composable) -> sql.Composed:
    """(bucket, count, checksum) of the rows matching `where`."""
    return sql.SQL("SELECT b, count(*), " + _sums("x") + ' FROM (SELECT {b} AS b, t::text COLLATE "C" AS x '
                   "FROM ONLY {table} AS t WHERE {where}) AS r GROUP BY b").format(
        b=bucket_expr(kind, cols, width), table=ident(label), where=where)


def bucket_rows(label: tuple[str, str], kind: str, cols: list[str], width: int, where: sql.Composable) -> sql.Composed:
    """(key text, md5 of the row text) of every row in the given buckets."""
    return sql.SQL("SELECT {k}, md5(t::text) FROM ONLY {table} AS t WHERE {where} AND {b} = ANY(%s::bigint[])").format(
        k=key_text(cols), table=ident(label), where=where, b=bucket_expr(kind, cols, width))


# --- the object comparison and sequences ----------------------------------------------------------

OBJECTS = f"""
SELECT 'table ' || format('%%I.%%I', n.nspname, c.relname) FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p') AND {USER_SCHEMAS}
UNION ALL
SELECT 'column ' || format('%%I.%%I', n.nspname, c.relname) || ' ' || format('%%I', a.attname) || ' '
       || format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
  JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped AND {USER_SCHEMAS}
UNION ALL
SELECT 'index ' || format('%%I.%%I', n.nspname, c.relname) FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('i', 'I') AND {USER_SCHEMAS}
UNION ALL
SELECT 'sequence ' || format('%%I.%%I', n.nspname, c.relname) FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'S' AND {USER_SCHEMAS}
UNION ALL
SELECT 'constraint ' || format('%%I.%%I', n.nspname, cl.relname) || ' ' || format('%%I', co.conname)
       || ' ' || co.contype::text FROM pg_constraint co
  JOIN pg_class cl ON cl.oid = co.conrelid JOIN pg_namespace n ON n.oid = cl.relnamespace
  WHERE {USER_SCHEMAS}
"""

SEQUENCES = f"""
SELECT format('%%I.%%I', schemaname, sequencename), last_value FROM pg_sequences n
WHERE {USER_SCHEMAS.replace('n.nspname', 'n.schemaname')}
"""

# Leaf tables now (a table created after the preparation is compared whole).
LEAF_TABLES = f"""
SELECT n.nspname, c.relname, format('%%I.%%I', n.nspname, c.relname), pg_table_size(c.oid)::bigint FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r' AND {USER_SCHEMAS} ORDER BY 1, 2
"""

# Transactions holding an xid that never change this database's application
# rows: another database's (a snapshot spans the cluster), autovacuum's
# (ANALYZE writes only statistics) and our own (db-upgrade-*). The target
# snapshot of a round need not wait for them.
HARMLESS_XIDS = """
SELECT backend_xid::text FROM pg_stat_activity WHERE backend_xid IS NOT NULL
  AND (datid IS DISTINCT FROM (SELECT oid FROM pg_database WHERE datname = current_database())
       OR backend_type = 'autovacuum worker'
       OR (backend_type = 'client backend' AND coalesce(application_name, '') LIKE 'db-upgrade%%'
           AND application_name <> 'db-upgrade-heartbeat'))
UNION ALL
SELECT transaction::text FROM pg_prepared_xacts WHERE database <> current_database()
"""
# Who holds the target snapshot up (for the log when it waits long).
XID_HOLDERS = ("SELECT pid, coalesce(application_name, ''), backend_type, "
               "round(extract(epoch FROM clock_timestamp() - xact_start))::int FROM pg_stat_activity "
               "WHERE backend_xid IS NOT NULL AND datname = current_database() AND pid <> pg_backend_pid()")


def count_pending_keys() -> sql.Composed:
    return sql.SQL("SELECT count(*) FROM {} WHERE key IS NOT NULL").format(pending_table())


def marked_tables() -> sql.Composed:
    """Tables with a "changed as a whole" marker."""
    return sql.SQL("SELECT DISTINCT rel FROM {} WHERE key IS NULL").format(pending_table())


def count_rows(label: tuple[str, str]) -> sql.Composed:
    return sql.SQL("SELECT count(*) FROM ONLY {}").format(ident(label))
