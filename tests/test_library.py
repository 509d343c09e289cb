"""Library: Peregrine's models plus other apps' GGUFs found read-only, with real headers and real files."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import sys
from pathlib import Path

import gguf
import pytest

from app.services.models.library import (
    Library,
    ScanFolder,
    ScanLimits,
    _default_reader,
    default_scan_folders,
    scan_folders_from_strings,
)
from engine.errors import PeregrineError
from engine.paths import Paths
from tests.fake_hub import make_gguf


@pytest.fixture
def paths() -> Paths:
    return Paths.from_env().ensure()


def hostile_gguf(path: Path) -> Path:
    # Valid magic and version, then a metadata count no file could hold.
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1 << 60))
    return path


def test_peregrine_models_with_header_metadata(paths: Paths) -> None:
    folder = paths.models / "acme--Tiny-GGUF"
    folder.mkdir(parents=True)
    make_gguf(folder / "Tiny-Q8_0.gguf", file_type=gguf.LlamaFileType.MOSTLY_Q8_0, n_floats=2048)
    [entry] = Library(paths).entries()
    assert entry.id == "acme/Tiny-GGUF/Tiny-Q8_0.gguf"
    assert entry.source == "peregrine" and not entry.read_only and entry.valid
    assert entry.architecture == "llama"
    assert entry.quant == "Q8_0"
    assert entry.n_params == 2048
    assert entry.context_length == 4096
    assert entry.license == "apache-2.0"
    assert entry.has_chat_template
    assert entry.mtp_layers == 0
    assert entry.size == (folder / "Tiny-Q8_0.gguf").stat().st_size


def test_real_default_model_metadata(paths: Paths, tmp_path: Path, default_model: Path) -> None:
    lms = tmp_path / "lmstudio"
    (lms / "HuggingFaceTB" / "SmolLM2").mkdir(parents=True)
    (lms / "HuggingFaceTB" / "SmolLM2" / default_model.name).symlink_to(default_model)
    [entry] = Library(paths, [ScanFolder("lmstudio", lms)]).entries()
    assert entry.id == f"lmstudio:HuggingFaceTB/SmolLM2/{default_model.name}"
    assert entry.source == "lmstudio" and entry.read_only
    assert entry.architecture == "llama"
    assert entry.quant == "Q4_1"
    assert entry.context_length == 8192
    assert entry.has_chat_template
    assert entry.n_params is not None and 130e6 < entry.n_params < 140e6
    assert entry.size == 98_362_432


def test_split_model_is_one_entry_and_missing_parts_are_reported(paths: Paths) -> None:
    folder = paths.models / "acme--Split"
    folder.mkdir(parents=True)
    for i in (1, 2, 3):
        make_gguf(folder / f"S-F16-0000{i}-of-00003.gguf", split=(i - 1, 3))
    [entry] = Library(paths).entries()
    assert entry.name == "S-F16-00001-of-00003.gguf" and entry.valid
    assert len(entry.parts) == 3
    assert entry.size == sum(p.stat().st_size for p in folder.iterdir())
    (folder / "S-F16-00002-of-00003.gguf").unlink()
    [broken] = Library(paths).entries()
    assert not broken.valid and "missing parts" in (broken.error or "")
    assert "S-F16-00002-of-00003.gguf" in (broken.error or "")


def test_other_apps_found_read_only(
    paths: Paths, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Hugging Face cache: snapshots symlink into blobs/
    hf = tmp_path / "hf" / "hub"
    repo = hf / "models--acme--Tiny-GGUF"
    (repo / "blobs").mkdir(parents=True)
    blob = make_gguf(repo / "blobs" / "0123abcd", file_type=gguf.LlamaFileType.MOSTLY_Q4_K_M)
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "Tiny-Q4_K_M.gguf").symlink_to(blob)
    # GPT4All: files at the top of its folder
    g4a = tmp_path / "gpt4all"
    g4a.mkdir()
    make_gguf(g4a / "orca-mini-Q4_0.gguf", file_type=gguf.LlamaFileType.MOSTLY_Q4_0)
    # Ollama: manifests name the model blob by digest
    ollama = tmp_path / "ollama"
    (ollama / "blobs").mkdir(parents=True)
    tiny = make_gguf(tmp_path / "tiny.gguf", file_type=gguf.LlamaFileType.MOSTLY_Q8_0)
    digest = hashlib.sha256(tiny.read_bytes()).hexdigest()
    tiny.rename(ollama / "blobs" / f"sha256-{digest}")
    manifests = ollama / "manifests" / "registry.ollama.ai" / "library"
    (manifests / "tiny").mkdir(parents=True)
    (manifests / "tiny" / "latest").write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "layers": [
                    {
                        "mediaType": "application/vnd.ollama.image.model",
                        "digest": f"sha256:{digest}",
                    },
                    {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:00"},
                ],
            }
        )
    )
    (manifests / "broken").mkdir()
    (manifests / "broken" / "latest").write_text("{not json")
    (manifests / "gone").mkdir()
    (manifests / "gone" / "latest").write_text(
        json.dumps(
            {
                "layers": [
                    {
                        "mediaType": "application/vnd.ollama.image.model",
                        "digest": "sha256:" + "f" * 64,
                    }
                ]
            }
        )
    )
    folders = [
        ScanFolder("huggingface", hf),
        ScanFolder("gpt4all", g4a),
        ScanFolder("ollama", ollama),
        ScanFolder("lmstudio", tmp_path / "not-installed"),
    ]
    with caplog.at_level(logging.WARNING):
        entries = Library(paths, folders).entries()
    by_id = {e.id: e for e in entries}
    assert set(by_id) == {
        "hf:acme/Tiny-GGUF/Tiny-Q4_K_M.gguf",
        "gpt4all:orca-mini-Q4_0.gguf",
        "ollama:tiny:latest",
    }
    assert all(e.read_only and e.valid for e in entries)
    assert by_id["hf:acme/Tiny-GGUF/Tiny-Q4_K_M.gguf"].quant == "Q4_K_M"
    assert by_id["gpt4all:orca-mini-Q4_0.gguf"].quant == "Q4_0"
    assert by_id["ollama:tiny:latest"].path == ollama / "blobs" / f"sha256-{digest}"
    assert by_id["ollama:tiny:latest"].source == "ollama"
    assert "unreadable Ollama manifest" in caplog.text and "missing blob" in caplog.text


def test_hostile_and_garbage_files_are_listed_invalid(paths: Paths) -> None:
    folder = paths.models / "imported"
    folder.mkdir(parents=True)
    (folder / "garbage.gguf").write_bytes(b"definitely not a model")
    hostile_gguf(folder / "hostile.gguf")
    (folder / "empty.gguf").write_bytes(b"")
    make_gguf(folder / "good.gguf")
    entries = {e.name: e for e in Library(paths).entries()}
    assert entries["good.gguf"].valid
    for name in ("garbage.gguf", "hostile.gguf", "empty.gguf"):
        assert not entries[name].valid and entries[name].error


def test_delete_only_own_models(paths: Paths, tmp_path: Path) -> None:
    own = paths.models / "acme--Tiny-GGUF"
    own.mkdir(parents=True)
    make_gguf(own / "Tiny-Q8_0.gguf")
    lms = tmp_path / "lms"
    lms.mkdir()
    theirs = make_gguf(lms / "Theirs-Q4_0.gguf")
    library = Library(paths, [ScanFolder("lmstudio", lms)])
    other = library.find("Theirs-Q4_0.gguf")
    with pytest.raises(PeregrineError, match="belongs to LM Studio"):
        library.delete(other)
    assert theirs.exists()
    mine = library.find("acme/Tiny-GGUF/Tiny-Q8_0.gguf")
    assert library.reveal(mine) == own
    assert library.delete(mine) == [own / "Tiny-Q8_0.gguf"]
    assert not own.exists()  # the emptied repo folder goes too
    assert [e.id for e in library.entries()] == ["lmstudio:Theirs-Q4_0.gguf"]
    with pytest.raises(PeregrineError, match="no model"):
        library.find("Tiny-Q8_0.gguf")


def test_import_validates_first_and_copies(paths: Paths, tmp_path: Path) -> None:
    library = Library(paths)
    src = make_gguf(tmp_path / "elsewhere-Q8_0.gguf")
    entry = library.import_file(src)
    assert entry.path == paths.models / "imported" / "elsewhere-Q8_0.gguf"
    assert entry.path.read_bytes() == src.read_bytes() and src.exists()
    assert entry.valid and entry.source == "peregrine"
    assert [e.id for e in library.entries()] == ["imported/elsewhere-Q8_0.gguf"]

    with pytest.raises(PeregrineError, match="already imported"):
        library.import_file(src)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 10)
    with pytest.raises(PeregrineError):
        library.import_file(bad)
    # A truncated GGUF: the header parses, its tensor data is missing.
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(src.read_bytes()[:-100])
    with pytest.raises(PeregrineError):
        library.import_file(truncated)
    assert sorted(p.name for p in (paths.models / "imported").iterdir()) == ["elsewhere-Q8_0.gguf"]


def test_default_scan_folders_per_os(tmp_path: Path) -> None:
    home = tmp_path / "u"
    linux = {(f.source, f.path) for f in default_scan_folders("linux", home, {})}
    assert ("huggingface", home / ".cache/huggingface/hub") in linux
    assert ("lmstudio", home / ".lmstudio/models") in linux
    assert ("gpt4all", home / ".local/share/nomic.ai/GPT4All") in linux
    assert ("ollama", home / ".ollama/models") in linux
    mac = {(f.source, f.path) for f in default_scan_folders("darwin", home, {"HF_HOME": "/hf"})}
    assert ("gpt4all", home / "Library/Application Support/nomic.ai/GPT4All") in mac
    assert ("huggingface", Path("/hf/hub")) in mac
    win = {
        (f.source, f.path)
        for f in default_scan_folders(
            "win32", home, {"LOCALAPPDATA": "C:/L", "OLLAMA_MODELS": "D:/o"}
        )
    }
    assert ("gpt4all", Path("C:/L/nomic.ai/GPT4All")) in win
    assert ("ollama", Path("D:/o")) in win


def test_scan_folders_from_settings(tmp_path: Path) -> None:
    folders = scan_folders_from_strings(
        ["ollama:/x/models", str(tmp_path / ".ollama" / "models"), "/data/GPT4All", "/data/ggufs"]
    )
    assert [f.source for f in folders] == ["ollama", "ollama", "gpt4all", "lmstudio"]
    assert folders[0].path == Path("/x/models")


# --- hostile folders and files (adversarial pass) ------------------------------------------


def test_odd_things_named_like_models_are_skipped_without_blocking(
    paths: Paths, tmp_path: Path
) -> None:
    lms = tmp_path / "lms"
    (lms / "pub" / "repo").mkdir(parents=True)
    good = make_gguf(lms / "pub" / "repo" / "good.gguf")
    hostile_gguf(lms / "pub" / "hostile.gguf")
    os.mkfifo(lms / "fifo.gguf")  # opening it would wait for a writer forever
    (lms / "folder.gguf").mkdir()
    (lms / "dangling.gguf").symlink_to(tmp_path / "nowhere.gguf")
    (lms / "self.gguf").symlink_to(lms / "self.gguf")
    (lms / "pub" / "up").symlink_to(lms)  # a folder loop
    (lms / "pub" / "repo" / "again").symlink_to(lms / "pub")
    entries = Library(paths, [ScanFolder("lmstudio", lms)]).entries()
    by_id = {e.id: e for e in entries}
    assert set(by_id) == {"lmstudio:pub/hostile.gguf", "lmstudio:pub/repo/good.gguf"}
    assert by_id["lmstudio:pub/repo/good.gguf"].valid
    assert by_id["lmstudio:pub/repo/good.gguf"].path == good
    assert not by_id["lmstudio:pub/hostile.gguf"].valid


def test_a_very_deep_tree_neither_crashes_nor_hides_shallow_models(
    paths: Paths, tmp_path: Path
) -> None:
    # Deeper than the recursion limit allows: a recursive glob raised RecursionError here.
    # The limit is lowered (not the tree made 1000+ deep) so that pytest's own recursive
    # cleanup of tmp_path can still remove the tree.
    lms = tmp_path / "lms"
    lms.mkdir()
    make_gguf(lms / "top.gguf")
    deep = lms
    for _ in range(400):
        deep = deep / "d"
        os.mkdir(deep)
    make_gguf(deep / "bottom.gguf")
    frame, stack_depth = sys._getframe(), 0
    while frame is not None:
        frame, stack_depth = frame.f_back, stack_depth + 1  # type: ignore[assignment]
    old_limit = sys.getrecursionlimit()
    sys.setrecursionlimit(stack_depth + 250)
    try:
        entries = Library(paths, [ScanFolder("lmstudio", lms)]).entries()
    finally:
        sys.setrecursionlimit(old_limit)
    assert [e.id for e in entries] == ["lmstudio:top.gguf"]


def test_a_huge_folder_is_scanned_within_its_limits(
    paths: Paths, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lms = tmp_path / "lms"
    lms.mkdir()
    for i in range(60):
        (lms / f"junk{i:03d}").mkdir()
    make_gguf(paths.models / "own.gguf")
    library = Library(paths, [ScanFolder("lmstudio", lms)], limits=ScanLimits(max_entries=20))
    with caplog.at_level(logging.WARNING):
        assert [e.id for e in library.entries()] == ["own.gguf"]
    assert "stopped scanning" in caplog.text

    # Time, too: a clock that jumps 1 s per look ends the scan after max_seconds.
    ticks = iter(range(10_000))
    timed = Library(
        paths,
        [ScanFolder("lmstudio", lms)],
        limits=ScanLimits(max_seconds=5),
        clock=lambda: float(next(ticks)),
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        timed.entries()
    assert "stopped scanning" in caplog.text and "after 5 entries" in caplog.text


def test_hostile_ollama_manifests_are_skipped(
    paths: Paths, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ollama = tmp_path / "ollama"
    blobs = ollama / "blobs"
    blobs.mkdir(parents=True)
    good = make_gguf(tmp_path / "g.gguf")
    digest = hashlib.sha256(good.read_bytes()).hexdigest()
    good.rename(blobs / f"sha256-{digest}")
    # On Windows a backslash is a separator: such a digest would climb out of blobs/.
    make_gguf(blobs / "sha256-..\\..\\secret")
    manifests = ollama / "manifests" / "registry.ollama.ai" / "library" / "m"
    manifests.mkdir(parents=True)

    def manifest(tag: str, digest_: object) -> None:
        layer = {"mediaType": "application/vnd.ollama.image.model", "digest": digest_}
        (manifests / tag).write_text(json.dumps({"layers": [layer]}))

    manifest("latest", f"sha256:{digest}")
    manifest("traversal", "sha256:../../../etc/passwd")
    manifest("backslash", "sha256:..\\..\\secret")
    manifest("number", 42)
    (manifests / "deep").write_text("[" * 100_000 + "]" * 100_000)
    (manifests / "list").write_text("[1, 2]")
    (manifests / "layers-dict").write_text('{"layers": {"a": 1}}')
    os.mkfifo(manifests / "fifo")
    (manifests / "loop").symlink_to(manifests)
    with caplog.at_level(logging.WARNING):
        entries = Library(paths, [ScanFolder("ollama", ollama)]).entries()
    assert [(e.id, e.path) for e in entries] == [("ollama:m:latest", blobs / f"sha256-{digest}")]
    assert "odd digest" in caplog.text and "unreadable Ollama manifest" in caplog.text


def test_unusable_scan_folder_settings_do_not_break_listing(paths: Paths, tmp_path: Path) -> None:
    folders = scan_folders_from_strings(
        ["/tmp/a\0b", "~no-such-user-xyz/models", "lmstudio:~no-such-user-xyz/m", "ollama:/x\0y"]
    )
    assert len(folders) == 4
    assert scan_folders_from_strings(["", "  ", "lmstudio:", "ollama: "]) == []
    make_gguf(paths.models / "own.gguf")
    assert [e.id for e in Library(paths, folders).entries()] == ["own.gguf"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads chmod-000 files and folders anyway")
def test_unreadable_folders_and_files(paths: Paths, tmp_path: Path) -> None:
    lms = tmp_path / "lms"
    (lms / "locked").mkdir(parents=True)
    make_gguf(lms / "locked" / "inside.gguf")
    secret = make_gguf(lms / "secret.gguf")
    make_gguf(lms / "open.gguf")
    (lms / "locked").chmod(0)
    secret.chmod(0)
    try:
        by_id = {e.id: e for e in Library(paths, [ScanFolder("lmstudio", lms)]).entries()}
    finally:
        (lms / "locked").chmod(0o755)
    assert set(by_id) == {"lmstudio:open.gguf", "lmstudio:secret.gguf"}
    assert "permission denied" in (by_id["lmstudio:secret.gguf"].error or "")


def test_delete_checks_every_part_before_deleting_any(paths: Paths, tmp_path: Path) -> None:
    folder = paths.models / "acme--Split"
    folder.mkdir(parents=True)
    outside = make_gguf(tmp_path / "outside.gguf", split=(1, 2))
    first = make_gguf(folder / "S-F16-00001-of-00002.gguf", split=(0, 2))
    (folder / "S-F16-00002-of-00002.gguf").symlink_to(outside)
    library = Library(paths)
    entry = library.find("acme/Split/S-F16-00001-of-00002.gguf")
    with pytest.raises(PeregrineError, match="outside Peregrine's models folder"):
        library.delete(entry)
    assert first.exists() and outside.exists()

    (folder / "S-F16-00002-of-00002.gguf").unlink()
    (folder / "S-F16-00002-of-00002.gguf").mkdir()  # a folder where a part should be
    entry = library.find("acme/Split/S-F16-00001-of-00002.gguf")
    with pytest.raises(PeregrineError, match="is a folder"):
        library.delete(entry)
    assert first.exists()


def test_symlinks_out_of_the_models_folder_are_never_followed_or_deleted(
    paths: Paths, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = make_gguf(outside / "victim.gguf")
    (paths.models / "linked-folder").symlink_to(outside)
    (paths.models / "link.gguf").symlink_to(victim)
    library = Library(paths)
    assert [e.id for e in library.entries()] == ["link.gguf"]  # not linked-folder/victim.gguf
    with pytest.raises(PeregrineError, match="no model"):
        library.find("linked-folder/victim.gguf")
    with pytest.raises(PeregrineError, match="outside"):
        library.delete(library.find("link.gguf"))
    assert victim.exists()


def test_a_folder_listed_many_times_is_scanned_once(paths: Paths, tmp_path: Path) -> None:
    lms = tmp_path / "lms"
    lms.mkdir()
    make_gguf(lms / "m.gguf")
    (tmp_path / "alias").symlink_to(lms)
    looks: list[Path] = []

    def reader(path: Path) -> object:
        looks.append(path)
        return _default_reader(path)

    folders = [ScanFolder("lmstudio", lms)] * 50 + [ScanFolder("lmstudio", tmp_path / "alias")]
    entries = Library(paths, folders, header_reader=reader).entries()
    assert [e.id for e in entries] == ["lmstudio:m.gguf"]
    assert len(looks) == 1


def test_header_reads_of_one_listing_are_bounded_in_time(paths: Paths, tmp_path: Path) -> None:
    lms = tmp_path / "lms"
    lms.mkdir()
    for i in range(5):
        make_gguf(lms / f"m{i}.gguf")
    now = [0.0]

    def slow_reader(path: Path) -> object:
        now[0] += 10.0  # each header read "takes" 10 s
        return _default_reader(path)

    library = Library(
        paths,
        [ScanFolder("lmstudio", lms)],
        header_reader=slow_reader,
        limits=ScanLimits(max_read_seconds=25),
        clock=lambda: now[0],
    )
    entries = library.entries()
    assert [e.name for e in entries] == [f"m{i}.gguf" for i in range(5)]  # all still listed
    assert [e.valid for e in entries] == [True, True, True, False, False]
    assert "header not read" in (entries[3].error or "")
    # The next listing starts a fresh budget.
    assert library.entries()[0].valid


def test_a_models_folder_moved_behind_a_symlink_still_lists_and_deletes(tmp_path: Path) -> None:
    # Users move models/ to a bigger disk and leave a symlink: that is Peregrine's folder.
    paths = Paths.from_env().ensure()
    paths.models.rmdir()
    big = tmp_path / "big-disk" / "models"
    big.mkdir(parents=True)
    paths.models.symlink_to(big)
    (big / "acme--Tiny").mkdir()
    make_gguf(big / "acme--Tiny" / "Tiny-Q8_0.gguf")
    library = Library(paths)
    entry = library.find("acme/Tiny/Tiny-Q8_0.gguf")
    assert library.delete(entry) == [paths.models / "acme--Tiny" / "Tiny-Q8_0.gguf"]
    assert not (big / "acme--Tiny").exists() and big.is_dir()


def test_the_built_in_model_is_listed_first_and_never_deleted(
    paths: Paths, default_model: Path
) -> None:
    own = paths.models / "imported"
    own.mkdir(parents=True)
    make_gguf(own / "Tiny-Q8_0.gguf", file_type=gguf.LlamaFileType.MOSTLY_Q8_0, n_floats=2048)
    library = Library(paths, builtin=lambda: default_model)
    builtin, mine = library.entries()
    assert (builtin.id, builtin.source, builtin.read_only) == ("built-in", "builtin", True)
    assert builtin.path == default_model and builtin.architecture == "llama"
    assert mine.id == "imported/Tiny-Q8_0.gguf"
    with pytest.raises(PeregrineError, match="ships with Peregrine"):
        library.delete(builtin)
    assert default_model.exists()


def test_a_models_folder_from_settings_and_fit_badges(paths: Paths, tmp_path: Path) -> None:
    elsewhere = tmp_path / "big-disk" / "models"
    elsewhere.mkdir(parents=True)
    make_gguf(elsewhere / "Tiny-Q8_0.gguf", file_type=gguf.LlamaFileType.MOSTLY_Q8_0, n_floats=64)
    make_gguf(paths.models / "Old-Q8_0.gguf", file_type=gguf.LlamaFileType.MOSTLY_Q8_0)
    seen: list[tuple[str, int]] = []

    class Badge:
        level = "cpu"
        summary = "CPU only, 4096 tokens"

    def fit(name: str, header: object, size: int) -> Badge:
        seen.append((name, size))
        if name.startswith("Broken"):
            raise RuntimeError("planner failed")
        return Badge()

    make_gguf(elsewhere / "Broken-Q8_0.gguf", file_type=gguf.LlamaFileType.MOSTLY_Q8_0)
    library = Library(paths, models_dir=elsewhere, fit=fit)
    entries = {e.name: e for e in library.entries()}
    assert set(entries) == {"Tiny-Q8_0.gguf", "Broken-Q8_0.gguf"}  # not the default folder's
    assert entries["Tiny-Q8_0.gguf"].fit is not None
    assert entries["Tiny-Q8_0.gguf"].fit.level == "cpu"
    assert entries["Broken-Q8_0.gguf"].fit is None and entries["Broken-Q8_0.gguf"].valid
    source = tmp_path / "New-Q8_0.gguf"
    make_gguf(source, file_type=gguf.LlamaFileType.MOSTLY_Q8_0)
    imported = library.import_file(source)
    assert imported.path == elsewhere / "imported" / "New-Q8_0.gguf"
    assert library.delete(imported) == [imported.path]
