"""What this copy of Peregrine is: its version, the llama.cpp it runs and how that was built.

A bundle carries `peregrine-build.json`, written when it was built
(packaging/peregrine.spec); a source install knows its Python packages, and
llama.cpp's commit from the llama-cpp-python release it pins.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

BUILD_FILE = "peregrine-build.json"
# The llama.cpp commit each llama-cpp-python release vendors (its CHANGELOG).
LLAMA_CPP_COMMITS = {"0.3.36": "0c1e57098"}
_MAX_BUILD_FILE = 64 * 1024


@dataclass(frozen=True)
class BuildInfo:
    """The facts the About box and `peregrine --version` show."""

    version: str
    llama_cpp_python: str | None
    llama_cpp_commit: str | None
    runtime: str
    python: str
    bundled: bool

    def version_line(self) -> str:
        return f"peregrine {self.version} (llama.cpp {self.llama_cpp_commit or 'unknown'})"


def bundle_dir() -> Path | None:
    """The folder a frozen bundle unpacked its code and data into; None from source."""
    if not getattr(sys, "frozen", False):
        return None
    return Path(getattr(sys, "_MEIPASS", Path(sys.executable).parent))


def assets_dir() -> Path:
    """The top-level assets/ folder (icons, desktop entry), from source or a bundle."""
    root = bundle_dir()
    return (root if root is not None else Path(__file__).resolve().parents[2]) / "assets"


def _distribution_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _read_build_file(path: Path) -> dict[str, object]:
    """The bundle's build record, or {} (logged) when it is missing or unreadable."""
    try:
        if not path.is_file():
            return {}
        with path.open("rb") as f:
            raw = f.read(_MAX_BUILD_FILE + 1)
        if len(raw) > _MAX_BUILD_FILE:
            raise ValueError(f"larger than {_MAX_BUILD_FILE} bytes")
        data = json.loads(raw.decode("utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return {}


def build_info() -> BuildInfo:
    root = bundle_dir()
    record = _read_build_file(root / BUILD_FILE) if root is not None else {}
    llama_py = _distribution_version("llama-cpp-python")
    commit = record.get("llama_cpp_commit") or LLAMA_CPP_COMMITS.get(llama_py or "")
    if root is not None:
        runtime = str(record.get("runtime") or "the bundle's llama.cpp")
    else:
        runtime = f"llama-cpp-python {llama_py or '(not installed)'} from this Python environment"
    return BuildInfo(
        version=str(record.get("version") or _distribution_version("peregrine") or "unknown"),
        llama_cpp_python=llama_py,
        llama_cpp_commit=None if commit is None else str(commit),
        runtime=runtime,
        python=f"{platform.python_implementation()} {platform.python_version()}",
        bundled=root is not None,
    )
