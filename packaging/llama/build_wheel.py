#!/usr/bin/env python3
"""Build Peregrine's llama-cpp-python wheel: the pinned sdist plus our patches.

The wheel is cached in a folder named by the sha256 of the sdist, the patches
(names and bytes, in the order they are applied) and the CMake arguments, so a
second set-up reuses it and any change to those inputs builds a new one. pip's
own wheel cache cannot do this: it keys on the URL and interpreter only and
never caches a build from a local folder.

Usage (stdlib only, any Python >= 3.9):

    CMAKE_ARGS="-DGGML_NATIVE=ON" python3 packaging/llama/build_wheel.py

Options: --cmake-args=ARGS (default: $CMAKE_ARGS, else empty, which is
llama.cpp's native build), --cache-dir DIR (default: $PEREGRINE_WHEEL_CACHE,
else <user cache>/peregrine/wheels), --sdist FILE (a local copy, checked
against the pinned sha256), --python PY (the interpreter whose pip builds the
wheel), --patches-dir DIR (default: packaging/llama/patches; an empty folder
builds upstream), --print-key. GGML_NATIVE=ON with GGML_BACKEND_DL=ON is
built, on x86, with this CPU's features named one by one (see native_flags).
The wheel's absolute path is the last line on stdout;
build output goes to stderr. Exit status 0 on success, 1 on any failure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
PATCH_DIR = Path(__file__).resolve().parent / "patches"
# ggml's x86 CPU feature options and the /proc/cpuinfo flags each one needs.
X86_FEATURES = (
    ("GGML_SSE42", ("sse4_2",)),
    ("GGML_AVX", ("avx",)),
    ("GGML_AVX2", ("avx2",)),
    ("GGML_BMI2", ("bmi2",)),
    ("GGML_FMA", ("fma",)),
    ("GGML_F16C", ("f16c",)),
    ("GGML_AVX_VNNI", ("avx_vnni",)),
    ("GGML_AVX512", ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")),
    ("GGML_AVX512_VBMI", ("avx512vbmi",)),
    ("GGML_AVX512_VNNI", ("avx512_vnni",)),
    ("GGML_AVX512_BF16", ("avx512_bf16",)),
    ("GGML_AMX_TILE", ("amx_tile",)),
    ("GGML_AMX_INT8", ("amx_int8",)),
    ("GGML_AMX_BF16", ("amx_bf16",)),
)
# Bump when the way a wheel is built changes without its inputs changing.
RECIPE = "1"


class BuildError(Exception):
    """A step failed; the message says which and why."""


def log(message: str) -> None:
    print(f"build_wheel: {message}", file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    override = os.environ.get("PEREGRINE_WHEEL_CACHE")
    if override:
        return Path(override).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "peregrine" / "wheels"


def patches(folder: Path = PATCH_DIR) -> list[Path]:
    return sorted(folder.glob("*.patch"))


def native_flags(cmake_args: str, cpuinfo: str | None = None, machine: str | None = None) -> str:
    """CMake arguments for a native backend-DL build on x86: the CPU's features, named.

    ggml refuses GGML_NATIVE with GGML_BACKEND_DL on x86 (a CPU module says
    which features it needs, and -march=native names none), so GGML_NATIVE=ON
    becomes GGML_NATIVE=OFF plus each feature option that this CPU's
    /proc/cpuinfo flags allow. Other arguments, and other machines, pass through.
    """
    words = cmake_args.split()
    if "-DGGML_NATIVE=ON" not in words or "-DGGML_BACKEND_DL=ON" not in words:
        return cmake_args
    if (machine or platform.machine()).lower() not in ("x86_64", "amd64"):
        return cmake_args
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return cmake_args
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            flags = set(value.split())
            break
    if not flags:
        return cmake_args
    features = [
        f"-D{option}={'ON' if all(f in flags for f in needs) else 'OFF'}"
        for option, needs in X86_FEATURES
    ]
    words[words.index("-DGGML_NATIVE=ON")] = "-DGGML_NATIVE=OFF"
    return " ".join(words + features)


def cache_key(cmake_args: str, patch_files: list[Path]) -> str:
    """sha256 over everything that decides the wheel's bytes."""
    digest = hashlib.sha256()
    parts = [
        f"recipe={RECIPE}",
        f"sdist={SDIST_SHA256}",
        f"cmake_args={' '.join(cmake_args.split())}",
        f"platform={sys.platform}-{platform.machine().lower()}",
    ]
    for part in parts:
        digest.update(part.encode() + b"\0")
    for patch in patch_files:
        digest.update(f"patch={patch.name}".encode() + b"\0")
        digest.update(patch.read_bytes() + b"\0")
    return digest.hexdigest()


def run(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    log("$ " + " ".join(cmd))
    # Build output goes to stderr so stdout carries only the wheel's path.
    result = subprocess.run(cmd, cwd=cwd, env=env, stdout=sys.stderr, check=False)
    if result.returncode != 0:
        raise BuildError(f"{cmd[0]} {cmd[1] if len(cmd) > 1 else ''} exited {result.returncode}")


def obtain_sdist(cache: Path, python: str, given: Path | None) -> Path:
    """The pinned sdist, downloaded once into the cache and checked every time."""
    if given is not None:
        if not given.is_file():
            raise BuildError(f"no sdist at {given}")
        source = given
    else:
        source = cache / "sdist" / SDIST_NAME
        if not source.is_file():
            source.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=source.parent) as tmp:
                # Only llama-cpp-python as source: with `--no-binary :all:` pip also
                # builds its build tools (scikit-build-core and theirs) from source to
                # read the sdist's metadata, minutes on a machine with no pip cache.
                pip = [python, "-m", "pip", "download", "--no-deps", "--no-cache-dir"]
                run(
                    [
                        *pip,
                        "--no-binary",
                        "llama-cpp-python",
                        "-d",
                        tmp,
                        f"llama-cpp-python=={VERSION}",
                    ]
                )
                fetched = Path(tmp) / SDIST_NAME
                if not fetched.is_file():
                    raise BuildError(f"pip download did not produce {SDIST_NAME}")
                check_sdist(fetched)
                os.replace(fetched, source)
    check_sdist(source)
    return source


def check_sdist(path: Path) -> None:
    actual = sha256_file(path)
    if actual != SDIST_SHA256:
        raise BuildError(f"{path} has sha256 {actual}, expected {SDIST_SHA256}")


def apply_patches(tree: Path, patch_files: list[Path]) -> None:
    for patch in patch_files:
        log(f"applying {patch.name}")
        if shutil.which("patch"):
            cmd = ["patch", "-p1", "--batch", "--forward", "--quiet", "-i", str(patch)]
        elif shutil.which("git"):
            cmd = ["git", "apply", "-p1", "--whitespace=nowarn", str(patch)]
        else:
            raise BuildError("applying patches needs `patch` or `git` on PATH")
        run(cmd, cwd=tree)


def build(
    cmake_args: str, cache: Path, python: str, sdist: Path | None, patch_files: list[Path]
) -> Path:
    key = cache_key(cmake_args, patch_files)
    target = cache / key
    existing = sorted(target.glob("*.whl")) if target.is_dir() else []
    if existing:
        log(f"cached wheel {existing[0]}")
        return existing[0]

    source = obtain_sdist(cache, python, sdist)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-", dir=cache) as tmp_name:
        tmp = Path(tmp_name)
        with tarfile.open(source) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, filter="data")
            else:  # Python < 3.12 without the backported filter
                tar.extractall(tmp)  # the archive's sha256 was checked
        tree = tmp / f"llama_cpp_python-{VERSION}"
        apply_patches(tree, patch_files)

        env = dict(os.environ)
        env["CMAKE_ARGS"] = cmake_args
        out = tmp / "out"
        log(f"building with CMAKE_ARGS={cmake_args!r} (several minutes)")
        run(
            [
                python,
                "-m",
                "pip",
                "wheel",
                "--no-cache-dir",
                "--no-deps",
                "-w",
                str(out),
                str(tree),
            ],
            env=env,
        )
        wheels = sorted(out.glob("*.whl"))
        if len(wheels) != 1:
            raise BuildError(f"expected one wheel, pip wrote {[w.name for w in wheels]}")
        staged = tmp / "staged"
        staged.mkdir()
        os.replace(wheels[0], staged / wheels[0].name)
        info = {
            "sdist_sha256": SDIST_SHA256,
            "patches": {p.name: sha256_file(p) for p in patch_files},
            "cmake_args": cmake_args,
            "recipe": RECIPE,
        }
        (staged / "build-info.json").write_text(json.dumps(info, indent=2) + "\n")
        try:
            os.replace(staged, target)  # atomic: a wheel folder is whole or absent
        except OSError:
            if not sorted(target.glob("*.whl")):  # not a concurrent build's result
                raise
    return sorted(target.glob("*.whl"))[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cmake-args", default=os.environ.get("CMAKE_ARGS", ""))
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--sdist", type=Path, default=None)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument(
        "--patches-dir",
        type=Path,
        default=PATCH_DIR,
        help="the *.patch files to apply (an empty folder builds upstream, e.g. for benchmarks)",
    )
    parser.add_argument("--print-key", action="store_true", help="print the cache key and exit")
    args = parser.parse_args(argv)
    args.cmake_args = native_flags(args.cmake_args)
    cache = (args.cache_dir or default_cache_dir()).expanduser().resolve()
    if args.print_key:
        print(cache_key(args.cmake_args, patches(args.patches_dir)))
        return 0
    try:
        wheel = build(args.cmake_args, cache, args.python, args.sdist, patches(args.patches_dir))
    except (BuildError, OSError, tarfile.TarError) as e:
        log(f"failed: {e}")
        return 1
    print(wheel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
