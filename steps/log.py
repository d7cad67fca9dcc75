"""Log lines for an operator reading the Argo UI: timestamped, one fact per line."""

import sys
import time


def log(message: str) -> None:
    stamp = time.strftime("%H:%M:%S", time.gmtime())
    print(f"{stamp} {message}", file=sys.stderr, flush=True)
