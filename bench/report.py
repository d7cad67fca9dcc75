"""The tables `python -m bench` prints and keeps in the results file: medians
over runs, alternatives side by side, from the runs' records (one results
file or several merged: `python -m bench --report FILE...`)."""

from __future__ import annotations

import statistics

TARGET_DOWNTIME = 1.0


def median(xs):
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 3) if xs else None


def _f(x, nd=2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _ok(rs):
    return [r for r in rs if not r.get("error")]


def _span(xs) -> str:
    xs = [x for x in xs if x is not None]
    return f"{min(xs):.2f}-{max(xs):.2f}" if len(xs) > 1 else "-"


def other_parts(r: dict) -> float | None:
    """The cutover's window minus its timed parts: its state records, the fence lifted,
    and whatever else the cutover does between them."""
    t = r.get("timings") or {}
    parts = [r.get("freeze_s"), r.get("switch_s"), *t.values()]
    if r.get("cutover_downtime_s") is None or not t or any(p is None for p in parts):
        return None
    return r["cutover_downtime_s"] - sum(parts)


def copy_table(runs: list[dict]) -> list[str]:
    rs = [r for r in runs if r.get("scenario") == "copy"]
    if not rs:
        return []
    lines = ["Initial copy, no writes, the project's sample database: seconds, median (follow step start -> "
             "caught up; bare pgcopydb clone for reference)",
             "| size | native | pgcopydb-follow | bare pgcopydb clone | native / bare | pgcopydb-follow / bare | "
             "runs (ok/all) |", "|---|---|---|---|---|---|---|"]
    for size in dict.fromkeys(r["size"] for r in rs):
        m = {t: median([r.get("seconds") for r in _ok(rs) if r["size"] == size and r["tool"] == t])
             for t in ("native", "pgcopydb-follow", "pgcopydb clone")}
        bare = m["pgcopydb clone"]
        ratio = {t: (round(m[t] / bare, 2) if m[t] and bare else None) for t in ("native", "pgcopydb-follow")}
        n_ok = len([r for r in _ok(rs) if r["size"] == size])
        n = len([r for r in rs if r["size"] == size])
        lines.append(f"| {size} | {_f(m['native'])} | {_f(m['pgcopydb-follow'])} | {_f(bare)} | "
                     f"{_f(ratio['native'])} | {_f(ratio['pgcopydb-follow'])} | {n_ok}/{n} |")
    return lines


def apply_table(runs: list[dict]) -> list[str]:
    rs = [r for r in runs if r.get("scenario") == "apply"]
    if not rs:
        return []
    lines = ["Highest pgbench TPC-B rate with a flat lag (pgbench -b tpcb-like -c 8 -R RATE -T 30 on the source; "
             "flat: lag at the end < 8 MB or within 4 MB of the start), tps",
             "| size | engine | highest flat rate (median) | limited by | per rate: asked -> pgbench tps, lag start -> "
             "end (max) MB | runs |", "|---|---|---|---|---|---|"]
    for size, engine in dict.fromkeys((r["size"], r["engine"]) for r in rs):
        group = [r for r in rs if (r["size"], r["engine"]) == (size, engine)]
        detail = "; ".join(", ".join(f"{st['rate']} -> {_f(st['tps'], 0)}, {_f(st['lag_start_mb'], 1)} -> "
                                     f"{_f(st['lag_end_mb'], 1)} ({_f(st['lag_max_mb'], 1)})"
                                     for st in r["steps"]) for r in group)
        limits = ", ".join(sorted({r.get("limited_by") or "-" for r in group}))
        lines.append(f"| {size} | {engine} | {_f(median([r.get('max_flat_tps') for r in group]), 0)} | {limits} | "
                     f"{detail} | {len(group)} |")
    return lines


def _cells(rs, keys):
    return list(dict.fromkeys(tuple(r[k] for k in keys) for r in rs))


def drained_table(runs: list[dict]) -> list[str]:
    rs = [r for r in runs if r.get("scenario") == "cutover"]
    if not rs:
        return []
    keys = ("size", "rate", "engine", "workload")
    lines = ["Freeze -> drained (the readonly SQL committed -> the target shows the end position), seconds, median "
             "over the cutover runs of both delays",
             "| size | writes/s | engine | workload | freeze -> drained | of which end position + drain | runs |",
             "|---|---|---|---|---|---|---|"]
    for cell in sorted(_cells(rs, keys), key=lambda c: (c[0], c[1], c[3], c[2])):
        group = [r for r in _ok(rs) if tuple(r[k] for k in keys) == cell]
        ed = [(r["timings"].get("end_position", 0) + r["timings"].get("drain", 0)) if r.get("timings") else None
              for r in group]
        lines.append(f"| {cell[0]} | {cell[1]} | {cell[2]} | {cell[3]} | "
                     f"{_f(median([r.get('freeze_to_drained_s') for r in group]), 3)} | {_f(median(ed), 3)} | "
                     f"{len(group)} |")
    return lines


def downtime_table(runs: list[dict]) -> list[str]:
    rs = [r for r in runs if r.get("scenario") == "cutover"]
    if not rs:
        return []
    keys = ("engine", "workload", "size", "rate", "delay")
    lines = ["Write-downtime as the application sees it (its first refused write -> its first committed write on "
             "the target) and its parts, seconds, median",
             "| engine | workload | size | writes/s | cutover after catch-up | write-downtime | range | cutover's own "
             "(freeze -> switched) | freeze | end position + drain | sequences | verify | verify teardown | switch | other | "
             "app reconnect | "
             "keys re-checked in the window | tables re-read whole | runs (ok/all) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for cell in sorted(_cells(rs, keys), key=lambda c: (c[2], c[1], c[3], c[4], c[0])):
        every = [r for r in rs if tuple(r[k] for k in keys) == cell]
        group = _ok(every)

        def m(field, sub=None):
            if sub:
                return median([(r.get(field) or {}).get(sub) for r in group])
            return median([r.get(field) for r in group])

        ed = median([(r["timings"].get("end_position", 0) + r["timings"].get("drain", 0)) if r.get("timings")
                     else None for r in group])
        whole = sorted({t for r in group for t in (r.get("verify_whole_tables") or [])})
        lines.append(f"| {cell[0]} | {cell[1]} | {cell[2]} | {cell[3]} | {cell[4]} s | "
                     f"**{_f(m('app_downtime_s'))}** | {_span([r.get('app_downtime_s') for r in group])} | "
                     f"{_f(m('cutover_downtime_s'))} | {_f(m('freeze_s'), 3)} | {_f(ed, 3)} | "
                     f"{_f(m('timings', 'sequences'), 3)} | {_f(m('timings', 'verify'), 3)} | "
                     f"{_f(m('timings', 'verify_teardown'), 3)} | "
                     f"{_f(m('switch_s'), 3)} | {_f(median([other_parts(r) for r in group]), 3)} | "
                     f"{_f(m('app_reconnect_s'), 3)} | "
                     f"{_f(m('verify_keys_rechecked'), 0)} | {', '.join(whole) or '-'} | "
                     f"{len(group)}/{len(every)} |")
    return lines


VERIFY_PARTS = ("decode", "keys", "final", "checksums", "snapshots", "commit", "connect", "wait-apply", "check")


def verify_table(runs: list[dict]) -> list[str]:
    """Where the window's verify spends its time (steps/verify's own timings), native at 500 writes/s."""
    rs = _ok([r for r in runs if r.get("scenario") == "cutover" and r.get("verify") and r["rate"] == 500
              and r["engine"] == "native"])
    if not rs:
        return []
    keys = ("workload", "size", "delay")
    seen = {p for r in rs for p in (r["verify"].get("timings") or {})}
    parts = [p for p in VERIFY_PARTS if p in seen]  # the parts this version of steps/verify reports
    lines = ["The window's verify, native engine at 500 writes/s: its parts (steps/verify timings), ms, median",
             "| workload | size | cutover after catch-up | verify | " + " | ".join(parts)
             + " | rest | keys re-checked | rows re-read whole | last round before the freeze, s | runs |",
             "|" + "---|" * (len(parts) + 9)]
    for cell in sorted(_cells(rs, keys), key=lambda c: (c[1], c[0], c[2])):
        group = [r for r in rs if tuple(r[k] for k in keys) == cell]
        ms = {p: median([1000 * (r["verify"].get("timings") or {}).get(p, 0) for r in group]) for p in parts}
        total = median([1000 * (r.get("timings") or {}).get("verify", 0) for r in group])
        rest = median([1000 * ((r.get("timings") or {}).get("verify", 0)
                               - sum((r["verify"].get("timings") or {}).values()))
                       for r in group])
        whole_rows = median([sum(t.get("source_rows") or 0 for t in r["verify"].get("tables", []) if t.get("how") == "whole")
                             for r in group])
        last = median([(r.get("verify_last_round") or {}).get("seconds") for r in group])
        lines.append(f"| {cell[0]} | {cell[1]} | {cell[2]} s | {_f(total, 0)} | "
                     + " | ".join(_f(ms[p], 0) for p in parts)
                     + f" | {_f(rest, 0)} | {_f(median([r.get('verify_keys_rechecked') for r in group]), 0)} | "
                       f"{_f(whole_rows, 0)} | {_f(last)} | {len(group)} |")
    return lines


def before_table(runs: list[dict]) -> list[str]:
    """What happens before the window (writes allowed): not downtime, but what the operator waits."""
    rs = _ok([r for r in runs if r.get("scenario") == "cutover"])
    if not rs:
        return []
    keys = ("engine", "workload", "size", "rate", "delay")
    lines = ["Before the window (writes allowed), seconds, median",
             "| engine | workload | size | writes/s | cutover after catch-up | copy (follow start -> caught up, under "
             "writes) | verify preparation | prepared after catch-up | cutover start -> freeze (waits for the "
             "preparation, settle, last round) | max lag before the cutover, MB | runs |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for cell in sorted(_cells(rs, keys), key=lambda c: (c[2], c[1], c[3], c[4], c[0])):
        group = [r for r in rs if tuple(r[k] for k in keys) == cell]
        lines.append(f"| {cell[0]} | {cell[1]} | {cell[2]} | {cell[3]} | {cell[4]} s | "
                     f"{_f(median([r.get('copy_s') for r in group]), 1)} | "
                     f"{_f(median([r.get('prepare_s') for r in group]), 1)} | "
                     f"{_f(median([r.get('prepared_after_catchup_s') for r in group]), 1)} | "
                     f"{_f(median([r.get('cutover_start_to_freeze_s') for r in group]), 1)} | "
                     f"{_f(median([r.get('lag_max_before_cutover_mb') for r in group]), 1)} | {len(group)} |")
    return lines


def memory_table(runs: list[dict]) -> list[str]:
    peaks: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        for step, p in (r.get("memory") or {}).items():
            peaks.setdefault((step, r.get("size", "?")), []).append(p)
    if not peaks:
        return []
    lines = ["Peak memory of the step processes (their process tree: pgcopydb's processes included for follow), "
             "MB, the highest over all runs",
             "| step | size | peak RSS | peak PSS | of which pgcopydb (RSS / PSS) | runs |", "|---|---|---|---|---|---|"]
    for (step, size) in sorted(peaks):
        ps = peaks[(step, size)]
        lines.append(f"| {step} | {size} | {max(p.get('rss_mb', 0) for p in ps):.0f} | "
                     f"{max(p.get('pss_mb', 0) for p in ps):.0f} | "
                     f"{max(p.get('pgcopydb_rss_mb', 0) for p in ps):.0f} / "
                     f"{max(p.get('pgcopydb_pss_mb', 0) for p in ps):.0f} | {len(ps)} |")
    return lines


def _done_when_cells(runs: list[dict]) -> list[dict]:
    """Issue 13's cells: the default engine, 500 writes/s, the cutover 120 s after the catch-up."""
    return [r for r in runs if r.get("scenario") == "cutover" and r["engine"] == "native" and r["rate"] == 500
            and r["delay"] == 120]


def done_when(runs: list[dict]) -> list[str]:
    rs = _done_when_cells(runs)
    if not rs:
        return []
    lines = [f"Issue 13's done-when cells (native, 500 writes/s, cutover 120 s after catch-up; target median "
             f"<= {TARGET_DOWNTIME:.0f} s):"]
    for size, wl in dict.fromkeys((r["size"], r["workload"]) for r in rs):
        group = [r for r in rs if (r["size"], r["workload"]) == (size, wl)]
        ok = _ok(group)
        m = median([r.get("app_downtime_s") for r in ok])
        verdict = "-" if m is None else ("met" if m <= TARGET_DOWNTIME else f"missed by {m - TARGET_DOWNTIME:.2f} s")
        lines.append(f"- {size}, {wl}: median {_f(m)} s over {len(ok)} run(s) "
                     f"({', '.join(_f(r.get('app_downtime_s')) for r in ok)}); {verdict}"
                     + (f"; {len(group) - len(ok)} failed run(s)" if len(group) > len(ok) else ""))
    return lines


def errors(runs: list[dict]) -> list[str]:
    bad = [r for r in runs if r.get("error")]
    if not bad:
        return []
    return ["Failed runs:"] + [f"- {r.get('scenario')} {r.get('tag')} "
                               f"{'/'.join(str(r.get(k)) for k in ('engine', 'tool', 'workload', 'size', 'rate', 'delay') if r.get(k) is not None)}: "
                               f"{r['error'][:400]}" for r in bad]


CELL = ("scenario", "engine", "tool", "workload", "size", "rate", "delay")


def latest_code(runs: list[dict]) -> tuple[list[dict], int]:
    """Per cell, only the runs of the steps/ code its newest run measured: a cell
    run again after a change of steps/ supersedes its earlier runs. Returns the
    runs kept and how many were left out."""
    newest: dict[tuple, dict] = {}
    for r in runs:
        cell = tuple(r.get(k) for k in CELL)
        if cell not in newest or (r.get("finished_at") or "") >= (newest[cell].get("finished_at") or ""):
            newest[cell] = r
    kept = [r for r in runs if r.get("steps_sha256") == newest[tuple(r.get(k) for k in CELL)].get("steps_sha256")]
    return kept, len(runs) - len(kept)


def summarize(runs: list[dict]) -> list[str]:
    runs, superseded = latest_code(runs)
    out: list[str] = []
    if superseded:
        out += ["", f"({superseded} run(s) of cells measured again on a later steps/ code are left out)"]
    for part in (done_when(runs), downtime_table(runs), verify_table(runs), drained_table(runs), before_table(runs),
                 copy_table(runs),
                 apply_table(runs), memory_table(runs), errors(runs)):
        if part:
            out += ["", *part]
    return out


def done_when_rows(runs: list[dict]) -> list[str]:
    """The README's Performance table: issue 13's cells, one row per workload and size, with the
    window's parts (runs of the newest steps/ code per cell)."""
    runs, _ = latest_code(runs)
    rs = _done_when_cells(runs)
    rows = []
    for wl, size in sorted(dict.fromkeys((r["workload"], r["size"]) for r in rs), key=lambda c: (c[1], c[0])):
        every = [r for r in rs if (r["workload"], r["size"]) == (wl, size)]
        ok = _ok(every)
        if not ok:
            rows.append(f"| {wl} | {size} | never caught up ({len(every)} run(s)) | - | - | - | - | - | - | - |")
            continue

        def m(get):
            return median([get(r) for r in ok])

        t = lambda r, k: (r.get("timings") or {}).get(k)  # noqa: E731
        failed = f", {len(every) - len(ok)} failed" if len(every) > len(ok) else ""
        rows.append(
            f"| {wl} | {size} | **{_f(m(lambda r: r.get('app_downtime_s')))}** "
            f"({', '.join(_f(r.get('app_downtime_s')) for r in ok)}{failed}) | "
            f"{_f(m(lambda r: r.get('freeze_s')), 3)} | "
            f"{_f(m(lambda r: (t(r, 'end_position') or 0) + (t(r, 'drain') or 0)), 3)} | "
            f"{_f(m(lambda r: t(r, 'sequences')), 3)} | {_f(m(lambda r: t(r, 'verify')), 3)} | "
            f"{_f(m(lambda r: t(r, 'verify_teardown')), 3)} | "
            f"{_f(m(lambda r: (r.get('switch_s') or 0) + (r.get('app_reconnect_s') or 0)), 3)} | "
            f"{_f(m(lambda r: r.get('verify_keys_rechecked')), 0)} |")
    return rows
