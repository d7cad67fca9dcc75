"""One upgrade of one database, through the step processes as their pods run them.

`db-upgrade step preflight`, `grant-replication`, `follow` beside
`wait-caught-up`, `verify-prepare` from the catch-up on, then `cutover`
(or `finish` for runs that only copy), `cleanup`; each a process with the
environment its pod would get (tests/conftest.py step_env, plus the outputs
directory, the application roles to fence, and the switch). The switch is
`DB_UPGRADE_SWITCH=command` with `touch FILE`: the bench's application writer
polls that file every few milliseconds and moves to the target the moment the
switch happens, as local/rehearse.py wires it.

The source database is a file-level clone of the workload's template, the
target an empty database; both are dropped at the end, whatever happened.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
from psycopg import sql

from bench import data
from local import workload

DB_UPGRADE = str(Path(sys.executable).parent / "db-upgrade")
SWITCH_POLL = 0.005
# wait-caught-up polls this often here (the template's default is 2 s): the copy
# time is read from its record, and 2 s steps would blur a 15 s copy.
CATCHUP_POLL = 0.2


class StepFailed(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


class Upgrade:
    """A source cloned from `template`, an empty target, and the steps between them."""

    def __init__(self, pair, base: Path, tag: str, engine: str, freeze_sql: tuple, template: str,
                 jobs: tuple[int, int], monitor=None, pythonpath: str | None = None):
        self.pair = pair
        self.tag = tag
        self.name = f"r{tag}"
        self.engine_name = engine
        self.monitor = monitor
        self.src = data.clone_database(pair.source.uri(), template, self.name)
        self.tgt = data.empty_database(pair.target.uri(), self.name)
        self.dir = base / f"run_{tag}"
        self.logs = self.dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.outputs = self.dir / "outputs"
        self.switch_file = self.dir / "switched"
        self.procs: dict[str, subprocess.Popen] = {}
        self.began = False  # close() runs the cleanup step only for a run that began
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_UPGRADE_", "PGCOPYDB_"))}
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        env.update(PGCOPYDB_SOURCE_PGURI=self.src, PGCOPYDB_TARGET_PGURI=self.tgt,
                   DB_UPGRADE_DIR=str(self.dir / "work"), DB_UPGRADE_OUTPUTS=str(self.outputs),
                   DB_UPGRADE_RUN_ID=self.name, DB_UPGRADE_ENGINE=engine, DB_UPGRADE_SLOT_NAME=f"s_{tag}",
                   DB_UPGRADE_READONLY_SQL=str(freeze_sql[0]), DB_UPGRADE_UNFREEZE_SQL=str(freeze_sql[1]),
                   DB_UPGRADE_APP_ROLES=workload.APP_ROLE, DB_UPGRADE_TABLE_JOBS=str(jobs[0]),
                   DB_UPGRADE_INDEX_JOBS=str(jobs[1]), DB_UPGRADE_SWITCH="command",
                   DB_UPGRADE_SWITCH_COMMAND=f"touch {shlex.quote(str(self.switch_file))}")
        self.env = env
        from steps.settings import load_settings

        self.s = load_settings(**{k.removeprefix("DB_UPGRADE_").lower(): v for k, v in env.items()
                                  if k.startswith("DB_UPGRADE_")}, source_pguri=self.src, target_pguri=self.tgt)

    # -- processes ---------------------------------------------------------------------------

    def start(self, step: str, **extra) -> subprocess.Popen:
        env = {**self.env, **{k: str(v) for k, v in extra.items()}}
        out = open(self.logs / f"{step}.log", "a")
        proc = subprocess.Popen([DB_UPGRADE, "step", step], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        out.close()
        self.procs[step] = proc
        if self.monitor is not None:
            self.monitor.watch(step, proc.pid)
        return proc

    def wait(self, step: str, timeout: float) -> int:
        try:
            return self.procs[step].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill(step)
            raise StepFailed(f"step {step} did not end within {timeout:.0f}s; {self.tail(step)}") from None

    def run(self, step: str, timeout: float = 600, **extra) -> float:
        t0 = time.time()
        self.start(step, **extra)
        rc = self.wait(step, timeout)
        if rc != 0:
            raise StepFailed(f"step {step} exited {rc}: {self.tail(step)}")
        return time.time() - t0

    def kill(self, step: str) -> None:
        """As a pod dies: the step and everything it started. pgcopydb runs under bwrap
        in sessions of its own and renames its processes, so the sessions of the
        step's descendants are found first (before their parent dies), then ended."""
        from bench.memory import _parents, tree

        proc = self.procs.get(step)
        if proc is None or proc.poll() is not None:
            return
        parents = _parents()
        sessions = set()
        for pid in tree(proc.pid, parents):
            try:
                sessions.add(os.getsid(pid))
            except OSError:
                continue
        for pid in parents:
            try:
                if os.getsid(pid) in sessions:
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                continue
        proc.wait(timeout=30)

    def stop(self, step: str, timeout: float = 60) -> None:
        """SIGTERM first, as Kubernetes stops a pod (the step stops pgcopydb itself), then kill."""
        proc = self.procs.get(step)
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill(step)

    def tail(self, step: str, lines: int = 6) -> str:
        try:
            text = (self.logs / f"{step}.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:])

    # -- phases ------------------------------------------------------------------------------

    def begin(self) -> None:
        self.began = True
        self.run("preflight", timeout=300)
        self.run("grant-replication", timeout=120)

    def copy(self, timeout: float) -> float:
        """follow and wait-caught-up; returns follow start -> caught up, in seconds."""
        t0 = time.time()
        self.start("follow")
        self.start("wait-caught-up", DB_UPGRADE_POLL_INTERVAL=CATCHUP_POLL, DB_UPGRADE_CATCHUP_TIMEOUT=timeout)
        rc = self.wait("wait-caught-up", timeout + 60)
        if rc != 0:
            raise StepFailed(f"wait-caught-up exited {rc}: {self.tail('wait-caught-up')}; follow: {self.tail('follow')}")
        st = self.state()
        return round(st.caught_up_at - t0, 2)

    def state(self):
        from steps import state

        return state.load(self.s)

    def lag(self) -> int | None:
        from steps import engines

        try:
            return engines.get(self.s).lag()
        except Exception:
            return None

    def output(self, name: str) -> str | None:
        try:
            return (self.outputs / name).read_text().strip() or None
        except OSError:
            return None

    def watch_switch(self, on_switch) -> threading.Event:
        """Calls on_switch() the moment the switch command has touched the file."""
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                if self.switch_file.exists():
                    on_switch()
                    return
                time.sleep(SWITCH_POLL)

        threading.Thread(target=poll, daemon=True, name="switch-watch").start()
        return done

    def close(self) -> None:
        """Whatever happened: every step stopped, the run's objects cleaned up, the
        application role writable on the source and able to log in on the target,
        both databases dropped."""
        for step in list(self.procs):
            self.stop(step)
        if self.began:
            for attempt in (1, 2):
                try:
                    self.run("cleanup", timeout=180)
                    break
                except Exception as exc:
                    log(f"bench: cleanup of {self.name} (attempt {attempt}): {exc}")
                    time.sleep(5)
        role = sql.Identifier(workload.APP_ROLE)
        for uri, stmt in ((self.pair.source.uri(), sql.SQL("ALTER ROLE {} RESET default_transaction_read_only")),
                          (self.pair.target.uri(), sql.SQL("ALTER ROLE {} LOGIN"))):
            try:
                with psycopg.connect(uri, autocommit=True) as conn:
                    conn.execute(stmt.format(role))
            except psycopg.Error as exc:
                log(f"bench: resetting the application role: {exc}")
        data.drop_database(self.pair.source.uri(), self.name)
        data.drop_database(self.pair.target.uri(), self.name)
        left = leftover_slots(self.pair.source.uri())
        if left:
            log(f"bench: replication slots left on the source after {self.name}: {left}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def leftover_slots(server_uri: str) -> list[str]:
    try:
        with psycopg.connect(server_uri, autocommit=True) as conn:
            return [r[0] for r in conn.execute("SELECT slot_name FROM pg_replication_slots").fetchall()]
    except psycopg.Error:
        return []


def timings(upgrade: Upgrade) -> dict:
    try:
        return json.loads(upgrade.output("timings") or "{}")
    except ValueError:
        return {}
