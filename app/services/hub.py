"""Hugging Face Hub access for the model manager: search, quant listing, fit badges, access errors.

Everything takes the hub endpoint and token through the constructor, so tests
point it at a loopback hub and the GUI can swap tokens without touching the
environment. The fit function and the header reader are injected too: the
planner and the GGUF reader live in engine/ and this module only wires them.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from huggingface_hub import HfApi, constants, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

from engine.errors import PeregrineError

log = logging.getLogger(__name__)

# Longest alternatives first so "Q4_K_M" wins over "Q4_K" and "IQ4_XS" over "Q4".
_QUANT_RE = re.compile(
    r"(?<![A-Za-z0-9])("
    r"IQ\d_(?:XXS|XS|NL|S|M)"
    r"|Q\d_K_(?:XL|S|M|L)|Q\d_K|Q\d_\d|TQ\d_\d"
    r"|MXFP4(?:_MOE)?|BF16|FP16|F16|F32|FP8"
    r")(?![A-Za-z0-9])",
    re.IGNORECASE,
)
SPLIT_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)


def default_endpoint(environ: dict[str, str] | None = None) -> str:
    """The hub endpoint at call time: HF_ENDPOINT if set, else huggingface-hub's default."""
    env = os.environ if environ is None else environ
    return (env.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def quant_of(file_name: str) -> str | None:
    """The quant label in a GGUF file name ("Q4_K_M"), or None when it names none."""
    stem = SPLIT_RE.sub(".gguf", file_name.rsplit("/", 1)[-1])
    matches = _QUANT_RE.findall(stem)
    return matches[-1].upper() if matches else None


def split_info(file_name: str) -> tuple[str, int, int] | None:
    """(base name without the split suffix, part number, part count) for a split GGUF."""
    m = SPLIT_RE.search(file_name)
    if m is None:
        return None
    return file_name[: m.start()] + ".gguf", int(m[1]), int(m[2])


class FitLike(Protocol):
    """What the model manager shows from the planner's FitBadge."""

    @property
    def level(self) -> str: ...

    @property
    def summary(self) -> str: ...


# (file_name, header or None, total size in bytes) -> badge
FitFn = Callable[[str, Any, int], FitLike]
# [(file_name, header, size)] -> the planner's pick (file name) or None
PickFn = Callable[[Sequence[tuple[str, Any, int]]], str | None]
# (url, headers) -> GGUFHeader
RemoteHeaderFn = Callable[[str, dict[str, str]], Any]


@dataclass(frozen=True)
class SearchResult:
    """One repo in search results."""

    repo_id: str
    downloads: int
    likes: int
    license: str | None
    gated: bool
    private: bool


@dataclass(frozen=True)
class RemoteFile:
    """One file in a repo, with what the hub says about its bytes."""

    path: str
    size: int
    sha256: str | None


@dataclass
class QuantOption:
    """One downloadable model in a repo: a single GGUF, or all parts of a split one."""

    name: str  # the model's file name (first part's base name for split models)
    quant: str | None
    files: list[RemoteFile]
    fit: FitLike | None = None
    picked: bool = False
    header_error: str | None = None
    header: Any = field(default=None, repr=False)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def is_split(self) -> bool:
        return len(self.files) > 1

    @property
    def complete(self) -> bool:
        """False for a split model whose parts are not all in the repo."""
        info = split_info(self.files[0].path)
        return info is None or len(self.files) == info[2]


@dataclass
class RepoListing:
    """A repo's GGUF models grouped by quant, in the order the hub lists them, smallest first."""

    repo_id: str
    commit: str | None
    gated: bool
    license: str | None
    options: list[QuantOption]

    def find(self, quant_or_file: str) -> QuantOption | None:
        """The option matching a quant label (case-insensitive) or a file name."""
        wanted = quant_or_file.lower()
        for opt in self.options:
            if opt.name.lower() == wanted or any(f.path.lower() == wanted for f in opt.files):
                return opt
        matches = [o for o in self.options if (o.quant or "").lower() == wanted]
        if len(matches) > 1:
            names = ", ".join(o.name for o in matches)
            raise PeregrineError(
                f"quant {quant_or_file} matches several files: {names}; name the file"
            )
        return matches[0] if matches else None


def group_gguf_files(files: Sequence[RemoteFile]) -> list[QuantOption]:
    """Groups a repo's files into models: split parts together, projector files left out."""
    groups: dict[str, list[RemoteFile]] = {}
    for f in files:
        lower = f.path.lower()
        if not lower.endswith(".gguf") or "mmproj" in lower.rsplit("/", 1)[-1]:
            continue
        info = split_info(f.path)
        key = info[0] if info else f.path
        groups.setdefault(key, []).append(f)
    options = []
    for name, parts in groups.items():
        parts.sort(key=lambda p: p.path)
        options.append(QuantOption(name=name, quant=quant_of(name), files=parts))
    options.sort(key=lambda o: (o.size, o.name))
    return options


def access_error(repo_id: str, exc: HfHubHTTPError, token_given: bool) -> PeregrineError:
    """Turns the hub's refusal into one line that says what the user can do."""
    status = exc.response.status_code if exc.response is not None else None
    page = f"https://huggingface.co/{repo_id}"
    if isinstance(exc, GatedRepoError):
        if status == 403 or token_given:
            return PeregrineError(
                f"{repo_id} is gated and your Hugging Face token has no access to it: "
                f"request access at {page}, then try again"
            )
        return PeregrineError(
            f"{repo_id} is gated: accept its terms at {page}, then log in with "
            "`hf auth login` or set HF_TOKEN, and try again"
        )
    if isinstance(exc, RevisionNotFoundError):
        return PeregrineError(f"{repo_id} has no such revision")
    if isinstance(exc, RepositoryNotFoundError):
        return PeregrineError(
            f"{repo_id} was not found on Hugging Face (or it is private: log in with "
            "`hf auth login` or set HF_TOKEN)"
        )
    if status in (401, 403):
        return PeregrineError(f"Hugging Face refused access to {repo_id} (HTTP {status})")
    return PeregrineError(f"Hugging Face request for {repo_id} failed: {_first_line(str(exc))}")


def _first_line(text: str) -> str:
    return next((line for line in text.splitlines() if line.strip()), text)


class HubService:
    """Search and repo listing against one hub endpoint, with fit badges from an injected planner."""

    def __init__(
        self,
        endpoint: str | None = None,
        token: str | bool | None = None,
        *,
        fit: FitFn | None = None,
        pick: PickFn | None = None,
        header_reader: RemoteHeaderFn | None = None,
        api: HfApi | None = None,
    ) -> None:
        self.endpoint = (endpoint or default_endpoint()).rstrip("/")
        # None lets huggingface-hub find HF_TOKEN or the stored login itself.
        self.token = token
        self._fit = fit
        self._pick = pick
        self._header_reader = header_reader
        self._api = api or HfApi(endpoint=self.endpoint, token=token)

    def auth_headers(self) -> dict[str, str]:
        """Headers carrying the token (if any) for raw file requests."""
        return build_hf_headers(token=self.token)

    def search(self, term: str, limit: int = 20) -> list[SearchResult]:
        """GGUF repos matching `term`, most downloaded first."""
        try:
            # The hub's list answer omits "gated" unless these fields are asked for by name.
            models = self._api.list_models(
                search=term,
                filter="gguf",
                sort="downloads",
                limit=limit,
                expand=["downloads", "likes", "gated", "private", "tags"],
            )
            out = []
            for m in models:
                license_ = next(
                    (t.split(":", 1)[1] for t in (m.tags or []) if t.startswith("license:")),
                    None,
                )
                out.append(
                    SearchResult(
                        repo_id=m.id,
                        downloads=m.downloads or 0,
                        likes=m.likes or 0,
                        license=license_,
                        gated=bool(m.gated),
                        private=bool(m.private),
                    )
                )
            return out
        except HfHubHTTPError as exc:
            raise access_error(term, exc, bool(self.token)) from exc

    def list_quants(
        self, repo_id: str, revision: str | None = None, *, with_fit: bool = True
    ) -> RepoListing:
        """The repo's GGUF models grouped by quant; with fit badges and the planner's pick when wired."""
        try:
            info = self._api.model_info(repo_id, revision=revision, files_metadata=True)
        except HfHubHTTPError as exc:
            raise access_error(repo_id, exc, bool(self.token)) from exc
        files = [
            RemoteFile(
                path=s.rfilename,
                size=(s.lfs.size if s.lfs else s.size) or 0,
                sha256=s.lfs.sha256 if s.lfs else None,
            )
            for s in (info.siblings or [])
        ]
        license_ = None
        if info.card_data is not None:
            license_ = getattr(info.card_data, "license", None)
        listing = RepoListing(
            repo_id=repo_id,
            commit=info.sha,
            gated=bool(info.gated),
            license=license_,
            options=group_gguf_files(files),
        )
        if with_fit:
            self._add_fit(listing, revision=info.sha or revision)
        return listing

    def _add_fit(self, listing: RepoListing, revision: str | None) -> None:
        if self._header_reader is None or (self._fit is None and self._pick is None):
            return
        headers = self.auth_headers()
        for opt in listing.options:
            # The first part carries the metadata the planner needs for split models too.
            url = hf_hub_url(
                listing.repo_id, opt.files[0].path, revision=revision, endpoint=self.endpoint
            )
            try:
                opt.header = self._header_reader(url, headers)
            except PeregrineError as exc:
                # One unreadable file must not hide the others; the reason is shown per quant.
                log.warning("could not read the header of %s: %s", opt.name, exc)
                status = getattr(exc, "status", None)
                if status in (401, 403):
                    opt.header_error = (
                        f"access refused (HTTP {status}): {listing.repo_id} is gated or private; "
                        "log in with `hf auth login` or set HF_TOKEN"
                    )
                else:
                    opt.header_error = str(exc)
            if self._fit is not None and opt.header is not None:
                try:
                    opt.fit = self._fit(opt.name, opt.header, opt.size)
                except Exception as exc:
                    # A planner bug must not hide the quant list; the traceback goes to the log.
                    log.exception("fit check failed for %s", opt.name)
                    opt.header_error = f"fit check failed: {type(exc).__name__}: {exc}"
        if self._pick is not None:
            candidates = [
                (o.name, o.header, o.size) for o in listing.options if o.header is not None
            ]
            try:
                picked = self._pick(candidates) if candidates else None
            except Exception:
                log.exception("the planner could not pick a quant for %s", listing.repo_id)
                picked = None
            for opt in listing.options:
                opt.picked = opt.name == picked

    def file_url(self, repo_id: str, path: str, revision: str | None = None) -> str:
        """The resolve URL of a file on this endpoint."""
        return hf_hub_url(repo_id, path, revision=revision, endpoint=self.endpoint)
