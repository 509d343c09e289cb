"""Owns the app's Settings: every change goes through here, is saved, and is announced.

Views read `settings` and call the setters; other controllers listen to the
signals (a new theme, another models folder, the local API changed).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from pathlib import Path

from pydantic import SecretStr, ValidationError
from PySide6.QtCore import QObject, Signal

from app.services.settings import (
    LoadSettings,
    LocalApi,
    Settings,
    SettingsStore,
    Theme,
)

log = logging.getLogger(__name__)


def new_api_key() -> str:
    """A fresh key for the local API (256 bits, URL-safe)."""
    return "pk-" + secrets.token_urlsafe(32)


class SettingsController(QObject):
    """The settings in memory, the file on disk, and who must know about a change."""

    theme_changed = Signal(str)
    library_changed = Signal()  # models folder or scan folders
    local_api_changed = Signal()  # the engine must restart to use it
    engine_defaults_changed = Signal()
    downloads_at_once_changed = Signal(int)

    def __init__(
        self,
        store: SettingsStore,
        settings: Settings,
        report: Callable[[str], None],
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self.store = store
        self.settings = settings
        self._report = report

    def save(self) -> bool:
        try:
            self.store.save(self.settings)
        except OSError as exc:
            self._report(f"Settings could not be saved: {exc.strerror or exc}")
            return False
        return True

    # appearance -------------------------------------------------------------

    def set_theme(self, theme: Theme) -> None:
        if theme != self.settings.theme:
            self.settings.theme = theme
            self.save()
            self.theme_changed.emit(theme)

    # models -----------------------------------------------------------------

    def set_models_folder(self, folder: str | None) -> str | None:
        """Uses another folder for Peregrine's models; returns why not, or None when done."""
        value = (folder or "").strip() or None
        if value is not None:
            path = Path(value).expanduser()
            if not path.is_absolute():
                return "give a full path (it starts with / or ~)"
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                return f"cannot use {path}: {exc.strerror or exc}"
            if not path.is_dir():
                return f"{path} is not a folder"
        if value != self.settings.models_folder:
            self.settings.models_folder = value
            self.save()
            self.library_changed.emit()
        return None

    def set_scan_folders(self, folders: list[str] | None) -> None:
        """None: the default folders of LM Studio, Ollama, GPT4All and the HF cache."""
        cleaned = None if folders is None else [f.strip() for f in folders if f.strip()]
        if cleaned != self.settings.library_scan_folders:
            self.settings.library_scan_folders = cleaned
            self.save()
            self.library_changed.emit()

    def set_hf_token(self, token: str | None) -> str | None:
        """Stores (or with None/empty, forgets) the Hugging Face token; returns why not."""
        value = (token or "").strip()
        if value and (len(value) > 512 or any(c.isspace() for c in value)):
            return "that does not look like a token (no spaces, at most 512 characters)"
        self.settings.hf_token = SecretStr(value) if value else None
        self.save()
        return None

    def set_downloads_at_once(self, n: int) -> None:
        """How many downloads may run at once (1 to 8); the queue follows at once."""
        n = max(1, min(8, n))
        if n != self.settings.downloads_at_once:
            self.settings.downloads_at_once = n
            self.save()
            self.downloads_at_once_changed.emit(n)

    def remember_load(self, model: Path, load: LoadSettings) -> None:
        """The model the next start loads, with the settings it was loaded with."""
        key = str(model)
        changed = self.settings.last_model_path != key or self.settings.load_settings(key) != load
        if changed:
            self.settings.last_model_path = key
            self.settings.model_settings = {**self.settings.model_settings, key: load}
            self.save()

    def mark_wizard_shown(self) -> None:
        """The first run's wizard has been shown: it does not open by itself again."""
        if not self.settings.wizard_shown:
            self.settings.wizard_shown = True
            self.save()

    # engine -----------------------------------------------------------------

    def set_engine_defaults(self, threads: int | None, speculation: bool) -> None:
        engine = self.settings.engine.model_copy(
            update={"threads": threads, "speculation": speculation}
        )
        if engine != self.settings.engine:
            self.settings.engine = engine
            self.save()
            self.engine_defaults_changed.emit()

    def set_local_api(self, shared: bool, port: int) -> str | None:
        """Shares the local engine on a fixed port (with a key), or not; returns why not."""
        key = self.settings.local_api.api_key.get_secret_value() or new_api_key()
        try:
            api = LocalApi(shared=shared, port=port, api_key=SecretStr(key))
        except ValidationError as exc:
            return str(exc.errors()[0]["msg"])
        if api != self.settings.local_api:
            self.settings.local_api = api
            self.save()
            self.local_api_changed.emit()
        return None

    def regenerate_api_key(self) -> None:
        api = self.settings.local_api.model_copy(update={"api_key": SecretStr(new_api_key())})
        self.settings.local_api = api
        self.save()
        self.local_api_changed.emit()
