"""The code that runs inside the workflow's pods: one module per upgrade step.

Every step is a plain function taking `StepSettings`, callable from Python (the
local runner, tests, benchmarks) and from the shell as `db-upgrade step NAME`.
"""
