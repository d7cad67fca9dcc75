"""The highest write rate at which the lag stays flat, per engine.

`pgbench -i -s N` on the source (the tpcb template) before the copy; follow
until caught up; then, at increasing rates, `pgbench -b tpcb-like -c 8 -R RATE
-T 30` against the source as the application role, the lag (the engine's own
measure: source WAL position minus what the target applied) read before and
after each interval. A rate is kept up with ("flat") when the lag at the end
is within FLAT_GROWTH of the lag at the start, or under FLAT_ABSOLUTE. Between
rates the lag is let fall back under 1 MB. The scan stops at the first rate
that is not flat, or when pgbench no longer reaches the rate asked (the
machine, not the apply, is then the limit: said in the record).
"""

from __future__ import annotations

import threading
import time

from bench import data, tpcb
from bench.memory import Monitor
from bench.scenarios import Context
from bench.upgrade import Upgrade, log
from bench.workloads import WORKLOADS
from local import workload

MiB = 1 << 20
FLAT_ABSOLUTE = 8 * MiB
FLAT_GROWTH = 4 * MiB
SECONDS = 30
REACHED = 0.9  # pgbench reached the rate when it ran at least this share of it


def lag_flat(start: int | None, end: int | None) -> bool:
    """The brief's test: lag at the end within a few MB of the start, or under 8 MB."""
    if end is None:
        return False
    return end < FLAT_ABSOLUTE or (start is not None and end - start <= FLAT_GROWTH)


def _settle(up: Upgrade, timeout: float = 180) -> int | None:
    deadline = time.monotonic() + timeout
    lag = up.lag()
    while (lag is None or lag > MiB) and time.monotonic() < deadline:
        time.sleep(1)
        lag = up.lag()
    return lag


def _sample(up: Upgrade, samples: list[int], stop: threading.Event) -> None:
    while not stop.wait(1.0):
        lag = up.lag()
        if lag is not None:
            samples.append(lag)


def run(ctx: Context, size: int, engine: str, rates: list[int], tag: str, seconds: int = SECONDS) -> dict:
    wl = WORKLOADS["tpcb"]
    template = ctx.templates[(wl.name, size)]
    out = {"scenario": "apply", "size": data.pretty(size), "engine": engine, "tag": tag, "seconds_per_rate": seconds,
           "steps": []}
    monitor = Monitor()
    try:
        with Upgrade(ctx.pair, ctx.base, tag, engine, wl.freeze_sql(ctx.base / f"sql_{wl.name}"), template,
                     ctx.jobs, monitor, ctx.pythonpath) as up:
            out["db_bytes"] = data.database_size(up.src)
            up.begin()
            out["copy_s"] = up.copy(ctx.catchup_timeout)
            app = workload.app_uri(up.src)
            for rate in rates:
                lag0 = _settle(up)
                samples: list[int] = []
                stop = threading.Event()

                t = threading.Thread(target=_sample, args=(up, samples, stop), daemon=True)
                t.start()
                pb = tpcb.run_pgbench(app, rate, seconds)
                text = pb.communicate(timeout=seconds + 120)[0]
                lag1 = up.lag()
                stop.set()
                t.join(5)
                result = tpcb.parse_pgbench(text)
                step = {"rate": rate, "tps": result["tps"], "failed": result["failed"],
                        "lag_start_mb": None if lag0 is None else round(lag0 / MiB, 2),
                        "lag_end_mb": None if lag1 is None else round(lag1 / MiB, 2),
                        "lag_max_mb": round(max(samples) / MiB, 2) if samples else None,
                        "flat": lag_flat(lag0, lag1), "pgbench_rc": pb.returncode}
                step["reached"] = bool(result["tps"]) and result["tps"] >= REACHED * rate
                if pb.returncode != 0:
                    step["pgbench_tail"] = text.strip().splitlines()[-5:]
                out["steps"].append(step)
                log(f"bench: apply {engine} rate {rate}: {result['tps']} tps, lag {step['lag_start_mb']} -> "
                    f"{step['lag_end_mb']} MB (max {step['lag_max_mb']}), flat {step['flat']}")
                if not step["flat"] or not step["reached"]:
                    break
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    finally:
        out["memory"] = monitor.stop()
    flat = [st for st in out["steps"] if st["flat"] and st["reached"]]
    out["max_flat_tps"] = max((st["tps"] for st in flat), default=None)
    last = out["steps"][-1] if out["steps"] else None
    out["limited_by"] = (None if last is None else "apply (lag grew)" if not last["flat"]
                         else "machine (pgbench did not reach the rate)" if not last["reached"] else "rates tried")
    log(f"bench: apply {engine}: highest flat rate {out['max_flat_tps']} tps, limited by {out['limited_by']}")
    return out
