"""Editing one chat's function tools: OpenAI JSON, on/off, and tool_choice."""

from __future__ import annotations

from collections.abc import Callable

from PySide6.QtCore import Qt
from PySide6.QtGui import QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from app.services.chat.tools import (
    EXAMPLE,
    NAMED_PREFIX,
    ToolSpecError,
    parse_tools,
    pretty,
    tool_names,
)
from engine.errors import PeregrineError

CHOICES = (
    ("auto", "Auto: the model decides"),
    ("required", "Required: always call a tool"),
    ("none", "None: never call a tool"),
)

SaveFn = Callable[[str, bool, str], None]  # text, enabled, choice; raises when refused


class ToolsDialog(QDialog):
    """The tools editor. Save hands everything to `on_save`; what it refuses is
    shown in the dialog, which stays open with the text as typed."""

    def __init__(
        self,
        text: str,
        enabled: bool,
        choice: str,
        on_save: SaveFn,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.setWindowTitle("Tools for this chat")
        self._on_save = on_save
        lay = QVBoxLayout(self)
        lay.setSpacing(8)
        hint = QLabel(
            "Function tools in OpenAI's JSON: a list of "
            '{"type": "function", "function": {name, description, parameters}}. '
            "Peregrine runs no tools: when the model calls one, the chat shows the call "
            "and you type its result."
        )
        hint.setObjectName("hint")
        hint.setWordWrap(True)
        lay.addWidget(hint)
        row = QHBoxLayout()
        self.enabled = QCheckBox("Send these tools with each message")
        self.enabled.setChecked(enabled)
        row.addWidget(self.enabled)
        row.addStretch(1)
        choice_label = QLabel("Tool choice:")
        row.addWidget(choice_label)
        self.choice = QComboBox()
        self.choice.setToolTip(
            "tool_choice: Required and a named tool hold the answer to a call; after a "
            "result the model answers freely (auto)"
        )
        choice_label.setBuddy(self.choice)
        row.addWidget(self.choice)
        lay.addLayout(row)
        self.edit = QPlainTextEdit()
        self.edit.setObjectName("toolsEditor")
        self.edit.setPlaceholderText("[ … ]   (Insert example shows the shape)")
        self.edit.setMinimumSize(620, 320)
        self.edit.setTabChangesFocus(True)
        self.edit.setPlainText(text)
        lay.addWidget(self.edit, 1)
        self.problem = QLabel()
        self.problem.setObjectName("problem")
        self.problem.setWordWrap(True)
        self.problem.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        lay.addWidget(self.problem)
        buttons = QDialogButtonBox(
            QDialogButtonBox.StandardButton.Save | QDialogButtonBox.StandardButton.Cancel
        )
        self.example_button = QPushButton("Insert example")
        self.example_button.setToolTip("Adds a get_weather tool to show the shape")
        self.example_button.clicked.connect(self._insert_example)
        buttons.addButton(self.example_button, QDialogButtonBox.ButtonRole.ActionRole)
        self.format_button = QPushButton("Format")
        self.format_button.setToolTip("Indents the JSON (Ctrl+Shift+F)")
        self.format_button.clicked.connect(self._format)
        buttons.addButton(self.format_button, QDialogButtonBox.ButtonRole.ActionRole)
        QShortcut(QKeySequence("Ctrl+Shift+F"), self, self._format)
        self.save_button = buttons.button(QDialogButtonBox.StandardButton.Save)
        buttons.accepted.connect(self.save)
        buttons.rejected.connect(self.reject)
        lay.addWidget(buttons)
        self._fill_choices(choice)
        self.edit.textChanged.connect(self._on_text)
        self._on_text()

    def _fill_choices(self, current: str) -> None:
        """The three choices and one "Always call NAME" per tool that parses now."""
        try:
            names = tool_names(parse_tools(self.edit.toPlainText()))
        except ToolSpecError:
            names = []
        if current.startswith(NAMED_PREFIX) and current[len(NAMED_PREFIX) :] not in names:
            names.append(current[len(NAMED_PREFIX) :])  # kept, so Save can say what is wrong
        self.choice.blockSignals(True)
        self.choice.clear()
        for value, label in CHOICES:
            self.choice.addItem(label, value)
        for name in names:
            self.choice.addItem(f"Always call {name}", NAMED_PREFIX + name)
        self.choice.setCurrentIndex(max(0, self.choice.findData(current)))
        self.choice.blockSignals(False)

    def _on_text(self) -> None:
        """Checks the JSON as it is typed; the verdict shows under the editor."""
        self._fill_choices(str(self.choice.currentData() or "auto"))
        self.example_button.setEnabled(not self.edit.toPlainText().strip())
        try:
            tools = parse_tools(self.edit.toPlainText())
        except ToolSpecError as exc:
            self._show_problem(str(exc))
            return
        self._show_problem("")
        if tools:
            names = ", ".join(tool_names(tools))
            self.problem.setObjectName("hint")
            self.problem.setText(f"{len(tools)} tool{'s' if len(tools) != 1 else ''}: {names}")
            self._repolish()

    def _show_problem(self, message: str) -> None:
        self.problem.setObjectName("problem")
        self.problem.setText(message)
        self._repolish()

    def _repolish(self) -> None:
        self.problem.style().unpolish(self.problem)
        self.problem.style().polish(self.problem)

    def _insert_example(self) -> None:
        if not self.edit.toPlainText().strip():
            self.edit.setPlainText(EXAMPLE)
            self.enabled.setChecked(True)

    def _format(self) -> None:
        text = self.edit.toPlainText()
        formatted = pretty(text)
        if formatted != text:
            # One undo step, so Ctrl+Z brings the old layout back.
            cursor = self.edit.textCursor()
            cursor.select(cursor.SelectionType.Document)
            cursor.insertText(formatted)

    def save(self) -> None:
        """Saves and closes; a refusal is shown here and nothing is lost."""
        try:
            self._on_save(
                self.edit.toPlainText(),
                self.enabled.isChecked(),
                str(self.choice.currentData() or "auto"),
            )
        except PeregrineError as exc:
            self._show_problem(str(exc))
            self.edit.setFocus()
            return
        self.accept()
