"""A real HTTP Kubernetes API emulator for tests (see docs/kubeapi.md).

``from support.kubeapi import KubeAPIEmulator``; the pytest fixture ``kube_api`` lives in
``support.kubeapi.plugin``.  Exports load on first use (PEP 562): every test session
registers the plugin, and sessions that never touch Kubernetes should not pay ~0.4 s
for aiohttp, KMock and CEL.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .emulator import KubeAPIEmulator, KubectlError, LoggedRequest
    from .errors import APIError

__all__ = ["APIError", "KubeAPIEmulator", "KubectlError", "LoggedRequest"]


def __getattr__(name: str) -> Any:
    if name == "APIError":
        from .errors import APIError

        return APIError
    if name in __all__:
        from . import emulator

        return getattr(emulator, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
