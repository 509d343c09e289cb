"""Runtime packs: engine runtimes downloaded from an index, verified, unpacked and self-tested.

A pack is one archive, `peregrine-runtime-<name>-<platform>.tar.gz`, holding
the runtime folder `<name>/` (runtime.json and lib/; docs/api.md, "Engine
runtimes"). The index is a JSON document listing the packs with their size and
SHA-256 (docs/api.md, "Runtime pack index"); it comes from
`PEREGRINE_RUNTIME_INDEX` or the project's release.

A download goes to `downloads/runtime-<name>-<sha256>.part`, resumed with Range
requests, and is checked against the index's SHA-256 before anything is
unpacked. The archive is unpacked into a temporary folder beside `runtimes/`
with every member checked first (no absolute paths, no `..`, no links leaving
the folder, no devices), its runtime.json is read back and the runtime
self-tested there; only then is it renamed into place, replacing an older
version of the same name. Whatever fails, the runtime installed before stays.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import errno
import hashlib
import ipaddress
import json
import logging
import os
import platform
import posixpath
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx2 as httpx

from engine.errors import PeregrineError
from engine.paths import Paths
from engine.runtimes import (
    _BACKEND,
    _HEX,
    _NAME,
    BUILT_IN,
    ManifestError,
    RuntimeSelector,
    SelfTestFn,
    driver_version,
    read_manifest,
    run_self_test,
)

log = logging.getLogger(__name__)

INDEX_ENV = "PEREGRINE_RUNTIME_INDEX"
INDEX_FILE = "runtime-index.json"
# What .github/workflows/runtimes.yml attaches to each tagged release, next to the packs.
DEFAULT_INDEX_URL = (
    f"https://github.com/peregrine-app/peregrine/releases/latest/download/{INDEX_FILE}"
)
INDEX_SCHEMA_VERSION = 1
MAX_INDEX_BYTES = 1 << 20
MAX_PACKS = 256
# A CUDA pack with cuBLAS is several hundred MB; past this an index entry is not believed.
MAX_PACK_BYTES = 8 << 30
MAX_UNPACKED_BYTES = 16 << 30
MAX_MEMBERS = 10_000
DISK_MARGIN = 256 << 20
RETRIES = 5
_CHUNK = 1 << 16
_LOOPBACK_NAMES = ("localhost",)
# Which backend the machine's hardware suggests first.
PREFERENCE = ("cuda", "vulkan", "cpu")


class PackError(PeregrineError):
    """A pack cannot be listed, fetched or installed; the message says why and what is kept."""


class IndexError_(PackError):
    """The runtime-pack index is unreachable or breaks its schema."""


class ChecksumError(PackError):
    """The downloaded bytes did not hash to the index's SHA-256; they were deleted."""


class DiskFullError(PackError):
    """Not enough free disk space for the pack."""


class UnsafePackError(PackError):
    """The archive holds something that could write outside its folder, or is not a pack."""


class Cancelled(PackError):
    """The user cancelled the download; the partial file was removed."""


def this_platform() -> str:
    """This machine's platform as pack names spell it: "linux-x86_64"."""
    return f"{sys.platform}-{platform.machine().lower()}"


@dataclass(frozen=True)
class Requires:
    """What hardware a pack needs: an NVIDIA GPU (and driver), a Vulkan GPU, or nothing."""

    gpu: str | None = None  # None, "nvidia" or "vulkan"
    min_driver: str | None = None  # the NVIDIA driver, for cuda: "580.65"


@dataclass(frozen=True)
class Pack:
    """One entry of the index."""

    name: str
    backend: str
    platform: str
    url: str  # absolute: resolved against the index's address
    size: int
    sha256: str
    llama_cpp_commit: str | None = None
    requires: Requires = field(default_factory=Requires)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["requires"] = {k: v for k, v in asdict(self.requires).items() if v is not None}
        return data


# --- the index ------------------------------------------------------------------------


def index_url(environ: dict[str, str] | None = None) -> str:
    """Where the index comes from: PEREGRINE_RUNTIME_INDEX, else the project's release."""
    env = os.environ if environ is None else environ
    return env.get(INDEX_ENV, "").strip() or DEFAULT_INDEX_URL


def check_url(url: str, what: str) -> str:
    """`url` if it is https, or http to this computer (loopback); PackError otherwise."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if scheme == "https" and host:
        return url
    if scheme == "http" and _is_loopback(host):
        return url
    shown = url if len(url) <= 100 else url[:97] + "..."
    raise IndexError_(
        f"{what} {shown!r} is not an https address (plain http is allowed only to this "
        "computer); Peregrine does not fetch it"
    )


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_index(data: Any, base_url: str = "") -> list[Pack]:
    """Checks a decoded index and returns its packs; IndexError_ names the first wrong field.

    Pack URLs may be relative: they are resolved against `base_url` (the index's address).
    """
    if not isinstance(data, dict):
        raise IndexError_("the runtime index must be a JSON object")
    version = data.get("schema_version")
    if version != INDEX_SCHEMA_VERSION:
        raise IndexError_(
            f"the runtime index has schema_version {_short(version)}; this Peregrine reads "
            f"version {INDEX_SCHEMA_VERSION}"
        )
    entries = data.get("packs")
    if not isinstance(entries, list):
        raise IndexError_(f"the runtime index: 'packs' must be a list, not {_short(entries)}")
    if len(entries) > MAX_PACKS:
        raise IndexError_(f"the runtime index lists {len(entries)} packs (at most {MAX_PACKS})")
    packs: list[Pack] = []
    seen: set[tuple[str, str]] = set()
    for i, entry in enumerate(entries):
        pack = _pack(entry, i, base_url)
        if (pack.name, pack.platform) in seen:
            raise IndexError_(
                f"the runtime index lists {pack.name!r} for {pack.platform} twice (packs[{i}])"
            )
        seen.add((pack.name, pack.platform))
        packs.append(pack)
    return packs


def _pack(entry: Any, i: int, base_url: str) -> Pack:
    where = f"the runtime index: packs[{i}]"
    if not isinstance(entry, dict):
        raise IndexError_(f"{where} must be an object, not {_short(entry)}")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.match(name) or name == BUILT_IN:
        raise IndexError_(
            f"{where}.name must be a runtime name (letters, digits, '.', '_' and '-', "
            f"not starting with '.'; not {BUILT_IN!r}), not {_short(name)}"
        )
    backend = entry.get("backend")
    if not isinstance(backend, str) or not _BACKEND.match(backend):
        raise IndexError_(f"{where}.backend must be a backend name, not {_short(backend)}")
    plat = entry.get("platform")
    if not isinstance(plat, str) or not _NAME.match(plat):
        raise IndexError_(f'{where}.platform must be such as "linux-x86_64", not {_short(plat)}')
    url = entry.get("url")
    if not isinstance(url, str) or not url or len(url) > 2048:
        raise IndexError_(f"{where}.url must be an address, not {_short(url)}")
    url = check_url(urljoin(base_url, url), f"{where}.url")
    size = entry.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= MAX_PACK_BYTES:
        raise IndexError_(
            f"{where}.size must be a byte count from 1 to {MAX_PACK_BYTES}, not {_short(size)}"
        )
    sha = entry.get("sha256")
    if not isinstance(sha, str) or len(sha) != 64 or not _HEX.match(sha):
        raise IndexError_(f"{where}.sha256 must be 64 lower-case hex digits, not {_short(sha)}")
    commit = entry.get("llama_cpp_commit")
    if commit is not None and (
        not isinstance(commit, str) or not 7 <= len(commit) <= 40 or not _HEX.match(commit)
    ):
        raise IndexError_(f"{where}.llama_cpp_commit must be a git commit, not {_short(commit)}")
    return Pack(name, backend, plat, url, size, sha, commit, _requires(entry, where))


def _requires(entry: dict[str, Any], where: str) -> Requires:
    req = entry.get("requires", {})
    if not isinstance(req, dict):
        raise IndexError_(f"{where}.requires must be an object, not {_short(req)}")
    gpu = req.get("gpu")
    if gpu not in (None, "nvidia", "vulkan"):
        raise IndexError_(
            f'{where}.requires.gpu must be "nvidia", "vulkan" or absent, not {_short(gpu)}'
        )
    driver = req.get("min_driver")
    if driver is not None and (
        not isinstance(driver, str) or not driver or len(driver) > 32 or _version(driver) is None
    ):
        raise IndexError_(
            f'{where}.requires.min_driver must be a driver version such as "580.65", '
            f"not {_short(driver)}"
        )
    return Requires(gpu, driver)


def _version(text: str) -> tuple[int, ...] | None:
    try:
        return tuple(int(p) for p in text.strip().split("."))
    except ValueError:
        return None


def _short(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


ClientFactory = Callable[[], httpx.Client]


def _client() -> httpx.Client:
    # Redirects by hand: each hop's address is checked like the first.
    return httpx.Client(timeout=httpx.Timeout(30.0, connect=15.0), follow_redirects=False)


def fetch_index(url: str | None = None, client_factory: ClientFactory = _client) -> list[Pack]:
    """Downloads and checks the index (at most 1 MiB); IndexError_ says what went wrong."""
    url = check_url(url or index_url(), "the runtime index address")
    try:
        with client_factory() as client:
            raw, final = _get_small(client, url, MAX_INDEX_BYTES)
    except httpx.ConnectError as exc:
        host = urlsplit(url).hostname or url
        raise IndexError_(
            f"could not reach {host} for the runtime index (is this computer online?): "
            f"{_one_line(exc)}"
        ) from exc
    except httpx.HTTPError as exc:
        raise IndexError_(
            f"could not fetch the runtime index from {url}: {_one_line(exc)}"
        ) from exc
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise IndexError_(f"the runtime index at {url} is not valid JSON") from exc
    return parse_index(data, final)


def _get_small(client: httpx.Client, url: str, limit: int) -> tuple[bytes, str]:
    for _ in range(10):
        with client.stream("GET", url, headers={"Accept-Encoding": "identity"}) as response:
            if response.is_redirect:
                url = check_url(
                    urljoin(url, response.headers.get("Location", "")), "a redirect of the index"
                )
                continue
            if response.status_code != 200:
                raise IndexError_(
                    f"the runtime index at {url} answered HTTP {response.status_code}"
                )
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > limit:
                    raise IndexError_(f"the runtime index at {url} is larger than {limit} bytes")
            return bytes(body), url
    raise IndexError_(f"the runtime index at {url} redirected more than 10 times")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text or type(exc).__name__)[:200]


# --- which packs suit this machine ------------------------------------------------------


@dataclass(frozen=True)
class Machine:
    """What pack suitability depends on."""

    platform: str
    nvidia_driver: str | None  # "580.65.06"; None: no NVIDIA GPU
    vulkan_gpu: bool  # a GPU and a Vulkan loader


def describe_machine(
    gpu_backends: Iterable[str],
    driver: Callable[[], str] = driver_version,
    vulkan_loader: Callable[[], bool] = lambda: ctypes.util.find_library("vulkan") is not None,
) -> Machine:
    """The Machine for the GPUs a hardware profile found (their `backend` fields)."""
    backends = set(gpu_backends)
    nvidia = None
    if "cuda" in backends:
        text = driver()
        nvidia = text.removeprefix("nvidia ").strip() if text.startswith("nvidia ") else "unknown"
    return Machine(this_platform(), nvidia, bool(backends) and vulkan_loader())


def unsuitable(pack: Pack, machine: Machine) -> str | None:
    """Why `pack` does not suit `machine`; None when it does."""
    if pack.platform != machine.platform:
        return f"it is for {pack.platform}, this computer is {machine.platform}"
    gpu = pack.requires.gpu
    if gpu == "nvidia":
        if machine.nvidia_driver is None:
            return "it needs an NVIDIA GPU"
        want, have = pack.requires.min_driver, _version(machine.nvidia_driver)
        if want and (have is None or have < (_version(want) or ())):
            return f"it needs NVIDIA driver {want} or newer (this one is {machine.nvidia_driver})"
    if gpu == "vulkan" and not machine.vulkan_gpu:
        return "it needs a GPU with a Vulkan driver"
    return None


def suggested(packs: Iterable[Pack], machine: Machine) -> Pack | None:
    """The pack this machine should use: cuda over vulkan over cpu, among those that suit it."""
    fit = [p for p in packs if unsuitable(p, machine) is None]
    rank = {b: i for i, b in enumerate(PREFERENCE)}
    fit.sort(key=lambda p: (rank.get(p.backend, len(rank)), p.name))
    return fit[0] if fit else None


# --- downloading ---------------------------------------------------------------------------


ProgressFn = Callable[[int, int], None]
StopFn = Callable[[], bool]  # True: cancel


class _Retry(Exception):
    pass


class PackDownloader:
    """Fetches a pack's archive into `downloads/`, resuming a partial file, and verifies it."""

    def __init__(
        self,
        paths: Paths,
        client_factory: ClientFactory = _client,
        *,
        disk_free: Callable[[Path], int] = lambda p: shutil.disk_usage(p).free,
        sleep: Callable[[float], None] = time.sleep,
        retries: int = RETRIES,
    ) -> None:
        self.paths = paths
        self._client_factory = client_factory
        self._disk_free = disk_free
        self._sleep = sleep
        self._retries = retries

    def partial_path(self, pack: Pack) -> Path:
        return self.paths.downloads / f"runtime-{pack.name}-{pack.sha256[:16]}.part"

    def download(
        self,
        pack: Pack,
        progress: ProgressFn | None = None,
        should_stop: StopFn | None = None,
    ) -> Path:
        """The verified archive (still the .part file, removed by the caller after use)."""
        progress = progress or (lambda done, total: None)
        stop = should_stop or (lambda: False)
        self.paths.downloads.mkdir(parents=True, exist_ok=True)
        part = self.partial_path(pack)
        # Partials of other versions of this pack are stale: their bytes never mix in.
        for old in self.paths.downloads.glob(f"runtime-{pack.name}-*.part"):
            if old != part:
                old.unlink(missing_ok=True)
        have = part.stat().st_size if part.exists() else 0
        if have > pack.size:
            part.unlink()
            have = 0
        needed = pack.size - have
        free = self._disk_free(self.paths.downloads)
        if free < needed + DISK_MARGIN:
            raise DiskFullError(
                f"not enough free disk space for the {pack.name} runtime: it needs "
                f"{_mb(needed)} plus {_mb(DISK_MARGIN)} to spare, and {self.paths.downloads} has "
                f"{_mb(free)} free"
            )
        try:
            self._fill(pack, part, progress, stop)
        except Cancelled:
            part.unlink(missing_ok=True)
            raise
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise DiskFullError(
                    f"the disk filled up while downloading the {pack.name} runtime; the partial "
                    f"file is kept in {part.parent}: free some space and pull again to resume"
                ) from exc
            raise PackError(
                f"writing the {pack.name} runtime failed ({exc.strerror or exc}); the partial "
                "file is kept: pull again to resume"
            ) from exc
        digest = hashlib.sha256()
        with part.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        if digest.hexdigest() != pack.sha256:
            part.unlink(missing_ok=True)
            raise ChecksumError(
                f"the {pack.name} runtime is corrupt: SHA-256 mismatch (expected {pack.sha256}, "
                f"got {digest.hexdigest()}); the download was deleted and nothing was installed"
            )
        return part

    def _fill(self, pack: Pack, part: Path, progress: ProgressFn, stop: StopFn) -> None:
        failures = 0
        with self._client_factory() as client:
            while True:
                have = part.stat().st_size if part.exists() else 0
                progress(have, pack.size)
                if have >= pack.size:
                    return
                before = have
                try:
                    self._get(client, pack, part, have, progress, stop)
                    if part.stat().st_size < pack.size:
                        raise _Retry(f"the server ended the answer at byte {part.stat().st_size}")
                except (_Retry, httpx.TransportError) as exc:
                    got = part.stat().st_size if part.exists() else 0
                    # Progress since the last failure starts the count again.
                    failures = 1 if got > before else failures + 1
                    if failures > self._retries:
                        raise PackError(
                            f"downloading the {pack.name} runtime failed ({_one_line(exc)}); "
                            + (
                                "the partial file is kept: pull again to resume"
                                if got
                                else "try again later"
                            )
                        ) from exc
                    log.info("runtime %s: %s; retrying", pack.name, _one_line(exc))
                    self._sleep(min(30.0, 0.5 * 2**failures))

    def _get(
        self,
        client: httpx.Client,
        pack: Pack,
        part: Path,
        have: int,
        progress: ProgressFn,
        stop: StopFn,
    ) -> None:
        url = pack.url
        for _ in range(10):
            headers = {"Accept-Encoding": "identity"}
            if have:
                headers["Range"] = f"bytes={have}-"
            with client.stream("GET", url, headers=headers) as response:
                if response.is_redirect:
                    url = check_url(
                        urljoin(url, response.headers.get("Location", "")),
                        f"a redirect of the {pack.name} pack",
                    )
                    continue
                status = response.status_code
                if status == 416 and have == pack.size:
                    return
                if status in (429, 500, 502, 503, 504):
                    raise _Retry(f"HTTP {status}")
                if status == 200:
                    start = 0  # the server ignored Range: the whole file again
                elif status == 206 and have:
                    start = have
                    rng = response.headers.get("Content-Range", "")
                    if not rng.startswith(f"bytes {have}-"):
                        raise PackError(
                            f"the server answered a resume of the {pack.name} runtime with the "
                            f"wrong bytes ({rng or 'no Content-Range'})"
                        )
                else:
                    raise PackError(
                        f"the server answered HTTP {status} for the {pack.name} runtime ({url})"
                    )
                mode = "ab" if start else "wb"
                with part.open(mode) as f:
                    done = start
                    for chunk in response.iter_bytes(_CHUNK):
                        if stop():
                            raise Cancelled(
                                f"the download of the {pack.name} runtime was cancelled"
                            )
                        if done + len(chunk) > pack.size:
                            raise PackError(
                                f"the server sent more than the {pack.size} bytes the index "
                                f"gives for the {pack.name} runtime"
                            )
                        f.write(chunk)
                        done += len(chunk)
                        progress(done, pack.size)
                    f.flush()
                    os.fsync(f.fileno())
                return
        raise PackError(f"the {pack.name} runtime's address redirected more than 10 times")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


# --- unpacking and installing ------------------------------------------------------------------


def check_members(tar: tarfile.TarFile, name: str) -> list[tarfile.TarInfo]:
    """Every member of a pack, checked: all under `name/`, regular files, folders and links
    that stay inside it; UnsafePackError names the first that is not."""
    members = []
    total = 0
    for count, m in enumerate(tar, 1):
        if count > MAX_MEMBERS:
            raise UnsafePackError(f"the pack has more than {MAX_MEMBERS} entries")
        path = m.name
        if path.startswith(("/", "\\")) or (len(path) > 1 and path[1] == ":"):
            raise UnsafePackError(f"the pack holds an absolute path: {path!r}")
        norm = posixpath.normpath(path)
        parts = norm.split("/")
        if ".." in path.replace("\\", "/").split("/") or parts[0] != name:
            raise UnsafePackError(
                f"the pack holds {path!r}, outside its folder {name}/ (a pack holds one folder "
                "named as the runtime)"
            )
        if m.isdev() or m.isfifo():
            raise UnsafePackError(f"the pack holds a device or pipe: {path!r}")
        if m.islnk():
            raise UnsafePackError(f"the pack holds a hard link: {path!r}")
        if m.issym():
            target = m.linkname
            if posixpath.isabs(target):
                raise UnsafePackError(f"the pack holds a link to an absolute path: {path!r}")
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(norm), target))
            if resolved.split("/")[0] != name or resolved.startswith(".."):
                raise UnsafePackError(f"the pack holds a link leaving its folder: {path!r}")
        elif not (m.isfile() or m.isdir()):
            raise UnsafePackError(f"the pack holds something that is not a file: {path!r}")
        total += max(0, m.size)
        if total > MAX_UNPACKED_BYTES:
            raise UnsafePackError(f"the pack unpacks to more than {_mb(MAX_UNPACKED_BYTES)}")
        members.append(m)
    if not any(m.name.rstrip("/") == f"{name}/runtime.json" for m in members):
        raise UnsafePackError(f"the pack has no {name}/runtime.json")
    return members


@dataclass(frozen=True)
class Installed:
    """An installed runtime, as `runtime list` and the Settings page show it."""

    name: str
    backend: str | None  # None: runtime.json unusable
    llama_cpp_commit: str | None
    problem: str | None  # why it is not usable (manifest or cached self-test), None: fine
    self_test: str | None  # the cached self-test result in words, None: not yet tested


class RuntimePacks:
    """Lists, installs and removes the runtimes in `runtimes/`."""

    def __init__(
        self,
        paths: Paths,
        downloader: PackDownloader | None = None,
        self_test: SelfTestFn = run_self_test,
        driver: Callable[[], str] = driver_version,
    ) -> None:
        self.paths = paths
        self.downloader = downloader or PackDownloader(paths)
        self._self_test = self_test
        self._driver = driver

    def installed(self) -> list[Installed]:
        """Every folder in `runtimes/` with a runtime.json, with its cached self-test result."""
        folder = self.paths.runtimes
        if not folder.is_dir():
            return []
        cache = RuntimeSelector(self.paths, self._self_test, self._driver)
        found = []
        for sub in sorted(folder.iterdir()):
            if not sub.is_dir() or not _NAME.match(sub.name):
                continue
            try:
                manifest, _ = read_manifest(sub)
            except ManifestError as exc:
                found.append(Installed(sub.name, None, None, str(exc), None))
                continue
            result = cache.cached_result(sub.name)
            problem = None if result is None or result.ok else result.detail
            words = None if result is None else ("passed" if result.ok else "failed")
            found.append(
                Installed(sub.name, manifest.backend, manifest.llama_cpp_commit, problem, words)
            )
        return found

    def install(
        self,
        pack: Pack,
        progress: ProgressFn | None = None,
        should_stop: StopFn | None = None,
    ) -> Path:
        """Downloads, verifies, unpacks, self-tests and places `pack`; returns its folder."""
        archive = self.downloader.download(pack, progress, should_stop)
        folder = self.install_archive(archive, pack.name, pack.backend)
        archive.unlink(missing_ok=True)
        return folder

    def install_archive(self, archive: Path, name: str, backend: str | None = None) -> Path:
        """Unpacks a verified archive beside runtimes/, checks and self-tests it, renames it in."""
        if not _NAME.match(name) or name == BUILT_IN:
            raise PackError(f"{name!r} is not a runtime name")
        runtimes = self.paths.runtimes
        runtimes.mkdir(parents=True, exist_ok=True)
        # Beside runtimes/, on the same disk: the final rename is atomic, and nothing
        # half-unpacked ever sits where the engine looks.
        staging = Path(tempfile.mkdtemp(prefix=f".runtime-{name}-", dir=self.paths.data))
        try:
            staged = self._unpack(archive, name, staging)
            try:
                manifest, _ = read_manifest(staged)
            except ManifestError as exc:
                raise PackError(f"the {name} pack is unusable: {exc}") from exc
            if backend is not None and manifest.backend != backend:
                raise PackError(
                    f"the {name} pack's runtime.json says backend {manifest.backend!r}, "
                    f"the index says {backend!r}"
                )
            if not (staged / "lib").is_dir():
                raise PackError(f"the {name} pack has no lib/ folder")
            # The self-test runs where it lies, and its cached result holds after the rename
            # (same name, manifest and files), so the next engine start does not repeat it.
            trial = RuntimeSelector(
                Paths(data=staging, config=self.paths.config, cache=self.paths.cache),
                self._self_test,
                self._driver,
            )
            problem = trial.problem(name)
            if problem is not None:
                kept = (
                    "; the runtime installed before is kept" if (runtimes / name).exists() else ""
                )
                raise PackError(f"the {name} runtime {problem}; it was not installed{kept}")
            return self._swap_in(staged, runtimes / name, staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _unpack(self, archive: Path, name: str, staging: Path) -> Path:
        root = staging / "runtimes"
        root.mkdir()
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = check_members(tar, name)
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(root, members=members, filter="data")
                else:  # every member was checked above
                    tar.extractall(root, members=members)
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise DiskFullError(
                    f"the disk filled up while unpacking the {name} runtime; nothing was installed"
                ) from exc
            raise UnsafePackError(f"the {name} pack cannot be unpacked: {_one_line(exc)}") from exc
        return root / name

    @staticmethod
    def _swap_in(staged: Path, target: Path, staging: Path) -> Path:
        old = staging / "old"
        if target.exists():
            os.replace(target, old)
        try:
            os.replace(staged, target)
        except OSError:
            if old.exists():
                os.replace(old, target)  # the old runtime back where it was
            raise
        return target

    def remove(self, name: str) -> None:
        """Deletes an installed runtime (moved aside first, so it never lies half-deleted)."""
        if not _NAME.match(name) or name == BUILT_IN:
            raise PackError(f"{name!r} is not an installed runtime (the built-in llama.cpp stays)")
        folder = self.paths.runtimes / name
        if not folder.is_dir() or folder.is_symlink():
            raise PackError(f"no runtime {name!r} is installed in {self.paths.runtimes}")
        trash = Path(tempfile.mkdtemp(prefix=f".runtime-{name}-rm-", dir=self.paths.data))
        try:
            os.replace(folder, trash / name)
        except OSError as exc:
            trash.rmdir()
            raise PackError(f"cannot remove the {name} runtime: {exc.strerror or exc}") from exc
        shutil.rmtree(trash, ignore_errors=True)
        for part in self.paths.downloads.glob(f"runtime-{name}-*.part"):
            with contextlib.suppress(OSError):
                part.unlink()


# --- writing the index (packaging/runtimes/build_runtime.py) ---------------------------------

# CUDA 13.0 needs NVIDIA driver 580.65 or newer (Linux); the cuda pack is built with nvcc 13.0.
CUDA_MIN_DRIVER = "580.65"


def requirements_of(backend: str) -> Requires:
    """The hardware a pack of `backend` needs."""
    if backend == "cuda":
        return Requires("nvidia", CUDA_MIN_DRIVER)
    if backend == "vulkan":
        return Requires("vulkan")
    return Requires()


def write_index_entry(index: Path, pack: Pack) -> None:
    """Adds `pack` to the index file (replacing an entry of the same name and platform)."""
    packs: list[dict[str, Any]] = []
    if index.exists():
        data = json.loads(index.read_text(encoding="utf-8"))
        parse_index(data, "https://example.invalid/")  # never extend a broken index
        packs = [
            p for p in data["packs"] if (p["name"], p["platform"]) != (pack.name, pack.platform)
        ]
    packs.append(pack.to_json())
    packs.sort(key=lambda p: (p["name"], p["platform"]))
    parse_index(
        {"schema_version": INDEX_SCHEMA_VERSION, "packs": packs}, "https://example.invalid/"
    )
    tmp = index.with_suffix(".tmp")
    tmp.write_text(
        json.dumps({"schema_version": INDEX_SCHEMA_VERSION, "packs": packs}, indent=1) + "\n",
        encoding="utf-8",
    )
    os.replace(tmp, index)
