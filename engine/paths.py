"""Where Peregrine keeps its files: the one module that knows.

`PEREGRINE_HOME` overrides everything (tests, portable installs); otherwise the
platform's conventional folders come from platformdirs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

APP_NAME = "Peregrine"


@dataclass(frozen=True)
class Paths:
    """The folders and files of one Peregrine installation."""

    data: Path
    config: Path
    cache: Path

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Paths:
        env = os.environ if environ is None else environ
        home = env.get("PEREGRINE_HOME")
        if home:
            root = Path(home).expanduser()
            return cls(data=root, config=root, cache=root / "cache")
        return cls(
            data=Path(platformdirs.user_data_dir(APP_NAME, appauthor=False)),
            config=Path(platformdirs.user_config_dir(APP_NAME, appauthor=False)),
            cache=Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False)),
        )

    @property
    def models(self) -> Path:
        return self.data / "models"

    @property
    def downloads(self) -> Path:
        return self.data / "downloads"

    @property
    def chats_db(self) -> Path:
        return self.data / "chats.sqlite3"

    @property
    def settings_file(self) -> Path:
        return self.config / "settings.json"

    @property
    def runtimes(self) -> Path:
        return self.data / "runtimes"

    @property
    def logs(self) -> Path:
        return self.data / "logs"

    def ensure(self) -> Paths:
        """Creates the folders that must exist before anything is written."""
        for folder in (self.data, self.config, self.cache, self.models, self.downloads, self.logs):
            folder.mkdir(parents=True, exist_ok=True)
        return self
