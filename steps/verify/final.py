"""verify(): the final check, inside the frozen window (docs/verify.md).

With the preparation complete, it is the last round at the end of the WAL
(the source frozen, the target drained), and in the same snapshots: the
object comparison, the sequences, and the whole tables (no usable key and
changed, truncated, not decoded, created since, or whose baseline was started
over); the keyless tables kept by checksum by their checksums (the last
rows decoded added on the source, the last row deltas on the target), not
re-read. It changes nothing in the tracking (the keys just decoded are compared
beside the pending ones, in memory; nothing is deleted, the slot stays where it
was): the cutover drops the tracking right after it, and a second run compares
the same again. Without the preparation, every table is compared whole, and
the log says so.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import psycopg

from steps import state
from steps.errors import StepError
from steps.log import log
from steps.pg import scrub
from steps.settings import StepSettings
from steps.verify import plan, rounds, tracking
from steps.verify import sql as q
from steps.verify.report import TableResult, VerifyReport

SAMPLE_KEYS = 5


def objects(conn: psycopg.Connection) -> set[str]:
    return {r[0] for r in conn.execute(q.OBJECTS, ())}


def compare_objects(report: VerifyReport, src, tgt) -> None:
    so, to = objects(src), objects(tgt)
    report.missing_on_target = sorted(so - to)
    report.extra_on_target = sorted(to - so)


def compare_sequences(report: VerifyReport, src, tgt) -> None:
    src_seq = dict(src.execute(q.SEQUENCES, ()).fetchall())
    tgt_seq = dict(tgt.execute(q.SEQUENCES, ()).fetchall())
    for name, last in sorted(src_seq.items()):
        tl = tgt_seq.get(name)
        if last is not None and (tl is None or tl < last):
            report.sequences_behind.append(f"{name} ({tl} < {last})")


def whole_sums(src, tgt, labels: list[tuple[str, str, str]]) -> tuple[dict, dict]:
    """label -> (count, sum1, sum2) on each side, in each connection's open snapshot."""
    def side(conn):
        return {label: tuple(int(v) for v in conn.execute(q.whole_sums((n, r))).fetchone())
                for n, r, label in labels}

    with ThreadPoolExecutor(2) as pool:
        a, b = pool.submit(side, src), pool.submit(side, tgt)
        return a.result(), b.result()


def _present(report: VerifyReport, src) -> list[tuple[str, str, str]]:
    return [(n, r, label) for n, r, label, _size in src.execute(q.LEAF_TABLES, ()).fetchall()
            if f"table {label}" not in report.missing_on_target]


def verify(s: StepSettings) -> VerifyReport:
    started = time.monotonic()
    try:
        report = _rehearsal(s) if s.mode == "rehearsal" else _bounded(s)
    except psycopg.Error as exc:
        raise StepError(f"verify: could not compare: {scrub((str(exc).strip().splitlines() or [''])[0])}") from None
    report.seconds = round(time.monotonic() - started, 3)
    report.ok = not (report.missing_on_target or report.extra_on_target or report.mismatched
                     or report.sequences_behind)
    for t in report.tables:
        if not t.match or t.how == "whole":
            drift = f" (drift {t.target_rows - t.source_rows:+d})" if s.mode == "rehearsal" and \
                t.source_rows != t.target_rows else ""
            log(f"  {'ok  ' if t.match else 'DIFF'} {t.table}: {t.how}, source {t.source_rows} rows, target "
                f"{t.target_rows} rows{drift}")
    for table, keys in report.differing_keys.items():
        log(f"  DIFF {table}: rows that differ, by key (a few): {', '.join(map(str, keys))}")
    state.record(s, verify=report.as_dict(), verified_at=state.now(), verify_seconds=report.seconds,
                 verify_keys_rechecked=report.keys_rechecked, verify_whole_tables=report.whole_tables)
    s.write_output("verify", report.summary())
    if not report.ok:
        raise StepError(f"verify: {report.summary()}")
    log(f"verify: {report.summary()} ({report.seconds:.2f}s)")
    return report


def _bounded(s: StepSettings) -> VerifyReport:
    report = VerifyReport(ok=True, mode=s.mode, method="bounded")
    log("verify: comparing source and target exactly")

    def inside(rnd: rounds.Round, tables: list[plan.Table], keys, whole, differ) -> None:
        compare_objects(report, rnd.src, rnd.tgt)
        compare_sequences(report, rnd.src, rnd.tgt)
        by_label = {t.label: t for t in tables}
        present = _present(report, rnd.src)
        columns = {}
        if rnd.checksums:
            columns = {label: (n, sig) for label, n, sig, *_ in rnd.src.execute(q.COLUMNS, ()).fetchall()}
        whole_list = []
        by_checksum = {}
        disagreed = {}
        for n, r, label in present:
            t = by_label.get(label)
            if t is None:
                why = "created after the preparation"
            elif t.kind == plan.UNTRACKED:
                why = t.why
            elif label in whole:
                why = rnd.why.get(label) or "changed as a whole (no usable key, or truncated)"
            elif not t.baselined:
                why = "its baseline is not complete"
            elif t.kind == plan.WHOLE and t.checksum and label not in rnd.checksums:
                why = "its checksum is not taken"
            elif label in rnd.checksums and columns.get(label) != (t.ncols, t.columns):
                why = "its columns changed since its checksum was taken"
            else:
                if label in rnd.checksums:
                    by_checksum[label] = rnd.checksums[label]
                continue
            whole_list.append((n, r, label, why))
        # Kept checksums that disagree are re-read whole before anything is called a
        # difference: the whole comparison is exact on its own, and the log shows
        # which side's kept checksum was off (for a bug report) if the tables match.
        for n, r, label in present:
            if label in by_checksum and by_checksum[label][0] != by_checksum[label][1]:
                src_kept, tgt_kept, _rows = by_checksum.pop(label)
                whole_list.append((n, r, label, f"its kept checksums disagree (source {src_kept.n} rows, target "
                                                f"{tgt_kept.n} rows): compared whole to be exact"))
                disagreed[label] = (src_kept, tgt_kept)
        sums_s, sums_t = whole_sums(rnd.src, rnd.tgt, [(n, r, label) for n, r, label, _ in whole_list])
        compared_whole = {label for _, _, label, _ in whole_list}
        for n, r, label, why in whole_list:
            ss, st_ = sums_s[label], sums_t[label]
            report.tables.append(TableResult(label, ss[0], st_[0], ss == st_, "whole"))
            report.whole_tables.append(label)
            log(f"verify: {label} re-read whole: {why}")
            if label in disagreed:
                src_kept, tgt_kept = disagreed[label]
                actual = (plan.Sums.of(ss) == src_kept, plan.Sums.of(st_) == tgt_kept)
                log(f"verify: {label}: whole, source {ss[0]} rows, target {st_[0]} rows; the kept checksum was "
                    f"{'right' if actual[0] else 'wrong'} on the source and {'right' if actual[1] else 'wrong'} "
                    "on the target" + (" (verify's bookkeeping, not the data: please report it)"
                                       if ss == st_ else ""))
        for label, (src, tgt, rows) in sorted(by_checksum.items()):
            report.tables.append(TableResult(label, src.n, tgt.n, src == tgt, "checksum"))
            report.by_checksum.append(label)
            report.keyless_rows += rows
        for n, r, label in present:
            if label in compared_whole or label in by_checksum:
                continue
            t = by_label[label]
            bad = differ.get(label, [])
            n_src, n_tgt = rnd.found.get(label, (0, 0))
            report.keys_rechecked += len(keys.get(label, {}))
            report.tables.append(TableResult(label, n_src, n_tgt, not bad,
                                             "keys" if label in keys else "unchanged"))
            if bad:
                report.differing_keys[label] = [list(k) for k in bad[:SAMPLE_KEYS]]
        report.mismatched = [t.table for t in report.tables if not t.match]

    try:
        result, _ = rounds.run(s, final=True, inside=inside, require_prepared=True)
    except rounds.NotPrepared as exc:
        skipped = state.load(s).verify_skipped_preparation
        log(f"{exc}{' (the operator chose not to wait for it)' if skipped else ''}: comparing every table whole")
        return _full(s)
    log(f"verify: decoded {result.decoded_changes} change(s) since the last round, re-checked "
        f"{report.keys_rechecked} key(s), {len(report.by_checksum)} keyless table(s) by checksum "
        f"({report.keyless_rows} decoded row(s) added) and {len(report.whole_tables)} whole table(s) at "
        f"{result.position} ("
        + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in result.timings.items()) + ")")
    report.timings = result.timings
    return report


def _full(s: StepSettings) -> VerifyReport:
    """Every table whole, each side in one snapshot (source frozen, target drained)."""
    report = VerifyReport(ok=True, mode=s.mode, method="full")
    with tracking.source(s) as src, tracking.target(s) as tgt:
        for conn in (src, tgt):
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        try:
            compare_objects(report, src, tgt)
            compare_sequences(report, src, tgt)
            present = _present(report, src)
            sums_s, sums_t = whole_sums(src, tgt, present)
        finally:
            for conn in (src, tgt):
                conn.execute("ROLLBACK")
    for _n, _r, label in present:
        ss, st_ = sums_s[label], sums_t[label]
        report.tables.append(TableResult(label, ss[0], st_[0], ss == st_, "whole"))
        report.whole_tables.append(label)
    report.mismatched = [t.table for t in report.tables if not t.match]
    return report


def _rehearsal(s: StepSettings) -> VerifyReport:
    """The source keeps writing: objects exactly, row counts with their drift
    (an empty side where the other has rows fails); and, when prepared, the
    bounded round a cutover would run now, timed."""
    report = VerifyReport(ok=True, mode=s.mode, method="rehearsal")
    st = state.load(s)
    if st.verify_prepared_at:
        try:
            result, _ = rounds.run(s, budget=0)
            report.round_seconds = result.seconds
            report.keys_rechecked = result.keys_checked
            report.notes.append(f"bounded round: {result.line()}")
            log(f"verify (rehearsal): the bounded round a cutover would run took {result.seconds:.2f}s "
                f"({result.keys_checked} key(s); {result.keys_differing} differ because the source kept writing)")
        except StepError as exc:
            report.notes.append(f"bounded round failed: {exc}")
            log(f"verify (rehearsal): the bounded round failed: {exc}")
    with tracking.source(s) as src, tracking.target(s) as tgt:
        compare_objects(report, src, tgt)
        present = _present(report, src)

        def counts(conn):
            return {label: conn.execute(q.count_rows((n, r))).fetchone()[0] for n, r, label in present}

        with ThreadPoolExecutor(2) as pool:
            a, b = pool.submit(counts, src), pool.submit(counts, tgt)
            cs, ct = a.result(), b.result()
    for _n, _r, label in present:
        report.tables.append(TableResult(label, cs[label], ct[label], (cs[label] == 0) == (ct[label] == 0), "whole"))
    report.mismatched = [t.table for t in report.tables if not t.match]
    return report
