"""Peak memory of the engine when a chat switch saves (or drops) the long chat's KV state.

    .venv/bin/python -m bench.switch_memory            # --cache-ram default and 0

One engine per configuration (`peregrine serve --ctx 4096 --threads 2`): a
~3,500-token chat, then a one-word chat, which makes the engine stash the
first chat's KV state. Reported: the process's peak RSS (VmHWM, Linux) before
and after the switch, and the growth. With the cache on, the growth should be
one copy of the state (it is kept); with `--cache-ram 0`, about nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import httpx2

ROOT = Path(__file__).resolve().parent.parent


def peak_kib(pid: int) -> int:
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["VmHWM"].split()[0])


def measure(extra: list[str]) -> dict[str, int]:
    cmd = [
        sys.executable,
        "-m",
        "app.cli",
        "serve",
        "--port",
        "0",
        "--ctx",
        "4096",
        "--threads",
        "2",
        *extra,
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert proc.stdout is not None
        ready = None
        for line in proc.stdout:
            event = json.loads(line)
            if event["event"] == "ready":
                ready = event
                break
            if event["event"] == "error":
                raise SystemExit(event["message"])
        assert ready is not None
        client = httpx2.Client(
            base_url=f"http://127.0.0.1:{ready['port']}",
            headers={"Authorization": f"Bearer {ready['api_key']}"},
            timeout=300,
        )
        words = " ".join(f"w{i}" for i in range(900))
        long_chat = client.post(
            "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "A: " + words}],
                "max_tokens": 2,
                "temperature": 0,
            },
        ).json()
        before = peak_kib(proc.pid)
        client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        ).raise_for_status()
        after = peak_kib(proc.pid)
        return {
            "prompt_tokens": long_chat["usage"]["prompt_tokens"],
            "peak_before_kib": before,
            "peak_after_kib": after,
            "growth_kib": after - before,
        }
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default="bench/results/switch_memory.json")
    args = parser.parse_args()
    rows = {
        "cache on (default --cache-ram)": measure([]),
        "--cache-ram 0": measure(["--cache-ram", "0"]),
    }
    for name, row in rows.items():
        print(
            f"{name:32} prompt {row['prompt_tokens']} tokens: peak {row['peak_before_kib']} -> "
            f"{row['peak_after_kib']} KiB (+{row['growth_kib']} KiB)"
        )
    Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
