"""command: the switch is a shell command of the operator's (`db-upgrade run
--restart-command`, and `db-upgrade rehearse`, whose application moves when it
runs). The command gets DB_UPGRADE_FROZEN_AT in its environment; it is the
operator's own text, never built from a parameter."""

from __future__ import annotations

import os
import subprocess
import time

from steps.errors import StepError
from steps.log import log
from steps.switch.base import Switch

TIMEOUT = 600


class CommandSwitch(Switch):
    name = "command"

    def __init__(self, command: str):
        self.command = command

    def describe(self) -> str:
        return "command: the applications move when the switch command runs"

    def check(self) -> None:
        if not self.command.strip():
            raise StepError("DB_UPGRADE_SWITCH=command needs DB_UPGRADE_SWITCH_COMMAND: the shell command that moves "
                            "the applications to the target")

    def hold(self) -> None:
        pass

    def release(self) -> None:
        pass

    def switch(self) -> None:
        log("switch: running the switch command (the applications move to the target)")
        started = time.monotonic()
        try:
            proc = subprocess.run(["/bin/sh", "-c", self.command], env=dict(os.environ), timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            raise StepError(f"switch: the switch command did not end within {TIMEOUT}s") from None
        if proc.returncode != 0:
            raise StepError(f"switch: the switch command exited {proc.returncode}")
        log(f"switch: the switch command ended in {time.monotonic() - started:.2f}s")
