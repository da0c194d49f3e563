"""The few API calls the operator makes itself (kopf does the watching and patching).

Synchronous kubernetes-client calls; the kopf handlers run them in a thread.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import kopf
import kubernetes

from halfclose.api import GROUP, REPORT_PLURAL, VERSION
from halfclose.api.crds import PEERING_GROUP, PEERING_KIND, PEERING_PLURAL, PEERING_VERSION

log = logging.getLogger(__name__)


def load_configuration(kubeconfig: str | None) -> kubernetes.client.Configuration:
    """Where the API is and who we are: ``kubeconfig`` if given, else the pod's
    service account, else ``~/.kube/config``.

    kopf and the operator's own client both use this one configuration, so
    they always talk to the same server as the same identity.
    """
    config = kubernetes.client.Configuration()
    if kubeconfig is None:
        try:
            kubernetes.config.load_incluster_config(client_configuration=config)  # type: ignore[no-untyped-call]
            return config
        except kubernetes.config.ConfigException:
            pass
    kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=config)  # type: ignore[no-untyped-call]
    return config


def connection_info(config: kubernetes.client.Configuration) -> kopf.ConnectionInfo:
    """kopf's credentials from the client configuration (as kopf.login_via_client does)."""
    header = config.get_api_key_with_prefix("BearerToken") or config.get_api_key_with_prefix(
        "authorization"
    )
    scheme, _, token = (header or "").rpartition(" ")
    return kopf.ConnectionInfo(
        server=config.host,
        ca_path=config.ssl_ca_cert,
        insecure=not config.verify_ssl,
        username=config.username or None,
        password=config.password or None,
        scheme=scheme or None,
        token=token or None,
        certificate_path=config.cert_file,
        private_key_path=config.key_file,
    )


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
