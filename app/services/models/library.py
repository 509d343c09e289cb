"""One library of GGUF models: Peregrine's own folder plus, read-only, the ones other apps keep.

Other apps' files are used by reference (never copied, moved or deleted): the
Hugging Face cache, LM Studio, GPT4All, and Ollama's content-addressed blobs
found through its manifests. Which folders are scanned is passed in (from
settings; `default_scan_folders()` gives the per-OS defaults), so tests point
them at temporary folders. Headers are read with an injected reader; a file
that cannot be read is listed as invalid with the reason, never a crash.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from app.services.models.hub import FitLike, split_info
from engine.errors import PeregrineError
from engine.paths import Paths

log = logging.getLogger(__name__)

Source = Literal["peregrine", "builtin", "huggingface", "lmstudio", "gpt4all", "ollama"]
SOURCE_NAMES: dict[str, str] = {
    "peregrine": "Peregrine",
    "builtin": "Peregrine's built-in model",
    "huggingface": "the Hugging Face cache",
    "lmstudio": "LM Studio",
    "gpt4all": "GPT4All",
    "ollama": "Ollama",
}
HeaderReader = Callable[[Path], Any]
# (file name, header, size) -> how the model fits this machine (the planner's FitBadge)
LocalFitFn = Callable[[str, Any, int], FitLike]
BUILTIN_ID = "built-in"

_OLLAMA_MODEL_MEDIA = "application/vnd.ollama.image.model"
_MAX_MANIFEST_BYTES = 1 << 20
# Real Ollama digests are exactly this; anything else could name a path outside blobs/.
_OLLAMA_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class ScanLimits:
    """Bounds on scanning one folder, so a huge or hostile tree cannot stall `ls` or the GUI."""

    max_depth: int = 16  # real layouts are 1-4 levels deep
    max_entries: int = 100_000  # directory entries looked at
    max_seconds: float = 10.0
    # Header reads of one listing, all folders together: thousands of hostile files (each
    # a sparse file with a huge metadata string) could otherwise take minutes.
    max_read_seconds: float = 30.0


class _ScanBudget:
    """What is left of one folder's ScanLimits; `spend()` is False once any is used up."""

    def __init__(self, limits: ScanLimits, clock: Callable[[], float], root: Path) -> None:
        self.limits = limits
        self._clock = clock
        self._deadline = clock() + limits.max_seconds
        self._entries = 0
        self._root = root
        self.exhausted = False

    def spend(self) -> bool:
        if self.exhausted:
            return False
        self._entries += 1
        if self._entries > self.limits.max_entries or self._clock() > self._deadline:
            self.exhausted = True
            log.warning(
                "stopped scanning %s after %d entries (limits: %d entries, %.0f s); "
                "models beyond that point are not listed",
                self._root,
                self._entries - 1,
                self.limits.max_entries,
                self.limits.max_seconds,
            )
            return False
        return True


@dataclass(frozen=True)
class ScanFolder:
    """A folder another app keeps GGUFs in, and whose layout to expect."""

    source: Source
    path: Path


@dataclass(frozen=True)
class ModelEntry:
    """One model the app can run (or could not read, with the reason)."""

    id: str
    path: Path
    source: Source
    read_only: bool
    size: int
    architecture: str | None = None
    n_params: int | None = None
    quant: str | None = None
    context_length: int | None = None
    license: str | None = None
    has_chat_template: bool = False
    mtp_layers: int = 0
    parts: tuple[Path, ...] = ()  # every file of a split model, first part first
    error: str | None = None  # set when the header could not be read
    fit: FitLike | None = None  # how it fits this machine, when a fit function was given

    @property
    def valid(self) -> bool:
        return self.error is None

    @property
    def name(self) -> str:
        return self.path.name


def default_scan_folders(
    platform: str | None = None,
    home: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[ScanFolder]:
    """Where other apps keep GGUFs on this OS (missing folders are fine: they are skipped)."""
    plat = platform or sys.platform
    env = os.environ if environ is None else environ
    h = home or Path.home()
    hf_cache = env.get("HF_HUB_CACHE") or (
        str(Path(env["HF_HOME"]) / "hub")
        if env.get("HF_HOME")
        else str(h / ".cache/huggingface/hub")
    )
    folders = [
        ScanFolder("huggingface", Path(hf_cache)),
        ScanFolder("lmstudio", h / ".lmstudio" / "models"),
        ScanFolder("lmstudio", h / ".cache" / "lm-studio" / "models"),
        ScanFolder(
            "ollama",
            Path(env["OLLAMA_MODELS"]) if env.get("OLLAMA_MODELS") else h / ".ollama" / "models",
        ),
    ]
    if plat == "darwin":
        gpt4all = h / "Library" / "Application Support" / "nomic.ai" / "GPT4All"
    elif plat.startswith("win"):
        local = Path(env["LOCALAPPDATA"]) if env.get("LOCALAPPDATA") else h / "AppData" / "Local"
        gpt4all = local / "nomic.ai" / "GPT4All"
    else:
        data_home = (
            Path(env["XDG_DATA_HOME"]) if env.get("XDG_DATA_HOME") else h / ".local" / "share"
        )
        gpt4all = data_home / "nomic.ai" / "GPT4All"
    folders.append(ScanFolder("gpt4all", gpt4all))
    return folders


def scan_folders_from_strings(values: Sequence[str]) -> list[ScanFolder]:
    """Scan folders from settings: "source:path", or a bare path whose layout is guessed from its name."""
    folders = []
    for value in values:
        source, sep, rest = value.partition(":")
        if not (rest if sep and source in SOURCE_NAMES else value).strip():
            # Path("") is the current directory: an empty setting must not scan wherever we run.
            log.warning("ignoring an empty library scan folder %r", value)
            continue
        if sep and source in SOURCE_NAMES and source != "peregrine":
            folders.append(ScanFolder(source, _expanded(rest)))  # type: ignore[arg-type]
            continue
        path = _expanded(value)
        lowered = value.lower()
        guessed: Source = "lmstudio"  # a plain tree of .gguf files
        if "ollama" in lowered:
            guessed = "ollama"
        elif "huggingface" in lowered or _looks_like_hf_cache(path):
            guessed = "huggingface"
        elif "gpt4all" in lowered:
            guessed = "gpt4all"
        folders.append(ScanFolder(guessed, path))
    return folders


def _expanded(value: str) -> Path:
    """`~` expanded where it can be; "~nobody/x" stays as written (and is then not found)."""
    try:
        return Path(value).expanduser()
    except RuntimeError as exc:
        log.warning("cannot expand %r: %s", value, exc)
        return Path(value)


def _looks_like_hf_cache(path: Path) -> bool:
    try:
        return (path / "hub").is_dir() or any(path.glob("models--*"))
    except (OSError, ValueError) as exc:  # unreadable folder, a NUL in the setting
        log.warning("cannot look into %s: %s", path, exc)
        return False


def _default_reader(path: Path) -> Any:
    from engine.gguf.header import read_gguf_header

    return read_gguf_header(path)


def _default_validator(path: Path) -> Any:
    from engine.gguf.header import validate_gguf_file

    return validate_gguf_file(path)


class Library:
    """Lists, deletes, reveals and imports models; only Peregrine's own files are ever changed."""

    def __init__(
        self,
        paths: Paths,
        scan_folders: Sequence[ScanFolder] = (),
        *,
        header_reader: HeaderReader = _default_reader,
        validator: HeaderReader = _default_validator,
        limits: ScanLimits = ScanLimits(),
        clock: Callable[[], float] = time.monotonic,
        models_dir: Path | None = None,
        builtin: Callable[[], Path] | None = None,
        fit: LocalFitFn | None = None,
    ) -> None:
        self.paths = paths
        # The models folder from settings, else the data folder's models/.
        self.models_dir = models_dir or paths.models
        self._builtin = builtin
        self._fit = fit
        self.scan_folders = list(scan_folders)
        self._read = header_reader
        self._validate = validator
        self.limits = limits
        self._clock = clock
        self._read_deadline: float | None = None

    # --- listing ----------------------------------------------------------------------------
    def entries(self) -> list[ModelEntry]:
        """Every model found: Peregrine's first, then other apps' in scan-folder order."""
        self._read_deadline = self._clock() + self.limits.max_read_seconds
        try:
            return self._entries()
        finally:
            self._read_deadline = None

    def _entries(self) -> list[ModelEntry]:
        entries = list(self._peregrine())
        builtin = self._builtin_entry()
        if builtin is not None:
            entries.insert(0, builtin)
        seen = {_real(e.path) for e in entries}
        scanned: set[tuple[str, str]] = set()
        for folder in self.scan_folders:
            where = (folder.source, _real(folder.path))
            if where in scanned:
                continue  # listed twice in settings: scanning it again finds nothing new
            scanned.add(where)
            try:
                if not folder.path.is_dir():
                    continue
                found = list(self._scan(folder))
            except (OSError, ValueError, RuntimeError) as exc:
                # ValueError: a NUL in a configured path; RuntimeError: "~nobody" unexpandable.
                log.warning("cannot scan %s (%s): %s", folder.path, folder.source, exc)
                continue
            for entry in found:
                # The same blob reachable twice (symlinks, overlapping folders) is listed once.
                key = _real(entry.path)
                if key not in seen:
                    seen.add(key)
                    entries.append(entry)
        return entries

    def find(self, ref: str) -> ModelEntry:
        """The entry whose id, file name or path is `ref`; a clear error when none or several match."""
        entries = self.entries()
        exact = [e for e in entries if e.id == ref or str(e.path) == ref]
        if not exact:
            exact = [e for e in entries if e.name == ref or e.name == f"{ref}.gguf"]
        if not exact:
            raise PeregrineError(f"no model {ref!r} in the library (see `peregrine ls`)")
        if len(exact) > 1:
            ids = ", ".join(e.id for e in exact)
            raise PeregrineError(f"{ref!r} matches several models: {ids}; use the full id")
        return exact[0]

    def _builtin_entry(self) -> ModelEntry | None:
        if self._builtin is None:
            return None
        try:
            path = self._builtin()
        except PeregrineError as exc:
            log.warning("the built-in model is not listed: %s", exc)
            return None
        return self._entry(BUILTIN_ID, path, "builtin", read_only=True)

    def _peregrine(self) -> Iterator[ModelEntry]:
        root = self.models_dir
        if not root.is_dir():
            return
        # Symlinked folders are not followed here: what `rm` may delete stays inside models/.
        for path in self._walk(root, _is_gguf_name, follow_links=False):
            info = split_info(path.name)
            if info is not None and info[1] != 1:
                continue  # later parts are listed with their first part
            rel = path.relative_to(root)
            model_id = rel.as_posix()
            if len(rel.parts) >= 2 and "--" in rel.parts[0]:
                # models/owner--name/file.gguf came from owner/name on the hub
                model_id = rel.parts[0].replace("--", "/", 1) + "/" + "/".join(rel.parts[1:])
            yield self._entry(model_id, path, "peregrine", read_only=False)

    def _scan(self, folder: ScanFolder) -> Iterator[ModelEntry]:
        if folder.source == "ollama":
            yield from self._scan_ollama(folder.path)
        elif folder.source == "huggingface":
            yield from self._scan_hf_cache(folder.path)
        else:
            for path in self._walk(folder.path, _is_gguf_name, follow_links=True):
                info = split_info(path.name)
                if info is not None and info[1] != 1:
                    continue
                rel = path.relative_to(folder.path).as_posix()
                yield self._entry(f"{folder.source}:{rel}", path, folder.source, read_only=True)

    def _scan_hf_cache(self, root: Path) -> Iterator[ModelEntry]:
        # models--owner--name/snapshots/<commit>/<file>, files symlinked to blobs/
        budget = _ScanBudget(self.limits, self._clock, root)
        for repo_dir in sorted(root.glob("models--*")):
            repo_id = repo_dir.name[len("models--") :].replace("--", "/", 1)
            snapshots = repo_dir / "snapshots"
            if not snapshots.is_dir():
                continue
            for path in self._walk(
                snapshots, _is_gguf_name, follow_links=False, budget=budget, min_depth=1
            ):
                info = split_info(path.name)
                if info is not None and info[1] != 1:
                    continue
                rel = path.relative_to(repo_dir / "snapshots").as_posix().split("/", 1)[1]
                yield self._entry(f"hf:{repo_id}/{rel}", path, "huggingface", read_only=True)

    def _scan_ollama(self, root: Path) -> Iterator[ModelEntry]:
        # manifests/<registry>/<namespace>/<model>/<tag> -> JSON whose model layer names a blob
        manifests = root / "manifests"
        if not manifests.is_dir():
            return
        for manifest in self._walk(manifests, lambda _name: True, follow_links=False):
            rel = manifest.relative_to(manifests).parts
            name = f"{'/'.join(rel[-3:-1]) if len(rel) >= 3 else rel[0]}:{rel[-1]}"
            if name.startswith("library/"):
                name = name[len("library/") :]
            blob = self._ollama_blob(root, manifest)
            if blob is None:
                continue
            yield self._entry(f"ollama:{name}", blob, "ollama", read_only=True)

    def _ollama_blob(self, root: Path, manifest: Path) -> Path | None:
        try:
            if manifest.stat().st_size > _MAX_MANIFEST_BYTES:
                raise ValueError("manifest too large")
            data = json.loads(manifest.read_text(encoding="utf-8"))
            layers = data["layers"]
            digest = next(
                layer["digest"] for layer in layers if layer.get("mediaType") == _OLLAMA_MODEL_MEDIA
            )
        except StopIteration:
            return None  # e.g. an embedding-only or adapter manifest: nothing to run
        except (
            OSError,
            ValueError,
            KeyError,
            TypeError,
            AttributeError,
            RecursionError,  # deeply nested JSON
        ) as exc:
            log.warning("skipping unreadable Ollama manifest %s: %s", manifest, exc)
            return None
        if not isinstance(digest, str) or not _OLLAMA_DIGEST.fullmatch(digest):
            log.warning("skipping Ollama manifest %s: odd digest %r", manifest, digest)
            return None
        blob = root / "blobs" / digest.replace(":", "-")
        if not blob.is_file():
            log.warning("Ollama manifest %s names a missing blob %s", manifest, blob.name)
            return None
        return blob

    def _walk(
        self,
        root: Path,
        match: Callable[[str], bool],
        *,
        follow_links: bool,
        budget: _ScanBudget | None = None,
        min_depth: int = 0,
    ) -> list[Path]:
        """Regular files under root whose name matches, sorted; bounded, never recursive.

        A FIFO, socket or device named like a model is not a file here (it is never
        opened, so it cannot block); dangling links and link loops are skipped; a
        folder reached twice through symlinks is walked once; unreadable folders are
        logged and skipped. Files deeper than `min_depth` folders only.
        """
        budget = budget or _ScanBudget(self.limits, self._clock, root)
        try:
            st = root.stat()
        except OSError as exc:
            log.warning("cannot scan %s: %s", root, exc)
            return []
        visited = {(st.st_dev, st.st_ino)}
        found: list[Path] = []
        stack: list[tuple[Path, int]] = [(root, 0)]
        while stack and not budget.exhausted:
            folder, depth = stack.pop()
            try:
                with os.scandir(folder) as it:
                    children = list(it)
            except OSError as exc:
                log.warning("cannot read folder %s: %s", folder, exc)
                continue
            for child in children:
                if not budget.spend():
                    break
                try:
                    if child.is_dir(follow_symlinks=follow_links):
                        if depth >= self.limits.max_depth:
                            log.warning(
                                "not scanning %s: deeper than %d folders", child.path, depth
                            )
                            continue
                        cst = child.stat(follow_symlinks=True)
                        if (cst.st_dev, cst.st_ino) not in visited:
                            visited.add((cst.st_dev, cst.st_ino))
                            stack.append((Path(child.path), depth + 1))
                    elif depth >= min_depth and match(child.name) and child.is_file():
                        found.append(Path(child.path))
                except OSError as exc:  # vanished, or unreadable, while we looked
                    log.info("skipping %s: %s", child.path, exc)
        return sorted(found)

    def _entry(self, model_id: str, path: Path, source: Source, *, read_only: bool) -> ModelEntry:
        parts = _split_parts(path)
        try:
            size = sum(p.stat().st_size for p in parts)
        except OSError as exc:
            size = 0
            log.warning("cannot stat %s: %s", path, exc)
        missing = [p.name for p in parts if not p.exists()]
        base = ModelEntry(
            id=model_id,
            path=path,
            source=source,
            read_only=read_only,
            size=size,
            parts=tuple(parts),
        )
        if missing:
            return replace(base, error=f"split model is missing parts: {', '.join(missing)}")
        if self._read_deadline is not None and self._clock() > self._read_deadline:
            return replace(
                base,
                error=f"header not read: listing took over {self.limits.max_read_seconds:.0f} s",
            )
        try:
            header = self._read(path)
        except PeregrineError as exc:
            log.info("listing %s as invalid: %s", path, exc)
            return replace(base, error=str(exc))
        except Exception as exc:
            # A hostile file must not take the library down; the reason is shown on the entry.
            log.warning("unexpected error reading %s", path, exc_info=True)
            return replace(base, error=f"{type(exc).__name__}: {exc}")
        license_ = header.get("general.license")
        fit: FitLike | None = None
        if self._fit is not None:
            try:
                fit = self._fit(path.name, header, size)
            except Exception as exc:  # a badge is an extra: the entry is listed without it
                log.warning("no fit badge for %s: %s", path, exc)
        return replace(
            base,
            fit=fit,
            architecture=header.architecture,
            n_params=header.n_params,
            quant=header.quant_name,
            context_length=header.context_length,
            license=str(license_) if license_ is not None else None,
            has_chat_template=bool(header.chat_template),
            mtp_layers=int(header.nextn_layers or 0),
        )

    # --- actions ------------------------------------------------------------------------------
    def delete(self, entry: ModelEntry) -> list[Path]:
        """Deletes one of Peregrine's own models (every part); other apps' files are refused."""
        root = self.models_dir.resolve()
        if entry.source == "builtin":
            raise PeregrineError("the built-in model ships with Peregrine and cannot be deleted")
        if entry.read_only or entry.source != "peregrine":
            raise PeregrineError(
                f"{entry.id} belongs to {SOURCE_NAMES[entry.source]}; Peregrine only lists it "
                "and never deletes other apps' files"
            )
        parts = entry.parts or (entry.path,)
        # Every part is checked before any is deleted: a refusal must leave the model whole.
        for part in parts:
            if not Path(_real(part)).is_relative_to(root):
                raise PeregrineError(
                    f"{part} is outside Peregrine's models folder; not deleting it"
                )
            if part.is_dir() and not part.is_symlink():
                raise PeregrineError(f"{part} is a folder, not a model file; not deleting it")
        removed: list[Path] = []
        for part in parts:
            try:
                part.unlink(missing_ok=True)
            except OSError as exc:
                done = (
                    f" (already deleted: {', '.join(p.name for p in removed)})" if removed else ""
                )
                raise PeregrineError(
                    f"could not delete {part}: {exc.strerror or exc}{done}"
                ) from None
            removed.append(part)
        parent = entry.path.parent
        if parent != self.models_dir and parent.resolve().is_relative_to(root):
            with contextlib.suppress(OSError):
                parent.rmdir()  # only if now empty; a non-empty folder keeps its other models
        return removed

    def reveal(self, entry: ModelEntry) -> Path:
        """The folder holding the model; the GUI opens it in the file manager."""
        return entry.path.parent

    def import_file(self, source: Path, *, move: bool = False) -> ModelEntry:
        """Copies a GGUF from anywhere into models/imported/ after validating its header."""
        source = Path(source).expanduser()
        # Validate before touching anything: a bad file gets a clear error and nothing is written.
        self._validate(source)
        if split_info(source.name) is not None:
            raise PeregrineError(
                f"{source.name} is one part of a split model; import is for single-file GGUFs"
            )
        dest_dir = self.models_dir / "imported"
        dest = dest_dir / source.name
        if dest.exists():
            raise PeregrineError(f"a model named {source.name} is already imported: {dest}")
        dest_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".import-", suffix=".part", dir=dest_dir)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, source.open("rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dest)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise PeregrineError(f"could not import {source.name}: {exc.strerror or exc}") from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if move:
            source.unlink()
        return self._entry(f"imported/{dest.name}", dest, "peregrine", read_only=False)


def _is_gguf_name(name: str) -> bool:
    return name.lower().endswith(".gguf")


def _real(path: Path) -> str:
    """The path with every symlink resolved; unlike Path.resolve on 3.11, never raises on a loop."""
    try:
        return os.path.realpath(path)
    except (OSError, ValueError):  # ValueError: a NUL in a configured folder
        return os.path.abspath(path)


def _split_parts(path: Path) -> list[Path]:
    info = split_info(path.name)
    if info is None:
        return [path]
    base, _, count = info
    stem = base[: -len(".gguf")]
    return [path.with_name(f"{stem}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
