"""A loopback server of runtime packs: an index and pack archives, with Range and faults.

Files are served from memory at `http://127.0.0.1:PORT/<name>`. A file can be
cut once after N bytes (`drop_after`), the way a flaky connection ends an
answer; every request's path and Range header are recorded.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from engine.runtimes import built_in_lib_dir

MANIFEST: dict[str, Any] = {
    "schema_version": 1,
    "backend": "cpu",
    "llama_cpp_commit": "0c1e57098bba43ac29e6e3b677cdceebdd22334f",
    "patches": [],
    "cpu_variants": [],
    "fa_type_pairs": [],
}


@dataclass
class PackServer:
    files: dict[str, bytes] = field(default_factory=dict)
    drop_after: dict[str, int] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    # name -> (offset, event): the answer stops after `offset` bytes until the event is set.
    gates: dict[str, tuple[int, threading.Event]] = field(default_factory=dict)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> PackServer:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def add_pack(
        self, archive: bytes, name: str = "cpu", backend: str = "cpu", **extra: Any
    ) -> dict[str, Any]:
        """Serves `archive` as a pack and lists it in /runtime-index.json; returns the entry."""
        from engine.runtime_packs import this_platform

        file = f"peregrine-runtime-{name}-{this_platform()}.tar.gz"
        self.files[file] = archive
        entry = {
            "name": name,
            "backend": backend,
            "platform": this_platform(),
            "url": file,
            "size": len(archive),
            "sha256": hashlib.sha256(archive).hexdigest(),
            "llama_cpp_commit": MANIFEST["llama_cpp_commit"],
            **extra,
        }
        index = json.loads(self.files.get("runtime-index.json", b'{"packs": []}'))
        index["schema_version"] = 1
        index["packs"] = [p for p in index["packs"] if p["name"] != name] + [entry]
        self.files["runtime-index.json"] = json.dumps(index).encode()
        return entry

    @property
    def index_url(self) -> str:
        return f"{self.url}/runtime-index.json"


def _handler(server: PackServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            try:
                self._get()
            except ConnectionError:
                pass  # the client went away (a cancel, a cut): nothing to answer

        def _get(self) -> None:
            name = self.path.lstrip("/")
            rng = self.headers.get("Range")
            server.requests.append((name, rng))
            body = server.files.get(name)
            if body is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = 0
            if rng and rng.startswith("bytes=") and rng.endswith("-"):
                start = int(rng[6:-1])
            if start >= len(body) and rng:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206 if rng else 200)
            if rng:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            end = len(body)
            drop = server.drop_after.pop(name, None)
            if drop is not None and start < drop < end:
                self.wfile.write(body[start:drop])
                self.wfile.flush()
                self.close_connection = True
                return
            gate = server.gates.get(name)
            if gate is not None and start < gate[0] < end:
                self.wfile.write(body[start : gate[0]])
                self.wfile.flush()
                gate[1].wait(60)
                start = gate[0]
            self.wfile.write(body[start:end])

    return Handler


@contextmanager
def running_pack_server() -> Iterator[PackServer]:
    server = PackServer().start()
    try:
        yield server
    finally:
        server.stop()


def runtime_folder(parent: Path, name: str = "cpu", backend: str = "cpu") -> Path:
    """A working runtime folder: the installed wheel's llama.cpp libraries and a runtime.json."""
    lib = built_in_lib_dir()
    assert lib is not None and lib.is_dir()
    folder = parent / name
    shutil.copytree(lib, folder / "lib", symlinks=True)
    (folder / "runtime.json").write_text(json.dumps({**MANIFEST, "backend": backend}))
    return folder


def make_archive(folder: Path, out: Path, arcname: str | None = None) -> bytes:
    """The folder as a pack (tar.gz, arcname: its name), as build_runtime.py writes it."""
    with tarfile.open(out, "w:gz", compresslevel=1) as tar:
        tar.add(folder, arcname=arcname or folder.name)
    return out.read_bytes()
