"""The runtime recipes (packaging/runtimes/): their CMake arguments and the manifests they write.

The builds themselves take 30 minutes and more (`make runtime-cpu|vulkan|cuda`):
here each recipe runs with --dry-run, which prints what it would build with.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from engine.runtimes import parse_manifest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "packaging" / "runtimes" / "build_runtime.py"


def dry_run(*args: str) -> tuple[list[str], dict[str, object]]:
    out = subprocess.run(
        [sys.executable, str(RECIPE), *args, "--dry-run"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    first, _, rest = out.partition("\n")
    return first.split(" "), json.loads(rest)


@pytest.mark.parametrize("backend", ["cpu", "vulkan", "cuda"])
def test_every_recipe_is_a_redistributable_backend_dl_build_with_our_patches(
    backend: str,
) -> None:
    cmake, manifest = dry_run(backend)
    for flag in ("-DGGML_NATIVE=OFF", "-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON"):
        assert flag in cmake
    parsed = parse_manifest(manifest)
    assert parsed.backend == backend
    assert parsed.llama_cpp_commit == "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
    # Our llama.cpp patches, then the backend's own (packaging/runtimes/patches/<backend>/).
    patches = sorted((ROOT / "packaging" / "llama" / "patches").glob("*.patch"))
    patches += sorted((ROOT / "packaging" / "runtimes" / "patches" / backend).glob("*.patch"))
    assert [(p.name, p.sha256) for p in parsed.patches] == [
        (p.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in patches
    ]


def test_the_cuda_recipe_records_the_flash_attention_pairs_it_compiles() -> None:
    cmake, manifest = dry_run("cuda", "--fa-quants", "q8_0-q8_0,q8_0-q4_0", "--cuda-archs", "90")
    assert "-DGGML_CUDA=ON" in cmake and "-DCMAKE_CUDA_ARCHITECTURES=90" in cmake
    assert "-DGGML_CUDA_FA_QUANTS=q8_0-q8_0,q8_0-q4_0" in cmake
    assert manifest["fa_type_pairs"] == [["f16", "f16"], ["q8_0", "q8_0"], ["q8_0", "q4_0"]]
    _, every = dry_run("cuda", "--fa-quants", "all")
    assert len(parse_manifest(every).fa_type_pairs) == 49


def test_the_vulkan_recipe_leaves_out_mixed_bf16_pairs() -> None:
    cmake, manifest = dry_run("vulkan")
    assert "-DGGML_VULKAN=ON" in cmake
    # Its own patch lets Debian 12's Vulkan headers build it; the cpu runtime has none.
    names = [p.name for p in parse_manifest(manifest).patches]
    assert names[-1] == "vulkan-0001-headers-without-layer-settings.patch"
    assert names[-1] not in [p.name for p in parse_manifest(dry_run("cpu")[1]).patches]
    pairs = parse_manifest(manifest).fa_type_pairs
    assert ("q8_0", "f16") in pairs and ("bf16", "bf16") in pairs
    assert ("bf16", "f16") not in pairs


def load_recipe() -> Any:
    spec = importlib.util.spec_from_file_location("build_runtime", RECIPE)
    assert spec is not None and spec.loader is not None
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    return recipe


def test_the_recipe_reads_the_flash_attention_pairs_back_from_the_build(tmp_path: Path) -> None:
    recipe = load_recipe()
    (tmp_path / "CMakeCache.txt").write_text(
        "# This is the CMakeCache file.\n"
        "//Which K/V pairs get flash-attention kernels = yes\n"
        "GGML_CUDA_FA_QUANTS:STRING=q8_0-q4_0;q4_0-q4_0\n"
        "CMAKE_BUILD_TYPE:STRING=Release\n"
    )
    built = recipe.cmake_cache(tmp_path)
    assert built == {"GGML_CUDA_FA_QUANTS": "q8_0-q4_0;q4_0-q4_0", "CMAKE_BUILD_TYPE": "Release"}
    pairs = recipe.fa_type_pairs("cuda", built["GGML_CUDA_FA_QUANTS"])
    assert pairs == [("f16", "f16"), ("q8_0", "q4_0"), ("q4_0", "q4_0")]


def test_a_cublas_outside_the_toolkit_is_named_to_cmake(tmp_path: Path) -> None:
    recipe = load_recipe()
    (tmp_path / "lib").mkdir()
    (tmp_path / "include").mkdir()
    (tmp_path / "lib" / "libcublas.so.13").touch()
    with pytest.raises(recipe.RecipeError, match=r"no libcublasLt\.so in"):
        recipe.cublas_args(tmp_path)
    (tmp_path / "lib" / "libcublasLt.so.13").touch()
    with pytest.raises(recipe.RecipeError, match=r"no cublas_v2\.h in"):
        recipe.cublas_args(tmp_path)
    (tmp_path / "include" / "cublas_v2.h").touch()
    assert recipe.cublas_args(tmp_path) == [
        f"-DCUDA_cublas_LIBRARY={tmp_path / 'lib' / 'libcublas.so.13'}",
        f"-DCUDA_cublasLt_LIBRARY={tmp_path / 'lib' / 'libcublasLt.so.13'}",
        f"-DCMAKE_CUDA_FLAGS=-I{tmp_path / 'include'}",
    ]
    assert recipe.cublas_args(None) == []
