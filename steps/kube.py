"""The Kubernetes API client of the steps that need one (the restart switch, the
history): in-cluster configuration (the pod's service account), else KUBECONFIG."""

from __future__ import annotations

import os

from steps.errors import StepError


def api_client():
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        try:
            # Read KUBECONFIG now: the library's default is frozen at import time.
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration)
        except (config.ConfigException, OSError) as exc:
            raise StepError(f"no Kubernetes configuration: not in a cluster, and KUBECONFIG: {exc}") from None
    return client.ApiClient(configuration)
