"""What verify reports: the final check (VerifyReport), and where the
comparison stands before the freeze (VerifyStatus)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from steps.pg import pretty_bytes


@dataclass
class TableResult:
    table: str
    source_rows: int  # rows read on the source by this verify (the whole table's count when re-read whole)
    target_rows: int
    match: bool
    how: str = "whole"  # whole: re-read whole; keys: its changed rows by key; unchanged: nothing changed since;
    # checksum: a keyless table, by the checksum of its rows kept current from its changes (rows: its count)


@dataclass
class VerifyReport:
    ok: bool
    mode: str  # upgrade | rehearsal
    tables: list[TableResult] = field(default_factory=list)
    missing_on_target: list[str] = field(default_factory=list)
    extra_on_target: list[str] = field(default_factory=list)
    sequences_behind: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    method: str = "bounded"  # bounded: what changed since the last round; full: everything (not prepared)
    keys_rechecked: int = 0  # changed rows compared by key
    whole_tables: list[str] = field(default_factory=list)  # tables re-read whole
    by_checksum: list[str] = field(default_factory=list)  # keyless tables compared by their kept checksums
    keyless_rows: int = 0  # decoded rows of those added to their checksums in the window
    seconds: float = 0.0
    round_seconds: float | None = None  # rehearsal: the bounded round a cutover would run
    differing_keys: dict[str, list[list]] = field(default_factory=dict)  # a few keys per table that differ
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per part (bounded: the last round's parts)

    def summary(self) -> str:
        if self.ok:
            if self.mode == "rehearsal":
                return (f"verified: {len(self.tables)} tables, {sum(t.target_rows for t in self.tables)} rows "
                        "(rehearsal: counts drift with writes after the end position"
                        + (f"; a bounded round took {self.round_seconds:.2f}s" if self.round_seconds is not None
                           else "") + ")")
            if self.method == "full":
                return (f"verified: {len(self.tables)} tables, {sum(t.target_rows for t in self.tables)} rows "
                        "compared whole (no preparation), checksums and sequences match")
            return (f"verified: {len(self.tables)} tables ({self.keys_rechecked} changed rows by key, "
                    + (f"{len(self.by_checksum)} keyless table(s) by checksum, " if self.by_checksum else "")
                    + f"{len(self.whole_tables)} table(s) re-read whole), rows, objects and sequences match")
        parts = []
        if self.missing_on_target:
            parts.append(f"missing on target: {', '.join(self.missing_on_target[:5])}")
        if self.extra_on_target:
            parts.append(f"extra on target: {', '.join(self.extra_on_target[:5])}")
        if self.mismatched:
            parts.append(f"tables differ: {', '.join(self.mismatched[:10])}")
        if self.sequences_behind:
            parts.append(f"sequences behind: {', '.join(self.sequences_behind[:5])}")
        return "verification FAILED: " + "; ".join(parts)

    def as_dict(self) -> dict:
        return {**asdict(self), "summary": self.summary()}


@dataclass
class VerifyStatus:
    prepared: bool
    prepared_at: float | None = None
    pending_keys: int = 0  # changed rows recorded on the target and not compared yet
    undecoded_bytes: int | None = None  # source WAL the tracking slot has not read yet
    baseline_left: list[str] = field(default_factory=list)  # tables whose first comparison is not done
    whole_at_verify: list[str] = field(default_factory=list)  # tables verify would re-read whole now
    without_key: list[tuple[str, int, str]] = field(default_factory=list)  # (table, bytes, why) with no usable key
    last_round_at: float | None = None
    rounds: int = 0

    def lines(self) -> list[str]:
        out = []
        if not self.prepared:
            out.append("verification: NOT prepared"
                       + (f" (baseline left for {len(self.baseline_left)} table(s))" if self.baseline_left else "")
                       + ": a cutover now would compare what is not prepared whole")
        else:
            out.append(f"verification: prepared; {self.pending_keys} changed row(s) not re-checked yet"
                       + (f", {pretty_bytes(self.undecoded_bytes)} of source WAL not read yet"
                          if self.undecoded_bytes else "") + f" ({self.rounds} round(s))")
        if self.whole_at_verify:
            out.append(f"verification: re-read whole at the cutover: {', '.join(self.whole_at_verify[:10])}")
        for table, size, why in self.without_key[:20]:
            out.append(f"verification: {table} ({pretty_bytes(size)}) has no usable key: {why}")
        return out

    def as_dict(self) -> dict:
        return asdict(self)
