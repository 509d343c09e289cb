"""The app's settings: one typed model with a schema version, stored as JSON.

Older files are migrated step by step on load. A file that cannot be read is
never overwritten: it is moved aside so nothing the user wrote is lost. The file
holds secrets (a Hugging Face token, API keys), so it is written with mode 0600
and secrets are `SecretStr`: a repr or a log line shows stars, never the value.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_serializer,
    field_validator,
)
from pydantic_core import PydanticSerializationError

from engine.errors import PeregrineError
from engine.wire.base import FlashAttn, KVType

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3
Theme = Literal["system", "light", "dark"]
# The local API's port when other tools may use it: fixed, so their configuration
# survives restarts (llama-server's 8080 and LM Studio's 1234 are left to them).
DEFAULT_API_PORT = 8788


class SettingsError(PeregrineError):
    """The settings file exists but cannot be used as it is."""


class RemoteEndpoint(BaseModel):
    """An OpenAI-compatible server the chat can run against instead of the local engine."""

    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1)
    base_url: str = Field(min_length=1)
    api_key: str = ""
    model: str = ""  # empty: the server's first model

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        value = value.strip()
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")


class EngineSettings(BaseModel):
    """Engine defaults for every model; None lets the engine choose."""

    model_config = ConfigDict(extra="ignore")

    n_ctx: int | None = Field(default=None, ge=16)
    threads: int | None = Field(default=None, ge=1, le=1024)
    # Speculative decoding for the chat's answers (the engine turns it off by
    # itself where drafts don't pay; this is the user's off switch).
    speculation: bool = True


class LoadSettings(BaseModel):
    """How one model was loaded; None fields fall back to EngineSettings, then the engine."""

    model_config = ConfigDict(extra="ignore")

    n_ctx: int | None = Field(default=None, ge=16)
    threads: int | None = Field(default=None, ge=1, le=1024)
    n_gpu_layers: int | None = Field(default=None, ge=-1)
    type_k: KVType | None = None
    type_v: KVType | None = None
    flash_attn: FlashAttn | None = None
    draft_model: str | None = None
    # Placement the VRAM-budget wizard chose (docs/app.md); None: the engine's default.
    runtime: str | None = None
    tensor_split: list[float] | None = None
    n_cpu_moe: int | None = Field(default=None, ge=0, le=1 << 16)
    expert_offload: bool | None = None


def masked(secret: str) -> str:
    """A secret as it may be shown: its first 3 and last 4 characters at most."""
    if not secret:
        return ""
    if len(secret) < 16:
        return "•" * 8
    return f"{secret[:3]}…{secret[-4:]}"


class LocalApi(BaseModel):
    """Whether other tools may use the local engine, and on which fixed port with which key."""

    model_config = ConfigDict(extra="ignore")

    shared: bool = False
    port: int = Field(default=DEFAULT_API_PORT, ge=1, le=65535)
    api_key: SecretStr = SecretStr("")

    @field_serializer("api_key", when_used="json")
    def _dump_key(self, value: SecretStr) -> str:
        return value.get_secret_value()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def client_example(self, key: str) -> str:
        """One line of Python with the official `openai` client pointed at this API."""
        return f'client = OpenAI(base_url="{self.base_url}", api_key="{key}")'

    def agent_example(self, key: str) -> str:
        """An agent with a tool, in the OpenAI Agents SDK, running on this API."""
        return (
            "from agents import Agent, OpenAIChatCompletionsModel, Runner, function_tool\n"
            "from openai import AsyncOpenAI\n\n"
            f'client = AsyncOpenAI(base_url="{self.base_url}", api_key="{key}")\n'
            'model = OpenAIChatCompletionsModel(model="local", openai_client=client)\n\n'
            "@function_tool\n"
            "def get_weather(city: str) -> str:\n"
            '    return f"Sunny in {city}"\n\n'
            'agent = Agent(name="Assistant", tools=[get_weather], model=model)\n'
            'print(Runner.run_sync(agent, "Weather in Paris?").final_output)'
        )

    def anthropic_example(self, key: str) -> str:
        """Claude Code (or any Anthropic client) pointed at this API's Messages route."""
        root = self.base_url.removesuffix("/v1")
        return f"ANTHROPIC_BASE_URL={root} ANTHROPIC_API_KEY={key} claude"


class Settings(BaseModel):
    """Everything the desktop app remembers between runs."""

    model_config = ConfigDict(extra="ignore", validate_assignment=True)

    schema_version: int = SCHEMA_VERSION
    last_model_path: str | None = None
    engine: EngineSettings = Field(default_factory=EngineSettings)
    remote_endpoints: list[RemoteEndpoint] = Field(default_factory=list)
    # Name of the remote endpoint in use; None means the local engine.
    active_endpoint: str | None = None
    # Replaces the model library's default scan folders when set.
    library_scan_folders: list[str] | None = None
    default_preset: str = "Balanced"
    default_system_prompt: str = ""
    theme: Theme = "system"
    # Where Peregrine keeps its own models; None: the data folder's models/.
    models_folder: str | None = None
    # For gated Hugging Face repos; never logged, never shown in full.
    hf_token: SecretStr | None = None
    # How many downloads run at once (the rest wait in the queue).
    downloads_at_once: int = Field(default=2, ge=1, le=8)
    local_api: LocalApi = Field(default_factory=LocalApi)
    # Per model file: the settings it was last loaded with.
    model_settings: dict[str, LoadSettings] = Field(default_factory=dict)
    # The memory wizard opens once, on the first run.
    wizard_shown: bool = False

    @field_serializer("hf_token", when_used="json")
    def _dump_token(self, value: SecretStr | None) -> str | None:
        return value.get_secret_value() if value is not None else None

    @field_validator("models_folder")
    @classmethod
    def _folder(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

    def load_settings(self, model: str) -> LoadSettings:
        """The settings `model` was last loaded with (empty when never)."""
        return self.model_settings.get(model, LoadSettings())

    @property
    def token(self) -> str | None:
        """The Hugging Face token's value, for the hub client only."""
        return self.hf_token.get_secret_value() if self.hf_token else None

    def endpoint(self, name: str | None) -> RemoteEndpoint | None:
        """The remote endpoint with this name, or None for the local engine."""
        if name is None:
            return None
        for endpoint in self.remote_endpoints:
            if endpoint.name == name:
                return endpoint
        return None


def _v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    # Version 1 kept a single remote server as flat keys.
    data = dict(data)
    url = data.pop("remote_url", None)
    key = data.pop("remote_api_key", "")
    endpoints = data.get("remote_endpoints") or []
    # Anything but a list is left as it is, so validation names the field.
    if isinstance(endpoints, list):
        endpoints = list(endpoints)
        if url:
            endpoints.append({"name": "Remote", "base_url": url, "api_key": key or ""})
    data["remote_endpoints"] = endpoints
    if "model_path" in data and "last_model_path" not in data:
        data["last_model_path"] = data.pop("model_path")
    data["schema_version"] = 2
    return data


def _v2_to_v3(data: dict[str, Any]) -> dict[str, Any]:
    # Version 2 kept one draft model for whatever model ran; it belongs to that model.
    data = dict(data)
    engine = data.get("engine")
    if isinstance(engine, dict) and engine.get("draft_model"):
        engine = dict(engine)
        draft = engine.pop("draft_model")
        data["engine"] = engine
        last = data.get("last_model_path")
        if isinstance(last, str) and last:
            data["model_settings"] = {last: {"draft_model": draft}}
        else:
            log.info("settings: dropping draft model %s (no model to attach it to)", draft)
    data["schema_version"] = 3
    return data


# from-version -> function producing the next version's dict.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {
    1: _v1_to_v2,
    2: _v2_to_v3,
}


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """Brings a settings dict of any known older version up to SCHEMA_VERSION."""
    version = data.get("schema_version", 1)
    if not isinstance(version, int) or version < 1:
        raise SettingsError(f"settings: schema_version {version!r} is not a positive integer")
    if version > SCHEMA_VERSION:
        raise SettingsError(
            f"settings were written by a newer Peregrine (schema {version}, "
            f"this one knows {SCHEMA_VERSION}); upgrade Peregrine"
        )
    while version < SCHEMA_VERSION:
        try:
            data = MIGRATIONS[version](data)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            # A migration written for well-formed old files met a damaged one.
            raise SettingsError(
                f"settings of schema {version} cannot be upgraded: {type(exc).__name__}: {exc}"
            ) from exc
        version = data["schema_version"]
    return data


class SettingsStore:
    """Loads and saves Settings at one path (normally Paths.settings_file)."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock

    def load(self) -> Settings:
        """Reads the settings; defaults when there is no file yet; SettingsError when unusable."""
        try:
            raw = _read_regular_file(self.path, MAX_SETTINGS_BYTES)
        except FileNotFoundError:
            return Settings()
        except OSError as exc:
            raise SettingsError(f"cannot read settings {self.path}: {exc.strerror}") from exc
        try:
            # utf-8-sig: editors such as Notepad put a byte-order mark in front.
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise SettingsError(
                f"settings {self.path} are not UTF-8 text (byte {exc.start}: {exc.reason})"
            ) from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SettingsError(
                f"settings {self.path} are not valid JSON (line {exc.lineno}: {exc.msg})"
            ) from exc
        except RecursionError as exc:
            raise SettingsError(f"settings {self.path} are nested too deeply to read") from exc
        except ValueError as exc:
            # For example an integer with more digits than Python converts.
            raise SettingsError(f"settings {self.path} are not usable JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise SettingsError(f"settings {self.path} must hold a JSON object")
        data = migrate(data)
        try:
            settings = Settings.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(top level)"
            raise SettingsError(f"settings {self.path}: {where}: {first['msg']}") from exc
        try:
            # JSON may escape a lone surrogate that can never be written back as UTF-8;
            # refuse it now rather than fail at the next save.
            settings.model_dump_json()
        except PydanticSerializationError as exc:
            raise SettingsError(
                f"settings {self.path} hold text that is not valid Unicode"
            ) from exc
        return settings

    def load_or_reset(self) -> tuple[Settings, str | None]:
        """Like load(), but an unusable file is moved aside and defaults are used.

        Returns the settings and, when the file was moved aside, a message for the user.
        """
        try:
            return self.load(), None
        except SettingsError as exc:
            if not self.path.exists():
                raise
            try:
                aside = self._aside_path()
                os.replace(self.path, aside)
            except OSError as move_exc:
                # Left in place: nothing is written until the user changes a setting.
                log.warning("%s; could not move it aside: %s", exc, move_exc)
                return Settings(), (
                    f"{exc}. The file could not be moved aside ({move_exc.strerror}); "
                    "defaults are in use."
                )
            log.warning("%s; moved to %s", exc, aside)
            return Settings(), f"{exc}. The file was kept as {aside.name}; defaults are in use."

    def _aside_path(self) -> Path:
        """A name for a broken file that never replaces an earlier broken file."""
        base = f"{self.path.name}.broken-{int(self._clock())}"
        aside = self.path.with_name(base)
        n = 1
        while aside.exists():
            aside = self.path.with_name(f"{base}-{n}")
            n += 1
        return aside

    def save(self, settings: Settings) -> None:
        """Writes atomically with mode 0600: a crash mid-write leaves the previous file intact."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        data = (settings.model_dump_json(indent=2) + "\n").encode("utf-8")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # a leftover could have looser permissions
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.chmod(tmp, 0o600)  # the umask cannot loosen it, but an odd fs might
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


# Real settings are a few KiB; a bigger file is not ours.
MAX_SETTINGS_BYTES = 4 << 20


def _read_regular_file(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes.

    Opened without blocking, so a FIFO or a device in its place is refused
    instead of hanging the app at start.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if info.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit >> 20} MiB")
        return fh.read(limit + 1)
