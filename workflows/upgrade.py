"""The upgrade WorkflowTemplate, built with Hera from one environment's configuration.

Every pod runs `db-upgrade step NAME` with values passed as env vars (never spliced
into a script or SQL). The DAG, and why each `depends` is written the way it is:

    create-scratch-target (rehearsal) -> preflight -> grant-replication -> follow
                                                     grant-replication -> wait-caught-up -> approve
    approve (cutover) -> freeze -> finish;  approve (abort) -> finish
    follow + finish Succeeded -> verify -> cleanup -> restart (only after a real freeze)
    freeze failed, or finish failed after freeze -> unfreeze
    onExit: report; on failure unfreeze-after-failure, cleanup-after-failure; drop-scratch-target

Argo's bare `depends: a` also matches a.Skipped, so every edge names its result.
README.md ("The upgrade workflow") has the diagram and the operator's view; tests/test_workflow_template.py
simulates every branch.
"""

from __future__ import annotations

from hera.workflows import (
    DAG,
    ConfigMapVolume,
    Container,
    EmptyDirVolume,
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
    Affinity,
    Capabilities,
    Counter,
    Gauge,
    KeyToPath,
    LabelSelector,
    Metrics,
    MetricLabel,
    Mutex,
    PodAffinity,
    PodAffinityTerm,
    PodGC,
    PodSecurityContext,
    Prometheus,
    SeccompProfile,
    SecurityContext,
    SuppliedValueFrom,
    Synchronization,
    TTLStrategy,
    ValueFrom,
)

from workflows.config import AccessMode, Config

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
# Global outputs exist only once freeze (restart) has written them; unresolved, they
# stay literal text and do not match.
FROZEN = "'{{workflow.outputs.parameters.frozen-at}}' =~ '^[0-9]+'"
RESTART_STARTED = "'{{workflow.outputs.parameters.restart-started}}' =~ '^[0-9]+'"


def _any_end(task: str) -> str:
    return f"{task}.Succeeded || {task}.Skipped || {task}.Failed || {task}.Errored"


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
        # With RWO the volume attaches to one node: pods that run while follow holds
        # it must land on follow's node. Pods after follow ended must not carry this:
        # the scheduler ignores finished pods, so they would stay Pending forever.
        self.near_follow = (
            Affinity(
                pod_affinity=PodAffinity(
                    required_during_scheduling_ignored_during_execution=[
                        PodAffinityTerm(
                            topology_key="kubernetes.io/hostname",
                            label_selector=LabelSelector(
                                match_labels={
                                    "workflows.argoproj.io/workflow": "{{workflow.name}}",
                                    ROLE_LABEL: "follow",
                                }
                            ),
                        )
                    ]
                )
            )
            if cfg.volume.access_mode == AccessMode.rwo
            else None
        )

    def db_env(self, *, sql: bool = False) -> list:
        cfg = self.cfg
        env = [
            _uri_env("PGCOPYDB_SOURCE_PGURI", cfg.connections.source),
            _uri_env("PGCOPYDB_TARGET_PGURI", cfg.connections.target),
            Env(name="DB_UPGRADE_DIR", value=WORK_DIR),
            Env(name="DB_UPGRADE_MODE", value="{{workflow.parameters.mode}}"),
            Env(name="DB_UPGRADE_PLUGIN", value=cfg.pgcopydb.plugin),
            Env(name="DB_UPGRADE_TABLE_JOBS", value=str(cfg.pgcopydb.table_jobs)),
            Env(name="DB_UPGRADE_INDEX_JOBS", value=str(cfg.pgcopydb.index_jobs)),
            Env(name="DB_UPGRADE_LAG_THRESHOLD_BYTES", value=str(cfg.lag_threshold_bytes)),
            Env(name="DB_UPGRADE_CATCHUP_TIMEOUT", value=str(cfg.timeouts.catch_up_seconds)),
            Env(name="DB_UPGRADE_FREEZE_TIMEOUT", value=str(cfg.timeouts.freeze_seconds)),
            Env(name="DB_UPGRADE_SCRATCH_DATABASE", value=cfg.rehearsal.scratch_database),
        ]
        if self.service_file:
            env.append(Env(name="PGSERVICEFILE", value=f"{SERVICE_FILE_DIR}/pg_service.conf"))
        if sql:
            env += [
                Env(name="DB_UPGRADE_READONLY_SQL", value=f"{SQL_DIR}/readonly.sql"),
                Env(name="DB_UPGRADE_UNFREEZE_SQL", value=f"{SQL_DIR}/unfreeze.sql"),
            ]
        return env

    def step(
        self,
        name: str,
        *,
        db: bool = True,
        work: bool = False,
        sql: bool = False,
        near_follow: bool = False,
        deadline: int | None = None,
        outputs: list[Parameter] | None = None,
        inputs: list[Parameter] | None = None,
        env: list | None = None,
        **extra,
    ) -> Container:
        volumes = list(self.scratch)
        if work:
            volumes.append(self.work)
        if sql:
            volumes.append(self.sql)
        if db and self.service_file:
            volumes.append(self.service_file)
        common = [Env(name="HOME", value="/tmp"), Env(name="DB_UPGRADE_OUTPUTS", value=OUTPUTS_DIR)]
        affinity = self.near_follow if near_follow else None
        return Container(
            name=name,
            image=self.cfg.image.ref,
            args=["step", name],
            env=common + (self.db_env(sql=sql) if db else []) + (env or []),
            volumes=volumes,
            security_context=self.security,
            affinity=affinity,
            active_deadline_seconds=deadline,
            # activeDeadlineSeconds starts when the pod runs; `timeout` also counts a
            # pod stuck Pending (its affinity target gone), so nothing waits forever.
            timeout=f"{deadline + 300}s" if (deadline and affinity) else None,
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


def build(cfg: Config) -> WorkflowTemplate:
    b = _Builder(cfg)
    t = cfg.timeouts
    # follow exits once it has applied up to the endpos finish sets; its own deadline is
    # the backstop for a finish that never ran: catch-up, approval, freeze, then replaying
    # up to the endpos (bounded again by the catch-up timeout), plus margin.
    follow_deadline = 2 * t.catch_up_seconds + t.approval_seconds + t.freeze_seconds + 1800

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
                      description="rehearsal: scratch target, no freeze and no restart"),
            Parameter(name="keep-slot-on-failure", value="false", enum=["false", "true"],
                      description="true: on failure keep the slot and work volume for argo retry"),
            Parameter(name="keep-scratch", value="false", enum=["false", "true"],
                      description="rehearsal: keep the scratch target database at the end"),
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
        grant = b.step("grant-replication", work=True)
        follow = b.step(
            "follow",
            work=True,
            deadline=follow_deadline,
            labels={ROLE_LABEL: "follow"},
            pod_spec_patch=f'{{"terminationGracePeriodSeconds": {cfg.follow_grace_period_seconds}}}',
            outputs=[_out("copy-seconds", default=""), _out("catchup-seconds", default="")],
        )
        wait = b.step(
            "wait-caught-up",
            work=True,
            near_follow=True,
            deadline=t.catch_up_seconds,
            outputs=[_out("lag"), _out("lag-bytes")],
        )
        approve = Suspend(
            name="approve",
            duration=t.approval_seconds,
            inputs=[
                Parameter(name="lag", description="replication lag when caught up"),
                Parameter(name="decision", default="abort", enum=["cutover", "abort"],
                          description="cutover: freeze writes and switch; abort: stop and clean up"),
            ],
            # Written out (not intermediate_parameters) to get the default on timeout.
            outputs=[
                Parameter(
                    name="decision",
                    value_from=ValueFrom(supplied=SuppliedValueFrom(), default="abort"),
                )
            ],
        )
        freeze = b.step(
            "freeze",
            work=True,
            sql=True,
            near_follow=True,
            deadline=t.freeze_seconds + 300,
            outputs=[_out("frozen-at", global_name="frozen-at")],
        )
        # finish only sets the endpos: a short deadline, so that a finish left Pending
        # (follow's pod gone) fails soon and unfreeze restores writes.
        finish = b.step("finish", work=True, near_follow=True, deadline=t.freeze_seconds + 300)
        # verify reads its pre-freeze checksums from the work volume; it runs after
        # follow ended, so it mounts the volume without the affinity to follow.
        verify = b.step("verify", work=True, outputs=[_out("verify")])
        cleanup = b.step("cleanup", work=True)
        unfreeze = b.step("unfreeze", sql=True, deadline=t.freeze_seconds + 300)
        restart = b.step(
            "restart",
            db=False,
            deadline=cfg.restart.timeout_seconds + 300,
            inputs=[Parameter(name="frozen-at", default="")],
            env=[
                Env(name="DB_UPGRADE_RESTART_NAMESPACE", value=cfg.restart_namespace),
                Env(name="DB_UPGRADE_RESTART_DEPLOYMENTS", value=",".join(cfg.restart.deployments or [])),
                Env(name="DB_UPGRADE_RESTART_SELECTOR", value=cfg.restart.selector or ""),
                Env(name="DB_UPGRADE_RESTART_TIMEOUT", value=str(cfg.restart.timeout_seconds)),
                Env(name="DB_UPGRADE_FROZEN_AT", value="{{inputs.parameters.frozen-at}}"),
            ],
            outputs=[
                _out("restart-started", global_name="restart-started"),
                _out("write-downtime-seconds", default=""),
            ],
            metrics=Metrics(
                prometheus=[
                    Prometheus(
                        name="db_upgrade_write_downtime_seconds",
                        help="Seconds writes were frozen: from freeze to the restarted rollouts",
                        labels=[MetricLabel(key="database", value=cfg.database_id)],
                        when="{{status}} == Succeeded",
                        gauge=Gauge(value="{{outputs.parameters.write-downtime-seconds}}", realtime=False),
                    )
                ]
            ),
        )
        report = b.step(
            "report",
            db=False,
            inputs=[Parameter(name="status"), Parameter(name="failures", default="")],
            env=[
                Env(name="DB_UPGRADE_WORKFLOW_STATUS", value="{{inputs.parameters.status}}"),
                Env(name="DB_UPGRADE_WORKFLOW_FAILURES", value="{{inputs.parameters.failures}}"),
            ],
        )

        with DAG(name="upgrade"):
            Task(name="create-scratch-target", template=create_scratch, when=f"{P_MODE} == 'rehearsal'")
            Task(name="preflight", template=preflight,
                 depends="create-scratch-target.Succeeded || create-scratch-target.Skipped")
            Task(name="grant-replication", template=grant, depends="preflight.Succeeded")
            Task(name="follow", template=follow, depends="grant-replication.Succeeded")
            # Parallel with follow, not a daemon: it polls the lag follow produces.
            Task(name="wait-caught-up", template=wait, depends="grant-replication.Succeeded")
            # Skipped with approval=auto; a timeout resolves to the default `abort`.
            Task(name="approve", template=approve, depends="wait-caught-up.Succeeded",
                 when=f"{P_APPROVAL} == 'manual'",
                 arguments={"lag": "{{tasks.wait-caught-up.outputs.parameters.lag}}"})
            # Never in rehearsal: readonly.sql never runs on the production source.
            Task(name="freeze", template=freeze,
                 depends="wait-caught-up.Succeeded && (approve.Succeeded || approve.Skipped)",
                 when=f"{P_MODE} == 'upgrade' && {CUTOVER}")
            # finish is what stops follow, so it runs on every path once follow started:
            # after freeze in any state (skipped = abort or rehearsal), and when
            # approve or wait-caught-up failed (freeze is then Omitted, which no
            # result matches; those branches are named directly).
            Task(name="finish", template=finish,
                 depends=f"{_any_end('freeze')} || {_failed('approve')} || {_failed('wait-caught-up')}")
            # Writes stay frozen until the exit handler otherwise, which waits for the
            # whole DAG (follow included): restore them as soon as the freeze path failed.
            Task(name="unfreeze", template=unfreeze,
                 depends=f"{_failed('freeze')} || (freeze.Succeeded && ({_failed('finish')}))")
            # Only after a cutover (not an abort: verify is then Skipped) and never after a
            # failed freeze (Failed matches neither result).
            Task(name="verify", template=verify,
                 depends="follow.Succeeded && finish.Succeeded && (freeze.Succeeded || freeze.Skipped)",
                 when=CUTOVER)
            Task(name="cleanup", template=cleanup, depends="verify.Succeeded || verify.Skipped")
            # freeze.Succeeded means a real cutover in upgrade mode: abort and rehearsal never restart.
            Task(name="restart", template=restart, depends="cleanup.Succeeded && freeze.Succeeded",
                 arguments={"frozen-at": "{{tasks.freeze.outputs.parameters.frozen-at}}"})

        with DAG(name="exit-handler"):
            Task(name="report", template=report,
                 arguments={"status": "{{workflow.status}}", "failures": "{{workflow.failures}}"})
            # Restore writes if the run failed after freeze, unless restart began: the
            # applications may already write to the target, and a writable source would fork.
            Task(name="unfreeze-after-failure", template=unfreeze,
                 when=f"{FAILED} && {FROZEN} && !({RESTART_STARTED})")
            Task(name="cleanup-after-failure", template=cleanup,
                 when=f"{FAILED} && '{{{{workflow.parameters.keep-slot-on-failure}}}}' != 'true'")
            # A failed run kept for `argo retry` keeps its scratch target too.
            Task(name="drop-scratch-target", template=drop_scratch,
                 depends=_any_end("cleanup-after-failure"),
                 when=f"{P_MODE} == 'rehearsal' && '{{{{workflow.parameters.keep-scratch}}}}' != 'true'"
                 f" && ('{{{{workflow.status}}}}' == 'Succeeded'"
                 f" || '{{{{workflow.parameters.keep-slot-on-failure}}}}' != 'true')")
    return wt


def render(cfg: Config) -> dict:
    return build(cfg).to_dict()
