"""A loopback stand-in for the Hugging Face Hub, speaking its HTTP as huggingface-hub 2.4 uses it.

The hub origin is `http://127.0.0.1:PORT`; LFS files redirect (302) to a CDN on
another origin, `http://localhost:PORT/cdn/...`, because the client's metadata
call only follows same-origin redirects and reads `X-Repo-Commit`,
`X-Linked-Etag` and `X-Linked-Size` from the redirect itself. The CDN honours
`Range` (206 + Content-Range). Every request is recorded and the bytes served
per file are counted, so tests can assert what went over the wire.

Faults are injected per route and key with `FakeHub.inject` (see `Fault`):
"resolve" and "cdn" take "repo/file", "api" takes "repo" (model info and tree)
or "search" (the model list).
Each request takes the next fault queued for it, so a test says exactly which
answer misbehaves and how.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import gguf

VALID_TOKEN = "hf_valid_test_token"
_CHUNK = 64 * 1024


@dataclass
class FakeFile:
    """One file of a fake repo: bytes in memory or a path on disk."""

    path: str
    source: bytes | Path
    sha256: str = ""
    size: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.source, bytes):
            self.size = len(self.source)
            self.sha256 = hashlib.sha256(self.source).hexdigest()
        else:
            self.size = self.source.stat().st_size
            self.sha256 = _sha256_cached(self.source)

    def read(self, start: int, end: int) -> Iterator[bytes]:
        """Yields the bytes [start, end) in chunks."""
        if isinstance(self.source, bytes):
            for pos in range(start, end, _CHUNK):
                yield self.source[pos : min(end, pos + _CHUNK)]
            return
        with self.source.open("rb") as fh:
            fh.seek(start)
            pos = start
            while pos < end:
                data = fh.read(min(_CHUNK, end - pos))
                if not data:
                    return
                pos += len(data)
                yield data


_SHA_CACHE: dict[Path, str] = {}


def _sha256_cached(path: Path) -> str:
    # The 98 MB default model is hashed once per test session, not once per test.
    if path not in _SHA_CACHE:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
        _SHA_CACHE[path] = digest.hexdigest()
    return _SHA_CACHE[path]


@dataclass
class FakeRepo:
    """A model repo: files, one commit, and whether it is gated."""

    repo_id: str
    files: dict[str, FakeFile] = field(default_factory=dict)
    commit: str = ""
    gated: bool = False
    license: str = "apache-2.0"
    downloads: int = 100
    likes: int = 10
    last_modified: str = "2025-01-15T10:00:00.000Z"

    def __post_init__(self) -> None:
        if not self.commit:
            self.commit = hashlib.sha1(self.repo_id.encode()).hexdigest()

    def add(self, path: str, source: bytes | Path) -> FakeFile:
        self.files[path] = FakeFile(path, source)
        return self.files[path]


@dataclass
class Request:
    """One request as the hub saw it."""

    method: str
    host: str
    path: str
    range: str | None
    authorization: str | None
    served: int = 0  # body bytes sent in answer to this request


@dataclass
class Fault:
    """One misbehaviour for the next matching request; `times=None` repeats it for every one."""

    status: int | None = None  # answer this status (small JSON error body) instead
    retry_after: str | None = None  # ... with this Retry-After header
    body: bytes | None = None  # answer 200 with these bytes instead (garbage JSON)
    location: str | None = None  # answer 302 to this address instead
    headers: dict[str, str] = field(
        default_factory=dict
    )  # replace these headers of the real answer
    cut_after: int | None = None  # send this many body bytes, then close the connection
    no_length: bool = False  # leave out Content-Length (the body ends when the connection closes)
    ignore_range: bool = False  # answer 200 with the whole file even to a Range request
    stall: bool = False  # CDN: send the real headers, then nothing; resolve and api: nothing at all
    times: int | None = 1


class FakeHub:
    """The server and its knobs: repos, corruption, throttling, faults, and the request log."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.corrupt: set[str] = set()  # "repo/file": flip one byte in what is served
        self.bytes_per_second: float | None = None  # throttle for CDN bodies
        self.drop_after: dict[str, int] = {}  # "repo/file": cut the connection once after N bytes
        self.requests: list[Request] = []
        self.served: dict[str, int] = {}  # "repo/file" -> body bytes sent
        self.faults: dict[tuple[str, str], list[Fault]] = {}
        self._lock = threading.Lock()
        self._released = threading.Event()  # ends stalls when the hub stops
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        # A short poll interval makes stop() quick: every test stops a hub.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def cdn(self) -> str:
        return f"http://localhost:{self.port}"

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._released.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def add_repo(self, repo_id: str, **kwargs: object) -> FakeRepo:
        repo = FakeRepo(repo_id, **kwargs)  # type: ignore[arg-type]
        self.repos[repo_id] = repo
        return repo

    def inject(self, route: str, key: str, *faults: Fault) -> None:
        """Queues faults for a route ("resolve", "cdn", "api") and key ("repo/file" or "repo")."""
        assert route in ("resolve", "cdn", "api"), route
        with self._lock:
            self.faults.setdefault((route, key), []).extend(faults)

    def take_fault(self, route: str, key: str) -> Fault | None:
        """The fault for this request, if one is queued (used by the handler)."""
        with self._lock:
            queue = self.faults.get((route, key))
            if not queue:
                return None
            fault = queue[0]
            if fault.times is not None:
                fault.times -= 1
                if fault.times <= 0:
                    queue.pop(0)
            return fault

    def stall(self) -> None:
        """Blocks a handler until the hub stops (bounded, so a forgotten stall cannot hang the suite)."""
        self._released.wait(timeout=60)

    def file_requests(self, repo_id: str, path: str) -> list[Request]:
        """The CDN GETs for one file, in order."""
        suffix = f"/{quote(path)}"
        with self._lock:
            return [
                r
                for r in self.requests
                if r.method == "GET"
                and r.path.startswith(f"/cdn/{repo_id}/")
                and r.path.endswith(suffix)
            ]

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def _count(self, key: str, n: int, request: Request) -> None:
        with self._lock:
            self.served[key] = self.served.get(key, 0) + n
            request.served += n


_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_CDN = re.compile(r"^/cdn/(?P<repo>[^/]+/[^/]+)/(?P<rev>[^/]+)/(?P<file>.+)$")
_API_MODEL = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+?)(?:/revision/(?P<rev>[^/]+))?/?$")
_API_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/.*)?$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


def _make_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet test output
            pass

        def handle(self) -> None:
            try:
                super().handle()
            except (BrokenPipeError, ConnectionResetError):
                # The client hung up (a timeout, a killed pull): nothing to answer.
                self.close_connection = True

        def do_HEAD(self) -> None:
            self._handle(head=True)

        def do_GET(self) -> None:
            self._handle(head=False)

        # --- dispatch -------------------------------------------------------
        def _handle(self, head: bool) -> None:
            parts = urlsplit(self.path)
            path = unquote(parts.path)
            query = parse_qs(parts.query)
            self._request = Request(
                "HEAD" if head else "GET",
                self.headers.get("Host", ""),
                path,
                self.headers.get("Range"),
                self.headers.get("Authorization"),
            )
            hub._record(self._request)
            try:
                if path == "/api/models":
                    return self._list_models(query)
                if m := _API_TREE.match(path):
                    return self._tree(m["repo"], m["rev"])
                if m := _API_MODEL.match(path):
                    return self._model_info(m["repo"], query)
                if m := _RESOLVE.match(path):
                    return self._resolve(m["repo"], m["rev"], m["file"], head)
                if m := _CDN.match(path):
                    return self._cdn(m["repo"], m["rev"], m["file"], head)
                self._json(404, {"error": "Not found"}, code="EntryNotFound")
            except (BrokenPipeError, ConnectionResetError):
                # The client went away (a killed pull): nothing to answer.
                pass

        # --- helpers ----------------------------------------------------------
        def _json(self, status: int, body: object, code: str | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if code:
                self.send_header("X-Error-Code", code)
            if isinstance(body, dict) and "error" in body:
                self.send_header("X-Error-Message", str(body["error"]))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _repo(self, repo_id: str) -> FakeRepo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._json(
                    401,
                    {"error": "Repository Not Found"},
                    code="RepoNotFound",
                )
            return repo

        def _authorized(self, repo: FakeRepo) -> bool:
            if not repo.gated:
                return True
            auth = self.headers.get("Authorization")
            if auth == f"Bearer {VALID_TOKEN}":
                return True
            # The hub answers 401 without a token and 403 with a token lacking access,
            # with X-Error-Code: GatedRepo either way (what hf_raise_for_status keys on).
            status = 403 if auth else 401
            self._json(
                status,
                {
                    "error": f"Access to model {repo.repo_id} is restricted. You must have access "
                    "to it and be authenticated to access it. Please log in."
                },
                code="GatedRepo",
            )
            return False

        def _fault(self, route: str, key: str) -> tuple[bool, Fault | None]:
            """(answered, fault): answers a status, body, redirect or stall fault itself."""
            fault = hub.take_fault(route, key)
            if fault is None:
                return False, None
            if fault.status is not None:
                data = json.dumps({"error": f"injected HTTP {fault.status}"}).encode()
                self.send_response(fault.status)
                headers = {"Content-Type": "application/json", "Content-Length": str(len(data))}
                if fault.retry_after is not None:
                    headers["Retry-After"] = fault.retry_after
                self._send_headers(headers, fault)
                if self.command != "HEAD":
                    self.wfile.write(data)
                return True, fault
            if fault.body is not None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(fault.body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(fault.body)
                return True, fault
            if fault.location is not None:
                self.send_response(302)
                self.send_header("Location", fault.location)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return True, fault
            if fault.stall and route != "cdn":
                hub.stall()
                self.close_connection = True
                return True, fault
            return False, fault

        def _send_headers(self, headers: dict[str, str], fault: Fault | None) -> None:
            if fault is not None:
                headers = {**headers, **fault.headers}
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()

        # --- API routes -------------------------------------------------------
        def _list_models(self, query: dict[str, list[str]]) -> None:
            if self._fault("api", "search")[0]:
                return
            search = (query.get("search") or [""])[0].lower()
            filters = query.get("filter") or []
            out = []
            for repo in hub.repos.values():
                if search and search not in repo.repo_id.lower():
                    continue
                has_gguf = any(p.endswith(".gguf") for p in repo.files)
                if "gguf" in filters and not has_gguf:
                    continue
                out.append(
                    {
                        "id": repo.repo_id,
                        "modelId": repo.repo_id,
                        "author": repo.repo_id.split("/")[0],
                        "downloads": repo.downloads,
                        "likes": repo.likes,
                        "gated": "manual" if repo.gated else False,
                        "private": False,
                        "tags": ["gguf", f"license:{repo.license}"],
                        "lastModified": repo.last_modified,
                    }
                )
            expand = query.get("expand")
            if expand:
                # Like the hub: with expand, only the id and the fields named come back.
                out = [{k: v for k, v in m.items() if k == "id" or k in expand} for m in out]
            limit = int((query.get("limit") or ["1000"])[0])
            self._json(200, out[:limit])

        def _model_info(self, repo_id: str, query: dict[str, list[str]]) -> None:
            repo = self._repo(repo_id)
            if repo is None or self._fault("api", repo_id)[0]:
                return
            blobs = (query.get("blobs") or ["false"])[0].lower() == "true"
            siblings = []
            for f in repo.files.values():
                entry: dict[str, object] = {"rfilename": f.path}
                if blobs:
                    entry.update(
                        size=f.size,
                        blobId=hashlib.sha1(f.sha256.encode()).hexdigest(),
                        lfs={"sha256": f.sha256, "size": f.size, "pointerSize": 134},
                    )
                siblings.append(entry)
            self._json(
                200,
                {
                    "id": repo.repo_id,
                    "modelId": repo.repo_id,
                    "author": repo.repo_id.split("/")[0],
                    "sha": repo.commit,
                    "private": False,
                    "gated": "manual" if repo.gated else False,
                    "downloads": repo.downloads,
                    "likes": repo.likes,
                    "lastModified": repo.last_modified,
                    "tags": ["gguf", f"license:{repo.license}"],
                    "cardData": {"license": repo.license},
                    "siblings": siblings,
                },
            )

        def _tree(self, repo_id: str, rev: str) -> None:
            repo = self._repo(repo_id)
            if repo is None or self._fault("api", repo_id)[0]:
                return
            self._json(
                200,
                [
                    {
                        "type": "file",
                        "path": f.path,
                        "size": f.size,
                        "oid": hashlib.sha1(f.sha256.encode()).hexdigest(),
                        "lfs": {"oid": f.sha256, "size": f.size, "pointerSize": 134},
                    }
                    for f in repo.files.values()
                ],
            )

        # --- file routes ------------------------------------------------------
        def _resolve(self, repo_id: str, rev: str, file: str, head: bool) -> None:
            repo = self._repo(repo_id)
            if repo is None or not self._authorized(repo):
                return
            if rev not in ("main", repo.commit):
                self._json(404, {"error": "Invalid rev id"}, code="RevisionNotFound")
                return
            f = repo.files.get(file)
            if f is None:
                self._json(404, {"error": "Entry not found"}, code="EntryNotFound")
                return
            answered, fault = self._fault("resolve", f"{repo_id}/{file}")
            if answered:
                return
            self.send_response(302)
            headers = {
                "Location": f"{hub.cdn}/cdn/{repo_id}/{repo.commit}/{quote(file)}",
                "X-Repo-Commit": repo.commit,
                "X-Linked-Etag": f'"{f.sha256}"',
                "X-Linked-Size": str(f.size),
                "ETag": f'"{hashlib.sha1(f.sha256.encode()).hexdigest()}"',
                "Content-Length": "0",
            }
            self._send_headers(headers, fault)

        def _cdn(self, repo_id: str, rev: str, file: str, head: bool) -> None:
            repo = hub.repos.get(repo_id)
            f = repo.files.get(file) if repo else None
            if f is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            key = f"{repo_id}/{file}"
            answered, fault = self._fault("cdn", key)
            if answered:
                return
            start, end = 0, f.size
            rng = None if fault is not None and fault.ignore_range else self.headers.get("Range")
            status = 200
            if rng and (m := _RANGE.match(rng.strip())):
                start = int(m[1])
                end = min(f.size, int(m[2]) + 1) if m[2] else f.size
                if start >= f.size:
                    self.send_response(416)
                    self._send_headers(
                        {"Content-Range": f"bytes */{f.size}", "Content-Length": "0"}, fault
                    )
                    return
                status = 206
            self.send_response(status)
            headers = {
                "Content-Type": "application/octet-stream",
                "Content-Length": str(end - start),
                "Accept-Ranges": "bytes",
                "ETag": f'"{f.sha256}"',
            }
            if status == 206:
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{f.size}"
            if fault is not None and fault.no_length:
                del headers["Content-Length"]
                self.close_connection = True  # the body ends when the connection does
            self._send_headers(headers, fault)
            if head:
                return
            if fault is not None and fault.stall:
                self.wfile.flush()
                hub.stall()
                self.close_connection = True
                return
            flip_at = f.size // 2 if key in hub.corrupt else -1
            pos = start
            drop_at = hub.drop_after.pop(key, None)
            if fault is not None and fault.cut_after is not None:
                drop_at = start + fault.cut_after
            if drop_at is not None and drop_at <= start:
                self.wfile.flush()
                self.close_connection = True
                return
            for chunk in f.read(start, end):
                if drop_at is not None and pos + len(chunk) > drop_at:
                    # A network cut: part of the promised body, then the connection closes.
                    self.wfile.write(chunk[: drop_at - pos])
                    hub._count(key, drop_at - pos, self._request)
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if pos <= flip_at < pos + len(chunk):
                    buf = bytearray(chunk)
                    buf[flip_at - pos] ^= 0xFF
                    chunk = bytes(buf)
                self.wfile.write(chunk)
                hub._count(key, len(chunk), self._request)
                pos += len(chunk)
                if hub.bytes_per_second:
                    time.sleep(len(chunk) / hub.bytes_per_second)

    return Handler


# --- small fake GGUFs -----------------------------------------------------------------


def make_gguf(
    path: Path,
    *,
    file_type: gguf.LlamaFileType = gguf.LlamaFileType.MOSTLY_Q8_0,
    arch: str = "llama",
    name: str = "Tiny",
    n_floats: int = 1024,
    context_length: int = 4096,
    block_count: int = 2,
    license: str | None = "apache-2.0",
    chat_template: str | None = "{{ messages }}",
    split: tuple[int, int] | None = None,
) -> Path:
    """Writes a small valid GGUF (header + one f32 tensor) and returns its path."""
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_context_length(context_length)
    writer.add_block_count(block_count)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_file_type(int(file_type))
    if license:
        writer.add_license(license)
    if chat_template:
        writer.add_chat_template(chat_template)
    if split is not None:
        writer.add_uint16("split.no", split[0])
        writer.add_uint16("split.count", split[1])
        writer.add_int32("split.tensors.count", split[1])
    writer.add_tensor(f"blk.{split[0] if split else 0}.w", np.arange(n_floats, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@contextlib.contextmanager
def running_hub() -> Iterator[FakeHub]:
    """A started FakeHub, stopped afterwards."""
    hub = FakeHub().start()
    try:
        yield hub
    finally:
        hub.stop()


TINY_QUANTS = {
    "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "Q4_K_M": gguf.LlamaFileType.MOSTLY_Q4_K_M,
    "IQ4_XS": gguf.LlamaFileType.MOSTLY_IQ4_XS,
}


def add_tiny_repo(hub: FakeHub, folder: Path, repo_id: str = "acme/Tiny-GGUF") -> FakeRepo:
    """A repo of several quants of one small model, a split model, a projector and a README."""
    repo = hub.add_repo(repo_id)
    folder.mkdir(parents=True, exist_ok=True)
    # Different tensor sizes so the quants differ in size the way real ones do.
    for i, (quant, ftype) in enumerate(TINY_QUANTS.items()):
        path = make_gguf(folder / f"Tiny-{quant}.gguf", file_type=ftype, n_floats=4096 >> i)
        repo.add(path.name, path.read_bytes())
    for part in (1, 2, 3):
        name = f"Tiny-F16-{part:05d}-of-00003.gguf"
        path = make_gguf(
            folder / name,
            file_type=gguf.LlamaFileType.MOSTLY_F16,
            n_floats=8192,
            split=(part - 1, 3),
        )
        repo.add(name, path.read_bytes())
    repo.add("mmproj-Tiny-F16.gguf", make_gguf(folder / "mmproj.gguf", arch="clip").read_bytes())
    repo.add("README.md", b"# Tiny\n")
    return repo


@contextlib.contextmanager
def hub_with_blob(folder: Path, repo_id: str, file_name: str, size: int) -> Iterator[FakeHub]:
    """A running hub serving one random `size`-byte file, plus the tiny repo (HF_ENDPOINT is the caller's)."""
    with running_hub() as hub:
        hub.add_repo(repo_id).add(file_name, os.urandom(size))
        add_tiny_repo(hub, folder / "tiny")
        yield hub
