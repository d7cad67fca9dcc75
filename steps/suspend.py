"""A decision taken at an Argo suspend node (approve, backout) counts only when
the node was resumed before its timeout.

Argo keeps a supplied output that was set through the suspend's timeout and
gives the unset ones their default (workflow/controller/operator.go
executeSuspend, workflow/util/util.go OverrideOutputParametersWithDefault): a
`cutover` (or `rollback`) whose resume failed would otherwise run by itself when
the node times out, hours later. The steps after the node get its start and end
(`{{tasks.X.startedAt}}`, `finishedAt`) and the timeout, and check.
"""

from __future__ import annotations

from datetime import datetime


def parse_time(value: str | None) -> float | None:
    """An RFC 3339 time as Argo renders it; None when empty or left unresolved."""
    if not value or "{{" in value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def decided_by_timeout(started: str | None, finished: str | None, timeout: float | None) -> bool:
    a, b = parse_time(started), parse_time(finished)
    if a is None or b is None or not timeout:
        return False
    return (b - a) >= timeout - 1
