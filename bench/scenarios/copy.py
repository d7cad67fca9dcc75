"""The initial copy, no writes, on the project's sample database.

- `native`, `pgcopydb-follow`: `db-upgrade step follow` with that engine, from
  the start of the step's process to wait-caught-up's record of the catch-up
  (it polls every 0.2 s here). Includes the step's start, the engine's setup
  (native: publication, slot with exported snapshot; then the subscription),
  pgcopydb's clone, and the catch-up.
- `pgcopydb clone`: bare pgcopydb 0.17 with the same jobs, same databases.
"""

from __future__ import annotations

import subprocess
import time

from bench import data
from bench.memory import Monitor
from bench.scenarios import ENGINES, Context
from bench.upgrade import Upgrade, log
from bench.workloads import WORKLOADS

BARE = "pgcopydb clone"
TOOLS = (*ENGINES, BARE)


def run(ctx: Context, size: int, tool: str, tag: str) -> dict:
    wl = WORKLOADS["writer"]
    template = ctx.templates[(wl.name, size)]
    out = {"scenario": "copy", "size": data.pretty(size), "tool": tool, "tag": tag}
    monitor = Monitor()
    engine = tool if tool in ENGINES else "native"
    try:
        with Upgrade(ctx.pair, ctx.base, tag, engine, wl.freeze_sql(ctx.base / f"sql_{wl.name}"), template,
                     ctx.jobs, monitor, ctx.pythonpath) as up:
            out["db_bytes"] = data.database_size(up.src)
            if tool in ENGINES:
                up.begin()
                out["seconds"] = up.copy(ctx.catchup_timeout)
                st = up.state()
                out["copy_phase_s"] = round(st.copy_done_at - st.follow_started_at, 2)
                out["lag_at_catchup"] = st.lag_at_catchup
                up.run("finish", timeout=120)
                up.wait("follow", 300)
            else:
                from steps import pgcopydb

                workdir = up.dir / "work"
                argv = pgcopydb.locate(workdir).argv("clone", "--dir", str(workdir), "--table-jobs",
                                                     str(ctx.jobs[0]), "--index-jobs", str(ctx.jobs[1]))
                t0 = time.time()
                with open(up.logs / "pgcopydb-clone.log", "w") as f:
                    proc = subprocess.Popen(argv, env=up.env, stdout=f, stderr=subprocess.STDOUT,
                                            start_new_session=True)
                    monitor.watch("pgcopydb clone", proc.pid)
                    rc = proc.wait(timeout=ctx.catchup_timeout)
                out["seconds"] = round(time.time() - t0, 2)
                if rc != 0:
                    raise RuntimeError(f"pgcopydb clone exited {rc}, see {up.logs / 'pgcopydb-clone.log'}")
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    finally:
        out["memory"] = monitor.stop()
    log(f"bench: copy {data.pretty(size)} {tool}: {out.get('seconds')} s" + (f" ERROR {out['error']}"
                                                                               if out.get("error") else ""))
    return out
