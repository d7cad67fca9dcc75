class StepError(Exception):
    """A failure an operator can act on: printed as one line, exit status 1."""
