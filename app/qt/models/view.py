"""The Models view: a page title and one tab per part (Library first)."""

from __future__ import annotations

from PySide6.QtWidgets import QLabel, QTabWidget, QVBoxLayout, QWidget

from app.qt import theme
from app.qt.models.library_tab import LibraryTab


class ModelsView(QWidget):
    """Tabs of the Models page; `add_tab` is where other parts (finding models online) go."""

    def __init__(self, palette: theme.Palette, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("page")
        lay = QVBoxLayout(self)
        lay.setContentsMargins(28, 18, 28, 16)
        lay.setSpacing(8)
        title = QLabel("Models")
        title.setObjectName("pageTitle")
        lay.addWidget(title)
        self.banner = QVBoxLayout()  # where the window puts the error banner on this page
        self.banner.setContentsMargins(0, 0, 0, 0)
        lay.addLayout(self.banner)
        self.tabs = QTabWidget()
        self.tabs.setDocumentMode(True)
        self.tabs.tabBar().setDrawBase(False)
        self.library = LibraryTab(palette)
        self.tabs.addTab(self.library, "Library")
        lay.addWidget(self.tabs, 1)

    def add_tab(self, widget: QWidget, title: str) -> int:
        return self.tabs.addTab(widget, title)
