"""A frozen bundle's needs, checked from source: child processes without `python -m`,
the hidden `_child` command, `--version`, the build record and the About box.

The frozen case is reproduced by setting `sys.frozen` and pointing `sys.executable`
at the installed `peregrine` command, which is what a bundle's executable is.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from app import cli
from app.services import build_info as build_info_mod
from app.services.build_info import BUILD_FILE, build_info
from app.services.engine.launch import LaunchSpec, serve_command
from engine.child import CHILD_COMMAND, module_argv
from engine.planning.hardware import probe_ggml_devices_in_child
from engine.planning.probe import measure
from engine.wire.control import LoadRequest

PEREGRINE = Path(sys.executable).with_name("peregrine")


@pytest.fixture
def frozen(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Looks like a PyInstaller bundle whose executable is the `peregrine` command."""
    assert PEREGRINE.is_file(), "the peregrine console script is installed in the venv"
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "_MEIPASS", str(bundle), raising=False)
    monkeypatch.setattr(sys, "executable", str(PEREGRINE))
    return bundle


def test_from_source_children_are_python_dash_m() -> None:
    assert module_argv("engine.planning.probe") == [sys.executable, "-m", "engine.planning.probe"]
    assert module_argv("app.cli", "/py") == ["/py", "-m", "app.cli"]


def test_frozen_children_run_through_the_executable(frozen: Path) -> None:
    assert module_argv("engine.planning.hardware") == [
        str(PEREGRINE),
        CHILD_COMMAND,
        "engine.planning.hardware",
    ]
    spec = LaunchSpec(model=Path("/m dir/ü.gguf"))
    assert serve_command(spec, parent_pid=7)[:4] == [
        str(PEREGRINE),
        "serve",
        "--model",
        "/m dir/ü.gguf",
    ]
    # Tests that pass their own interpreter still get `-m`.
    assert module_argv("engine.planning.probe", "/py")[:2] == ["/py", "-m"]


def test_only_known_modules_are_children() -> None:
    with pytest.raises(ValueError):
        module_argv("os")


def test_child_command_refuses_other_modules(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([CHILD_COMMAND, "os"]) == 2
    assert cli.main([CHILD_COMMAND]) == 2
    assert "expected one of" in capsys.readouterr().err


def test_frozen_hardware_probe_runs_in_a_child(frozen: Path) -> None:
    # A real child: `peregrine _child engine.planning.hardware --ggml-devices`.
    assert probe_ggml_devices_in_child(None) == []  # this machine has no GPU


@pytest.mark.slow
def test_frozen_memory_dry_run_runs_in_a_child(frozen: Path, default_model: Path) -> None:
    measured = measure(LoadRequest(model=str(default_model), n_ctx=512))
    assert measured.weights_total > 0 and measured.kv_total > 0 and measured.n_ctx == 512


def test_child_passes_arguments_through_unchanged() -> None:
    # `--debug` belongs to the child module, not to the `peregrine` command.
    proc = subprocess.run(
        [str(PEREGRINE), CHILD_COMMAND, "engine.planning.probe", "--json", "--load", "{bad"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert json.loads(proc.stdout)["error"].startswith("bad LoadRequest")


def test_version_names_peregrine_and_llama_cpp(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("peregrine 0.") and "(llama.cpp 0c1e57098)" in out


def test_source_build_info_knows_the_pinned_llama_cpp() -> None:
    info = build_info()
    assert not info.bundled
    assert info.llama_cpp_python == "0.3.36" and info.llama_cpp_commit == "0c1e57098"
    assert "this Python environment" in info.runtime
    assert (build_info_mod.assets_dir() / "peregrine.svg").is_file()


def test_bundle_build_record_is_read(frozen: Path) -> None:
    (frozen / BUILD_FILE).write_text(
        json.dumps({"version": "9.9.9", "llama_cpp_commit": "abc1234", "runtime": "portable CPU"})
    )
    info = build_info()
    assert info.bundled and info.version == "9.9.9"
    assert info.llama_cpp_commit == "abc1234" and info.runtime == "portable CPU"
    assert build_info_mod.assets_dir() == frozen / "assets"


@pytest.mark.parametrize("content", ["[1, 2]", "{not json", "x" * 70000])
def test_a_bad_build_record_is_ignored(frozen: Path, content: str) -> None:
    (frozen / BUILD_FILE).write_text(content)
    info = build_info()
    assert info.bundled and info.llama_cpp_commit == "0c1e57098"  # the pin, not a crash
    assert info.runtime == "the bundle's llama.cpp"


def test_windowed_windows_executable_starts_children_through_its_console_twin(
    frozen: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The shortcuts start peregrinew.exe; a child's output is read through pipes,
    # which the console program peregrine.exe beside it serves reliably.
    windowed = frozen / "peregrinew.exe"
    console = frozen / "peregrine.exe"
    windowed.write_bytes(b"")
    console.write_bytes(b"")
    monkeypatch.setattr(sys, "executable", str(windowed))
    assert module_argv("app.cli") == [str(console)]
    assert module_argv("engine.planning.probe")[:2] == [str(console), CHILD_COMMAND]
