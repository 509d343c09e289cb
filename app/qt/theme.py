"""The app's look: a dark and a light palette, and one stylesheet drawn from either.

`Theme` in settings is "dark", "light" or "system"; `palette_for` resolves
"system" from Qt's colour-scheme hint (dark when the platform does not say).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtGui import QGuiApplication

from app.services.settings import Theme

FONT_FAMILY = "Inter, 'Segoe UI', 'Noto Sans', 'DejaVu Sans', sans-serif"
MONO_FAMILY = "'JetBrains Mono', 'Cascadia Mono', 'DejaVu Sans Mono', monospace"
ASSETS = Path(__file__).parent / "assets"


@dataclass(frozen=True)
class Palette:
    """Every colour the app uses; one accent, everything else greys."""

    name: str
    bg: str
    panel: str
    surface: str
    surface_hi: str
    border: str
    text: str
    muted: str
    accent: str
    accent_hi: str
    on_accent: str
    user_bubble: str
    error_bg: str
    error_border: str
    error_text: str
    good: str
    warn: str
    bad: str
    chevron: str
    # Code blocks stay dark in both themes (as in most editors' docs and chat apps).
    code_bg: str = "#0f1115"
    code_head: str = "#1a1d24"
    code_text: str = "#c9ced8"
    code_muted: str = "#9aa3b2"
    pygments_style: str = "one-dark"


DARK = Palette(
    name="dark",
    bg="#16181d",
    panel="#1d2027",
    surface="#252932",
    surface_hi="#2e333e",
    border="#343a46",
    text="#e6e8ee",
    muted="#9aa3b2",
    accent="#5b9cff",
    accent_hi="#7cb0ff",
    on_accent="#0b1020",
    user_bubble="#2b3a55",
    error_bg="#3a1f24",
    error_border="#a8424f",
    error_text="#ffd9dd",
    good="#58c88a",
    warn="#e0b350",
    bad="#e46a78",
    chevron=(ASSETS / "chevron-down.svg").as_posix(),
)

LIGHT = Palette(
    name="light",
    bg="#f6f7f9",
    panel="#eceef2",
    surface="#ffffff",
    surface_hi="#e2e6ed",
    border="#d3d8e1",
    text="#1b1f27",
    muted="#5b6473",
    accent="#2f6fde",
    accent_hi="#4a84ea",
    on_accent="#ffffff",
    user_bubble="#dbe7fb",
    error_bg="#fdecee",
    error_border="#d8707c",
    error_text="#7a1c27",
    good="#1d8a4f",
    warn="#9a6a00",
    bad="#c23a4b",
    chevron=(ASSETS / "chevron-down-dark.svg").as_posix(),
)


def palette_for(theme: Theme) -> Palette:
    """The palette of a theme setting; "system" follows the platform's colour scheme."""
    if theme == "light":
        return LIGHT
    if theme == "dark":
        return DARK
    app = QGuiApplication.instance()
    if isinstance(app, QGuiApplication) and app.styleHints().colorScheme() == Qt.ColorScheme.Light:
        return LIGHT
    return DARK


def stylesheet(p: Palette) -> str:
    """The one stylesheet of the main window, in palette `p`."""
    return f"""
* {{ font-family: {FONT_FAMILY}; font-size: 10.5pt; color: {p.text}; }}
QMainWindow, QWidget#central, QStackedWidget, QWidget#page {{ background: {p.bg}; }}
QWidget#sidebar {{ background: {p.panel}; border-right: 1px solid {p.border}; }}
QWidget#navRail {{ background: {p.panel}; border-right: 1px solid {p.border}; }}
QToolButton#navButton {{
    color: {p.muted}; background: transparent; border: none; border-radius: 8px;
    padding: 9px 4px; font-size: 10pt; min-width: 60px;
}}
QToolButton#navButton:hover {{ background: {p.surface}; color: {p.text}; }}
QToolButton#navButton:checked {{ background: {p.surface_hi}; color: {p.text}; font-weight: 600; }}
QLabel#brand {{ font-size: 13pt; font-weight: 600; padding: 2px 4px; }}
QLabel#muted, QLabel#hint {{ color: {p.muted}; }}
QLabel#chatTitle, QLabel#pageTitle {{ font-size: 12pt; font-weight: 600; }}
QLabel#sectionTitle {{ font-size: 11pt; font-weight: 600; padding-top: 6px; }}
QLabel#emptyTitle {{ font-size: 18pt; font-weight: 600; }}
QLabel#emptyHint {{ color: {p.muted}; font-size: 11pt; }}
QLabel#code {{
    font-family: {MONO_FAMILY}; font-size: 9.5pt; background: {p.surface};
    border: 1px solid {p.border}; border-radius: 6px; padding: 6px 8px;
}}
QLabel#badge_gpu, QLabel#badge_partial, QLabel#badge_cpu, QLabel#badge_no {{
    border-radius: 4px; padding: 1px 6px; font-size: 9pt;
}}
QWidget#header {{ background: {p.bg}; border-bottom: 1px solid {p.border}; }}
QScrollArea, QWidget#conversation, QWidget#settingsBody {{ background: {p.bg}; border: none; }}
QPushButton {{
    background: {p.surface}; border: 1px solid {p.border}; border-radius: 6px;
    padding: 6px 12px;
}}
QPushButton:hover {{ background: {p.surface_hi}; }}
QPushButton:disabled {{ color: {p.muted}; background: {p.panel}; }}
QPushButton#primary {{
    background: {p.accent}; border: none; color: {p.on_accent}; font-weight: 600;
}}
QPushButton#primary:hover {{ background: {p.accent_hi}; }}
QPushButton#primary:disabled {{ background: {p.surface_hi}; color: {p.muted}; }}
QPushButton#danger {{ background: #c8505e; border: none; color: white; font-weight: 600; }}
QToolButton {{
    background: transparent; border: none; border-radius: 4px; padding: 2px 8px; color: {p.muted};
}}
QToolButton:hover {{ background: {p.surface_hi}; color: {p.text}; }}
QLineEdit, QPlainTextEdit, QComboBox, QSpinBox {{
    background: {p.surface}; border: 1px solid {p.border}; border-radius: 6px; padding: 5px 8px;
    selection-background-color: {p.accent}; selection-color: {p.on_accent};
}}
QLineEdit:focus, QPlainTextEdit:focus, QSpinBox:focus {{ border: 1px solid {p.accent}; }}
QSpinBox QLineEdit, QComboBox QLineEdit {{ padding: 0; border: none; background: transparent; }}
QLineEdit:disabled, QSpinBox:disabled, QComboBox:disabled {{ color: {p.muted}; }}
QComboBox::drop-down {{ border: none; width: 22px; }}
QComboBox::down-arrow {{ image: url({p.chevron}); width: 12px; height: 12px; margin-right: 8px; }}
QComboBox QAbstractItemView {{
    background: {p.surface}; border: 1px solid {p.border};
    selection-background-color: {p.surface_hi}; selection-color: {p.text};
}}
QCheckBox::indicator, QRadioButton::indicator {{ width: 16px; height: 16px; }}
QCheckBox::indicator {{ border: 1px solid {p.border}; border-radius: 4px; background: {p.surface}; }}
QCheckBox::indicator:checked {{ background: {p.accent}; border: 1px solid {p.accent}; }}
QPlainTextEdit#composer {{ font-size: 11pt; padding: 8px 10px; }}
QListWidget {{ background: transparent; border: none; outline: none; }}
QListWidget::item {{ padding: 8px 10px; border-radius: 6px; margin: 1px 0; }}
QListWidget::item:hover {{ background: {p.surface}; }}
QListWidget::item:selected {{ background: {p.surface_hi}; color: {p.text}; }}
QListWidget#folderList {{
    background: {p.surface}; border: 1px solid {p.border}; border-radius: 6px;
}}
QListWidget#folderList::item {{ padding: 4px 8px; }}
QTableView {{
    background: {p.surface}; alternate-background-color: {p.panel}; border: 1px solid {p.border};
    border-radius: 8px; gridline-color: transparent; outline: none;
    selection-background-color: {p.surface_hi}; selection-color: {p.text};
}}
QTableView::item {{ padding: 4px 8px; border: none; }}
QHeaderView {{ background: transparent; }}
QHeaderView::section {{
    background: {p.panel}; color: {p.muted}; border: none; border-bottom: 1px solid {p.border};
    padding: 6px 8px; font-size: 9.5pt; font-weight: 600;
}}
QTabWidget::pane {{ border: none; }}
QTabBar::tab {{
    background: transparent; color: {p.muted}; padding: 8px 16px; border: none;
    border-bottom: 2px solid transparent; font-weight: 600;
}}
QTabBar::tab:selected {{ color: {p.text}; border-bottom: 2px solid {p.accent}; }}
QTabBar::tab:hover {{ color: {p.text}; }}
QFrame#bubble_user {{ background: {p.user_bubble}; border-radius: 10px; }}
QFrame#bubble_assistant {{
    background: {p.panel}; border: 1px solid {p.border}; border-radius: 10px;
}}
QFrame#bubble_tool {{ background: transparent; }}
QFrame#toolBlock {{ background: {p.surface}; border: 1px solid {p.border}; border-radius: 8px; }}
QFrame#toolBlock QLabel {{ background: transparent; }}
QPushButton#toolHeader {{
    font-family: {MONO_FAMILY}; font-size: 9.5pt; color: {p.text}; text-align: left;
    padding: 4px 6px; border: 1px solid transparent; background: transparent;
}}
QPushButton#toolHeader:hover, QPushButton#toolHeader:checked:hover {{
    background: {p.surface_hi};
}}
QPushButton#toolHeader:checked {{ background: transparent; }}
QPushButton#toolHeader:focus {{ border: 1px solid {p.accent}; }}
QLabel#toolWaiting {{ color: {p.warn}; font-size: 9pt; }}
QPlainTextEdit#toolDetails, QPlainTextEdit#toolsEditor, QPlainTextEdit#toolResultInput {{
    font-family: {MONO_FAMILY}; font-size: 9.5pt;
}}
QPlainTextEdit#toolDetails {{ background: {p.bg}; }}
QPushButton#toolsButton[active="true"] {{ border: 1px solid {p.accent}; color: {p.accent_hi}; }}
QFrame#card {{ background: {p.panel}; border: 1px solid {p.border}; border-radius: 10px; }}
QFrame#card QLabel {{ background: transparent; }}
QFrame#notice {{ background: {p.panel}; border: 1px solid {p.warn}; border-radius: 8px; }}
QFrame#notice QLabel {{ background: transparent; }}
QLabel#problem {{ color: {p.bad}; }}
QLabel#rowTitle {{ font-size: 11pt; font-weight: 600; }}
QLabel#role {{ font-weight: 600; }}
QLabel#tag {{ color: {p.muted}; font-size: 9pt; }}
QTextBrowser {{ background: transparent; border: none; }}
QFrame#errorPanel {{
    background: {p.error_bg}; border: 1px solid {p.error_border}; border-radius: 8px;
    margin: 10px 0 4px 0;
}}
QFrame#errorPanel QLabel {{ color: {p.error_text}; }}
QPlainTextEdit#engineLog {{
    font-family: {MONO_FAMILY}; font-size: 9pt; background: {p.code_bg}; color: {p.code_text};
}}
QStatusBar {{ background: {p.panel}; border-top: 1px solid {p.border}; }}
QStatusBar QLabel {{ color: {p.muted}; padding: 0 8px; font-size: 9.5pt; }}
QStatusBar::item {{ border: none; }}
QProgressBar {{
    background: {p.surface_hi}; border: none; border-radius: 4px; max-height: 8px;
    min-width: 120px;
}}
QProgressBar::chunk {{ background: {p.accent}; border-radius: 4px; }}
QScrollBar:vertical {{ background: transparent; width: 10px; margin: 0; }}
QScrollBar::handle:vertical {{ background: {p.surface_hi}; border-radius: 5px; min-height: 30px; }}
QScrollBar::add-line:vertical, QScrollBar::sub-line:vertical {{ height: 0; }}
QMenu {{ background: {p.surface}; border: 1px solid {p.border}; padding: 4px; }}
QMenu::item {{ padding: 6px 18px; border-radius: 4px; }}
QMenu::item:selected {{ background: {p.surface_hi}; }}
QDialog {{ background: {p.panel}; }}
QToolTip {{ background: {p.surface}; color: {p.text}; border: 1px solid {p.border}; }}
"""


def badge_style(p: Palette, level: str) -> str:
    """Inline colours of a fit badge (gpu, partial, cpu, no)."""
    colour = {"gpu": p.good, "partial": p.warn, "cpu": p.accent, "no": p.bad}.get(level, p.muted)
    return f"color: {colour}; border: 1px solid {colour};"
