"""The batch-invariant mode's plumbing: the flag, the LoadRequest field, the switch.

Whether the mode makes answers exact is tests/test_exactness.py's (Q4_K_M case).
"""

from __future__ import annotations

import os

import pytest

from engine.backend import llama as backend
from engine.serving.serve_cli import _load_request, build_parser
from engine.wire.control import LoadRequest


def test_the_flag_sets_the_load_request_field_and_it_is_off_by_default() -> None:
    assert _load_request(build_parser().parse_args([]), "m.gguf").batch_invariant is False
    args = build_parser().parse_args(["--batch-invariant"])
    assert _load_request(args, "m.gguf").batch_invariant is True
    assert LoadRequest.model_validate({"model": "m.gguf", "batch_invariant": True}).batch_invariant


@pytest.mark.parametrize("users", [None, "1", "0"])
def test_the_tiled_product_switch_goes_back_to_the_users_setting(
    users: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backend, "_TILED_MM_ENV", users)
    if users is None:
        monkeypatch.delenv("GGML_CPU_TILED_MM", raising=False)
    else:
        monkeypatch.setenv("GGML_CPU_TILED_MM", users)
    backend._set_batch_invariant_products(True)
    assert os.environ["GGML_CPU_TILED_MM"] == "0"
    backend._set_batch_invariant_products(False)
    assert os.environ.get("GGML_CPU_TILED_MM") == users
