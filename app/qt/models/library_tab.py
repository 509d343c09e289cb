"""The Library tab: every model on this computer, what it is, whether it fits, and its actions."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from PySide6.QtCore import (
    QAbstractTableModel,
    QModelIndex,
    QPersistentModelIndex,
    QPoint,
    QSortFilterProxyModel,
    Qt,
    Signal,
)
from PySide6.QtGui import QBrush, QColor, QFont
from PySide6.QtWidgets import (
    QAbstractItemView,
    QFrame,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QMenu,
    QProgressBar,
    QPushButton,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from app.qt import theme
from app.services.models.downloads import format_bytes
from app.services.models.library import SOURCE_NAMES, ModelEntry

COLUMNS = ("Model", "Architecture", "Params", "Quant", "Size", "Context", "Fits", "MTP", "Source")
FIT_WORDS = {"gpu": "GPU", "partial": "GPU + CPU", "cpu": "CPU", "no": "Too big"}
SOURCE_SHORT = {
    "peregrine": "Peregrine",
    "builtin": "Built-in",
    "huggingface": "HF cache",
    "lmstudio": "LM Studio",
    "gpt4all": "GPT4All",
    "ollama": "Ollama",
}
Index = QModelIndex | QPersistentModelIndex


def params_text(n: int | None) -> str:
    if not n:
        return "—"
    if n >= 1e9:
        return f"{n / 1e9:.1f} B"
    return f"{n / 1e6:.0f} M"


def context_text(n: int | None) -> str:
    if not n:
        return "—"
    return f"{n // 1024} K" if n >= 1024 and n % 1024 == 0 else f"{n:,}"


class LibraryModel(QAbstractTableModel):
    """Library entries as table rows; the model in use is marked."""

    def __init__(self, palette: theme.Palette, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.entries: list[ModelEntry] = []
        self.current: Path | None = None
        self.loading: Path | None = None
        self.palette = palette

    def set_entries(self, entries: list[ModelEntry]) -> None:
        self.beginResetModel()
        self.entries = list(entries)
        self.endResetModel()

    def set_marks(self, current: Path | None, loading: Path | None) -> None:
        self.current, self.loading = current, loading
        if self.entries:
            self.dataChanged.emit(self.index(0, 0), self.index(len(self.entries) - 1, 0))

    def rowCount(self, parent: Index = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(self.entries)

    def columnCount(self, parent: Index = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(COLUMNS)

    def headerData(
        self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole
    ) -> Any:
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.DisplayRole:
            return COLUMNS[section]
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.TextAlignmentRole:
            return int(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter)
        return None

    def data(self, index: Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid():
            return None
        entry = self.entries[index.row()]
        column = COLUMNS[index.column()]
        if role == Qt.ItemDataRole.DisplayRole:
            return self._text(entry, column)
        if role == Qt.ItemDataRole.UserRole:
            return self._sort_key(entry, column)
        if role == Qt.ItemDataRole.ToolTipRole:
            return self._tooltip(entry, column)
        if role == Qt.ItemDataRole.ForegroundRole:
            return self._colour(entry, column)
        if role == Qt.ItemDataRole.FontRole and column == "Model" and entry.path == self.current:
            font = QFont()
            font.setBold(True)
            return font
        if role == Qt.ItemDataRole.TextAlignmentRole and column in ("Params", "Size", "Context"):
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        return None

    def _text(self, e: ModelEntry, column: str) -> str:
        if column == "Model":
            mark = "● " if e.path == self.current else "◌ " if e.path == self.loading else ""
            return mark + e.path.stem
        if column == "Source":
            return SOURCE_SHORT.get(e.source, e.source)
        if column == "Size":
            return format_bytes(e.size) if e.size else "—"
        if not e.valid:
            return "unreadable" if column == "Architecture" else ""
        if column == "Architecture":
            return e.architecture or "—"
        if column == "Params":
            return params_text(e.n_params)
        if column == "Quant":
            return e.quant or "—"
        if column == "Context":
            return context_text(e.context_length)
        if column == "Fits":
            return FIT_WORDS.get(e.fit.level, e.fit.level) if e.fit is not None else "—"
        if column == "MTP":
            return f"{e.mtp_layers} head{'s' if e.mtp_layers != 1 else ''}" if e.mtp_layers else "—"
        return ""

    def _sort_key(self, e: ModelEntry, column: str) -> Any:
        if column == "Params":
            return e.n_params or 0
        if column == "Size":
            return e.size
        if column == "Context":
            return e.context_length or 0
        if column == "MTP":
            return e.mtp_layers
        if column == "Fits":
            order = {"gpu": 0, "partial": 1, "cpu": 2, "no": 3}
            return order.get(e.fit.level, 4) if e.fit is not None else 5
        return self._text(e, column).lstrip("●◌ ").lower()

    def _tooltip(self, e: ModelEntry, column: str) -> str:
        if not e.valid:
            return f"{e.path}\nCannot be read: {e.error}"
        if column == "Fits" and e.fit is not None:
            return e.fit.summary
        if column == "Source":
            ro = " (read-only: Peregrine never changes it)" if e.read_only else ""
            return f"{SOURCE_NAMES.get(e.source, e.source)}{ro}"
        if column == "MTP":
            return "Multi-token prediction heads in the file" if e.mtp_layers else ""
        return str(e.path)

    def _colour(self, e: ModelEntry, column: str) -> QBrush | None:
        p = self.palette
        if not e.valid:
            return QBrush(QColor(p.bad)) if column == "Architecture" else QBrush(QColor(p.muted))
        if column == "Fits" and e.fit is not None:
            colour = {"gpu": p.good, "partial": p.warn, "cpu": p.accent, "no": p.bad}
            return QBrush(QColor(colour.get(e.fit.level, p.muted)))
        if column == "Model" and e.path == self.current:
            return QBrush(QColor(p.accent))
        if column in ("Source", "MTP", "Architecture"):
            return QBrush(QColor(p.muted))
        return None


class _Sorter(QSortFilterProxyModel):
    def lessThan(self, left: Index, right: Index) -> bool:
        a = left.data(Qt.ItemDataRole.UserRole)
        b = right.data(Qt.ItemDataRole.UserRole)
        try:
            return bool(a < b)
        except TypeError:
            return str(a) < str(b)


class LibraryTab(QWidget):
    """Draws the library and emits what the user asked for; the controller acts."""

    refresh_requested = Signal()
    import_requested = Signal()
    load_requested = Signal(object)  # ModelEntry
    unload_requested = Signal()
    delete_requested = Signal(object)  # ModelEntry
    show_requested = Signal(object)  # ModelEntry

    def __init__(self, palette: theme.Palette, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("page")
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 12, 0, 0)
        lay.setSpacing(10)
        top = QHBoxLayout()
        top.setSpacing(8)
        self.summary = QLabel("Looking for models…")
        self.summary.setObjectName("hint")
        top.addWidget(self.summary, 1)
        self.filter = QLineEdit()
        self.filter.setPlaceholderText("Filter models")
        self.filter.setClearButtonEnabled(True)
        self.filter.setFixedWidth(220)
        top.addWidget(self.filter)
        self.refresh_button = QPushButton("Refresh")
        self.refresh_button.clicked.connect(self.refresh_requested)
        top.addWidget(self.refresh_button)
        self.import_button = QPushButton("Import GGUF…")
        self.import_button.setObjectName("primary")
        self.import_button.setToolTip("Copy a .gguf file into Peregrine's models folder")
        self.import_button.clicked.connect(self.import_requested)
        top.addWidget(self.import_button)
        lay.addLayout(top)

        self.model = LibraryModel(palette, self)
        self.proxy = _Sorter(self)
        self.proxy.setSourceModel(self.model)
        self.proxy.setFilterCaseSensitivity(Qt.CaseSensitivity.CaseInsensitive)
        self.proxy.setFilterKeyColumn(-1)
        self.filter.textChanged.connect(self.proxy.setFilterFixedString)
        self.table = QTableView()
        self.table.setModel(self.proxy)
        self.table.setSortingEnabled(True)
        self.table.sortByColumn(-1, Qt.SortOrder.AscendingOrder)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setAlternatingRowColors(True)
        self.table.setShowGrid(False)
        self.table.setWordWrap(False)
        self.table.verticalHeader().hide()
        self.table.verticalHeader().setDefaultSectionSize(34)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        header.setHighlightSections(False)
        self.table.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.table.customContextMenuRequested.connect(self._menu)
        self.table.doubleClicked.connect(lambda _i: self._emit_load())
        self.table.selectionModel().selectionChanged.connect(lambda *_a: self._draw_actions())
        lay.addWidget(self.table, 1)

        self.empty = QLabel(
            "No models found yet.\nImport a .gguf file, or drop one anywhere on this window."
        )
        self.empty.setObjectName("emptyHint")
        self.empty.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.empty.hide()
        lay.addWidget(self.empty, 1)

        lay.addWidget(self._action_bar())
        self._extra: list[tuple[QPushButton, Callable[[ModelEntry], None]]] = []
        self._draw_actions()

    def _action_bar(self) -> QFrame:
        bar = QFrame()
        bar.setObjectName("card")
        row = QHBoxLayout(bar)
        row.setContentsMargins(14, 10, 14, 10)
        row.setSpacing(8)
        text = QVBoxLayout()
        text.setSpacing(2)
        self.selected_name = QLabel("Select a model")
        self.selected_name.setObjectName("sectionTitle")
        self.selected_detail = QLabel("")
        self.selected_detail.setObjectName("hint")
        self.selected_detail.setWordWrap(True)
        text.addWidget(self.selected_name)
        text.addWidget(self.selected_detail)
        row.addLayout(text, 1)
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.progress.setTextVisible(False)
        self.progress.setFixedWidth(140)
        self.progress.hide()
        row.addWidget(self.progress)
        self.load_button = QPushButton("Load")
        self.load_button.setObjectName("primary")
        self.load_button.clicked.connect(self._emit_load)
        self.unload_button = QPushButton("Unload")
        self.unload_button.clicked.connect(self.unload_requested)
        self.show_button = QPushButton("Show file")
        self.show_button.clicked.connect(lambda: self._emit(self.show_requested))
        self.delete_button = QPushButton("Delete…")
        self.delete_button.clicked.connect(lambda: self._emit(self.delete_requested))
        self._buttons_row = row
        for button in (self.load_button, self.unload_button, self.show_button, self.delete_button):
            row.addWidget(button)
        return bar

    # what other parts plug in --------------------------------------------------

    def add_action(self, text: str, act: Callable[[ModelEntry], None]) -> QPushButton:
        """A per-model action beside Load (e.g. "Load with settings…"); enabled for valid models."""
        button = QPushButton(text)
        button.clicked.connect(lambda: self._act(act))
        self._buttons_row.insertWidget(self._buttons_row.indexOf(self.unload_button), button)
        self._extra.append((button, act))
        self._draw_actions()
        return button

    def _act(self, act: Callable[[ModelEntry], None]) -> None:
        entry = self.selected()
        if entry is not None:
            act(entry)

    # drawing --------------------------------------------------------------------

    def set_palette(self, palette: theme.Palette) -> None:
        self.model.palette = palette
        self.table.viewport().update()

    def set_entries(self, entries: list[ModelEntry]) -> None:
        chosen = self.selected()
        self.model.set_entries(entries)
        own = [e for e in entries if not e.read_only]
        others = len(entries) - len(own) - sum(e.source == "builtin" for e in entries)
        total = sum(e.size for e in own)
        parts = [f"{len(entries)} model{'s' if len(entries) != 1 else ''}"]
        if own:
            parts.append(f"{format_bytes(total)} in Peregrine's folder")
        if others:
            parts.append(f"{others} from other apps (read-only)")
        self.summary.setText(" · ".join(parts))
        self.table.setVisible(bool(entries))
        self.empty.setVisible(not entries)
        if chosen is not None:
            self.select(chosen.path)
        elif entries:
            self.table.selectRow(0)
        self._draw_actions()

    def set_marks(self, current: Path | None, loading: Path | None, progress: float | None) -> None:
        self.model.set_marks(current, loading)
        if progress is None:
            self.progress.hide()
        else:
            self.progress.setValue(int(progress * 100))
            self.progress.show()
        self._draw_actions()

    def set_busy(self, text: str | None) -> None:
        """A line about work in progress (an import), or None."""
        if text:
            self.summary.setText(text)

    def select(self, path: Path) -> bool:
        for row in range(self.proxy.rowCount()):
            source = self.proxy.mapToSource(self.proxy.index(row, 0))
            if self.model.entries[source.row()].path == path:
                self.table.selectRow(row)
                return True
        return False

    def selected(self) -> ModelEntry | None:
        rows = self.table.selectionModel().selectedRows() if self.table.selectionModel() else []
        if not rows:
            return None
        source = self.proxy.mapToSource(rows[0])
        if not 0 <= source.row() < len(self.model.entries):
            return None
        return self.model.entries[source.row()]

    def _draw_actions(self) -> None:
        entry = self.selected()
        loading = self.model.loading is not None
        current = entry is not None and entry.path == self.model.current
        if entry is None:
            self.selected_name.setText("Select a model")
            self.selected_detail.setText("")
        else:
            self.selected_name.setText(entry.path.stem)
            self.selected_detail.setText(self._detail(entry, current))
        valid = entry is not None and entry.valid
        self.load_button.setEnabled(valid and not loading and not current)
        self.load_button.setText("In use" if current else "Load")
        self.unload_button.setEnabled(current and not loading)
        self.show_button.setEnabled(entry is not None)
        own = entry is not None and not entry.read_only
        self.delete_button.setEnabled(own and not current)
        self.delete_button.setToolTip(
            "Only Peregrine's own models can be deleted; other apps' files stay untouched"
            if entry is not None and entry.read_only
            else "Unload it first"
            if current
            else "Delete the file from Peregrine's models folder"
        )
        for button, _act in self._extra:
            button.setEnabled(valid and not loading)

    def _detail(self, e: ModelEntry, current: bool) -> str:
        if not e.valid:
            return f"Cannot be read: {e.error}"
        bits = [
            e.architecture or "?",
            params_text(e.n_params),
            e.quant or "?",
            format_bytes(e.size),
            f"trained for {context_text(e.context_length)} tokens",
        ]
        if e.mtp_layers:
            bits.append(f"{e.mtp_layers} MTP head{'s' if e.mtp_layers != 1 else ''}")
        where = SOURCE_NAMES.get(e.source, e.source)
        line = " · ".join(bits) + f"  —  {where}{' (read-only)' if e.read_only else ''}"
        if e.fit is not None:
            line += f"\n{e.fit.summary}"
        if current:
            line = "In use · " + line
        return line

    # intents --------------------------------------------------------------------

    def _emit(self, signal: Any) -> None:
        entry = self.selected()
        if entry is not None:
            signal.emit(entry)

    def _emit_load(self) -> None:
        entry = self.selected()
        if entry is not None and entry.valid and self.load_button.isEnabled():
            self.load_requested.emit(entry)

    def _menu(self, pos: QPoint) -> None:
        index = self.table.indexAt(pos)
        if not index.isValid():
            return
        self.table.selectRow(index.row())
        entry = self.selected()
        if entry is None:
            return
        menu = QMenu(self)
        for button in (self.load_button, self.unload_button, self.show_button, self.delete_button):
            action = menu.addAction(button.text(), button.click)
            action.setEnabled(button.isEnabled())
        menu.popup(self.table.viewport().mapToGlobal(pos))
