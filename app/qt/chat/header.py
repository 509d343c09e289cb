"""The chat's header: title, the model picker, preset, system prompt, and the server box."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QResizeEvent
from PySide6.QtWidgets import QComboBox, QHBoxLayout, QLabel, QPushButton, QSizePolicy, QWidget

from app.services.chat.service import PRESETS
from app.services.models.library import ModelEntry

LOCAL = "Local engine"
ADD_SERVER = "Add server…"
MANAGE_MODELS = "Manage models…"


class ElidedLabel(QLabel):
    """A one-line label that ends in "…" when it is too narrow; the whole text is its tooltip."""

    def __init__(self, text: str = "") -> None:
        super().__init__()
        self.setMinimumWidth(60)
        self.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self._full = ""
        self.setText(text)

    def setText(self, text: str) -> None:
        self._full = text
        self.setToolTip(text)
        self._elide()

    def text(self) -> str:
        return self._full

    def resizeEvent(self, event: QResizeEvent) -> None:
        super().resizeEvent(event)
        self._elide()

    def _elide(self) -> None:
        shown = self.fontMetrics().elidedText(self._full, Qt.TextElideMode.ElideRight, self.width())
        super().setText(shown)


class ChatHeader(QWidget):
    """Draws the chat's choices and emits what the user picked; it decides nothing."""

    model_chosen = Signal(str)  # model path
    manage_models = Signal()
    preset_chosen = Signal(str)
    system_prompt_requested = Signal()
    tools_requested = Signal()
    server_chosen = Signal(object)  # a remote server's name, or None for the local engine
    add_server_requested = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("header")
        self.setAttribute(Qt.WidgetAttribute.WA_StyledBackground, True)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(28, 10, 20, 10)
        lay.setSpacing(8)
        self.title = ElidedLabel("New chat")
        self.title.setObjectName("chatTitle")
        lay.addWidget(self.title, 1)
        self.model_box = QComboBox()
        self.model_box.setObjectName("modelPicker")
        self.model_box.setToolTip("The model that answers (Ctrl+L); switching keeps this chat")
        self.model_box.setMinimumContentsLength(10)
        self.model_box.setSizeAdjustPolicy(
            QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon
        )
        # Grows into spare room (a whole model name), shrinks to 10 characters.
        self.model_box.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.model_box.setMaximumWidth(320)
        self.model_box.activated.connect(self._on_model)
        lay.addWidget(self.model_box, 1)
        self.preset_box = QComboBox()
        self.preset_box.addItems(list(PRESETS))
        self.preset_box.setToolTip("Sampling preset for this chat")
        self.preset_box.currentTextChanged.connect(self._on_preset)
        lay.addWidget(self.preset_box)
        self.system_button = QPushButton("System…")
        self.system_button.setToolTip("The system prompt of this chat")
        self.system_button.clicked.connect(self.system_prompt_requested)
        lay.addWidget(self.system_button)
        self.tools_button = QPushButton("Tools…")
        self.tools_button.setObjectName("toolsButton")
        self.tools_button.clicked.connect(self.tools_requested)
        lay.addWidget(self.tools_button)
        self.set_tools_state(0, False)
        self.server_box = QComboBox()
        self.server_box.setToolTip("Where answers come from")
        self.server_box.setMinimumContentsLength(8)
        self.server_box.setSizeAdjustPolicy(
            QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon
        )
        self.server_box.activated.connect(self._on_server)
        lay.addWidget(self.server_box)
        self._quiet = False

    # drawing ----------------------------------------------------------------

    def set_models(self, entries: list[ModelEntry], current: Path | None, loading: bool) -> None:
        """The runnable models; `current` is selected. Disabled while a model loads."""
        box = self.model_box
        box.blockSignals(True)
        box.clear()
        paths = []
        for entry in entries:
            if not entry.valid:
                continue
            box.addItem(entry.path.stem, str(entry.path))
            where = "Peregrine's built-in model" if entry.source == "builtin" else str(entry.path)
            box.setItemData(box.count() - 1, where, Qt.ItemDataRole.ToolTipRole)
            paths.append(entry.path)
        if current is not None and current not in paths:
            box.addItem(current.stem, str(current))
        if current is None:
            box.insertItem(0, "No model loaded", "")
        box.insertSeparator(box.count())
        box.addItem(MANAGE_MODELS, None)
        index = box.findData(str(current) if current is not None else "")
        box.setCurrentIndex(max(index, 0))
        box.setEnabled(not loading)
        box.blockSignals(False)

    def set_loading(self, name: str | None) -> None:
        if name is not None:
            self.model_box.setEnabled(False)
            self.model_box.setToolTip(f"Loading {name}…")
        else:
            self.model_box.setEnabled(True)
            self.model_box.setToolTip("The model that answers (Ctrl+L); switching keeps this chat")

    def set_servers(self, names: list[str], active: str | None) -> None:
        box = self.server_box
        box.blockSignals(True)
        box.clear()
        box.addItem(LOCAL)
        for name in names:
            box.addItem(name)
        box.addItem(ADD_SERVER)
        box.setCurrentText(active or LOCAL)
        box.blockSignals(False)
        # The local model picker means nothing while answers come from elsewhere.
        self.model_box.setVisible(active is None)

    def set_tools_state(self, count: int, enabled: bool, choice: str = "auto") -> None:
        """Says on the Tools button whether this chat sends tools, and how many."""
        if enabled:
            self.tools_button.setText(f"Tools ({count})")
            forced = {"required": ", a call is required", "none": ", calls are off"}.get(
                choice,
                f", always {choice.removeprefix('function:')}"
                if choice.startswith("function:")
                else "",
            )
            self.tools_button.setToolTip(
                f"{count} function tool{'s' if count != 1 else ''} sent with each message"
                f"{forced}; click to edit"
            )
        else:
            self.tools_button.setText("Tools…")
            self.tools_button.setToolTip(
                "Function tools the model may call in this chat (OpenAI JSON)"
                + ("; now off" if count else "")
            )
        self.tools_button.setProperty("active", enabled)
        self.tools_button.style().unpolish(self.tools_button)
        self.tools_button.style().polish(self.tools_button)

    def set_preset(self, preset: str) -> None:
        self._quiet = True
        self.preset_box.setCurrentText(preset)
        self._quiet = False

    # intents ----------------------------------------------------------------

    def _on_model(self, index: int) -> None:
        data = self.model_box.itemData(index)
        if data is None and self.model_box.itemText(index) == MANAGE_MODELS:
            self.manage_models.emit()
        elif data:
            self.model_chosen.emit(str(data))

    def _on_preset(self, preset: str) -> None:
        if preset and not self._quiet:
            self.preset_chosen.emit(preset)

    def _on_server(self, index: int) -> None:
        text = self.server_box.itemText(index)
        if text == LOCAL:
            self.server_chosen.emit(None)
        elif text == ADD_SERVER:
            self.add_server_requested.emit()
        else:
            self.server_chosen.emit(text)
