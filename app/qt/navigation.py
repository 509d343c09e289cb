"""The navigation rail: Chat, Models, Settings; by mouse or by Ctrl+1/2/3."""

from __future__ import annotations

from enum import IntEnum

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QButtonGroup, QToolButton, QVBoxLayout, QWidget


class Page(IntEnum):
    """The app's views, in rail order (the index is their place in the stack)."""

    CHAT = 0
    MODELS = 1
    SETTINGS = 2


LABELS = {Page.CHAT: "Chat", Page.MODELS: "Models", Page.SETTINGS: "Settings"}


class NavRail(QWidget):
    """A column of page buttons; exactly one is checked."""

    chosen = Signal(object)  # Page

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("navRail")
        self.setAttribute(Qt.WidgetAttribute.WA_StyledBackground, True)
        self.setFixedWidth(84)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(8, 12, 8, 12)
        lay.setSpacing(6)
        self.group = QButtonGroup(self)
        self.group.setExclusive(True)
        self.buttons: dict[Page, QToolButton] = {}
        for page in Page:
            button = QToolButton()
            button.setObjectName("navButton")
            button.setText(LABELS[page])
            button.setToolTip(f"{LABELS[page]} (Ctrl+{page.value + 1})")
            button.setCheckable(True)
            button.setCursor(Qt.CursorShape.PointingHandCursor)
            button.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextOnly)
            button.clicked.connect(lambda _c=False, p=page: self.chosen.emit(p))
            self.group.addButton(button)
            self.buttons[page] = button
            lay.addWidget(button)
        lay.addStretch(1)
        self.buttons[Page.CHAT].setChecked(True)

    def show_page(self, page: Page) -> None:
        self.buttons[page].setChecked(True)
