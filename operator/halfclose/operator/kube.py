"""Where the API server is and who the operator is there (kopf's login and our client)."""

from __future__ import annotations

import logging

import kopf
import kubernetes

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
