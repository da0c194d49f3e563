"""The lab's state file: what exists, so another process can show it and take it down.

``<run_dir>/<prefix>/state.json`` is written before anything is created and
after every process start, atomically (write + rename), so a crash at any
point leaves a file that ``down`` can work from.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from halfclose.lab.errors import LabError
from halfclose.lab.settings import LabSettings

STATE_VERSION = 1


@dataclass(frozen=True, slots=True)
class LabPaths:
    run_dir: str
    prefix: str

    @property
    def dir(self) -> str:
        return os.path.join(self.run_dir, self.prefix)

    @property
    def state(self) -> str:
        return os.path.join(self.dir, "state.json")

    @property
    def lock(self) -> str:
        return os.path.join(self.dir, "lock")

    def control(self, pod: int, role: str = "app") -> str:
        # "app": the pod's app holder; "client": the holder of the pod's inbound
        # clients (in the upstream netns).
        suffix = "" if role == "app" else f"-{role}"
        return os.path.join(self.dir, f"pod{pod}{suffix}.sock")

    def log(self, role: str, pod: int | None) -> str:
        name = role if pod is None else f"pod{pod}-{role}"
        return os.path.join(self.dir, f"{name}.log")


@dataclass(frozen=True, slots=True)
class ProcessRecord:
    role: str  # "upstream" | "proxy" | "ztunnel" | "app" | "server" | "client"
    pod: int | None
    pid: int
    start_time: int | None  # /proc/<pid>/stat field 22: tells a reused pid apart
    netns: str


@dataclass(slots=True)
class LabState:
    settings: LabSettings
    phase: str = "building"
    processes: list[ProcessRecord] = field(default_factory=list)
    version: int = STATE_VERSION

    def find(self, role: str, pod: int | None) -> ProcessRecord | None:
        for record in reversed(self.processes):
            if record.role == role and record.pod == pod:
                return record
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "phase": self.phase,
            "settings": self.settings.to_dict(),
            "processes": [asdict(p) for p in self.processes],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabState:
        return cls(
            settings=LabSettings.from_dict(data["settings"]),
            phase=str(data.get("phase", "building")),
            processes=[ProcessRecord(**p) for p in data.get("processes", [])],
            version=int(data.get("version", STATE_VERSION)),
        )

    def save(self, path: str) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> LabState | None:
        """The recorded state; None if there is none.  A damaged file is a LabError."""
        try:
            with open(path) as f:
                return cls.from_dict(json.load(f))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            raise LabError(f"damaged lab state {path}: {exc}") from exc
