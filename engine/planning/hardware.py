"""What this machine has: GPUs, CPU, RAM, disk and engine runtimes (docs/api.md `Hardware`).

Each probe is one small function behind `HardwareProbes`, so tests can swap any
of them for a fake (a fake NVML module, a fake sysfs tree). A probe that fails
is recorded in `Hardware.missing` with its reason; detection never raises.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import json
import logging
import math
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil

from engine.child import NO_WINDOW, module_argv
from engine.errors import PeregrineError
from engine.paths import Paths
from engine.runtimes import (
    MANIFEST,
    ManifestError,
    RuntimeProblem,
    load_backends,
    parse_manifest,
    read_manifest,
)

log = logging.getLogger(__name__)

# ISA flags that matter to llama.cpp's CPU kernels; the full /proc list is noise.
_INTERESTING_CPU_FLAGS = (
    "sse3",
    "ssse3",
    "sse4_1",
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    # ARM (/proc/cpuinfo "Features")
    "neon",
    "asimd",
    "asimddp",
    "sve",
    "sve2",
    "i8mm",
    "bf16",
)

# ggml backend device types (ggml-backend.h, enum ggml_backend_dev_type).
_GGML_DEV_TYPE_CPU = 0
_GGML_DEV_TYPE_GPU = 1
_GGML_DEV_TYPE_IGPU = 2

_AMD_VENDOR_ID = "0x1002"

# Bounds on a hardware object: past them a number is hostile or corrupt, not a machine.
MAX_BYTES = 1 << 60  # 1 EiB of memory or disk
MAX_CORES = 1 << 16
MAX_GPUS = 256


@dataclass
class GPU:
    """One GPU as the planner sees it; sizes in bytes."""

    name: str
    backend: str  # cuda, hip, vulkan, metal, sycl ...
    total: int
    free: int
    compute_capability: str | None = None


@dataclass
class CPU:
    """The host CPU: cores for the thread count, flags for kernel choice."""

    name: str
    physical_cores: int
    logical_cores: int
    flags: list[str] = field(default_factory=list)


@dataclass
class RAM:
    """System memory in bytes."""

    total: int
    available: int


@dataclass
class Runtime:
    """An installed engine runtime (`runtimes/<name>/runtime.json`)."""

    name: str
    backend: str
    # Flash-attention K/V type pairs with kernels compiled in; empty: not recorded.
    fa_type_pairs: list[list[str]] = field(default_factory=list)
    llama_cpp_commit: str | None = None
    patches: list[str] = field(default_factory=list)
    cpu_variants: list[str] = field(default_factory=list)

    def has_fa_kernel(self, type_k: str, type_v: str) -> bool:
        """Whether flash attention has a kernel for this pair here (unrecorded: symmetric only)."""
        if not self.fa_type_pairs:
            return type_k == type_v
        return [type_k, type_v] in self.fa_type_pairs


@dataclass
class Hardware:
    """Everything the planner needs to know about a machine (docs/api.md)."""

    gpus: list[GPU]
    cpu: CPU
    ram: RAM
    disk_free: int
    runtimes: list[Runtime] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The `hardware` object of `peregrine profile --json`."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Hardware:
        """Reads a `hardware` object; raises PeregrineError naming what is wrong."""
        if not isinstance(data, dict):
            raise PeregrineError("hardware must be a JSON object")
        try:
            gpu_list = _as_list(data.get("gpus", []), "gpus")
            if len(gpu_list) > MAX_GPUS:
                raise PeregrineError(
                    f"hardware.gpus lists {len(gpu_list)} GPUs (at most {MAX_GPUS})"
                )
            gpus = [
                GPU(
                    name=_text(g["name"], "gpus[].name"),
                    backend=_text(g.get("backend") or "cuda", "gpus[].backend"),
                    total=_nonneg_int(g["total"], "gpus[].total"),
                    free=_nonneg_int(g["free"], "gpus[].free"),
                    compute_capability=(
                        None
                        if g.get("compute_capability") is None
                        else _text(g["compute_capability"], "gpus[].compute_capability")
                    ),
                )
                for g in (_as_obj(x, "gpus[]") for x in gpu_list)
            ]
            for g in gpus:
                if g.free > g.total:
                    raise PeregrineError(
                        f"hardware.gpus[]: {g.name!r} has more free memory ({g.free}) than in "
                        f"total ({g.total})"
                    )
            cpu_d = _as_obj(data["cpu"], "cpu")
            cpu = CPU(
                name=_text(cpu_d.get("name", ""), "cpu.name"),
                physical_cores=max(
                    1, _nonneg_int(cpu_d["physical_cores"], "cpu.physical_cores", MAX_CORES)
                ),
                logical_cores=max(
                    1, _nonneg_int(cpu_d["logical_cores"], "cpu.logical_cores", MAX_CORES)
                ),
                flags=[
                    _text(f, "cpu.flags[]") for f in _as_list(cpu_d.get("flags", []), "cpu.flags")
                ],
            )
            ram_d = _as_obj(data["ram"], "ram")
            ram = RAM(
                total=_nonneg_int(ram_d["total"], "ram.total"),
                available=_nonneg_int(ram_d["available"], "ram.available"),
            )
            if ram.available > ram.total:
                raise PeregrineError(
                    f"hardware.ram.available ({ram.available}) is more than ram.total ({ram.total})"
                )
            runtimes = [
                _runtime_from_json(r)
                for r in (
                    _as_obj(x, "runtimes[]") for x in _as_list(data.get("runtimes", []), "runtimes")
                )
            ]
            return cls(
                gpus=gpus,
                cpu=cpu,
                ram=ram,
                disk_free=_nonneg_int(data.get("disk_free", 0), "disk_free"),
                runtimes=runtimes,
                missing=[str(m) for m in _as_list(data.get("missing", []), "missing")],
            )
        except KeyError as exc:
            hint = (
                " (give the `hardware` object of `profile --json`, not the whole profile)"
                if isinstance(data.get("hardware"), dict)
                else ""
            )
            raise PeregrineError(f"hardware is missing the field {exc.args[0]!r}{hint}") from exc
        except TypeError as exc:
            raise PeregrineError(f"hardware has a field of the wrong shape: {exc}") from exc


def _runtime_from_json(r: dict[str, Any]) -> Runtime:
    """One `runtimes[]` entry; an old one's `fa_all_pairs` flag is read as its list of pairs."""
    name = _text(r["name"], "runtimes[].name")
    fields = {k: v for k, v in r.items() if k in ("backend", "fa_type_pairs", "fa_all_pairs")}
    fields.setdefault("backend", "cpu")
    try:
        manifest = parse_manifest(fields)
    except ManifestError as exc:
        raise PeregrineError(f"hardware.runtimes[] {name!r}: {exc}") from exc
    commit = r.get("llama_cpp_commit")
    return Runtime(
        name=name,
        backend=manifest.backend,
        fa_type_pairs=[list(p) for p in manifest.fa_type_pairs],
        llama_cpp_commit=None if commit is None else _text(commit, "runtimes[].llama_cpp_commit"),
        patches=[
            _text(p, "runtimes[].patches[]")
            for p in _as_list(r.get("patches", []), "runtimes[].patches")
        ],
        cpu_variants=[
            _text(v, "runtimes[].cpu_variants[]")
            for v in _as_list(r.get("cpu_variants", []), "runtimes[].cpu_variants")
        ],
    )


def _nonneg_int(value: Any, name: str, limit: int = MAX_BYTES) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (isinstance(value, float) and not math.isfinite(value))
        or value < 0
    ):
        raise PeregrineError(f"hardware.{name} must be a non-negative number, not {_short(value)}")
    if value > limit:
        raise PeregrineError(
            f"hardware.{name} is implausibly large ({_short(value)}; at most {limit})"
        )
    return int(value)


def _short(value: Any) -> str:
    if isinstance(value, int) and value.bit_length() > 100:
        return f"a {value.bit_length()}-bit number"  # str() of a huge int is slow, or refused
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _text(value: Any, name: str) -> str:
    """A string field; numbers are accepted as text, objects and lists are not."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise PeregrineError(f"hardware.{name} must be text, not {_short(value)}")


def _as_obj(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PeregrineError(f"hardware.{name} must be an object, not {_short(value)}")
    return value


def _as_list(value: Any, name: str) -> list[Any]:
    if not isinstance(value, list):
        raise PeregrineError(f"hardware.{name} must be a list")
    return value


class ProbeError(Exception):
    """A probe could not answer; the message says why (goes to `missing`)."""


@dataclass
class HardwareProbes:
    """Where detection looks. Every field can be swapped in tests."""

    # Returns the pynvml module (or a fake with the same functions).
    nvml_module: Callable[[], ModuleType] = lambda: importlib.import_module("pynvml")
    sysfs_root: Path = Path("/sys")
    proc_cpuinfo: Path = Path("/proc/cpuinfo")
    # Folder of libggml*.so; None means llama_cpp's own lib/ folder.
    ggml_lib_dir: Path | None = None
    # Set False to skip loading llama.cpp's libraries (e.g. for a remote plan).
    probe_ggml: bool = True
    # Ask ggml in a child process: listing CUDA devices creates a CUDA context (hundreds
    # of MiB of VRAM) that would stay in the calling process, such as the desktop app.
    ggml_in_child: bool = True
    ggml_timeout_s: float = 30.0
    virtual_memory: Callable[[], Any] = psutil.virtual_memory
    cpu_count: Callable[[bool], int | None] = lambda logical: psutil.cpu_count(logical=logical)
    disk_usage: Callable[[Path], Any] = shutil.disk_usage
    runtimes_dir: Path | None = None  # None: Paths.from_env().runtimes


def detect_hardware(
    probes: HardwareProbes | None = None, models_dir: Path | None = None
) -> Hardware:
    """Runs every probe; a failing one is noted in `missing` and detection goes on."""
    p = probes or HardwareProbes()
    missing: list[str] = []

    def attempt(what: str, func: Callable[[], Any], default: Any) -> Any:
        try:
            return func()
        except ProbeError as exc:
            missing.append(f"{what}: {exc}")
        except Exception as exc:  # a probe must never take detection down
            log.debug("probe %s failed", what, exc_info=True)
            missing.append(f"{what}: {type(exc).__name__}: {exc}")
        return default

    nvidia: list[GPU] = attempt("nvml", lambda: probe_nvml(p.nvml_module, missing), [])
    amd: list[GPU] = attempt("amd sysfs", lambda: probe_amd_sysfs(p.sysfs_root, missing), [])
    ggml: list[GPU] = (
        attempt(
            "ggml devices",
            lambda: (
                probe_ggml_devices_in_child(p.ggml_lib_dir, p.ggml_timeout_s)
                if p.ggml_in_child
                else probe_ggml_devices(p.ggml_lib_dir)
            ),
            [],
        )
        if p.probe_ggml
        else []
    )
    cpu: CPU = attempt(
        "cpu",
        lambda: probe_cpu(p.proc_cpuinfo, p.cpu_count),
        CPU(name="unknown", physical_cores=1, logical_cores=1),
    )
    ram: RAM = attempt("ram", lambda: _ram(p.virtual_memory), RAM(0, 0))
    if models_dir is None:
        models_dir = Paths.from_env().models
    disk_free: int = attempt("disk", lambda: _disk_free(models_dir, p.disk_usage), 0)
    runtimes_dir = p.runtimes_dir if p.runtimes_dir is not None else Paths.from_env().runtimes
    runtimes: list[Runtime] = attempt("runtimes", lambda: probe_runtimes(runtimes_dir, missing), [])
    return Hardware(
        gpus=[_sane_gpu(g) for g in merge_gpus(nvidia + amd, ggml)][:MAX_GPUS],
        cpu=cpu,
        ram=ram,
        disk_free=disk_free,
        runtimes=runtimes,
        missing=missing,
    )


def _ram(virtual_memory: Callable[[], Any]) -> RAM:
    vm = virtual_memory()
    total = _probed_int(vm.total, "total")
    # Never more available than there is: `--hardware` refuses such a file.
    return RAM(total=total, available=min(total, _probed_int(vm.available, "available")))


def _probed_int(value: Any, what: str) -> int:
    """A byte count a probe reported, or ProbeError when it is not a sane one."""
    if isinstance(value, bool):
        raise ProbeError(f"{what} is {value!r}, not a number")
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProbeError(f"{what} is {_short(value)}, not a number") from exc
    if not 0 <= number <= MAX_BYTES:
        raise ProbeError(f"{what} is {_short(number)}, out of range")
    return number


def _sane_gpu(g: GPU) -> GPU:
    # A driver can report free > total for a moment; the planner must never see it.
    g.free = max(0, min(g.free, g.total))
    return g


def merge_gpus(vendor: list[GPU], ggml: list[GPU]) -> list[GPU]:
    """Vendor probes (exact free memory, compute capability) first; ggml adds what they missed.

    A ggml device counts as already known when a vendor GPU has the same name.
    """
    merged = list(vendor)
    known = {g.name.lower() for g in vendor}
    for g in ggml:
        if g.name.lower() not in known and not any(
            k in g.name.lower() or g.name.lower() in k for k in known
        ):
            merged.append(g)
    return merged


def probe_nvml(load: Callable[[], ModuleType], missing: list[str] | None = None) -> list[GPU]:
    """NVIDIA GPUs through NVML (nvidia-ml-py); a GPU that cannot be read goes to `missing`."""
    try:
        nvml = load()
    except ImportError as exc:
        raise ProbeError(f"pynvml is not installed ({exc})") from exc
    try:
        nvml.nvmlInit()
    except Exception as exc:
        raise ProbeError(f"no NVIDIA driver ({exc})") from exc
    try:
        count = _probed_int(nvml.nvmlDeviceGetCount(), "device count")
        if count > MAX_GPUS:
            raise ProbeError(f"NVML reports {count} GPUs; not believed")
        gpus = []
        for i in range(count):
            try:
                gpus.append(_nvml_gpu(nvml, i))
            except Exception as exc:  # one bad GPU must not hide the others
                log.debug("NVML GPU %d failed", i, exc_info=True)
                if missing is not None:
                    missing.append(f"nvml GPU {i}: {type(exc).__name__}: {exc}")
        return gpus
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            log.debug("nvmlShutdown failed", exc_info=True)


def _nvml_gpu(nvml: Any, i: int) -> GPU:
    handle = nvml.nvmlDeviceGetHandleByIndex(i)
    name = nvml.nvmlDeviceGetName(handle)
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    mem = nvml.nvmlDeviceGetMemoryInfo(handle)
    try:
        major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
        cc: str | None = f"{int(major)}.{int(minor)}"
    except Exception:
        log.debug("compute capability of GPU %d unknown", i, exc_info=True)
        cc = None
    return GPU(
        name=str(name),
        backend="cuda",
        total=_probed_int(mem.total, "memory total"),
        free=_probed_int(mem.free, "memory free"),
        compute_capability=cc,
    )


def probe_amd_sysfs(root: Path, missing: list[str] | None = None) -> list[GPU]:
    """AMD GPUs on Linux: VRAM counters under /sys/class/drm/card*/device."""
    drm = root / "class" / "drm"
    if not drm.is_dir():
        raise ProbeError(f"{drm} does not exist")
    gpus = []
    failures = []
    for card in sorted(drm.glob("card[0-9]*"))[:MAX_GPUS]:
        if "-" in card.name:  # connectors such as card0-HDMI-A-1
            continue
        dev = card / "device"
        if _read_first(dev / "vendor") != _AMD_VENDOR_ID:
            continue
        try:
            total = _probed_int(_read_first(dev / "mem_info_vram_total"), "VRAM total")
            used = _probed_int(_read_first(dev / "mem_info_vram_used"), "VRAM used")
        except ProbeError as exc:
            # One card without counters must not hide the others.
            failures.append(f"{card.name}: cannot read VRAM counters ({exc})")
            continue
        name = _read_first(dev / "product_name") or f"AMD GPU ({card.name})"
        gfx = _read_first(dev / "gfx_target_version")
        gpus.append(
            GPU(
                name=name,
                backend="hip",
                total=total,
                free=max(0, total - used),
                compute_capability=gfx,
            )
        )
    if failures and not gpus:
        raise ProbeError("; ".join(failures))
    if missing is not None:
        missing.extend(f"amd sysfs: {f}" for f in failures)
    return gpus


def _read_first(path: Path) -> str | None:
    """A short sysfs attribute, or None; a FIFO or a huge file there is not read."""
    try:
        if not path.is_file():
            return None
        with path.open("rb") as f:
            raw = f.read(4096)
    except OSError:
        return None
    text = raw.decode("utf-8", "replace").strip()
    return text or None


def probe_ggml_devices(lib_dir: Path | None) -> list[GPU]:
    """GPUs the installed llama.cpp build can use, through ggml's device API (ctypes)."""
    lib = load_ggml(lib_dir)
    try:
        # A backend-DL build lists no device until its backend modules are registered.
        load_backends(lib_dir)
    except RuntimeProblem as exc:
        raise ProbeError(str(exc)) from exc
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    for fn in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
        getattr(lib, fn).argtypes = [ctypes.c_void_p]
        getattr(lib, fn).restype = ctypes.c_char_p
    lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_type.restype = ctypes.c_int
    lib.ggml_backend_dev_memory.argtypes = [
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_size_t),
        ctypes.POINTER(ctypes.c_size_t),
    ]
    lib.ggml_backend_dev_memory.restype = None
    gpus = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        kind = lib.ggml_backend_dev_type(dev)
        if kind not in (_GGML_DEV_TYPE_GPU, _GGML_DEV_TYPE_IGPU):
            continue
        name = (lib.ggml_backend_dev_name(dev) or b"").decode("utf-8", "replace")
        desc = (lib.ggml_backend_dev_description(dev) or b"").decode("utf-8", "replace")
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        gpus.append(
            GPU(name=desc or name, backend=_backend_of(name), total=total.value, free=free.value)
        )
    return gpus


def probe_ggml_devices_in_child(lib_dir: Path | None, timeout_s: float = 30.0) -> list[GPU]:
    """probe_ggml_devices, run by `python -m engine.planning.hardware --ggml-devices` in a child."""
    cmd = [*module_argv("engine.planning.hardware"), "--ggml-devices"]
    if lib_dir is not None:
        cmd += ["--lib-dir", str(lib_dir)]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=env,
            check=False,
            creationflags=NO_WINDOW,
        )
    except subprocess.TimeoutExpired as exc:
        raise ProbeError(f"listing devices took over {timeout_s:.0f} s") from exc
    try:
        reply = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ProbeError(f"device listing failed (exit {proc.returncode}): {last}") from None
    if not isinstance(reply, dict):
        raise ProbeError("device listing gave no answer")
    if "error" in reply:
        raise ProbeError(str(reply["error"]))
    return [GPU(**g) for g in reply["gpus"]]


def _backend_of(dev_name: str) -> str:
    """ggml device names start with the backend: CUDA0, Vulkan0, ROCm0, Metal, SYCL0."""
    lowered = dev_name.lower()
    for prefix, backend in (
        ("cuda", "cuda"),
        ("rocm", "hip"),
        ("hip", "hip"),
        ("vulkan", "vulkan"),
        ("metal", "metal"),
        ("mtl", "metal"),
        ("sycl", "sycl"),
    ):
        if lowered.startswith(prefix):
            return backend
    return lowered.rstrip("0123456789") or "unknown"


def load_ggml(lib_dir: Path | None = None) -> ctypes.CDLL:
    """llama.cpp's libggml (the same copy llama_cpp uses when lib_dir is None)."""
    if lib_dir is None:
        spec = importlib.util.find_spec("llama_cpp")
        if spec is None or not spec.submodule_search_locations:
            raise ProbeError("llama_cpp is not installed")
        lib_dir = Path(next(iter(spec.submodule_search_locations))) / "lib"
    candidates = sorted(lib_dir.glob("libggml.so*")) + sorted(lib_dir.glob("libggml.dylib"))
    candidates += sorted(lib_dir.glob("ggml.dll"))
    if not candidates:
        raise ProbeError(f"no libggml in {lib_dir}")
    # Load the base library first so the backend libraries resolve against this copy.
    for base in sorted(lib_dir.glob("libggml-base.so*")):
        ctypes.CDLL(str(base), mode=ctypes.RTLD_GLOBAL)
    try:
        return ctypes.CDLL(str(candidates[0]))
    except OSError as exc:
        raise ProbeError(f"cannot load {candidates[0].name}: {exc}") from exc


def probe_cpu(cpuinfo: Path, cpu_count: Callable[[bool], int | None]) -> CPU:
    """CPU name and ISA flags from /proc/cpuinfo; core counts from psutil."""
    name = "unknown"
    flags: list[str] = []
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if (
            key in ("model name", "hardware", "processor")
            and name == "unknown"
            and not value.strip().isdigit()
        ):
            name = value.strip() or name
        elif key in ("flags", "features") and not flags:
            present = set(value.split())
            flags = [f for f in _INTERESTING_CPU_FLAGS if f in present]
    logical = max(1, min(MAX_CORES, int(cpu_count(True) or os.cpu_count() or 1)))
    physical = max(1, min(logical, int(cpu_count(False) or logical)))
    return CPU(name=name, physical_cores=physical, logical_cores=logical, flags=flags)


def _disk_free(models_dir: Path, disk_usage: Callable[[Path], Any]) -> int:
    # The models folder may not exist yet; its nearest existing parent is on the same disk.
    folder = models_dir
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return _probed_int(disk_usage(folder).free, "free space")


def probe_runtimes(runtimes_dir: Path, missing: list[str]) -> list[Runtime]:
    """Installed runtimes; a broken runtime.json is noted in `missing` and skipped."""
    if not runtimes_dir.is_dir():
        return []
    found = []
    for folder in sorted(p.parent for p in runtimes_dir.glob(f"*/{MANIFEST}")):
        try:
            manifest, _ = read_manifest(folder)
        except ManifestError as exc:
            missing.append(f"runtime {folder.name}: {exc}")
            continue
        found.append(
            Runtime(
                name=folder.name,
                backend=manifest.backend,
                fa_type_pairs=[list(p) for p in manifest.fa_type_pairs],
                llama_cpp_commit=manifest.llama_cpp_commit,
                patches=[p.name for p in manifest.patches],
                cpu_variants=list(manifest.cpu_variants),
            )
        )
    return found


def working_runtimes(hardware: Hardware, problem: Callable[[str], str | None]) -> Hardware:
    """`hardware` with only the runtimes that pass their self-test (`problem` returns None);
    each other one goes to `missing` with its reason, so a plan never names a broken one."""
    kept = []
    missing = list(hardware.missing)
    for r in hardware.runtimes:
        why = problem(r.name)
        if why is None:
            kept.append(r)
        else:
            missing.append(f"runtime {r.name}: {why}")
    return replace(hardware, runtimes=kept, missing=missing)


def main(argv: list[str] | None = None) -> int:
    """Child entry point: `--ggml-devices` prints the ggml GPU list as one JSON line."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m engine.planning.hardware")
    parser.add_argument("--ggml-devices", action="store_true", required=True)
    parser.add_argument("--lib-dir", type=Path)
    args = parser.parse_args(argv)
    try:
        gpus = probe_ggml_devices(args.lib_dir)
    except ProbeError as exc:
        print(json.dumps({"error": str(exc)}))
        return 1
    print(json.dumps({"gpus": [asdict(g) for g in gpus]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
