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
  outputs become workflow outputs.
- `{{tasks.X.*}}` in `when` and arguments resolve as Argo resolves them: only
  the task's ancestors are in scope; a Skipped or Omitted X gives each output
  its default or an absent optional (docs/argo.md has the table).
- The suspend template (`approve`) asks the operator, or answers by itself;
  an answer `TimedOut(...)` models a suspend that ran its whole duration.
- The onExit DAG runs after the main DAG with `workflow.status` and
  `workflow.failures` exactly as Argo sends them (Go-quoted JSON).
- After the run, `RunResult` models the timeline a cluster would give the same
  run (`transition_seconds` per DAG transition; nothing sleeps).

Local differences, on purpose: the switch (Kubernetes deployments, in the
cutover step) is replaced by the `command` strategy: `--restart-command`, or
the in-process hook of `db-upgrade rehearse`; the approval has no
timeout (the operator is at the terminal); where Argo would requeue a task
forever, the task errors; Ctrl-C acts as `argo stop`: running steps get
SIGTERM, nothing new starts, and the exit handler runs.
"""

from __future__ import annotations

import json
import os
import shlex
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
# What a cluster adds each time the DAG moves on (issue 12): the controller handles a workflow again
# DEFAULT_REQUEUE_TIME after the pod event that ended the previous task (10 s by default:
# workflow/controller/rate_limiters.go; argoproj/argo-workflows #12381 and #6262 measure 9-10 s per
# step), then the next pod starts (Kubernetes' startup SLO is p99 <= 5 s for a pod without image
# pull, init containers or volumes; ours has Argo's init container and often a volume, so 5 s is
# the low end). Locally a task starts ~0.3 s after the last one ended.
CONTROLLER_REQUEUE_SECONDS = 10.0
POD_START_SECONDS = 5.0
DEFAULT_TRANSITION_SECONDS = CONTROLLER_REQUEUE_SECONDS + POD_START_SECONDS
# Steps that freeze the application's writes, and steps that move the applications (the frozen
# window is from the first to the second): the one-step `cutover` does both.
FREEZE_STEPS = ("freeze", "cutover")
SWITCH_STEPS = ("restart", "switch", "cutover")
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
        "switch": {"strategy": "none"},
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


# Tags under these prefixes must resolve (util/template/simple_template.go simpleReplaceStrict, called
# with ["tasks", "steps"] from workflow/controller/dag.go resolveDependencyReferences).
STRICT_PREFIXES = ("tasks.", "steps.")
_TAG = re.compile(r"\{\{([^}]+)\}\}")


class Unresolved(Exception):
    """A strict tag Argo cannot substitute. `forever`: Argo requeues the task without end (a missing
    value: dag.go resolveDependencyReferences, IsMissingVariableErr); otherwise the node errors at once
    (an absent optional: a skipped or omitted producer's output without a default)."""

    def __init__(self, tag: str, forever: bool):
        self.tag, self.forever = tag, forever
        if forever:
            text = (f"failed to resolve {{{{{tag}}}}}: in Argo this task would be requeued forever"
                    " (the producer ended without that value, or is not among the task's dependencies)")
        else:
            text = (f"unable to substitute {{{{{tag}}}}}: output is an absent optional"
                    " (skipped/omitted node with no default)")
        super().__init__(text)


def substitute(text: str, values: dict[str, str], absent: frozenset[str] | set[str] = frozenset(),
               strict: bool = False) -> str:
    """{{name}} -> value; unknown references stay literal, as Argo leaves them.

    strict: as Argo resolves a DAG task's `when` and arguments, a `tasks.*`/`steps.*` tag that is
    absent (see Runner._skipped_outputs) or unknown raises Unresolved instead of staying literal.
    """
    def one(m: re.Match) -> str:
        key = m[1].strip()
        if key in values:
            return values[key]
        if strict and key.startswith(STRICT_PREFIXES):
            raise Unresolved(key, forever=key not in absent)
        return m[0]

    return _TAG.sub(one, text)


def evaluate_when(expr: str, values: dict[str, str], absent: frozenset[str] | set[str] = frozenset(),
                  strict: bool = False) -> bool:
    return evaluate(substitute(expr, values, absent, strict), lambda w: w)


# --- What Argo hands the exit handler ---------------------------------------------------

def go_json(value) -> str:
    """Go's json.Marshal of plain data: compact, non-ASCII as is, <, > and & (and U+2028/9) escaped."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def go_quote(text: str) -> str:
    """Go's strconv.Quote: double quotes, backslash escapes, printable characters kept as they are."""
    short = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t",
             "\v": "\\v", "\\": "\\\\", '"': '\\"'}
    out = []
    for ch in text:
        if ch in short:
            out.append(short[ch])
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x80:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return '"' + "".join(out) + '"'


def workflow_failures(failures: list[dict]) -> str:
    """{{workflow.failures}} exactly as Argo v4.1.2 sets it (workflow/controller/operator.go):
    strconv.Quote(json.Marshal(failures)), so `"null"` (quotes included) when nothing failed."""
    return go_quote(go_json(failures or None))


def suspend_seconds(template: dict) -> float:
    """A suspend template's duration: a plain number is seconds, else a Go duration such as 1h30m
    (pkg/apis/workflow/v1alpha1 ParseStringToDuration)."""
    text = str(template.get("suspend", {}).get("duration", "")).strip()
    if re.fullmatch(r"[0-9]+", text):
        return float(text)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"([0-9.]+)(ms|h|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise RunError(f"suspend duration {text!r} of {template.get('name')!r} is not a number of seconds"
                       " or a duration such as 1h30m")
    return sum(float(n) * units[u] for n, u in parts)


def argo_time(ts: float) -> str:
    """A node time as Argo writes it into {{tasks.X.startedAt}}: RFC 3339, UTC, whole seconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


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


@dataclass(frozen=True)
class TimedOut:
    """An approver's answer when nobody resumed the approve step: it ends at its suspend duration.

    `decision` is a value set earlier whose resume never came: it is kept (a set output loses its
    valueFrom, so workflow/util/util.go OverrideOutputParametersWithDefault skips it); None: the
    output's default applies (workflow/controller/operator.go executeSuspend). Locally nothing waits:
    the node's finish time is its start plus the duration, as `{{tasks.approve.finishedAt}}` would be.
    """
    decision: str | None = None


@dataclass
class RunResult:
    status: str  # Succeeded | Failed | Error
    nodes: dict[str, Node]
    exit_nodes: dict[str, Node]
    interrupted: bool
    aborted: bool
    order: list[str]  # tasks in the order they started (main DAG, then exit handler)
    # For the cluster model: each task's `depends` names, each task's step (None: a suspend).
    deps: dict[str, set[str]] = field(default_factory=dict)
    exit_deps: dict[str, set[str]] = field(default_factory=dict)
    steps: dict[str, str | None] = field(default_factory=dict)
    transition_seconds: float = DEFAULT_TRANSITION_SECONDS
    started: float | None = None  # the workflow's start (wall clock)

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        if self.status != "Succeeded":
            return EXIT_FAILED
        return EXIT_ABORTED if self.aborted else EXIT_OK

    # -- the cluster model: what the same run would take under a real controller
    def timeline(self, exit_handler: bool = False) -> dict[str, tuple[float, float]]:
        """Modelled (start, end) of each task, in seconds from the workflow's start.

        A task that ran starts `transition_seconds` after the last of its dependencies ended (the
        workflow's start for none) and lasts as long as it did here, or longer: a task that was
        still running when others ended keeps its local lag behind the last of them (follow ends
        when the end position a later task set is reached). A Skipped or Omitted task costs nothing
        (the controller decides it in the same pass). The exit handler starts one transition after
        the main DAG.
        """
        main = self._model(self.nodes, self.deps, 0.0)
        if not exit_handler:
            return main
        base = max((end for _, end in main.values()), default=0.0)
        return self._model(self.exit_nodes, self.exit_deps, base)

    def _model(self, nodes: dict[str, Node], deps: dict[str, set[str]], base: float
               ) -> dict[str, tuple[float, float]]:
        model: dict[str, tuple[float, float]] = {}

        def place(name: str) -> tuple[float, float]:
            # Only tasks that ended earlier (here) are consulted: the recursion ends.
            if name in model:
                return model[name]
            ready = max((place(d)[1] for d in sorted(deps.get(name, ())) if d in nodes), default=base)
            n = nodes[name]
            if n.started is None:
                model[name] = (ready, ready)
                return model[name]
            start = ready + self.transition_seconds
            finished = n.finished or n.started
            end = start + max(0.0, finished - n.started)
            for other, o in nodes.items():
                if other != name and o.started is not None and o.finished is not None \
                        and n.started <= o.finished < finished:
                    end = max(end, place(other)[1] + (finished - o.finished))
            model[name] = (start, end)
            return model[name]

        for name in nodes:
            place(name)
        return model

    def _shift(self, task: str) -> float:
        """Modelled minus local start of a task that ran: the cluster's extra time up to it."""
        start = self.timeline()[task][0]
        return start - (self.nodes[task].started - (self.started or 0.0))

    def frozen_window_tasks(self) -> tuple[str, str] | None:
        """(task that froze the writes, task that moved the applications), if both succeeded."""
        ran = [n for n in self.order if n in self.nodes and self.nodes[n].phase == "Succeeded"]
        freeze = next((n for n in ran if self.steps.get(n) in FREEZE_STEPS), None)
        switch = next((n for n in ran if self.steps.get(n) in SWITCH_STEPS
                       and (freeze is None or ran.index(n) >= ran.index(freeze))), None)
        return (freeze, switch) if freeze and switch else None

    def pod_starts_in_window(self) -> list[str]:
        """Tasks whose pod starts after the freezing task started, up to the switching task."""
        window = self.frozen_window_tasks()
        if window is None or window[0] == window[1]:
            return []
        model = self.timeline()
        lo, hi = model[window[0]][0], model[window[1]][0]
        return sorted((n for n, (s, _) in model.items() if lo < s <= hi and self.nodes[n].started is not None),
                      key=lambda n: model[n][0])

    def window_extra_seconds(self) -> float | None:
        """What the cluster adds to the frozen window: the transitions inside it, less the local
        scheduling time they replace. 0 when one task freezes and switches; None without a window."""
        window = self.frozen_window_tasks()
        if window is None:
            return None
        freeze, switch = window
        return 0.0 if freeze == switch else round(self._shift(switch) - self._shift(freeze), 3)

    def modelled_window_seconds(self, measured_seconds: float | None) -> float | None:
        """A frozen-window length measured here (e.g. the write downtime the application saw), as a
        cluster would make it: `write_downtime_cluster_seconds` of the rehearsal report."""
        extra = self.window_extra_seconds()
        if measured_seconds is None or extra is None:
            return None
        return round(measured_seconds + extra, 2)


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
        approver: Callable[[str], "str | TimedOut"] | None = None,
        on_restart: Callable[..., None] | None = None,
        restart_command: str | None = None,
        suspend_answers: dict[str, Callable[[str], "str | TimedOut"]] | None = None,
        executor: Callable[[StepCall, "Runner"], tuple[str, str]] | None = None,
        emit: Callable[[str, str], None] | None = None,
        base_env: dict[str, str] | None = None,
        transition_seconds: float = DEFAULT_TRANSITION_SECONDS,
    ):
        if transition_seconds < 0:
            raise RunError(f"the cluster transition time must be 0 or more seconds, not {transition_seconds}")
        self.transition_seconds = float(transition_seconds)
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
        # Suspend nodes other than approve (the back-out window): answered by these, or, without
        # one, left to run their timeout (their defaults apply), without waiting locally.
        self.suspend_answers = dict(suspend_answers or {})
        self.executor = executor or run_subprocess
        self.emit = emit or (lambda task, line: print(f"[{task}] {line}", file=sys.stderr, flush=True))
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.values: dict[str, str] = {f"workflow.parameters.{k}": v for k, v in self.params.items()}
        # The run's record in the source is keyed by the workflow's name: unique per local run.
        self.values["workflow.name"] = f"local-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        # Per DAG, as Argo scopes them: tasks.X.* of finished tasks, and the absent optionals (outputs
        # without a default of skipped or omitted tasks, workflow/controller/scope.go).
        self.scopes: dict[str, dict[str, str]] = {}
        self.absent: dict[str, set[str]] = {}
        self.started: float | None = None
        self.nodes: dict[str, Node] = {}
        self.exit_nodes: dict[str, Node] = {}
        self.order: list[str] = []
        self.procs: dict[str, tuple[subprocess.Popen, float]] = {}
        self.stopping = threading.Event()
        self.finished = threading.Event()
        self.interrupts = 0  # Ctrl-C presses, counted by the signal handler
        self.in_exit_handler = False
        self._seen_interrupts = 0
        self.prompting = False
        self._events: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._check_templates()
        self.switch_env = self._switch_env()

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

    @staticmethod
    def task_depends(task: dict) -> set[str]:
        deps = task.get("depends")
        if deps is None and task.get("dependencies"):
            return set(task["dependencies"])
        return depends_on(deps) if deps else set()

    def _ancestors(self, dag: str, name: str) -> set[str]:
        """common.GetTaskAncestry: every task reachable through `depends`."""
        direct = {t["name"]: self.task_depends(t) for t in self.dag(dag)}
        seen: set[str] = set()
        todo = list(direct.get(name, ()))
        while todo:
            d = todo.pop()
            if d not in seen:
                seen.add(d)
                todo.extend(direct.get(d, ()))
        return seen

    def _visible(self, dag: str, name: str) -> dict[str, str]:
        """The values a task's `when` and arguments see: the workflow's, and its ancestors' tasks.*
        only (workflow/controller/dag.go buildLocalScopeFromTask)."""
        ancestors = self._ancestors(dag, name)
        scope = {k: v for k, v in self.scopes.get(dag, {}).items() if k.split(".")[1] in ancestors}
        return {**{k: v for k, v in self.values.items() if not k.startswith(STRICT_PREFIXES)}, **scope}

    def _absent(self, dag: str, name: str) -> set[str]:
        ancestors = self._ancestors(dag, name)
        return {k for k in self.absent.get(dag, ()) if k.split(".")[1] in ancestors}

    def _dag_of(self, nodes: dict) -> str:
        return self.entrypoint if nodes is self.nodes else self.on_exit

    def _set_task_value(self, dag: str, key: str, value: str) -> None:
        self.scopes.setdefault(dag, {})[key] = value
        self.values[key] = value  # also flat, for the display and older readers

    def _decided(self, dag: str, name: str, phase: str) -> None:
        """A node that ends without running (Skipped, Omitted, or errored before its start) still has
        its times, start = finish = now (operator.go initializeNode), and its status."""
        now = argo_time(time.time())
        for key, value in (("status", phase), ("startedAt", now), ("finishedAt", now), ("id", f"local-{name}")):
            self._set_task_value(dag, f"tasks.{name}.{key}", value)

    def _skipped_outputs(self, dag: str, task: dict) -> None:
        """A Skipped or Omitted task produced nothing: its declared outputs resolve to their
        valueFrom.default, or are absent optionals without one (workflow/controller/scope.go
        addSkippedNodeOutputsToScope)."""
        template = self.templates[task["template"]]
        for p in template.get("outputs", {}).get("parameters", []):
            key = f"tasks.{task['name']}.outputs.parameters.{p['name']}"
            default = (p.get("valueFrom") or {}).get("default")
            if default is not None:
                self._set_task_value(dag, key, str(default))
            else:
                self.absent.setdefault(dag, set()).add(key)

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
        if "DB_UPGRADE_SWITCH" not in self.base_env:  # the operator's own choice wins
            env.update(self.switch_env)
            if self.on_restart and not self.restart_command:
                marker = self.rundir / f"switched-{task}"
                env["DB_UPGRADE_SWITCH_COMMAND"] = f"touch {shlex.quote(str(marker))}"
        return env

    def _switch_env(self) -> dict[str, str]:
        """Locally the cutover's switch is a command: --restart-command, or a file the
        in-process hook (rehearse) is waiting for."""
        if self.restart_command:
            return {"DB_UPGRADE_SWITCH": "command", "DB_UPGRADE_SWITCH_COMMAND": self.restart_command}
        if self.on_restart:
            threading.Thread(target=self._wait_switch, daemon=True, name="switch-hook").start()
            return {"DB_UPGRADE_SWITCH": "command"}  # the command: touch a marker per task (step_env)
        return {}

    def _wait_switch(self) -> None:
        """Calls the hook, with the switching task's name, the moment its switch runs."""
        import inspect

        takes_task = bool(inspect.signature(self.on_restart).parameters)
        seen: set[str] = set()
        while not self.finished.wait(0.005):
            for marker in self.rundir.glob("switched-*") if self.rundir.is_dir() else ():
                task = marker.name.removeprefix("switched-")
                if task not in seen:
                    seen.add(task)
                    self.on_restart(task) if takes_task else self.on_restart()

    # -- one task
    def _inputs(self, template: dict, task: dict, dag: str | None = None) -> dict[str, str]:
        """The template's inputs: defaults, then the task's arguments resolved as Argo resolves them.

        Raises Unresolved for a tasks.* tag Argo would not substitute. An argument that is only a
        reference to an absent optional counts as not given, so the input's default applies
        (scope.go markAbsentOptionalArgs; common.ProcessArgs fails an input without a default)."""
        declared = template.get("inputs", {}).get("parameters", [])
        inputs = {p["name"]: str(p["default"]) for p in declared if "default" in p}
        values = self._visible(dag, task["name"]) if dag else self.values
        absent = self._absent(dag, task["name"]) if dag else set()
        for a in task.get("arguments", {}).get("parameters", []):
            raw = str(a.get("value", ""))
            pure = _TAG.fullmatch(raw.strip())
            if pure and pure[1].strip() in absent and pure[1].strip() not in values:
                if a["name"] not in inputs:
                    raise Unresolved(pure[1].strip(), forever=False)
                continue
            inputs[a["name"]] = substitute(raw, values, absent, strict=dag is not None)
        return inputs

    def _start(self, task: dict, node: Node, dag: str | None = None) -> None:
        template = self.templates[task["template"]]
        try:
            inputs = self._inputs(template, task, dag)
        except Unresolved as exc:
            # Argo errors the task node (or, for a missing value, requeues it forever: locally it errors).
            node.phase, node.message, node.started, node.finished = "Errored", str(exc), None, None
            if dag:
                self._decided(dag, task["name"], "Error")
            self.emit(task["name"], f"{task['name']}: Errored ({exc})")
            return
        node.phase, node.started = "Running", time.time()
        if dag:
            self._set_task_value(dag, f"tasks.{task['name']}.startedAt", argo_time(node.started))
            self._set_task_value(dag, f"tasks.{task['name']}.id", f"local-{task['name']}")
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
                phase, message = self.executor(call, self)
            except BaseException as exc:  # noqa: B902 - even a SystemExit must end the node, or the DAG waits forever
                phase, message = "Errored", f"{type(exc).__name__}: {exc}"
            self._events.put(("done", task["name"], template, (phase, message, outputs_dir)))

        threading.Thread(target=work, name=f"task-{task['name']}", daemon=True).start()

    def _finish(self, name: str, template: dict, phase: str, message: str, outputs_dir: Path | None,
                nodes: dict[str, Node], decision: str | None = None, timed_out: bool = False) -> None:
        node = nodes[name]
        dag = self._dag_of(nodes)
        outputs = {}
        for p in template.get("outputs", {}).get("parameters", []):
            vf = p.get("valueFrom", {})
            value = None
            if "supplied" in vf:
                # A suspend node's output: what was set stays; at the suspend timeout the others take
                # their default (workflow/util/util.go OverrideOutputParametersWithDefault, which fails
                # the node for one without); a resume by node selector, as the CLI and the UI send it,
                # leaves them unset (util.go updateSuspendedNode), and a dependent waits forever.
                if p["name"] == "decision" and decision is not None:
                    value = decision
                elif timed_out:
                    value = vf.get("default")
                    if value is None:
                        phase, message = "Errored", (f"raw output parameter '{p['name']}' has not been set"
                                                     " and does not have a default value")
                if value is None:
                    continue  # unset: out of scope for the dependents
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
            outputs[p["name"]] = value = str(value)
            self._set_task_value(dag, f"tasks.{name}.outputs.parameters.{p['name']}", value)
            if p.get("globalName"):
                self.values[f"workflow.outputs.parameters.{p['globalName']}"] = value
        node.phase, node.message, node.outputs, node.finished = phase, message, outputs, time.time()
        if timed_out and node.started is not None:
            node.finished = node.started + suspend_seconds(template)
        self._set_task_value(dag, f"tasks.{name}.status", "Error" if phase == "Errored" else phase)
        if node.started is not None:
            self._set_task_value(dag, f"tasks.{name}.finishedAt", argo_time(node.finished))

    def _ask(self, name: str, template: dict, inputs: dict[str, str], nodes: dict[str, Node]) -> None:
        if self.stopping.is_set():
            self._finish(name, template, "Failed", "stopped", None, nodes)
            return
        decision = None
        answer = self.approver if name == "approve" else self.suspend_answers.get(name, lambda _i: TimedOut(None))
        if not self.interrupts:
            self.prompting = True
            try:
                decision = answer(inputs.get("lag", ""))
            except (KeyboardInterrupt, EOFError):
                self.interrupts = max(self.interrupts, 1)
            finally:
                self.prompting = False
        self._check_interrupt()
        if decision is None or self.stopping.is_set():
            self._finish(name, template, "Failed", "stopped", None, nodes)
            return
        timed_out = isinstance(decision, TimedOut)
        if timed_out:
            if not template["suspend"].get("duration"):
                raise RunError(f"{name} has no suspend duration: it cannot time out")
            decision = decision.decision
        allowed = next((p.get("enum") for p in template.get("inputs", {}).get("parameters", [])
                        if p["name"] == "decision"), None)
        if decision is not None and allowed and decision not in allowed:
            raise RunError(f"approval answer {decision!r} is not one of {', '.join(allowed)}")
        if timed_out:
            self.emit(name, f"{name}: timed out after {suspend_seconds(template):.0f}s"
                      + (f", with the decision {decision} set earlier" if decision else ""))
        else:
            self.emit(name, f"{name}: decision {decision}")
        self._finish(name, template, "Succeeded", "", None, nodes, decision=decision, timed_out=timed_out)

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
                    self._decided(dag, t["name"], "Omitted")
                    self._skipped_outputs(dag, t)
                    changed = True
                    continue
                if t.get("when"):
                    try:
                        run_it = evaluate_when(t["when"], self._visible(dag, t["name"]),
                                               self._absent(dag, t["name"]), strict=True)
                    except Unresolved as exc:
                        # dag.go resolveDependencyReferences: the node errors (or Argo requeues it
                        # forever, for a missing value: locally it errors, so that the run ends).
                        node.phase, node.message = "Errored", str(exc)
                        self._decided(dag, t["name"], "Error")
                        self.emit(t["name"], f"{t['name']}: Errored ({exc})")
                        changed = True
                        continue
                    if not run_it:
                        node.phase = "Skipped"
                        self._decided(dag, t["name"], "Skipped")
                        self._skipped_outputs(dag, t)
                        changed = True
                        continue
                self._start(t, node, dag)
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
        self.started = time.time()
        self._run_dag(self.entrypoint, self.nodes, stoppable=True)
        failed = [n for n in self.nodes.values() if n.phase in ("Failed", "Errored")]
        status = "Succeeded"
        if failed or self.stopping.is_set():
            status = "Error" if any(n.phase == "Errored" for n in failed) else "Failed"
        # The fields and their order of operator.go's failedNodeStatus; the node phase is Argo's
        # ("Error", where a `depends` result says "Errored").
        failures = [{"displayName": n.name, "message": n.message or n.phase, "templateName": n.template,
                     "phase": "Error" if n.phase == "Errored" else n.phase, "podName": f"local-{n.name}",
                     "finishedAt": argo_time(n.finished) if n.finished else None} for n in failed]
        if self.stopping.is_set():
            failures.append({"displayName": "run", "message": "stopped by the operator (Ctrl-C)",
                             "templateName": "", "phase": "Failed", "podName": "", "finishedAt": None})
        if failures:  # the main DAG's own node fails with its child, and is listed too
            failures.append({"displayName": self.values["workflow.name"], "message": "",
                             "templateName": self.entrypoint, "phase": "Error" if status == "Error" else "Failed",
                             "podName": "", "finishedAt": argo_time(time.time())})
        self.values["workflow.status"] = status
        self.values["workflow.failures"] = workflow_failures(failures)
        if self.on_exit:
            self.in_exit_handler = True
            self._run_dag(self.on_exit, self.exit_nodes, stoppable=False)
        self.finished.set()
        aborted = any(n.outputs.get("decision") == "abort" for n in self.nodes.values())
        result = RunResult(
            status, self.nodes, self.exit_nodes, self.stopping.is_set(), aborted, self.order,
            deps={t["name"]: self.task_depends(t) for t in self.dag(self.entrypoint)},
            exit_deps={t["name"]: self.task_depends(t) for t in self.dag(self.on_exit)} if self.on_exit else {},
            steps={t["name"]: step_name(self.templates[t["template"]])
                   for d in filter(None, (self.entrypoint, self.on_exit)) for t in self.dag(d)},
            transition_seconds=self.transition_seconds, started=self.started,
        )
        extra = result.window_extra_seconds()
        if extra is not None:
            starts = result.pod_starts_in_window()
            self.emit("run", f"in a cluster the frozen window would be {extra:+.1f}s longer: "
                      + (f"{len(starts)} task starts inside it ({', '.join(starts)}), "
                         f"{self.transition_seconds:.0f}s each" if starts
                         else "one pod freezes and switches, no task starts inside it"))
        return result


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


# --- Running with a console: local/display.py ------------------------------------------

from local.display import Display  # noqa: E402


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
