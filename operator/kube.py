"""The few API calls the operator makes itself (kopf does the watching and patching).

Synchronous kubernetes-client calls; the kopf handlers run them in a thread.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import kubernetes

from halfclose.api import GROUP, REPORT_PLURAL, VERSION
from halfclose.api.crds import PEERING_GROUP, PEERING_KIND, PEERING_PLURAL, PEERING_VERSION

log = logging.getLogger(__name__)


def make_api_client() -> kubernetes.client.ApiClient:
    """The service account in a pod, else the kubeconfig -- as kopf logs in."""
    try:
        kubernetes.config.load_incluster_config()
        return kubernetes.client.ApiClient()
    except kubernetes.config.ConfigException:
        return kubernetes.config.new_client_from_config()


def ensure_peering(api: kubernetes.client.ApiClient, name: str) -> bool:
    """Create the ClusterKopfPeering object replicas meet in; True if created.

    kopf needs the object to exist (it only patches it): without it every
    replica would believe it is alone and all would act.
    """
    body = {
        "apiVersion": f"{PEERING_GROUP}/{PEERING_VERSION}",
        "kind": PEERING_KIND,
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "halfclose"}},
    }
    try:
        kubernetes.client.CustomObjectsApi(api).create_cluster_custom_object(
            PEERING_GROUP, PEERING_VERSION, PEERING_PLURAL, body
        )
    except kubernetes.client.ApiException as exc:
        if exc.status == 409:
            return False
        raise
    return True


def delete_reports(api: kubernetes.client.ApiClient, reports: Iterable[tuple[str, str]]) -> int:
    """Delete HalfCloseReports by (namespace, name); already gone is fine. Returns deleted."""
    custom = kubernetes.client.CustomObjectsApi(api)
    deleted = 0
    for namespace, name in reports:
        try:
            custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, REPORT_PLURAL, name)
            deleted += 1
        except kubernetes.client.ApiException as exc:
            if exc.status != 404:
                raise
    return deleted
