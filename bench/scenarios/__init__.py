"""The bench's scenarios, one module each:

- copy: the initial copy, no writes: the follow step of each engine from its
  start to wait-caught-up's "caught up", and bare `pgcopydb clone` (reference).
- apply: the highest pgbench TPC-B rate at which the lag stays flat, per engine.
- cutover: write-downtime as the application sees it, and its parts, under a
  workload at a rate, with the cutover some seconds after the catch-up.

Each `run()` returns one JSON-able dict (the run's record in the results file),
with `error` set instead of raising when the run failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

ENGINES = ("native", "pgcopydb-follow")


@dataclass
class Context:
    pair: object  # local.servers.Pair
    base: Path
    jobs: tuple[int, int]
    catchup_timeout: float = 1800
    pythonpath: str | None = None
    templates: dict = field(default_factory=dict)  # (workload, size) -> template database name
