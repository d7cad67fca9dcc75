"""`db-upgrade run`: the upgrade WorkflowTemplate, executed on this machine.

The task graph is not written down here: it is read from the rendered Hera
template (workflows/upgrade.py), so a change of order there changes the local
run too. What is interpreted, as Argo does it:

- DAG tasks start when every task named in their `depends` has ended; a false
  `depends` makes the task Omitted, a false `when` Skipped. Independent branches
  run at the same time (follow runs while wait-caught-up and approve proceed).
- Each container template `db-upgrade step NAME` runs as a subprocess with the
  env the pod gets (the container's env, with the volume paths mapped to local
  directories and the connection Secrets replaced by the given URIs).
- Output parameters are read from the step's outputs directory; `globalName`
  outputs become workflow outputs (`frozen-at`, `restart-started`).
- The suspend template (`approve`) asks the operator, or answers by itself.
- The onExit DAG runs after the main DAG with `workflow.status` and
  `workflow.failures`, exactly as in Argo.

Local differences, on purpose: the `restart` step (Kubernetes deployments) is
replaced by a hook and an optional `--restart-command`; the approval has no
timeout (the operator is at the terminal); Ctrl-C acts as `argo stop`: running
steps get SIGTERM, nothing new starts, and the exit handler runs (finish is not
needed then: follow is stopped by its signal, and cleanup drops the slot).
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from workflows.upgrade import OUTPUTS_DIR, SERVICE_FILE_DIR, SQL_DIR, WORK_DIR

TERMINAL = ("Succeeded", "Failed", "Errored", "Skipped", "Omitted")
RESULTS = ("Succeeded", "Failed", "Errored", "Skipped", "Omitted", "Daemoned")
URI_VARS = ("PGCOPYDB_SOURCE_PGURI", "PGCOPYDB_TARGET_PGURI")
# Set by the runner for each step; never taken from the operator's shell.
RUNNER_VARS = {"DB_UPGRADE_DIR", "DB_UPGRADE_OUTPUTS", "DB_UPGRADE_MODE", "DB_UPGRADE_READONLY_SQL",
               "DB_UPGRADE_UNFREEZE_SQL", "DB_UPGRADE_KEEP_SLOT", "DB_UPGRADE_FROZEN_AT",
               "DB_UPGRADE_WORKFLOW_STATUS", "DB_UPGRADE_WORKFLOW_FAILURES", "ARGO_PROGRESS_FILE", *URI_VARS}
DEFAULT_GRACE = 30.0
EXIT_OK, EXIT_FAILED, EXIT_ABORTED, EXIT_INTERRUPTED = 0, 1, 3, 130


class RunError(Exception):
    """Bad input or an unusable template: one line for the operator."""


def db_upgrade_argv() -> list[str]:
    exe = Path(sys.executable).parent / "db-upgrade"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", "from cli.main import main; main()"]


# --- The template --------------------------------------------------------------------

def default_config():
    """The built-in environment of local runs: only its tunables and the DAG matter here."""
    from workflows.config import Config

    return Config.model_validate({
        "name": "local",
        "database_id": "local",
        "namespace": "local",
        "image": {"repository": "local/db-upgrade"},
        "connections": {"source": {"secret": "source", "key": "uri"}, "target": {"secret": "target", "key": "uri"}},
        "sql_config_map": "db-upgrade-sql",
        "restart": {"deployments": ["local"]},
    })


def load_template(config_path: Path | None = None) -> dict:
    from workflows.config import load_config
    from workflows.upgrade import render

    return render(load_config(config_path) if config_path else default_config())


def templates(wt: dict) -> dict[str, dict]:
    return {t["name"]: t for t in wt["spec"]["templates"]}


def step_name(template: dict) -> str | None:
    """`db-upgrade step NAME` -> NAME; None for a template that is not a step container."""
    c = template.get("container")
    if not c:
        return None
    args = c.get("args") or []
    if len(args) == 2 and args[0] == "step" and not c.get("command"):
        return args[1]
    raise RunError(f"template {template['name']!r} does not run `db-upgrade step NAME` (args {args}): "
                   "the local runner cannot map it to a step")


# --- Expressions: Argo's `depends` and the govaluate subset used in `when` -------------

_TOKEN = re.compile(r"\s*(?:(\|\||&&|==|!=|=~|!~|!|\(|\))|'([^']*)'|\"([^\"]*)\"|([^\s()!=&|'\"~]+))")


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise RunError(f"cannot parse expression at {text[pos:pos + 20]!r} in {text!r}")
        pos = m.end()
        if m[1]:
            out.append(("op", m[1]))
        elif m[2] is not None or m[3] is not None:
            out.append(("str", m[2] if m[2] is not None else m[3]))
        elif m[4]:
            out.append(("word", m[4]))
    return out


def evaluate(text: str, word: Callable[[str], object]) -> bool:
    """||, &&, !, parentheses, ==, !=, =~, !~ over quoted strings and words (resolved by `word`)."""
    toks = _tokens(text)
    i = 0

    def peek():
        return toks[i] if i < len(toks) else (None, None)

    def take():
        nonlocal i
        i += 1
        return toks[i - 1]

    def primary():
        kind, val = take()
        if kind == "op" and val == "(":
            v = disj()
            if take() != ("op", ")"):
                raise RunError(f"missing ')' in {text!r}")
            return v
        if kind == "str":
            return val
        if kind == "word":
            return word(val)
        raise RunError(f"unexpected {val!r} in {text!r}")

    def comparison():
        left = primary()
        kind, val = peek()
        if kind == "op" and val in ("==", "!=", "=~", "!~"):
            take()
            right = primary()
            if val == "==":
                return str(left) == str(right)
            if val == "!=":
                return str(left) != str(right)
            found = re.search(str(right), str(left)) is not None
            return found if val == "=~" else not found
        return left

    def unary():
        if peek() == ("op", "!"):
            take()
            return not _truth(unary())
        return comparison()

    def conj():
        v = _truth(unary())
        while peek() == ("op", "&&"):
            take()
            v = _truth(unary()) and v
        return v

    def disj():
        v = conj()
        while peek() == ("op", "||"):
            take()
            v = conj() or v
        return v

    result = disj()
    if i != len(toks):
        raise RunError(f"unexpected {toks[i][1]!r} in {text!r}")
    return _truth(result)


def _truth(v) -> bool:
    if isinstance(v, bool):
        return v
    return str(v).strip().lower() == "true"


def depends_on(expr: str) -> set[str]:
    names = set()
    for kind, val in _tokens(expr):
        if kind == "word":
            names.add(val.split(".")[0])
    return names


def evaluate_depends(expr: str, states: dict[str, str]) -> bool:
    def word(w: str) -> bool:
        task, _, result = w.partition(".")
        if task not in states:
            raise RunError(f"depends names unknown task {task!r}: {expr!r}")
        state = states[task]
        if not result:  # Argo: a bare name matches Succeeded, Skipped and Daemoned
            return state in ("Succeeded", "Skipped", "Daemoned")
        result = {"AnySucceeded": "Succeeded", "AllFailed": "Failed"}.get(result, result)
        if result not in RESULTS:
            raise RunError(f"unknown task result {w!r} in depends {expr!r}")
        return state == result

    return evaluate(expr, word)


def substitute(text: str, values: dict[str, str]) -> str:
    """{{name}} -> value; unknown references stay literal, as Argo leaves them."""
    return re.sub(r"\{\{([^}]+)\}\}", lambda m: values.get(m[1].strip(), m[0]), text)


def evaluate_when(expr: str, values: dict[str, str]) -> bool:
    return evaluate(substitute(expr, values), lambda w: w)


# --- The run -----------------------------------------------------------------------

@dataclass
class Node:
    name: str
    template: str
    phase: str = "Pending"
    started: float | None = None
    finished: float | None = None
    message: str = ""
    outputs: dict[str, str] = field(default_factory=dict)


@dataclass
class RunResult:
    status: str  # Succeeded | Failed | Error
    nodes: dict[str, Node]
    exit_nodes: dict[str, Node]
    interrupted: bool
    aborted: bool
    order: list[str]  # tasks in the order they started (main DAG, then exit handler)

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        if self.status != "Succeeded":
            return EXIT_FAILED
        return EXIT_ABORTED if self.aborted else EXIT_OK


@dataclass
class StepCall:
    """One step to execute: what a pod would be."""
    task: str
    step: str
    env: dict[str, str]
    outputs_dir: Path
    log_file: Path
    deadline: float | None
    grace: float


class Runner:
    def __init__(
        self,
        template: dict,
        *,
        source: str,
        target: str,
        workdir: Path,
        readonly_sql: Path,
        unfreeze_sql: Path,
        params: dict[str, str] | None = None,
        approver: Callable[[str], str] | None = None,
        on_restart: Callable[[], None] | None = None,
        restart_command: str | None = None,
        executor: Callable[[StepCall, "Runner"], tuple[str, str]] | None = None,
        emit: Callable[[str, str], None] | None = None,
        base_env: dict[str, str] | None = None,
    ):
        self.wt = template
        self.templates = templates(template)
        spec = template["spec"]
        self.entrypoint = spec["entrypoint"]
        self.on_exit = spec.get("onExit")
        declared = {p["name"]: p for p in spec.get("arguments", {}).get("parameters", [])}
        self.params = {n: str(p.get("value", "")) for n, p in declared.items()}
        for name, value in (params or {}).items():
            if name not in declared:
                raise RunError(f"unknown workflow parameter {name!r}: the template declares {', '.join(declared)}")
            allowed = declared[name].get("enum")
            if allowed and value not in allowed:
                raise RunError(f"parameter {name}={value!r} is not one of {', '.join(allowed)}")
            self.params[name] = value
        self.uris = {"PGCOPYDB_SOURCE_PGURI": source, "PGCOPYDB_TARGET_PGURI": target}
        self.workdir = Path(workdir).resolve()
        self.rundir = self.workdir / "local-run"
        self.sql = {"readonly.sql": str(Path(readonly_sql).resolve()), "unfreeze.sql": str(Path(unfreeze_sql).resolve())}
        self.approver = approver or (lambda lag: "abort")
        self.on_restart = on_restart
        self.restart_command = restart_command
        self.executor = executor or run_subprocess
        self.emit = emit or (lambda task, line: print(f"[{task}] {line}", file=sys.stderr, flush=True))
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.values: dict[str, str] = {f"workflow.parameters.{k}": v for k, v in self.params.items()}
        self.values["workflow.name"] = "local"
        self.nodes: dict[str, Node] = {}
        self.exit_nodes: dict[str, Node] = {}
        self.order: list[str] = []
        self.procs: dict[str, tuple[subprocess.Popen, float]] = {}
        self.stopping = threading.Event()
        self.interrupts = 0  # Ctrl-C presses, counted by the signal handler
        self.in_exit_handler = False
        self._seen_interrupts = 0
        self.prompting = False
        self._events: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._check_templates()

    # -- checks before anything runs
    def _check_templates(self) -> None:
        for dag in filter(None, (self.entrypoint, self.on_exit)):
            t = self.templates.get(dag)
            if t is None or "dag" not in t:
                raise RunError(f"template {dag!r} is not a DAG: the local runner runs DAG workflows only")
            for task in t["dag"]["tasks"]:
                sub = self.templates.get(task["template"])
                if sub is None:
                    raise RunError(f"task {task['name']!r} uses unknown template {task['template']!r}")
                if "suspend" not in sub:
                    step_name(sub)  # raises for anything but `db-upgrade step NAME`
            # Parse every expression now: a template error must stop the run before follow starts.
            names = {task["name"]: "Succeeded" for task in t["dag"]["tasks"]}
            for task in t["dag"]["tasks"]:
                if task.get("depends"):
                    evaluate_depends(task["depends"], names)
                if task.get("when"):
                    evaluate_when(task["when"], {})

    def dag(self, name: str) -> list[dict]:
        return self.templates[name]["dag"]["tasks"]

    def progress_file(self, task: str) -> Path:
        return self.rundir / "progress" / task

    # -- env the pod would get
    def _localize(self, value: str, outputs_dir: Path) -> str | None:
        if value.startswith(WORK_DIR):
            return str(self.workdir) + value[len(WORK_DIR):]
        if value.startswith(OUTPUTS_DIR):
            return str(outputs_dir) + value[len(OUTPUTS_DIR):]
        if value.startswith(SQL_DIR + "/"):
            name = value[len(SQL_DIR) + 1:]
            if name not in self.sql:
                raise RunError(f"the template reads {value}, which the local run does not provide")
            return self.sql[name]
        if value.startswith(SERVICE_FILE_DIR):
            return None  # the operator's own PGSERVICEFILE, if any, stays
        return value

    def step_env(self, template: dict, inputs: dict[str, str], outputs_dir: Path, task: str) -> dict[str, str]:
        env = {k: v for k, v in self.base_env.items() if k not in RUNNER_VARS}
        values = {**self.values, **{f"inputs.parameters.{k}": v for k, v in inputs.items()}}
        for e in template["container"].get("env", []):
            name = e["name"]
            if name in URI_VARS:
                env[name] = self.uris[name]
                continue
            if "value" not in e or name == "HOME":
                continue  # HOME=/tmp is for the read-only pod filesystem
            if name not in RUNNER_VARS and name in self.base_env:
                continue  # a tunable the operator set in the shell wins over the template's default
            value = self._localize(substitute(e["value"], values), outputs_dir)
            if value is not None:
                env[name] = value
        env["ARGO_PROGRESS_FILE"] = str(self.progress_file(task))
        return env

    # -- one task
    def _inputs(self, template: dict, task: dict) -> dict[str, str]:
        inputs = {p["name"]: str(p["default"]) for p in template.get("inputs", {}).get("parameters", [])
                  if "default" in p}
        for a in task.get("arguments", {}).get("parameters", []):
            inputs[a["name"]] = substitute(str(a.get("value", "")), self.values)
        return inputs

    def _start(self, task: dict, node: Node) -> None:
        template = self.templates[task["template"]]
        inputs = self._inputs(template, task)
        node.phase, node.started = "Running", time.time()
        self.order.append(task["name"])
        if "suspend" in template:
            # Asked from the scheduler's thread (the main one), so Ctrl-C can reach the prompt.
            self._events.put(("suspend", task["name"], template, inputs))
            return
        outputs_dir = self.rundir / "outputs" / task["name"]
        try:
            shutil.rmtree(outputs_dir, ignore_errors=True)
            outputs_dir.mkdir(parents=True)
            grace = DEFAULT_GRACE
            if template.get("podSpecPatch"):
                grace = float(json.loads(template["podSpecPatch"]).get("terminationGracePeriodSeconds", grace))
            call = StepCall(
                task=task["name"],
                step=step_name(template),
                env=self.step_env(template, inputs, outputs_dir, task["name"]),
                outputs_dir=outputs_dir,
                log_file=self.rundir / "logs" / f"{task['name']}.log",
                deadline=float(template["activeDeadlineSeconds"]) if template.get("activeDeadlineSeconds") else None,
                grace=grace,
            )
        except (RunError, OSError, ValueError) as exc:
            # As a pod that cannot start: the node errors, the DAG goes on (finish still stops follow).
            self._events.put(("done", task["name"], template, ("Errored", str(exc), None)))
            return

        def work():
            try:
                if call.step == "restart":
                    phase, message = self._restart(call)
                else:
                    phase, message = self.executor(call, self)
            except BaseException as exc:  # noqa: B902 - even a SystemExit must end the node, or the DAG waits forever
                phase, message = "Errored", f"{type(exc).__name__}: {exc}"
            self._events.put(("done", task["name"], template, (phase, message, outputs_dir)))

        threading.Thread(target=work, name=f"task-{task['name']}", daemon=True).start()

    def _restart(self, call: StepCall) -> tuple[str, str]:
        """Locally there are no deployments: the hook (and --restart-command) is the restart."""
        out = call.outputs_dir
        (out / "restart-started").write_text(f"{time.time():.3f}\n")
        if self.on_restart:
            self.on_restart()
        if self.restart_command:
            self.emit(call.task, f"restart: running the restart command (applications move to the target)")
            proc = subprocess.run(["/bin/sh", "-c", self.restart_command], env=call.env,
                                  capture_output=True, text=True, timeout=call.deadline)
            for line in (proc.stdout + proc.stderr).splitlines():
                self.emit(call.task, line)
            if proc.returncode != 0:
                return "Failed", f"restart command exited {proc.returncode}"
        elif not self.on_restart:
            self.emit(call.task, "restart: no deployments locally (no --restart-command): "
                                 "point the applications at the target now")
        frozen = call.env.get("DB_UPGRADE_FROZEN_AT", "").strip()
        if re.match(r"^[0-9]", frozen):
            downtime = time.time() - float(frozen)
            (out / "write-downtime-seconds").write_text(f"{downtime:.1f}\n")
            self.emit(call.task, f"restart: done; writes were frozen for {downtime:.1f}s")
        return "Succeeded", ""

    def _finish(self, name: str, template: dict, phase: str, message: str, outputs_dir: Path | None,
                nodes: dict[str, Node], decision: str | None = None) -> None:
        node = nodes[name]
        outputs = {}
        for p in template.get("outputs", {}).get("parameters", []):
            vf = p.get("valueFrom", {})
            value = None
            if "supplied" in vf:
                value = decision if decision is not None else vf.get("default")
            elif "path" in vf and outputs_dir is not None:
                path = outputs_dir / vf["path"][len(OUTPUTS_DIR):].lstrip("/") if vf["path"].startswith(OUTPUTS_DIR) \
                    else Path(vf["path"])
                try:
                    value = path.read_text().strip()
                except OSError:
                    value = vf.get("default")
            if value is None:
                if phase == "Succeeded":  # Argo errors the node when a declared output is missing
                    phase, message = "Errored", f"output parameter {p['name']!r} was not written"
                continue
            outputs[p["name"]] = value
            self.values[f"tasks.{name}.outputs.parameters.{p['name']}"] = value
            if p.get("globalName"):
                self.values[f"workflow.outputs.parameters.{p['globalName']}"] = value
        node.phase, node.message, node.outputs, node.finished = phase, message, outputs, time.time()
        self.values[f"tasks.{name}.status"] = phase

    def _ask(self, name: str, template: dict, inputs: dict[str, str], nodes: dict[str, Node]) -> None:
        if self.stopping.is_set():
            self._finish(name, template, "Failed", "stopped", None, nodes)
            return
        decision = None
        if not self.interrupts:
            self.prompting = True
            try:
                decision = self.approver(inputs.get("lag", ""))
            except (KeyboardInterrupt, EOFError):
                self.interrupts = max(self.interrupts, 1)
            finally:
                self.prompting = False
        self._check_interrupt()
        if decision is None or self.stopping.is_set():
            self._finish(name, template, "Failed", "stopped", None, nodes)
            return
        allowed = next((p.get("enum") for p in template.get("inputs", {}).get("parameters", [])
                        if p["name"] == "decision"), None)
        if allowed and decision not in allowed:
            raise RunError(f"approval answer {decision!r} is not one of {', '.join(allowed)}")
        self.emit(name, f"approve: decision {decision}")
        self._finish(name, template, "Succeeded", "", None, nodes, decision=decision)

    # -- a whole DAG
    def _run_dag(self, dag: str, nodes: dict[str, Node], stoppable: bool) -> None:
        tasks = self.dag(dag)
        for t in tasks:
            nodes[t["name"]] = Node(t["name"], t["template"])
        states = lambda: {n: node.phase for n, node in nodes.items()}  # noqa: E731
        while True:
            changed = False
            for t in tasks:
                node = nodes[t["name"]]
                if node.phase != "Pending":
                    continue
                deps = t.get("depends")
                if deps is None and t.get("dependencies"):
                    deps = " && ".join(t["dependencies"])
                if deps:
                    if any(nodes[d].phase not in TERMINAL for d in depends_on(deps) if d in nodes):
                        continue
                if stoppable and self.stopping.is_set():
                    node.phase, node.message = "Omitted", "not started: the run was stopped"
                    changed = True
                    continue
                if deps and not evaluate_depends(deps, states()):
                    node.phase = "Omitted"
                    changed = True
                    continue
                if t.get("when") and not evaluate_when(t["when"], self.values):
                    node.phase = "Skipped"
                    changed = True
                    continue
                self._start(t, node)
                changed = True
            if changed:
                continue
            if all(n.phase in TERMINAL for n in nodes.values()):
                return
            self._check_interrupt()
            try:
                event = self._events.get(timeout=0.5)
            except queue.Empty:
                continue
            kind, name, template, payload = event
            if kind == "suspend":
                self._ask(name, template, payload, nodes)
            else:
                phase, message, outputs_dir = payload
                self._finish(name, template, phase, message, outputs_dir, nodes)
                self.emit(name, f"{name}: {phase}" + (f" ({message})" if message else ""))

    # -- stopping (Ctrl-C)
    def on_sigint(self, _signum=None, _frame=None) -> None:
        """Signal handler: only counts; the scheduler acts on it within half a second.
        At the approval prompt it interrupts the prompt itself."""
        self.interrupts += 1
        if self.prompting:
            raise KeyboardInterrupt

    def _check_interrupt(self) -> None:
        if self.interrupts and not self.stopping.is_set():
            self.interrupt()
        elif self.interrupts > self._seen_interrupts and self.in_exit_handler:
            self.emit("run", "the exit handler is cleaning up: wait for it (the slot would stay on the source)")
        self._seen_interrupts = self.interrupts

    def interrupt(self) -> None:
        """As `argo stop`: running steps get SIGTERM, nothing new starts, the exit handler runs."""
        if self.in_exit_handler:
            return
        if not self.stopping.is_set():
            self.stopping.set()
            frozen = "workflow.outputs.parameters.frozen-at" in self.values
            self.emit("run", "interrupted: stopping the running steps, then the exit handler cleans up"
                      + (" and unfreezes the source" if frozen else "; the source was never frozen"))
        with self._lock:
            procs = list(self.procs.items())
        for _task, (proc, grace) in procs:
            terminate(proc, grace)

    def run(self) -> RunResult:
        for sub in ("outputs", "logs", "progress"):
            (self.rundir / sub).mkdir(parents=True, exist_ok=True)
        self._run_dag(self.entrypoint, self.nodes, stoppable=True)
        failed = [n for n in self.nodes.values() if n.phase in ("Failed", "Errored")]
        status = "Succeeded"
        if failed or self.stopping.is_set():
            status = "Error" if any(n.phase == "Errored" for n in failed) else "Failed"
        failures = [{"displayName": n.name, "templateName": n.template, "phase": n.phase,
                     "message": n.message or n.phase} for n in failed]
        if self.stopping.is_set():
            failures.append({"displayName": "run", "templateName": "", "phase": "Failed",
                             "message": "stopped by the operator (Ctrl-C)"})
        self.values["workflow.status"] = status
        self.values["workflow.failures"] = json.dumps(failures)
        if self.on_exit:
            self.in_exit_handler = True
            self._run_dag(self.on_exit, self.exit_nodes, stoppable=False)
        aborted = any(n.outputs.get("decision") == "abort" for n in self.nodes.values())
        return RunResult(status, self.nodes, self.exit_nodes, self.stopping.is_set(), aborted, self.order)


# --- Executing a step as a subprocess -------------------------------------------------

def terminate(proc: subprocess.Popen, grace: float | None = None) -> None:
    """SIGTERM to the step's process group (pgcopydb's children included)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if grace is not None:
        timer = threading.Timer(grace, _kill, (proc,))
        timer.daemon = True  # never keeps the runner alive once the step is gone
        timer.start()


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_subprocess(call: StepCall, runner: Runner) -> tuple[str, str]:
    call.log_file.parent.mkdir(parents=True, exist_ok=True)
    # Own session: a Ctrl-C in the terminal reaches the runner only, which decides.
    proc = subprocess.Popen([*db_upgrade_argv(), "step", call.step], env=call.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, bufsize=1)
    with runner._lock:
        runner.procs[call.task] = (proc, call.grace)
    if runner.stopping.is_set() and not runner.in_exit_handler:
        terminate(proc, call.grace)  # Ctrl-C came while this main-DAG step was being started
    timer = None
    if call.deadline:
        # activeDeadlineSeconds: Argo kills the pod, the node fails.
        timer = threading.Timer(call.deadline, terminate, (proc, call.grace))
        timer.daemon = True
        timer.start()
    error = ""
    with open(call.log_file, "w") as log:
        for line in proc.stdout:
            log.write(line)
            log.flush()
            line = line.rstrip("\n")
            if line.startswith("error: "):
                error = line[len("error: "):]
            runner.emit(call.task, line)
    rc = proc.wait()
    if timer:
        timer.cancel()
    with runner._lock:
        runner.procs.pop(call.task, None)
    if rc == 0:
        return "Succeeded", ""
    error = error.removeprefix(f"{call.step}: ")  # the node name says which step already
    if rc < 0:
        return "Failed", error or f"terminated by {signal.Signals(-rc).name}"
    return "Failed", error or f"exit code {rc}"


# --- Running with a console: progress, log lines, the approval prompt -----------------

_STEP_LINE = re.compile(r"^(\d\d:\d\d:\d\d) (.*)$")
_PGCOPYDB_TABLE = re.compile(r"^(\s|-)|.* \| ")
_PGCOPYDB_LINE = re.compile(r"^(?:\d{4}-\d\d-\d\d )?\d\d:\d\d:\d\d\.\d+ +\d+ +(\w+) ")


def _fmt_elapsed(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


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

    def progress(self) -> str | None:
        r = self.runner
        if r is None:
            return None
        try:
            text = r.progress_file("follow").read_text().strip()
        except OSError:
            return None
        return text or None

    def snapshot(self) -> dict[str, str]:
        r = self.runner
        running = [n.name for n in (r.exit_nodes or r.nodes).values() if n.phase == "Running"] if r else []
        from steps import state

        record = state.read(r.workdir) if r else {}
        phase = ", ".join(running) or "starting"
        if "follow" in running and not record.get("copy_done_at"):
            phase += " (initial copy)"
        if r and r.in_exit_handler:
            phase = "exit handler: " + phase
        lag = r.values.get("tasks.wait-caught-up.outputs.parameters.lag", "-") if r else "-"
        return {"phase": phase, "copied": self.progress() or "-", "lag": lag,
                "elapsed": _fmt_elapsed(time.time() - self.started)}

    def _render(self):
        from rich.table import Table

        snap = self.snapshot()
        t = Table.grid(padding=(0, 2))
        t.add_column(style="bold")
        t.add_column()
        t.add_row("phase", snap["phase"])
        t.add_row("tables+indexes copied", snap["copied"])
        t.add_row("lag", snap["lag"])
        t.add_row("elapsed", snap["elapsed"])
        return t

    def _ticker(self) -> None:
        while not self._stop.wait(1.0):
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
            self.console.print(f"[bold]caught up[/bold]: {lag or 'lag unknown'}")
            self.console.print("cutover = freeze writes on the source, finish the replay, verify, "
                               "then restart the applications on the target; abort = stop and clean up, "
                               "the source stays the primary")
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


def execute(template: dict, *, console, approve: str = "manual", verbose: bool = False, **kwargs) -> RunResult:
    """Runs the workflow with a progress display; Ctrl-C stops it as `argo stop` does."""
    display = Display(console, verbose)
    params = dict(kwargs.pop("params", None) or {})
    if approve == "auto":
        params["approval"] = "auto"
        approver = None
    else:
        params["approval"] = "manual"
        approver = display.ask if approve == "manual" else (lambda lag, answer=approve: answer)
    runner = Runner(template, params=params, approver=approver, emit=display.emit, **kwargs)
    display.runner = runner
    # SIGTERM (CI job cancelled) and SIGHUP (terminal closed) too: dying at once would leave
    # follow running in its own session with the slot on the source.
    old = {sig: signal.signal(sig, runner.on_sigint) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        with display:
            result = runner.run()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return result
