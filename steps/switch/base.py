"""What a switch strategy provides to the cutover (steps/cutover.py).

The cutover calls, in this order:

- `check()` first, before anything changes: configuration, reachability,
  privileges; a StepError (one line) stops the cutover with nothing done.
- `hold()` right before the freeze: the applications' new transactions wait
  (PgBouncer: PAUSE, which waits for the running ones). Bounded: on a timeout
  it undoes itself and raises.
- `release()`, the undo of `hold()`, on any failure before the switch: the
  applications go on with the OLD database. Idempotent, safe without a hold.
- `switch()` once the target is verified and its fence lifted: the
  applications go to the target (and, after a hold, go on there).
- `describe()`: one line for the logs and the approval.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar


class Switch(ABC):
    name: ClassVar[str]

    @abstractmethod
    def check(self) -> None:
        """Configuration, reachability and privileges, before anything changes."""

    @abstractmethod
    def hold(self) -> None:
        """Right before the freeze: hold the applications' new transactions."""

    @abstractmethod
    def release(self) -> None:
        """The undo of hold(): the applications go on with the old database."""

    @abstractmethod
    def switch(self) -> None:
        """The applications go to the target."""

    @abstractmethod
    def describe(self) -> str:
        """One line: what switch() will do."""
