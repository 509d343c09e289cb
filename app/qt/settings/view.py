"""The Settings view: appearance, models, engine defaults, engine runtimes, the local API.

It draws `SettingsController.settings` and hands every change to the
controller, which checks, saves and announces it. Secrets are never put into
a widget whole: the token and the key are shown masked and copied on demand.
"""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QGuiApplication, QIntValidator
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QFrame,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QPushButton,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

from app.qt.settings.controller import SettingsController
from app.qt.settings.runtimes import RuntimesController, RuntimesSection
from app.services.models.library import default_scan_folders
from app.services.settings import DEFAULT_API_PORT, masked

THEMES = {"Follow the system": "system", "Light": "light", "Dark": "dark"}


def _hint(text: str) -> QLabel:
    label = QLabel(text)
    label.setObjectName("hint")
    label.setWordWrap(True)
    # A wrapped label in a form row otherwise gets its narrowest width (three short lines).
    label.setMinimumWidth(440)
    return label


def _number_field(low: int, high: int, placeholder: str) -> QLineEdit:
    """A short field for a whole number in [low, high]; empty means the placeholder's value."""
    field = QLineEdit()
    field.setValidator(QIntValidator(low, high, field))
    field.setPlaceholderText(placeholder)
    field.setFixedWidth(140)
    return field


class _Section(QFrame):
    def __init__(self, title: str, hint: str = "") -> None:
        super().__init__()
        self.setObjectName("card")
        lay = QVBoxLayout(self)
        lay.setContentsMargins(18, 14, 18, 16)
        lay.setSpacing(10)
        heading = QLabel(title)
        heading.setObjectName("sectionTitle")
        lay.addWidget(heading)
        if hint:
            lay.addWidget(_hint(hint))
        self.form = QFormLayout()
        self.form.setHorizontalSpacing(16)
        self.form.setVerticalSpacing(10)
        self.form.setLabelAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter)
        self.form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.ExpandingFieldsGrow)
        lay.addLayout(self.form)


class SettingsView(QScrollArea):
    """Every setting the app has, in sections; changes take effect (and are saved) at once."""

    def __init__(
        self,
        controller: SettingsController,
        runtimes: RuntimesController | None = None,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.controller = controller
        self.setWidgetResizable(True)
        body = QWidget()
        body.setObjectName("settingsBody")
        outer = QHBoxLayout(body)
        outer.setContentsMargins(28, 18, 28, 24)
        column = QVBoxLayout()
        column.setSpacing(14)
        title = QLabel("Settings")
        title.setObjectName("pageTitle")
        column.addWidget(title)
        self.banner = QVBoxLayout()  # where the window puts the error banner on this page
        self.banner.setContentsMargins(0, 0, 0, 0)
        column.addLayout(self.banner)
        self.appearance = self._appearance()
        self.models = self._models()
        self.engine = self._engine()
        self.api = self._api()
        self.runtimes = RuntimesSection(runtimes) if runtimes is not None else None
        for section in (self.appearance, self.models, self.engine, self.runtimes, self.api):
            if section is not None:
                column.addWidget(section)
        column.addStretch(1)
        wrap = QWidget()
        wrap.setLayout(column)
        wrap.setMaximumWidth(860)
        outer.addWidget(wrap, 1)
        outer.addStretch(0)
        self.setWidget(body)
        controller.local_api_changed.connect(self._draw_api)
        controller.theme_changed.connect(lambda _t: self.draw())
        self.draw()

    # sections ---------------------------------------------------------------------

    def _appearance(self) -> _Section:
        section = _Section("Appearance")
        self.theme_box = QComboBox()
        self.theme_box.addItems(list(THEMES))
        self.theme_box.currentTextChanged.connect(
            lambda text: self.controller.set_theme(THEMES[text])  # type: ignore[arg-type]
        )
        section.form.addRow("Theme", self.theme_box)
        return section

    def _models(self) -> _Section:
        section = _Section("Models")
        row = QHBoxLayout()
        self.models_folder = QLineEdit()
        self.models_folder.setPlaceholderText("the default folder in Peregrine's data folder")
        self.models_folder.editingFinished.connect(self._apply_models_folder)
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse_models_folder)
        row.addWidget(self.models_folder, 1)
        row.addWidget(browse)
        section.form.addRow("Models folder", row)
        self.models_folder_problem = _hint(
            "Downloads and imports go here. Models already in the old folder stay there."
        )
        section.form.addRow("", self.models_folder_problem)

        self.default_scan = QCheckBox("Look in the usual places of other apps")
        self.default_scan.setToolTip(
            "\n".join(f"{f.source}: {f.path}" for f in default_scan_folders())
        )
        self.default_scan.toggled.connect(self._on_default_scan)
        section.form.addRow("Other apps' models", self.default_scan)
        self.scan_list = QListWidget()
        self.scan_list.setObjectName("folderList")
        self.scan_list.setFixedHeight(96)
        buttons = QHBoxLayout()
        self.add_scan = QPushButton("Add folder…")
        self.add_scan.clicked.connect(self._add_scan_folder)
        self.remove_scan = QPushButton("Remove")
        self.remove_scan.clicked.connect(self._remove_scan_folder)
        buttons.addWidget(self.add_scan)
        buttons.addWidget(self.remove_scan)
        buttons.addStretch(1)
        scan = QVBoxLayout()
        scan.addWidget(self.scan_list)
        scan.addLayout(buttons)
        scan.addWidget(
            _hint(
                "LM Studio, Ollama, GPT4All and Hugging Face cache folders are read in place, "
                "read-only: Peregrine never moves or deletes their files."
            )
        )
        section.form.addRow("", scan)

        token_row = QHBoxLayout()
        self.token_state = QLabel()
        self.token_input = QLineEdit()
        self.token_input.setEchoMode(QLineEdit.EchoMode.Password)
        self.token_input.setPlaceholderText("paste a new token (hf_…)")
        self.token_save = QPushButton("Save")
        self.token_save.clicked.connect(self._save_token)
        self.token_remove = QPushButton("Remove")
        self.token_remove.clicked.connect(self._remove_token)
        token_row.addWidget(self.token_state)
        token_row.addWidget(self.token_input, 1)
        token_row.addWidget(self.token_save)
        token_row.addWidget(self.token_remove)
        section.form.addRow("Hugging Face token", token_row)
        self.token_problem = _hint(
            "For gated repos. Kept in the settings file, readable only by you; never shown whole."
        )
        section.form.addRow("", self.token_problem)

        self.downloads_at_once = QComboBox()
        self.downloads_at_once.addItems([str(n) for n in range(1, 9)])
        self.downloads_at_once.setFixedWidth(140)
        self.downloads_at_once.setToolTip("The rest wait in the queue and start as others finish")
        self.downloads_at_once.currentTextChanged.connect(
            lambda text: self.controller.set_downloads_at_once(int(text))
        )
        section.form.addRow("Downloads at once", self.downloads_at_once)
        return section

    def _engine(self) -> _Section:
        section = _Section("Engine", "Defaults for every model; they apply to the next load.")
        self.threads = _number_field(1, 1024, "Automatic")
        self.threads.setToolTip("CPU threads for generation; Automatic uses the physical cores")
        self.threads.editingFinished.connect(self._apply_engine)
        section.form.addRow("Threads", self.threads)
        self.speculation = QCheckBox("Speculative decoding (faster answers, same text)")
        self.speculation.toggled.connect(self._apply_engine)
        section.form.addRow("Speculation", self.speculation)
        return section

    def _api(self) -> _Section:
        section = _Section(
            "Local API",
            "Peregrine's engine speaks the OpenAI API. Let other tools on this computer use "
            "it on a fixed port with a fixed key, so their configuration survives restarts.",
        )
        self.api_shared = QCheckBox("Allow other tools to use the local API")
        section.form.addRow("Access", self.api_shared)
        self.api_port = _number_field(1, 65535, str(DEFAULT_API_PORT))
        section.form.addRow("Port", self.api_port)
        apply_row = QHBoxLayout()
        self.api_apply = QPushButton("Apply and restart the engine")
        self.api_apply.clicked.connect(self._apply_api)
        apply_row.addWidget(self.api_apply)
        apply_row.addStretch(1)
        section.form.addRow("", apply_row)
        self.api_problem = _hint("")
        section.form.addRow("", self.api_problem)
        self.api_shared.toggled.connect(self._draw_api_dirty)
        self.api_port.textChanged.connect(self._draw_api_dirty)

        url_row = QHBoxLayout()
        self.api_url = QLabel()
        self.api_url.setObjectName("code")
        self.api_url.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.copy_url = QPushButton("Copy")
        self.copy_url.clicked.connect(
            lambda: self._copy(self.controller.settings.local_api.base_url)
        )
        url_row.addWidget(self.api_url, 1)
        url_row.addWidget(self.copy_url)
        section.form.addRow("Base URL", url_row)

        key_row = QHBoxLayout()
        self.api_key = QLabel()
        self.api_key.setObjectName("code")
        self.copy_key = QPushButton("Copy")
        self.copy_key.clicked.connect(lambda: self._copy(self._key()))
        self.new_key = QPushButton("New key")
        self.new_key.setToolTip("Tools using the old key must be given the new one")
        self.new_key.clicked.connect(self.controller.regenerate_api_key)
        key_row.addWidget(self.api_key, 1)
        key_row.addWidget(self.copy_key)
        key_row.addWidget(self.new_key)
        section.form.addRow("API key", key_row)

        example_row = QHBoxLayout()
        self.api_example = QLabel()
        self.api_example.setObjectName("code")
        self.api_example.setWordWrap(True)
        self.copy_example = QPushButton("Copy")
        self.copy_example.clicked.connect(
            lambda: self._copy(self.controller.settings.local_api.client_example(self._key()))
        )
        example_row.addWidget(self.api_example, 1)
        example_row.addWidget(self.copy_example, 0, Qt.AlignmentFlag.AlignTop)
        section.form.addRow("Python", example_row)

        # Agent frameworks call tools; the engine parses and enforces them (docs/api.md).
        agent_row = QHBoxLayout()
        self.agent_example = QLabel()
        self.agent_example.setObjectName("code")
        self.agent_example.setWordWrap(True)
        self.copy_agent = QPushButton("Copy")
        self.copy_agent.clicked.connect(
            lambda: self._copy(self.controller.settings.local_api.agent_example(self._key()))
        )
        agent_row.addWidget(self.agent_example, 1)
        agent_row.addWidget(self.copy_agent, 0, Qt.AlignmentFlag.AlignTop)
        section.form.addRow("Agent", agent_row)

        claude_row = QHBoxLayout()
        self.anthropic_example = QLabel()
        self.anthropic_example.setObjectName("code")
        self.anthropic_example.setWordWrap(True)
        self.copy_anthropic = QPushButton("Copy")
        self.copy_anthropic.clicked.connect(
            lambda: self._copy(self.controller.settings.local_api.anthropic_example(self._key()))
        )
        claude_row.addWidget(self.anthropic_example, 1)
        claude_row.addWidget(self.copy_anthropic, 0, Qt.AlignmentFlag.AlignTop)
        section.form.addRow("Claude Code", claude_row)
        return section

    # drawing ---------------------------------------------------------------------

    def draw(self) -> None:
        s = self.controller.settings
        self.theme_box.blockSignals(True)
        self.theme_box.setCurrentText(next(k for k, v in THEMES.items() if v == s.theme))
        self.theme_box.blockSignals(False)
        self.models_folder.setText(s.models_folder or "")
        self._draw_scan()
        self._draw_token()
        self.downloads_at_once.blockSignals(True)
        self.downloads_at_once.setCurrentText(str(s.downloads_at_once))
        self.downloads_at_once.blockSignals(False)
        for widget in (self.threads, self.speculation):
            widget.blockSignals(True)
        self.threads.setText(str(s.engine.threads) if s.engine.threads else "")
        self.speculation.setChecked(s.engine.speculation)
        for widget in (self.threads, self.speculation):
            widget.blockSignals(False)
        self._draw_api()

    def _draw_scan(self) -> None:
        folders = self.controller.settings.library_scan_folders
        self.default_scan.blockSignals(True)
        self.default_scan.setChecked(folders is None)
        self.default_scan.blockSignals(False)
        self.scan_list.clear()
        shown = (
            [f"{f.source}: {f.path}" for f in default_scan_folders()]
            if folders is None
            else folders
        )
        self.scan_list.addItems(shown)
        custom = folders is not None
        self.scan_list.setEnabled(custom)
        self.add_scan.setEnabled(custom)
        self.remove_scan.setEnabled(custom)

    def _draw_token(self) -> None:
        token = self.controller.settings.token
        self.token_state.setText(f"Saved: {masked(token)}" if token else "Not set")
        self.token_remove.setEnabled(bool(token))
        self.token_input.clear()

    def _draw_api(self) -> None:
        api = self.controller.settings.local_api
        for widget in (self.api_shared, self.api_port):
            widget.blockSignals(True)
        self.api_shared.setChecked(api.shared)
        self.api_port.setText(str(api.port))
        for widget in (self.api_shared, self.api_port):
            widget.blockSignals(False)
        key = self._key()
        self.api_url.setText(api.base_url)
        self.api_key.setText(masked(key) if key else "made when access is first allowed")
        self.api_example.setText(api.client_example(masked(key) or "…"))
        self.agent_example.setText(api.agent_example(masked(key) or "…"))
        self.anthropic_example.setText(api.anthropic_example(masked(key) or "…"))
        for button in (self.copy_url, self.copy_key, self.copy_example, self.new_key):
            button.setEnabled(api.shared and bool(key))
        self._draw_api_dirty()

    def _draw_api_dirty(self) -> None:
        api = self.controller.settings.local_api
        dirty = (self.api_shared.isChecked(), self._port()) != (api.shared, api.port)
        self.api_apply.setEnabled(dirty)
        self.api_port.setEnabled(self.api_shared.isChecked())
        if api.shared:
            self.api_problem.setText(f"Other tools can use {api.base_url} with the key below.")
        else:
            self.api_problem.setText(
                "Only Peregrine uses the engine (a new port and key each run)."
            )

    # intents ----------------------------------------------------------------------

    def _port(self) -> int:
        text = self.api_port.text()
        return int(text) if text else DEFAULT_API_PORT

    def _key(self) -> str:
        return self.controller.settings.local_api.api_key.get_secret_value()

    def _copy(self, text: str) -> None:
        QGuiApplication.clipboard().setText(text)

    def _apply_models_folder(self) -> None:
        problem = self.controller.set_models_folder(self.models_folder.text())
        self.models_folder_problem.setText(
            problem or "Downloads and imports go here. Models already in the old folder stay there."
        )

    def _browse_models_folder(self) -> None:
        dialog = QFileDialog(self.window(), "Models folder")
        dialog.setFileMode(QFileDialog.FileMode.Directory)
        dialog.fileSelected.connect(self._picked_models_folder)
        self.folder_dialog = dialog
        dialog.open()

    def _picked_models_folder(self, folder: str) -> None:
        self.models_folder.setText(folder)
        self._apply_models_folder()

    def _on_default_scan(self, use_defaults: bool) -> None:
        if use_defaults:
            self.controller.set_scan_folders(None)
        else:
            # Start from the defaults, as folders the user can now edit.
            self.controller.set_scan_folders(
                [f"{f.source}:{f.path}" for f in default_scan_folders()]
            )
        self._draw_scan()

    def _add_scan_folder(self) -> None:
        dialog = QFileDialog(self.window(), "Folder with GGUF models")
        dialog.setFileMode(QFileDialog.FileMode.Directory)
        dialog.fileSelected.connect(self.add_scan_folder)
        self.scan_dialog = dialog
        dialog.open()

    def add_scan_folder(self, folder: str) -> None:
        current = list(self.controller.settings.library_scan_folders or [])
        if folder and folder not in current:
            self.controller.set_scan_folders([*current, folder])
        self._draw_scan()

    def _remove_scan_folder(self) -> None:
        row = self.scan_list.currentRow()
        current = list(self.controller.settings.library_scan_folders or [])
        if 0 <= row < len(current):
            del current[row]
            self.controller.set_scan_folders(current)
        self._draw_scan()

    def _save_token(self) -> None:
        problem = self.controller.set_hf_token(self.token_input.text())
        self.token_problem.setText(
            problem
            or "For gated repos. Kept in the settings file, readable only by you; never shown whole."
        )
        if problem is None:
            self._draw_token()

    def _remove_token(self) -> None:
        self.controller.set_hf_token(None)
        self._draw_token()

    def _apply_engine(self) -> None:
        threads = int(self.threads.text()) if self.threads.text() else None
        self.controller.set_engine_defaults(threads, self.speculation.isChecked())

    def _apply_api(self) -> None:
        problem = self.controller.set_local_api(self.api_shared.isChecked(), self._port())
        if problem:
            self.api_problem.setText(problem)
        self._draw_api()
