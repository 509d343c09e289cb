"""Hardening of the engine process: start-up checks and off-loopback loads (docs/api.md)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.engine_proc import read_events, running_engine, serve_command, wait_for

pytestmark = pytest.mark.slow


def start_failure(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    proc = subprocess.Popen(
        serve_command("--port", "0", *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    events = read_events(proc, 60)
    assert proc.wait(30) == 1
    assert [e["event"] for e in events] == ["error"], events
    return events[0]


def test_an_old_jinja2_is_refused_at_start_up(tmp_path: Path) -> None:
    fake = tmp_path / "site" / "jinja2"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('__version__ = "3.1.4"\n')
    path = os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])
    event = start_failure(tmp_path, env={"PYTHONPATH": path})
    assert "jinja2 3.1.4" in event["message"] and "CVE-2025-27516" in event["message"]


def test_an_unexpected_start_up_failure_is_still_an_error_event(tmp_path: Path) -> None:
    # llama-cpp-python pointed at an empty folder: its library cannot be loaded at all.
    # (A broken --runtime no longer fails: the engine falls back, see test_runtimes.py.)
    empty = tmp_path / "empty-lib"
    empty.mkdir()
    event = start_failure(tmp_path, env={"LLAMA_CPP_LIB_PATH": str(empty)})
    assert event["message"].startswith("the engine failed to start:")


def test_off_loopback_loads_only_from_the_models_folders(
    tmp_path: Path, default_model: Path
) -> None:
    models = Path(os.environ["PEREGRINE_HOME"]) / "models"
    models.mkdir(parents=True)
    extra = tmp_path / "more-models"
    extra.mkdir()
    elsewhere = tmp_path / "elsewhere" / "m.gguf"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"GGUF" + bytes(60))
    (models / "outside.gguf").symlink_to(elsewhere)  # a link out of the folder
    inside = extra / "copy.gguf"
    shutil.copyfile(default_model, inside)
    with (
        running_engine(
            "--host",
            "0.0.0.0",
            "--api-key",
            "k" * 32,
            "--models-dir",
            str(extra),
            "--ctx",
            "512",
            "--threads",
            "2",
        ) as engine,
        engine.client() as c,
    ):
        refusals = []
        for path in (
            "/etc/passwd",
            "/no/such/file.gguf",
            str(models / "outside.gguf"),
            str(elsewhere),
            str(models / ".." / ".." / "etc" / "passwd"),
            str(default_model.parent / "other.gguf"),
        ):
            r = c.post("/v1/engine/load", json={"model": path})
            assert r.status_code == 403, path
            refusals.append(r.json()["error"])
        # Existing and missing files get the same answer: nothing is revealed.
        assert all(e == refusals[0] for e in refusals)
        assert refusals[0]["code"] == "path_not_allowed" and refusals[0]["param"] == "model"
        r = c.post("/v1/engine/load", json={"model": str(inside), "draft_model": "/etc/hosts"})
        assert r.status_code == 403 and r.json()["error"]["param"] == "draft_model"
        # A missing file inside the folders is a plain load failure.
        assert c.post("/v1/engine/load", json={"model": str(extra / "x.gguf")}).status_code == 202
        assert wait_for(
            lambda: "not found" in (c.get("/v1/engine/status").json()["error"] or ""), 60
        )
        # The model served from the start stays loadable, and so do files in the folders.
        assert (
            c.post("/v1/engine/load", json={"model": str(inside), "n_ctx": 512}).status_code == 202
        )

        def loaded() -> bool:
            status = c.get("/v1/engine/status").json()
            return status["state"] == "ready" and status["model"]["path"] == str(inside)

        assert wait_for(loaded, 120)
