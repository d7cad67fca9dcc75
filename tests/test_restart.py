"""step restart against a fake Kubernetes API speaking the apps/v1 wire format."""

from __future__ import annotations

import json

import pytest

from steps.errors import StepError
from steps.switch import restart as r


def settings(tmp_path, **kw):
    defaults = dict(namespace="shop", deployments="api,worker", timeout=5, poll_interval=0.01,
                    outputs=tmp_path / "outputs")
    return r.load_restart_settings(**{**defaults, **kw})


def patches(kube):
    return [(path, headers, json.loads(body)) for method, path, headers, body in kube.requests if method == "PATCH"]


def test_restart_patches_like_kubectl_and_waits_for_the_rollout(kube, tmp_path, capsys):
    kube.add("api")
    kube.add("worker")
    kube.polls_to_complete = 3
    s = settings(tmp_path, frozen_at="1000")
    assert r.restart(s) == ["api", "worker"]

    sent = patches(kube)
    assert [p for p, _, _ in sent] == ["/apis/apps/v1/namespaces/shop/deployments/api",
                                       "/apis/apps/v1/namespaces/shop/deployments/worker"]
    for _, headers, body in sent:
        assert headers["Content-Type"] == "application/strategic-merge-patch+json"
        assert set(body) == {"spec"}
        assert r.RESTARTED_AT in body["spec"]["template"]["metadata"]["annotations"]
    for name in ("api", "worker"):
        obj = kube.deployments[("shop", name)]
        assert r.RESTARTED_AT in obj["spec"]["template"]["metadata"]["annotations"]
    gets = [p for m, p, _, _ in kube.requests if m == "GET" and p.endswith("/api")]
    assert len(gets) >= 1 + 3  # the check before patching, then polls until complete
    err = capsys.readouterr().err
    assert "api: 1 of 2 new replicas updated" in err
    assert "api: successfully rolled out" in err
    assert "all rollouts complete" in err
    assert float((tmp_path / "outputs/restart-started").read_text()) > 0
    assert float((tmp_path / "outputs/write-downtime-seconds").read_text()) > 0


def test_rollout_that_never_completes_times_out(kube, tmp_path):
    kube.add("api")
    kube.add("worker")
    kube.polls_to_complete = None
    with pytest.raises(StepError) as exc:
        r.restart(settings(tmp_path, timeout=0.2))
    msg = str(exc.value)
    assert "\n" not in msg
    assert "rollout not complete after 0.2s in namespace 'shop'" in msg
    assert "api: 1 of 2 new replicas updated" in msg


def test_missing_deployment_is_named_and_nothing_is_patched(kube, tmp_path):
    kube.add("api")
    with pytest.raises(StepError, match=r"^deployment 'worker' in namespace 'shop' not found$"):
        r.restart(settings(tmp_path))
    assert patches(kube) == []


def test_forbidden_names_deployment_namespace_and_permission(kube, tmp_path):
    kube.add("api")
    kube.add("worker")
    kube.forbidden.add(("patch", "api"))
    with pytest.raises(StepError) as exc:
        r.restart(settings(tmp_path))
    msg = str(exc.value)
    assert "'api'" in msg and "'shop'" in msg
    assert "verb 'patch' on resource 'deployments' (apiGroup apps)" in msg
    assert "\n" not in msg


def test_selector_lists_deployments_by_label(kube, tmp_path):
    kube.add("api", labels={"part-of": "orders"})
    kube.add("worker", labels={"part-of": "orders"})
    kube.add("other", labels={"part-of": "billing"})
    assert r.restart(settings(tmp_path, deployments="", selector="part-of=orders")) == ["api", "worker"]
    assert {p.rsplit("/", 1)[1] for p, _, _ in patches(kube)} == {"api", "worker"}
    lists = [p for m, p, _, _ in kube.requests if m == "GET" and p.endswith("/deployments")]
    assert lists == ["/apis/apps/v1/namespaces/shop/deployments"]


def test_selector_matching_nothing_and_forbidden_list(kube, tmp_path):
    with pytest.raises(StepError, match="no deployment in namespace 'shop' matches selector 'x=y'"):
        r.restart(settings(tmp_path, deployments="", selector="x=y"))
    kube.forbidden.add(("list", None))
    with pytest.raises(StepError, match="verb 'list' on resource 'deployments'"):
        r.restart(settings(tmp_path, deployments="", selector="x=y"))


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(deployments="", selector=""), "no deployment to restart"),
        (dict(deployments=" , ", selector=""), "no deployment to restart"),
        (dict(selector="app=x"), "not both"),
        (dict(namespace=""), "DB_UPGRADE_RESTART_NAMESPACE is not set"),
    ],
)
def test_settings_errors(tmp_path, kw, message):
    with pytest.raises(StepError, match=message):
        settings(tmp_path, **kw)


def test_command_reads_the_environment_and_kubeconfig(kube, tmp_path, monkeypatch):
    kube.add("api")
    kube.polls_to_complete = 1
    for var, value in {"NAMESPACE": "shop", "DEPLOYMENTS": "api", "TIMEOUT": "5", "POLL_INTERVAL": "0.01"}.items():
        monkeypatch.setenv(f"DB_UPGRADE_RESTART_{var}", value)
    monkeypatch.setenv("DB_UPGRADE_OUTPUTS", str(tmp_path / "out"))
    monkeypatch.setenv("DB_UPGRADE_FROZEN_AT", "")  # no freeze ran: Argo passes an empty input
    r.command()
    assert (tmp_path / "out/restart-started").exists()
    assert not (tmp_path / "out/write-downtime-seconds").exists()


def test_restart_switch_checks_without_patching_then_restarts(kube, tmp_path):
    from steps.switch.restart import RestartSwitch

    kube.add("api")
    kube.polls_to_complete = 1
    sw = RestartSwitch(settings(tmp_path, deployments="api"))
    sw.check()
    sw.hold()
    sw.release()
    assert patches(kube) == []  # nothing changed before the switch
    sw.switch()
    assert [p for p, _, _ in patches(kube)] == ["/apis/apps/v1/namespaces/shop/deployments/api"]


def test_restart_switch_check_names_a_missing_deployment(kube, tmp_path):
    from steps.switch.restart import RestartSwitch

    kube.add("api")
    with pytest.raises(StepError, match=r"^deployment 'worker' in namespace 'shop' not found$"):
        RestartSwitch(settings(tmp_path)).check()
