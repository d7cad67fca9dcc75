"""verify: compare the frozen source with the target, exactly.

- the sets of tables, indexes, constraints and sequences;
- per table: row count and an order-independent 128-bit checksum of the rows'
  text (md5 of each row, summed as two 64-bit halves: no duplicate cancels out);
- sequences: the target's last_value must not be behind the source's.

In rehearsal mode the source keeps taking writes after the endpos, so row
counts are reported with their drift and only missing or extra objects, or an
empty side where the other has rows, fail the step.
"""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import psycopg
from psycopg import sql

from steps import state
from steps.errors import StepError
from steps.log import log
from steps.pg import connect
from steps.settings import StepSettings

SCHEMA_FILTER = ("n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgcopydb') "
                 "AND n.nspname NOT LIKE 'pg_toast%%' AND n.nspname NOT LIKE 'pg_temp%%'")

OBJECTS = f"""
SELECT 'table ' || format('%%I.%%I', n.nspname, c.relname) FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p') AND {SCHEMA_FILTER}
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

SEQUENCES = f"""
SELECT format('%%I.%%I', schemaname, sequencename), last_value FROM pg_sequences n
WHERE {SCHEMA_FILTER.replace('n.nspname', 'n.schemaname')}
"""


def checksum_query(schema: str, table: str) -> sql.Composed:
    return sql.SQL(
        "SELECT count(*), coalesce(sum(('x' || substr(h, 1, 16))::bit(64)::bigint::numeric), 0)::text"
        " || ':' || coalesce(sum(('x' || substr(h, 17, 16))::bit(64)::bigint::numeric), 0)::text"
        " FROM (SELECT md5(t::text) AS h FROM ONLY {} AS t) AS rows"
    ).format(sql.Identifier(schema, table))


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


def _sums(uri: str, role: str, tables: list[tuple[str, str, str]]) -> dict[str, tuple[int, str]]:
    out = {}
    with connect(uri, role, autocommit=False) as conn:
        # One snapshot for the whole comparison on this side.
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        for schema, table, label in tables:
            count, digest = conn.execute(checksum_query(schema, table)).fetchone()
            out[label] = (count, digest)
        conn.rollback()
    return out


def verify(s: StepSettings) -> VerifyReport:
    rehearsal = s.mode == "rehearsal"
    report = VerifyReport(ok=True, mode=s.mode)
    log(f"verify: comparing source and target ({'rehearsal: schema exact, counts with drift' if rehearsal else 'exact'})")
    with connect(s.source(), "source") as src, connect(s.target(), "target") as tgt:
        so, to = _objects(src), _objects(tgt)
        report.missing_on_target = sorted(so - to)
        report.extra_on_target = sorted(to - so)
        tables = src.execute(TABLES, ()).fetchall()
        src_seq = dict(src.execute(SEQUENCES, ()).fetchall())
        tgt_seq = dict(tgt.execute(SEQUENCES, ()).fetchall())
    log(f"verify: {len(so)} objects on the source, {len(to)} on the target")
    present = [t for t in tables if f"table {t[2]}" not in report.missing_on_target]
    with ThreadPoolExecutor(2) as pool:
        fs = pool.submit(_sums, s.source(), "source", present)
        ft = pool.submit(_sums, s.target(), "target", present)
        src_sums, tgt_sums = fs.result(), ft.result()
    for key in src_sums:
        (sc, sd), (tc, td) = src_sums[key], tgt_sums[key]
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
        state.update(s.dir, verify=asdict(report), verified_at=state.now())
    s.write_output("verify", report.summary())
    if not report.ok:
        raise StepError(f"verify: {report.summary()}")
    log(f"verify: {report.summary()}")
    return report
