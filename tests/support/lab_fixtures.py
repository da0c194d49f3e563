"""Pytest plugin: leak labs for kernel tests (registered in tests/conftest.py).

- ``make_lab(**LabSettings kwargs)``: a factory returning an up ``Lab`` with a
  unique ``hct-<hex>`` prefix; every lab it made is taken down at the end of
  the test, failure included.  ``close_wait_timeout`` defaults to 2 s here
  (the lab's own default is 5 s) so leaks form fast.
- ``lab``: a default lab (1 pod, istio style, iptables-nft, 2 s).
- ``module_lab``: the same, shared by a module's tests (for tests that only
  add traffic and look at their own connections).

Each skips with the reason when not root or when a tool the lab needs is missing.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from halfclose.lab import Lab, LabSettings
from halfclose.lab.lab import BASE_TOOLS
from halfclose.lab.rules import tools_for

TEST_CLOSE_WAIT_TIMEOUT = 2


def unique_prefix() -> str:
    """``hct-<4 hex>``: unique among concurrent test runs, short enough for every name."""
    return f"hct-{secrets.token_hex(2)}"


def skip_unless_lab_possible(backend: str = "iptables-nft") -> None:
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (network namespaces, NAT rules)")
    missing = [t for t in (*BASE_TOOLS, *tools_for(backend)) if shutil.which(t) is None]
    if missing:
        pytest.skip(f"the lab needs {', '.join(missing)} (see .ci/system-deps)")


class LabFactory:
    """Makes labs and remembers them, so that ``close()`` can take all of them down."""

    def __init__(self) -> None:
        self.labs: list[Lab] = []

    def __call__(self, **kwargs: Any) -> Lab:
        skip_unless_lab_possible(kwargs.get("backend", "iptables-nft"))
        kwargs.setdefault("prefix", unique_prefix())
        kwargs.setdefault("close_wait_timeout", TEST_CLOSE_WAIT_TIMEOUT)
        lab = Lab(LabSettings(**kwargs))
        # Remembered before up(): a failed up() cleans up after itself, but
        # down() is idempotent, so a second pass costs nothing.
        self.labs.append(lab)
        lab.up()
        return lab

    def close(self) -> None:
        errors = []
        for lab in reversed(self.labs):
            try:
                lab.down()
            except Exception as exc:  # keep taking the others down
                errors.append(exc)
        self.labs.clear()
        if errors:
            raise errors[0]


@pytest.fixture
def make_lab() -> Iterator[LabFactory]:
    factory = LabFactory()
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def lab(make_lab: LabFactory) -> Lab:
    return make_lab()


@pytest.fixture(scope="module")
def module_lab() -> Iterator[Lab]:
    factory = LabFactory()
    try:
        yield factory()
    finally:
        factory.close()
