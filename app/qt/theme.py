"""The app's one look: a palette and a single stylesheet."""

from __future__ import annotations

from pathlib import Path

# A calm dark theme; one accent colour, everything else greys.
BG = "#16181d"
PANEL = "#1d2027"
SURFACE = "#252932"
SURFACE_HI = "#2e333e"
BORDER = "#343a46"
TEXT = "#e6e8ee"
MUTED = "#9aa3b2"
ACCENT = "#5b9cff"
ACCENT_HI = "#7cb0ff"
USER_BUBBLE = "#2b3a55"
ERROR_BG = "#3a1f24"
ERROR_BORDER = "#a8424f"
CODE_BG = "#0f1115"
CODE_HEAD = "#1a1d24"

FONT_FAMILY = "Inter, 'Segoe UI', 'Noto Sans', 'DejaVu Sans', sans-serif"
MONO_FAMILY = "'JetBrains Mono', 'Cascadia Mono', 'DejaVu Sans Mono', monospace"
PYGMENTS_STYLE = "one-dark"
CHEVRON = (Path(__file__).parent / "assets" / "chevron-down.svg").as_posix()

STYLESHEET = f"""
* {{ font-family: {FONT_FAMILY}; font-size: 10.5pt; color: {TEXT}; }}
QMainWindow, QWidget#central {{ background: {BG}; }}
QWidget#sidebar {{ background: {PANEL}; border-right: 1px solid {BORDER}; }}
QLabel#brand {{ font-size: 13pt; font-weight: 600; padding: 2px 4px; }}
QLabel#muted, QLabel#hint {{ color: {MUTED}; }}
QLabel#chatTitle {{ font-size: 12pt; font-weight: 600; }}
QLabel#emptyTitle {{ font-size: 18pt; font-weight: 600; }}
QLabel#emptyHint {{ color: {MUTED}; font-size: 11pt; }}
QWidget#header {{ background: {BG}; border-bottom: 1px solid {BORDER}; }}
QScrollArea, QWidget#conversation {{ background: {BG}; border: none; }}
QPushButton {{
    background: {SURFACE}; border: 1px solid {BORDER}; border-radius: 6px;
    padding: 6px 12px;
}}
QPushButton:hover {{ background: {SURFACE_HI}; }}
QPushButton:disabled {{ color: {MUTED}; background: {PANEL}; }}
QPushButton#primary {{ background: {ACCENT}; border: none; color: #0b1020; font-weight: 600; }}
QPushButton#primary:hover {{ background: {ACCENT_HI}; }}
QPushButton#primary:disabled {{ background: {SURFACE_HI}; color: {MUTED}; }}
QPushButton#danger {{ background: #c8505e; border: none; color: white; font-weight: 600; }}
QToolButton {{
    background: transparent; border: none; border-radius: 4px; padding: 2px 8px; color: {MUTED};
}}
QToolButton:hover {{ background: {SURFACE_HI}; color: {TEXT}; }}
QLineEdit, QPlainTextEdit, QComboBox {{
    background: {SURFACE}; border: 1px solid {BORDER}; border-radius: 6px; padding: 6px 8px;
    selection-background-color: {ACCENT};
}}
QLineEdit:focus, QPlainTextEdit:focus {{ border: 1px solid {ACCENT}; }}
QComboBox::drop-down {{ border: none; width: 22px; }}
QComboBox::down-arrow {{ image: url({CHEVRON}); width: 12px; height: 12px; margin-right: 8px; }}
QComboBox QAbstractItemView {{ background: {SURFACE}; border: 1px solid {BORDER}; }}
QPlainTextEdit#composer {{ font-size: 11pt; padding: 8px 10px; }}
QListWidget {{ background: transparent; border: none; outline: none; }}
QListWidget::item {{ padding: 8px 10px; border-radius: 6px; margin: 1px 0; }}
QListWidget::item:hover {{ background: {SURFACE}; }}
QListWidget::item:selected {{ background: {SURFACE_HI}; color: {TEXT}; }}
QFrame#bubble_user {{ background: {USER_BUBBLE}; border-radius: 10px; }}
QFrame#bubble_assistant {{ background: {PANEL}; border: 1px solid {BORDER}; border-radius: 10px; }}
QLabel#role {{ font-weight: 600; }}
QLabel#tag {{ color: {MUTED}; font-size: 9pt; }}
QTextBrowser {{ background: transparent; border: none; }}
QFrame#errorPanel {{
    background: {ERROR_BG}; border: 1px solid {ERROR_BORDER}; border-radius: 8px;
}}
QFrame#errorPanel QLabel {{ color: #ffd9dd; }}
QPlainTextEdit#engineLog {{
    font-family: {MONO_FAMILY}; font-size: 9pt; background: {CODE_BG}; color: #c9ced8;
}}
QStatusBar {{ background: {PANEL}; border-top: 1px solid {BORDER}; }}
QStatusBar QLabel {{ color: {MUTED}; padding: 0 8px; font-size: 9.5pt; }}
QStatusBar::item {{ border: none; }}
QProgressBar {{
    background: {SURFACE}; border: none; border-radius: 4px; max-height: 8px; min-width: 120px;
}}
QProgressBar::chunk {{ background: {ACCENT}; border-radius: 4px; }}
QScrollBar:vertical {{ background: transparent; width: 10px; margin: 0; }}
QScrollBar::handle:vertical {{ background: {SURFACE_HI}; border-radius: 5px; min-height: 30px; }}
QScrollBar::add-line:vertical, QScrollBar::sub-line:vertical {{ height: 0; }}
QMenu {{ background: {SURFACE}; border: 1px solid {BORDER}; padding: 4px; }}
QMenu::item {{ padding: 6px 18px; border-radius: 4px; }}
QMenu::item:selected {{ background: {SURFACE_HI}; }}
QDialog {{ background: {PANEL}; }}
"""
