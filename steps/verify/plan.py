"""verify's pure logic: how each table is tracked, the baseline's chunks,
snapshot visibility, what a round's comparison means. No database here."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from steps.verify.pgoutput import UNCHANGED, Delete, Insert, Update
from steps.verify.sql import INTEGER_TYPE_OIDS, NEUTRAL_TYPE_OIDS

BUCKET_PAGES = 64  # about 512 kB of heap per bucket of the baseline
CHUNK_BYTES = 64 * 1024 * 1024  # baseline work per round (one snapshot pair on each side)
# A table without a key that changed is compared again in a round (and then
# needs no re-reading in the window unless it changes again) when this small;
# a larger one is left for the final check: re-reading it every round would
# cost more than reading it once in the window.
WHOLE_ROUND_BYTES = 8 * 1024 * 1024

KEYED, WHOLE, UNTRACKED = "keyed", "whole", "untracked"


@dataclass
class Table:
    """One leaf table and how verify tracks it (a row of db_upgrade.verify_tables)."""

    label: str  # format('%I.%I'), as the catalog prints it
    nspname: str
    relname: str
    kind: str  # keyed: compared by key; whole: changes noticed, compared whole; untracked: compared whole always
    why: str | None = None  # why not keyed
    key_cols: list[str] | None = None
    key_types: list[str] | None = None
    neutral: bool = True  # the key's text does not depend on session settings
    replident: str = "d"
    bucket_kind: str | None = None  # range (integer leading key column) | hash
    width: int | None = None  # range: key values per bucket; hash: number of buckets
    first_bucket: int | None = None
    last_bucket: int | None = None
    next_bucket: int | None = None  # baseline: the next bucket to compare; None when done
    bytes: int = 0
    target_oid: int | None = None
    root: tuple[str, str] | None = None  # the top-level table a publication names (itself, or a partition's root)
    persistence: str = "p"
    # A keyless table (kind whole) kept bounded by a checksum of its rows
    # maintained from its changes (docs/verify.md, "Tables without a key"):
    checksum: bool = False
    ncols: int | None = None  # its columns when the checksum was taken ...
    columns: str | None = None  # ... and their names and types (a changed definition: compared whole)
    src_sums: str | None = None  # Sums.text() of the source's rows: at sums_snapshot, plus the deltas decoded since
    tgt_sums: str | None = None  # ... of the target's rows: at the baseline's T, plus the deltas consumed since
    sums_at: int | None = None  # the source position up to which decoded deltas are in src_sums
    sums_snapshot: str | None = None  # the source snapshot src_sums was taken in (pg_snapshot text)

    @property
    def parts(self) -> tuple[str, str]:
        return (self.nspname, self.relname)

    @property
    def baselined(self) -> bool:
        return self.next_bucket is None


def classify(nspname: str, relname: str, label: str, persistence: str, replident: str,
             root: tuple[str, str], pages: int, size: int, cols: list[str] | None, types: list[str] | None,
             type_oids: list[int] | None, is_primary: bool | None,
             columns: tuple[int, str, bool, bool] | None = None) -> Table:
    """How a table is tracked, from the source's catalogue row.

    Its changes can be decoded only if it can be in a publication without
    breaking the application: UPDATE and DELETE on a published table without a
    replica identity fail. Its rows can be compared by key if that identity is
    a key (the primary key, or the REPLICA IDENTITY USING INDEX index).
    A keyless table that is decoded whole rows (REPLICA IDENTITY FULL) is
    tracked by a checksum of its rows when its row text can be rebuilt from
    decoded changes (`columns`: count, signature, has a generated column, has
    a reg* column)."""
    t = Table(label=label, nspname=nspname, relname=relname, kind=UNTRACKED, replident=replident, bytes=size,
              root=root, persistence=persistence)
    if persistence != "p":
        t.why = "unlogged or temporary: its changes are never decoded"
        return t
    has_key = bool(cols) and (replident == "i" or (replident in ("d", "f") and bool(is_primary)))
    if replident == "n":
        t.why = "REPLICA IDENTITY NOTHING: it cannot be published"
        return t
    if replident == "d" and not has_key:
        t.why = "no primary key and no replica identity: it cannot be published"
        return t
    if not has_key:
        t.kind, t.why = WHOLE, "no primary key or replica identity index (REPLICA IDENTITY FULL)"
        ncols, signature, generated, reg = columns or (0, "", False, False)
        if generated:
            t.why += "; a generated column, which decoding leaves out of its rows"
        elif reg:
            t.why += "; a reg* column, whose text depends on search_path"
        elif ncols < 1:
            t.why += "; no column"
        else:
            t.checksum, t.ncols, t.columns = True, ncols, signature
            t.why += ": compared by a checksum kept current from its changes"
        return t
    t.kind = KEYED
    t.key_cols, t.key_types = list(cols), list(types)
    t.neutral = all(int(o) in NEUTRAL_TYPE_OIDS for o in type_oids)
    t.bucket_kind = "range" if int(type_oids[0]) in INTEGER_TYPE_OIDS else "hash"
    t.width = max(1, pages // BUCKET_PAGES)  # hash: number of buckets; range: set by geometry()
    t.first_bucket = t.last_bucket = t.next_bucket = 0
    return t


def geometry(t: Table, pages: int, lo: int | None, hi: int | None) -> None:
    """Range buckets of about BUCKET_PAGES pages over the key's current range."""
    if t.bucket_kind != "range":
        t.first_bucket = t.next_bucket = 0
        t.last_bucket = 0  # a hash-bucketed table is one chunk: every bucket needs a full scan
        return
    if lo is None or hi is None:
        lo = hi = 0
    nb = max(1, pages // BUCKET_PAGES)
    t.width = max(1, -(-(hi - lo + 1) // nb))
    t.first_bucket = t.next_bucket = math.floor(lo / t.width)
    t.last_bucket = math.floor(hi / t.width)


def publishable_roots(tables: list[Table]) -> list[tuple[str, str]]:
    """The top-level tables our publication names: every root whose leaves are
    all decodable (a partition without a replica identity would make UPDATE on
    it fail once its root is published). The other leaves of a root that is
    not published become untracked."""
    ok: dict[tuple[str, str], bool] = {}
    for t in tables:
        ok[t.root] = ok.get(t.root, True) and t.kind != UNTRACKED
    for t in tables:
        if not ok[t.root] and t.kind != UNTRACKED:
            t.kind, t.why = UNTRACKED, f"a partition of {t.root[0]}.{t.root[1]}, which has one that cannot be published"
            t.first_bucket = t.last_bucket = t.next_bucket = None
    return sorted(r for r, good in ok.items() if good)


@dataclass(frozen=True)
class Chunk:
    """Buckets lo <= b < hi of one table (None: open-ended), then its next bucket."""

    label: str
    lo: int | None
    hi: int | None
    next_bucket: int | None  # None: the table's baseline is done after this chunk


def next_chunks(tables: list[Table], budget: int = CHUNK_BYTES) -> list[Chunk]:
    """The baseline's work for one round: chunks of about `budget` bytes in all,
    in table order; at least one chunk when any is left."""
    out: list[Chunk] = []
    spent = 0
    for t in tables:
        if t.kind == UNTRACKED or t.baselined:
            continue
        if spent >= budget and out:
            break
        if t.kind == WHOLE or t.bucket_kind == "hash":
            out.append(Chunk(t.label, None, None, None))
            spent += t.bytes
            continue
        n_buckets = max(1, t.last_bucket - t.first_bucket + 1)
        per_bucket = max(1, t.bytes // n_buckets)
        lo = t.next_bucket
        take = min(max(1, (budget - spent) // per_bucket), max(1, t.last_bucket - lo + 1))
        hi = lo + take
        done = hi > t.last_bucket
        out.append(Chunk(t.label, None if lo <= t.first_bucket else lo, None if done else hi,
                         None if done else hi))
        spent += take * per_bucket
    return out


# --- snapshots ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Snapshot:
    """pg_snapshot as text: xmin:xmax:xip1,xip2 (64-bit transaction ids)."""

    xmin: int
    xmax: int
    xip: frozenset[int]

    @classmethod
    def parse(cls, text: str) -> Snapshot:
        xmin, xmax, xip = text.split(":")
        return cls(int(xmin), int(xmax), frozenset(int(x) for x in xip.split(",") if x))

    def text(self) -> str:
        return f"{self.xmin}:{self.xmax}:{','.join(map(str, sorted(self.xip)))}"

    def visible(self, xid8: int) -> bool:
        """Was this (committed) transaction finished when the snapshot was taken?"""
        return xid8 < self.xmax and xid8 not in self.xip

    def covers(self, earlier: Snapshot) -> bool:
        """Is every transaction visible in `earlier` visible here too? (The slot's
        exported snapshot is built from the WAL: a transaction whose commit is
        in the WAL can still be finishing in the server for a moment.)"""
        return all(not earlier.visible(x) for x in self.xip) and self.xmax >= earlier.xmax


def xid8(xid32: int, snap: Snapshot) -> int:
    """A decoded 32-bit xid as the 64-bit id, in the epoch the snapshot implies
    (the transaction is recent: it committed since the slot's last position)."""
    candidate = (snap.xmax >> 32 << 32) | xid32
    if candidate >= snap.xmax:
        candidate -= 1 << 32
    return candidate


# --- decoded changes ------------------------------------------------------------------------------

@dataclass
class Decoded:
    """What the source's slot says changed, up to a position."""

    keys: dict[str, set[tuple]] = field(default_factory=dict)  # label -> keys
    whole: set[str] = field(default_factory=set)  # labels changed as a whole (TRUNCATE, key unreadable)
    unknown: set[tuple[str, str]] = field(default_factory=set)  # (nspname, relname) not in the preparation
    xids: list[int] = field(default_factory=list)  # top-level 32-bit xids of the decoded transactions
    changes: int = 0
    # Keyless tables kept by checksum: the rows each change removed (-1) and
    # added (+1), as decoded text values (one transaction's, before merge)
    images: dict[str, list[tuple[int, tuple]]] = field(default_factory=dict)
    why: dict[str, str] = field(default_factory=dict)  # label -> why it changed "as a whole" (for the log)

    def merge(self, other: Decoded) -> None:
        for label, keys in other.keys.items():
            self.keys.setdefault(label, set()).update(keys)
        self.whole |= other.whole
        for label, why in other.why.items():
            self.why.setdefault(label, why)
        self.unknown |= other.unknown
        self.xids += other.xids
        self.changes += other.changes


def pending_groups(rows: list[tuple[str, str, list | None]]) -> tuple[dict[str, dict[tuple, list[str]]], dict[str, list[str]]]:
    """Pending rows (ctid, rel, key) -> per table: key -> ctids, and per table
    the ctids of its "whole table" markers."""
    keys: dict[str, dict[tuple, list[str]]] = {}
    whole: dict[str, list[str]] = {}
    for ctid, rel, key in rows:
        if key is None:
            whole.setdefault(rel, []).append(ctid)
        else:
            keys.setdefault(rel, {}).setdefault(tuple(key), []).append(ctid)
    return keys, whole


def differing(keys: list[tuple], src: dict[int, str], tgt: dict[int, str]) -> list[tuple]:
    """Keys (by position) whose row differs: present on one side only, or with
    another md5 of the row text. Absent on both sides is equal (deleted on both)."""
    return [k for i, k in enumerate(keys, 1) if src.get(i) != tgt.get(i)]


def bucket_differences(src: dict[int, tuple], tgt: dict[int, tuple]) -> list[int]:
    return sorted(b for b in set(src) | set(tgt) if src.get(b) != tgt.get(b))


def row_differences(src: dict[tuple, str], tgt: dict[tuple, str]) -> list[tuple]:
    return sorted(k for k in set(src) | set(tgt) if src.get(k) != tgt.get(k))


def should_stop(st) -> str | None:
    """Why reconcile should stop now (None: keep the comparison current).
    `st` is a steps.state.RunState."""
    if st.finished_at:
        return "the run has finished"
    if st.cutover_started_at and (st.verify_prepared_at or st.verify_skipped_preparation):
        return "the cutover has taken over (it runs the last round itself)"
    if st.end_position and not st.cutover_started_at:
        return "the end position is set without a cutover (finish ran on its own)"
    return None


# --- keyless tables: a checksum kept by deltas ------------------------------------------------------

@dataclass(frozen=True)
class Sums:
    """A multiset checksum of rows: the count and two sums of the row text's
    hashtextextended (seeds 0 and 1), exact integers. Adding a row adds its
    hashes, removing it subtracts them: so a table's checksum can be kept
    current from its changes, and a duplicated row counts twice."""

    n: int = 0
    h0: int = 0
    h1: int = 0

    def __add__(self, other: Sums) -> Sums:
        return Sums(self.n + other.n, self.h0 + other.h0, self.h1 + other.h1)

    def __bool__(self) -> bool:
        return bool(self.n or self.h0 or self.h1)

    def text(self) -> str:
        return f"{self.n} {self.h0} {self.h1}"

    @classmethod
    def parse(cls, text: str) -> Sums:
        n, h0, h1 = text.split()
        return cls(int(n), int(h0), int(h1))

    @classmethod
    def of(cls, row) -> Sums:
        """From a (count, sum0, sum1) row, numbers or their text."""
        return cls(*(int(v) for v in row))


def row_images(msg: Insert | Update | Delete, ncols: int) -> list[tuple[int, tuple]] | str:
    """The rows a decoded change removed (-1) and added (+1), each as its
    column values' text; or why they cannot be had (the table is then compared
    whole). An UPDATE's new row does not carry an unchanged TOASTed value: it
    is the old row's (REPLICA IDENTITY FULL decodes the whole old row)."""
    def complete(values, what: str) -> str | None:
        if len(values) != ncols:
            return f"a decoded {what} has {len(values)} columns, the checksum {ncols} (its definition changed?)"
        if any(v is UNCHANGED for v in values):
            return f"a decoded {what} lacks an unchanged TOASTed value"
        if any(isinstance(v, bytes) for v in values):
            return f"a decoded {what} is in binary"
        return None

    if isinstance(msg, Insert):
        why = complete(msg.new, "new row")
        return why or [(1, msg.new)]
    if msg.old is None or msg.old_kind != "O":
        return "a decoded change without its old row (not REPLICA IDENTITY FULL when it was made?)"
    why = complete(msg.old, "old row")
    if why:
        return why
    if isinstance(msg, Delete):
        return [(-1, msg.old)]
    if len(msg.new) != ncols:
        return complete(msg.new, "new row")
    new = tuple(o if v is UNCHANGED else v for v, o in zip(msg.new, msg.old))
    why = complete(new, "new row")
    return why or [(-1, msg.old), (1, new)]


def image_columns(images: list[tuple[int, tuple]], ncols: int) -> list[list]:
    """The parameters of sql.decoded_row_sums: the signs, then one list per column."""
    return [[s for s, _ in images]] + [[values[i] for _, values in images] for i in range(ncols)]


def delta_applies(end: int, xid32: int, sums_at: int, base: Snapshot, current: Snapshot) -> bool:
    """Is a decoded transaction (commit record ending at `end`) a change the
    source checksum does not have yet? Those up to sums_at are in it (a round
    that died before advancing the slot decodes them again), and so is every
    one visible in the snapshot the checksum was taken in (`base`), even when
    it committed after the slot's position then. `current` (a snapshot in
    which the transaction is visible) gives its xid's epoch."""
    return end > sums_at and not base.visible(xid8(xid32, current))
