"""The engine's decoding loop: parallel slots, one batch per step, prefix reuse.

Runs on the engine's single decode thread. Each slot (engine/decoding/slot.py)
holds one request on its own KV sequence. A step builds one batch from every
busy slot: the next token of each generating slot (with the drafts it wants
verified), then chunks of prompts being prefilled, sized so that a step takes
about `step_ms`; one `llama_decode` computes it, and each slot samples its own
rows (docs/architecture.md).

Each slot keeps track of exactly which tokens sit in its sequence, so a new
request takes the free slot sharing the longest prefix with it, and starts
from there, or from a saved state of an earlier conversation
(`prefix_cache.py`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from functools import partial

from engine.backend.llama import BatchPart, ContextFull, DecodeError
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
# How long one step may take, so that a long prompt never freezes the other
# streams: its prefill goes in chunks of about this much time (docs/architecture.md).
STEP_MS = 250.0
# The smallest prefill chunk, so that a prompt always progresses.
MIN_CHUNK = 16

BUSY = (SlotState.PREFILL, SlotState.GENERATING)
# A parked request still owns its slot: the decoder keeps stepping until it resumes.
ACTIVE = (*BUSY, SlotState.PARKED)


class NoFreeSlot(RuntimeError):
    """Every slot is busy (the scheduler admits only when one is free)."""


class Decoder:
    """Owns the KV cache of one model and decodes for up to one request per slot.

    `chains(seq)` builds the ordered drafter chain of the slot on sequence
    `seq` (by default the n-gram drafter alone); a request's speculative type
    picks from it by name ("auto": all). A fixed `drafters` chain gives the
    decoder a single slot. There is one slot per sequence of the model.
    """

    def __init__(
        self,
        model: Model,
        *,
        state_cache: PrefixStateCache,
        drafters: Sequence[Drafter] | None = None,
        chains: Callable[[int], list[Drafter]] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        step_ms: float = STEP_MS,
    ) -> None:
        self.model = model
        self.state_cache = state_cache
        self.clock = clock
        self.step_ms = step_ms
        self.controller = SpeculationController()
        self.last_drafter: str | None = None
        if drafters is not None:
            self.chains = [list(drafters)]
        else:
            make = chains or (lambda _seq: build_chain())
            self.chains = [make(seq) for seq in range(max(1, model.n_seq_max))]
        self.drafters: list[Drafter] = self.chains[0]
        # Start from an empty cache so a slot's tokens and its sequence never disagree.
        model.clear()
        self.slots = [Slot(seq, model, self.controller, clock) for seq in range(len(self.chains))]
        # Measured cost of one prompt token in a batch (ms); None until measured.
        self._ms_per_token: float | None = None
        self._steps = 0

    def close(self) -> None:
        """Frees what the drafters hold (the model itself belongs to the caller)."""
        for chain in self.chains:
            for drafter in chain:
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

    def _empty(self, slot: Slot) -> None:
        """Empties one slot's sequence (the whole cache if llama.cpp refuses and no other slot is busy)."""
        if not self.model.truncate(slot.seq, 0) and not any(
            s.state in BUSY for s in self.slots if s is not slot
        ):
            self._reset_context()
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
                self._empty(slot)
                n_live = 0
        elif len(slot.tokens) - n_live >= MIN_STATE_TOKENS:
            # Most of the context is about to go: keep it for a switch back.
            self._stash(slot)
        # At least one prompt token must be evaluated to get logits.
        n_keep = min(n_live, len(prompt) - 1)
        if n_keep < len(slot.tokens):
            if not self.model.truncate(slot.seq, n_keep):
                # Recurrent/hybrid memory cannot always cut mid-sequence.
                self._empty(slot)
                n_keep = 0
            slot.tokens = slot.tokens[:n_keep]
        return n_keep

    def drop_context(self) -> None:
        """Forgets everything (used after a failed decode left the cache unknown)."""
        self._reset_context()

    # --- admission ----------------------------------------------------------------

    def _drafters_for(self, slot: Slot, req: GenerationRequest) -> list[Drafter]:
        # Rolling back rejected drafts needs a KV cache that can be cut
        # mid-sequence: recurrent/hybrid models decode plainly.
        if self.model.has_recurrent_state:
            return []
        kind = req.speculative.type
        chosen = [d for d in self.chains[slot.seq] if kind == "auto" or d.name == kind]
        if req.speculative.n_min > 0:
            return chosen  # drafts were asked for: no judging
        # A costly drafter that does not pay is left out, prompt reading included.
        return [d for d in chosen if d.cheap or self.controller.admit_costly(d)]

    @property
    def free_slots(self) -> int:
        # While a request waits for cells to resume into, a new one would only
        # take them first: nothing is admitted until it has resumed.
        if any(s.state is SlotState.PARKED for s in self.slots):
            return 0
        return sum(1 for s in self.slots if s.state is SlotState.IDLE)

    @property
    def busy(self) -> bool:
        return any(s.state in ACTIVE for s in self.slots)

    def pick_slot(self, prompt: Sequence[int]) -> Slot:
        """The free slot whose cached tokens share the longest prefix with `prompt`
        (the least recently used among equals), as llama-server picks."""
        free = [s for s in self.slots if s.state is SlotState.IDLE]
        if not free:
            raise NoFreeSlot("every slot is busy")
        return max(free, key=lambda s: (common_prefix(s.tokens, prompt), -s.last_used))

    def admit(self, req: GenerationRequest, on_text: Callable[[str], None]) -> Slot:
        """Starts a request on a free slot; the following steps decode it."""
        slot = self.pick_slot(req.prompt_tokens)
        slot.start(req, on_text, self._drafters_for(slot, req))
        try:
            # A failed restore may leave another chat in the sequence than the
            # slot's tokens say: `_discard` starts it clean.
            slot.set_prefix(self._reuse_prefix(slot, req.prompt_tokens))
        except BaseException:
            self._discard(slot)
            slot.release()
            raise
        return slot

    # --- one step -----------------------------------------------------------------

    def _prefill_budget(self, rows: int) -> int:
        """Prompt tokens this step may take besides `rows` generation rows.

        Sized by time even for a prompt alone in the step: a request that
        arrives during a long prefill waits at most for the chunk in flight.
        Until a prompt token's cost is measured, a whole n_batch chunk (which
        measures it).
        """
        room = self.model.n_batch - rows
        if self._ms_per_token is None:
            return room
        by_time = int(self.step_ms / self._ms_per_token) - rows
        return max(0, min(room, max(MIN_CHUNK, by_time)))

    def step(self) -> list[Slot]:
        """Decodes one batch for every busy slot; returns the slots that finished.

        A finished slot (DONE) holds its result or `error` until `release()`.
        """
        ended = self._resume()
        busy = [s for s in self.slots if s.state in BUSY]
        planned: list[tuple[Slot, BatchPart]] = []
        generating = [s for s in busy if s.state is SlotState.GENERATING]
        # Drafts compete with the other streams' rows for the step.
        self.controller.other_rows = max(0, len(generating) - 1)
        rows = 0
        for slot in generating:
            room = self.model.n_batch - rows
            if room <= 0:
                continue  # more slots than n_batch rows: this one waits a step
            part = self._guarded(slot, partial(slot.plan, room))
            if part is not None:
                planned.append((slot, part))
                rows += len(part.tokens)
        # Shortest prompt first: a short request waits at most for the step in
        # flight, not for a long prompt's whole prefill.
        prefilling = sorted(
            (s for s in busy if s.state is SlotState.PREFILL), key=lambda s: s.prefill_left
        )
        budget = self._prefill_budget(rows)
        n_prompt = 0
        for slot in prefilling:
            part = self._guarded(slot, partial(slot.plan, budget))
            if part is not None:
                planned.append((slot, part))
                budget -= len(part.tokens)
                n_prompt += len(part.tokens)
        # A full cache may take parts out of the batch: rows follow what was decoded.
        ms, planned = self._decode(planned)
        if ms is not None:
            self._learn(ms, len(planned), rows, n_prompt)
            row = 0
            for slot, part in planned:
                if slot.state in BUSY:
                    self._guarded(slot, partial(slot.commit, row))
                    if slot.state is SlotState.GENERATING and slot.drafters:
                        self.last_drafter = "+".join(d.name for d in slot.drafters)
                row += len(part.tokens)
        self._steps += 1
        return ended + [s for s in busy if s.state is SlotState.DONE]

    # --- a full shared cache: park a request in host RAM, resume it later --------

    def _free_cells(self) -> int:
        return self.model.n_ctx - sum(len(s.tokens) for s in self.slots)

    def _resume(self) -> list[Slot]:
        """Brings parked requests back, oldest first, once their cells fit again
        (with a batch of room to go on); returns those cancelled meanwhile."""
        ended: list[Slot] = []
        parked = sorted(
            (s for s in self.slots if s.state is SlotState.PARKED), key=lambda s: s.age_key
        )
        for slot in parked:
            assert slot.request is not None
            if slot.request.cancel.is_set():
                slot.finish = "cancelled"
                slot.state = SlotState.DONE
                slot.release_parked()
                ended.append(slot)
                continue
            others = any(s.state in BUSY for s in self.slots)
            need = slot.parked_cells + self.model.n_batch
            if self._free_cells() < need:
                self._evict_idle()
            if others and self._free_cells() < need:
                break  # oldest first: a younger one does not overtake it
            if slot.parked_cells == 0 or self.model.restore_state(slot.seq, slot.parked_state()):
                slot.unpark()
                log.info("slot %d resumed (%d cells)", slot.seq, len(slot.tokens))
            elif not others:
                # Alone and still refused: it can never resume.
                slot.unpark()
                slot.tokens = []
                slot.fail(ContextFull("the context is full: a parked request could not resume"))
                self._empty(slot)
                ended.append(slot)
            else:
                break
        return ended

    def _evict_idle(self) -> bool:
        """Frees the cells idle slots keep for prefix reuse (saved to the prefix
        cache when worth it), and those of finished requests not yet released;
        False if there were none."""
        idle = [s for s in self.slots if s.state in (SlotState.IDLE, SlotState.DONE) and s.tokens]
        for slot in idle:
            self._stash(slot)
            self._empty(slot)
        return bool(idle)

    def _park(self, slot: Slot) -> bool:
        """Saves the slot's sequence to host RAM and frees its cells; False if it can't."""
        if self.model.has_recurrent_state or self.model.n_ctx_seq < self.model.n_ctx:
            return False  # a per-slot cache does not fill from other slots' cells
        try:
            state = self.model.save_state(slot.seq) if slot.tokens else bytearray()
        except Exception as exc:
            log.warning("could not save slot %d's cells: %s", slot.seq, exc)
            return False
        slot.park(state)
        if not self.model.truncate(slot.seq, 0):
            slot.unpark()
            return False
        slot.tokens = []
        log.warning(
            "the context is full: slot %d's %d cells were saved to host RAM (%.1f MiB); "
            "it resumes when the others leave room",
            slot.seq,
            slot.parked_cells,
            len(state) / 2**20,
        )
        return True

    def _learn(self, ms: float, n_parts: int, rows: int, n_prompt: int) -> None:
        if n_prompt >= MIN_CHUNK:
            per_token = ms / (rows + n_prompt)
            old = self._ms_per_token
            self._ms_per_token = per_token if old is None else old * 0.7 + per_token * 0.3
        elif n_prompt == 0 and n_parts:
            # What a batch of n generation rows costs: the controller's cost model.
            self.controller.record_cost(rows, ms)

    def _guarded(self, slot: Slot, call: Callable[[], BatchPart | None]) -> BatchPart | None:
        """Runs one slot's part of the step; an error ends that request only."""
        try:
            return call()
        except Exception as exc:
            log.debug("slot %d failed: %s", slot.seq, exc)
            slot.fail(exc)
            self._discard(slot)
            return None

    def _discard(self, slot: Slot) -> None:
        """After an error the slot's sequence is unknown: empty it."""
        self._empty(slot)

    def _decode(
        self, planned: list[tuple[Slot, BatchPart]]
    ) -> tuple[float | None, list[tuple[Slot, BatchPart]]]:
        """Decodes the step's batch; on a full cache, frees room and retries.

        Returns the time it took (None when nothing was decoded) and the parts
        that were. Idle slots' cached tokens go first (saved to the prefix
        cache when worth it); then the youngest request is parked in host RAM
        while the others go on, or, alone, ended with a clear error. Any other
        failure ends every request of the batch.
        """
        while planned:
            try:
                return self.model.decode_batch([part for _slot, part in planned]), planned
            except ContextFull:
                # Requests that ended (in an earlier part of this step: the tool
                # self-test a new request preempted) no longer need their cells.
                if self._evict_idle():
                    continue
                # A request already cancelled (the tool self-test a new request
                # preempted, a client that left) goes first: it ends as cancelled
                # and frees its cells without failing a live request.
                gone = [
                    s for s, _p in planned if s.request is not None and s.request.cancel.is_set()
                ]
                if gone:
                    for slot in gone:
                        slot.finish = "cancelled"
                        slot.state = SlotState.DONE
                        self._empty(slot)
                    planned = [(s, p) for s, p in planned if s not in gone]
                    continue
                victim = max((slot for slot, _part in planned), key=lambda s: s.age_key)
                # The newest request waits in host RAM while the others go on.
                others = any(s.state in BUSY and s is not victim for s in self.slots)
                if others and self._park(victim):
                    planned = [(s, p) for s, p in planned if s is not victim]
                    continue
                log.warning("the context is full: ending the newest request (slot %d)", victim.seq)
                used = sum(len(s.tokens) for s in self.slots)
                victim.fail(
                    ContextFull(
                        f"the context is full: the {len(planned)} requests in progress hold "
                        f"{used} of its {self.model.n_ctx} cells, so the newest one was "
                        "stopped to let the others finish; retry it, or load the model "
                        "with a larger context or fewer parallel slots"
                    )
                )
                self._empty(victim)
                planned = [(s, p) for s, p in planned if s is not victim]
            except DecodeError as exc:
                log.error("decode failed: %s", exc)
                for slot, _part in planned:
                    slot.fail(exc)
                self._reset_context()
                return None, []
        return None, []

    # --- one request alone --------------------------------------------------------

    def generate(self, req: GenerationRequest, on_text: Callable[[str], None]) -> GenerationResult:
        """Runs one request to its end (steps also decode any other busy slot)."""
        slot = self.admit(req, on_text)
        try:
            while slot.state in BUSY:
                self.step()
            if slot.error is not None:
                raise slot.error
            return slot.result()
        finally:
            slot.release()
