"""Runtime packs: the index schema, downloads with resume, safe unpacking, install and remove.

Real components: a loopback HTTP server (tests/pack_server.py) serves an index and
a real pack, made at test time from the installed llama-cpp-python's libraries;
self-tests run in real child processes on the built-in model; the CLI runs as a
subprocess.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from engine.paths import Paths
from engine.runtime_packs import (
    MAX_INDEX_BYTES,
    ChecksumError,
    DiskFullError,
    IndexError_,
    Machine,
    Pack,
    PackDownloader,
    PackError,
    Requires,
    RuntimePacks,
    UnsafePackError,
    check_url,
    describe_machine,
    fetch_index,
    parse_index,
    suggested,
    this_platform,
    unsuitable,
    write_index_entry,
)
from engine.runtimes import RuntimeSelector, SelfTest
from tests.pack_server import (
    PackServer,
    make_archive,
    running_pack_server,
    runtime_folder,
)

SHA = "ab" * 32
PLAT = this_platform()


def entry(**change: Any) -> dict[str, Any]:
    base = {
        "name": "cuda",
        "backend": "cuda",
        "platform": PLAT,
        "url": "https://example.org/packs/peregrine-runtime-cuda.tar.gz",
        "size": 400_000_000,
        "sha256": SHA,
        "llama_cpp_commit": "0c1e57098bba43ac29e6e3b677cdceebdd22334f",
        "requires": {"gpu": "nvidia", "min_driver": "580.65"},
    }
    return {**base, **change}


def index(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"schema_version": 1, "packs": list(entries)}


# --- the index -----------------------------------------------------------------------------


def test_an_index_reads_back_with_relative_urls_resolved() -> None:
    packs = parse_index(
        index(entry(), entry(name="cpu", backend="cpu", url="cpu.tar.gz", requires={})),
        "https://example.org/releases/latest/download/runtime-index.json",
    )
    assert [p.name for p in packs] == ["cuda", "cpu"]
    assert packs[0].requires == Requires("nvidia", "580.65")
    assert packs[1].url == "https://example.org/releases/latest/download/cpu.tar.gz"
    # What the index writer writes reads back the same.
    assert parse_index(index(*(p.to_json() for p in packs))) == packs


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "../x"}, "packs[0].name must be a runtime name"),
        ({"name": ".hidden"}, "packs[0].name must be a runtime name"),
        ({"name": "a/b"}, "packs[0].name must be a runtime name"),
        ({"name": "default"}, "packs[0].name must be a runtime name"),
        ({"name": 7}, "packs[0].name must be a runtime name"),
        ({"backend": "CUDA!"}, "packs[0].backend"),
        ({"url": "http://example.org/x.tar.gz"}, "is not an https address"),
        ({"url": "file:///etc/passwd"}, "is not an https address"),
        ({"url": "ftp://example.org/x"}, "is not an https address"),
        ({"url": ["x"]}, "packs[0].url must be an address"),
        ({"size": 1 << 40}, "packs[0].size must be a byte count"),
        ({"size": True}, "packs[0].size must be a byte count"),
        ({"size": "12"}, "packs[0].size must be a byte count"),
        ({"size": 0}, "packs[0].size must be a byte count"),
        ({"sha256": "AB" * 32}, "packs[0].sha256 must be 64 lower-case hex"),
        ({"sha256": None}, "packs[0].sha256"),
        ({"llama_cpp_commit": "zz"}, "llama_cpp_commit must be a git commit"),
        ({"requires": {"gpu": "amd"}}, 'requires.gpu must be "nvidia", "vulkan"'),
        ({"requires": {"gpu": "nvidia", "min_driver": "new"}}, "min_driver must be"),
        ({"requires": []}, "requires must be an object"),
    ],
)
def test_a_bad_index_entry_is_named(change: dict[str, Any], message: str) -> None:
    with pytest.raises(IndexError_, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse_index(index(entry(**change)))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "must be a JSON object"),
        ({"packs": []}, "schema_version null"),
        ({"schema_version": 2, "packs": []}, "schema_version 2"),
        ({"schema_version": 1, "packs": {}}, "'packs' must be a list"),
        (index(*[entry(name=f"p{i}") for i in range(300)]), "lists 300 packs"),
        (index(entry(), entry()), "twice"),
    ],
)
def test_a_bad_index_is_refused(data: Any, message: str) -> None:
    with pytest.raises(IndexError_, match=message):
        parse_index(data)


def test_plain_http_is_allowed_only_to_this_computer() -> None:
    for ok in ("http://127.0.0.1:8/x", "http://localhost/x", "http://[::1]:9/x", "https://a.b/x"):
        assert check_url(ok, "x") == ok
    for bad in ("http://10.0.0.1/x", "http://example.org/x", "https:///x", "x"):
        with pytest.raises(IndexError_, match="not an https address"):
            check_url(bad, "x")


def test_a_huge_or_broken_index_is_refused() -> None:
    with running_pack_server() as server:
        server.files["runtime-index.json"] = b"[" * (MAX_INDEX_BYTES + 10)
        with pytest.raises(IndexError_, match="larger than"):
            fetch_index(server.index_url)
        server.files["runtime-index.json"] = b'{"schema_version": 1, "packs": [}'
        with pytest.raises(IndexError_, match="not valid JSON"):
            fetch_index(server.index_url)
        with pytest.raises(IndexError_, match="answered HTTP 404"):
            fetch_index(f"{server.url}/nothing.json")
        # A pack URL in an index served over loopback http must still be https or loopback.
        server.files["runtime-index.json"] = json.dumps(
            index(entry(url="http://a.example/x"))
        ).encode()
        with pytest.raises(IndexError_, match="not an https address"):
            fetch_index(server.index_url)


def test_the_index_writer_merges_entries(tmp_path: Path) -> None:
    target = tmp_path / "runtime-index.json"
    cpu = Pack("cpu", "cpu", PLAT, "cpu.tar.gz", 10, SHA)
    write_index_entry(target, cpu)
    write_index_entry(
        target,
        Pack("cuda", "cuda", PLAT, "cuda.tar.gz", 20, SHA, None, Requires("nvidia", "580.65")),
    )
    write_index_entry(target, Pack("cpu", "cpu", PLAT, "cpu.tar.gz", 11, "cd" * 32))
    packs = parse_index(json.loads(target.read_text()), "https://r.example/d/")
    assert [(p.name, p.size) for p in packs] == [("cpu", 11), ("cuda", 20)]
    assert packs[0].url == "https://r.example/d/cpu.tar.gz"


# --- which packs suit this machine -------------------------------------------------------------


def _packs() -> list[Pack]:
    return parse_index(
        index(
            entry(),
            entry(name="vulkan", backend="vulkan", requires={"gpu": "vulkan"}),
            entry(name="cpu", backend="cpu", requires={}),
            entry(name="cpu-arm", backend="cpu", platform="linux-aarch64", requires={}),
        )
    )


def test_an_nvidia_gpu_gets_cuda_and_any_vulkan_gpu_vulkan() -> None:
    packs = _packs()
    nvidia = describe_machine(
        ["cuda"], driver=lambda: "nvidia 580.95.05", vulkan_loader=lambda: True
    )
    assert nvidia.nvidia_driver == "580.95.05"
    assert [p.name for p in packs if unsuitable(p, nvidia) is None] == ["cuda", "vulkan", "cpu"]
    assert suggested(packs, nvidia) == packs[0]
    old = Machine(PLAT, "535.104.05", True)
    assert unsuitable(packs[0], old) == (
        "it needs NVIDIA driver 580.65 or newer (this one is 535.104.05)"
    )
    assert suggested(packs, old) == packs[1]
    no_nvml = describe_machine(["cuda"], driver=lambda: "none", vulkan_loader=lambda: False)
    assert unsuitable(packs[0], no_nvml) == (
        "it needs NVIDIA driver 580.65 or newer (this one is unknown)"
    )
    assert suggested(packs, no_nvml) == packs[2]
    amd = describe_machine(["hip"], vulkan_loader=lambda: True)
    assert unsuitable(packs[0], amd) == "it needs an NVIDIA GPU"
    assert suggested(packs, amd) == packs[1]
    cpu_only = describe_machine([], vulkan_loader=lambda: True)
    assert suggested(packs, cpu_only) == packs[2]
    assert unsuitable(packs[1], cpu_only) == "it needs a GPU with a Vulkan driver"
    assert (
        "it is for linux-aarch64" in (unsuitable(packs[3], cpu_only) or "")
        or PLAT == "linux-aarch64"
    )


# --- downloads -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pack_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A real cpu pack: the installed wheel's libraries in the runtimes layout."""
    work = tmp_path_factory.mktemp("pack")
    return make_archive(runtime_folder(work), work / "cpu.tar.gz")


def _pack_of(server: PackServer) -> Pack:
    return fetch_index(server.index_url)[0]


def test_a_download_cut_mid_file_resumes_with_range(pack_bytes: bytes) -> None:
    paths = Paths.from_env()
    with running_pack_server() as server:
        server.add_pack(pack_bytes)
        pack = _pack_of(server)
        cut = len(pack_bytes) // 3
        server.drop_after[pack.url.rsplit("/", 1)[1]] = cut
        # No retries: the first run fails and keeps its partial file.
        with pytest.raises(PackError, match="partial file is kept"):
            PackDownloader(paths, sleep=lambda s: None, retries=0).download(pack)
        part = PackDownloader(paths).partial_path(pack)
        kept = part.stat().st_size
        assert 0 < kept <= cut  # a last chunk cut short is fetched again
        seen: list[tuple[int, int]] = []
        done = PackDownloader(paths, sleep=lambda s: None).download(
            pack, progress=lambda d, t: seen.append((d, t))
        )
        assert done.read_bytes() == pack_bytes
        assert server.requests[-1][1] == f"bytes={kept}-"
        assert seen[0] == (kept, len(pack_bytes)) and seen[-1] == (len(pack_bytes),) * 2
        # Within one run, a cut is retried from the bytes on disk.
        done.unlink()
        server.drop_after[pack.url.rsplit("/", 1)[1]] = cut
        again = PackDownloader(paths, sleep=lambda s: None).download(pack)
        assert again.read_bytes() == pack_bytes
        assert server.requests[-2][1] is None and server.requests[-1][1] == f"bytes={kept}-"


def test_a_wrong_sha256_is_refused_and_nothing_is_installed(pack_bytes: bytes) -> None:
    paths = Paths.from_env()
    with running_pack_server() as server:
        server.add_pack(pack_bytes, sha256="cd" * 32)
        pack = _pack_of(server)
        with pytest.raises(ChecksumError, match="SHA-256 mismatch"):
            RuntimePacks(paths).install(pack)
    assert not (paths.runtimes / "cpu").exists()
    assert not list(paths.downloads.glob("*.part"))
    assert not list(paths.data.glob(".runtime-*"))


def test_a_full_disk_is_refused_before_any_byte_and_keeps_the_old_runtime(
    pack_bytes: bytes,
) -> None:
    paths = Paths.from_env()
    old = runtime_folder(paths.runtimes)
    with running_pack_server() as server:
        server.add_pack(pack_bytes)
        pack = _pack_of(server)
        packs = RuntimePacks(paths, PackDownloader(paths, disk_free=lambda p: 1000))
        with pytest.raises(DiskFullError, match="not enough free disk space"):
            packs.install(pack)
        assert not any(name for name, _ in server.requests if name.endswith(".tar.gz"))
    assert (old / "runtime.json").is_file()


def test_a_cancelled_download_removes_its_partial(pack_bytes: bytes) -> None:
    paths = Paths.from_env()
    with running_pack_server() as server:
        server.add_pack(pack_bytes)
        pack = _pack_of(server)
        with pytest.raises(PackError, match="cancelled"):
            RuntimePacks(paths).install(pack, should_stop=lambda: True)
    assert not list(paths.downloads.glob("*.part"))
    assert not (paths.runtimes / "cpu").exists()


# --- unpacking ---------------------------------------------------------------------------------


def _hostile(tmp_path: Path, add: Any) -> Path:
    folder = tmp_path / "src" / "cpu"
    (folder / "lib").mkdir(parents=True)
    (folder / "runtime.json").write_text("{}")
    out = tmp_path / "evil.tar.gz"
    with tarfile.open(out, "w:gz") as tar:
        tar.add(folder, arcname="cpu")
        add(tar)
    return out


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", data: bytes = b"x") -> Any:
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = link
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

    return add


@pytest.mark.parametrize(
    ("add", "message"),
    [
        (_member("cpu/../../escaped.txt"), "outside its folder"),
        (_member("../escaped.txt"), "outside its folder"),
        (_member("/tmp/escaped.txt"), "absolute path"),
        (_member("other/file"), "outside its folder"),
        (_member("cpu/lib/out", tarfile.SYMTYPE, "../../../escaped"), "link leaving its folder"),
        (_member("cpu/lib/abs", tarfile.SYMTYPE, "/etc/passwd"), "link to an absolute path"),
        (_member("cpu/lib/hard", tarfile.LNKTYPE, "/etc/passwd"), "hard link"),
        (_member("cpu/lib/null", tarfile.CHRTYPE), "device or pipe"),
        (_member("cpu/lib/disk", tarfile.BLKTYPE), "device or pipe"),
        (_member("cpu/lib/fifo", tarfile.FIFOTYPE), "device or pipe"),
    ],
)
def test_a_hostile_pack_is_refused_and_nothing_is_written(
    tmp_path: Path, add: Any, message: str
) -> None:
    paths = Paths.from_env()
    archive = _hostile(tmp_path, add)
    with pytest.raises(UnsafePackError, match=message):
        RuntimePacks(paths).install_archive(archive, "cpu")
    assert not (paths.runtimes / "cpu").exists()
    assert not list(paths.data.glob(".runtime-*"))
    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/escaped.txt").exists()


def test_an_archive_that_is_not_a_pack_is_refused(tmp_path: Path) -> None:
    paths = Paths.from_env()
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(UnsafePackError, match="cannot be unpacked"):
        RuntimePacks(paths).install_archive(junk, "cpu")
    empty = tmp_path / "empty.tar.gz"
    with tarfile.open(empty, "w:gz") as tar:
        tar.addfile(tarfile.TarInfo("cpu/lib/x"), io.BytesIO(b""))
    with pytest.raises(UnsafePackError, match=r"no cpu/runtime\.json"):
        RuntimePacks(paths).install_archive(empty, "cpu")


def test_a_pack_failing_its_self_test_keeps_the_old_runtime(tmp_path: Path) -> None:
    paths = Paths.from_env()
    old = runtime_folder(paths.runtimes)
    (old / "marker").write_text("the old one")
    broken = tmp_path / "src" / "cpu"
    (broken / "lib").mkdir(parents=True)
    for lib in ("libggml.so", "libggml-base.so", "libllama.so"):
        (broken / "lib" / lib).write_bytes(b"\x7fELF but not really" + os.urandom(64))
    (broken / "runtime.json").write_text(json.dumps({"schema_version": 1, "backend": "cpu"}))
    archive = tmp_path / "broken.tar.gz"
    make_archive(broken, archive)
    with pytest.raises(
        PackError, match="it was not installed; the runtime installed before is kept"
    ):
        RuntimePacks(paths).install_archive(archive, "cpu")
    assert (old / "marker").read_text() == "the old one"
    assert not list(paths.data.glob(".runtime-*"))


def test_a_pack_installs_replaces_the_old_version_and_its_self_test_is_remembered(
    pack_bytes: bytes,
) -> None:
    paths = Paths.from_env()
    old = runtime_folder(paths.runtimes)
    (old / "marker").write_text("the old one")
    with running_pack_server() as server:
        server.add_pack(pack_bytes)
        folder = RuntimePacks(paths).install(_pack_of(server))
    assert folder == paths.runtimes / "cpu"
    assert not (folder / "marker").exists()
    assert (folder / "lib" / "libllama.so").exists()
    assert not list(paths.downloads.glob("*.part")) and not list(paths.data.glob(".runtime-*"))
    # The next engine start finds the self-test passed and does not run it again.
    cached = RuntimeSelector(paths).cached_result("cpu")
    assert cached is not None and cached.ok
    calls: list[Path] = []

    def counted(lib: Path, gpu: bool) -> SelfTest:
        calls.append(lib)
        return SelfTest(False, "must not run")

    chosen = RuntimeSelector(paths, self_test=counted).choose("cpu")
    assert (chosen.name, chosen.fallback_reason, calls) == ("cpu", None, [])
    [listed] = RuntimePacks(paths).installed()
    assert (listed.name, listed.backend, listed.self_test, listed.problem) == (
        "cpu",
        "cpu",
        "passed",
        None,
    )


def test_remove_deletes_a_runtime_and_refuses_names_that_are_not_one() -> None:
    paths = Paths.from_env()
    runtime_folder(paths.runtimes)
    RuntimePacks(paths).remove("cpu")
    assert not (paths.runtimes / "cpu").exists()
    for bad, message in (
        ("cpu", "no runtime 'cpu'"),
        ("../x", "not an installed"),
        ("default", "built-in"),
    ):
        with pytest.raises(PackError, match=message):
            RuntimePacks(paths).remove(bad)


# --- the CLI ---------------------------------------------------------------------------------------


def _cli(*args: str, index_url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PEREGRINE_RUNTIME_INDEX": index_url}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "runtime", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )


def test_the_cli_lists_pulls_and_removes_a_runtime(pack_bytes: bytes) -> None:
    paths = Paths.from_env()
    with running_pack_server() as server:
        server.add_pack(pack_bytes)
        server.add_pack(b"x" * 100, name="cuda", backend="cuda", requires={"gpu": "nvidia"})
        url = server.index_url
        listed = _cli("list", index_url=url)
        assert listed.returncode == 0, listed.stderr
        assert "installed:\n  none" in listed.stdout
        assert "cpu" in listed.stdout and "<- suggested" in listed.stdout
        assert "cuda" not in listed.stdout  # no NVIDIA GPU here
        assert "cuda" in _cli("list", "--all", index_url=url).stdout

        refused = _cli("pull", "cuda", index_url=url)
        assert refused.returncode == 1
        assert refused.stderr.strip().splitlines() == [
            "peregrine runtime: error: the cuda runtime does not suit this computer: "
            "it needs an NVIDIA GPU (--force)"
        ]
        missing = _cli("pull", "nope", index_url=url)
        assert (missing.returncode, "the runtime index has no pack 'nope' (packs: cpu, cuda)") == (
            1,
            missing.stderr.split("error: ")[-1].strip(),
        )

        pulled = _cli("pull", "cpu", index_url=url)
        assert pulled.returncode == 0, pulled.stderr
        assert "installed runtime cpu (cpu)" in pulled.stdout
        assert (paths.runtimes / "cpu" / "runtime.json").is_file()
        listed = _cli("list", index_url=url)
        assert "cpu          cpu      self-test passed" in listed.stdout

        removed = _cli("rm", "cpu", index_url=url)
        assert removed.returncode == 0 and "removed runtime cpu" in removed.stdout
        assert not (paths.runtimes / "cpu").exists()
        again = _cli("rm", "cpu", index_url=url)
        assert again.returncode == 1 and "no runtime 'cpu' is installed" in again.stderr
        # A bad index address is one clear line, and the installed list still shows.
        bad = _cli("list", index_url="http://example.org/index.json")
        assert bad.returncode == 0 and "available: unknown" in bad.stdout
        assert "Traceback" not in bad.stderr


def test_an_index_host_that_cannot_be_reached_is_said_in_plain_words() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends: nothing listens there
    with pytest.raises(IndexError_) as info:
        fetch_index(f"http://127.0.0.1:{port}/runtime-index.json")
    assert str(info.value).startswith(
        "could not reach 127.0.0.1 for the runtime index (is this computer online?)"
    )
