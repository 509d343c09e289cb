"""GUI event-loop lag while answers stream, and the cost of saving each token (issue 7).

    QT_QPA_PLATFORM=offscreen .venv/bin/python -m bench.gui_lag            # 3 answers of 128 tokens
    QT_QPA_PLATFORM=offscreen .venv/bin/python -m bench.gui_lag --answers 5 --tokens 256

The real window streams real answers from the real engine (offscreen, throwaway
PEREGRINE_HOME). A 10 ms QTimer on the GUI thread measures the gap between beats;
lag = gap - 10 ms, counted only while an answer streams. Separately it times
ChatStore.append_delta (one committed UPDATE per token, WAL, synchronous=NORMAL).
Target: worst lag well under the 1 s the GUI watchdog test allows.
Writes a table to stdout and the record to bench/results/gui_lag.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--answers", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("bench/results/gui_lag.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    os.environ["PEREGRINE_HOME"] = tempfile.mkdtemp(prefix="peregrine-bench-")

    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication

    from app.qt.main_window import MainWindow
    from app.services.chat.store import ChatStore

    load_before = os.getloadavg()
    app = QApplication([sys.argv[0]])
    window = MainWindow.on_profile(max_tokens=args.tokens)
    store = window.store
    window.show()
    lags: list[float] = []
    streaming = [False]
    last = [time.monotonic()]
    tokens = [0]

    def beat() -> None:
        now = time.monotonic()
        if streaming[0]:
            lags.append(max(0.0, now - last[0] - 0.010))
        last[0] = now

    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(beat)
    timer.start()
    done = [0]
    prompts = [
        "Write a Python class for a bank account with deposit and withdraw, and explain it.",
        "Explain in a few paragraphs how a falcon hunts.",
        "Write a bash script that backs up a folder, with comments.",
    ]

    def ask() -> None:
        chat = window.chat.new_chat()
        assert chat is not None
        prompt = prompts[done[0] % len(prompts)]
        window.chat.submit(prompt)

    def started(_gid: int) -> None:
        last[0] = time.monotonic()
        streaming[0] = True

    def finished(_gid: int) -> None:
        streaming[0] = False
        msg = store.messages(window.chat.current_chat)[-1]  # type: ignore[arg-type]
        tokens[0] += int((msg.meta.get("usage") or {}).get("completion_tokens") or 0)
        done[0] += 1
        if done[0] < args.answers:
            QTimer.singleShot(100, ask)
        else:
            window.shut_down()

    window.chat.answer_started.connect(started)
    window.chat.answer_finished.connect(finished)
    window.supervisor.ready.connect(lambda _r: ask() if done[0] == 0 else None)
    window.closed.connect(app.quit)
    window.start_engine()
    app.exec()

    # Per-token save cost, outside the GUI run.
    bench_store = ChatStore(Path(tempfile.mkdtemp()) / "chats.sqlite3")
    chat = bench_store.create_chat("bench")
    msg = bench_store.add_message(chat.id, "assistant", "", status="streaming")
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        bench_store.append_delta(msg.id, " token")
    append_us = (time.perf_counter() - t0) / n * 1e6
    bench_store.close()
    store.close()

    record: dict[str, Any] = {
        "answers": done[0],
        "completion_tokens": tokens[0],
        "beats_while_streaming": len(lags),
        "lag_ms": {
            "worst": max(lags, default=0.0) * 1000,
            "p99": _pct(lags, 0.99) * 1000,
            "median": (statistics.median(lags) if lags else 0.0) * 1000,
        },
        "append_delta_us": append_us,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    lag = record["lag_ms"]
    print("| answers | tokens | worst lag | p99 lag | median lag | save per token |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {done[0]} | {tokens[0]} | {lag['worst']:.1f} ms | {lag['p99']:.1f} ms"
        f" | {lag['median']:.2f} ms | {append_us:.0f} µs |"
    )
    return 0 if done[0] == args.answers and lag["worst"] < 1000 else 1


if __name__ == "__main__":
    raise SystemExit(main())
