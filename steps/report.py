"""report: the exit handler's last word. One typed report of the run, for an
operator at 3 a.m. (a few log lines), for the Argo UI (the `report` output, JSON)
and for the weeks after (appended to the history, steps/history.py).

It is built from the run's record in the source database (steps/state.py), so
it knows what every step measured even when a pod's outputs were lost, and
from what Argo tells the exit handler: `{{workflow.status}}` and
`{{workflow.failures}}` (parse_failures). The report never fails the step: a
failed exit handler would fail a run whose DAG succeeded.

Last, the run's record is forgotten, except when the run failed and the slot is
kept (DB_UPGRADE_KEEP_SLOT=true): `argo retry` then needs it.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone

from pydantic import BaseModel

from steps import state
from steps.log import log
from steps.settings import StepSettings

REPORT_VERSION = 1


class Failure(BaseModel):
    step: str
    message: str


class RunReport(BaseModel):
    """One run, as stored in the history. Seconds are floats, times UTC ISO 8601 (`...Z`)."""

    version: int = REPORT_VERSION
    run_id: str
    outcome: str  # {{workflow.status}}: Succeeded | Failed | Error (unknown when not given)
    failures: list[Failure] = []
    mode: str  # upgrade | rehearsal
    engine: str | None = None
    started_at: str | None = None
    finished_at: str
    duration_seconds: float | None = None
    copy_seconds: float | None = None  # follow started -> initial copy done
    copy_bytes: int | None = None
    copy_rate_bytes_per_second: float | None = None
    catchup_seconds: float | None = None  # copy done -> lag under the threshold
    lag_at_catchup_bytes: int | None = None
    apply_rate_bytes_per_second: float | None = None  # the change stream's apply rate, when measured
    # Rehearsal: what the frozen window would be (end set -> drained -> verified, the source writing on).
    predicted_write_downtime_seconds: float | None = None
    # Upgrade: freeze committed -> switch done, as measured by the cutover.
    write_downtime_seconds: float | None = None
    # The same with a cluster's per-pod costs added (the local runner's model), when known.
    write_downtime_cluster_seconds: float | None = None
    switched: bool = False  # the applications moved to the target
    verify_ok: bool | None = None
    verify_summary: str | None = None
    verify_seconds: float | None = None
    state_available: bool = True  # False: the source could not be read; only Argo's view is here


def utc_iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _span(start: float | None, end: float | None) -> float | None:
    return round(end - start, 3) if start is not None and end is not None and end >= start else None


def verify_summary(verify: dict | None) -> tuple[bool | None, str | None]:
    """(ok, one line) from the verify step's report as recorded (steps.verify's report as a dict)."""
    if not verify:
        return None, None
    ok = verify.get("ok")
    if isinstance(verify.get("summary"), str):
        return ok, verify["summary"]
    tables = verify.get("tables") or []
    if ok:
        rows = sum(int(t.get("target_rows") or 0) for t in tables if isinstance(t, dict))
        return True, f"ok: {len(tables)} tables, {rows} rows"
    parts = []
    for key, label in (("mismatched", "tables differ"), ("missing_on_target", "missing on target"),
                       ("extra_on_target", "extra on target"), ("sequences_behind", "sequences behind")):
        names = verify.get(key) or []
        if names:
            more = f" and {len(names) - 5} more" if len(names) > 5 else ""
            parts.append(f"{label}: {', '.join(map(str, names[:5]))}{more}")
    return ok, ("FAILED: " + "; ".join(parts)) if parts else ("FAILED" if ok is False else None)


def _measured(st, name: str) -> float | None:
    """A RunState field another step may add later (e.g. a rehearsal's prediction); None until then."""
    value = getattr(st, name, None)
    return float(value) if isinstance(value, (int, float)) else None


def build(st: state.RunState | None, *, run_id: str, mode: str, engine: str | None, status: str,
          failures: list[dict], now: float) -> RunReport:
    """Pure: the report from the run's record and Argo's view of the run."""
    fails = [Failure(step=str(f.get("displayName") or f.get("name") or "?"),
                     message=" ".join(str(f.get("message") or f.get("phase") or "").split()))
             for f in failures]
    if st is None:
        return RunReport(run_id=run_id, outcome=status, failures=fails, mode=mode, engine=engine,
                         finished_at=utc_iso(now), state_available=False)
    copy_seconds = _span(st.follow_started_at, st.copy_done_at)
    rate = None
    if copy_seconds and st.copy_bytes_total:
        rate = round(st.copy_bytes_total / copy_seconds, 1)
    predicted = st.predicted_write_downtime_seconds  # the rehearsal's cutover measured it
    if predicted is None and mode == "rehearsal":
        # No freeze in a rehearsal: the window is what a cutover would do inside it.
        predicted = _span(st.end_position_set_at, st.verified_at or st.drained_at)
    ok, summary = verify_summary(st.verify)
    end = st.finished_at or now
    return RunReport(
        run_id=run_id, outcome=status, failures=fails, mode=mode, engine=st.engine or engine,
        started_at=utc_iso(st.started_at), finished_at=utc_iso(end), duration_seconds=_span(st.started_at, end),
        copy_seconds=copy_seconds, copy_bytes=st.copy_bytes_total, copy_rate_bytes_per_second=rate,
        catchup_seconds=_span(st.copy_done_at, st.caught_up_at), lag_at_catchup_bytes=st.lag_at_catchup,
        apply_rate_bytes_per_second=_measured(st, "apply_rate_bytes_per_second"),
        predicted_write_downtime_seconds=predicted,
        write_downtime_seconds=st.write_downtime_seconds,
        write_downtime_cluster_seconds=_measured(st, "write_downtime_cluster_seconds"),
        switched=st.switch_started_at is not None,
        verify_ok=ok, verify_summary=summary, verify_seconds=st.verify_seconds,
    )


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    from steps.progress import format_eta

    return f"{value:.1f}s" if value < 60 else format_eta(value)


def lines(r: RunReport) -> list[str]:
    """The short readable report for the log."""
    from steps.pg import pretty_bytes

    head = f"db-upgrade {r.mode} {r.run_id}: {r.outcome}"
    if r.failures:
        head += ": " + "; ".join(f"{f.step}: {f.message}".rstrip(": ") for f in r.failures)
    out = [head]
    if not r.state_available:
        out.append("the run's record on the source could not be read: times and measurements are missing")
        return out
    out.append(f"started {r.started_at or '-'}, ended {r.finished_at} ({_seconds(r.duration_seconds)}), "
               f"engine {r.engine or '-'}")
    copy = f"copy {_seconds(r.copy_seconds)}"
    if r.copy_bytes:
        copy += f" ({pretty_bytes(r.copy_bytes)}"
        copy += f", {pretty_bytes(r.copy_rate_bytes_per_second)}/s)" if r.copy_rate_bytes_per_second else ")"
    copy += f", catch-up {_seconds(r.catchup_seconds)}"
    if r.apply_rate_bytes_per_second:
        copy += f", apply {pretty_bytes(r.apply_rate_bytes_per_second)}/s"
    out.append(copy)
    if r.predicted_write_downtime_seconds is not None:
        out.append(f"predicted write-downtime {_seconds(r.predicted_write_downtime_seconds)}")
    if r.write_downtime_seconds is not None:
        line = f"write-downtime {_seconds(r.write_downtime_seconds)} (measured)"
        if r.write_downtime_cluster_seconds is not None:
            line += f", {_seconds(r.write_downtime_cluster_seconds)} with a cluster's pod costs (modelled)"
        out.append(line)
    out.append(f"verify: {r.verify_summary or 'not run'}"
               + (f" in {_seconds(r.verify_seconds)}" if r.verify_seconds is not None else ""))
    out.append("applications switched to the target" if r.switched else "applications not switched: the source "
               "is still the primary")
    return out


def _write_outputs(s: StepSettings, r: RunReport) -> None:
    s.write_output("outcome", r.outcome)
    s.write_output("report", r.model_dump_json())
    # One number per output: what a template's Prometheus gauges read ({{outputs.parameters.X}}).
    for name, value in (("copy-seconds", r.copy_seconds), ("catchup-seconds", r.catchup_seconds),
                        ("predicted-write-downtime-seconds", r.predicted_write_downtime_seconds),
                        ("write-downtime-seconds", r.write_downtime_seconds)):
        s.write_output(name, "" if value is None else f"{value:.3f}")


def frozen_without_switch(st: state.RunState) -> bool:
    return st.frozen_at is not None and st.unfrozen_at is None and st.switch_started_at is None


def report(s: StepSettings) -> str:
    from steps import history

    status = os.environ.get("DB_UPGRADE_WORKFLOW_STATUS") or "unknown"
    failures = parse_failures(os.environ.get("DB_UPGRADE_WORKFLOW_FAILURES") or "")
    st = state.try_load(s)
    r = build(st, run_id=s.run_id, mode=s.mode, engine=s.engine, status=status, failures=failures,
              now=time.time())
    text = lines(r)
    for line in text:
        log(f"report: {line}")
    _write_outputs(s, r)
    history.store(r.model_dump(mode="json"), log)
    if st is None:
        log("report: the run's record is left on the source (it could not be read)")
    elif status != "Succeeded" and s.keep_slot:
        log("report: the run's record is kept for a retry (DB_UPGRADE_KEEP_SLOT=true)")
    elif frozen_without_switch(st):
        # The exit handler's unfreeze decides from this record: forgetting it first would
        # leave the application's writes refused for good.
        log("report: the run's record is kept: the source is frozen and writes were not restored yet")
    else:
        try:
            state.forget(s)
        except Exception as exc:  # never fail the exit handler over bookkeeping
            from steps.pg import scrub

            log(f"report: the run's record could not be removed ({scrub(str(exc))}); "
                "the next preflight lists it")
    return text[0]


def parse_failures(text: str) -> list[dict]:
    """`{{workflow.failures}}` as the exit handler receives it -> one dict per failed node.

    Argo v4.1.2 sets it to strconv.Quote(json.Marshal(failures)) (workflow/controller/operator.go),
    so a run without failures sends `"null"`, quotes included, and one with failures a quoted JSON
    array of {displayName, message, templateName, phase, podName, finishedAt}. Plain JSON is read
    too. Anything unreadable becomes one entry that shows the text, so the report never fails
    (a failed exit handler would fail a run whose DAG succeeded).
    """
    import re

    go_escapes = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
                  "\\": "\\", '"': '"', "'": "'"}

    def go_unquote(quoted: str) -> str:  # strconv.Unquote of a double-quoted Go string literal
        def one(m: re.Match) -> str:
            e = m[1]
            if e[0] in go_escapes:
                return go_escapes[e[0]]
            if e[0] in "xuU":
                return chr(int(e[1:], 16))
            return chr(int(e, 8))  # \NNN octal

        return re.sub(r'\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[0-7]{3}|[abfnrtv\\"\'])',
                      one, quoted[1:-1])

    value = (text or "").strip()
    for _ in range(2):  # at most: Go quoting, then JSON
        if not value or value == "null":
            return []
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = go_unquote(value).strip()
            continue
        try:
            decoded = json.loads(value)
        except ValueError:
            break
        if decoded is None:
            return []
        if isinstance(decoded, dict):
            decoded = [decoded]
        if isinstance(decoded, list):
            return [f if isinstance(f, dict) else {"displayName": "?", "message": str(f)} for f in decoded]
        break
    return [{"displayName": "workflow", "message": f"failures not readable: {(text or '').strip()[:300]}"}]
