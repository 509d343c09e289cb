"""HubService against the loopback hub: search, quant listing, split models, fit badges, access errors."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from app.services.models.hub import HubService, default_endpoint, quant_of, split_info
from engine.errors import PeregrineError
from engine.gguf.header import parse_gguf_header
from tests.fake_hub import FakeHub, add_tiny_repo, running_hub


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with running_hub() as h:
        monkeypatch.setenv("HF_ENDPOINT", h.endpoint)
        add_tiny_repo(h, tmp_path / "tiny")
        yield h


@dataclass
class Badge:
    level: str
    summary: str


def read_remote_header(url: str, headers: dict[str, str]) -> Any:
    """A stand-in remote reader: the first 64 KiB over a ranged GET, parsed by engine's parser."""
    req = urllib.request.Request(url, headers={**headers, "Range": "bytes=0-65535"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        data = resp.read()
    view = memoryview(data)
    pos = 0

    def read(n: int) -> bytes:
        nonlocal pos
        chunk = bytes(view[pos : pos + n])
        pos += len(chunk)
        return chunk

    return parse_gguf_header(read)


def test_quant_labels_from_file_names() -> None:
    assert quant_of("Qwen3-8B-Q4_K_M.gguf") == "Q4_K_M"
    assert quant_of("model.IQ4_XS.gguf") == "IQ4_XS"
    assert quant_of("x-q8_0-00001-of-00002.gguf") == "Q8_0"
    assert quant_of("Llama-3.2-1B-Instruct-BF16.gguf") == "BF16"
    assert quant_of("gemma-3-27b-it-UD-Q4_K_XL.gguf") == "Q4_K_XL"
    assert quant_of("model.gguf") is None
    assert split_info("a/b-Q4_0-00002-of-00003.gguf") == ("a/b-Q4_0.gguf", 2, 3)
    assert split_info("b-Q4_0.gguf") is None


def test_endpoint_is_read_at_call_time(hub: FakeHub) -> None:
    # huggingface_hub froze its ENDPOINT at import; the service must follow HF_ENDPOINT now.
    assert default_endpoint() == hub.endpoint
    assert HubService().endpoint == hub.endpoint


def test_search_lists_gguf_repos(hub: FakeHub) -> None:
    hub.add_repo("acme/Gated-Tiny-GGUF", gated=True, license="llama3").add("g-Q4_0.gguf", b"GGUF")
    hub.add_repo("acme/NotGguf").add("model.safetensors", b"x")
    results = HubService().search("acme")
    by_id = {r.repo_id: r for r in results}
    assert set(by_id) == {"acme/Tiny-GGUF", "acme/Gated-Tiny-GGUF"}
    assert by_id["acme/Gated-Tiny-GGUF"].gated
    assert by_id["acme/Gated-Tiny-GGUF"].license == "llama3"
    assert by_id["acme/Tiny-GGUF"].downloads == 100
    assert not by_id["acme/Tiny-GGUF"].gated


def test_repo_files_grouped_by_quant_with_split_as_one(hub: FakeHub) -> None:
    listing = HubService().list_quants("acme/Tiny-GGUF")
    repo = hub.repos["acme/Tiny-GGUF"]
    assert listing.commit == repo.commit
    names = [o.name for o in listing.options]
    # The projector and the README are not models; split parts are one model.
    assert sorted(names) == sorted(
        ["Tiny-Q8_0.gguf", "Tiny-Q4_K_M.gguf", "Tiny-IQ4_XS.gguf", "Tiny-F16.gguf"]
    )
    sizes = [o.size for o in listing.options]
    assert sizes == sorted(sizes)
    split = listing.find("F16")
    assert split is not None and split.is_split and split.complete
    assert [f.path for f in split.files] == [f"Tiny-F16-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert split.size == sum(repo.files[f.path].size for f in split.files)
    q8 = listing.find("q8_0")
    assert q8 is not None and q8.files[0].sha256 == repo.files["Tiny-Q8_0.gguf"].sha256
    assert listing.find("Tiny-IQ4_XS.gguf") is listing.find("IQ4_XS")
    assert listing.find("Q2_K") is None


def test_fit_badges_and_pick_from_remote_headers(hub: FakeHub) -> None:
    seen: list[tuple[str, str | None, int]] = []
    limit = hub.repos["acme/Tiny-GGUF"].files["Tiny-Q8_0.gguf"].size  # "VRAM" for the fake planner

    def fit(name: str, header: Any, size: int) -> Badge:
        seen.append((name, header.quant_name, size))
        return Badge("gpu" if size <= limit else "cpu", f"{header.quant_name} fits")

    def pick(candidates: Sequence[tuple[str, Any, int]]) -> str | None:
        # The largest file that fits on the "gpu", as a planner would.
        fitting = [c for c in candidates if c[2] <= limit]
        return max(fitting, key=lambda c: c[2])[0] if fitting else None

    service = HubService(fit=fit, pick=pick, header_reader=read_remote_header)
    listing = service.list_quants("acme/Tiny-GGUF")
    by_quant = {o.quant: o for o in listing.options}
    # Each badge came from that file's own header, read over the CDN redirect.
    for quant in ("Q8_0", "Q4_K_M", "IQ4_XS", "F16"):
        opt = by_quant[quant]
        assert opt.fit is not None and opt.fit.summary == f"{quant} fits"
        assert opt.header.quant_name == quant
    assert by_quant["F16"].fit.level == "cpu"  # type: ignore[union-attr]
    assert by_quant["IQ4_XS"].fit.level == "gpu"  # type: ignore[union-attr]
    assert [o.name for o in listing.options if o.picked] == ["Tiny-Q8_0.gguf"]
    assert any(r.host.startswith("localhost") and r.range == "bytes=0-65535" for r in hub.requests)


def test_unreadable_header_is_reported_per_quant(hub: FakeHub) -> None:
    hub.repos["acme/Tiny-GGUF"].add("Broken-Q2_K.gguf", b"this is not a gguf file at all")
    service = HubService(fit=lambda n, h, s: Badge("gpu", "?"), header_reader=read_remote_header)
    listing = service.list_quants("acme/Tiny-GGUF")
    broken = listing.find("Q2_K")
    assert broken is not None and broken.header_error and broken.header is None
    assert broken.fit is None  # no badge without a header; the reason is shown instead
    assert listing.find("Q8_0").header_error is None  # type: ignore[union-attr]


def test_a_failing_fit_function_leaves_the_listing_usable(
    hub: FakeHub, caplog: pytest.LogCaptureFixture
) -> None:
    def fit(name: str, header: Any, size: int) -> Badge:
        raise TypeError("planner bug")

    def pick(candidates: Sequence[tuple[str, Any, int]]) -> str | None:
        raise TypeError("planner bug")

    service = HubService(fit=fit, pick=pick, header_reader=read_remote_header)
    listing = service.list_quants("acme/Tiny-GGUF")
    assert len(listing.options) == 4
    assert all(o.fit is None and "planner bug" in (o.header_error or "") for o in listing.options)
    assert not any(o.picked for o in listing.options)
    assert "fit check failed" in caplog.text


def test_real_planner_badges(hub: FakeHub) -> None:
    planner = pytest.importorskip("engine.planning.planner")
    gguf_header = pytest.importorskip("engine.gguf.header")
    if not hasattr(gguf_header, "read_remote_gguf_header"):
        pytest.skip("engine.gguf.header.read_remote_gguf_header is not there yet")
    from app.services.models.fit import planner_wiring

    fit, pick, reader = planner_wiring()
    assert fit is not None and planner is not None
    listing = HubService(fit=fit, pick=pick, header_reader=reader).list_quants("acme/Tiny-GGUF")
    for opt in listing.options:
        assert opt.header_error is None
        assert opt.fit is not None and opt.fit.level in ("gpu", "partial", "cpu", "no")
    assert sum(o.picked for o in listing.options) <= 1


def test_gated_repo_listing_says_why_badges_are_missing(hub: FakeHub) -> None:
    gguf_header = pytest.importorskip("engine.gguf.header")
    reader = getattr(gguf_header, "read_remote_gguf_header", None)
    if reader is None:
        pytest.skip("engine.gguf.header.read_remote_gguf_header is not there yet")
    hub.add_repo("acme/Gated-GGUF", gated=True).add("g-Q4_0.gguf", b"GGUF" * 100)
    service = HubService(
        token=False,
        fit=lambda n, h, s: Badge("gpu", "?"),
        header_reader=lambda url, headers: reader(url, headers=headers),
    )
    listing = service.list_quants("acme/Gated-GGUF")
    assert listing.gated
    [opt] = listing.options
    assert opt.fit is None
    assert opt.header_error is not None and "gated or private" in opt.header_error


def test_unknown_repo_is_a_clear_error(hub: FakeHub) -> None:
    with pytest.raises(PeregrineError, match="acme/Nope was not found"):
        HubService().list_quants("acme/Nope")
