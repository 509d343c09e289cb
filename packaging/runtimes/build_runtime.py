#!/usr/bin/env python3
"""Build an engine runtime: llama.cpp for one kind of hardware, as a runtime pack.

The sources are the pinned llama-cpp-python sdist's llama.cpp plus our patches
(packaging/llama/patches), built with CMake as a backend-DL build: libllama,
libggml, libggml-base and one loadable module per backend (and per CPU
variant). The result is a runtime folder (docs/api.md, "Engine runtimes"):

    build/runtimes/<name>/runtime.json
    build/runtimes/<name>/lib/*.so

and a pack to hand to users, `dist/runtimes/peregrine-runtime-<name>-<platform>.tar.gz`
with its `.sha256` (docs/install.md, "Engine runtimes").

Usage (run with the project's .venv Python, from the repository root):

    python packaging/runtimes/build_runtime.py cpu
    python packaging/runtimes/build_runtime.py vulkan
    python packaging/runtimes/build_runtime.py cuda [--cuda-archs "90"] [--fa-quants all]
        [--cublas DIR]

Options: --name NAME (default: the backend), --jobs N, --build-dir DIR,
--sdist FILE, --cublas DIR (a cuBLAS outside the CUDA toolkit), --cmake-arg ARG
(repeatable; e.g. -DGGML_CUDA_NO_VMM=ON where the toolkit has no libcuda stub),
--install (also copy the runtime into PEREGRINE_HOME/runtimes/),
--self-test (load the built-in model with it and decode 8 tokens), --dry-run
(print the CMake arguments and the manifest, build nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "packaging" / "llama"))

import build_wheel  # noqa: E402  (packaging/llama/build_wheel.py: sdist, patches)

from engine.runtimes import (  # noqa: E402
    KV_TYPES,
    MANIFEST,
    Manifest,
    Patch,
    fa_pairs_from_features,
    parse_manifest,
    read_manifest,
)

# The llama.cpp commit that llama-cpp-python 0.3.36 vendors.
LLAMA_CPP_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
# The usual architectures: Turing to Blackwell (nvcc 13 dropped those before Turing).
# 75-virtual gives PTX that later GPUs JIT-compile; the others get real code.
CUDA_ARCHS = "75-virtual;80-real;86-real;89-real;90-real;120-real"
# Every pair of CUDA's kernel types (GGML_CUDA_FA_QUANTS=all) adds much build time and size;
# the default builds llama.cpp's four symmetric pairs plus those users ask for most.
CUDA_FA_QUANTS = "q8_0-q8_0,q4_0-q4_0,q8_0-f16,f16-q8_0,q8_0-q4_0,q4_0-q8_0,bf16-bf16"
# The CUDA runtime libraries the CUDA module needs at run time, carried in lib/.
CUDA_LIBS = re.compile(r"^lib(cudart|cublas|cublasLt)\.so")

COMMON_CMAKE = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DGGML_BACKEND_DL=ON",
    "-DGGML_NATIVE=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    f"-DLLAMA_BUILD_COMMIT={LLAMA_CPP_COMMIT[:9]}",
    "-DLLAMA_BUILD_NUMBER=0",
    # libllama finds libggml beside itself, and the modules find the CUDA libraries.
    "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON",
    "-DCMAKE_BUILD_RPATH=$ORIGIN",
    "-DCMAKE_INSTALL_RPATH=$ORIGIN",
]


class RecipeError(Exception):
    """A step failed; the message says which and why."""


def log(message: str) -> None:
    print(f"build_runtime: {message}", file=sys.stderr, flush=True)


def cmake_args(backend: str, cuda_archs: str, fa_quants: str) -> list[str]:
    """The CMake arguments of one backend's build."""
    # Every runtime carries the CPU variants: a GPU runtime runs the layers left on the CPU.
    args = [*COMMON_CMAKE, "-DGGML_CPU_ALL_VARIANTS=ON"]
    if backend == "vulkan":
        args.append("-DGGML_VULKAN=ON")
    elif backend == "cuda":
        args += [
            "-DGGML_CUDA=ON",
            f"-DCMAKE_CUDA_ARCHITECTURES={cuda_archs}",
            f"-DGGML_CUDA_FA_QUANTS={fa_quants}",
            "-DGGML_CUDA_NCCL=OFF",
        ]
    elif backend != "cpu":
        raise RecipeError(f"no recipe for the {backend!r} backend (cpu, vulkan, cuda)")
    return args


def fa_type_pairs(backend: str, fa_quants: str) -> list[tuple[str, str]]:
    """The flash-attention K/V pairs a build of `backend` has kernels for."""
    if backend == "cuda":
        # What the CUDA backend reports as its FA_QUANTS feature, read the same way.
        return list(fa_pairs_from_features({"CUDA": {"FA_QUANTS": fa_quants}}) or ())
    if backend == "vulkan":
        # ggml-vulkan's supports_op: any KV type, except bf16 paired with another type.
        return [(k, v) for k in KV_TYPES for v in KV_TYPES if (k == "bf16") == (v == "bf16")]
    return [(k, v) for k in KV_TYPES for v in KV_TYPES]  # the CPU's kernel takes any pair


def cublas_args(folder: Path | None) -> list[str]:
    """CMake arguments for a cuBLAS kept outside the CUDA toolkit.

    A toolkit installed without cuBLAS (NVIDIA's packages split it off) can use
    the one in PyPI's nvidia-cublas wheel: `folder` is its unpacked
    `nvidia/cu13` (include/ and lib/).
    """
    if folder is None:
        return []
    libs = {}
    for stem in ("cublas", "cublasLt"):
        found = sorted((folder / "lib").glob(f"lib{stem}.so*"))
        if not found:
            raise RecipeError(f"--cublas: no lib{stem}.so in {folder / 'lib'}")
        libs[stem] = found[0]
    if not (folder / "include" / "cublas_v2.h").is_file():
        raise RecipeError(f"--cublas: no cublas_v2.h in {folder / 'include'}")
    return [
        f"-DCUDA_cublas_LIBRARY={libs['cublas']}",
        f"-DCUDA_cublasLt_LIBRARY={libs['cublasLt']}",
        f"-DCMAKE_CUDA_FLAGS=-I{folder / 'include'}",
    ]


def check_tools(backend: str) -> None:
    missing = [t for t in ("cmake", "cc", "c++") if shutil.which(t) is None]
    if backend == "vulkan" and shutil.which("glslc") is None:
        missing.append("glslc (Debian: apt-get install glslc libvulkan-dev)")
    if backend == "cuda" and shutil.which("nvcc") is None:
        missing.append("nvcc (the CUDA toolkit; add its bin/ to PATH)")
    if missing:
        raise RecipeError("missing build tools: " + ", ".join(missing))


def run(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    log("$ " + " ".join(cmd))
    result = subprocess.run(cmd, cwd=cwd, env=env, check=False)
    if result.returncode != 0:
        raise RecipeError(f"{' '.join(cmd[:3])} exited {result.returncode}")


def build(args: argparse.Namespace) -> Path:
    """Builds the runtime folder; returns it."""
    backend, name = args.backend, args.name or args.backend
    cmake = cmake_args(backend, args.cuda_archs, args.fa_quants)
    # Our llama.cpp patches, then those of this backend's runtime only.
    patch_files = build_wheel.patches() + build_wheel.patches(HERE / "patches" / backend)
    manifest = Manifest(
        backend=backend,
        llama_cpp_commit=LLAMA_CPP_COMMIT,
        patches=tuple(Patch(p.name, build_wheel.sha256_file(p)) for p in patch_files),
        cpu_variants=(),  # filled in from the modules the build wrote
        fa_type_pairs=tuple(fa_type_pairs(backend, args.fa_quants)),
    )
    if args.dry_run:
        print(" ".join(cmake))
        print(json.dumps(manifest.to_json(), indent=1))
        return Path()
    check_tools(backend)
    work = (args.build_dir or ROOT / "build" / "runtimes-src").resolve() / name
    out = (ROOT / "build" / "runtimes" / name).resolve()
    cache = build_wheel.default_cache_dir()
    sdist = build_wheel.obtain_sdist(cache, sys.executable, args.sdist)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(work, filter="data")
        else:  # a Python without the backported filter; the sdist's sha256 was checked
            tar.extractall(work)
    tree = work / f"llama_cpp_python-{build_wheel.VERSION}"
    build_wheel.apply_patches(tree, patch_files)
    source = tree / "vendor" / "llama.cpp"
    build_dir = work / "build"
    if backend == "cuda":
        cmake += cublas_args(args.cublas)
    cmake += args.cmake_arg  # last, so they override the recipe's
    # ggml uses ccache when it is installed. Paths relative to the runtimes' common
    # parent let every runtime reuse the others' objects: in a backend-DL build the
    # CPU variants and libllama do not depend on the GPU backend, so after the cpu
    # runtime a vulkan or cuda build compiles little more than its own module.
    env = {**os.environ, "CCACHE_BASEDIR": str(work.parent)}
    run(["cmake", "-S", str(source), "-B", str(build_dir), *cmake], env=env)
    run(["cmake", "--build", str(build_dir), "--target", "llama", "-j", str(args.jobs)], env=env)
    bin_dir = build_dir / "bin"
    staged = out.with_name(out.name + ".tmp")
    if staged.exists():
        shutil.rmtree(staged)
    (staged / "lib").mkdir(parents=True)
    # llama-cpp-python's CMake install copies fixed target names only: take every
    # library and module (ggml-cpu-<variant> included) from the build tree.
    for lib in sorted(bin_dir.glob("*.so*")):
        shutil.copy2(lib, staged / "lib" / lib.name, follow_symlinks=False)
    variants = tuple(
        sorted(
            m.name.removeprefix("libggml-cpu-").removesuffix(".so")
            for m in (staged / "lib").glob("libggml-cpu-*.so")
        )
    )
    if not variants:
        raise RecipeError(f"the build wrote no ggml-cpu-<variant> module to {bin_dir}")
    if backend == "cuda":
        copy_cuda_libs(staged / "lib", args.cublas / "lib" if args.cublas else None)
    # What the build was configured with, read back from it rather than from our arguments.
    built_quants = cmake_cache(build_dir).get("GGML_CUDA_FA_QUANTS", args.fa_quants)
    manifest = dataclasses.replace(
        manifest,
        cpu_variants=variants,
        fa_type_pairs=tuple(fa_type_pairs(backend, built_quants)),
    )
    parse_manifest(manifest.to_json())  # what the engine will read back
    (staged / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    staged.rename(out)
    log(f"runtime {name}: {out} ({len(variants)} CPU variants)")
    return out


def cmake_cache(build_dir: Path) -> dict[str, str]:
    """The NAME:TYPE=VALUE entries of a configured build's CMakeCache.txt."""
    entries = {}
    for line in (build_dir / "CMakeCache.txt").read_text(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith(("#", "//")):
            entries[key.split(":", 1)[0]] = value
    return entries


def copy_cuda_libs(lib_dir: Path, cublas_lib: Path | None = None) -> None:
    """The CUDA runtime and cuBLAS libraries the CUDA module links, beside it."""
    module = lib_dir / "libggml-cuda.so"
    if not module.is_file():
        raise RecipeError("the build wrote no libggml-cuda.so")
    env = dict(os.environ)
    if cublas_lib is not None:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(cublas_lib), env.get("LD_LIBRARY_PATH")) if p
        )
    ldd = ["ldd", str(module)]
    text = subprocess.run(ldd, capture_output=True, text=True, env=env, check=False).stdout
    for line in text.splitlines():
        soname, _, rest = line.strip().partition(" => ")
        path = rest.split(" (")[0].strip()
        if CUDA_LIBS.match(soname) and path and Path(path).is_file():
            shutil.copy2(Path(path).resolve(), lib_dir / soname)
            log(f"carrying {soname}")


def pack(folder: Path, name: str) -> Path:
    """dist/runtimes/peregrine-runtime-<name>-<platform>.tar.gz and its .sha256 file."""
    dist = ROOT / "dist" / "runtimes"
    dist.mkdir(parents=True, exist_ok=True)
    arch = f"{sys.platform}-{platform.machine().lower()}"
    archive = dist / f"peregrine-runtime-{name}-{arch}.tar.gz"
    with (
        tempfile.NamedTemporaryFile(dir=dist, suffix=".tmp", delete=False) as tmp,
        tarfile.open(fileobj=tmp, mode="w:gz") as tar,
    ):
        tar.add(folder, arcname=name)
    os.chmod(tmp.name, 0o644)  # a temporary file is private; a pack is for publishing
    os.replace(tmp.name, archive)
    digest = build_wheel.sha256_file(archive)
    archive.with_name(archive.name + ".sha256").write_text(f"{digest}  {archive.name}\n")
    log(f"pack {archive} sha256 {digest}")
    write_index(archive, folder, name, digest)
    return archive


def write_index(archive: Path, folder: Path, name: str, digest: str) -> None:
    """Adds the pack to dist/runtimes/runtime-index.json, the index the app downloads from."""
    from engine.runtime_packs import INDEX_FILE, Pack, requirements_of, write_index_entry

    manifest = parse_manifest(json.loads((folder / MANIFEST).read_text()))
    entry = Pack(
        name=name,
        backend=manifest.backend,
        platform=f"{sys.platform}-{platform.machine().lower()}",
        url=archive.name,  # beside the index: resolved against the index's address
        size=archive.stat().st_size,
        sha256=digest,
        llama_cpp_commit=manifest.llama_cpp_commit,
        requires=requirements_of(manifest.backend),
    )
    write_index_entry(archive.parent / INDEX_FILE, entry)
    log(f"index {archive.parent / INDEX_FILE}: {name}")


def install(folder: Path, name: str) -> Path:
    from engine.paths import Paths

    target = Paths.from_env().runtimes / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(folder, target, symlinks=True)
    log(f"installed into {target}")
    return target


def self_test(folder: Path, backend: str) -> None:
    from engine.runtimes import run_self_test

    result = run_self_test(folder / "lib", gpu=backend != "cpu")
    if not result.ok:
        raise RecipeError(f"the self-test failed: {result.detail}")
    manifest, _ = read_manifest(folder)
    reported = fa_pairs_from_features(result.features)
    if reported is not None and set(reported) != set(manifest.fa_type_pairs):
        raise RecipeError(
            f"the backend reports flash-attention pairs {reported}, {MANIFEST} lists "
            f"{manifest.fa_type_pairs}"
        )
    log(f"self-test: {result.detail}; backends {sorted(result.features)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("backend", choices=["cpu", "vulkan", "cuda"])
    parser.add_argument("--name")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--build-dir", type=Path)
    parser.add_argument("--sdist", type=Path)
    parser.add_argument("--cuda-archs", default=CUDA_ARCHS)
    parser.add_argument("--fa-quants", default=CUDA_FA_QUANTS, help='"all" or K-V,K-V...')
    parser.add_argument("--cublas", type=Path, help="cuBLAS include/ and lib/ (cuda)")
    parser.add_argument(
        "--cmake-arg", action="append", default=[], metavar="ARG", help="an extra CMake argument"
    )
    parser.add_argument("--install", action="store_true")
    parser.add_argument("--self-test", action="store_true")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    try:
        folder = build(args)
        if args.dry_run:
            return 0
        pack(folder, args.name or args.backend)
        if args.self_test:
            self_test(folder, args.backend)
        if args.install:
            install(folder, args.name or args.backend)
    except (RecipeError, build_wheel.BuildError, OSError, tarfile.TarError) as exc:
        log(f"failed: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
