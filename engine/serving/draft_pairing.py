"""`--draft-model auto`: a draft model found in the library, kept only if it pays.

A candidate is a GGUF in the models folders with exactly the target's token
list (the loaded models' `vocab_fingerprint` is then compared again) and at
most `MAX_SHARE` of its file size; the smallest drafts cheapest. The engine
loads it and watches its first requests (`DraftTrial`): once the draft model
has drafted `MIN_DRAFTED` tokens, it stays only if the controller's measured
acceptance and cost give a gain over plain decoding; after `MAX_REQUESTS`
requests without enough drafts it goes too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from engine.errors import PeregrineError
from engine.gguf.header import read_gguf_header
from engine.speculative.controller import SpeculationController
from engine.speculative.drafters import Drafter

log = logging.getLogger("peregrine.pairing")

AUTO = "auto"
MAX_SHARE = 0.5  # a draft model at most half the target's size
MIN_DRAFTED = 64  # draft tokens measured before deciding
MAX_REQUESTS = 8  # requests after which a draft that was hardly used goes


def _tokens(path: Path) -> list[str] | None:
    try:
        tokens = read_gguf_header(path).get("tokenizer.ggml.tokens")
    except (PeregrineError, OSError) as exc:
        log.debug("not a draft candidate: %s (%s)", path, exc)
        return None
    return tokens if isinstance(tokens, list) else None


def find_draft(target: Path, folders: Iterable[Path]) -> Path | None:
    """The smallest GGUF in `folders` with exactly the target's token list, at most
    MAX_SHARE of its size; None when there is none."""
    size = target.stat().st_size
    want = _tokens(target)
    if want is None:
        return None
    found: list[tuple[int, Path]] = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in folder.rglob("*.gguf"):
            try:
                same = path.samefile(target)
                candidate_size = path.stat().st_size
            except OSError:
                continue
            if same or candidate_size > size * MAX_SHARE:
                continue
            if path.name.endswith(".partial") or "mmproj" in path.name.lower():
                continue
            found.append((candidate_size, path))
    for _size, path in sorted(found):
        if _tokens(path) == want:
            return path
    return None


@dataclass
class DraftTrial:
    """Watches an automatically paired draft model over the first requests."""

    drafter: Drafter
    requests: int = 0

    def verdict(self, ctl: SpeculationController) -> bool | None:
        """After a request: True to keep the draft, False to drop it, None: not yet."""
        self.requests += 1
        drafted = ctl.stats.by_drafter.get(self.drafter.name, (0, 0))[0]
        if drafted >= MIN_DRAFTED:
            return ctl.best_gain(self.drafter) >= ctl.margin
        if self.requests >= MAX_REQUESTS:
            return False
        return None
