"""Starts the real engine process (`peregrine serve`) for tests and benchmarks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx2 as httpx


@dataclass
class EngineProc:
    proc: subprocess.Popen[str]
    ready: dict[str, Any]
    events: list[dict[str, Any]]
    stderr_lines: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://{self.ready['host']}:{self.ready['port']}"

    @property
    def key(self) -> str:
        return str(self.ready["api_key"])

    def client(self, timeout: float = 120.0) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=timeout,
        )

    def chat(self, messages: list[dict[str, str]], **fields: Any) -> dict[str, Any]:
        with self.client() as c:
            r = c.post("/v1/chat/completions", json={"messages": messages, **fields})
            r.raise_for_status()
            return dict(r.json())


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "app.cli", "serve", *args]


def read_events(proc: subprocess.Popen[str], timeout: float) -> list[dict[str, Any]]:
    """Reads start-up events until `ready` or `error` (or EOF / timeout)."""
    events: list[dict[str, Any]] = []
    done = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            events.append(json.loads(line))
            if events[-1]["event"] in ("ready", "error"):
                break
        done.set()

    threading.Thread(target=reader, daemon=True).start()
    done.wait(timeout)
    return events


@contextmanager
def running_engine(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120.0
) -> Iterator[EngineProc]:
    """A real engine on a free loopback port, stopped (SIGTERM, then kill) afterwards."""
    proc = subprocess.Popen(
        serve_command("--port", "0", *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    stderr_lines: list[str] = []

    def drain() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            stderr_lines.append(line)

    threading.Thread(target=drain, daemon=True).start()
    try:
        events = read_events(proc, timeout)
        if not events or events[-1]["event"] != "ready":
            raise RuntimeError(f"engine did not start: {events} {''.join(stderr_lines[-20:])}")
        yield EngineProc(proc, events[-1], events, stderr_lines)
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL if the process is still there after 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def wait_for(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Polls `condition` until it holds or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()
