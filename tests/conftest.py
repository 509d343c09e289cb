"""Shared fixtures. Every test runs in a temporary home: no real profile is read or written."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def pytest_configure(config: pytest.Config) -> None:
    """Registers llama.cpp's backend modules for tests that load models in this process."""
    from engine.runtimes import ensure_backends

    ensure_backends()


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Points PEREGRINE_HOME, HOME, XDG_* and HF_HOME at a temporary folder."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("PEREGRINE_HOME", str(home / "peregrine"))
    for var, sub in (
        ("XDG_DATA_HOME", ".local/share"),
        ("XDG_CONFIG_HOME", ".config"),
        ("XDG_CACHE_HOME", ".cache"),
        ("XDG_STATE_HOME", ".local/state"),
    ):
        monkeypatch.setenv(var, str(home / sub))
    monkeypatch.setenv("HF_HOME", str(home / ".cache" / "huggingface"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("PEREGRINE_API_KEY", raising=False)
    yield home


@pytest.fixture(scope="session")
def default_model() -> Path:
    """The real built-in GGUF (SmolLM2-135M-Instruct Q4_1)."""
    from engine.default_model import default_model_path

    return default_model_path()
