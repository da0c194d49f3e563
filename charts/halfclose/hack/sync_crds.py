"""Copy the repository's crds/*.yaml into the chart (files/crds/), byte for byte.

    python charts/halfclose/hack/sync_crds.py           # copy (`make crds` runs it)
    python charts/halfclose/hack/sync_crds.py --check   # exit 1 and name stale files

The chart renders its CRDs from these copies (templates/crds.yaml reads them as
data and adds labels and the keep annotation), so the CRDs a chart installs are
the ones `make crds` generated from the model.  They live under files/, not in
Helm's special crds/ directory: Helm never upgrades what it installs from there,
and `crds.enabled` could not turn it off.  Files in files/crds/ that no longer
exist in crds/ are removed, so a renamed CRD cannot linger in the chart.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

CHART = Path(__file__).resolve().parents[1]
REPO = CHART.parents[1]


def plan(source: Path, target: Path) -> tuple[dict[Path, bytes], list[Path]]:
    """(files to write with their content, files to remove) to make target mirror source."""
    wanted = {target / p.name: p.read_bytes() for p in sorted(source.glob("*.yaml"))}
    writes = {
        path: data
        for path, data in wanted.items()
        if not path.exists() or path.read_bytes() != data
    }
    removals = sorted(p for p in target.glob("*.yaml") if p not in wanted)
    return writes, removals


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 on drift")
    parser.add_argument("--source", type=Path, default=REPO / "crds")
    parser.add_argument("--target", type=Path, default=CHART / "files" / "crds")
    args = parser.parse_args(argv)
    source: Path = args.source
    target: Path = args.target
    if not any(source.glob("*.yaml")):
        # An empty chart copy would silently install no CRDs at all.
        print(f"sync_crds: no CRDs in {source} (run `make crds`)", file=sys.stderr)
        return 2
    writes, removals = plan(source, target)
    if args.check:
        for path in [*writes, *removals]:
            print(f"sync_crds: stale: {path} (run `make crds`)", file=sys.stderr)
        return 1 if writes or removals else 0
    target.mkdir(parents=True, exist_ok=True)
    for path, data in writes.items():
        path.write_bytes(data)
        print(f"sync_crds: wrote {path}")
    for path in removals:
        path.unlink()
        print(f"sync_crds: removed {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
