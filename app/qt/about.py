"""The About box (version, runtime, llama.cpp commit) and the app's icon."""

from __future__ import annotations

from PySide6.QtCore import Qt, qVersion
from PySide6.QtGui import QAction, QGuiApplication, QIcon
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QMainWindow,
    QVBoxLayout,
    QWidget,
)

from app.services.build_info import BuildInfo, assets_dir, build_info
from engine.paths import Paths

ICON_SIZES = (16, 24, 32, 48, 64, 128, 256, 512)


def app_icon() -> QIcon:
    """The Peregrine icon from assets/ (every PNG size, SVG for the rest); empty if absent."""
    folder = assets_dir()
    icon = QIcon()
    for size in ICON_SIZES:
        png = folder / "icons" / f"peregrine-{size}.png"
        if png.is_file():
            icon.addFile(str(png))
    svg = folder / "peregrine.svg"
    if icon.isNull() and svg.is_file():
        icon.addFile(str(svg))
    return icon


class AboutDialog(QDialog):
    """Says which Peregrine and which llama.cpp this is, and where user data lives."""

    def __init__(self, info: BuildInfo, paths: Paths, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("About Peregrine")
        self.rows = {
            "Version": info.version,
            "Runtime": info.runtime,
            "llama.cpp commit": info.llama_cpp_commit or "unknown",
            "llama-cpp-python": info.llama_cpp_python or "not installed",
            "Python / Qt": f"{info.python} / Qt {qVersion()}",
            "Your data": str(paths.data),
        }
        title = QLabel(f"<b>Peregrine {info.version}</b><br>Run large language models locally.")
        header = QHBoxLayout()
        icon = QLabel()
        icon.setPixmap(app_icon().pixmap(64, 64))
        header.addWidget(icon)
        header.addWidget(title, 1)
        form = QFormLayout()
        for name, value in self.rows.items():
            label = QLabel(value)
            label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            label.setWordWrap(True)
            form.addRow(f"{name}:", label)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        copy = buttons.addButton("Copy details", QDialogButtonBox.ButtonRole.ActionRole)
        copy.clicked.connect(self.copy_details)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addLayout(header)
        layout.addLayout(form)
        layout.addWidget(buttons)

    def details(self) -> str:
        return "\n".join(f"{name}: {value}" for name, value in self.rows.items())

    def copy_details(self) -> None:
        """For bug reports: the same facts as plain text on the clipboard."""
        QGuiApplication.clipboard().setText(self.details())


def add_about_action(window: QMainWindow, paths: Paths) -> QAction:
    """Adds Help > About Peregrine to the window's menu bar."""
    menu = window.menuBar().addMenu("&Help")
    action = menu.addAction("&About Peregrine")
    action.setMenuRole(QAction.MenuRole.AboutRole)
    action.triggered.connect(lambda: AboutDialog(build_info(), paths, window).exec())
    return action
