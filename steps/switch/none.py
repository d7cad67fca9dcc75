"""none: nothing moves. The cutover ends after the verification and says so: the
operator points the applications at the target (the default locally, where there is
no application to move)."""

from __future__ import annotations

from steps.log import log
from steps.switch.base import Switch


class NoSwitch(Switch):
    name = "none"

    def describe(self) -> str:
        return "none: the applications are not moved (DB_UPGRADE_SWITCH=none): point them at the target yourself"

    def check(self) -> None:
        pass

    def hold(self) -> None:
        pass  # nothing holds the applications: the freeze alone stops their writes

    def release(self) -> None:
        pass  # the undo of a hold that held nothing

    def switch(self) -> None:
        log("switch none: the applications were not moved; point them at the target now")
