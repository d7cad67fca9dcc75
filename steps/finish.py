"""finish: set the end position, which lets follow apply everything committed
before it and then exit.

The engine decides what the end is (steps/engines/): a barrier row on the
source (native), or pgcopydb's endpos at the source's insert position
(pgcopydb-follow). Run after the freeze it marks the last application write;
run on abort (no freeze) it simply stops follow. A second call keeps the first
end. Before catch-up is allowed: follow applies up to the end, however far.
"""

from __future__ import annotations

from steps import engines, state
from steps.log import log
from steps.settings import StepSettings


def finish(s: StepSettings) -> str:
    st = state.load(s)
    if not st.follow_started_at:
        log("finish: follow never started in this run; nothing to stop")
        return ""
    return engines.get(s).set_end()
