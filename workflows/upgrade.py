"""The upgrade WorkflowTemplate, built with Hera from one environment's configuration.

Every pod runs `db-upgrade step NAME` with values passed as env vars (never spliced
into a script or SQL). The DAG, and why each `depends` is written the way it is:

    create-scratch-target (rehearsal) -> preflight -> grant-replication -> follow
                                                     grant-replication -> wait-caught-up
    wait-caught-up -> verify-prepare;  wait-caught-up -> approve (manual)
    approve (cutover) -> cutover: settle, freeze, drain, verify, switch, in ONE pod
    cutover (any end), approve or wait-caught-up failed -> finish (sets the end if none: follow stops)
    cutover Succeeded or Skipped + follow Succeeded -> cleanup
    onExit: report; on failure unfreeze-after-failure (decides from the run state),
            cleanup-after-failure; drop-scratch-target

No pod starts inside the frozen window: the cutover pod starts before the
freeze and switches itself. Argo's bare `depends: a` also matches a.Skipped, so
every edge names its result. README.md ("The upgrade workflow") has the diagram
and the operator's view; tests/test_workflow_template.py simulates every branch.
"""

from __future__ import annotations

from hera.workflows import (
    DAG,
    ConfigMapVolume,
    Container,
    EmptyDirVolume,
    ExistingVolume,
    Env,
    Parameter,
    SecretEnv,
    SecretVolume,
    Suspend,
    Task,
    Volume,
    WorkflowTemplate,
)
from hera.workflows.models import (
    Capabilities,
    Counter,
    Gauge,
    KeyToPath,
    Metrics,
    MetricLabel,
    Mutex,
    PodGC,
    PodSecurityContext,
    ResourceRequirements,
    Prometheus,
    SeccompProfile,
    SecurityContext,
    SuppliedValueFrom,
    Synchronization,
    TTLStrategy,
    ValueFrom,
)

from workflows.config import Config

WORK_DIR = "/var/lib/db-upgrade/work"
OUTPUTS_DIR = "/tmp/outputs"
SQL_DIR = "/etc/db-upgrade/sql"
SERVICE_FILE_DIR = "/etc/db-upgrade/pg"
USER_ID = 10001
ROLE_LABEL = "db-upgrade/role"

# Workflow parameters, read in `when` expressions. Quoted, so that an output of a
# task that never ran (left unresolved by Argo) compares as a plain string.
P_APPROVAL = "'{{workflow.parameters.approval}}'"
P_MODE = "'{{workflow.parameters.mode}}'"
DECISION = "'{{tasks.approve.outputs.parameters.decision}}'"
CUTOVER = f"({P_APPROVAL} == 'auto' || {DECISION} == 'cutover')"
FAILED = "'{{workflow.status}}' != 'Succeeded'"
KEEP_SLOT = "'{{workflow.parameters.keep-slot-on-failure}}' == 'true'"
# Short steps: connect, do one thing, leave. Every pod has a deadline.
SHORT_DEADLINE = 900


def _any_end(task: str) -> str:
    return f"{task}.Succeeded || {task}.Skipped || {task}.Failed || {task}.Errored"


def _done(task: str) -> str:
    """Ended in any way, not started included: for exit-handler steps that must run regardless."""
    return f"{_any_end(task)} || {task}.Omitted"


def _failed(task: str) -> str:
    return f"{task}.Failed || {task}.Errored"


def _uri_env(name: str, endpoint) -> Env | SecretEnv:
    if endpoint.uri is not None:
        return Env(name=name, value=endpoint.uri)
    return SecretEnv(name=name, secret_name=endpoint.secret, secret_key=endpoint.key)


class _Builder:
    """Holds the shared pieces (volumes, env, security) of one configuration."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.work = Volume(
            name="work",
            size=cfg.volume.size,
            mount_path=WORK_DIR,
            access_modes=[cfg.volume.access_mode.value],
            storage_class_name=cfg.volume.storage_class,
        )
        # readOnlyRootFilesystem: /tmp and the outputs directory are the only writable paths.
        self.scratch = [
            EmptyDirVolume(name="tmp", mount_path="/tmp"),
            EmptyDirVolume(name="outputs", mount_path=OUTPUTS_DIR),
        ]
        self.sql = ConfigMapVolume(name=cfg.sql_config_map, mount_path=SQL_DIR, read_only=True)
        sf = cfg.connections.service_file
        self.service_file = (
            SecretVolume(
                name="pg-service",
                secret_name=sf.secret,
                items=[KeyToPath(key=sf.key, path="pg_service.conf")],
                mount_path=SERVICE_FILE_DIR,
                read_only=True,
            )
            if sf
            else None
        )
        self.security = SecurityContext(
            run_as_non_root=True,
            run_as_user=USER_ID,
            run_as_group=USER_ID,
            read_only_root_filesystem=True,
            allow_privilege_escalation=False,
            capabilities=Capabilities(drop=["ALL"]),
        )

    def db_env(self, *, sql: bool = False) -> list:
        cfg = self.cfg
        env = [
            _uri_env("PGCOPYDB_SOURCE_PGURI", cfg.connections.source),
            _uri_env("PGCOPYDB_TARGET_PGURI", cfg.connections.target),
            # The key of the run's record: this workflow's name, unless the recover
            # entrypoint is pointed at another (terminated) run with -p run-id=NAME.
            Env(name="DB_UPGRADE_RUN_ID", value="{{workflow.parameters.run-id}}"),
            Env(name="DB_UPGRADE_WORKFLOW_NAME", value="{{workflow.name}}"),
            Env(name="DB_UPGRADE_ENGINE", value=cfg.engine.value),
            Env(name="DB_UPGRADE_DIR", value=WORK_DIR),
            Env(name="DB_UPGRADE_MODE", value="{{workflow.parameters.mode}}"),
            Env(name="DB_UPGRADE_APP_ROLES", value=",".join(cfg.application_roles)),
            Env(name="DB_UPGRADE_PLUGIN", value=cfg.pgcopydb.plugin),
            Env(name="DB_UPGRADE_TABLE_JOBS", value=str(cfg.pgcopydb.table_jobs)),
            Env(name="DB_UPGRADE_INDEX_JOBS", value=str(cfg.pgcopydb.index_jobs)),
            Env(name="DB_UPGRADE_LAG_THRESHOLD_BYTES", value=str(cfg.lag_threshold_bytes)),
            Env(name="DB_UPGRADE_CATCHUP_TIMEOUT", value=str(cfg.timeouts.catch_up_seconds)),
            Env(name="DB_UPGRADE_FREEZE_TIMEOUT", value=str(cfg.timeouts.freeze_seconds)),
            Env(name="DB_UPGRADE_SCRATCH_DATABASE", value=cfg.rehearsal.scratch_database),
            Env(name="DB_UPGRADE_KEEP_SLOT", value="false"),
        ]
        if cfg.connections.subscription is not None:
            env.append(_uri_env("DB_UPGRADE_SUBSCRIPTION_PGURI", cfg.connections.subscription))
        if cfg.backout.enabled:
            env += [Env(name="DB_UPGRADE_BACKOUT", value="true"),
                    Env(name="DB_UPGRADE_BACKOUT_WINDOW_SECONDS", value=str(cfg.backout.window_seconds))]
            if cfg.backout.connection is not None:
                env.append(_uri_env("DB_UPGRADE_BACKOUT_PGURI", cfg.backout.connection))
        if self.service_file:
            env.append(Env(name="PGSERVICEFILE", value=f"{SERVICE_FILE_DIR}/pg_service.conf"))
        if sql:
            env += [
                Env(name="DB_UPGRADE_READONLY_SQL", value=f"{SQL_DIR}/readonly.sql"),
                Env(name="DB_UPGRADE_UNFREEZE_SQL", value=f"{SQL_DIR}/unfreeze.sql"),
            ]
        return env

    def switch_env(self) -> list:
        """The cutover's switch strategy (steps/switch/) and its settings."""
        cfg = self.cfg
        sw = cfg.switch
        env = [Env(name="DB_UPGRADE_SWITCH", value=sw.strategy)]
        if sw.strategy == "restart" and cfg.restart is not None:
            env += [
                Env(name="DB_UPGRADE_RESTART_NAMESPACE", value=cfg.restart_namespace),
                Env(name="DB_UPGRADE_RESTART_DEPLOYMENTS", value=",".join(cfg.restart.deployments or [])),
                Env(name="DB_UPGRADE_RESTART_SELECTOR", value=cfg.restart.selector or ""),
                Env(name="DB_UPGRADE_RESTART_TIMEOUT", value=str(cfg.restart.timeout_seconds)),
            ]
        if sw.strategy == "pgbouncer" and sw.pgbouncer is not None:
            pb = sw.pgbouncer
            env += [
                _uri_env("DB_UPGRADE_PGBOUNCER_ADMIN_PGURI", pb.admin_uri),
                Env(name="DB_UPGRADE_PGBOUNCER_DATABASE", value=pb.database),
                Env(name="DB_UPGRADE_PGBOUNCER_INCLUDE_FILE", value=pb.include_file),
                Env(name="DB_UPGRADE_PGBOUNCER_TARGET_HOST", value=pb.target.host),
                Env(name="DB_UPGRADE_PGBOUNCER_TARGET_PORT", value=str(pb.target.port)),
                Env(name="DB_UPGRADE_PGBOUNCER_TARGET_DBNAME", value=pb.target.dbname),
                Env(name="DB_UPGRADE_PGBOUNCER_TARGET_USER", value=pb.target.user or ""),
                Env(name="DB_UPGRADE_PGBOUNCER_PAUSE_TIMEOUT", value=str(pb.pause_timeout_seconds)),
            ]
        return env

    def switch_volumes(self) -> list:
        """PgBouncer's include file lives on a volume the cutover pod mounts too."""
        pb = self.cfg.switch.pgbouncer
        if self.cfg.switch.strategy != "pgbouncer" or pb is None:
            return []
        import posixpath

        return [ExistingVolume(name="pgbouncer-config", claim_name=pb.volume.claim_name,
                               mount_path=posixpath.dirname(pb.include_file))]

    def step(
        self,
        name: str,
        *,
        command: str | None = None,
        db: bool = True,
        work: bool = False,
        sql: bool = False,
        deadline: int = SHORT_DEADLINE,
        outputs: list[Parameter] | None = None,
        inputs: list[Parameter] | None = None,
        env: list | None = None,
        resources=None,
        volumes: list | None = None,
        **extra,
    ) -> Container:
        extra_volumes = volumes or []
        volumes = list(self.scratch) + extra_volumes
        if work:
            volumes.append(self.work)
        if sql:
            volumes.append(self.sql)
        if db and self.service_file:
            volumes.append(self.service_file)
        common = [Env(name="HOME", value="/tmp"), Env(name="DB_UPGRADE_OUTPUTS", value=OUTPUTS_DIR)]
        env = common + (self.db_env(sql=sql) if db else []) + (env or [])
        # A later entry of the same name wins in Kubernetes, but duplicates are confusing: keep the last.
        seen: dict[str, object] = {}
        for e in env:
            seen[e.name] = e
        spec = resources or self.cfg.resources.default
        return Container(
            name=name,
            image=self.cfg.image.ref,
            resources=ResourceRequirements(requests={"cpu": spec.cpu, "memory": spec.memory},
                                           limits={"memory": spec.memory_limit}),
            args=["step", command or name],
            env=list(seen.values()),
            volumes=volumes,
            security_context=self.security,
            # Never `timeout` as well: on a container template it replaces this
            # deadline (workflow/controller/workflowpod.go).
            active_deadline_seconds=deadline,
            inputs=inputs,
            outputs=outputs,
            **extra,
        )


def _out(name: str, *, default: str | None = None, global_name: str | None = None) -> Parameter:
    return Parameter(
        name=name,
        value_from=ValueFrom(path=f"{OUTPUTS_DIR}/{name}", default=default),
        global_name=global_name,
    )


def _supplied(name: str, default: str) -> Parameter:
    return Parameter(name=name, value_from=ValueFrom(supplied=SuppliedValueFrom(), default=default))


def _metrics(cfg: Config) -> Metrics:
    labels = [
        MetricLabel(key="database", value=cfg.database_id),
        MetricLabel(key="mode", value="{{workflow.parameters.mode}}"),
        MetricLabel(key="status", value="{{workflow.status}}"),
    ]
    return Metrics(
        prometheus=[
            Prometheus(
                name="db_upgrade_duration_seconds",
                help="Duration of the db-upgrade workflow, from start to end",
                labels=labels,
                gauge=Gauge(value="{{workflow.duration}}", realtime=False),
            ),
            Prometheus(
                name="db_upgrade_outcome_total",
                help="db-upgrade workflows by outcome (status Succeeded, Failed or Error)",
                labels=labels,
                counter=Counter(value="1"),
            ),
        ]
    )


def _cutover_metrics(cfg: Config) -> Metrics:
    labels = [MetricLabel(key="database", value=cfg.database_id),
              MetricLabel(key="mode", value="{{workflow.parameters.mode}}")]
    return Metrics(
        prometheus=[
            Prometheus(
                name="db_upgrade_write_downtime_seconds",
                help="Seconds application writes were frozen: from the freeze to the completed switch",
                labels=labels,
                when="{{status}} == Succeeded && {{workflow.parameters.mode}} == upgrade",
                gauge=Gauge(value="{{outputs.parameters.write-downtime-seconds}}", realtime=False),
            ),
            Prometheus(
                name="db_upgrade_predicted_write_downtime_seconds",
                help="Rehearsal: the write-downtime a cutover would have had (drain and bounded verify measured)",
                labels=labels,
                when="{{status}} == Succeeded && {{workflow.parameters.mode}} == rehearsal",
                gauge=Gauge(value="{{outputs.parameters.predicted-write-downtime-seconds}}", realtime=False),
            ),
        ]
    )


def _report_metrics(cfg: Config) -> Metrics:
    """Per run, rehearsals especially: the trend of copy and catch-up time."""
    labels = [MetricLabel(key="database", value=cfg.database_id),
              MetricLabel(key="mode", value="{{workflow.parameters.mode}}")]
    gauges = [("db_upgrade_copy_seconds", "copy-seconds", "Seconds of the initial copy"),
              ("db_upgrade_catchup_seconds", "catchup-seconds", "Seconds from the copy's end to caught up")]
    return Metrics(prometheus=[
        Prometheus(name=name, help=help_, labels=labels, when="{{status}} == Succeeded",
                   gauge=Gauge(value=f"{{{{outputs.parameters.{out}}}}}", realtime=False))
        for name, out, help_ in gauges])


def build(cfg: Config) -> WorkflowTemplate:
    b = _Builder(cfg)
    t = cfg.timeouts
    # follow exits once the target has everything up to the end position; its own
    # deadline is the backstop for an end that never came: catch-up, approval, the
    # cutover, then replaying up to the end (bounded again by the catch-up timeout).
    follow_deadline = 2 * t.catch_up_seconds + t.approval_seconds + t.verify_prepare_seconds + 1800
    switch_seconds = cfg.restart.timeout_seconds if cfg.restart else 0
    cutover_deadline = t.verify_prepare_seconds + t.freeze_seconds + t.drain_seconds + switch_seconds + 1800

    with WorkflowTemplate(
        name=cfg.template_name,
        namespace=cfg.namespace,
        labels={"app.kubernetes.io/name": "db-upgrade", "app.kubernetes.io/version": cfg.image.tag},
        annotations={"workflows.argoproj.io/description": f"PostgreSQL major upgrade of {cfg.database_id}"},
        entrypoint="upgrade",
        on_exit="exit-handler",
        service_account_name=cfg.service_account,
        arguments=[
            Parameter(name="approval", value="manual", enum=["manual", "auto"],
                      description="manual: wait at approve for a decision; auto: cut over when caught up"),
            Parameter(name="mode", value="upgrade", enum=["upgrade", "rehearsal"],
                      description="rehearsal: scratch target, no freeze and no switch; predicts the window"),
            Parameter(name="keep-slot-on-failure", value="false", enum=["false", "true"],
                      description="true: on failure keep the slot, the run's state and the work volume for argo retry"),
            Parameter(name="keep-scratch", value="false", enum=["false", "true"],
                      description="rehearsal: keep the scratch target database at the end"),
            Parameter(name="run-id", value="",
                      description="recover entrypoint only: the workflow name of the run to recover"),
            Parameter(name="skip-verify-preparation", value="false", enum=["false", "true"],
                      description="true: do not wait for the verify preparation before freezing (the window "
                                  "then compares whole tables); the report records it"),
        ],
        synchronization=Synchronization(mutexes=[Mutex(name=cfg.mutex_name)]),
        ttl_strategy=TTLStrategy(seconds_after_success=86400, seconds_after_failure=7 * 86400),
        pod_gc=PodGC(strategy="OnPodSuccess"),
        security_context=PodSecurityContext(
            run_as_non_root=True,
            run_as_user=USER_ID,
            run_as_group=USER_ID,
            fs_group=USER_ID,  # makes the work volume writable
            seccomp_profile=SeccompProfile(type="RuntimeDefault"),
        ),
        metrics=_metrics(cfg),
    ) as wt:
        create_scratch = b.step("create-scratch-target")
        drop_scratch = b.step("drop-scratch-target")
        preflight = b.step("preflight", work=True, sql=True)
        grant = b.step("grant-replication")
        # The only pod with the work volume: pgcopydb's --dir lives there while it
        # copies (and, with pgcopydb-follow, streams).
        follow = b.step(
            "follow",
            work=True,
            resources=cfg.resources.follow,
            deadline=follow_deadline,
            labels={ROLE_LABEL: "follow"},
            pod_spec_patch=f'{{"terminationGracePeriodSeconds": {cfg.follow_grace_period_seconds}}}',
        )
        wait = b.step("wait-caught-up", deadline=t.catch_up_seconds, outputs=[_out("lag"), _out("lag-bytes")])
        verify_prepare = b.step("verify-prepare", deadline=t.approval_seconds + t.verify_prepare_seconds + 1800,
                                resources=cfg.resources.verify_prepare)
        # Short: it waits for the preparation, then tells the approval where it stands.
        verify_ready = b.step("verify-ready", deadline=t.verify_prepare_seconds + 900,
                              env=[Env(name="DB_UPGRADE_SKIP_VERIFY_PREPARATION",
                                       value="{{workflow.parameters.skip-verify-preparation}}"),
                                   Env(name="DB_UPGRADE_VERIFY_PREPARE_TIMEOUT", value=str(t.verify_prepare_seconds))],
                              outputs=[_out("verification", default=""), _out("lag", default="")])
        approve = Suspend(
            name="approve",
            duration=t.approval_seconds,
            inputs=[
                Parameter(name="lag", description="replication lag when the verification was ready"),
                Parameter(name="verification",
                          description="the exact comparison: prepared, what is unchecked, tables re-read whole"),
                Parameter(name="decision", default="abort", enum=["cutover", "abort"],
                          description="cutover: freeze writes and switch; abort: stop and clean up"),
            ],
            # Every input is also a supplied output: the Argo UI's resume dialog
            # sends them all, and the server refuses the whole call otherwise
            # (ui/.../workflow-details.tsx getParametersAsJsonString; workflow/util/
            # util.go updateSuspendedNode). Written out (not intermediate_parameters)
            # to get the defaults on timeout.
            outputs=[_supplied("lag", ""), _supplied("verification", ""), _supplied("decision", "abort")],
        )
        cutover = b.step(
            "cutover",
            sql=True,
            deadline=cutover_deadline,
            resources=cfg.resources.cutover,
            # The only pod that may move the applications (workflows/rbac.py).
            service_account_name=cfg.switch_service_account,
            inputs=[Parameter(name="approval-started", default=""), Parameter(name="approval-finished", default="")],
            env=[
                Env(name="DB_UPGRADE_APPROVAL_STARTED_AT", value="{{inputs.parameters.approval-started}}"),
                Env(name="DB_UPGRADE_APPROVAL_FINISHED_AT", value="{{inputs.parameters.approval-finished}}"),
                Env(name="DB_UPGRADE_APPROVAL_TIMEOUT", value=str(t.approval_seconds)),
                Env(name="DB_UPGRADE_SKIP_VERIFY_PREPARATION", value="{{workflow.parameters.skip-verify-preparation}}"),
                Env(name="DB_UPGRADE_DRAIN_TIMEOUT", value=str(t.drain_seconds)),
                Env(name="DB_UPGRADE_VERIFY_PREPARE_TIMEOUT", value=str(t.verify_prepare_seconds)),
                *b.switch_env(),
            ],
            volumes=b.switch_volumes(),
            outputs=[
                _out("write-downtime-seconds", default=""),
                _out("predicted-write-downtime-seconds", default=""),
                _out("frozen-at", default=""),
                _out("verify", default=""),
                _out("late-writes", default=""),
                _out("timings", default=""),
                _out("backout", default="off"),
            ],
            metrics=_cutover_metrics(cfg),
        )
        # The back-out window: a suspend whose timeout ends it (a forgotten slot must never
        # fill the new database's disk), and the two ways out.
        backout = Suspend(
            name="backout",
            duration=cfg.backout.window_seconds,
            inputs=[Parameter(name="decision", default="end", enum=["rollback", "end"],
                              description="rollback: back to the old database, losing nothing; end: keep the new one")],
            outputs=[_supplied("decision", "end")],
        )
        rollback = b.step(
            "rollback",
            sql=True,
            deadline=cutover_deadline,
            resources=cfg.resources.cutover,
            service_account_name=cfg.switch_service_account,  # it moves the applications back
            inputs=[Parameter(name="decision-started", default=""), Parameter(name="decision-finished", default="")],
            env=[*b.switch_env(),
                 Env(name="DB_UPGRADE_BACKOUT_DECISION_STARTED_AT", value="{{inputs.parameters.decision-started}}"),
                 Env(name="DB_UPGRADE_BACKOUT_DECISION_FINISHED_AT", value="{{inputs.parameters.decision-finished}}"),
                 Env(name="DB_UPGRADE_DRAIN_TIMEOUT", value=str(t.drain_seconds))],
            volumes=b.switch_volumes(),
            outputs=[_out(n, default="") for n in ("rollback", "rollback-write-downtime-seconds", "rollback-verify")],
        )
        end_backout = b.step("end-backout")
        backout_verify_prepare = b.step("backout-verify-prepare", deadline=cfg.backout.window_seconds + 3600,
                                        resources=cfg.resources.verify_prepare)
        # finish only sets the end position: follow stops once the target has it.
        finish = b.step("finish")
        cleanup = b.step("cleanup")
        # Also lets go of PgBouncer if a killed cutover left it paused.
        unfreeze = b.step("unfreeze-after-failure", sql=True, env=b.switch_env(), volumes=b.switch_volumes())
        report = b.step(
            "report",
            # The only pod that may write the history ConfigMap (workflows/rbac.py).
            service_account_name=cfg.report_service_account,
            inputs=[Parameter(name="status"), Parameter(name="failures", default="")],
            env=[
                Env(name="DB_UPGRADE_WORKFLOW_STATUS", value="{{inputs.parameters.status}}"),
                Env(name="DB_UPGRADE_WORKFLOW_FAILURES", value="{{inputs.parameters.failures}}"),
                Env(name="DB_UPGRADE_KEEP_SLOT", value="{{workflow.parameters.keep-slot-on-failure}}"),
                Env(name="DB_UPGRADE_HISTORY_CONFIGMAP", value=cfg.history_config_map),
                Env(name="DB_UPGRADE_NAMESPACE", value="{{workflow.namespace}}"),
            ],
            outputs=[_out(n, default="") for n in ("report", "copy-seconds", "catchup-seconds",
                                                     "predicted-write-downtime-seconds", "write-downtime-seconds")],
            metrics=_report_metrics(cfg),
        )
        cleanup_after_failure = b.step(
            "cleanup-after-failure",
            command="cleanup",
            env=[Env(name="DB_UPGRADE_KEEP_SLOT", value="{{workflow.parameters.keep-slot-on-failure}}")],
        )

        with DAG(name="upgrade"):
            Task(name="create-scratch-target", template=create_scratch, when=f"{P_MODE} == 'rehearsal'")
            Task(name="preflight", template=preflight,
                 depends="create-scratch-target.Succeeded || create-scratch-target.Skipped")
            Task(name="grant-replication", template=grant, depends="preflight.Succeeded")
            Task(name="follow", template=follow, depends="grant-replication.Succeeded")
            # Parallel with follow, not a daemon: it polls the lag follow produces.
            Task(name="wait-caught-up", template=wait, depends="grant-replication.Succeeded")
            # Beside the approval: the comparison is prepared and kept current while
            # the approver decides; it ends by itself once the cutover takes over.
            Task(name="verify-prepare", template=verify_prepare, depends="wait-caught-up.Succeeded")
            Task(name="verify-ready", template=verify_ready, depends="wait-caught-up.Succeeded")
            # After the preparation (the cutover could not freeze before it anyway), so that the
            # approver sees it. Skipped with approval=auto; a timeout resolves to `abort`.
            Task(name="approve", template=approve, depends="verify-ready.Succeeded",
                 when=f"{P_APPROVAL} == 'manual'",
                 arguments={"lag": "{{tasks.verify-ready.outputs.parameters.lag}}",
                            "verification": "{{tasks.verify-ready.outputs.parameters.verification}}"})
            # One pod for the whole frozen window; in rehearsal it measures the window
            # without freezing anything.
            Task(name="cutover", template=cutover,
                 depends="verify-ready.Succeeded && (approve.Succeeded || approve.Skipped)",
                 when=CUTOVER,
                 arguments={"approval-started": "{{tasks.approve.startedAt}}",
                            "approval-finished": "{{tasks.approve.finishedAt}}"})
            # finish is what stops follow when no cutover set the end: after an abort
            # (cutover Skipped), a failed cutover, or a failed approval or catch-up
            # (cutover is then Omitted, which no result matches: named directly).
            Task(name="finish", template=finish,
                 depends=f"{_any_end('cutover')} || {_failed('approve')} || {_failed('verify-ready')}"
                 f" || {_failed('wait-caught-up')}")
            # After the switch (or an abort), and once follow has let go.
            # The back-out window, when the cutover opened one.
            opened = "'{{tasks.cutover.outputs.parameters.backout}}' == 'open'"
            chosen = "'{{tasks.backout.outputs.parameters.decision}}'"
            Task(name="backout", template=backout, depends="cutover.Succeeded", when=opened)
            Task(name="backout-verify-prepare", template=backout_verify_prepare, depends="cutover.Succeeded",
                 when=opened)
            Task(name="rollback", template=rollback, depends="backout.Succeeded", when=f"{chosen} == 'rollback'",
                 arguments={"decision-started": "{{tasks.backout.startedAt}}",
                            "decision-finished": "{{tasks.backout.finishedAt}}"})
            Task(name="end-backout", template=end_backout, depends="backout.Succeeded",
                 when=f"{chosen} != 'rollback'")
            # After the switch (or an abort), once follow has let go, verify-prepare has
            # stopped (cleanup drops the tracking it reads) and any back-out window ended.
            Task(name="cleanup", template=cleanup,
                 depends=f"finish.Succeeded && (cutover.Succeeded || cutover.Skipped) && follow.Succeeded"
                 f" && ({_done('verify-prepare')}) && ({_done('backout-verify-prepare')})"
                 " && (backout.Skipped || backout.Omitted || end-backout.Succeeded || rollback.Succeeded)")

        # `argo terminate` skips the exit handler: this entrypoint does its work for
        # a terminated run (`db-upgrade recover NAME`, or argo submit --from
        # workflowtemplate/... --entrypoint recover -p run-id=NAME).
        with DAG(name="recover"):
            Task(name="unfreeze-after-failure", template=unfreeze)
            Task(name="cleanup", template=cleanup, depends=_done("unfreeze-after-failure"))

        with DAG(name="exit-handler"):
            # Restores writes only if the run froze the source and the switch never
            # began: the step reads that from the run's record in the source.
            Task(name="unfreeze-after-failure", template=unfreeze, when=f"{P_MODE} == 'upgrade' && {FAILED}")
            Task(name="cleanup-after-failure", template=cleanup_after_failure,
                 depends=_done("unfreeze-after-failure"), when=f"{FAILED} && !({KEEP_SLOT})")
            # A failed run kept for `argo retry` keeps its scratch target too.
            Task(name="drop-scratch-target", template=drop_scratch,
                 depends=_done("cleanup-after-failure"),
                 when=f"{P_MODE} == 'rehearsal' && '{{{{workflow.parameters.keep-scratch}}}}' != 'true'"
                 f" && ('{{{{workflow.status}}}}' == 'Succeeded' || !({KEEP_SLOT}))")
            # Last: it reads the run's record, then (unless kept for a retry) removes it.
            Task(name="report", template=report, depends=_done("drop-scratch-target"),
                 arguments={"status": "{{workflow.status}}", "failures": "{{workflow.failures}}"})
    return wt


def render(cfg: Config) -> dict:
    return build(cfg).to_dict()
