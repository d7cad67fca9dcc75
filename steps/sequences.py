"""Sequences: logical replication does not carry them, so the cutover sets every
sequence of the target (identity columns' included) from the frozen source.

Never behind: a target sequence already past the source's (it should not be,
the target is fenced) is left where it is, and said.
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

from steps.log import log
from steps.pg import connect
from steps.settings import StepSettings

SEQUENCES = ("SELECT n.nspname, c.relname, s.seqincrement FROM pg_class c "
             "JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_sequence s ON s.seqrelid = c.oid "
             "WHERE c.relkind = 'S' AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgcopydb', 'db_upgrade') "
             "AND n.nspname NOT LIKE 'pg_temp%' ORDER BY 1, 2")


@dataclass(frozen=True)
class SeqState:
    last_value: int
    is_called: bool

    def next_value(self, increment: int) -> int:
        """The value nextval() would return: what "behind" is measured by."""
        return self.last_value + increment if self.is_called else self.last_value


def read_one(schema: str, name: str) -> sql.Composed:
    return sql.SQL("SELECT last_value, is_called FROM {}").format(sql.Identifier(schema, name))


# setval by the quoted name, built server side from plain parameters.
SET_ONE = "SELECT setval(format('%%I.%%I', %s::text, %s::text)::regclass, %s, %s)"


def plan(source: dict, target: dict, increments: dict) -> tuple[dict, list[str]]:
    """(sequences to set -> source state, sequences ahead on the target) — pure."""
    to_set, ahead = {}, []
    for key, src in source.items():
        tgt = target.get(key)
        inc = increments[key]
        if tgt is not None:
            behind = tgt.next_value(inc) < src.next_value(inc) if inc > 0 else tgt.next_value(inc) > src.next_value(inc)
            if not behind:
                if tgt != src:
                    ahead.append(".".join(key))
                continue
        to_set[key] = src
    return to_set, ahead


def sync(s: StepSettings) -> int:
    """Set the target's sequences from the source's; returns how many were set."""
    with connect(s.source(), "source", purpose="sequences") as src, \
            connect(s.target(), "target", purpose="sequences") as tgt:
        rows = src.execute(SEQUENCES).fetchall()
        increments = {(r[0], r[1]): int(r[2]) for r in rows}
        source = {k: SeqState(*src.execute(read_one(*k)).fetchone()) for k in increments}
        present = {(r[0], r[1]) for r in tgt.execute(SEQUENCES).fetchall()}
        target = {k: SeqState(*tgt.execute(read_one(*k)).fetchone()) for k in increments if k in present}
        to_set, ahead = plan(source, {k: v for k, v in target.items()}, increments)
        with tgt.transaction():
            for key, value in to_set.items():
                if key in present:
                    tgt.execute(SET_ONE, (*key, value.last_value, value.is_called))
    if ahead:
        log(f"sequences: {len(ahead)} target sequence(s) already past the source, left as they are: "
            f"{', '.join(ahead[:5])}")
    missing = sorted(".".join(k) for k in to_set if k not in present)
    if missing:
        log(f"sequences: {len(missing)} source sequence(s) missing on the target: {', '.join(missing[:5])} "
            "(verify names them)")
    log(f"sequences: {len(to_set) - len(missing)} of {len(source)} set on the target from the source")
    return len(to_set) - len(missing)
