"""`peregrine pull/ls/rm/search` as a user runs them: the real CLI in a subprocess against the loopback hub."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app import cli
from app.services.models import cli as models_cli
from app.services.models.downloads import Downloader
from engine.paths import Paths
from tests.fake_hub import FakeHub, add_tiny_repo, running_hub

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, default_model: Path) -> Iterator[FakeHub]:
    with running_hub() as h:
        monkeypatch.setenv("HF_ENDPOINT", h.endpoint)
        h.add_repo(DEFAULT_REPO).add(DEFAULT_FILE, default_model)
        add_tiny_repo(h, tmp_path / "tiny")
        yield h


def peregrine(*args: str, **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT,
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )


def ls_ids() -> list[str]:
    result = run("ls", "--json", "--own")
    assert result.returncode == 0, result.stderr
    return [e["id"] for e in json.loads(result.stdout)]


def wait_until(pred: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_pull_killed_half_way_resumes_from_the_bytes_on_disk(
    hub: FakeHub, default_model: Path
) -> None:
    size = default_model.stat().st_size
    downloads = Paths.from_env().downloads
    hub.bytes_per_second = 40e6  # about 2.5 s for the whole file: time to kill it half way

    def on_disk() -> int:
        return sum(p.stat().st_size for p in downloads.glob("*.part")) if downloads.is_dir() else 0

    proc = peregrine("pull", DEFAULT_REPO, DEFAULT_FILE)
    try:
        wait_until(lambda: on_disk() >= size * 0.45 or proc.poll() is not None)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    kept = on_disk()
    assert 0.4 * size <= kept < size, "the first pull was not stopped half way"
    first_run_requests = len(hub.file_requests(DEFAULT_REPO, DEFAULT_FILE))

    hub.bytes_per_second = None
    result = run("pull", DEFAULT_REPO, DEFAULT_FILE)
    assert result.returncode == 0, result.stderr
    final = Path(result.stdout.strip())
    assert final.name == DEFAULT_FILE
    assert "resuming:" in result.stderr

    second = hub.file_requests(DEFAULT_REPO, DEFAULT_FILE)[first_run_requests:]
    assert second, "the second pull made no request"
    assert second[0].range is not None and second[0].range.startswith("bytes=")
    assert int(second[0].range[len("bytes=") :].rstrip("-")) >= kept
    served = hub.served[f"{DEFAULT_REPO}/{DEFAULT_FILE}"]
    print(f"kept {kept} of {size}; resumed at {second[0].range}; served {served / size:.3f}x")
    assert served <= 1.1 * size
    assert (
        hashlib.sha256(final.read_bytes()).hexdigest()
        == hub.repos[DEFAULT_REPO].files[DEFAULT_FILE].sha256
    )
    assert f"{DEFAULT_REPO}/{DEFAULT_FILE}" in ls_ids()
    assert list(downloads.iterdir()) == []


def test_flipped_byte_fails_and_ls_never_lists_it(hub: FakeHub) -> None:
    hub.corrupt.add("acme/Tiny-GGUF/Tiny-Q8_0.gguf")
    result = run("pull", "acme/Tiny-GGUF", "--quant", "Q8_0")
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()[-1:]
    assert "SHA-256 mismatch" in line and "deleted" in line
    assert "Traceback" not in result.stderr
    assert ls_ids() == []


def test_gated_repo_without_token_says_what_to_do(hub: FakeHub) -> None:
    hub.add_repo("acme/Gated-GGUF", gated=True).add("g-Q4_0.gguf", b"GGUF" * 100)
    result = run("pull", "acme/Gated-GGUF", "g-Q4_0.gguf")
    assert result.returncode == 1
    assert "acme/Gated-GGUF is gated" in result.stderr and "HF_TOKEN" in result.stderr
    assert "Traceback" not in result.stderr


def test_full_disk_gives_clear_error_and_keeps_partial(
    hub: FakeHub, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    limit = 20_000_000

    def open_writer(path: Path) -> Any:
        fh = path.open("ab")

        class Writer:
            def write(self, data: bytes) -> int:
                room = limit - fh.tell()
                if len(data) > room:
                    fh.write(data[:room])
                    raise OSError(errno.ENOSPC, "No space left on device")
                return fh.write(data)

            def __getattr__(self, name: str) -> Any:
                return getattr(fh, name)

        return Writer()

    real = Downloader
    monkeypatch.setattr(
        models_cli, "Downloader", lambda *a, **k: real(*a, **k, open_writer=open_writer)
    )
    code = cli.main(["pull", DEFAULT_REPO, DEFAULT_FILE])
    err = capsys.readouterr().err
    assert code == 1
    assert "disk filled up while downloading" in err and "partial file is kept" in err
    [partial] = Paths.from_env().downloads.glob("*.part")
    assert partial.stat().st_size == limit


def test_pull_picks_by_quant_and_lists_quants(hub: FakeHub) -> None:
    listed = run("pull", "acme/Tiny-GGUF", "--list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert {line.split()[0] for line in lines} == {"Q8_0", "Q4_K_M", "IQ4_XS", "F16"}
    assert any("Tiny-F16.gguf (3 parts)" in line for line in lines)

    ambiguous = run("pull", "acme/Tiny-GGUF")
    # Without the planner there is no pick: the user is asked to choose (bad usage: exit 2).
    if ambiguous.returncode != 0:
        assert ambiguous.returncode == 2 and "--quant" in ambiguous.stderr

    split = run("pull", "acme/Tiny-GGUF", "--quant", "F16")
    assert split.returncode == 0, split.stderr
    assert len(split.stdout.split()) == 3
    ids = ls_ids()
    assert "acme/Tiny-GGUF/Tiny-F16-00001-of-00003.gguf" in ids
    assert not any("00002-of" in i for i in ids)

    missing = run("pull", "acme/Tiny-GGUF", "--quant", "Q2_K")
    assert missing.returncode == 1 and "has no quant Q2_K" in missing.stderr


def test_ls_and_rm(hub: FakeHub) -> None:
    assert run("pull", "acme/Tiny-GGUF", "Tiny-IQ4_XS.gguf").returncode == 0
    listing = run("ls")
    assert "acme/Tiny-GGUF/Tiny-IQ4_XS.gguf" in listing.stdout and "IQ4_XS" in listing.stdout
    removed = run("rm", "Tiny-IQ4_XS.gguf")
    assert removed.returncode == 0, removed.stderr
    assert ls_ids() == []
    again = run("rm", "Tiny-IQ4_XS.gguf")
    assert again.returncode == 1 and "no model" in again.stderr


def test_search(hub: FakeHub) -> None:
    result = run("search", "tiny")
    assert result.returncode == 0, result.stderr
    assert "acme/Tiny-GGUF" in result.stdout and "apache-2.0" in result.stdout
    bad = run("search", "tiny", "--limit", "0")
    assert bad.returncode == 2


# --- hostile files and faulty environments (adversarial pass) ------------------------------


def _settings(folders: list[str]) -> None:
    paths = Paths.from_env().ensure()
    paths.settings_file.write_text(
        json.dumps({"schema_version": 1, "library_scan_folders": folders})
    )


def test_ls_lists_a_non_utf8_file_name_on_a_strict_utf8_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lms = tmp_path / "lms"
    lms.mkdir()
    (lms / "ok.gguf").write_bytes(b"not a model")
    with open(os.path.join(os.fsencode(lms), b"caf\xe9.gguf"), "wb") as f:
        f.write(b"GGUF")
    _settings([f"lmstudio:{lms}"])
    monkeypatch.setenv("PYTHONIOENCODING", "utf-8:strict")
    listing = run("ls")
    assert listing.returncode == 0, listing.stderr
    assert "lmstudio:caf\ufffd.gguf" in listing.stdout and "lmstudio:ok.gguf" in listing.stdout
    as_json = run("ls", "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert {e["id"] for e in json.loads(as_json.stdout)} == {
        "built-in",  # the built-in model is always listed first
        "lmstudio:caf\udce9.gguf",  # lossless: the bytes round-trip through os.fsencode
        "lmstudio:ok.gguf",
    }


def test_ls_with_a_fifo_as_settings_file_does_not_hang(tmp_path: Path) -> None:
    paths = Paths.from_env().ensure()
    os.mkfifo(paths.settings_file)
    result = run("ls", "--own")
    assert result.returncode == 0, result.stderr
    assert "not a regular file" in result.stderr
    assert stat_is_fifo(paths.settings_file)  # left as it was


def stat_is_fifo(path: Path) -> bool:
    import stat

    return stat.S_ISFIFO(path.lstat().st_mode)


def test_rm_never_deletes_outside_the_models_folder(tmp_path: Path) -> None:
    paths = Paths.from_env().ensure()
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.gguf"
    victim.write_bytes(b"GGUF precious")
    (paths.models / "link.gguf").symlink_to(victim)
    (paths.models / "linked").symlink_to(outside)
    lms = tmp_path / "lms"
    lms.mkdir()
    theirs = lms / "theirs.gguf"
    theirs.write_bytes(b"GGUF theirs")
    _settings([f"lmstudio:{lms}"])
    for ref, message in (
        ("../outside/victim.gguf", "no model"),
        (str(victim), "no model"),
        ("linked/victim.gguf", "no model"),
        ("link.gguf", "outside Peregrine's models folder"),
        ("lmstudio:theirs.gguf", "never deletes other apps' files"),
        ("theirs.gguf", "never deletes other apps' files"),
    ):
        result = run("rm", ref)
        assert result.returncode == 1, (ref, result.stderr)
        assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert victim.read_bytes() == b"GGUF precious" and theirs.read_bytes() == b"GGUF theirs"


def test_control_characters_in_names_never_reach_the_terminal(tmp_path: Path) -> None:
    lms = tmp_path / "lms"
    lms.mkdir()
    (lms / "evil\x1b[2J\nfake-line.gguf").write_bytes(b"not a model")
    _settings([f"lmstudio:{lms}"])
    listing = run("ls")
    assert listing.returncode == 0, listing.stderr
    assert "\x1b" not in listing.stdout
    lines = listing.stdout.splitlines()
    assert lines[0].startswith("built-in ") and "[builtin (read-only)]" in lines[0]
    assert lines[1:] == [line for line in lines if line.startswith("lmstudio:evil?[2J?fake")]


@pytest.mark.parametrize(
    "args",
    [
        ["pull", "acme/Tiny-GGUF", "--quant", ""],
        ["pull", "acme/Tiny-GGUF", ""],
        ["pull", "acme/Tiny-GGUF", "--revision", " "],
        ["search", ""],
        ["search", "tiny", "--limit", "1000000000"],
    ],
)
def test_empty_and_absurd_arguments_are_usage_errors(hub: FakeHub, args: list[str]) -> None:
    result = run(*args)
    assert result.returncode == 2, result.stderr
    assert result.stdout == "" and result.stderr.count("\n") == 1
    assert not any(Paths.from_env().models.rglob("*.gguf"))  # nothing was downloaded
