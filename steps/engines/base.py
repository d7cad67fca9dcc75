"""What a change engine provides: the copy, the change stream, and its end.

An engine copies the source into the target and keeps the target in sync
until an end position, then lets go. Everything around it (preflight's common
checks, approval, freeze, verify, the switch, the exit handler, rehearsals)
does not depend on which engine runs:

- `follow()` is the follow step: copy, then stream; it returns once the target
  has everything up to the end position `set_end()` recorded, and raises
  StepError otherwise (exit 0 only then).
- `lag()` is how far the target is behind, in bytes of source WAL; None while
  the initial copy runs.
- `set_end(since)` is the finish step: it marks the end on the source (works
  while the application's writes are frozen) and returns it; a second call
  keeps the first end, unless that end was set before `since` (the cutover
  passes its freeze time: an end from an earlier attempt, or from an abort
  path, is stale and would let writes made after it go missing).
- `reached(end)` tells whether the target has applied everything committed
  on the source before that end: the cutover's drain polls it.
- `stream_problem()` says why the change stream could not drain to an end
  right now (None when it can): the cutover asks before it freezes anything.
- `cleanup()` removes everything the engine created, on both sides;
  idempotent, safe after success, abort and failure.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from steps.settings import StepSettings


class Engine(ABC):
    name: ClassVar[str]
    # Does the change stream run without a pod (inside the target server)?
    # Then killing every pod after the copy loses nothing and stops nothing.
    apply_in_target: ClassVar[bool] = False

    def __init__(self, s: StepSettings):
        self.s = s

    @abstractmethod
    def preflight_checks(self, src, tgt, report) -> None:
        """Engine-specific checks; add each result to report (steps.preflight.Report)."""

    @abstractmethod
    def follow(self) -> None:
        """Copy, then stream changes until the end position is reached on the target."""

    @abstractmethod
    def lag(self) -> int | None:
        """Bytes of source WAL the target has not applied yet; None during the initial copy."""

    @abstractmethod
    def set_end(self, since: float | None = None) -> str:
        """Record the end position on the source and return it. Keeps an end already
        set, unless it was set before `since` (unix seconds): then a new one."""

    @abstractmethod
    def reached(self, end: str) -> bool:
        """Has the target applied everything the source committed before `end`?"""

    @abstractmethod
    def cleanup(self) -> None:
        """Drop the engine's objects on both sides (slot, publication, subscription, origin, ...)."""

    def stream_problem(self) -> str | None:
        """Why the stream cannot reach a new end now (stopped, broken); None when it can."""
        return None

    def copy_progress(self) -> tuple[int, int] | None:
        """(bytes copied, bytes in all) during the initial copy, when the engine knows."""
        return None
