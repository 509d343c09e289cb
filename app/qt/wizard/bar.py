"""A stacked bar of one device's memory: weights, KV cache, compute, overhead, headroom.

It only draws a `DeviceBar` (app/services/models/wizard.py). The bar spans the
device's free memory; a tick marks the budget; what lies past the budget is
drawn in the "bad" colour, and free memory outside the budget is left empty.
"""

from __future__ import annotations

from PySide6.QtCore import QRectF, QSize, Qt
from PySide6.QtGui import QColor, QPainter, QPaintEvent, QPen
from PySide6.QtWidgets import QLabel, QVBoxLayout, QWidget

from app.qt import theme
from app.services.models.wizard import DeviceBar, gib

NAMES = {
    "weights": "Weights",
    "kv": "KV cache",
    "compute": "Compute",
    "overhead": "Overhead",
    "headroom": "Headroom",
}


def colours(p: theme.Palette) -> dict[str, str]:
    """One colour per part of the bar."""
    return {
        "weights": p.accent,
        "kv": "#b07cf0",
        "compute": p.warn,
        "overhead": "#8a93a3",
        "headroom": p.good,
        "over": p.bad,
    }


class _Strip(QWidget):
    """The bar itself."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.bar: DeviceBar | None = None
        self.palette_ = theme.DARK
        self.setMinimumHeight(22)
        self.setMaximumHeight(22)

    def sizeHint(self) -> QSize:
        return QSize(360, 22)

    def paintEvent(self, _event: QPaintEvent) -> None:
        bar = self.bar
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        rect = QRectF(self.rect()).adjusted(0.5, 0.5, -0.5, -0.5)
        p = self.palette_
        painter.setPen(QPen(QColor(p.border), 1))
        painter.setBrush(QColor(p.surface))
        painter.drawRoundedRect(rect, 4, 4)
        if bar is None:
            return
        scale = max(bar.free, bar.used, bar.budget, 1)
        width = rect.width()
        x = rect.left()
        fill = colours(p)
        painter.setPen(Qt.PenStyle.NoPen)
        within = bar.budget
        for name, size in bar.segments():
            if size <= 0:
                continue
            # Parts past the budget are drawn as over-budget instead.
            inside = max(0, min(size, within)) if name != "headroom" else size
            outside = size - inside
            within -= inside
            for part, colour in ((inside, fill[name]), (outside, fill["over"])):
                if part <= 0:
                    continue
                w = width * part / scale
                colour_ = QColor(colour)
                if name == "headroom":
                    colour_.setAlpha(60)
                painter.setBrush(colour_)
                painter.drawRect(QRectF(x, rect.top(), max(w, 1.0), rect.height()))
                x += w
        # The budget's edge.
        bx = rect.left() + width * min(bar.budget, scale) / scale
        painter.setPen(QPen(QColor(p.text), 2))
        painter.drawLine(int(bx), int(rect.top()) - 0, int(bx), int(rect.bottom()))
        painter.end()


class MemoryBar(QWidget):
    """A device's title, its stacked bar and the figures of each part."""

    def __init__(self, palette: theme.Palette, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.bar: DeviceBar | None = None
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(4)
        self.title = QLabel()
        self.title.setObjectName("role")
        self.title.setWordWrap(True)
        lay.addWidget(self.title)
        self.total = QLabel()
        self.total.setObjectName("hint")
        self.total.setWordWrap(True)
        lay.addWidget(self.total)
        self.strip = _Strip()
        lay.addWidget(self.strip)
        self.legend = QLabel()
        self.legend.setObjectName("tag")
        self.legend.setTextFormat(Qt.TextFormat.RichText)
        self.legend.setWordWrap(True)
        lay.addWidget(self.legend)
        self.set_palette(palette)

    def set_palette(self, palette: theme.Palette) -> None:
        self.palette_ = palette
        self.strip.palette_ = palette
        if self.bar is not None:
            self.set_bar(self.bar)

    def set_bar(self, bar: DeviceBar) -> None:
        """Draws `bar`; the figures change at once, the strip repaints in this event-loop turn."""
        self.bar = bar
        self.strip.bar = bar
        self.title.setText(bar.title)
        used = f"Uses {gib(bar.used)} of a {gib(bar.budget)} budget · {gib(bar.free)} free"
        self.total.setText(used + (f" · {gib(bar.over)} over" if bar.over else ""))
        fill = colours(self.palette_)
        parts = []
        for name, size in bar.segments():
            parts.append(
                f'<span style="color:{fill[name]}">■</span>&nbsp;{NAMES[name]} {gib(size)}'
            )
        if bar.over:
            parts.append(f'<span style="color:{fill["over"]}">■</span>&nbsp;Over {gib(bar.over)}')
        self.legend.setText("&nbsp;&nbsp; ".join(parts))
        self.strip.update()

    def figures(self) -> dict[str, int]:
        """The numbers on show, in bytes (what tests compare with `profile --json`)."""
        b = self.bar
        if b is None:
            return {}
        return {
            "weights": b.weights,
            "kv": b.kv,
            "compute": b.compute,
            "overhead": b.overhead,
            "headroom": b.headroom,
            "total": b.used,
            "budget": b.budget,
        }
