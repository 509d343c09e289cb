"""Starts upstream llama-server (built from the same vendored llama.cpp) for comparisons.

The binary is never part of the repository. Build it outside, as bench/README.md
says, and point `LLAMA_SERVER_BIN` at it (default: build/llama-server/bin/llama-server in the
checkout).
Benchmarks call `start_llama_server` and skip their llama-server rows when it returns None.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx2 as httpx

log = logging.getLogger("bench.llama_server")

DEFAULT_BIN = str(Path(__file__).resolve().parent.parent / "build/llama-server/bin/llama-server")


def llama_server_bin() -> Path | None:
    """The llama-server binary named by LLAMA_SERVER_BIN (or the default), if it exists."""
    path = Path(os.environ.get("LLAMA_SERVER_BIN", DEFAULT_BIN))
    return path if path.is_file() and os.access(path, os.X_OK) else None


def _free_port() -> int:
    # llama-server wants a concrete port; the OS hands us one that is free now.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_llama_server(
    extra_args: Sequence[str], *, timeout: float = 120.0
) -> tuple[str, subprocess.Popen[bytes]] | None:
    """Starts llama-server on a free loopback port and waits until /health says ok.

    Returns (base_url, process), or None when the binary is missing. The caller
    stops the process (`stop_llama_server`). Raises RuntimeError, with the tail of
    its log, when the server exits or is not ready within `timeout` seconds.
    """
    binary = llama_server_bin()
    if binary is None:
        log.info("llama-server not found (set LLAMA_SERVER_BIN); skipping its rows")
        return None
    port = _free_port()
    # Its log is long and chatty: a file, so an undrained pipe can never stall it.
    log_file = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)  # noqa: SIM115
    cmd = [str(binary), "--host", "127.0.0.1", "--port", str(port), *extra_args]
    log.info("starting %s (log %s)", " ".join(cmd), log_file.name)
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    log_file.close()
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=base_url, timeout=5.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"llama-server exited with {proc.returncode}: {_tail(log_file.name)}"
                )
            try:
                if client.get("/health").status_code == 200:
                    return base_url, proc
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.1)
    stop_llama_server(proc)
    raise RuntimeError(f"llama-server not ready after {timeout:.0f} s: {_tail(log_file.name)}")


def stop_llama_server(proc: subprocess.Popen[bytes]) -> None:
    """Stops a server started by `start_llama_server`: SIGTERM, then kill."""
    from tests.engine_proc import stop_process

    stop_process(proc)


def _tail(path: str, n: int = 15) -> str:
    try:
        return " | ".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError as exc:
        return f"(log unreadable: {exc})"
