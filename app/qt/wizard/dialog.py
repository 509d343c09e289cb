"""The VRAM-budget wizard's window: it draws a `WizardView` and emits what the user changed.

Left: the hardware, a budget slider per device, the model and its settings.
Right: a stacked bar per device, the planner's recommendation with its reasons,
and what will not fit. The controller (controller.py) owns the logic.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QFormLayout,
    QFrame,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSlider,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from app.qt import theme
from app.qt.wizard.bar import MemoryBar
from app.services.models.wizard import (
    KV_TYPES,
    MIB,
    MIN_RAM_BUDGET,
    LoadWizard,
    Recommendation,
    WizardView,
    hardware_lines,
)
from engine.wire.control import LoadRequest

FLASH_ATTN = ("on", "off", "auto")


def _card(title: str) -> tuple[QFrame, QVBoxLayout]:
    card = QFrame()
    card.setObjectName("card")
    lay = QVBoxLayout(card)
    lay.setContentsMargins(16, 12, 16, 14)
    lay.setSpacing(8)
    heading = QLabel(title)
    heading.setObjectName("sectionTitle")
    lay.addWidget(heading)
    return card, lay


def _label(text: str = "", name: str = "hint") -> QLabel:
    label = QLabel(text)
    label.setObjectName(name)
    label.setWordWrap(True)
    label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    return label


class _BudgetRow(QWidget):
    """One device's budget: a slider in MiB from 0 to its free memory, under its bar."""

    def __init__(self, free: int, floor: int) -> None:
        super().__init__()
        self.free = free
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        # Full width under the bar, so the handle sits under the bar's budget tick.
        self.slider = QSlider(Qt.Orientation.Horizontal)
        self.slider.setRange(floor // MIB, max(floor, free) // MIB)
        self.slider.setSingleStep(64)
        self.slider.setPageStep(1024)
        self.slider.setToolTip("How much of this device's free memory the model may use")
        lay.addWidget(self.slider, 1)

    def show_budget(self, budget: int) -> None:
        self.slider.blockSignals(True)
        self.slider.setValue(budget // MIB)
        self.slider.blockSignals(False)


class WizardDialog(QDialog):
    """Draws the wizard's state; every user change goes out as a signal."""

    budget_changed = Signal(int, object)  # device index (GPUs, then RAM), bytes (past 2**31)
    choice_changed = Signal(dict)  # Choices field -> value
    recommended_requested = Signal()
    apply_requested = Signal()
    model_chosen = Signal(str)  # path
    reset_budgets_requested = Signal()

    def __init__(self, palette: theme.Palette, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("wizard")
        self.setWindowTitle("Memory and load settings")
        self.resize(1240, 840)
        self.palette_ = palette
        self.budget_rows: list[_BudgetRow] = []
        self._devices: list[QWidget] = []
        self.bars: list[MemoryBar] = []
        self.view: WizardView | None = None
        self.recommendation: Recommendation | None = None
        self._n_layer = 0

        root = QVBoxLayout(self)
        root.setContentsMargins(20, 16, 20, 14)
        root.setSpacing(10)
        self.heading = QLabel("Memory and load settings")
        self.heading.setObjectName("pageTitle")
        root.addWidget(self.heading)
        self.intro = _label(
            "Set how much memory each device may use, and see what the model takes before it loads."
        )
        root.addWidget(self.intro)

        columns = QHBoxLayout()
        columns.setSpacing(14)
        left = QVBoxLayout()
        left.setSpacing(12)
        right = QVBoxLayout()
        right.setSpacing(12)

        hw_card, hw = _card("This computer")
        self.hardware = _label()
        self.runtime = _label()
        hw.addWidget(self.hardware)
        hw.addWidget(self.runtime)
        left.addWidget(hw_card)

        left.addWidget(self._settings_card())
        left.addStretch(1)

        mem_card, self._mem_lay = _card("Memory and budget per device")
        self.method = _label()
        self.method.setTextFormat(Qt.TextFormat.RichText)
        self._mem_lay.addWidget(self.method)
        self._bars_lay = QVBoxLayout()
        self._bars_lay.setSpacing(16)
        self._mem_lay.addLayout(self._bars_lay)
        budget_hint = QHBoxLayout()
        budget_hint.addWidget(
            _label(
                "Drag a slider to set a budget. A bar spans the free memory; its tick marks the budget."
            ),
            1,
        )
        self.reset_budgets = QPushButton("Reset budgets")
        self.reset_budgets.setToolTip("Free memory minus 1 GiB on every device")
        self.reset_budgets.clicked.connect(self.reset_budgets_requested)
        budget_hint.addWidget(self.reset_budgets)
        self._mem_lay.addLayout(budget_hint)
        self.problems = _label("", "problem")
        self.problems.setStyleSheet(f"color: {palette.bad};")
        self._mem_lay.addWidget(self.problems)
        self.notes = _label()
        self._mem_lay.addWidget(self.notes)
        right.addWidget(mem_card)

        rec_card, rec = _card("Recommended")
        self.rec_summary = _label("", "role")
        rec.addWidget(self.rec_summary)
        self.rec_reasons = _label()
        self.rec_reasons.setTextFormat(Qt.TextFormat.RichText)
        rec.addWidget(self.rec_reasons)
        self.use_recommended = QPushButton("Use recommended")
        self.use_recommended.clicked.connect(self.recommended_requested)
        rec.addWidget(self.use_recommended, 0, Qt.AlignmentFlag.AlignLeft)
        right.addWidget(rec_card)
        right.addStretch(1)

        for column, stretch in ((left, 1), (right, 1)):
            holder = QWidget()
            holder.setObjectName("settingsBody")  # the page background
            holder.setLayout(column)
            scroll = QScrollArea()
            scroll.setWidgetResizable(True)
            scroll.setFrameShape(QFrame.Shape.NoFrame)
            scroll.setWidget(holder)
            scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
            columns.addWidget(scroll, stretch)
        root.addLayout(columns, 1)

        bottom = QHBoxLayout()
        self.status = _label()
        bottom.addWidget(self.status, 1)
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.progress.setTextVisible(False)
        self.progress.setFixedWidth(180)
        self.progress.hide()
        bottom.addWidget(self.progress)
        self.close_button = QPushButton("Close")
        self.close_button.clicked.connect(self.close)
        self.apply_button = QPushButton("Apply and load")
        self.apply_button.setObjectName("primary")
        self.apply_button.clicked.connect(self.apply_requested)
        bottom.addWidget(self.close_button)
        bottom.addWidget(self.apply_button)
        root.addLayout(bottom)
        self.set_palette(palette)

    def _settings_card(self) -> QFrame:
        card, lay = _card("Model and settings")
        form = QFormLayout()
        form.setHorizontalSpacing(14)
        form.setVerticalSpacing(8)
        self.model_box = QComboBox()
        self.model_box.setSizeAdjustPolicy(
            QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon
        )
        self.model_box.setMinimumContentsLength(18)
        self.model_box.activated.connect(
            lambda i: self.model_chosen.emit(str(self.model_box.itemData(i)))
        )
        form.addRow("Model", self.model_box)
        self.model_info = _label()
        form.addRow("", self.model_info)
        self.ctx = QSpinBox()
        self.ctx.setFixedWidth(170)
        self.ctx.setSingleStep(1024)
        self.ctx.setSuffix(" tokens")
        self.ctx.setGroupSeparatorShown(True)
        self.ctx.setKeyboardTracking(False)
        self.ctx.valueChanged.connect(lambda v: self._choose(n_ctx=v))
        form.addRow("Context", self.ctx)
        self.type_k = QComboBox()
        self.type_k.addItems(list(KV_TYPES))
        self.type_k.currentTextChanged.connect(lambda t: self._choose(type_k=t))
        self.type_v = QComboBox()
        self.type_v.addItems(list(KV_TYPES))
        self.type_v.currentTextChanged.connect(lambda t: self._choose(type_v=t))
        kv = QHBoxLayout()
        kv.addWidget(QLabel("K"))
        kv.addWidget(self.type_k, 1)
        kv.addWidget(QLabel("V"))
        kv.addWidget(self.type_v, 1)
        form.addRow("KV cache", kv)
        self.flash_attn = QComboBox()
        self.flash_attn.addItems(list(FLASH_ATTN))
        self.flash_attn.currentTextChanged.connect(lambda t: self._choose(flash_attn=t))
        form.addRow("Flash attention", self.flash_attn)
        self.auto_placement = QCheckBox("Automatic (the planner's)")
        self.auto_placement.setToolTip(
            "The planner places layers, MoE experts and the split for these settings and budgets"
        )
        self.auto_placement.toggled.connect(lambda on: self._choose(auto_placement=on))
        form.addRow("Placement", self.auto_placement)
        self.gpu_layers = QSpinBox()
        self.gpu_layers.setFixedWidth(140)
        self.gpu_layers.setKeyboardTracking(False)
        self.gpu_layers.valueChanged.connect(self._gpu_layers_changed)
        form.addRow("GPU layers", self.gpu_layers)
        self.experts = QSpinBox()
        self.experts.setFixedWidth(140)
        self.experts.setKeyboardTracking(False)
        self.experts.setSuffix(" layers")
        self.experts.valueChanged.connect(lambda v: self._choose(n_cpu_moe=v))
        self.experts.setToolTip(
            "MoE expert tensors of the first N layers stay in system RAM "
            "(llama.cpp's --n-cpu-moe); attention and the KV cache stay on the GPU"
        )
        form.addRow("MoE experts in RAM", self.experts)
        self.parallel = QSpinBox()
        self.parallel.setFixedWidth(140)
        self.parallel.setRange(1, 64)
        self.parallel.valueChanged.connect(lambda v: self._choose(n_parallel=v))
        form.addRow("Parallel slots", self.parallel)
        # Shown once the engine's LoadRequest carries slots (docs/app.md).
        self._show_row(form, self.parallel, "n_parallel" in LoadRequest.model_fields)
        self.split = _label()
        form.addRow("Split", self.split)
        self._form = form
        lay.addLayout(form)
        return card

    @staticmethod
    def _show_row(form: QFormLayout, field: QWidget, visible: bool) -> None:
        form.setRowVisible(field, visible)

    # drawing --------------------------------------------------------------------

    def set_palette(self, palette: theme.Palette) -> None:
        self.palette_ = palette
        self.setStyleSheet(
            theme.stylesheet(palette)
            + f"QDialog#wizard {{ background: {palette.bg}; }}"
            + f"QLabel#problem {{ color: {palette.bad}; font-weight: 600; }}"
            # No step buttons (the keyboard and the wheel step); Qt's NoButtons hides the text.
            + "QSpinBox::up-button, QSpinBox::down-button { width: 0px; border: none; }"
        )
        for bar in self.bars:
            bar.set_palette(palette)

    def set_first_run(self, first: bool) -> None:
        if first:
            self.heading.setText("Welcome to Peregrine")
            self.intro.setText(
                "Here is what this computer has, and how a model fits it. The built-in model "
                "is already starting; adjust the budgets and settings, or just close this."
            )

    def set_models(self, models: Sequence[tuple[str, Path]], current: Path) -> None:
        self.model_box.blockSignals(True)
        self.model_box.clear()
        for label, path in models:
            self.model_box.addItem(label, str(path))
        if self.model_box.findData(str(current)) < 0:
            self.model_box.addItem(current.stem, str(current))
        self.model_box.setCurrentIndex(self.model_box.findData(str(current)))
        self.model_box.blockSignals(False)

    def set_wizard(self, wizard: LoadWizard, described: str | None) -> None:
        """Builds the rows that depend on the machine and the model (sliders, bars, ranges)."""
        lines = "\n".join(hardware_lines(wizard.hardware))
        if described:
            lines = f"Described machine ({described}); figures are planned for it.\n" + lines
        self.hardware.setText(lines)
        for widget in self._devices:
            widget.setParent(None)
            widget.deleteLater()
        self._devices, self.budget_rows, self.bars = [], [], []
        for i, _name in enumerate(wizard.names):
            floor = MIN_RAM_BUDGET if i == len(wizard.names) - 1 else 0
            device = QWidget()
            column = QVBoxLayout(device)
            column.setContentsMargins(0, 0, 0, 0)
            column.setSpacing(4)
            bar = MemoryBar(self.palette_)
            row = _BudgetRow(wizard.free(i), floor)
            row.slider.valueChanged.connect(lambda v, i=i: self.budget_changed.emit(i, v * MIB))
            column.addWidget(bar)
            column.addWidget(row)
            self._bars_lay.addWidget(device)
            self._devices.append(device)
            self.budget_rows.append(row)
            self.bars.append(bar)
        header = wizard.header
        self.model_info.setText(
            f"{header.architecture or '?'} · {header.quant_name or '?'} · "
            f"{wizard.n_layer} layers · trained for {wizard.shape.n_ctx_train:,} tokens"
            + (" · mixture of experts" if wizard.is_moe else "")
        )
        self._n_layer = wizard.n_layer
        self._block(True)
        self.ctx.setRange(256, wizard.max_ctx)
        self.gpu_layers.setRange(0, wizard.n_layer + 1)
        self.gpu_layers.setSuffix(f" of {wizard.n_layer + 1}")
        self.experts.setRange(0, wizard.n_layer)
        self._block(False)
        self._show_row(self._form, self.gpu_layers, wizard.has_gpus)
        self._show_row(self._form, self.auto_placement, wizard.has_gpus)
        self._show_row(self._form, self.experts, wizard.has_gpus and wizard.is_moe)
        self._show_row(self._form, self.split, len(wizard.hardware.gpus) > 1)

    def draw(self, view: WizardView, budgets: Sequence[int]) -> None:
        """Shows one state of the wizard; no signal goes out while widgets take its values."""
        self.view = view
        c = view.choices
        self._block(True)
        self.ctx.setValue(c.n_ctx)
        self.type_k.setCurrentText(c.type_k)
        self.type_v.setCurrentText(c.type_v)
        self.flash_attn.setCurrentText(c.flash_attn)
        self.auto_placement.setChecked(c.auto_placement)
        self.gpu_layers.setValue(self._n_layer + 1 if c.n_gpu_layers == -1 else c.n_gpu_layers)
        self.experts.setValue(c.n_cpu_moe)
        self.parallel.setValue(c.n_parallel)
        self._block(False)
        self.split.setText(
            " : ".join(f"{s:g}" for s in c.tensor_split) + " layers"
            if c.tensor_split
            else "one GPU"
        )
        for row, budget in zip(self.budget_rows, budgets, strict=False):
            row.show_budget(budget)
        for bar, figures in zip(self.bars, view.bars, strict=False):
            bar.set_bar(figures)
        colour = self.palette_.good if view.method == "measured" else self.palette_.warn
        self.method.setText(
            f'<b style="color:{colour}">{view.method.capitalize()}</b> · {_escape(view.method_note)}'
        )
        self.problems.setText("\n".join(view.problems))
        self.problems.setVisible(bool(view.problems))
        self.notes.setText("\n".join(view.notes))
        self.notes.setVisible(bool(view.notes))
        self.apply_button.setText("Load anyway…" if view.problems else "Apply and load")

    def draw_recommendation(self, rec: Recommendation) -> None:
        """The planner's choice for the budgets, with its reasons."""
        self.recommendation = rec
        self.rec_summary.setText(rec.summary())
        reasons = "".join(f"<li>{_escape(r)}</li>" for r in rec.reasons)
        self.rec_reasons.setText(f"<ul style='margin-left:-20px'>{reasons}</ul>" if reasons else "")
        self.use_recommended.setEnabled(rec.plan is not None)

    def set_progress(self, progress: float | None, text: str = "") -> None:
        """A load's progress (None: no load running) and a line about it."""
        if progress is None:
            self.progress.hide()
        else:
            self.progress.setValue(int(progress * 100))
            self.progress.show()
        self.status.setText(text)
        self.apply_button.setEnabled(progress is None)

    # intents --------------------------------------------------------------------

    def _block(self, block: bool) -> None:
        for w in (
            self.ctx,
            self.type_k,
            self.type_v,
            self.flash_attn,
            self.auto_placement,
            self.gpu_layers,
            self.experts,
            self.parallel,
        ):
            w.blockSignals(block)

    def _choose(self, **change: Any) -> None:
        self.choice_changed.emit(change)

    def _gpu_layers_changed(self, value: int) -> None:
        self._choose(n_gpu_layers=-1 if value >= self._n_layer + 1 else value)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
