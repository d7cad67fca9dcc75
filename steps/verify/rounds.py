"""One round of the comparison at a point both sides have reached (docs/verify.md).

1. L: a source position. Decode the tracking slot up to L (peek: nothing is
   consumed yet) into keys; the target must have applied every decoded
   transaction (its replication origin at or past the last commit's end).
2. The decoded keys go into the target's pending table, committed.
3. Snapshots: T on the target, with every transaction applied up to L visible
   (none older than an xid taken after the apply reached L still running, but
   autovacuum's and ours, which change no application row); S on the source,
   in which every decoded transaction and everything the slot's exported
   snapshot saw are visible.
4. Every pending key visible in T is compared on both sides, by key: md5 of
   the row text (absent on both sides is equal). Pending rows of keys that
   match are deleted, in T's transaction: rows recorded later (not in T) stay.
   Keys that differ stay pending: they changed again after L on one side, or
   they really differ (the final verify names them).
5. A piece of the baseline, if any is left: bucket checksums of both sides in
   the same snapshots; the rows of a bucket that differs become pending keys.
   A keyless table's baseline is its checksum on each side (source: in S,
   with S itself; target: in T).
5b. Keyless tables kept by checksum: the source's gains the hashes of the
   rows each decoded transaction it lacks added and removed; the target's the
   row deltas its triggers recorded, visible in T (deleted in T).
6. Commit T, then advance the slot to L (a crash before that decodes the same
   changes again: duplicates in the pending table are harmless).

Rounds never run at once: each holds an advisory lock on the target.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field

import psycopg
from psycopg import sql

from steps import state
from steps.errors import StepError
from steps.log import log
from steps.pg import fmt_lsn, lsn, origin_progress
from steps.settings import StepSettings
from steps.verify import pgoutput, plan, tracking
from steps.verify import sql as q

KEY_BATCH = 2000  # keys per lookup query
IMAGE_BYTES = 64 * 1024 * 1024  # decoded rows of one keyless table a round keeps in memory; past it: re-read whole
APPLY_WAIT = 5.0  # a round waits this long for the target to apply what it decoded
SNAPSHOT_WAIT = 60.0
LOCK_WAIT = "300s"  # a round waits this long for another one to finish (a baseline chunk may take a while)
FINAL_LOCK_WAIT = "30s"  # the final check: the settle's round ran moments before


class NotPrepared(StepError):
    """The change tracking of this run is not (or no longer) in place."""


@dataclass
class RoundResult:
    position: str = ""  # the source position L both sides were compared at
    decoded_changes: int = 0  # row changes decoded from the slot in this round
    keys_checked: int = 0  # distinct keys compared
    keys_differing: int = 0  # of those, still different (pending for the next round)
    whole_pending: list[str] = field(default_factory=list)  # tables marked "changed as a whole"
    baseline: list[str] = field(default_factory=list)  # tables whose baseline advanced in this round
    baseline_left: int = 0  # tables whose baseline is not complete
    buckets_differing: int = 0  # baseline buckets that differed (their rows became pending keys)
    keyless_rows: int = 0  # decoded rows of keyless tables added to their checksums
    seconds: float = 0.0
    waited_seconds: float = 0.0  # waiting for the target to apply up to L
    note: str | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per part of the round

    def line(self) -> str:
        parts = [f"at {self.position}: {self.keys_checked} key(s) re-checked"]
        if self.keys_differing:
            parts.append(f"{self.keys_differing} changed again since (still pending)")
        if self.baseline:
            parts.append(f"baseline: {', '.join(self.baseline[:3])}{' ...' if len(self.baseline) > 3 else ''}"
                         f" ({self.baseline_left} table(s) left)")
        if self.whole_pending:
            parts.append(f"{len(self.whole_pending)} table(s) to compare whole at verify")
        return "; ".join(parts) + f" ({self.seconds:.2f}s)"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Txn:
    xid: int
    end: int = 0
    decoded: plan.Decoded = field(default_factory=plan.Decoded)


class Round:
    """The connections and the lock of one round (or of the final verify)."""

    def __init__(self, s: StepSettings, stop: threading.Event | None = None, lock_wait: str = LOCK_WAIT):
        self.s = s
        self.lock_wait = lock_wait
        self.stop = stop
        self.slot, self.pub = tracking.names(s)
        self._stack = ExitStack()
        self.found: dict[str, tuple[int, int]] = {}  # label -> rows found by key on (source, target)
        # label -> (source, target) checksum of a keyless table now, and the decoded rows added to it
        self.checksums: dict[str, tuple[plan.Sums, plan.Sums, int]] = {}
        self.why: dict[str, str] = {}  # label -> why it changed "as a whole" (decoded), for the log
        self.image_bytes: dict[str, int] = {}
        self.timings: dict[str, float] = {}  # where a round's time went, for the log

    @contextmanager
    def timed(self, what: str):
        t = time.monotonic()
        try:
            yield
        finally:
            self.timings[what] = self.timings.get(what, 0.0) + time.monotonic() - t

    def __enter__(self) -> Round:
        try:
            self.src, self.tgt = self._open(tracking.source(self.s), tracking.target(self.s))
            self.tgt.execute(sql.SQL("SET lock_timeout = {}").format(sql.Literal(self.lock_wait)))
            try:
                self.tgt.execute(q.LOCK)
            except psycopg.errors.LockNotAvailable:
                raise StepError(f"verify: another verify round held the lock for {self.lock_wait}") from None
            self.tgt.execute("RESET lock_timeout")
            if self.stop is not None:
                self._stack.enter_context(_cancel_on(self.stop, [self.src, self.tgt]))
        except BaseException:
            self._stack.close()
            raise
        return self

    def _open(self, *cms):
        """Both sessions at once: connecting is a good part of a short round."""
        with ThreadPoolExecutor(len(cms)) as pool:
            futures = [pool.submit(cm.__enter__) for cm in cms]
        conns, error = [], None
        for cm, f in zip(cms, futures):
            try:
                conns.append(f.result())
                self._stack.push(cm.__exit__)
            except BaseException as exc:  # noqa: BLE001 (re-raised below, after the other is registered)
                error = error or exc
        if error is not None:
            raise error
        return conns

    def __exit__(self, *exc):
        # Closing the target session releases the lock; the exception goes
        # through, so that a query cancelled by `stop` becomes InterruptedError.
        return self._stack.__exit__(*exc)

    # -- what was prepared --------------------------------------------------------------------------

    def load(self) -> tuple[dict | None, list[plan.Table]]:
        meta = tracking.load_meta(self.tgt)
        if meta is None or meta["run_id"] != self.s.run_id:
            return None, []
        return meta, tracking.load_tables(self.tgt)

    def slot_state(self) -> tuple[int, int] | None:
        """(confirmed position, flushed WAL) of the tracking slot; None if it is gone or lost."""
        row = self.src.execute(q.SLOT, (self.slot,)).fetchone()
        if row is None or row[3] == "lost":
            return None
        return lsn(row[0]), lsn(row[2])

    def repair(self, tables: list[plan.Table]) -> list[str]:
        """Before the snapshots: a target table that lost its triggers (created
        again) gets them back and starts its baseline over; a source table that
        left our publication (dropped and created again) is compared whole from
        now on. Returns what changed, for the log."""
        notes = []
        now = {label: (oid, n) for label, oid, n in self.tgt.execute(q.TRIGGERS, ()).fetchall()}
        oids = dict(self.tgt.execute(q.TABLE_OIDS, ()).fetchall())
        published = {tuple(r) for r in self.src.execute(q.PUBLISHED, (self.pub,)).fetchall()}
        for t in tables:
            if t.kind == plan.UNTRACKED:
                continue
            if t.parts not in published:
                t.kind, t.why = plan.UNTRACKED, "left the tracking publication (dropped and created again?)"
                t.next_bucket = None
                tracking.save_table(self.tgt, t)
                notes.append(f"{t.label} is no longer decoded on the source: compared whole at verify")
                continue
            have = now.get(t.label)
            if have is not None and have[0] == t.target_oid and have[1] >= 2:
                continue
            oid = oids.get(t.label)
            if oid is None:  # gone from the target: the object comparison names it
                t.kind, t.why, t.next_bucket = plan.UNTRACKED, "dropped on the target after the preparation", None
                tracking.save_table(self.tgt, t)
                notes.append(f"{t.label} is gone from the target")
                continue
            t.target_oid = oid
            tracking.add_triggers(self.tgt, t, self.stop)
            self._restart_baseline(t)
            tracking.save_table(self.tgt, t)
            notes.append(f"{t.label} on the target lost its change triggers (created again?): triggers back, "
                         "its baseline starts over")
        return notes

    @staticmethod
    def _restart_baseline(t: plan.Table) -> None:
        t.next_bucket = t.first_bucket if t.kind == plan.KEYED else 0
        t.src_sums = t.tgt_sums = t.sums_at = t.sums_snapshot = None

    # -- 1. decode --------------------------------------------------------------------------------

    def source_position(self, final: bool) -> int:
        """L: the end of the WAL, flushed first. In the window every commit
        before the freeze must be decoded; before it, a position between two
        records keeps the decoding from waiting for the WAL writer to flush a
        record half-way (up to wal_writer_delay with synchronous_commit off).
        Before the freeze a flush that comes by itself within 20 ms (commits
        with synchronous_commit on) spares the catalog write."""
        insert = lsn(self.src.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0])
        flushed = lambda: lsn(self.src.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()[0])  # noqa: E731
        for _ in range(0 if final else 4):
            if flushed() >= insert:
                return insert
            time.sleep(0.005)
        if flushed() < insert:
            with self.src.transaction():
                self.src.execute("SET LOCAL synchronous_commit = on")
                self.src.execute(q.flush_nudge(self.pub))
        deadline = time.monotonic() + 10
        while flushed() < insert:
            if time.monotonic() > deadline:
                raise StepError("verify: the source's WAL was not flushed within 10s")
            time.sleep(0.005)
        return insert

    def slot_free(self) -> None:
        """Wait until no session decodes the slot: a killed round's server
        session may still be finishing its decoding; an orphan of ours that
        does not finish is ended."""
        deadline = time.monotonic() + 5
        while True:
            row = self.src.execute(q.SLOT, (self.slot,)).fetchone()
            if row is None or row[1] is None:
                return
            if time.monotonic() > deadline:
                self.src.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = %s "
                                 "AND application_name LIKE 'db-upgrade%%'", (row[1],))
                deadline = time.monotonic() + 5
            time.sleep(0.05)

    def decode(self, upto: int, tables: list[plan.Table]) -> list[Txn]:
        self.slot_free()
        by_name = {t.parts: t for t in tables}
        rels: dict[int, pgoutput.Relation] = {}
        txns: list[Txn] = []
        cur_txn: Txn | None = None
        query, params = q.peek_changes(self.slot, self.pub)
        with self.src.transaction(), self.src.cursor(name="db_upgrade_verify_decode") as cur:
            cur.itersize = 5000
            cur.execute(query, {**params, "upto": fmt_lsn(upto)})
            for _lsn, _xid, data in cur:
                m = pgoutput.parse(data)
                if isinstance(m, pgoutput.Begin):
                    cur_txn = Txn(m.xid)
                elif isinstance(m, pgoutput.Commit):
                    cur_txn.end = m.end_lsn
                    cur_txn.decoded.xids.append(cur_txn.xid)
                    txns.append(cur_txn)
                    cur_txn = None
                elif isinstance(m, pgoutput.Relation):
                    rels[m.oid] = m
                elif isinstance(m, (pgoutput.Insert, pgoutput.Update, pgoutput.Delete)):
                    _note_change(cur_txn.decoded, m, _relation(rels, m.rel), by_name, self.image_bytes)
                elif isinstance(m, pgoutput.Truncate):
                    for oid in m.rels:
                        rel = _relation(rels, oid)
                        t = by_name.get((rel.namespace, rel.name))
                        if t is None:
                            cur_txn.decoded.unknown.add((rel.namespace, rel.name))
                        else:
                            cur_txn.decoded.whole.add(t.label)
                            cur_txn.decoded.why.setdefault(t.label, "truncated on the source")
        return txns

    def applied(self) -> int | None:
        """How far the target has applied the source: the replication origin of
        the native engine's subscription (pg_<oid>), else the origin pgcopydb
        names after the slot. Both record the end of each applied commit."""
        row = self.tgt.execute("SELECT 'pg_' || oid FROM pg_subscription WHERE subname = %s AND subdbid = "
                               "(SELECT oid FROM pg_database WHERE datname = current_database())",
                               (self.s.slot_name,)).fetchone()
        name = row[0] if row else self.s.slot_name
        if row is None and self.tgt.execute("SELECT 1 FROM pg_replication_origin WHERE roname = %s",
                                            (name,)).fetchone() is None:
            return None
        return origin_progress(self.tgt, name)

    def wait_applied(self, txns: list[Txn], confirmed: int, upto: int, final: bool,
                     wait: float = APPLY_WAIT) -> tuple[list[Txn], int, float]:
        """The transactions the target has applied, and the position L to
        compare at. Before the freeze, what it has not applied within `wait`
        is left for the next round (L moves back to what it applied)."""
        started = time.monotonic()
        last = max((t.end for t in txns), default=0)
        if not txns:
            return txns, upto, 0.0
        applied = self.applied()
        if applied is None:
            if final:
                return txns, upto, 0.0  # the caller drained the target to the end position
            raise StepError(f"verify: cannot tell how far the target has applied: no subscription and no "
                            f"replication origin named {self.s.slot_name!r} on the target")
        deadline = started + (10.0 if final else wait)
        while applied < last and time.monotonic() < deadline:
            if self.stop is not None and self.stop.is_set():
                raise InterruptedError
            time.sleep(0.005)
            applied = self.applied() or 0
        waited = time.monotonic() - started
        if applied >= last:
            return txns, upto, waited
        if final:
            raise StepError(f"verify: the target has applied only up to {fmt_lsn(applied)}, the source's last "
                            f"change ends at {fmt_lsn(last)}: it is not drained to the end position")
        kept = [t for t in txns if t.end <= applied]
        return kept, max(applied, confirmed), waited

    # -- 2. record -----------------------------------------------------------------------------------

    def record(self, decoded: plan.Decoded) -> None:
        if not decoded.keys and not decoded.whole:
            return
        with self.tgt.transaction(), self.tgt.cursor().copy(q.copy_pending()) as cp:
            cp.set_types(["text", "text[]"])
            for label, keys in decoded.keys.items():
                for key in keys:
                    cp.write_row((label, list(key)))
            for label in decoded.whole:
                cp.write_row((label, None))

    # -- 3. snapshots ------------------------------------------------------------------------------

    def target_snapshot(self) -> None:
        """Open T: a snapshot in which every transaction the target had
        committed when this was called is visible (no transaction older than
        an xid taken now still runs, but autovacuum's and ours), read-write
        (matched pending rows are deleted in it)."""
        mark = int(self.tgt.execute("SELECT pg_current_xact_id()::text").fetchone()[0])
        deadline = time.monotonic() + SNAPSHOT_WAIT
        while True:
            self.tgt.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            snap = plan.Snapshot.parse(self.tgt.execute("SELECT pg_current_snapshot()::text").fetchone()[0])
            older = {x for x in snap.xip if x <= mark}
            if not older:
                return
            # Autovacuum (an ANALYZE holds an xid) and our own sessions never
            # change the application's rows: no need to wait for them.
            harmless = {int(x) for x, in self.tgt.execute(q.HARMLESS_XIDS, ()).fetchall()}
            if all((x & 0xFFFFFFFF) in harmless for x in older):
                return
            self.tgt.execute("ROLLBACK")
            if time.monotonic() > deadline:
                holders = ", ".join(f"pid {p} {a or b!r} open {age}s"
                                    for p, a, b, age in self.tgt.execute(q.XID_HOLDERS).fetchall()[:5])
                raise StepError(f"verify: a transaction on the target stayed open for {SNAPSHOT_WAIT:.0f}s "
                                f"({holders or 'a prepared transaction?'}): end it, or wait for it")
            if self.stop is not None and self.stop.is_set():
                raise InterruptedError
            time.sleep(0.002)

    def source_snapshot(self, exported: plan.Snapshot, xids: list[int]) -> plan.Snapshot:
        """Open S: every decoded transaction, and every one the slot's starting
        snapshot saw, is visible in it (a commit is in the WAL a moment before
        the server shows it)."""
        deadline = time.monotonic() + SNAPSHOT_WAIT
        while True:
            self.src.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            snap = plan.Snapshot.parse(self.src.execute("SELECT pg_current_snapshot()::text").fetchone()[0])
            if snap.covers(exported) and all(snap.visible(plan.xid8(x, snap)) for x in xids):
                return snap
            self.src.execute("ROLLBACK")
            if time.monotonic() > deadline:
                raise StepError("verify: decoded transactions did not become visible on the source")
            time.sleep(0.002)

    # -- 4. compare by key --------------------------------------------------------------------------

    def compare_keys(self, work: list[tuple[plan.Table, list[tuple]]]) -> dict[str, list[tuple]]:
        """label -> keys whose rows differ, of the given keys per table."""
        def side(conn):
            out = {}
            for t, keys in work:
                got: dict[int, str] = {}
                query = q.rows_by_key(t.parts, t.key_cols, t.key_types)
                for start in range(0, len(keys), KEY_BATCH):
                    batch = keys[start:start + KEY_BATCH]
                    arrays = [[k[i] for k in batch] for i in range(len(t.key_cols))]
                    for ordinal, md5 in conn.execute(query, arrays).fetchall():
                        got[start + int(ordinal)] = md5
                out[t.label] = got
            return out

        src, tgt = _both(side, self.src, self.tgt)
        self.found = {t.label: (len(src[t.label]), len(tgt[t.label])) for t, _ in work}
        return {t.label: plan.differing(keys, src[t.label], tgt[t.label]) for t, keys in work}

    def decoded_sums(self, images: list[tuple[int, tuple]], ncols: int) -> plan.Sums:
        """The signed checksum of decoded rows, their text rebuilt server side."""
        query = q.decoded_row_sums(ncols)
        total = plan.Sums()
        for start in range(0, len(images), KEY_BATCH):
            batch = images[start:start + KEY_BATCH]
            total += plan.Sums.of(self.src.execute(query, plan.image_columns(batch, ncols)).fetchone())
        return total

    # -- 5. the baseline ----------------------------------------------------------------------------

    def baseline(self, chunks: list[plan.Chunk], tables: dict[str, plan.Table]
                 ) -> tuple[dict[str, list[tuple]], dict[str, bool], int, dict[str, tuple]]:
        """Compare chunks of the baseline in the open snapshots. Returns the keys
        of rows that differ per keyed table (to become pending), per whole table
        whether it matched, the number of buckets that differed, and per whole
        table its (source, target) (count, sum, sum)."""
        def sums(conn):
            out = {}
            for c in chunks:
                t = tables[c.label]
                if t.kind == plan.WHOLE:
                    n, s1, s2 = conn.execute(q.whole_sums(t.parts)).fetchone()
                    out[c.label] = {0: (int(n), int(s1), int(s2))}
                    continue
                where = (q.range_filter(t.key_cols[0], t.width, c.lo, c.hi) if t.bucket_kind == "range"
                         else sql.SQL("true"))
                rows = conn.execute(q.bucket_sums(t.parts, t.bucket_kind, t.key_cols, t.width, where)).fetchall()
                out[c.label] = {int(b): (int(n), int(s1), int(s2)) for b, n, s1, s2 in rows}
            return out

        src, tgt = _both(sums, self.src, self.tgt)
        keys: dict[str, list[tuple]] = {}
        whole_ok: dict[str, bool] = {}
        whole_sums: dict[str, tuple] = {}
        redo = []
        n_diff = 0
        for c in chunks:
            t = tables[c.label]
            if t.kind == plan.WHOLE:
                whole_ok[c.label] = src[c.label] == tgt[c.label]
                whole_sums[c.label] = (src[c.label][0], tgt[c.label][0])
                continue
            diff = plan.bucket_differences(src[c.label], tgt[c.label])
            n_diff += len(diff)
            if diff:
                redo.append((c, diff))

        def rows(conn):
            out = {}
            for c, diff in redo:
                t = tables[c.label]
                where = (q.range_filter(t.key_cols[0], t.width, c.lo, c.hi) if t.bucket_kind == "range"
                         else sql.SQL("true"))
                got = out.setdefault(c.label, {})
                for key, md5 in conn.execute(q.bucket_rows(t.parts, t.bucket_kind, t.key_cols, t.width, where),
                                             (diff,)).fetchall():
                    got[tuple(key)] = md5
            return out

        if redo:
            src_rows, tgt_rows = _both(rows, self.src, self.tgt)
            for c, _diff in redo:
                keys.setdefault(c.label, []).extend(
                    plan.row_differences(src_rows.get(c.label, {}), tgt_rows.get(c.label, {})))
        return keys, whole_ok, n_diff, whole_sums

    # -- 6. the end of a round --------------------------------------------------------------------

    def delete_pending(self, ctids: list[str]) -> None:
        if not ctids:
            return
        # By ctid, not a scan: under constant writes the table is full of dead
        # rows, and the planner's seq scan grows with them (53 ms vs 4 ms for
        # 3,000 rows of a 90%-dead table, measured).
        self.tgt.execute("SET LOCAL enable_seqscan = off")
        for start in range(0, len(ctids), 10000):
            self.tgt.execute(q.delete_pending(), (ctids[start:start + 10000],))

    def add_pending(self, label: str, keys: list[tuple]) -> None:
        with self.tgt.cursor().copy(q.copy_pending()) as cp:
            cp.set_types(["text", "text[]"])
            for key in keys:
                cp.write_row((label, list(key) if key is not None else None))

    def advance(self, position: int, confirmed: int) -> None:
        if position > confirmed:
            self.src.execute("SELECT pg_replication_slot_advance(%s, %s::pg_lsn)", (self.slot, fmt_lsn(position)))


def _relation(rels: dict, oid: int) -> pgoutput.Relation:
    try:
        return rels[oid]
    except KeyError:
        raise StepError(f"verify: the tracking slot sent a change of relation {oid} before describing it "
                        "(not pgoutput protocol 1?)") from None


def _note_change(d: plan.Decoded, m, rel: pgoutput.Relation, by_name: dict,
                 image_bytes: dict[str, int] | None = None) -> None:
    d.changes += 1
    t = by_name.get((rel.namespace, rel.name))
    if t is None:
        d.unknown.add((rel.namespace, rel.name))
        return
    if t.kind == plan.WHOLE and t.checksum and rel.replident == t.replident:
        _note_rows(d, m, t, image_bytes if image_bytes is not None else {})
        return
    if t.kind != plan.KEYED or rel.replident != t.replident:
        d.whole.add(t.label)
        return
    kc = pgoutput.change_keys(m, rel, t.key_cols)
    if kc.whole:
        d.whole.add(t.label)
    else:
        d.keys.setdefault(t.label, set()).update(kc.keys)


def _note_rows(d: plan.Decoded, m, t: plan.Table, image_bytes: dict[str, int]) -> None:
    """A keyless table kept by checksum: the rows the change removed and added.
    Until its checksum is taken (baseline) there is nothing to add them to:
    the checksum will include them, and until then it is compared whole."""
    if not t.baselined or t.src_sums is None or t.label in d.whole:
        return
    images = plan.row_images(m, t.ncols)
    if isinstance(images, str):
        d.whole.add(t.label)
        d.why.setdefault(t.label, images)
        d.images.pop(t.label, None)
        return
    image_bytes[t.label] = image_bytes.get(t.label, 0) + sum(
        len(v) for _, values in images for v in values if v is not None)
    if image_bytes[t.label] > IMAGE_BYTES:
        d.whole.add(t.label)
        d.why.setdefault(t.label, f"more than {IMAGE_BYTES >> 20} MB of changed rows since the last round")
        d.images.pop(t.label, None)
        return
    d.images.setdefault(t.label, []).extend(images)


def _both(fn, src, tgt):
    with ThreadPoolExecutor(2) as pool:
        a = pool.submit(fn, src)
        b = pool.submit(fn, tgt)
        return a.result(), b.result()


@contextmanager
def _cancel_on(stop: threading.Event, conns: list):
    """Setting `stop` cancels the running query (the preparation gives way)."""
    done = threading.Event()

    def watch():
        while not done.wait(0.2):
            if stop.is_set():
                for c in conns:
                    try:
                        c.cancel_safe(timeout=2)
                    except Exception:
                        pass
                return

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    try:
        yield
    except psycopg.errors.QueryCanceled:
        if stop.is_set():
            raise InterruptedError from None
        raise
    finally:
        done.set()


def run(s: StepSettings, *, final: bool = False, budget: int = 0, stop: threading.Event | None = None,
        inside=None, require_prepared: bool = False) -> tuple[RoundResult, object]:
    """One round (see the module docstring). `budget`: bytes of baseline to
    compare in it. `inside(rnd, tables, keys, whole, differing)` runs in the
    open snapshots before they end (the final verify compares whole tables and
    objects there); its result is returned beside the round's."""
    started = time.monotonic()
    result = RoundResult()
    extra = None
    with Round(s, stop, lock_wait=FINAL_LOCK_WAIT if final else LOCK_WAIT) as rnd:
        rnd.timings["connect"] = time.monotonic() - started
        with rnd.timed("check"):
            meta, tables = rnd.load()
            if require_prepared and not state.load_from(rnd.src, s.run_id).verify_prepared_at:
                raise NotPrepared("verify: the preparation is not complete")
            if meta is None:
                raise NotPrepared("verify: the change tracking is not prepared for this run")
            slot = rnd.slot_state()
            if slot is None:
                raise NotPrepared(f"verify: the tracking slot {rnd.slot!r} is gone or lost on the source")
            confirmed, _ = slot
            for note in rnd.repair(tables):
                log(f"verify: {note}")
        by_label = {t.label: t for t in tables}
        with rnd.timed("position"):
            upto = rnd.source_position(final)
        with rnd.timed("decode"):
            txns = rnd.decode(upto, tables)
        with rnd.timed("wait-apply"):
            txns, position, waited = rnd.wait_applied(txns, confirmed, upto, final)
        decoded = plan.Decoded()
        for t in txns:
            decoded.merge(t.decoded)
        result.position, result.waited_seconds = fmt_lsn(position), round(waited, 3)
        result.decoded_changes = decoded.changes
        if not final:  # the final check changes nothing: the cutover drops the tracking right after it
            with rnd.timed("record"):
                rnd.record(decoded)
        rnd.why = decoded.why
        exported = plan.Snapshot.parse(meta["snapshot"])
        try:
            with rnd.timed("snapshots"):
                rnd.target_snapshot()
                src_snap = rnd.source_snapshot(exported, decoded.xids)
                keys, whole = plan.pending_groups(rnd.tgt.execute(q.read_pending()).fetchall())
            if final:  # what was just decoded, beside what is pending
                for label, ks in decoded.keys.items():
                    for k in ks:
                        keys.setdefault(label, {}).setdefault(k, [])
                for label in decoded.whole:
                    whole.setdefault(label, [])
            done: list[str] = []
            changed: set[str] = set()
            if not final:
                done += _whole_markers(rnd, by_label, keys, whole, changed)
            work = [(by_label[label], list(k)) for label, k in keys.items()
                    if label in by_label and by_label[label].kind == plan.KEYED]
            with rnd.timed("keys"):
                differ = rnd.compare_keys(work) if work else {}
            for t, klist in work:
                bad = set(differ[t.label])
                result.keys_checked += len(klist)
                result.keys_differing += len(bad)
                done += [c for k in klist if k not in bad for c in keys[t.label][k]]
            for label, k in keys.items():  # keys of a table compared whole (no key any more, or unknown)
                if label not in by_label or by_label[label].kind != plan.KEYED:
                    done += [c for cts in k.values() for c in cts]
            rebased: set[str] = set()
            if budget and not final:
                with rnd.timed("baseline"):
                    done += _baseline(rnd, tables, by_label, whole, budget, changed, result, position, src_snap,
                                      rebased)
            if any(t.checksum for t in tables):
                with rnd.timed("checksums"):
                    rnd.checksums = _checksums(rnd, txns, tables, whole, rebased, position, src_snap, final,
                                               changed)
                    result.keyless_rows = sum(n for _, _, n in rnd.checksums.values())
            if inside is not None:
                with rnd.timed("final"):
                    extra = inside(rnd, tables, keys, whole, differ)
            if not final:
                with rnd.timed("delete"):
                    rnd.delete_pending(sorted(set(done)))
                    for label in changed:
                        tracking.save_table(rnd.tgt, by_label[label])
                with rnd.timed("commit"):
                    rnd.tgt.execute("COMMIT")
        finally:
            for conn in (rnd.src, rnd.tgt):
                if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    try:
                        conn.execute("ROLLBACK")
                    except psycopg.Error:
                        pass  # a broken session: closing it ends the transaction
        if not final:
            with rnd.timed("advance"):
                rnd.advance(position, confirmed)
        result.whole_pending = sorted(whole)
        result.baseline_left = sum(1 for t in tables if t.kind != plan.UNTRACKED and not t.baselined)
    result.seconds = round(time.monotonic() - started, 3)
    result.timings = {k: round(v, 4) for k, v in rnd.timings.items()}
    return result, extra


def _whole_markers(rnd: Round, by_label, keys, whole, changed: set) -> list[str]:
    """A keyed table marked "changed as a whole" (TRUNCATE, a key that could not
    be read, its triggers lost) starts its baseline over; so does a keyless
    table kept by checksum (TRUNCATE, a change whose rows could not be had):
    its checksum is taken again, in a round, not in the window. Any other
    table keeps one marker, for verify. Returns the pending rows to delete."""
    done = []
    for label, ctids in whole.items():
        t = by_label.get(label)
        if t is not None and t.kind == plan.KEYED:
            rnd._restart_baseline(t)
            changed.add(label)
            done += ctids
            keys.pop(label, None)  # compared with the baseline; they stay pending until then
            continue
        if t is not None and t.kind == plan.WHOLE and t.checksum:
            if t.baselined:
                why = rnd.why.get(label, "truncated, or its change triggers were lost on the target")
                log(f"verify: {label}: {why}: its checksum is taken again (read whole in a round, not in the window)")
            rnd._restart_baseline(t)
            changed.add(label)
            done += ctids[1:]  # the last goes when the checksum is taken
            continue
        if t is not None and t.kind == plan.WHOLE and t.bytes <= plan.WHOLE_ROUND_BYTES:
            rnd._restart_baseline(t)  # small: compared again now, its markers go if it matches
            changed.add(label)
        done += ctids[1:]
    return done


def _baseline(rnd: Round, tables, by_label, whole, budget: int, changed: set, result: RoundResult,
              position: int, src_snap: plan.Snapshot, rebased: set) -> list[str]:
    chunks = plan.next_chunks(tables, budget)
    if not chunks:
        return []
    done = []
    keys, whole_ok, result.buckets_differing, whole_sums = rnd.baseline(chunks, by_label)
    columns = {}
    if any(by_label[c.label].checksum for c in chunks):
        columns = {label: tuple(rest) for label, *rest in rnd.src.execute(q.COLUMNS, ()).fetchall()}
    for c in chunks:
        t = by_label[c.label]
        t.next_bucket = c.next_bucket
        changed.add(c.label)
        result.baseline.append(c.label)
        if t.kind == plan.WHOLE and t.checksum:
            done += _take_checksum(t, whole_sums[c.label], columns.get(c.label), position, src_snap)
            done += whole.pop(c.label, [])
            rebased.add(c.label)
            continue
        if t.kind == plan.WHOLE:
            if whole_ok[c.label]:
                done += whole.pop(c.label, [])
            elif c.label not in whole:
                rnd.add_pending(c.label, [None])
                whole[c.label] = []
    for label, klist in keys.items():
        if klist:
            rnd.add_pending(label, klist)
    return done


def _take_checksum(t: plan.Table, sums: tuple, columns: tuple | None, position: int,
                   src_snap: plan.Snapshot) -> list[str]:
    """A keyless table's checksum, taken: the source's in S (the decoded
    transactions it lacks are those not visible in S), the target's in T (the
    row deltas visible in T are in it: _checksums deletes them)."""
    ncols, signature, generated, reg = columns or (0, "", False, False)
    if generated or reg or ncols < 1:
        t.kind, t.checksum, t.next_bucket = plan.UNTRACKED, False, None
        t.why = (f"no usable key, and its row text cannot be rebuilt from decoded changes any more "
                 f"({'a generated column' if generated else 'a reg* column' if reg else 'no column'})")
        log(f"verify: {t.label}: {t.why}: compared whole at verify")
        return []
    t.src_sums, t.tgt_sums = plan.Sums.of(sums[0]).text(), plan.Sums.of(sums[1]).text()
    t.sums_at, t.sums_snapshot, t.ncols, t.columns = position, src_snap.text(), ncols, signature
    return []


def _checksums(rnd: Round, txns: list[Txn], tables: list[plan.Table], whole, rebased: set, position: int,
               src_snap: plan.Snapshot, final: bool, changed: set) -> dict[str, tuple[plan.Sums, plan.Sums, int]]:
    """Keyless tables kept by checksum, brought to this round's snapshots:
    source += the rows of each decoded transaction the checksum lacks
    (plan.delta_applies), target += the row deltas visible in T. Before the
    freeze the deltas are consumed (deleted in T, the sums saved); the final
    check only reads them. A table marked changed "as a whole", or whose
    checksum is not taken (or was taken in this round), is left out."""
    deltas = {rel: plan.Sums.of(rest) for rel, *rest in
              rnd.tgt.execute(q.read_deltas() if final else q.consume_deltas()).fetchall()}
    out = {}
    for t in tables:
        if not (t.kind == plan.WHOLE and t.checksum and t.baselined and t.src_sums is not None) \
                or t.label in whole or t.label in rebased:
            continue
        base = plan.Snapshot.parse(t.sums_snapshot)
        images = [img for x in txns if plan.delta_applies(x.end, x.xid, t.sums_at, base, src_snap)
                  for img in x.decoded.images.get(t.label, ())]
        src = plan.Sums.parse(t.src_sums) + (rnd.decoded_sums(images, t.ncols) if images else plan.Sums())
        tgt = plan.Sums.parse(t.tgt_sums) + deltas.get(t.label, plan.Sums())
        out[t.label] = (src, tgt, len(images))
        if not final and (images or t.label in deltas):
            t.src_sums, t.tgt_sums, t.sums_at = src.text(), tgt.text(), max(position, t.sums_at)
            changed.add(t.label)
    return out
