"""How the applications move to the target at the cutover (DB_UPGRADE_SWITCH):

- `none` (the default): nothing moves; the cutover ends after the verification.
- `restart`: `kubectl rollout restart` the application deployments and wait for
  them (steps/switch/restart.py); writes fail from the freeze to their readiness.
- `pgbouncer`: PAUSE the database on PgBouncer, repoint its entry, RESUME
  (steps/switch/pgbouncer.py); the applications see a stall, not an error.
- `command`: a shell command of the operator's moves them (local runs:
  `db-upgrade run --restart-command`, and `db-upgrade rehearse`).

steps/switch/base.py says when the cutover calls each method.
"""

from __future__ import annotations

from steps.switch.base import Switch
from steps.switch.settings import load_switch_settings


def get(s=None, **overrides) -> Switch:
    """The strategy DB_UPGRADE_SWITCH names, its settings read and checked (one-line
    StepError); `s` (steps.settings.StepSettings) is accepted for symmetry with
    steps.engines.get: each strategy reads its own variables."""
    strategy = load_switch_settings(**overrides).switch
    if strategy == "restart":
        from steps.switch.restart import RestartSwitch, load_restart_settings

        return RestartSwitch(load_restart_settings())
    if strategy == "pgbouncer":
        from steps.switch.pgbouncer import PgBouncerSwitch
        from steps.switch.settings import load_pgbouncer_settings

        return PgBouncerSwitch(load_pgbouncer_settings())
    if strategy == "command":
        import os

        from steps.switch.command import CommandSwitch

        return CommandSwitch(os.environ.get("DB_UPGRADE_SWITCH_COMMAND", ""))
    from steps.switch.none import NoSwitch

    return NoSwitch()


__all__ = ["Switch", "get"]
