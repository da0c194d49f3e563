"""The leak lab: the sidecar half-close leak, reproduced on the real kernel.

::

    from halfclose.lab import Lab, LabSettings
    with Lab(LabSettings(prefix="hc-demo", close_wait_timeout=5)) as lab:
        leaks = lab.leak(count=3)        # list[LeakedPair], verified to exist

See docs/lab.md for how it is built and why.
"""

from halfclose.lab.errors import LabError
from halfclose.lab.lab import Lab
from halfclose.lab.model import (
    LabStatus,
    LateClose,
    LeakedPair,
    PodStatus,
    ProcessInfo,
    ProxiedPair,
    SocketView,
    Teardown,
)
from halfclose.lab.settings import BACKENDS, MESHES, STYLES, LabSettings, MeshProfile

__all__ = [
    "BACKENDS",
    "MESHES",
    "STYLES",
    "Lab",
    "LabError",
    "LabSettings",
    "LabStatus",
    "LateClose",
    "LeakedPair",
    "MeshProfile",
    "PodStatus",
    "ProcessInfo",
    "ProxiedPair",
    "SocketView",
    "Teardown",
]
