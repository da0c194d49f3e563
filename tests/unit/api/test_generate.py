"""The generator: deterministic files, --check catching drift."""

from __future__ import annotations

from pathlib import Path

import yaml

from halfclose.api.crds import all_crds
from halfclose.api.generate import main

NAMES = sorted(f"{c['metadata']['name']}.yaml" for c in all_crds())


def test_writes_then_checks_clean(tmp_path: Path) -> None:
    assert main(["--root", str(tmp_path), "--check"]) == 1  # nothing written yet
    assert main(["--root", str(tmp_path)]) == 0
    assert sorted(p.name for p in (tmp_path / "crds").iterdir()) == NAMES
    first = {p.name: p.read_bytes() for p in (tmp_path / "crds").iterdir()}
    assert main(["--root", str(tmp_path)]) == 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "crds").iterdir()} == first
    assert main(["--root", str(tmp_path), "--check"]) == 0


def test_check_names_the_stale_file(tmp_path: Path, capsys: object) -> None:
    main(["--root", str(tmp_path)])
    target = tmp_path / "crds" / "halfclosepolicies.halfclose.io.yaml"
    target.write_text(target.read_text().replace("default: 60", "default: 61"))
    assert main(["--root", str(tmp_path), "--check"]) == 1
    err = capsys.readouterr().err  # type: ignore[attr-defined]
    assert "crds/halfclosepolicies.halfclose.io.yaml" in err
    assert "halfclosereports" not in err


def test_files_are_single_yaml_documents_equal_to_the_model(tmp_path: Path) -> None:
    main(["--root", str(tmp_path)])
    for crd in all_crds():
        text = (tmp_path / "crds" / f"{crd['metadata']['name']}.yaml").read_text()
        assert list(yaml.safe_load_all(text)) == [crd]
