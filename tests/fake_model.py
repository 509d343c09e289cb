"""A scripted stand-in for a loaded model: no llama.cpp, no GGUF.

The model's "logits" after a position are a fixed function of the tokens its
KV sequence holds up to there (`script`); its samplers are greedy. It keeps
each sequence's contents and refuses anything a real KV cache could not do
(a decode that leaves a gap or overlaps, an unknown sequence id), so tests
catch the decoder's bookkeeping mistakes as well as its output.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from engine.backend.llama import BatchPart, ContextFull, MemoryReport, SamplingParams
from engine.wire.control import LoadRequest

Script = Callable[[Sequence[int]], int]

EOG = 0
N_VOCAB = 64


def piece_for(token: int) -> bytes:
    """Token t renders as one letter (1 -> "a"), EOG renders as nothing."""
    return b"" if token == EOG else bytes([ord("a") + (token - 1) % 26]) * (1 + (token - 1) // 26)


def answer_after(prompt: Sequence[int], answer: Sequence[int], filler: int = 63) -> Script:
    """The model answers `answer` to `prompt`, whatever it drafted; `filler` elsewhere."""
    prompt = tuple(prompt)

    def script(context: Sequence[int]) -> int:
        if tuple(context[: len(prompt)]) != prompt or len(context) < len(prompt):
            return filler
        i = len(context) - len(prompt)
        return answer[i] if i < len(answer) else EOG

    return script


class FakeSampler:
    def __init__(self, model: FakeModel, params: SamplingParams) -> None:
        assert params.greedy, "the fake model samples greedily only"
        self.model = model
        self.closed = False
        model.samplers.append(self)

    def sample(self, row: int) -> int:
        assert not self.closed, "sampling with a closed sampler"
        rows = self.model.rows
        assert rows, "no output rows: nothing was decoded"
        logits = rows[row]
        assert logits is not None, f"row {row} kept no logits"
        return max(range(len(logits)), key=logits.__getitem__)

    def close(self) -> None:
        self.closed = True


class FakeModel:
    """Implements the decoder's Model protocol (and the engine's ServedModel)."""

    has_recurrent_state = False
    mtp = None
    mtp_heads = 0
    mtp_reason = None

    def __init__(
        self,
        script: Script,
        *,
        n_ctx: int = 256,
        n_batch: int = 32,
        n_seq_max: int = 1,
        kv_cells: int | None = None,
        pieces: dict[int, bytes] | None = None,
        request: LoadRequest | None = None,
    ) -> None:
        self.script = script
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.n_vocab = N_VOCAB
        self.n_seq_max = n_seq_max
        self.n_ctx_seq = n_ctx
        # Cells all sequences share (a unified cache); a batch that would need
        # more fails as llama.cpp's does, changing nothing.
        self.kv_cells = kv_cells if kv_cells is not None else n_ctx * n_seq_max
        self.pieces = pieces or {}
        self.request = request or LoadRequest(model="fake.gguf")
        self.memory_report = MemoryReport()
        self.kv: list[list[int]] = [[] for _ in range(n_seq_max)]
        self.rows: list[list[float] | None] = []
        self.samplers: list[FakeSampler] = []
        self.decodes: list[tuple[int, list[int], int]] = []  # (seq, tokens, pos0)
        self.batches: list[list[BatchPart]] = []  # every decode_batch call's parts
        self.refuse_truncate = False
        self.on_decode: Callable[[], None] | None = None
        self.closed = False

    # --- Model ----------------------------------------------------------------------

    def decode(
        self, seq: int, tokens: Sequence[int], pos0: int, *, logits_all: bool = False
    ) -> float:
        cells = self.kv[seq]
        assert pos0 == len(cells), f"decode at {pos0} but sequence {seq} holds {len(cells)}"
        assert len(tokens) <= self.n_batch or not logits_all, "verify batch over n_batch"
        assert len(cells) + len(tokens) <= self.n_ctx, "the context is full"
        self.decodes.append((seq, list(tokens), pos0))
        self.rows = []
        for i, token in enumerate(tokens):
            cells.append(token)
            keep = logits_all or i == len(tokens) - 1
            self.rows.append(self._logits(cells) if keep else None)
        if self.on_decode is not None:
            self.on_decode()
        return 10.0 * (1 + 0.9 * (len(tokens) - 1))  # a CPU-like cost per batch size

    def decode_batch(self, parts: Sequence[BatchPart]) -> float:
        n = sum(len(p.tokens) for p in parts)
        assert n <= self.n_batch, "batch over n_batch"
        assert len({p.seq for p in parts}) == len(parts), "a sequence twice in one batch"
        if sum(len(c) for c in self.kv) + n > self.kv_cells:
            raise ContextFull("the context is full")
        self.batches.append(list(parts))
        rows: list[list[float] | None] = []
        for part in parts:
            cells = self.kv[part.seq]
            assert part.pos0 == len(cells), (
                f"decode at {part.pos0} but sequence {part.seq} holds {len(cells)}"
            )
            assert len(cells) + len(part.tokens) <= self.n_ctx_seq, "the sequence is full"
            self.decodes.append((part.seq, list(part.tokens), part.pos0))
            for i, token in enumerate(part.tokens):
                cells.append(token)
                keep = part.logits_all or i == len(part.tokens) - 1
                rows.append(self._logits(cells) if keep else None)
        self.rows = rows
        if self.on_decode is not None:
            self.on_decode()
        return 10.0 * (1 + 0.9 * (n - 1))

    def _logits(self, context: Sequence[int]) -> list[float]:
        logits = [0.0] * self.n_vocab
        logits[self.script(context)] = 1.0
        return logits

    def truncate(self, seq: int, n_keep: int) -> bool:
        if self.refuse_truncate:
            return False
        del self.kv[seq][n_keep:]
        return True

    def clear(self) -> None:
        self.kv = [[] for _ in range(self.n_seq_max)]

    def state_size(self, seq: int) -> int:
        return len(json.dumps(self.kv[seq]))

    def save_state(self, seq: int) -> bytearray:
        return bytearray(json.dumps(self.kv[seq]).encode())

    def restore_state(self, seq: int, data: bytes | bytearray) -> bool:
        cells = list(json.loads(bytes(data)))
        self.kv[seq] = []
        if sum(len(c) for c in self.kv) + len(cells) > self.kv_cells:
            return False  # no room: llama.cpp refuses, leaving the sequence empty
        self.kv[seq] = cells
        return True

    def sampler(self, params: SamplingParams) -> FakeSampler:
        return FakeSampler(self, params)

    def greedy_sampler(self) -> FakeSampler:
        return FakeSampler(self, SamplingParams(temperature=0.0))

    def piece(self, token: int) -> bytes:
        return self.pieces.get(token, piece_for(token))

    def is_eog(self, token: int) -> bool:
        return token == EOG

    # --- ServedModel ----------------------------------------------------------------

    bos = -1
    eos = EOG
    add_bos = False
    max_token_bytes = 4
    control_texts: frozenset[str] = frozenset()

    def meta(self, key: str) -> str | None:
        return None

    def token_text(self, token: int) -> str:
        return self.piece(token).decode()

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        return [1 + (ord(c) - ord("a")) % 26 for c in text]

    def vocab_fingerprint(self) -> str:
        return "fake"

    def close(self) -> None:
        self.closed = True
