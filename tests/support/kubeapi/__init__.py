"""A real HTTP Kubernetes API emulator for tests (see docs/kubeapi.md).

``from support.kubeapi import KubeAPIEmulator``; the pytest fixture ``kube_api`` lives in
``support.kubeapi.plugin``.
"""

from .emulator import KubeAPIEmulator, KubectlError, LoggedRequest
from .errors import APIError

__all__ = ["APIError", "KubeAPIEmulator", "KubectlError", "LoggedRequest"]
