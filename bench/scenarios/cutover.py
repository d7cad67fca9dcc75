"""Write-downtime as the application sees it, and its parts.

The application writer (bench/workloads.py) writes through the application
role from before the copy to after the switch. Follow and wait-caught-up run;
verify-prepare starts at the catch-up (as in the DAG); `db-upgrade step
cutover` starts DELAY seconds after the catch-up (writes go on meanwhile; the
cutover itself waits for the verify preparation, writes allowed). Its switch
touches a file; the writer, polling it every 5 ms, moves to the target.

- write-downtime (the application's): its first refused write on the source
  -> its first committed write on the target;
- the cutover's own: the readonly SQL committed -> the switch done
  (`write-downtime-seconds` output);
- the parts: freeze (the readonly SQL until no application transaction from
  before it is open), end position, drain, sequences, verify (the `timings`
  output), switch (the fence lifted, the switch command), and the writer's
  reconnect to the target.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from bench import data
from bench.memory import Monitor
from bench.scenarios import Context
from bench.servers import load_average
from bench.upgrade import StepFailed, Upgrade, log, timings
from bench.workloads import WORKLOADS
from local import workload

CUTOVER_TIMEOUT = 3600
LAG_SAMPLE = 1.0


@dataclass(frozen=True)
class Cell:
    engine: str
    workload: str
    size: int
    rate: int
    delay: int  # seconds from the catch-up to the cutover's start

    def key(self) -> dict:
        return {"engine": self.engine, "workload": self.workload, "size": data.pretty(self.size), "rate": self.rate,
                "delay": self.delay}

    def label(self) -> str:
        return f"{self.engine}/{self.workload}/{data.pretty(self.size)}/{self.rate}/{self.delay}"


def _r(x, nd=3):
    return None if x is None else round(x, nd)


def run(ctx: Context, cell: Cell, tag: str) -> dict:
    wl = WORKLOADS[cell.workload]
    template = ctx.templates[(wl.name, cell.size)]
    out = {"scenario": "cutover", **cell.key(), "tag": tag, "load_average_before": load_average()}
    monitor = Monitor()
    writer = None
    try:
        with Upgrade(ctx.pair, ctx.base, tag, cell.engine, wl.freeze_sql(ctx.base / f"sql_{wl.name}"), template,
                     ctx.jobs, monitor, ctx.pythonpath) as up:
            out["db_bytes"] = data.database_size(up.src)
            up.begin()
            writer = wl.writer(workload.app_uri(up.src), cell.size, cell.rate).start()
            writes_from = time.time()
            out["copy_s"] = up.copy(ctx.catchup_timeout)
            st = up.state()
            caught = st.caught_up_at
            up.start("verify-prepare")
            lags = []
            while time.time() < caught + cell.delay:
                for step in ("follow", "verify-prepare"):
                    if up.procs[step].poll() is not None:
                        raise StepFailed(f"{step} exited {up.procs[step].returncode} before the cutover: "
                                         f"{up.tail(step)}")
                lag = up.lag()
                if lag is not None:
                    lags.append(lag)
                time.sleep(min(LAG_SAMPLE, max(0.0, caught + cell.delay - time.time())))
            seen: dict[str, float] = {}
            target_app = workload.app_uri(up.tgt)

            def on_switch() -> None:
                seen["at"] = time.time()
                seen["ok"] = writer.stats.ok
                seen["errors"] = list(writer.stats.errors[:3])
                writer.stats.errors.clear()  # the writer keeps 20: from here, those after the switch
                writer.switch_to(target_app)

            up.watch_switch(on_switch)
            cutover_started = time.time()
            up.start("cutover")
            rc = up.wait("cutover", CUTOVER_TIMEOUT)
            cutover_ended = time.time()
            if rc != 0:
                raise StepFailed(f"cutover exited {rc}: {up.tail('cutover', 12)}")
            deadline = time.time() + 30
            while writer.stats.first_ok_on_target_at is None and time.time() < deadline:
                time.sleep(0.01)
            time.sleep(0.5)  # a few more writes on the target
            stats = writer.stop()
            writes_to = time.time()
            for step in ("follow", "verify-prepare"):
                rc = up.wait(step, 120)
                out[f"{step}_rc"] = rc
            st = up.state()
            t = timings(up)
            out.update(_record(st, t, stats, seen.get("at"), cutover_started, cutover_ended, lags, up))
            if stats.last_ok_before_refusal and "ok" in seen:
                out["writes_per_second"] = round(seen["ok"] / max(1e-9, stats.last_ok_before_refusal - writes_from), 1)
            out["writes"]["errors_on_source"] = seen.get("errors")
            out["writes"]["ok_on_target"] = stats.ok - seen.get("ok", stats.ok)
            out["writes"]["seconds"] = round(writes_to - writes_from, 1)
            out["check"] = wl.check(up.src, up.tgt, writer)
            if out["check"] is not None and not out["check"]["ok"]:
                out["error"] = f"independent check failed: {out['check']['problems']}"
            if stats.first_ok_on_target_at is None:
                out["error"] = (f"the application could not write to the target within 30 s of the switch: "
                                f"{stats.errors[:3]}")
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"[:3000]
    finally:
        if writer is not None:
            writer.stop()
        out["memory"] = monitor.stop()
    log(f"bench: cutover {cell.label()}: write-downtime {out.get('app_downtime_s')} s (cutover's "
        f"{out.get('cutover_downtime_s')} s; {out.get('timings')})" + (f" ERROR {out['error']}"
                                                                      if out.get("error") else ""))
    return out


def _record(st, t: dict, stats, seen_at, cutover_started, cutover_ended, lags, up) -> dict:
    rec = {}
    if stats.first_refused_at and stats.first_ok_on_target_at:
        rec["app_downtime_s"] = _r(stats.first_ok_on_target_at - stats.first_refused_at)
    out_dt = up.output("write-downtime-seconds")
    rec["cutover_downtime_s"] = float(out_dt) if out_dt else None
    rec["timings"] = t
    if st.frozen_at and st.drained_at:
        rec["freeze_to_drained_s"] = _r(st.drained_at - st.frozen_at)
        rec["freeze_s"] = _r(st.drained_at - st.frozen_at - t.get("end_position", 0) - t.get("drain", 0))
    if st.switch_started_at and st.switched_at:
        rec["switch_s"] = _r(st.switched_at - st.switch_started_at)
    if seen_at and stats.first_ok_on_target_at:
        rec["app_reconnect_s"] = _r(stats.first_ok_on_target_at - seen_at)
    if st.frozen_at and stats.first_refused_at:
        rec["first_refusal_after_freeze_s"] = _r(stats.first_refused_at - st.frozen_at)
    if st.frozen_at:
        rec["cutover_start_to_freeze_s"] = _r(st.frozen_at - cutover_started)
    rec["cutover_step_s"] = _r(cutover_ended - cutover_started)
    rec["settle_s"] = st.settle_seconds
    rec["lag_at_catchup"] = st.lag_at_catchup
    rec["lag_max_before_cutover_mb"] = round(max(lags) / (1 << 20), 2) if lags else None
    rec["lag_last_before_cutover_mb"] = round(lags[-1] / (1 << 20), 2) if lags else None
    rec["prepare_s"] = st.verify_prepare_seconds
    if st.verify_prepared_at and st.caught_up_at:
        rec["prepared_after_catchup_s"] = _r(st.verify_prepared_at - st.caught_up_at, 1)
        rec["cutover_waited_for_prepare_s"] = _r(max(0.0, st.verify_prepared_at - cutover_started), 1)
    rec["verify_rounds"] = st.verify_rounds
    rec["verify_last_round"] = st.verify_last_round
    rec["verify_keys_rechecked"] = st.verify_keys_rechecked
    rec["verify_whole_tables"] = st.verify_whole_tables
    rec["verify_seconds"] = st.verify_seconds
    rec["verify"] = st.verify
    rec["late_writes"] = st.late_writes
    rec["writes"] = {"ok": stats.ok, "refused": stats.refused, "failed_transactions": stats.failed_transactions,
                     "errors_after_switch": stats.errors[:3]}
    return rec
