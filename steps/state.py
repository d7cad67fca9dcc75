"""What the steps record for each other, in a small JSON file on the work volume.

pgcopydb ignores files it does not know in its --dir, so the record lives beside
its own catalogs and travels with the volume from pod to pod.
"""

import json
import os
import time
from pathlib import Path

NAME = "db-upgrade-state.json"


def path(workdir: Path) -> Path:
    return workdir / NAME


def read(workdir: Path) -> dict:
    try:
        return json.loads(path(workdir).read_text())
    except FileNotFoundError:
        return {}


def update(workdir: Path, **values: object) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    data = read(workdir)
    data.update(values)
    tmp = path(workdir).with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path(workdir))  # atomic: a killed pod never leaves half a file
    return data


def try_update(workdir: Path, **values: object) -> None:
    """For steps whose pod may run without the work volume (verify, unfreeze):
    the record is a convenience there, never a reason to fail."""
    try:
        update(workdir, **values)
    except OSError:
        pass


def now() -> float:
    return round(time.time(), 3)
