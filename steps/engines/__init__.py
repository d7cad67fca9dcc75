"""The change engines: `native` (PostgreSQL's logical replication, the default)
and `pgcopydb-follow` (pgcopydb 0.17's change stream). steps/engines/base.py
says what each provides; nothing outside this package depends on which one runs."""

from __future__ import annotations

from steps.engines.base import Engine
from steps.settings import StepSettings


def get(s: StepSettings) -> Engine:
    if s.engine == "pgcopydb-follow":
        from steps.engines.pgcopydb_follow import PgcopydbFollow

        return PgcopydbFollow(s)
    from steps.engines.native import Native

    return Native(s)


__all__ = ["Engine", "get"]
