"""Shared fixtures: each support plugin registers its own (see tests/support/)."""

pytest_plugins: list[str] = []
