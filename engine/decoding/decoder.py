"""The engine's decoding loop: prefix reuse, then driving a slot to its answer.

Runs on the engine's single decode thread. Each slot (engine/decoding/slot.py)
keeps track of exactly which tokens sit in its KV sequence, so every request
starts from the longest common prefix with what is already there, or with a
saved state of an earlier conversation (`prefix_cache.py`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from engine.backend.tokens import common_prefix
from engine.decoding.model import Model
from engine.decoding.prefix_cache import PrefixStateCache
from engine.decoding.request import GenerationRequest, GenerationResult
from engine.decoding.slot import Slot, SlotState
from engine.speculative.controller import SpeculationController
from engine.speculative.drafters import Drafter, build_chain

log = logging.getLogger("peregrine.decoder")

# Don't bother saving a context this short when switching away from it.
MIN_STATE_TOKENS = 32


class Decoder:
    """Owns the KV cache of one model and generates for one request at a time.

    `drafters` is the ordered drafter chain (by default the n-gram drafter
    alone); a request's speculative type picks from it by name ("auto": all).
    """

    def __init__(
        self,
        model: Model,
        *,
        state_cache: PrefixStateCache,
        drafters: Sequence[Drafter] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.model = model
        self.state_cache = state_cache
        self.clock = clock
        self.controller = SpeculationController()
        self.drafters: list[Drafter] = list(drafters) if drafters is not None else build_chain()
        self.last_drafter: str | None = None
        # Start from an empty cache so a slot's tokens and its sequence never disagree.
        model.clear()
        self.slots = [Slot(0, model, self.controller, clock)]

    def close(self) -> None:
        """Frees what the drafters hold (the model itself belongs to the caller)."""
        for drafter in self.drafters:
            drafter.close()

    # --- prefix reuse -------------------------------------------------------------

    def _stash(self, slot: Slot) -> None:
        tokens = slot.tokens
        if len(tokens) < MIN_STATE_TOKENS or self.model.has_recurrent_state:
            return
        # Saving copies the whole KV state: skip it when the cache could not keep
        # it anyway (--cache-ram 0, or a state larger than the budget).
        if not self.state_cache.can_hold(self.model.state_size(slot.seq) + 4 * len(tokens)):
            return
        self.state_cache.put(tokens, self.model.save_state(slot.seq))

    def _reset_context(self) -> None:
        self.model.clear()
        for slot in self.slots:
            slot.forget()

    def _reuse_prefix(self, slot: Slot, prompt: Sequence[int]) -> int:
        """Brings the slot's sequence to the longest usable prefix of `prompt`; returns its length."""
        n_live = common_prefix(slot.tokens, prompt)
        saved, n_saved = self.state_cache.best_match(prompt)
        if saved is not None and n_saved > n_live + MIN_STATE_TOKENS // 2:
            self._stash(slot)
            if self.model.restore_state(slot.seq, saved.data):
                slot.tokens = list(saved.tokens)
                self.state_cache.touch(saved)
                n_live = n_saved
            else:
                log.warning("a saved KV state could not be restored; re-reading the prompt")
                self._reset_context()
                n_live = 0
        elif len(slot.tokens) - n_live >= MIN_STATE_TOKENS:
            # Most of the context is about to go: keep it for a switch back.
            self._stash(slot)
        # At least one prompt token must be evaluated to get logits.
        n_keep = min(n_live, len(prompt) - 1)
        if n_keep < len(slot.tokens):
            if not self.model.truncate(slot.seq, n_keep):
                # Recurrent/hybrid memory cannot always cut mid-sequence.
                self._reset_context()
                n_keep = 0
            slot.tokens = slot.tokens[:n_keep]
        return n_keep

    def drop_context(self) -> None:
        """Forgets everything (used after a failed decode left the cache unknown)."""
        self._reset_context()

    # --- generation ---------------------------------------------------------------

    def _drafters_for(self, req: GenerationRequest) -> list[Drafter]:
        # Rolling back rejected drafts needs a KV cache that can be cut
        # mid-sequence: recurrent/hybrid models decode plainly.
        if self.model.has_recurrent_state:
            return []
        kind = req.speculative.type
        return [d for d in self.drafters if kind == "auto" or d.name == kind]

    def generate(self, req: GenerationRequest, on_text: Callable[[str], None]) -> GenerationResult:
        slot = self.slots[0]
        slot.start(req, on_text, self._drafters_for(req))
        try:
            # Inside the try: a failed restore may leave another chat in the cache
            # than the slot's tokens say, and the handler below starts clean.
            slot.set_prefix(self._reuse_prefix(slot, req.prompt_tokens))
            while slot.state is SlotState.PREFILL:
                slot.prefill()
            if slot.state is SlotState.GENERATING and slot.drafters:
                self.last_drafter = "+".join(d.name for d in slot.drafters)
            while slot.state is SlotState.GENERATING:
                slot.step()
            return slot.result()
        except Exception:
            # The cache may hold half-evaluated tokens: start clean next time.
            self.drop_context()
            raise
        finally:
            slot.release()
