"""`peregrine profile`: detect the hardware and plan a model's memory (docs/api.md)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import stat
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from engine.errors import PeregrineError, UsageError
from engine.paths import Paths
from engine.planning.estimate import GIB
from engine.planning.hardware import Hardware, Runtime, detect_hardware, working_runtimes
from engine.planning.planner import ModelCandidate, Pins, Plan, plan, plan_for_file
from engine.runtimes import RuntimeSelector
from engine.wire.base import KV_BYTES_PER_ELEMENT

log = logging.getLogger(__name__)

# What a LoadRequest accepts (engine/wire/); a bigger machine is planned with this many.
MAX_THREADS = 1024
# A hardware object is a few KiB; more than this is not one (and /dev/zero never ends).
MAX_HARDWARE_FILE_BYTES = 16 << 20
MAX_REMOTE_FILES = 64
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad usage as UsageError (exit 2, one line) instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _parser() -> _Parser:
    p = _Parser(prog="peregrine profile", description="Detect hardware and plan a model's memory.")
    p.add_argument("--json", action="store_true", help="print the profile as one JSON object")
    src = p.add_argument_group("model (default: the built-in model)")
    src.add_argument("--model", metavar="PATH", help="a local GGUF file")
    src.add_argument("--repo", metavar="ID", help="a Hugging Face repo with GGUF files")
    src.add_argument("--file", metavar="NAME", help="one file of --repo (default: pick a quant)")
    hw = p.add_argument_group("hardware")
    hw.add_argument("--hardware", metavar="FILE", help="plan for this `hardware` JSON object")
    hw.add_argument("--estimate-only", action="store_true", help="skip the llama.cpp dry run")
    pin = p.add_argument_group("pinned choices")
    pin.add_argument("--ctx", type=int, metavar="N", help="context length")
    pin.add_argument("--min-ctx", type=int, metavar="N", help="shortest acceptable context (8192)")
    kv_types = sorted(KV_BYTES_PER_ELEMENT)
    pin.add_argument("--cache-type-k", choices=kv_types, metavar="T", help="K cache type")
    pin.add_argument("--cache-type-v", choices=kv_types, metavar="T", help="V cache type")
    pin.add_argument("--flash-attn", choices=["on", "off", "auto"], help="flash attention")
    pin.add_argument("--gpu-layers", type=int, metavar="N", help="layers on the GPU (-1 all)")
    pin.add_argument(
        "--budget-gib",
        metavar="G[,G...]",
        help="memory budget: one figure for the total, or one per device "
        "(the GPUs in order, then RAM), e.g. 6,10",
    )
    pin.add_argument("--headroom-gib", type=float, metavar="G", help="left free per device (1)")
    pin.add_argument("--threads", type=int, metavar="N", help="CPU threads")
    pin.add_argument("--runtime", metavar="NAME", help="an installed engine runtime")
    pin.add_argument(
        "--parallel",
        metavar="N|auto",
        help="requests decoded at once, one slot each (auto: 4 on one unified KV cache)",
    )
    pin.add_argument(
        "--kv-unified",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one KV cache shared by the slots (default), or ctx/N cells each",
    )
    return p


def pins_from_args(args: argparse.Namespace) -> Pins:
    """The pinned choices of the command line."""
    pins = Pins()
    if args.ctx is not None:
        pins.ctx = args.ctx
    if args.min_ctx is not None:
        pins.min_ctx = args.min_ctx
    pins.type_k = args.cache_type_k
    pins.type_v = args.cache_type_v
    if args.parallel is not None and args.parallel.strip().lower() not in ("auto", "-1"):
        try:
            pins.n_parallel = int(args.parallel)
        except ValueError:
            raise UsageError(
                f"--parallel takes a number of slots or auto: {args.parallel!r}"
            ) from None
    if args.kv_unified is not None:
        pins.kv_unified = args.kv_unified
    if args.flash_attn is not None:
        pins.flash_attn = "on" if args.flash_attn == "auto" else args.flash_attn
    if args.gpu_layers is not None:
        if args.gpu_layers < -1:
            raise UsageError("--gpu-layers must be -1 (all) or more")
        pins.n_gpu_layers = args.gpu_layers
    if args.budget_gib is not None:
        figures = parse_budget_gib(args.budget_gib)
        if len(figures) == 1:
            pins.total_budget_bytes = figures[0]
        else:
            pins.budget_bytes = tuple(figures)
    if args.headroom_gib is not None:
        if not (math.isfinite(args.headroom_gib) and args.headroom_gib >= 0):
            raise UsageError("--headroom-gib must be a number of GiB, 0 or more")
        pins.headroom_bytes = int(args.headroom_gib * GIB)
    if args.threads is not None:
        if not 1 <= args.threads <= MAX_THREADS:
            raise UsageError(f"--threads must be between 1 and {MAX_THREADS}")
        pins.threads = args.threads
    pins.runtime = args.runtime
    return pins


def parse_budget_gib(text: str) -> list[int]:
    """`--budget-gib`: one figure (the total) or a comma-separated figure per device, in bytes."""
    parts = [p.strip() for p in text.split(",")]
    figures = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise UsageError(
                f"--budget-gib takes numbers of GiB separated by commas, not {text!r}"
            ) from None
        if not math.isfinite(value) or value < 0 or value > 1 << 30:
            raise UsageError(f"--budget-gib: {part!r} is not a number of GiB, 0 or more")
        figures.append(int(value * GIB))
    if len(figures) == 1 and figures[0] <= 0:
        raise UsageError("--budget-gib must be a positive number of GiB")
    if len(figures) > 1 and figures[-1] <= 0:
        raise UsageError("--budget-gib: the last figure, the RAM budget, must be positive")
    return figures


def load_hardware_file(path: str) -> Hardware:
    """Reads `--hardware FILE`: exactly the `hardware` object `profile --json` prints."""
    try:
        # stat first: reading a FIFO would wait for a writer, a device such as /dev/zero never ends
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise PeregrineError(f"hardware file {path} is not a regular file")
        with open(path, "rb") as f:
            raw = f.read(MAX_HARDWARE_FILE_BYTES + 1)
    except FileNotFoundError:
        raise PeregrineError(f"hardware file not found: {path}") from None
    except OSError as exc:
        raise PeregrineError(f"cannot read hardware file {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_HARDWARE_FILE_BYTES:
        raise PeregrineError(
            f"hardware file {path} is larger than {MAX_HARDWARE_FILE_BYTES >> 20} MiB; "
            "it is not a hardware object"
        )
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PeregrineError(
            f"hardware file {path} is not UTF-8 text (byte {exc.start}: {exc.reason})"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PeregrineError(f"hardware file {path} is not JSON: {exc}") from None
    except RecursionError:
        raise PeregrineError(f"hardware file {path} is nested too deeply to read") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise PeregrineError(f"hardware file {path} is not usable JSON: {exc}") from None
    return Hardware.from_json(data)


@contextlib.contextmanager
def _quiet_hub_retries() -> Iterator[None]:
    """Silences huggingface-hub's per-retry warnings (each printed twice) unless debugging.

    A failed listing ends in one error line; the retries before it are noise on stderr.
    """
    hub_log = logging.getLogger("huggingface_hub")
    old = hub_log.level
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        hub_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_log.setLevel(old)


def remote_candidates(repo: str, file: str | None) -> list[ModelCandidate]:
    """Quant files of a hub repo, planned from headers read with Range requests."""
    import httpx2
    from huggingface_hub import HfApi, constants, get_token, hf_hub_url
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        RepositoryNotFoundError,
    )

    from engine.gguf.header import read_remote_gguf_header

    # huggingface-hub reads HF_ENDPOINT once, at import; honour it as it is now.
    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    try:
        with _quiet_hub_retries():
            files = HfApi(endpoint=endpoint).list_repo_files(repo)
    except HFValidationError:
        raise PeregrineError(f"{repo!r} is not a Hugging Face repo id (owner/name)") from None
    except GatedRepoError:
        raise PeregrineError(
            f"{repo} is gated: accept its terms on Hugging Face and log in (or set HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise PeregrineError(f"repo {repo!r} not found (or it is private)") from None
    except (HfHubHTTPError, httpx2.HTTPError, OSError) as exc:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise PeregrineError(f"cannot list {repo} on {endpoint}: {reason}") from None
    ggufs = [f for f in files if f.lower().endswith(".gguf")]
    if file is not None:
        if file not in ggufs:
            raise PeregrineError(f"{repo} has no GGUF file {file!r}")
        ggufs = [file]
    # Split models (-00001-of-00003) need every shard's header; plan single files only.
    single = [f for f in ggufs if "-of-0" not in f and "mmproj" not in f.lower()]
    if not single:
        raise PeregrineError(f"{repo} has no single-file GGUF model to plan for")
    if len(single) > MAX_REMOTE_FILES:
        # Each file costs a ranged request or more; a repo with thousands is not a quant list.
        log.warning(
            "%s has %d GGUF files; planning with the first %d (name one with --file)",
            repo,
            len(single),
            MAX_REMOTE_FILES,
        )
        single = sorted(single)[:MAX_REMOTE_FILES]
    token = get_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    out = []
    refused: list[str] = []
    for name in single:
        url = hf_hub_url(repo, name, endpoint=endpoint)
        try:
            header = read_remote_gguf_header(url, headers=headers)
        except PeregrineError as exc:
            if file is not None:
                raise
            # One broken quant must not hide the others; said only if none is readable.
            log.warning("skipping %s: %s", name, exc)
            refused.append(f"{name}: {exc}")
            continue
        out.append(
            ModelCandidate(
                file_name=name,
                header=header,
                file_size=header.file_size or header.data_offset + header.tensor_bytes,
                path=None,
            )
        )
    if not out:
        raise PeregrineError(f"no GGUF file of {repo} could be read ({refused[0]})")
    return out


def make_profile(args: argparse.Namespace) -> Plan:
    """Runs detection (or reads --hardware) and plans the chosen model."""
    if args.model and args.repo:
        raise UsageError("give --model or --repo, not both")
    if args.file and not args.repo:
        raise UsageError("--file needs --repo")
    for flag, value in (
        ("--model", args.model),
        ("--repo", args.repo),
        ("--hardware", args.hardware),
    ):
        if value is not None and not value.strip():
            raise UsageError(f"{flag} needs a value, not an empty string")
    pins = pins_from_args(args)
    if args.hardware:
        hardware = load_hardware_file(args.hardware)
    else:
        hardware = detect_hardware()
        if not args.estimate_only:
            # Plan only with runtimes that work here (each self-tested once, then cached).
            hardware = working_runtimes(hardware, RuntimeSelector(Paths.from_env()).problem)
    if pins.threads is None and hardware.cpu.physical_cores > MAX_THREADS:
        pins.threads = MAX_THREADS
    if args.repo:
        result = plan(hardware, remote_candidates(args.repo, args.file), pins)
        result.reasons.append("remote files: estimated from their headers, no dry run")
        return result
    if args.model is not None:
        path = Path(args.model)
        if not os.path.lexists(path):
            looks_like_repo = args.model.count("/") == 1 and not args.model.startswith((".", "/"))
            hint = (
                f"; to plan a Hugging Face repo use --repo {args.model}" if looks_like_repo else ""
            )
            raise PeregrineError(f"{path}: no such file{hint}")
    else:
        from engine.default_model import default_model_path

        path = default_model_path()
    return plan_for_file(path, hardware=hardware, pins=pins, measure=not args.estimate_only)


def _runtime_text(r: Runtime) -> str:
    """One installed runtime: name, backend, and what it was built with."""
    extras = [r.backend]
    if r.cpu_variants:
        extras.append(f"{len(r.cpu_variants)} CPU variants")
    if r.fa_type_pairs:
        extras.append(f"{len(r.fa_type_pairs)} flash-attention K/V pairs")
    if r.llama_cpp_commit:
        extras.append(f"llama.cpp {r.llama_cpp_commit[:9]}")
    return f"{r.name} ({', '.join(extras)})"


def render_text(result: Plan) -> str:
    """The human-readable profile."""
    hw = result.hardware
    load = result.load
    mem = result.memory
    lines = []
    if hw is not None:
        gpus = ", ".join(
            f"{g.name} ({g.free / GIB:.1f}/{g.total / GIB:.1f} GiB free)" for g in hw.gpus
        )
        lines.append(
            f"hardware: {hw.cpu.name}, {hw.cpu.physical_cores} cores; "
            f"RAM {hw.ram.available / GIB:.1f}/{hw.ram.total / GIB:.1f} GiB free; "
            f"GPUs: {gpus or 'none'}"
        )
        lines.append("runtimes: " + (", ".join(_runtime_text(r) for r in hw.runtimes) or "none"))
        for m in hw.missing:
            lines.append(f"  not probed: {m}")
    lines.append(f"model: {result.quant_file}")
    gpu = {-1: "all", 0: "none"}.get(load.n_gpu_layers, str(load.n_gpu_layers))
    lines.append(
        f"plan: ctx {load.n_ctx}, KV {load.type_k}/{load.type_v}, GPU layers {gpu}, "
        f"flash attention {load.flash_attn}, threads {load.threads}, "
        f"{load.n_parallel} parallel slots"
        + ("" if load.kv_unified else " (KV cache split)")
        + (", MoE experts in RAM" if load.expert_offload else "")
        + (f", MoE experts of the first {load.n_cpu_moe} layers in RAM" if load.n_cpu_moe else "")
        + (f", split {load.tensor_split}" if load.tensor_split else "")
        + (", weights memory-mapped (slower)" if result.paged_bytes else "")
        + f", runtime {load.runtime or 'built-in llama.cpp'}"
    )
    lines.append(
        f"memory ({result.method}): {mem.total / GIB:.2f} GiB = weights {mem.weights / GIB:.2f}"
        f" + KV {mem.kv / GIB:.2f} + compute {mem.compute / GIB:.2f}"
        f" + overhead {mem.overhead / GIB:.2f}"
    )
    lines.append("why:")
    lines.extend(f"  - {r}" for r in result.reasons)
    # Names come from a --hardware file or a model header: no control character may reach
    # the terminal (an ESC sequence, or a newline faking a line of the profile).
    # A file name that is not UTF-8 (lone surrogates) must print on a strict UTF-8 stdout too.
    text = "\n".join(_CONTROL.sub("?", line) for line in lines) + "\n"
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def main(argv: Sequence[str]) -> int:
    """Entry point of `peregrine profile`."""
    args = _parser().parse_args(list(argv))
    result = make_profile(args)
    if args.json:
        out: dict[str, Any] = result.to_json()
        sys.stdout.write(json.dumps(out) + "\n")
    else:
        sys.stdout.write(render_text(result))
    return 0
