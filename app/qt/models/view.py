"""The Models view: a page title and one tab per part: Library, Discover, Downloads."""

from __future__ import annotations

from PySide6.QtWidgets import QLabel, QTabWidget, QVBoxLayout, QWidget

from app.qt import theme
from app.qt.models.discover_tab import DiscoverTab
from app.qt.models.downloads_tab import DownloadsTab
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
        self.discover = DiscoverTab(palette)
        self.tabs.addTab(self.discover, "Discover")
        self.downloads = DownloadsTab()
        self.tabs.addTab(self.downloads, "Downloads")
        lay.addWidget(self.tabs, 1)

    def add_tab(self, widget: QWidget, title: str) -> int:
        return self.tabs.addTab(widget, title)

    def show_tab(self, widget: QWidget) -> None:
        self.tabs.setCurrentWidget(widget)

    def set_downloads_count(self, active: int) -> None:
        """The Downloads tab's title carries how many are not finished."""
        index = self.tabs.indexOf(self.downloads)
        self.tabs.setTabText(index, f"Downloads ({active})" if active else "Downloads")
