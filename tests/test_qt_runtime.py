"""The Qt binding itself: defects in a PySide6 release that would crash the app."""

from __future__ import annotations

import sys

from PySide6.QtCore import QObject, Signal


class _Emitter(QObject):
    value = Signal(object)
    pair = Signal(int, str)


def test_emitting_a_signal_keeps_every_reference(qapp: object) -> None:
    # PySide6 6.12.0 released one reference to True per emit(): after a few thousand
    # signals (a streamed answer emits one per delta) the interpreter aborted with
    # "bool_dealloc". Immortal objects (Python 3.12+) hide such a leak; 3.11 shows it.
    emitter = _Emitter()
    seen: list[object] = []
    emitter.value.connect(seen.append)
    emitter.pair.connect(lambda n, s: seen.append((n, s)))
    unconnected = _Emitter()
    before = {
        name: sys.getrefcount(obj)
        for name, obj in (("True", True), ("False", False), ("None", None))
    }
    for i in range(200):
        emitter.value.emit(None)
        emitter.pair.emit(i, "x")
        unconnected.value.emit(i)
    after = {
        name: sys.getrefcount(obj)
        for name, obj in (("True", True), ("False", False), ("None", None))
    }
    assert len(seen) == 400
    for name in before:
        # `seen` holds 200 references to None; nothing may be lost.
        assert after[name] >= before[name], f"{name}: {before[name]} -> {after[name]} references"
