"""What the operator sees during `db-upgrade run` and `rehearse`: log lines, a live panel, the approval prompt.

On a terminal: a live panel (phase, a progress bar of the initial copy with bytes,
rate and ETA, the lag, the elapsed time) above the step log lines. Elsewhere (CI,
a pipe): a status line every STATUS_EVERY seconds instead.

The copy's bytes come from the follow step's progress file (the runner's
`progress_file("follow")`, the pod's $ARGO_PROGRESS_FILE), written by
steps/progress.py: a `bytes DONE/TOTAL rate R eta E` line, then Argo's `N/M` line.
A file with only `N/M` (another writer) is shown as it is.
"""

from __future__ import annotations

import re
import threading
import time
from typing import TYPE_CHECKING

from steps import progress as copy_progress
from steps.pg import pretty_bytes

if TYPE_CHECKING:
    from local.runner import Runner

_STEP_LINE = re.compile(r"^(\d\d:\d\d:\d\d) (.*)$")
_PGCOPYDB_TABLE = re.compile(r"^(\s|-)|.* \| ")
_PGCOPYDB_LINE = re.compile(r"^(?:\d{4}-\d\d-\d\d )?\d\d:\d\d:\d\d\.\d+ +\d+ +(\w+) ")
STATE_EVERY = 10.0  # seconds between reads of the run's record (one small query on the source)


from steps.log import duration as _fmt_elapsed  # noqa: E402


def describe_copy(p: copy_progress.Progress) -> str:
    """`12.0 GB of 40.0 GB (30%), 50.0 MB/s, about 9m33s left` for the panel and the status line."""
    text = f"{pretty_bytes(p.done)} of {pretty_bytes(p.total)} ({p.fraction * 100:.0f}%)"
    if p.rate is not None:
        text += f", {pretty_bytes(p.rate)}/s"
    if p.done >= p.total:
        return text + ", done"
    if p.eta is not None:
        text += f", about {copy_progress.format_eta(p.eta)} left"
    return text


class Display:
    """Progress for the operator: a live panel on a terminal, a status line every 30 s otherwise."""

    STATUS_EVERY = 30.0

    def __init__(self, console, verbose: bool = False):
        self.console = console
        self.verbose = verbose
        self.quiet = False
        self.asking = False
        self._held: list[tuple[str, str, str]] = []
        self._held_lock = threading.Lock()
        self.runner: Runner | None = None
        self.started = time.time()
        self.live = None
        self._last_status = time.monotonic()
        self._stop = threading.Event()
        self._copy_done: bool | None = None  # from the run's record, refreshed by the ticker

    def emit(self, task: str, line: str) -> None:
        if not self.verbose:
            m = _PGCOPYDB_LINE.match(line)
            if m and m[1] not in ("ERROR", "FATAL"):
                return  # pgcopydb's own log: in the step's log file, not on the console
            if not line.strip() or (task == "follow" and _PGCOPYDB_TABLE.match(line)):
                return  # pgcopydb's summary tables

        s = _STEP_LINE.match(line)
        stamp, rest = (s[1], s[2]) if s else (time.strftime("%H:%M:%S", time.gmtime()), line)
        prefix = "" if rest.startswith(f"{task}:") or task == "run" else f"[{task}] "
        if self.quiet:
            return
        with self._held_lock:
            if self.asking:  # keep the prompt readable; shown right after the answer
                self._held.append((stamp, prefix, rest))
                return
        try:
            self.console.print(f"{stamp} {prefix}{rest}", markup=False, highlight=False, soft_wrap=True)
        except (OSError, SystemExit):
            # The terminal went away (closed pipe, lost ssh): rich raises SystemExit then. The run
            # must go on to its end and clean up; the step logs still have every line.
            self.quiet = True

    # -- what is shown

    def copy(self) -> copy_progress.Progress | None:
        """The copy's bytes, rate and ETA, when the follow step wrote them."""
        r = self.runner
        p = copy_progress.read_file(r.progress_file("follow")) if r is not None else None
        if p is not None and self._copy_done and p.done < p.total:
            # The engine stops reporting once the copy is done (its last reading was short of it).
            return copy_progress.Progress(p.total, p.total)
        return p

    def progress(self) -> str | None:
        """The copy as one phrase: bytes when known, else the raw N/M another writer left."""
        p = self.copy()
        if p is not None and p.total > 0:
            return describe_copy(p)
        r = self.runner
        return copy_progress.read_argo(r.progress_file("follow")) if r is not None else None

    def _refresh_state(self) -> None:
        """Whether the initial copy is done, from the run's record (the ticker calls it, not the render)."""
        r = self.runner
        if r is None:
            return
        try:
            from steps import state
            from steps.settings import load_settings

            s = load_settings(source_pguri=r.uris["PGCOPYDB_SOURCE_PGURI"],
                              run_id=r.values.get("workflow.name", "local"))
            st = state.try_load(s)
        except Exception:  # the display never breaks a run
            return
        if st is not None:
            self._copy_done = st.copy_done_at is not None

    def snapshot(self) -> dict[str, str]:
        r = self.runner
        running = [n.name for n in (r.exit_nodes or r.nodes).values() if n.phase == "Running"] if r else []
        phase = ", ".join(running) or "starting"
        p = self.copy()
        copying = p.done < p.total if p is not None and p.total > 0 else self._copy_done is False
        if "follow" in running and copying and self._copy_done is not True:
            phase += " (initial copy)"
        if r and r.in_exit_handler:
            phase = "exit handler: " + phase
        lag = (r.values.get("tasks.verify-ready.outputs.parameters.lag")
               or r.values.get("tasks.wait-caught-up.outputs.parameters.lag", "-")) if r else "-"
        return {"phase": phase, "copied": self.progress() or "-", "lag": lag,
                "elapsed": _fmt_elapsed(time.time() - self.started)}

    def _render(self):
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        snap = self.snapshot()
        t = Table.grid(padding=(0, 2))
        t.add_column(style="bold")
        t.add_column()
        t.add_row("phase", snap["phase"])
        p = self.copy()
        if p is not None and p.total > 0:
            bar = Table.grid(padding=(0, 1))
            bar.add_row(ProgressBar(total=p.total, completed=min(p.done, p.total), width=30), describe_copy(p))
            t.add_row("copy", bar)
        else:
            t.add_row("copied", snap["copied"])
        t.add_row("lag", snap["lag"])
        t.add_row("elapsed", snap["elapsed"])
        return t

    def _ticker(self) -> None:
        last_state = 0.0
        while not self._stop.wait(1.0):
            if time.monotonic() - last_state >= STATE_EVERY and self._copy_done is not True:
                last_state = time.monotonic()
                self._refresh_state()
            if self.live is None and time.monotonic() - self._last_status >= self.STATUS_EVERY:
                self._last_status = time.monotonic()
                snap = self.snapshot()
                self.emit("run", f"status: {snap['phase']}; copied {snap['copied']}; lag {snap['lag']}; "
                                 f"elapsed {snap['elapsed']}")

    def __enter__(self) -> "Display":
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live(get_renderable=self._render, console=self.console, refresh_per_second=2,
                             transient=True)
            self.live.start()
        threading.Thread(target=self._ticker, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.live is not None:
            self.live.stop()

    def ask(self, lag: str) -> str:
        """The interactive approval: the lag, then cutover or abort."""
        from rich.prompt import Prompt

        if self.live is not None:
            self.live.stop()
        try:
            self.console.print(f"[bold]caught up[/bold]: {lag or 'lag unknown'}", markup=True, highlight=False)
            verification = self.runner.values.get("tasks.verify-ready.outputs.parameters.verification") \
                if self.runner else None
            for part in (verification or "").split("; "):
                if part:
                    self.console.print(part, markup=False, highlight=False)
            self.console.print("cutover = freeze writes on the source, drain, verify, then switch the applications "
                               "to the target (one step); abort = stop and clean up, the source stays the primary",
                               markup=False, highlight=False)
            self.asking = True
            return Prompt.ask("decision", choices=["cutover", "abort"], console=self.console)
        finally:
            with self._held_lock:
                self.asking = False
                held, self._held = self._held, []
            for stamp, prefix, rest in held:
                self.emit("run", f"{stamp} {prefix}{rest}")
            if self.live is not None:
                self.live.start()
