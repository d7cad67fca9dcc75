"""The two workloads a run can carry, behind one small interface:

- `tpcb`: pgbench's TPC-B database and the application-side TPC-B writer
  (bench/tpcb.py): uniformly random updates, one table without a key
  (pgbench_history, inserts only).
- `writer`: the project's sample database (bench/data.py, local.workload's
  schema) and local.workload.Writer, the project's current writer: inserts,
  updates and deletes on recent rows, a partitioned table, and UPDATE/DELETE
  on the table without a primary key (REPLICA IDENTITY FULL).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench import data, tpcb
from local import workload


@dataclass(frozen=True)
class Workload:
    name: str
    description: str

    def threads(self, rate: float) -> int:
        if self.name == "tpcb":
            return 12 if rate > 200 else 4  # 8 reached 90% of 500/s on the loaded machine
        # Its transactions look up recent rows (and scan the keyless table): 4 threads
        # reached 300 of 500/s and 2 reached 80 of 100/s on the shared machine.
        return 8 if rate > 200 else 4

    def ensure_template(self, server_uri: str, size: int, log) -> str:
        """The template database for this size (generated once); its name."""
        if self.name == "tpcb":
            name = tpcb.template_name(size)
            data.ensure_database(server_uri, name, lambda uri: tpcb.initialize(uri, tpcb.scale_for(size)), log,
                                 what=f"pgbench scale {tpcb.scale_for(size)}")
            return name
        data.ensure_template(server_uri, size, log=log)
        return data.template_name(size)

    def freeze_sql(self, directory: Path) -> tuple:
        return tpcb.freeze_sql_files(directory) if self.name == "tpcb" else workload.freeze_sql_files(directory)

    def writer(self, app_uri: str, size: int, rate: float) -> workload.Writer:
        if self.name == "tpcb":
            return tpcb.TpcbWriter(app_uri, tpcb.scale_for(size), rate=rate, threads=self.threads(rate))
        return workload.Writer(app_uri, rate=rate, threads=self.threads(rate))

    def check(self, src: str, tgt: str, writer) -> dict | None:
        """An independent check after the cutover (the cutover's own verify is the exact one)."""
        if self.name == "tpcb":
            return tpcb.check(src, tgt, writer)
        return None


WORKLOADS = {
    "tpcb": Workload("tpcb", "pgbench TPC-B (uniformly random updates), application-side writer"),
    "writer": Workload("writer", "the project's current writer (local.workload.Writer) on the sample schema"),
}
