"""A parser for PostgreSQL's pgoutput logical replication protocol, version 1.

Only what verify needs: the relations (names, columns, which columns are the
replica identity) and, per change, the values of the columns it carries, as the
text the type's output function printed (pgoutput sends text unless `binary`
is asked for). The byte layout is the one documented in "Logical Replication
Message Formats" of the PostgreSQL manual (protocol-logicalrep-message-formats);
every message we do not use (Origin, Type, Message) is recognised and skipped.

Pure: bytes in, dataclasses out. Decoding through the SQL interface
(`pg_logical_slot_peek_binary_changes`) yields one message per row.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

# A column's value in a TupleData: text, NULL, or "unchanged TOASTed value"
# (an UPDATE that did not touch a large out-of-line value does not carry it).
UNCHANGED = object()


class ProtocolError(ValueError):
    """Bytes that are not pgoutput protocol version 1."""


@dataclass(frozen=True)
class Column:
    name: str
    type_oid: int
    typmod: int
    is_key: bool  # part of the replica identity (every column with REPLICA IDENTITY FULL)


@dataclass(frozen=True)
class Relation:
    oid: int
    namespace: str  # "" means pg_catalog in the protocol; we report it as given
    name: str
    replident: str  # d (default), n (nothing), f (full), i (index)
    columns: tuple[Column, ...]


@dataclass(frozen=True)
class Begin:
    final_lsn: int  # the LSN of the commit record
    commit_time: int  # microseconds since 2000-01-01
    xid: int  # the top-level transaction's 32-bit xid


@dataclass(frozen=True)
class Commit:
    flags: int
    commit_lsn: int  # start of the commit record
    end_lsn: int  # end of the commit record: what a subscriber's origin records as applied
    commit_time: int


Tuple = tuple  # values: str | None | UNCHANGED, one per column of the Relation


@dataclass(frozen=True)
class Insert:
    rel: int
    new: Tuple


@dataclass(frozen=True)
class Update:
    rel: int
    old: Tuple | None  # the old key ('K') or old row ('O'); None when the key did not change
    old_kind: str | None  # 'K', 'O' or None
    new: Tuple


@dataclass(frozen=True)
class Delete:
    rel: int
    old: Tuple
    old_kind: str  # 'K' or 'O'


@dataclass(frozen=True)
class Truncate:
    rels: tuple[int, ...]
    options: int  # 1: CASCADE, 2: RESTART IDENTITY


@dataclass(frozen=True)
class Other:
    kind: str  # O (origin), Y (type), M (logical message)


Message = Begin | Commit | Relation | Insert | Update | Delete | Truncate | Other


@dataclass
class _Reader:
    data: bytes
    pos: int = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ProtocolError(f"message ends after {len(self.data)} bytes, {self.pos + n} needed")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def byte(self) -> str:
        return chr(self.take(1)[0])

    def int8(self) -> int:
        return self.take(1)[0]

    def int16(self) -> int:
        return struct.unpack("!h", self.take(2))[0]

    def int32(self) -> int:
        return struct.unpack("!i", self.take(4))[0]

    def uint32(self) -> int:
        return struct.unpack("!I", self.take(4))[0]

    def int64(self) -> int:
        return struct.unpack("!q", self.take(8))[0]

    def uint64(self) -> int:
        return struct.unpack("!Q", self.take(8))[0]

    def string(self) -> str:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise ProtocolError("unterminated string")
        out = self.data[self.pos:end].decode()
        self.pos = end + 1
        return out

    def tuple(self) -> Tuple:
        values = []
        for _ in range(self.int16()):
            kind = self.byte()
            if kind == "n":
                values.append(None)
            elif kind == "u":
                values.append(UNCHANGED)
            elif kind in ("t", "b"):
                raw = self.take(self.int32())
                values.append(raw.decode() if kind == "t" else raw)
            else:
                raise ProtocolError(f"unknown column kind {kind!r} in a tuple")
        return tuple(values)


def parse(data: bytes) -> Message:
    """One pgoutput message."""
    r = _Reader(bytes(data))
    kind = r.byte()
    if kind == "B":
        return Begin(final_lsn=r.uint64(), commit_time=r.int64(), xid=r.uint32())
    if kind == "C":
        return Commit(flags=r.int8(), commit_lsn=r.uint64(), end_lsn=r.uint64(), commit_time=r.int64())
    if kind == "R":
        oid, namespace, name, replident = r.uint32(), r.string(), r.string(), r.byte()
        cols = []
        for _ in range(r.int16()):
            flags = r.int8()
            cols.append(Column(name=r.string(), type_oid=r.uint32(), typmod=r.int32(), is_key=bool(flags & 1)))
        return Relation(oid, namespace, name, replident, tuple(cols))
    if kind == "I":
        rel = r.uint32()
        if r.byte() != "N":
            raise ProtocolError("INSERT without a new tuple")
        return Insert(rel, r.tuple())
    if kind == "U":
        rel = r.uint32()
        tag = r.byte()
        old, old_kind = None, None
        if tag in ("K", "O"):
            old, old_kind = r.tuple(), tag
            tag = r.byte()
        if tag != "N":
            raise ProtocolError(f"UPDATE: expected a new tuple, got {tag!r}")
        return Update(rel, old, old_kind, r.tuple())
    if kind == "D":
        rel = r.uint32()
        tag = r.byte()
        if tag not in ("K", "O"):
            raise ProtocolError(f"DELETE: expected an old key or row, got {tag!r}")
        return Delete(rel, r.tuple(), tag)
    if kind == "T":
        n, options = r.int32(), r.int8()
        return Truncate(tuple(r.uint32() for _ in range(n)), options)
    if kind in ("O", "Y", "M"):
        return Other(kind)
    raise ProtocolError(f"unknown pgoutput message type {kind!r} (only protocol version 1 is understood)")


@dataclass
class KeyChange:
    """What one decoded change means for verify: which keys of which table it
    touched, or that the whole table must be compared (TRUNCATE, a change whose
    key cannot be read)."""

    namespace: str
    table: str
    keys: list[tuple[str | None, ...]] = field(default_factory=list)
    whole: bool = False


def change_keys(msg: Insert | Update | Delete, rel: Relation, key_columns: list[str] | None) -> KeyChange:
    """The key values a row change touched, by the column names of the table's
    key (None: the table has no usable key, so only "it changed" is known).

    An UPDATE touches its old key and its new one (they differ when the key
    itself was updated). A key value that the message does not carry (an
    unchanged TOASTed key column, or a key column missing from the relation)
    makes the whole table changed: never a guess."""
    out = KeyChange(rel.namespace, rel.name)
    if key_columns is None:
        out.whole = True
        return out
    names = [c.name for c in rel.columns]
    try:
        idx = [names.index(k) for k in key_columns]
    except ValueError:
        out.whole = True
        return out
    tuples = []
    if isinstance(msg, Insert):
        tuples = [msg.new]
    elif isinstance(msg, Update):
        tuples = [msg.new] + ([msg.old] if msg.old is not None else [])
    else:
        tuples = [msg.old]
    for t in tuples:
        if len(t) != len(names):
            out.whole = True
            return out
        key = tuple(t[i] for i in idx)
        if any(v is UNCHANGED or isinstance(v, bytes) for v in key):
            out.whole = True
            return out
        if key not in out.keys:
            out.keys.append(key)
    return out
