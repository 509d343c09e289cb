"""Settings: one typed model, schema version and migrations, nothing lost on bad input."""

from __future__ import annotations

import json
import stat

import pytest

from app.services.settings import (
    MIGRATIONS,
    SCHEMA_VERSION,
    LoadSettings,
    LocalApi,
    RemoteEndpoint,
    Settings,
    SettingsError,
    SettingsStore,
    masked,
)
from engine.paths import Paths


def _store() -> SettingsStore:
    return SettingsStore(Paths.from_env().settings_file, clock=lambda: 1700000000.0)


def test_first_run_gives_defaults_without_writing() -> None:
    store = _store()
    settings = store.load()
    assert settings == Settings()
    assert settings.schema_version == SCHEMA_VERSION
    assert settings.last_model_path is None
    assert not store.path.exists()


def test_round_trip_keeps_every_field() -> None:
    store = _store()
    settings = Settings(
        last_model_path="/models/a.gguf",
        remote_endpoints=[
            RemoteEndpoint(name="lab", base_url="http://10.0.0.2:8080/v1/", api_key="k")
        ],
        active_endpoint="lab",
        library_scan_folders=["/data/gguf"],
    )
    store.save(settings)
    loaded = store.load()
    assert loaded == settings
    assert loaded.endpoint("lab") is not None
    assert loaded.endpoint("lab").base_url == "http://10.0.0.2:8080/v1"  # type: ignore[union-attr]
    assert loaded.endpoint(None) is None
    assert not store.path.with_name("settings.json.tmp").exists()


def test_version_1_file_is_migrated() -> None:
    store = _store()
    store.path.parent.mkdir(parents=True)
    store.path.write_text(
        json.dumps(
            {"model_path": "/m/old.gguf", "remote_url": "http://h:1/v1", "remote_api_key": "s"}
        )
    )
    loaded = store.load()
    assert loaded.schema_version == SCHEMA_VERSION
    assert loaded.last_model_path == "/m/old.gguf"
    assert [(e.name, e.base_url, e.api_key) for e in loaded.remote_endpoints] == [
        ("Remote", "http://h:1/v1", "s")
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"schema_version": 99}), "newer Peregrine"),
        (
            json.dumps(
                {"schema_version": 2, "remote_endpoints": [{"name": "x", "base_url": "ftp://x"}]}
            ),
            "remote_endpoints.0.base_url",
        ),
    ],
)
def test_unusable_file_is_a_clear_error_and_is_kept(content: str, message: str) -> None:
    store = _store()
    store.path.parent.mkdir(parents=True)
    store.path.write_text(content)
    with pytest.raises(SettingsError, match=message):
        store.load()
    assert store.path.read_text() == content  # load never rewrites
    settings, warning = store.load_or_reset()
    assert settings == Settings()
    assert warning is not None and message.split()[0] in warning
    aside = store.path.with_name("settings.json.broken-1700000000")
    assert aside.read_text() == content
    assert not store.path.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"a": 1}'.encode("utf-16"), "not UTF-8 text"),
        (bytes(range(256)), "not UTF-8 text"),
        (b'{"remote_endpoints": 5}', "remote_endpoints: Input should be a valid list"),
        (b'{"remote_url": "http://h:1", "remote_endpoints": {"a": 1}}', "remote_endpoints"),
        (b"[" * 100_000, "nested too deeply"),
        (b'{"engine": ' * 5_000 + b"1" + b"}" * 5_000, "nested too deeply"),
        (b'{"schema_version": 1' + b"0" * 5_000 + b"}", "not usable JSON"),
        (b'{"last_model_path": "\\ud800"}', "not valid Unicode"),
    ],
    ids=[
        "utf16",
        "binary",
        "endpoints-int",
        "endpoints-dict",
        "deep",
        "deep-obj",
        "digits",
        "surr",
    ],
)
def test_damaged_file_is_reset_never_a_crash(content: bytes, message: str) -> None:
    store = _store()
    store.path.parent.mkdir(parents=True)
    store.path.write_bytes(content)
    with pytest.raises(SettingsError, match=message):
        store.load()
    settings, warning = store.load_or_reset()
    assert settings == Settings()
    assert warning is not None and message in warning
    assert store.path.with_name("settings.json.broken-1700000000").read_bytes() == content
    assert not store.path.exists()


def test_a_byte_order_mark_is_accepted() -> None:
    store = _store()
    store.path.parent.mkdir(parents=True)
    store.path.write_bytes(b'\xef\xbb\xbf{"schema_version": 2, "last_model_path": "/m/a.gguf"}')
    assert store.load().last_model_path == "/m/a.gguf"


def test_a_migration_that_fails_on_a_damaged_file_is_a_settings_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(data: dict[str, object]) -> dict[str, object]:
        raise TypeError("'int' object is not iterable")

    monkeypatch.setitem(MIGRATIONS, 1, broken)
    store = _store()
    store.path.parent.mkdir(parents=True)
    store.path.write_text("{}")
    with pytest.raises(SettingsError, match="schema 1 cannot be upgraded: TypeError"):
        store.load()


def test_a_second_broken_file_does_not_replace_the_first_one_kept() -> None:
    store = _store()
    store.path.parent.mkdir(parents=True)
    for content in ("{first", "{second"):
        store.path.write_text(content)
        assert store.load_or_reset()[1] is not None
    assert store.path.with_name("settings.json.broken-1700000000").read_text() == "{first"
    assert store.path.with_name("settings.json.broken-1700000000-1").read_text() == "{second"


def test_a_file_that_cannot_be_moved_aside_is_left_in_place() -> None:
    # A clock this far out gives a name longer than any file system allows.
    store = SettingsStore(Paths.from_env().settings_file, clock=lambda: 1e300)
    store.path.parent.mkdir(parents=True)
    store.path.write_text("{broken")
    settings, warning = store.load_or_reset()
    assert settings == Settings()
    assert warning is not None and "could not be moved aside" in warning
    assert store.path.read_text() == "{broken"


def test_a_fifo_in_place_of_the_settings_file_is_reset_not_a_hang() -> None:
    import os

    store = _store()
    store.path.parent.mkdir(parents=True)
    os.mkfifo(store.path)  # nobody writes to it: a blocking read would never return
    with pytest.raises(SettingsError, match="not a regular file"):
        store.load()
    settings, warning = store.load_or_reset()
    assert settings == Settings() and warning is not None


def test_version_2_draft_model_moves_to_the_model_it_served() -> None:
    store = _store()
    store.path.parent.mkdir(parents=True)
    store.path.write_text(
        json.dumps(
            {
                "schema_version": 2,
                "last_model_path": "/m/big.gguf",
                "engine": {"n_ctx": 8192, "draft_model": "/m/small.gguf"},
            }
        )
    )
    loaded = store.load()
    assert loaded.schema_version == SCHEMA_VERSION == 3
    assert loaded.engine.n_ctx == 8192
    assert loaded.load_settings("/m/big.gguf").draft_model == "/m/small.gguf"
    assert loaded.load_settings("/m/other.gguf") == LoadSettings()


def test_secrets_are_saved_0600_and_never_in_a_repr() -> None:
    store = _store()
    store.path.parent.mkdir(parents=True)
    store.path.write_text("{}")
    store.path.chmod(0o644)  # an older file, readable by others
    token = "hf_" + "a1B2" * 10
    key = "pk-" + "z9" * 20
    settings = Settings(hf_token=token, local_api=LocalApi(shared=True, api_key=key))
    store.save(settings)
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    raw = json.loads(store.path.read_text())
    assert raw["hf_token"] == token and raw["local_api"]["api_key"] == key
    loaded = store.load()
    assert loaded.token == token
    assert loaded.local_api.api_key.get_secret_value() == key
    for text in (repr(loaded), str(loaded), repr(loaded.local_api), f"{loaded!r}"):
        assert token not in text and key not in text
    assert masked(token) == "hf_…a1B2" and token not in masked(token)
    assert masked("short") == "••••••••"
    assert loaded.local_api.client_example("K") == (
        'client = OpenAI(base_url="http://127.0.0.1:8788/v1", api_key="K")'
    )
    compile(loaded.local_api.agent_example("K"), "agent", "exec")
    assert 'AsyncOpenAI(base_url="http://127.0.0.1:8788/v1", api_key="K")' in (
        loaded.local_api.agent_example("K")
    )
    assert loaded.local_api.anthropic_example("K") == (
        "ANTHROPIC_BASE_URL=http://127.0.0.1:8788 ANTHROPIC_API_KEY=K claude"
    )
