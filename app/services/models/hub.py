"""Hugging Face Hub access for the model manager: search, quant listing, fit badges, access errors.

Everything takes the hub endpoint and token through the constructor, so tests
point it at a loopback hub and the GUI can swap tokens without touching the
environment. The fit function and the header reader are injected too: the
planner and the GGUF reader live in engine/ and this module only wires them.
"""

from __future__ import annotations

import email.utils
import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import httpx2
from huggingface_hub import HfApi, constants, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import (  # type: ignore[attr-defined]
    build_hf_headers,
    hf_raise_for_status,
    validate_repo_id,
)

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
# Quantization-aware training and multi-token prediction, as repos spell them in file names.
_QAT_RE = re.compile(r"(?<![A-Za-z])qat(?![A-Za-z])", re.IGNORECASE)
_MTP_RE = re.compile(r"(?<![A-Za-z])(?:mtp|nextn)(?![A-Za-z])", re.IGNORECASE)


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
    last_modified: datetime | None = None  # the repo's last commit, as the hub says


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

    @property
    def qat(self) -> bool:
        """Quantization-aware trained: the file name or the header's name/finetune/tags say QAT."""
        if _QAT_RE.search(self.name):
            return True
        meta = getattr(self.header, "metadata", None)
        if not isinstance(meta, Mapping):
            return False
        for key in ("general.name", "general.finetune", "general.tags"):
            value = meta.get(key)
            texts = value if isinstance(value, list) else [value]
            if any(isinstance(t, str) and _QAT_RE.search(t) for t in texts):
                return True
        return False

    @property
    def mtp_layers(self) -> int | None:
        """MTP heads in the header; None while the header is unread (the name may still say MTP)."""
        if self.header is None:
            return None
        n = getattr(self.header, "nextn_layers", 0)
        return n if isinstance(n, int) and n > 0 else 0

    @property
    def mtp(self) -> bool:
        """Carries multi-token-prediction heads: the header says so, or the file name does."""
        return bool(self.mtp_layers) or bool(_MTP_RE.search(self.name))


@dataclass(frozen=True)
class RefusedFile:
    """A file the hub listed that Peregrine will not touch (unsafe name, impossible size), and why."""

    path: str
    reason: str


@dataclass
class RepoListing:
    """A repo's GGUF models grouped by quant, in the order the hub lists them, smallest first."""

    repo_id: str
    commit: str | None
    gated: bool
    license: str | None
    options: list[QuantOption]
    refused: list[RefusedFile] = field(default_factory=list)

    def find(self, quant_or_file: str) -> QuantOption | None:
        """The option matching a quant label (case-insensitive) or a file name."""
        wanted = quant_or_file.lower()
        for bad in self.refused:
            if bad.path.lower() == wanted:
                raise PeregrineError(
                    f"refusing the file {bad.path!r} listed by {self.repo_id}: {bad.reason}"
                )
        for opt in self.options:
            if opt.name.lower() == wanted or any(f.path.lower() == wanted for f in opt.files):
                return opt
        matches = [o for o in self.options if (o.quant or "").lower() == wanted]
        refused = [r for r in self.refused if (quant_of(r.path) or "").lower() == wanted]
        if not matches and refused:
            bad = refused[0]
            raise PeregrineError(
                f"refusing the file {bad.path!r} listed by {self.repo_id} for {quant_or_file}: "
                f"{bad.reason}"
            )
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


class HubAccessError(PeregrineError):
    """The hub refused or lacks a repo; `gated` when a licence must be accepted first."""

    def __init__(self, message: str, *, gated: bool = False, status: int | None = None) -> None:
        super().__init__(message)
        self.gated = gated
        self.status = status


def access_error(repo_id: str, exc: HfHubHTTPError, token_given: bool) -> HubAccessError:
    """Turns the hub's refusal into one line that says what the user can do."""
    status = exc.response.status_code if exc.response is not None else None
    page = f"https://huggingface.co/{repo_id}"
    if isinstance(exc, GatedRepoError):
        if status == 403 or token_given:
            return HubAccessError(
                f"{repo_id} is gated and your Hugging Face token has no access to it: "
                f"request access at {page}, then try again",
                gated=True,
                status=status,
            )
        return HubAccessError(
            f"{repo_id} is gated: accept its terms at {page}, then log in with "
            "`hf auth login` or set HF_TOKEN, and try again",
            gated=True,
            status=status,
        )
    if isinstance(exc, RevisionNotFoundError):
        return HubAccessError(f"{repo_id} has no such revision", status=status)
    if isinstance(exc, RepositoryNotFoundError):
        return HubAccessError(
            f"{repo_id} was not found on Hugging Face (or it is private: log in with "
            "`hf auth login` or set HF_TOKEN)",
            status=status,
        )
    if status in (401, 403):
        return HubAccessError(
            f"Hugging Face refused access to {repo_id} (HTTP {status})", status=status
        )
    return HubAccessError(
        f"Hugging Face request for {repo_id} failed: {_first_line(str(exc))}", status=status
    )


def _first_line(text: str) -> str:
    return next((line for line in text.splitlines() if line.strip()), text)


# --- a flaky network: what is retried, how patiently, and what the user reads ---------------

# Statuses that say "try again later" (the hub's own list); others are answers.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
# Larger than any file the hub stores: a size beyond this is a broken or hostile answer.
MAX_FILE_SIZE = 1 << 42  # 4 TiB

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a flaky hub or CDN is retried, and how long a silent one is waited for."""

    # 3 retries wait 1 + 2 + 4 s.
    retries: int = 3  # after the first try
    base_delay: float = 1.0  # seconds; doubled on each retry
    max_delay: float = 8.0
    # A server asking to wait longer than this is not waited for: the error says when to retry.
    max_retry_after: float = 60.0
    timeout: float = 10.0  # seconds to connect, and between two reads of one answer
    # A server silent for a whole timeout this many times more in a row is taken as down,
    # so a stalled server fails in about 2 x timeout + 1 s, not minutes.
    timeout_retries: int = 1

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number `retry` (0-based); Retry-After wins when given."""
        if retry_after is not None:
            return max(0.0, retry_after)
        return float(min(self.max_delay, self.base_delay * (2**retry)))

    def httpx_timeout(self) -> httpx2.Timeout:
        return httpx2.Timeout(self.timeout)


def default_retry_policy(environ: Mapping[str, str] | None = None) -> RetryPolicy:
    """The policy, with huggingface-hub's own HF_HUB_DOWNLOAD_TIMEOUT honoured at call time."""
    env = os.environ if environ is None else environ
    raw = env.get("HF_HUB_DOWNLOAD_TIMEOUT")
    if not raw:
        return RetryPolicy()
    try:
        timeout = float(raw)
    except ValueError:
        log.warning("ignoring HF_HUB_DOWNLOAD_TIMEOUT=%r: not a number of seconds", raw)
        return RetryPolicy()
    if not math.isfinite(timeout) or timeout <= 0:
        log.warning("ignoring HF_HUB_DOWNLOAD_TIMEOUT=%r: not a positive number", raw)
        return RetryPolicy()
    return RetryPolicy(timeout=timeout)


class RetriesExhausted(PeregrineError):
    """A request kept failing with transient errors (5xx, 429, timeouts, cut connections)."""

    def __init__(self, message: str, failure: Transient | None = None) -> None:
        super().__init__(message)
        self.failure = failure  # the last one: was it the network or the server?


def parse_retry_after(value: str | None, now: Callable[[], datetime] | None = None) -> float | None:
    """Seconds from a Retry-After header (delay-seconds or an HTTP date); None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        log.info("ignoring unreadable Retry-After %r", value)
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    current = now() if now is not None else datetime.now(UTC)
    return max(0.0, (when - current).total_seconds())


@dataclass(frozen=True)
class Transient:
    """Why a request may succeed when tried again, and how long the server asked us to wait."""

    reason: str
    retry_after: float | None = None
    timed_out: bool = False  # the server stayed silent for a whole timeout
    # No answer at all (refused, cut, silent) rather than an error status from a server.
    network: bool = False


def transient_failure(exc: BaseException) -> Transient | None:
    """A Transient for errors worth retrying (5xx, 429, 408, timeouts, dropped connections), else None."""
    if isinstance(exc, HfHubHTTPError):
        response = exc.response
        status = response.status_code if response is not None else None
        if status in RETRY_STATUSES and response is not None:
            return Transient(
                f"HTTP {status}", parse_retry_after(response.headers.get("Retry-After"))
            )
        return None
    if isinstance(exc, httpx2.TimeoutException):
        return Transient(f"no answer in time ({type(exc).__name__})", timed_out=True, network=True)
    if isinstance(exc, httpx2.NetworkError | httpx2.RemoteProtocolError):
        return Transient(f"connection failed ({type(exc).__name__}: {one_line(exc)})", network=True)
    return None


def one_line(exc: BaseException | str, limit: int = 300) -> str:
    """An exception's text on one line, cut to `limit` characters."""
    return " ".join(str(exc).split())[:limit]


class Backoff:
    """Counts transient failures of one operation and waits between tries; gives up with a clear error."""

    def __init__(
        self,
        policy: RetryPolicy,
        what: str,
        *,
        sleep: Callable[[float], None] = time.sleep,
        notice: Callable[[str], None] | None = None,
        kept: str | Callable[[], str] = "",
    ) -> None:
        self.policy = policy
        self.what = what
        self._sleep = sleep
        self._notice = notice or (lambda msg: log.warning("%s", msg))
        # Appended to the final error ("; the partial file is kept ..."), read when it is raised.
        self._kept = kept
        self.failures = 0
        self.timeouts = 0

    def _kept_text(self) -> str:
        return self._kept() if callable(self._kept) else self._kept

    def progressed(self) -> None:
        """The operation moved forward (bytes arrived): its retry budget starts again."""
        self.failures = 0
        self.timeouts = 0

    def wait_before_retry(self, failure: Transient) -> float:
        """Raises RetriesExhausted when the budget is spent, else returns the seconds to wait."""
        self.failures += 1
        if failure.timed_out:
            self.timeouts += 1
            if self.timeouts > self.policy.timeout_retries:
                raise RetriesExhausted(
                    f"{self.what} failed: {failure.reason}, the server sent nothing for "
                    f"{self.policy.timeout:g} s, {self.timeouts} times in a row{self._kept_text()}",
                    failure,
                )
        else:
            self.timeouts = 0
        if failure.retry_after is not None and failure.retry_after > self.policy.max_retry_after:
            raise RetriesExhausted(
                f"{self.what} failed: the server is busy ({failure.reason}) and asks to retry "
                f"in {failure.retry_after:.0f} s; try again later{self._kept_text()}",
                failure,
            )
        if self.failures > self.policy.retries:
            raise RetriesExhausted(
                f"{self.what} failed after {self.failures} tries: {failure.reason}{self._kept_text()}",
                failure,
            )
        delay = self.policy.delay(self.failures - 1, failure.retry_after)
        self._notice(
            f"{self.what}: {failure.reason}; retrying in {delay:.1f} s "
            f"(retry {self.failures} of {self.policy.retries})"
        )
        return delay

    def call(self, fn: Callable[[], T]) -> T:
        """Runs `fn`, retrying transient failures with backoff."""
        while True:
            try:
                return fn()
            except (HfHubHTTPError, httpx2.TransportError) as exc:
                failure = transient_failure(exc)
                if failure is None:
                    raise
                self._sleep(self.wait_before_retry(failure))


def check_repo_id(repo_id: str) -> None:
    """Refuses a repo id the hub could not have ("owner/name"), before it becomes a folder name."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise PeregrineError(f"{repo_id!r} is not a Hugging Face repo id (owner/name)") from exc


_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


def unsafe_file_name(path: object) -> str | None:
    """Why a file name from the hub cannot be used as a relative path under Peregrine's folders, or None."""
    if not isinstance(path, str) or not path:
        return "not a file name"
    if len(path) > 1000:
        return "name too long"
    if any(ord(c) < 32 or c == "\x7f" for c in path):
        return "control characters in the name"
    if "\\" in path:
        return "backslash in the name"
    if path.startswith("/") or _WINDOWS_DRIVE.match(path):
        return "absolute path"
    if any(part in ("", ".", "..") for part in path.split("/")):
        return "'..', '.' or empty path component"
    return None


def check_file_name(repo_id: str, path: str) -> None:
    """Refuses a file name that could escape Peregrine's folders ("../../x.gguf", "/etc/x")."""
    reason = unsafe_file_name(path)
    if reason is not None:
        raise PeregrineError(f"refusing the file name {path!r} from {repo_id}: {reason}")


def valid_sha256(value: object) -> bool:
    return isinstance(value, str) and bool(_SHA256_RE.match(value))


def valid_commit(value: object) -> bool:
    return isinstance(value, str) and bool(_COMMIT_RE.match(value))


def valid_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_FILE_SIZE


def _hub_time(value: object) -> datetime | None:
    """The hub's ISO 8601 time ("2024-05-01T12:00:00.000Z"); None when absent or unreadable."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _count(value: object) -> int:
    """A download or like count from the hub; anything that is not a count reads as 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _remote_files(
    repo_id: str, siblings: Sequence[Any] | None
) -> tuple[list[RemoteFile], list[RefusedFile]]:
    """The repo's files as the hub listed them, minus the ones no download may touch (kept with why)."""
    files: list[RemoteFile] = []
    refused: list[RefusedFile] = []
    for sibling in siblings or []:
        name = getattr(sibling, "rfilename", None)
        lfs = getattr(sibling, "lfs", None)
        size = lfs.size if lfs else getattr(sibling, "size", None)
        sha = lfs.sha256 if lfs else None
        reason = unsafe_file_name(name)
        if reason is None and size is not None and not valid_size(size):
            reason = f"impossible size {one_line(repr(size), 40)}"
        if reason is None and sha is not None and not valid_sha256(sha):
            reason = "unreadable SHA-256"
        if reason is not None:
            # Logged, listed apart, and refused by name: a hostile listing loses nothing else.
            shown = one_line(repr(name), 200)
            log.warning("%s lists %s; ignoring it: %s", repo_id, shown, reason)
            refused.append(RefusedFile(name if isinstance(name, str) else shown, reason))
            continue
        assert isinstance(name, str)
        files.append(RemoteFile(path=name, size=size or 0, sha256=sha))
    return files, refused


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
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.endpoint = (endpoint or default_endpoint()).rstrip("/")
        # None lets huggingface-hub find HF_TOKEN or the stored login itself.
        self.token = token
        self.retry = retry or default_retry_policy()
        self._sleep = sleep
        self._fit = fit
        self._pick = pick
        self._header_reader = header_reader
        self._api = api or HfApi(endpoint=self.endpoint, token=token)

    def auth_headers(self) -> dict[str, str]:
        """Headers carrying the token (if any) for raw file requests."""
        return build_hf_headers(token=self.token)

    def search(self, term: str, limit: int = 20) -> list[SearchResult]:
        """GGUF repos matching `term`, most downloaded first."""
        # One GET of /api/models of our own, not HfApi.list_models: that one waits
        # as long as any Retry-After says and has no timeout.
        params: list[tuple[str, str | int]] = [
            ("search", term),
            ("filter", "gguf"),
            ("sort", "downloads"),
            ("direction", -1),
            ("limit", limit),
        ]
        # The hub's list answer omits "gated" unless these fields are asked for by name.
        params += [
            ("expand", f)
            for f in ("downloads", "likes", "gated", "private", "tags", "lastModified")
        ]

        def fetch() -> Any:
            with httpx2.Client(timeout=self.retry.httpx_timeout()) as client:
                response = client.get(
                    f"{self.endpoint}/api/models", params=tuple(params), headers=self.auth_headers()
                )
            hf_raise_for_status(response)
            return response.json()

        backoff = Backoff(self.retry, "searching Hugging Face", sleep=self._sleep)
        try:
            models = backoff.call(fetch)
        except HfHubHTTPError as exc:
            raise access_error(term, exc, bool(self.token)) from exc
        except httpx2.HTTPError as exc:
            raise PeregrineError(
                f"could not reach Hugging Face at {self.endpoint}: {one_line(exc)}"
            ) from exc
        except ValueError as exc:
            raise PeregrineError(
                f"Hugging Face sent an unreadable search answer ({one_line(exc, 120)})"
            ) from exc
        if not isinstance(models, list):
            raise PeregrineError("Hugging Face sent an unreadable search answer (not a list)")
        out = []
        for m in models[:limit]:
            repo_id = m.get("id") if isinstance(m, dict) else None
            if not isinstance(repo_id, str):
                log.warning("ignoring a search result without an id: %s", one_line(repr(m), 200))
                continue
            tags = m.get("tags") if isinstance(m.get("tags"), list) else []
            license_ = next(
                (
                    t.split(":", 1)[1]
                    for t in tags
                    if isinstance(t, str) and t.startswith("license:")
                ),
                None,
            )
            out.append(
                SearchResult(
                    repo_id=repo_id,
                    downloads=_count(m.get("downloads")),
                    likes=_count(m.get("likes")),
                    license=license_,
                    gated=bool(m.get("gated")),
                    private=bool(m.get("private")),
                    last_modified=_hub_time(m.get("lastModified")),
                )
            )
        return out

    def list_quants(
        self, repo_id: str, revision: str | None = None, *, with_fit: bool = True
    ) -> RepoListing:
        """The repo's GGUF models grouped by quant; with fit badges and the planner's pick when wired."""
        check_repo_id(repo_id)
        backoff = Backoff(self.retry, f"asking Hugging Face about {repo_id}", sleep=self._sleep)
        try:
            info = backoff.call(
                lambda: self._api.model_info(
                    repo_id, revision=revision, files_metadata=True, timeout=self.retry.timeout
                )
            )
            files, refused = _remote_files(repo_id, info.siblings)
            commit = info.sha
            gated = bool(info.gated)
            license_ = None
            if info.card_data is not None:
                license_ = getattr(info.card_data, "license", None)
        except HfHubHTTPError as exc:
            raise access_error(repo_id, exc, bool(self.token)) from exc
        except httpx2.HTTPError as exc:
            # Not worth retrying (a redirect loop, a non-http redirect) or retries already spent.
            raise PeregrineError(
                f"could not get {repo_id} from Hugging Face at {self.endpoint}: {one_line(exc)}"
            ) from exc
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            # The answer was not the model-info JSON the hub sends (garbage, wrong shape).
            raise PeregrineError(
                f"Hugging Face sent an unreadable answer about {repo_id} "
                f"({type(exc).__name__}: {one_line(exc, 120)})"
            ) from exc
        if commit is not None and not valid_commit(commit):
            raise PeregrineError(
                f"Hugging Face sent an unreadable commit id for {repo_id}: {one_line(str(commit), 60)!r}"
            )
        listing = RepoListing(
            repo_id=repo_id,
            commit=commit,
            gated=gated,
            license=license_ if isinstance(license_, str) else None,
            options=group_gguf_files(files),
            refused=refused,
        )
        if with_fit:
            self._add_fit(listing, revision=info.sha or revision)
        return listing

    @property
    def reads_headers(self) -> bool:
        """True when fit badges can be made (a header reader and the planner are wired)."""
        return self._header_reader is not None and (self._fit is not None or self._pick is not None)

    def _add_fit(self, listing: RepoListing, revision: str | None) -> None:
        if not self.reads_headers:
            return
        listing.options = [self.read_fit(listing, opt, revision) for opt in listing.options]
        self.mark_pick(listing)

    def read_fit(
        self, listing: RepoListing, opt: QuantOption, revision: str | None = None
    ) -> QuantOption:
        """A copy of `opt` with its remote header and fit badge, or the reason it has none.

        Safe to call from a worker thread: `opt` itself is not changed.
        """
        if self._header_reader is None:
            return opt
        # The first part carries the metadata the planner needs for split models too.
        url = hf_hub_url(
            listing.repo_id,
            opt.files[0].path,
            revision=revision or listing.commit,
            endpoint=self.endpoint,
        )
        header: Any = None
        error: str | None = None
        fit: FitLike | None = None
        try:
            header = self._header_reader(url, self.auth_headers())
        except PeregrineError as exc:
            # One unreadable file must not hide the others; the reason is shown per quant.
            log.warning("could not read the header of %s: %s", opt.name, exc)
            status = getattr(exc, "status", None)
            if status in (401, 403):
                error = (
                    f"access refused (HTTP {status}): {listing.repo_id} is gated or private; "
                    "log in with `hf auth login` or set HF_TOKEN"
                )
            else:
                error = str(exc)
        except Exception as exc:
            # A reader bug or an error it did not wrap must not hide the other quants.
            log.exception("reading the header of %s failed", opt.name)
            error = f"header not readable: {type(exc).__name__}: {one_line(exc)}"
        if self._fit is not None and header is not None:
            try:
                fit = self._fit(opt.name, header, opt.size)
            except Exception as exc:
                # A planner bug must not hide the quant list; the traceback goes to the log.
                log.exception("fit check failed for %s", opt.name)
                error = f"fit check failed: {type(exc).__name__}: {exc}"
        return replace(opt, header=header, header_error=error, fit=fit)

    def mark_pick(self, listing: RepoListing) -> str | None:
        """Marks the planner's pick among the options whose header was read; returns its name."""
        picked = None
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
        return picked

    def file_url(self, repo_id: str, path: str, revision: str | None = None) -> str:
        """The resolve URL of a file on this endpoint."""
        return hf_hub_url(repo_id, path, revision=revision, endpoint=self.endpoint)
