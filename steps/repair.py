"""Making an interrupted pgcopydb run resumable (see prepare_resume)."""

from steps.log import log
from steps.settings import StepSettings


def prepare_resume(s: StepSettings) -> None:
    log(f"follow: {s.workdir()} holds an earlier run; resuming it")
