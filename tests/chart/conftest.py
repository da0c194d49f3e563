"""Fixtures of the chart tests: the chart rendered once per session per values set."""

from __future__ import annotations

import pytest

from support import chart


@pytest.fixture(scope="session")
def default_manifests() -> list[chart.Manifest]:
    return chart.render()


@pytest.fixture(scope="session")
def full_manifests() -> list[chart.Manifest]:
    return chart.render(chart.full_values())


@pytest.fixture(scope="session", params=["default", "full"])
def manifests(
    request: pytest.FixtureRequest,
    default_manifests: list[chart.Manifest],
    full_manifests: list[chart.Manifest],
) -> list[chart.Manifest]:
    return default_manifests if request.param == "default" else full_manifests
