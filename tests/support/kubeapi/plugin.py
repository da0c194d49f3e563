"""pytest plugin: the ``kube_api`` fixture (listed in tests/conftest.py ``pytest_plugins``).

The emulator is imported when the fixture is first used, so test sessions that never
touch Kubernetes (unit, kernel) do not load aiohttp, KMock and CEL at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .emulator import KubeAPIEmulator

REPO_ROOT = Path(__file__).resolve().parents[3]
CRD_DIR = REPO_ROOT / "crds"


@pytest.fixture
def kube_api() -> Iterator[KubeAPIEmulator]:
    """A started emulator serving the core kinds plus ``crds/*.yaml`` as found right now.

    Teardown fails the test if the emulator hit an internal error (an emulator bug or a
    limitation such as an unsupported CEL function): a silent 500 would hide it.
    """
    from .emulator import KubeAPIEmulator, crd_files

    emulator = KubeAPIEmulator(crd_paths=crd_files(CRD_DIR))
    emulator.start()
    try:
        yield emulator
        errors = emulator.internal_errors
    finally:
        emulator.stop()
    if errors:
        pytest.fail(
            f"the API emulator hit {len(errors)} internal error(s): {errors!r}", pytrace=False
        )
