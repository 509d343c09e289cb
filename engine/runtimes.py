"""Engine runtimes: llama.cpp builds per hardware, their manifests, self-test and fallback.

A runtime is a folder `PEREGRINE_HOME/runtimes/<name>/` holding `runtime.json`
(docs/api.md, "Engine runtimes") and a `lib/` of llama.cpp libraries. Before a
runtime serves, a child process loads the built-in model with it and decodes 8
tokens; the result is cached per manifest and driver version. A runtime that is
missing, malformed or fails its self-test is replaced by the cpu runtime, or by
the llama.cpp that ships with Peregrine, and the reason is reported: a broken
runtime never costs the user the engine.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.child import NO_WINDOW, crash_line, crash_reason, module_argv
from engine.errors import PeregrineError
from engine.paths import Paths

log = logging.getLogger(__name__)

MANIFEST = "runtime.json"
SCHEMA_VERSION = 1
MAX_MANIFEST_BYTES = 1 << 20
# The name of the llama.cpp that ships inside Peregrine (llama-cpp-python's own lib/).
BUILT_IN = "default"
# KV cache types a flash-attention pair may name (the engine's KVType).
KV_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl")
# Types of llama.cpp's CUDA flash-attention vector kernels (ggml/cmake/common.cmake).
CUDA_FA_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "bf16", "f16")
# What GGML_CUDA_FA_QUANTS compiles when not set: what an old `fa_all_pairs: false` meant.
CUDA_FA_DEFAULT = (("f16", "f16"), ("q4_0", "q4_0"), ("q8_0", "q8_0"), ("bf16", "bf16"))
SELF_TEST_TOKENS = 8
SELF_TEST_TIMEOUT_S = 180.0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_BACKEND = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_HEX = re.compile(r"^[0-9a-f]+$")

FaPair = tuple[str, str]


class RuntimeProblem(PeregrineError):
    """A runtime cannot be used; the message says why, in words for a user."""


class ManifestError(RuntimeProblem):
    """runtime.json is unreadable or breaks the schema (docs/api.md, "Engine runtimes")."""


@dataclass(frozen=True)
class Patch:
    """One patch applied to llama.cpp's sources, with the SHA-256 of the patch file."""

    name: str
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """The contents of a runtime.json."""

    backend: str
    llama_cpp_commit: str | None = None
    patches: tuple[Patch, ...] = ()
    cpu_variants: tuple[str, ...] = ()
    # Flash-attention K/V type pairs with kernels compiled in; empty: not recorded.
    fa_type_pairs: tuple[FaPair, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """runtime.json as the recipes write it."""
        return {
            "schema_version": SCHEMA_VERSION,
            "backend": self.backend,
            "llama_cpp_commit": self.llama_cpp_commit,
            "patches": [asdict(p) for p in self.patches],
            "cpu_variants": list(self.cpu_variants),
            "fa_type_pairs": [list(p) for p in self.fa_type_pairs],
        }


def all_fa_pairs(types: tuple[str, ...] = CUDA_FA_TYPES) -> tuple[FaPair, ...]:
    """Every K/V pair of `types` (what GGML_CUDA_FA_QUANTS=all compiles)."""
    return tuple((k, v) for v in types for k in types)


def parse_manifest(data: Any) -> Manifest:
    """Checks a decoded runtime.json; raises ManifestError naming the first wrong field."""
    if not isinstance(data, dict):
        raise ManifestError("runtime.json must be a JSON object")
    version = data.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise ManifestError(
            f"runtime.json has schema_version {_short(version)}; this Peregrine reads "
            f"version {SCHEMA_VERSION}"
        )
    backend = data.get("backend")
    if not isinstance(backend, str) or not _BACKEND.match(backend):
        raise ManifestError(
            f'runtime.json: \'backend\' must be a backend name such as "cpu", "cuda" or '
            f'"vulkan", not {_short(backend)}'
        )
    commit = data.get("llama_cpp_commit")
    if commit is not None and (
        not isinstance(commit, str) or not 7 <= len(commit) <= 40 or not _HEX.match(commit)
    ):
        raise ManifestError(
            "runtime.json: 'llama_cpp_commit' must be a git commit (7 to 40 lower-case hex "
            f"digits) or null, not {_short(commit)}"
        )
    patches = []
    for i, p in enumerate(_list(data, "patches")):
        if not isinstance(p, dict) or not isinstance(p.get("name"), str) or not p["name"]:
            raise ManifestError(
                f'runtime.json: patches[{i}] must be {{"name": ..., "sha256": ...}}, '
                f"not {_short(p)}"
            )
        digest = p.get("sha256")
        if not isinstance(digest, str) or len(digest) != 64 or not _HEX.match(digest):
            raise ManifestError(
                f"runtime.json: patches[{i}].sha256 must be 64 lower-case hex digits, "
                f"not {_short(digest)}"
            )
        patches.append(Patch(p["name"], digest))
    variants = []
    for i, v in enumerate(_list(data, "cpu_variants")):
        if not isinstance(v, str) or not _BACKEND.match(v):
            raise ManifestError(
                f'runtime.json: cpu_variants[{i}] must be a variant name such as "haswell", '
                f"not {_short(v)}"
            )
        variants.append(v)
    return Manifest(
        backend=backend,
        llama_cpp_commit=commit,
        patches=tuple(patches),
        cpu_variants=tuple(variants),
        fa_type_pairs=_fa_pairs(data, backend),
    )


def _fa_pairs(data: dict[str, Any], backend: str) -> tuple[FaPair, ...]:
    if "fa_type_pairs" not in data:
        old = data.get("fa_all_pairs")  # the yes/no flag of manifests before the list
        if old is True:
            return all_fa_pairs()
        if old is False and backend == "cuda":
            return CUDA_FA_DEFAULT
        return ()
    pairs: list[FaPair] = []
    for i, pair in enumerate(_list(data, "fa_type_pairs")):
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or not all(isinstance(t, str) and t in KV_TYPES for t in pair)
        ):
            raise ManifestError(
                f"runtime.json: fa_type_pairs[{i}] must be a [K, V] pair of KV types such as "
                f'["q8_0", "q8_0"] (types: {", ".join(KV_TYPES)}), not {_short(pair)}'
            )
        if (pair[0], pair[1]) not in pairs:
            pairs.append((pair[0], pair[1]))
    return tuple(pairs)


def _list(data: dict[str, Any], key: str) -> list[Any]:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise ManifestError(f"runtime.json: {key!r} must be a list, not {_short(value)}")
    return value


def _short(value: Any) -> str:
    text = json.dumps(value) if _jsonable(value) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        return False
    return True


def read_manifest(folder: Path) -> tuple[Manifest, str]:
    """The runtime.json in `folder` and the SHA-256 of its bytes; ManifestError when unusable."""
    path = folder / MANIFEST
    try:
        # A FIFO would block the read and a device never end it: regular files only, capped.
        if not path.is_file():
            raise ManifestError(
                f"{MANIFEST} is missing"
                if not path.exists()
                else f"{MANIFEST} is not a regular file"
            )
        with path.open("rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise ManifestError(f"cannot read {MANIFEST}: {exc.strerror or exc}") from exc
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ManifestError(f"{MANIFEST} is not valid JSON ({_first_line(exc)})") from exc
    return parse_manifest(data), hashlib.sha256(raw).hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:120] if text else type(exc).__name__


# --- Loading a runtime's libraries ------------------------------------------------------


def built_in_lib_dir() -> Path | None:
    """llama-cpp-python's own lib/ folder, found without importing it (None: not installed)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def _lib_files(lib_dir: Path, stem: str) -> list[Path]:
    """`stem`'s shared library in lib_dir, in the platform's spellings, the soname first.

    A wheel stores libggml.so, libggml.so.0 and libggml.so.0.25.3 as three
    copies, and libllama loads the one its soname names (libggml.so.0). Loading
    another copy by path would give this process two ggml registries, and the
    backends registered in one would be missing from the one llama.cpp reads.
    """
    versioned = sorted(lib_dir.glob(f"lib{stem}.so.*"), key=lambda p: (p.name.count("."), p.name))
    return (
        versioned[:1]
        + sorted(lib_dir.glob(f"lib{stem}.so"))
        + versioned[1:]
        + sorted(lib_dir.glob(f"lib{stem}.dylib"))
        + sorted(lib_dir.glob(f"{stem}.dll"))
    )


def load_backends(lib_dir: Path | None) -> int:
    """Registers the backend modules of a GGML_BACKEND_DL build of llama.cpp in `lib_dir`.

    Such a build registers no backend by itself, and llama_backend_init looks
    for modules beside the executable, never beside libllama: without this call
    a model load fails with "no backends are loaded". A build with its backends
    linked in already has them registered and needs nothing. Call it before
    llama_cpp loads a model. Returns how many backends this call registered.
    """
    lib_dir = lib_dir or built_in_lib_dir()
    if lib_dir is None:
        raise RuntimeProblem("llama-cpp-python is not installed")
    ggml = _lib_files(lib_dir, "ggml")
    if not ggml:
        raise RuntimeProblem(f"no libggml in {lib_dir}")
    try:
        # The base library first, globally, so every module resolves against this copy;
        # libllama, loaded later from the same folder, then finds the same registry.
        for base in _lib_files(lib_dir, "ggml-base")[:1]:
            ctypes.CDLL(str(base), mode=ctypes.RTLD_GLOBAL)
        lib = ctypes.CDLL(str(ggml[0]), mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        raise RuntimeProblem(f"cannot load {ggml[0].name}: {_first_line(exc)}") from exc
    if not hasattr(lib, "ggml_backend_load_all_from_path"):
        return 0
    lib.ggml_backend_reg_count.restype = ctypes.c_size_t
    lib.ggml_backend_reg_count.argtypes = []
    before = int(lib.ggml_backend_reg_count())
    if before:
        return 0  # backends linked in: not a backend-DL build
    lib.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
    lib.ggml_backend_load_all_from_path.restype = None
    lib.ggml_backend_load_all_from_path(os.fsencode(lib_dir))
    loaded = int(lib.ggml_backend_reg_count())
    if not loaded:
        raise RuntimeProblem(f"no ggml backend module in {lib_dir} could be loaded")
    return loaded


_backends_ready = False


def ensure_backends() -> None:
    """Registers the backends of the llama.cpp this process uses, once (see load_backends).

    That llama.cpp is the one LLAMA_CPP_LIB_PATH names, else the one inside
    llama-cpp-python. Call before the first model load; a problem is logged,
    and the model load itself then says what is wrong.
    """
    global _backends_ready
    if _backends_ready:
        return
    env_lib = os.environ.get("LLAMA_CPP_LIB_PATH")
    try:
        load_backends(Path(env_lib) if env_lib else None)
    except RuntimeProblem as exc:
        log.warning("llama.cpp backends: %s", exc)
    _backends_ready = True


def backend_features(lib_dir: Path | None) -> dict[str, dict[str, str]]:
    """What each registered ggml backend says it was built with (ggml_backend_get_features)."""
    lib_dir = lib_dir or built_in_lib_dir()
    if lib_dir is None or not _lib_files(lib_dir, "ggml"):
        return {}
    lib = ctypes.CDLL(str(_lib_files(lib_dir, "ggml")[0]))

    class Feature(ctypes.Structure):
        _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_char_p)]

    lib.ggml_backend_reg_count.restype = ctypes.c_size_t
    lib.ggml_backend_reg_get.argtypes = [ctypes.c_size_t]
    lib.ggml_backend_reg_get.restype = ctypes.c_void_p
    lib.ggml_backend_reg_name.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_reg_name.restype = ctypes.c_char_p
    lib.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    get_features_t = ctypes.CFUNCTYPE(ctypes.POINTER(Feature), ctypes.c_void_p)
    found: dict[str, dict[str, str]] = {}
    for i in range(int(lib.ggml_backend_reg_count())):
        reg = lib.ggml_backend_reg_get(i)
        name = (lib.ggml_backend_reg_name(reg) or b"?").decode("utf-8", "replace")
        address = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_get_features")
        features: dict[str, str] = {}
        if address:
            array = get_features_t(address)(reg)
            for j in range(256):  # the array ends with a NULL name
                if not array[j].name:
                    break
                value = (array[j].value or b"").decode("utf-8", "replace")
                features[array[j].name.decode("utf-8", "replace")] = value
        found[name] = features
    return found


def fa_pairs_from_features(features: Mapping[str, Mapping[str, str]]) -> tuple[FaPair, ...] | None:
    """The K/V pairs a CUDA backend says it compiled (its FA_QUANTS feature); None: not said."""
    for values in features.values():
        quants = values.get("FA_QUANTS")
        if quants is None:
            continue
        if quants.strip().lower() == "all":
            return all_fa_pairs()
        pairs = [("f16", "f16")]  # always compiled (ggml/cmake/common.cmake)
        for item in quants.replace(";", ",").split(","):
            k, sep, v = item.strip().lower().partition("-")
            if sep and (k, v) not in pairs:
                pairs.append((k, v))
        return tuple(pairs)
    return None


# --- Self-test ----------------------------------------------------------------------------


@dataclass
class SelfTest:
    """The outcome of one runtime self-test (as cached)."""

    ok: bool
    detail: str  # why it failed, or what it decoded
    at: float = 0.0
    features: dict[str, dict[str, str]] = field(default_factory=dict)
    # False for an outcome that says nothing about the runtime (a timeout): never cached.
    conclusive: bool = True


def run_self_test(
    lib_dir: Path, gpu: bool, timeout_s: float = SELF_TEST_TIMEOUT_S, python: str | None = None
) -> SelfTest:
    """Loads the built-in model with the runtime in `lib_dir` in a child and decodes 8 tokens."""
    env = dict(os.environ)
    env["LLAMA_CPP_LIB_PATH"] = str(lib_dir)
    env["GGML_NO_BACKTRACE"] = "1"  # an abort should report its assert line
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    cmd = [*module_argv("engine.runtimes", python), "--self-test", str(lib_dir)]
    if gpu:
        cmd.append("--gpu")
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout_s,
            env=env,
            check=False,
            creationflags=NO_WINDOW,
        )
    except subprocess.TimeoutExpired:
        return SelfTest(False, f"the self-test took over {timeout_s:.0f} s", conclusive=False)
    reply: dict[str, Any] | None = None
    lines = proc.stdout.strip().splitlines()
    if lines:
        try:
            parsed = json.loads(lines[-1])
            reply = parsed if isinstance(parsed, dict) else None
        except json.JSONDecodeError:
            reply = None
    now = time.time()
    if proc.returncode == 0 and reply and reply.get("ok"):
        features = reply.get("features")
        return SelfTest(
            True,
            f"decoded {reply.get('tokens')} tokens",
            now,
            features if isinstance(features, dict) else {},
        )
    if proc.returncode < 0:
        why = crash_reason(proc.returncode, proc.stderr)
        return SelfTest(False, f"crashed in the self-test {why}", now)
    if reply and reply.get("error"):
        return SelfTest(False, f"failed the self-test: {reply['error']}", now)
    last = crash_line(proc.stderr) or "no output"
    return SelfTest(False, f"failed the self-test (exit {proc.returncode}): {last}", now)


def _self_test_child(lib_dir: Path, gpu: bool) -> dict[str, Any]:
    """Child side: the runtime's libraries, the built-in model, 8 greedy tokens."""
    load_backends(lib_dir)
    import llama_cpp

    from engine.default_model import default_model_path

    llm = llama_cpp.Llama(
        model_path=str(default_model_path()),
        n_ctx=256,
        n_batch=64,
        n_gpu_layers=-1 if gpu else 0,
        verbose=False,
    )
    prompt = llm.tokenize(b"The capital of France is")
    tokens = []
    for token in llm.generate(prompt, temp=0.0):
        tokens.append(int(token))
        if len(tokens) >= SELF_TEST_TOKENS:
            break
    return {"ok": True, "tokens": len(tokens), "features": backend_features(lib_dir)}


# --- Choosing a runtime ---------------------------------------------------------------------


def driver_version(nvml: Callable[[], Any] | None = None, sysfs_root: Path = Path("/sys")) -> str:
    """The GPU driver a self-test result holds for: NVML's, else sysfs's, else "none"."""
    try:
        module = nvml() if nvml is not None else __import__("pynvml")
        module.nvmlInit()
        try:
            version = module.nvmlSystemGetDriverVersion()
        finally:
            module.nvmlShutdown()
        if isinstance(version, bytes):
            version = version.decode("ascii", "replace")
        return f"nvidia {version}"
    except Exception:
        log.debug("no NVML driver version", exc_info=True)
    for module_name in ("nvidia", "amdgpu", "i915", "xe"):
        path = sysfs_root / "module" / module_name / "version"
        try:
            text = path.read_text(errors="replace").strip()[:64]
        except OSError:
            continue
        if text:
            return f"{module_name} {text}"
    return "none"


@dataclass(frozen=True)
class Selection:
    """The runtime an engine uses, and why it is not the one asked for (if so)."""

    name: str  # BUILT_IN for the llama.cpp that ships with Peregrine
    backend: str
    lib_dir: Path | None  # None: the built-in llama.cpp
    requested: str | None = None
    fallback_reason: str | None = None


SelfTestFn = Callable[[Path, bool], SelfTest]


class RuntimeSelector:
    """Chooses the runtime to load: the one asked for if it passes its self-test, else a fallback."""

    def __init__(
        self,
        paths: Paths,
        self_test: SelfTestFn = run_self_test,
        driver: Callable[[], str] = driver_version,
    ) -> None:
        self.paths = paths
        self._self_test = self_test
        self._driver = driver
        self._driver_text: str | None = None

    @property
    def cache_file(self) -> Path:
        return self.paths.cache / "runtime-self-tests.json"

    def choose(self, name: str | None) -> Selection:
        """The runtime to use for `name` (None: the built-in llama.cpp); never raises."""
        if not name or name == BUILT_IN:
            return Selection(BUILT_IN, "cpu", None)
        try:
            return self.check(name)
        except RuntimeProblem as exc:
            reason = f"runtime {name!r} {exc}"
        log.warning("%s; falling back", reason)
        for fallback in self._cpu_runtimes(exclude=name):
            try:
                chosen = self.check(fallback)
            except RuntimeProblem as exc:
                reason += f"; the cpu runtime {fallback!r} {exc} too"
                continue
            return Selection(
                chosen.name,
                chosen.backend,
                chosen.lib_dir,
                requested=name,
                fallback_reason=f"{reason}; using the cpu runtime {fallback!r}",
            )
        return Selection(
            BUILT_IN,
            "cpu",
            None,
            requested=name,
            fallback_reason=f"{reason}; using Peregrine's built-in llama.cpp",
        )

    def problem(self, name: str) -> str | None:
        """Why runtime `name` cannot be used (its self-test runs if not cached); None: it can."""
        try:
            self.check(name)
        except RuntimeProblem as exc:
            return str(exc)
        return None

    def check(self, name: str) -> Selection:
        """`name` if installed, well-formed and passing its self-test; RuntimeProblem if not."""
        if not _NAME.match(name):
            raise RuntimeProblem("is not a runtime name (letters, digits, '.', '_' and '-')")
        folder = self.paths.runtimes / name
        if not folder.is_dir():
            raise RuntimeProblem(f"is not installed ({folder} does not exist)")
        try:
            manifest, digest = read_manifest(folder)
        except ManifestError as exc:
            raise ManifestError(f"is unusable: {exc}") from exc
        lib_dir = folder / "lib"
        if not lib_dir.is_dir():
            raise RuntimeProblem(f"has no lib/ folder ({lib_dir})")
        key = self._key(name, digest, lib_dir)
        result = self._cached(key)
        if result is None:
            log.info("self-testing engine runtime %s (%s)", name, manifest.backend)
            result = self._self_test(lib_dir, manifest.backend != "cpu")
            if result.conclusive:
                self._store(key, result)
        if not result.ok:
            raise RuntimeProblem(result.detail)
        reported = fa_pairs_from_features(result.features)
        if reported is not None and set(reported) != set(manifest.fa_type_pairs):
            log.warning(
                "runtime %s: runtime.json lists flash-attention pairs %s, the backend reports %s",
                name,
                manifest.fa_type_pairs,
                reported,
            )
        return Selection(name, manifest.backend, lib_dir)

    def cached_result(self, name: str) -> SelfTest | None:
        """The cached self-test of installed runtime `name`; None: not tested (or unreadable)."""
        folder = self.paths.runtimes / name
        try:
            _, digest = read_manifest(folder)
        except ManifestError:
            return None
        lib_dir = folder / "lib"
        return self._cached(self._key(name, digest, lib_dir)) if lib_dir.is_dir() else None

    def _key(self, name: str, digest: str, lib_dir: Path) -> str:
        return f"{name}|{digest}|{_fingerprint(lib_dir)}|{self._driver_version()}"

    def _driver_version(self) -> str:
        if self._driver_text is None:
            self._driver_text = self._driver()
        return self._driver_text

    def _cpu_runtimes(self, exclude: str) -> list[str]:
        """Installed runtimes whose manifest says cpu: the one named "cpu" first."""
        folder = self.paths.runtimes
        if not folder.is_dir():
            return []
        names = []
        for sub in sorted(folder.iterdir(), key=lambda p: (p.name != "cpu", p.name)):
            if sub.name == exclude or not _NAME.match(sub.name):
                continue
            try:
                manifest, _ = read_manifest(sub)
            except RuntimeProblem:
                continue
            if manifest.backend == "cpu":
                names.append(sub.name)
        return names

    def _load_cache(self) -> dict[str, Any]:
        try:
            with self.cache_file.open("rb") as f:
                data = json.loads(f.read(MAX_MANIFEST_BYTES).decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            return {}
        return data if isinstance(data, dict) else {}

    def _cached(self, key: str) -> SelfTest | None:
        entry = self._load_cache().get(key)
        if not isinstance(entry, dict):
            return None
        try:
            return SelfTest(
                ok=bool(entry["ok"]),
                detail=str(entry["detail"]),
                at=float(entry.get("at", 0.0)),
                features=dict(entry.get("features") or {}),
            )
        except (KeyError, TypeError, ValueError):
            return None

    def _store(self, key: str, result: SelfTest) -> None:
        data = self._load_cache()
        data[key] = asdict(result)
        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
            tmp.replace(self.cache_file)
        except OSError:
            log.warning("cannot save the runtime self-test result", exc_info=True)


def _fingerprint(lib_dir: Path) -> str:
    """Names, sizes and times of lib/'s files: a rebuilt runtime is tested again."""
    digest = hashlib.sha256()
    for path in sorted(lib_dir.iterdir()):
        try:
            st = path.lstat()
        except OSError:
            continue
        digest.update(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return digest.hexdigest()[:16]


def activate(selection: Selection) -> None:
    """Points llama-cpp-python at the chosen runtime; call before it is imported."""
    global _backends_ready
    if selection.lib_dir is not None:
        os.environ["LLAMA_CPP_LIB_PATH"] = str(selection.lib_dir)
        load_backends(selection.lib_dir)  # a runtime's problem is the caller's to report
        _backends_ready = True
        return
    # The built-in llama.cpp has no fallback: its own load reports what is wrong.
    ensure_backends()


def main(argv: list[str] | None = None) -> int:
    """Child entry point: `--self-test LIB_DIR [--gpu]` prints one JSON line."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m engine.runtimes")
    parser.add_argument("--self-test", type=Path, required=True, metavar="LIB_DIR")
    parser.add_argument("--gpu", action="store_true")
    args = parser.parse_args(argv)
    # llama.cpp's own log lines would otherwise be mixed into the one JSON line.
    out = sys.stdout
    sys.stdout = sys.stderr
    try:
        reply = _self_test_child(args.self_test, args.gpu)
    except Exception as exc:  # the parent reads the reason, not a traceback
        out.write(json.dumps({"error": f"{type(exc).__name__}: {_first_line(exc)}"}) + "\n")
        out.flush()
        return 1
    out.write(json.dumps(reply) + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
