"""Log lines for an operator reading the Argo UI: timestamped, one fact per line."""

import sys
import time


def log(message: str) -> None:
    stamp = time.strftime("%H:%M:%S", time.gmtime())
    print(f"{stamp} {message}", file=sys.stderr, flush=True)


def duration(seconds: float) -> str:
    """2d03h04m, 1h02m, 4m05s, 6s: the two most telling units (logs, reports, the CLI)."""
    seconds = max(0, int(round(seconds)))
    d, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    if d:
        return f"{d}d{h:02d}h{m:02d}m"
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"
