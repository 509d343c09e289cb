"""packaging/llama/build_wheel.py: the CMake arguments of the development build."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
DL_NATIVE = "-DGGML_NATIVE=ON -DGGML_BACKEND_DL=ON -DLLAVA_BUILD=OFF"
# A Zen 4 CPU's flags line, shortened: AVX-512 with VBMI, VNNI and BF16, no AVX-VNNI or AMX.
ZEN4 = (
    "processor\t: 0\nvendor_id\t: AuthenticAMD\n"
    "flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 bmi1 bmi2 avx512f avx512dq"
    " avx512cd avx512bw avx512vl avx512vbmi avx512_vnni avx512_bf16\n"
)
HASWELL = "flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 bmi1 bmi2\n"


@pytest.fixture(scope="module")
def build_wheel() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "build_wheel", ROOT / "packaging" / "llama" / "build_wheel.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_wheel"] = module
    spec.loader.exec_module(module)
    return module


def options(args: str) -> dict[str, str]:
    return dict(w[2:].split("=", 1) for w in args.split() if w.startswith("-D"))


def test_native_backend_dl_names_the_cpu_features(build_wheel: ModuleType) -> None:
    zen4 = options(build_wheel.native_flags(DL_NATIVE, ZEN4, "x86_64"))
    assert zen4["GGML_NATIVE"] == "OFF" and zen4["GGML_BACKEND_DL"] == "ON"
    assert zen4["LLAVA_BUILD"] == "OFF"
    for on in ("GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_AVX512", "GGML_AVX512_BF16"):
        assert zen4[on] == "ON", on
    for off in ("GGML_AVX_VNNI", "GGML_AMX_TILE", "GGML_AMX_INT8"):
        assert zen4[off] == "OFF", off

    haswell = options(build_wheel.native_flags(DL_NATIVE, HASWELL, "x86_64"))
    assert haswell["GGML_AVX2"] == "ON" and haswell["GGML_BMI2"] == "ON"
    assert haswell["GGML_AVX512"] == "OFF" and haswell["GGML_AVX512_VNNI"] == "OFF"


def test_avx512_needs_all_of_its_parts(build_wheel: ModuleType) -> None:
    partial = HASWELL.rstrip("\n") + " avx512f avx512cd\n"  # no VL/DQ/BW: ggml's AVX512 needs them
    assert options(build_wheel.native_flags(DL_NATIVE, partial, "x86_64"))["GGML_AVX512"] == "OFF"


@pytest.mark.parametrize(
    ("args", "machine"),
    [
        ("-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF", "x86_64"),  # not backend-DL: -march=native works
        ("-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON", "x86_64"),
        (DL_NATIVE, "aarch64"),  # ggml's native check is x86-only
    ],
)
def test_other_builds_pass_through(build_wheel: ModuleType, args: str, machine: str) -> None:
    assert build_wheel.native_flags(args, ZEN4, machine) == args


def test_unknown_cpu_flags_pass_through(build_wheel: ModuleType) -> None:
    assert build_wheel.native_flags(DL_NATIVE, "processor\t: 0\n", "x86_64") == DL_NATIVE
