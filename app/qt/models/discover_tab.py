"""The Discover tab: search Hugging Face, open a repo, see which quant fits, download it.

Widgets only draw and emit intents; `DiscoverController` searches, lists and
reads headers off the GUI thread and hands back plain data.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from PySide6.QtCore import (
    QAbstractTableModel,
    QModelIndex,
    QPersistentModelIndex,
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
    QPushButton,
    QSplitter,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from app.qt import theme
from app.services.models.downloads import format_bytes
from app.services.models.hub import QuantOption, RepoListing, SearchResult

Index = QModelIndex | QPersistentModelIndex
RESULT_COLUMNS = ("Model", "Downloads", "Likes", "Updated")
QUANT_COLUMNS = ("Quant", "Size", "Fits this machine", "Notes")
FIT_WORDS = {
    "gpu": "Fits in GPU",
    "partial": "GPU + CPU offload",
    "cpu": "CPU only",
    "no": "Too big",
}
FIT_ORDER = {"gpu": 0, "partial": 1, "cpu": 2, "no": 3}


def count_text(n: int) -> str:
    """1234567 -> "1.2 M", as hubs show counts."""
    if n >= 1_000_000:
        return f"{n / 1_000_000:.1f} M"
    if n >= 10_000:
        return f"{n / 1000:.0f} k"
    if n >= 1000:
        return f"{n / 1000:.1f} k"
    return str(n)


def age_text(when: datetime | None, now: datetime | None = None) -> str:
    """How long ago, in the largest unit that fits ("3 days ago", "2 months ago")."""
    if when is None:
        return "—"
    seconds = ((now or datetime.now(UTC)) - when).total_seconds()
    if seconds < 0:
        return when.date().isoformat()
    for unit, size in (("year", 365 * 86400), ("month", 30 * 86400), ("day", 86400)):
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n != 1 else ''} ago"
    hours = int(seconds // 3600)
    return f"{hours} hour{'s' if hours != 1 else ''} ago" if hours else "just now"


def notes_of(opt: QuantOption) -> list[str]:
    """The marks of one quant: the planner's pick, QAT, MTP, split parts."""
    notes = []
    if opt.picked:
        notes.append("★ Recommended")
    if opt.qat:
        notes.append("QAT")
    if opt.mtp:
        n = opt.mtp_layers
        notes.append(f"MTP ×{n}" if n else "MTP")
    if opt.is_split:
        notes.append(f"{len(opt.files)} parts" if opt.complete else "parts missing")
    return notes


class ResultsModel(QAbstractTableModel):
    """Search results as rows."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.results: list[SearchResult] = []

    def set_results(self, results: list[SearchResult]) -> None:
        self.beginResetModel()
        self.results = list(results)
        self.endResetModel()

    def rowCount(self, parent: Index = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(self.results)

    def columnCount(self, parent: Index = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(RESULT_COLUMNS)

    def headerData(
        self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole
    ) -> Any:
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.DisplayRole:
            return RESULT_COLUMNS[section]
        return None

    def data(self, index: Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid():
            return None
        r = self.results[index.row()]
        column = RESULT_COLUMNS[index.column()]
        if role == Qt.ItemDataRole.DisplayRole:
            if column == "Model":
                # The model's name first: narrow columns cut the end, and the owner matters less.
                owner, _, name = r.repo_id.partition("/")
                return f"{name} · {owner}" + ("  (gated)" if r.gated else "")
            if column == "Downloads":
                return count_text(r.downloads)
            if column == "Likes":
                return count_text(r.likes)
            return age_text(r.last_modified)
        if role == Qt.ItemDataRole.UserRole:
            if column == "Downloads":
                return r.downloads
            if column == "Likes":
                return r.likes
            if column == "Updated":
                return r.last_modified.timestamp() if r.last_modified else 0.0
            return r.repo_id.lower()
        if role == Qt.ItemDataRole.ToolTipRole:
            bits = [r.repo_id, f"licence: {r.license or 'not given'}"]
            if r.gated:
                bits.append("gated: accept its licence on Hugging Face before downloading")
            if r.last_modified:
                bits.append(f"updated {r.last_modified:%Y-%m-%d}")
            return "\n".join(bits)
        if role == Qt.ItemDataRole.TextAlignmentRole and column != "Model":
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        return None


class QuantsModel(QAbstractTableModel):
    """One repo's quants: size, fit badge, marks."""

    def __init__(self, palette: theme.Palette, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.options: list[QuantOption] = []
        self.palette = palette
        self.reading = False  # headers still being read: empty badges say so

    def set_options(self, options: list[QuantOption]) -> None:
        self.beginResetModel()
        self.options = list(options)
        self.endResetModel()

    def replace(self, row: int, opt: QuantOption) -> None:
        self.options[row] = opt
        self.dataChanged.emit(self.index(row, 0), self.index(row, len(QUANT_COLUMNS) - 1))

    def refresh(self) -> None:
        if self.options:
            self.dataChanged.emit(
                self.index(0, 0), self.index(len(self.options) - 1, len(QUANT_COLUMNS) - 1)
            )

    def rowCount(self, parent: Index = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(self.options)

    def columnCount(self, parent: Index = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(QUANT_COLUMNS)

    def headerData(
        self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole
    ) -> Any:
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.DisplayRole:
            return QUANT_COLUMNS[section]
        return None

    def fit_text(self, opt: QuantOption) -> str:
        if opt.fit is not None:
            return FIT_WORDS.get(opt.fit.level, opt.fit.level)
        if opt.header_error:
            return "unknown"
        return "checking…" if self.reading else "—"

    def data(self, index: Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid():
            return None
        opt = self.options[index.row()]
        column = QUANT_COLUMNS[index.column()]
        p = self.palette
        if role == Qt.ItemDataRole.DisplayRole:
            if column == "Quant":
                return opt.quant or "—"
            if column == "Size":
                return format_bytes(opt.size)
            if column == "Fits this machine":
                return self.fit_text(opt)
            return "  ·  ".join(notes_of(opt))
        if role == Qt.ItemDataRole.UserRole:
            if column == "Size":
                return opt.size
            if column == "Fits this machine":
                return FIT_ORDER.get(opt.fit.level, 4) if opt.fit is not None else 5
            return str(self.data(index)).lower()
        if role == Qt.ItemDataRole.ToolTipRole:
            if column == "Fits this machine":
                if opt.fit is not None:
                    return opt.fit.summary
                return opt.header_error or "The file's header is being read"
            return opt.name
        if role == Qt.ItemDataRole.ForegroundRole:
            if column == "Fits this machine" and opt.fit is not None:
                colour = {"gpu": p.good, "partial": p.warn, "cpu": p.accent, "no": p.bad}
                return QBrush(QColor(colour.get(opt.fit.level, p.muted)))
            if column == "Fits this machine" or (column == "Notes" and not opt.picked):
                return QBrush(QColor(p.muted))
            if column == "Notes":
                return QBrush(QColor(p.accent))
        if role == Qt.ItemDataRole.FontRole and opt.picked and column in ("Quant", "Notes"):
            font = QFont()
            font.setBold(True)
            return font
        if role == Qt.ItemDataRole.TextAlignmentRole and column == "Size":
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        return None


class _Sorter(QSortFilterProxyModel):
    def lessThan(self, left: Index, right: Index) -> bool:
        a = left.data(Qt.ItemDataRole.UserRole)
        b = right.data(Qt.ItemDataRole.UserRole)
        try:
            return bool(a < b)
        except TypeError:
            return str(a) < str(b)


def _table(
    model: QAbstractTableModel, sortable: bool, stretch: int = 0
) -> tuple[QTableView, _Sorter]:
    proxy = _Sorter(model)
    proxy.setSourceModel(model)
    table = QTableView()
    table.setModel(proxy)
    table.setSortingEnabled(sortable)
    table.sortByColumn(-1, Qt.SortOrder.AscendingOrder)
    table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
    table.setAlternatingRowColors(True)
    table.setShowGrid(False)
    table.setWordWrap(False)
    table.verticalHeader().hide()
    table.verticalHeader().setDefaultSectionSize(32)
    table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    table.setTextElideMode(Qt.TextElideMode.ElideRight)
    header = table.horizontalHeader()
    header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
    header.setSectionResizeMode(stretch, QHeaderView.ResizeMode.Stretch)
    header.setDefaultAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter)
    header.setHighlightSections(False)
    return table, proxy


class DiscoverTab(QWidget):
    """Draws search results and one repo's quants; emits what the user asked for."""

    query_edited = Signal(str)  # as the user types (the controller debounces)
    query_submitted = Signal(str)  # Enter: search now
    repo_opened = Signal(object)  # SearchResult
    download_requested = Signal(object)  # QuantOption
    open_on_hub = Signal(str)  # repo id
    open_settings = Signal()

    def __init__(self, palette: theme.Palette, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("page")
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 12, 0, 0)
        lay.setSpacing(10)
        top = QHBoxLayout()
        self.search = QLineEdit()
        self.search.setPlaceholderText(
            "Search Hugging Face for GGUF models (e.g. qwen, llama, gemma)"
        )
        self.search.setClearButtonEnabled(True)
        self.search.textEdited.connect(self.query_edited)
        self.search.returnPressed.connect(lambda: self.query_submitted.emit(self.search.text()))
        top.addWidget(self.search, 1)
        lay.addLayout(top)
        self.status = QLabel(
            "Type to search. Nothing is sent to Hugging Face until you do, so Peregrine "
            "stays offline otherwise."
        )
        self.status.setObjectName("hint")
        self.status.setWordWrap(True)
        lay.addWidget(self.status)

        self.results_model = ResultsModel(self)
        self.results, self.results_proxy = _table(self.results_model, sortable=True)
        # "name · owner": cut in the middle, both ends (which model, whose) stay readable.
        self.results.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        self.results.selectionModel().selectionChanged.connect(lambda *_a: self._emit_open())

        self.splitter = QSplitter(Qt.Orientation.Horizontal)
        self.splitter.addWidget(self.results)
        self.splitter.addWidget(self._repo_panel(palette))
        self.splitter.setStretchFactor(0, 1)
        self.splitter.setStretchFactor(1, 1)
        self.splitter.setSizes([570, 630])
        self.splitter.setChildrenCollapsible(False)
        lay.addWidget(self.splitter, 1)

    def _repo_panel(self, palette: theme.Palette) -> QWidget:
        panel = QWidget()
        col = QVBoxLayout(panel)
        col.setContentsMargins(8, 0, 0, 0)
        col.setSpacing(8)
        self.repo_title = QLabel("Open a search result to see its files")
        self.repo_title.setObjectName("sectionTitle")
        self.repo_title.setWordWrap(True)
        col.addWidget(self.repo_title)
        self.repo_detail = QLabel("")
        self.repo_detail.setObjectName("hint")
        self.repo_detail.setWordWrap(True)
        col.addWidget(self.repo_detail)

        self.repo_id = ""
        self.gated = QFrame()
        self.gated.setObjectName("notice")
        g = QVBoxLayout(self.gated)
        g.setContentsMargins(12, 10, 12, 10)
        self.gated_text = QLabel("")
        self.gated_text.setWordWrap(True)
        g.addWidget(self.gated_text)
        buttons = QHBoxLayout()
        self.gated_open = QPushButton("Open on Hugging Face")
        self.gated_open.clicked.connect(lambda: self.open_on_hub.emit(self.repo_id))
        self.gated_settings = QPushButton("Set token in Settings")
        self.gated_settings.clicked.connect(self.open_settings)
        buttons.addWidget(self.gated_open)
        buttons.addWidget(self.gated_settings)
        buttons.addStretch(1)
        g.addLayout(buttons)
        self.gated.hide()
        col.addWidget(self.gated)

        self.quants_model = QuantsModel(palette, self)
        self.quants, self.quants_proxy = _table(self.quants_model, sortable=True, stretch=3)
        self.quants.selectionModel().selectionChanged.connect(lambda *_a: self._draw_selected())
        self.quants.doubleClicked.connect(lambda _i: self._emit_download())
        col.addWidget(self.quants, 1)

        bar = QFrame()
        bar.setObjectName("card")
        row = QHBoxLayout(bar)
        row.setContentsMargins(14, 10, 14, 10)
        self.selected_text = QLabel("")
        self.selected_text.setObjectName("hint")
        self.selected_text.setWordWrap(True)
        row.addWidget(self.selected_text, 1)
        self.download_button = QPushButton("Download")
        self.download_button.setObjectName("primary")
        self.download_button.clicked.connect(self._emit_download)
        row.addWidget(self.download_button)
        col.addWidget(bar)
        self._draw_selected()
        return panel

    # drawing ----------------------------------------------------------------------

    def set_palette(self, palette: theme.Palette) -> None:
        self.quants_model.palette = palette
        self.quants.viewport().update()

    def set_status(self, text: str) -> None:
        self.status.setText(text)

    def set_results(self, results: list[SearchResult]) -> None:
        self.results.selectionModel().blockSignals(True)
        self.results_model.set_results(results)
        self.results.selectionModel().blockSignals(False)

    def show_repo(self, result: SearchResult | None, listing: RepoListing | None) -> None:
        """The repo panel: a listing, or (listing None) the repo being opened."""
        self.repo_id = result.repo_id if result else ""
        self.repo_title.setText(self.repo_id or "Open a search result to see its files")
        gated = bool(result and result.gated) or bool(listing and listing.gated)
        if listing is None:
            self.repo_detail.setText("Listing files…" if result else "")
            self.quants_model.set_options([])
        else:
            n = len(listing.options)
            bits = [f"{n} GGUF model{'s' if n != 1 else ''}" if n else "no GGUF files"]
            if listing.license or (result and result.license):
                bits.append(f"licence: {listing.license or (result.license if result else '')}")
            if listing.refused:
                bits.append(f"{len(listing.refused)} file(s) refused (unsafe names or sizes)")
            self.repo_detail.setText(" · ".join(bits))
            self.quants_model.set_options(listing.options)
        self.gated.setVisible(gated)
        self.gated_text.setText(
            f"{self.repo_id} is gated. Accept its licence on Hugging Face (the button below "
            "opens the page), then save your Hugging Face token in Settings → Models. "
            "Downloads and fit checks work once both are done."
        )
        self._draw_selected()

    def set_reading(self, reading: bool) -> None:
        self.quants_model.reading = reading
        self.quants_model.refresh()

    def update_option(self, row: int, opt: QuantOption) -> None:
        self.quants_model.replace(row, opt)
        self._draw_selected()

    def refresh_marks(self) -> None:
        self.quants_model.refresh()
        self._draw_selected()

    def select_option(self, name: str) -> bool:
        for row in range(self.quants_proxy.rowCount()):
            source = self.quants_proxy.mapToSource(self.quants_proxy.index(row, 0))
            if self.quants_model.options[source.row()].name == name:
                self.quants.selectRow(row)
                return True
        return False

    def select_result(self, repo_id: str) -> bool:
        for row in range(self.results_proxy.rowCount()):
            source = self.results_proxy.mapToSource(self.results_proxy.index(row, 0))
            if self.results_model.results[source.row()].repo_id == repo_id:
                self.results.selectRow(row)
                return True
        return False

    def selected_option(self) -> QuantOption | None:
        rows = self.quants.selectionModel().selectedRows()
        if not rows:
            return None
        source = self.quants_proxy.mapToSource(rows[0])
        options = self.quants_model.options
        return options[source.row()] if 0 <= source.row() < len(options) else None

    def _draw_selected(self) -> None:
        opt = self.selected_option()
        if opt is None:
            self.selected_text.setText(
                "Choose a file. ★ marks the planner's pick for this machine."
                if self.repo_id
                else ""
            )
            self.download_button.setEnabled(False)
            return
        bits = [opt.name, format_bytes(opt.size)]
        if opt.fit is not None:
            bits.append(opt.fit.summary)
        elif opt.header_error:
            bits.append(f"fit unknown: {opt.header_error}")
        self.selected_text.setText(" · ".join(bits))
        self.download_button.setEnabled(opt.complete)
        self.download_button.setToolTip(
            "" if opt.complete else "The repo does not have every part of this split model"
        )

    # intents ----------------------------------------------------------------------

    def _emit_open(self) -> None:
        rows = self.results.selectionModel().selectedRows()
        if not rows:
            return
        source = self.results_proxy.mapToSource(rows[0])
        if 0 <= source.row() < len(self.results_model.results):
            self.repo_opened.emit(self.results_model.results[source.row()])

    def _emit_download(self) -> None:
        opt = self.selected_option()
        if opt is not None and self.download_button.isEnabled():
            self.download_requested.emit(opt)
