"""``halfclose-operator``: the entry point; the only place settings come from the environment."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import kopf

from halfclose.errors import UserError
from halfclose.operator.handlers import build_operator, run
from halfclose.operator.settings import environment, settings_from


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = settings_from(argv, environment())
    except UserError as exc:
        print(f"halfclose-operator: error: {exc}", file=sys.stderr)
        return exc.exit_code
    level = getattr(logging, settings.log_level)
    kopf.configure(
        debug=level <= logging.DEBUG, verbose=level <= logging.INFO, quiet=level >= logging.WARNING
    )
    logging.getLogger().setLevel(level)
    registry, state = build_operator(settings)
    liveness = (
        f"http://0.0.0.0:{settings.liveness_port}/healthz" if settings.liveness_port else None
    )
    run(registry, state, liveness_endpoint=liveness)
    return 0


if __name__ == "__main__":
    sys.exit(main())
