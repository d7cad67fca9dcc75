"""report: the exit handler's last word, one line an operator can read at 3 a.m."""

import json
import os

from steps.log import log
from steps.settings import StepSettings


def report(s: StepSettings) -> str:
    status = os.environ.get("DB_UPGRADE_WORKFLOW_STATUS", "unknown")
    try:
        failures = json.loads(os.environ.get("DB_UPGRADE_WORKFLOW_FAILURES") or "[]") or []
    except ValueError:
        failures = []
    detail = "; ".join(f"{f.get('displayName', '?')}: {f.get('message', '')}".strip() for f in failures)
    line = f"db-upgrade {status}" + (f": {detail}" if detail else "")
    log(line)
    s.write_output("outcome", status)
    return line
