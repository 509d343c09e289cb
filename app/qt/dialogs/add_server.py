"""Adding an OpenAI-compatible server (Peregrine elsewhere, llama-server, vLLM, ...)."""

from __future__ import annotations

from collections.abc import Callable

from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QLabel,
    QLineEdit,
    QVBoxLayout,
    QWidget,
)

from app.services.settings import RemoteEndpoint


class AddServerDialog(QDialog):
    """Name, URL, key and model of a server; `on_accept` gets a valid RemoteEndpoint.

    Bad input keeps the dialog open with what was typed, and says what is wrong.
    """

    def __init__(
        self, on_accept: Callable[[RemoteEndpoint], None], parent: QWidget | None = None
    ) -> None:
        super().__init__(parent)
        self._on_accept = on_accept
        self.setWindowTitle("Add a server")
        self.setMinimumWidth(560)  # room for a whole URL with its port and path
        lay = QVBoxLayout(self)
        lay.setContentsMargins(20, 18, 20, 16)
        lay.setSpacing(12)
        title = QLabel("Add an OpenAI-compatible server")
        title.setObjectName("sectionTitle")
        lay.addWidget(title)
        hint = QLabel(
            "Peregrine on another machine, llama-server, vLLM, SGLang, LM Studio or Ollama: "
            "anything that serves /v1/chat/completions."
        )
        hint.setObjectName("hint")
        hint.setWordWrap(True)
        lay.addWidget(hint)
        form = QFormLayout()
        form.setSpacing(8)
        self.name, self.url, self.key, self.model = (
            QLineEdit(),
            QLineEdit(),
            QLineEdit(),
            QLineEdit(),
        )
        self.name.setPlaceholderText("e.g. Lab server")
        self.url.setPlaceholderText("http://192.168.1.20:8080/v1")
        self.key.setEchoMode(QLineEdit.EchoMode.Password)
        self.key.setPlaceholderText("optional")
        self.model.setPlaceholderText("optional: the server's default model")
        for label, field in (
            ("Name", self.name),
            ("URL", self.url),
            ("API key", self.key),
            ("Model", self.model),
        ):
            form.addRow(label, field)
        lay.addLayout(form)
        self.problem = QLabel()
        self.problem.setObjectName("hint")
        self.problem.setWordWrap(True)
        lay.addWidget(self.problem)
        buttons = QDialogButtonBox(
            QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel
        )
        buttons.button(QDialogButtonBox.StandardButton.Ok).setText("Add")
        buttons.rejected.connect(self.reject)
        buttons.accepted.connect(self._accept)
        lay.addWidget(buttons)

    def _accept(self) -> None:
        try:
            endpoint = RemoteEndpoint(
                name=self.name.text().strip(),
                base_url=self.url.text(),
                api_key=self.key.text(),
                model=self.model.text().strip(),
            )
        except ValueError as exc:
            # The last line of pydantic's message names the field's problem.
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            where = lines[1] if len(lines) > 2 else ""
            why = lines[-1].split(" [")[0] if lines else "invalid server"
            self.problem.setText(f"{where}: {why}" if where else why)
            return
        self._on_accept(endpoint)
        self.accept()
