"""Engine runtimes: the manifest schema, backend-DL loading, the self-test and the fallback.

Test runtimes are real: the installed llama-cpp-python's lib/ copied under
PEREGRINE_HOME/runtimes/NAME/, next to runtimes that cannot work (garbage
libraries, a libllama whose constructor aborts, built here with gcc). Self-tests
run in real child processes on the built-in model.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from engine.paths import Paths
from engine.runtimes import (
    BUILT_IN,
    CUDA_FA_DEFAULT,
    ManifestError,
    RuntimeSelector,
    SelfTest,
    all_fa_pairs,
    built_in_lib_dir,
    driver_version,
    fa_pairs_from_features,
    parse_manifest,
    run_self_test,
)
from engine.serving.serve_cli import EventWriter, _heartbeat
from tests.engine_proc import running_engine, wait_for

GOOD_MANIFEST: dict[str, Any] = {
    "schema_version": 1,
    "backend": "cpu",
    "llama_cpp_commit": "0c1e57098bba43ac29e6e3b677cdceebdd22334f",
    "patches": [{"name": "0001-batch-invariant-cpu-flash-attention.patch", "sha256": "ab" * 32}],
    "cpu_variants": ["x64", "haswell", "skylakex"],
    "fa_type_pairs": [["f16", "f16"], ["q8_0", "q8_0"], ["q8_0", "f16"]],
}


def test_a_manifest_reads_back_as_written() -> None:
    m = parse_manifest(GOOD_MANIFEST)
    assert m.backend == "cpu" and m.cpu_variants == ("x64", "haswell", "skylakex")
    assert m.patches[0].name.startswith("0001-") and m.patches[0].sha256 == "ab" * 32
    assert m.fa_type_pairs == (("f16", "f16"), ("q8_0", "q8_0"), ("q8_0", "f16"))
    assert m.to_json() == GOOD_MANIFEST


def test_an_old_manifest_flag_reads_as_a_list_of_pairs() -> None:
    assert parse_manifest({"backend": "cuda", "fa_all_pairs": True}).fa_type_pairs == all_fa_pairs()
    assert parse_manifest({"backend": "cuda", "fa_all_pairs": False}).fa_type_pairs == (
        CUDA_FA_DEFAULT
    )
    assert parse_manifest({"backend": "vulkan"}).fa_type_pairs == ()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"backend": 3}, "'backend' must be a backend name"),
        ({"backend": "CUDA 12"}, "'backend' must be a backend name"),
        ({"schema_version": 2}, "schema_version 2; this Peregrine reads version 1"),
        ({"llama_cpp_commit": "main"}, "'llama_cpp_commit' must be a git commit"),
        ({"patches": "0001.patch"}, "'patches' must be a list"),
        ({"patches": [{"name": "a.patch"}]}, "patches[0].sha256 must be 64 lower-case hex"),
        ({"patches": ["a.patch"]}, 'patches[0] must be {"name": ..., "sha256": ...}'),
        ({"cpu_variants": ["haswell", 7]}, "cpu_variants[1] must be a variant name"),
        ({"fa_type_pairs": True}, "'fa_type_pairs' must be a list"),
        ({"fa_type_pairs": [["f16", "f16", "f16"]]}, "fa_type_pairs[0] must be a [K, V] pair"),
        ({"fa_type_pairs": [["f16", "q3_k"]]}, "fa_type_pairs[0] must be a [K, V] pair"),
        ({"fa_type_pairs": ["f16-f16"]}, 'not "f16-f16"'),
    ],
)
def test_a_bad_manifest_field_is_named(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ManifestError) as info:
        parse_manifest({**GOOD_MANIFEST, **change})
    assert message in str(info.value)


def test_fa_pairs_are_read_back_from_the_cuda_backend_features() -> None:
    assert fa_pairs_from_features({"CPU": {"AVX2": "1"}}) is None
    assert fa_pairs_from_features({"CUDA": {"FA_QUANTS": "all"}}) == all_fa_pairs()
    assert fa_pairs_from_features({"CUDA": {"FA_QUANTS": "q8_0-q8_0,q8_0-q4_0"}}) == (
        ("f16", "f16"),
        ("q8_0", "q8_0"),
        ("q8_0", "q4_0"),
    )


class FakeNvml:
    def __init__(self, version: bytes | None) -> None:
        self.version = version

    def nvmlInit(self) -> None:
        if self.version is None:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlSystemGetDriverVersion(self) -> bytes:
        assert self.version is not None
        return self.version

    def nvmlShutdown(self) -> None:
        pass


def test_the_driver_version_comes_from_nvml_else_sysfs_else_none(tmp_path: Path) -> None:
    assert driver_version(lambda: FakeNvml(b"580.65.06"), tmp_path) == "nvidia 580.65.06"
    assert driver_version(lambda: FakeNvml(None), tmp_path) == "none"
    (tmp_path / "module" / "amdgpu").mkdir(parents=True)
    (tmp_path / "module" / "amdgpu" / "version").write_text("6.10.5\n")
    assert driver_version(lambda: FakeNvml(None), tmp_path) == "amdgpu 6.10.5"


# --- runtimes on disk ------------------------------------------------------------------


def _home() -> Path:
    return Paths.from_env().runtimes


def install_copy(name: str, backend: str = "cpu") -> Path:
    """A working runtime: the installed wheel's llama.cpp libraries and a manifest."""
    wheel_lib = built_in_lib_dir()
    assert wheel_lib is not None and wheel_lib.is_dir()
    folder = _home() / name
    shutil.copytree(wheel_lib, folder / "lib", symlinks=True)
    (folder / "runtime.json").write_text(json.dumps({**GOOD_MANIFEST, "backend": backend}))
    return folder


def install_garbage(name: str) -> Path:
    """A runtime whose libraries are not libraries."""
    folder = _home() / name
    (folder / "lib").mkdir(parents=True)
    for lib in ("libggml.so", "libggml-base.so", "libllama.so"):
        (folder / "lib" / lib).write_bytes(b"\x7fELF but not really" + os.urandom(64))
    (folder / "runtime.json").write_text(json.dumps({**GOOD_MANIFEST, "backend": "vulkan"}))
    return folder


def gcc(source: str, out: Path, *flags: str) -> Path:
    src = out.with_suffix(".c")
    src.write_text(textwrap.dedent(source))
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(out), str(src), *flags], check=True)
    src.unlink()
    return out


def install_crashing(name: str) -> Path:
    """Real ggml libraries, and a libllama whose constructor aborts when it is loaded."""
    folder = install_copy(name, backend="vulkan")
    for old in (folder / "lib").glob("libllama.so*"):
        old.unlink()
    gcc(
        """
        #include <stdio.h>
        #include <stdlib.h>
        __attribute__((constructor)) static void boom(void) {
            fprintf(stderr, "GGML_ASSERT(test runtime) failed\\n");
            abort();
        }
        """,
        folder / "lib" / "libllama.so",
    )
    return folder


class Counting:
    """The real self-test, counted."""

    def __init__(self) -> None:
        self.calls: list[Path] = []

    def __call__(self, lib_dir: Path, gpu: bool) -> SelfTest:
        self.calls.append(lib_dir)
        return run_self_test(lib_dir, gpu)


def selector(test: Counting, driver: str = "none") -> RuntimeSelector:
    return RuntimeSelector(Paths.from_env(), self_test=test, driver=lambda: driver)


def test_a_working_runtime_passes_and_its_result_is_cached() -> None:
    install_copy("cpu")
    test = Counting()
    chosen = selector(test).choose("cpu")
    assert (chosen.name, chosen.backend, chosen.fallback_reason) == ("cpu", "cpu", None)
    assert chosen.lib_dir == _home() / "cpu" / "lib"
    assert len(test.calls) == 1
    # Another engine start (a new selector) reads the cache: no second child.
    assert selector(test).choose("cpu").name == "cpu"
    assert len(test.calls) == 1
    cache = json.loads(selector(test).cache_file.read_text())
    [(key, entry)] = cache.items()
    assert key.startswith("cpu|") and key.endswith("|none") and entry["ok"] is True
    assert entry["detail"] == "decoded 8 tokens" and "CPU" in entry["features"]
    # A new driver, a changed manifest or rebuilt libraries are tested again.
    selector(test, driver="nvidia 580.1").choose("cpu")
    assert len(test.calls) == 2
    (_home() / "cpu" / "runtime.json").write_text(json.dumps({"backend": "cpu"}))
    selector(test, driver="nvidia 580.1").choose("cpu")
    assert len(test.calls) == 3
    (_home() / "cpu" / "lib" / "libggml-cpu-haswell.so").write_bytes(b"")
    selector(test, driver="nvidia 580.1").choose("cpu")
    assert len(test.calls) == 4


def test_a_missing_runtime_falls_back_to_the_built_in_llama_cpp() -> None:
    test = Counting()
    chosen = selector(test).choose("cuda12")
    assert (chosen.name, chosen.lib_dir, chosen.requested) == (BUILT_IN, None, "cuda12")
    assert chosen.fallback_reason is not None
    assert chosen.fallback_reason.startswith("runtime 'cuda12' is not installed")
    assert chosen.fallback_reason.endswith("using Peregrine's built-in llama.cpp")
    assert test.calls == []
    odd = selector(test).choose("../../etc")
    assert odd.fallback_reason is not None
    assert odd.fallback_reason.startswith("runtime '../../etc' is not a runtime name")


def test_a_corrupt_manifest_falls_back_without_running_anything() -> None:
    install_copy("cpu")
    folder = install_copy("vulkan", backend="vulkan")
    (folder / "runtime.json").write_text('{"backend": "vulkan", "fa_type_pairs": [')
    test = Counting()
    chosen = selector(test).choose("vulkan")
    assert (chosen.name, chosen.requested) == ("cpu", "vulkan")
    assert chosen.fallback_reason is not None
    assert "runtime 'vulkan' is unusable: runtime.json is not valid JSON" in chosen.fallback_reason
    assert chosen.fallback_reason.endswith("using the cpu runtime 'cpu'")
    assert test.calls == [_home() / "cpu" / "lib"]  # only the fallback was tested


def test_a_lib_folder_that_does_not_load_falls_back_to_the_cpu_runtime() -> None:
    install_copy("cpu")
    install_garbage("vulkan")
    test = Counting()
    chosen = selector(test).choose("vulkan")
    assert (chosen.name, chosen.backend, chosen.requested) == ("cpu", "cpu", "vulkan")
    assert chosen.fallback_reason is not None
    assert "runtime 'vulkan' failed the self-test: RuntimeProblem: cannot load libggml" in (
        chosen.fallback_reason
    )
    assert len(test.calls) == 2


def test_a_runtime_that_crashes_in_the_self_test_is_remembered() -> None:
    install_crashing("vulkan")
    test = Counting()
    chosen = selector(test).choose("vulkan")
    assert chosen.name == BUILT_IN
    assert chosen.fallback_reason is not None
    assert "crashed in the self-test (SIGABRT): GGML_ASSERT(test runtime) failed" in (
        chosen.fallback_reason
    )
    # The crash is cached: the next start falls back at once.
    again = selector(test).choose("vulkan")
    assert again.fallback_reason == chosen.fallback_reason
    assert len(test.calls) == 1


def test_a_failing_cpu_runtime_is_no_fallback() -> None:
    install_garbage("cpu")
    (_home() / "cpu" / "runtime.json").write_text(json.dumps({"backend": "cpu"}))
    install_crashing("vulkan")
    chosen = selector(Counting()).choose("vulkan")
    assert chosen.name == BUILT_IN and chosen.fallback_reason is not None
    assert "the cpu runtime 'cpu' failed the self-test" in chosen.fallback_reason


# --- backend-DL builds ---------------------------------------------------------------------

FAKE_DL_GGML = """
#include <stdio.h>
#include <stdlib.h>
#include <stddef.h>
static size_t registered = LINKED;
size_t ggml_backend_reg_count(void) { return registered; }
void ggml_backend_load_all_from_path(const char * dir) {
    FILE * f = fopen(getenv("FAKE_GGML_MARK"), "w");
    fputs(dir, f);
    fclose(f);
    registered = REGISTERS;
}
"""


def _load_backends_in_child(lib_dir: Path, mark: Path) -> subprocess.CompletedProcess[str]:
    code = (
        "import sys; from pathlib import Path; from engine.runtimes import load_backends\n"
        "try:\n    print(load_backends(Path(sys.argv[1])))\n"
        "except Exception as exc:\n    print(type(exc).__name__, exc)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, str(lib_dir)],
        capture_output=True,
        text=True,
        env={**os.environ, "FAKE_GGML_MARK": str(mark)},
        check=True,
    )


def test_a_backend_dl_build_gets_its_modules_loaded_from_its_own_folder(tmp_path: Path) -> None:
    lib = tmp_path / "dl lib"
    lib.mkdir()
    gcc(FAKE_DL_GGML, lib / "libggml.so", "-DREGISTERS=2", "-DLINKED=0")
    mark = tmp_path / "mark"
    assert _load_backends_in_child(lib, mark).stdout.strip() == "2"
    assert mark.read_text() == str(lib)


def test_a_backend_dl_build_without_modules_is_a_clear_error(tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    gcc(FAKE_DL_GGML, lib / "libggml.so", "-DREGISTERS=0", "-DLINKED=0")
    out = _load_backends_in_child(lib, tmp_path / "mark").stdout
    assert out.strip() == f"RuntimeProblem no ggml backend module in {lib} could be loaded"


def test_a_build_with_linked_backends_needs_no_loading(tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    gcc(FAKE_DL_GGML, lib / "libggml.so", "-DREGISTERS=2", "-DLINKED=1")
    mark = tmp_path / "mark"
    assert _load_backends_in_child(lib, mark).stdout.strip() == "0"
    assert not mark.exists()


def test_the_built_in_llama_cpp_registers_its_cpu_module(tmp_path: Path) -> None:
    """The development build is itself backend-DL: its CPU backend is a module beside libllama."""
    wheel_lib = built_in_lib_dir()
    assert wheel_lib is not None
    assert _load_backends_in_child(wheel_lib, tmp_path / "mark").stdout.strip() == "1"


def test_backends_registered_after_llama_cpp_is_imported_reach_llama_cpp(
    default_model: Path,
) -> None:
    """The wheel's libggml.so and libggml.so.0 are copies: the one libllama loaded must be used."""
    code = (
        "import sys, llama_cpp\n"
        "from engine.runtimes import ensure_backends\n"
        "ensure_backends()\n"
        "llama_cpp.llama_backend_init()\n"
        "params = llama_cpp.llama_model_default_params()\n"
        "model = llama_cpp.llama_model_load_from_file(sys.argv[1].encode(), params)\n"
        "print('loaded' if model else 'not loaded')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(default_model)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "loaded", out.stderr[-2000:]


# --- the engine ------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_engine_falls_back_says_why_and_serves() -> None:
    install_crashing("vulkan")
    with (
        running_engine("--runtime", "vulkan", "--tool-self-test", "off") as engine,
        engine.client() as c,
    ):
        status = c.get("/v1/engine/status").json()
        runtime = status["runtime"]
        assert (runtime["name"], runtime["backend"], runtime["requested"]) == (
            BUILT_IN,
            "cpu",
            "vulkan",
        )
        assert "crashed in the self-test (SIGABRT)" in runtime["fallback_reason"]
        assert status["settings"]["runtime"] is None
        answer = engine.chat([{"role": "user", "content": "Say hi"}], max_tokens=4)
        assert answer["choices"][0]["message"]["content"]
        # A load that names the runtime asked for at start-up runs on the fallback.
        body = {**status["settings"], "runtime": "vulkan", "n_ctx": 1024}
        assert c.post("/v1/engine/load", json=body).status_code == 202

        def reloaded() -> bool:
            nonlocal status
            status = c.get("/v1/engine/status").json()
            return bool(status["error"]) or (
                status["state"] == "ready" and status["settings"]["n_ctx"] == 1024
            )

        assert wait_for(reloaded, 120)
        assert status["error"] is None and status["settings"]["runtime"] is None, status


@pytest.mark.slow
def test_the_engine_runs_a_working_runtime() -> None:
    install_copy("cpu")
    with (
        running_engine("--runtime", "cpu", "--tool-self-test", "off") as engine,
        engine.client() as c,
    ):
        status = c.get("/v1/engine/status").json()
        assert status["runtime"] == {
            "name": "cpu",
            "backend": "cpu",
            "requested": None,
            "fallback_reason": None,
        }
        assert status["settings"]["runtime"] == "cpu"
        answer = engine.chat([{"role": "user", "content": "Say hi"}], max_tokens=4)
        assert answer["choices"][0]["message"]["content"]


@pytest.mark.slow
def test_the_profile_plans_with_working_runtimes_only() -> None:
    install_crashing("cpu")
    (_home() / "cpu" / "runtime.json").write_text(json.dumps({"backend": "cpu"}))
    install_copy("cpu-copy")
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "profile"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "runtimes: cpu-copy (cpu" in out
    assert "not probed: runtime cpu: crashed in the self-test (SIGABRT)" in out
    assert "runtime cpu-copy" in out.split("plan:", 1)[1].splitlines()[0]


@pytest.mark.slow
def test_a_planned_engine_runs_on_the_cpu_runtime_of_a_cpu_only_machine() -> None:
    install_copy("cpu")
    with running_engine("--plan", "auto", "--tool-self-test", "off") as engine:
        with engine.client() as c:
            status = c.get("/v1/engine/status").json()
        assert status["runtime"]["name"] == "cpu" and status["settings"]["runtime"] == "cpu"
        assert status["runtime"]["fallback_reason"] is None


def test_a_long_self_test_keeps_the_start_from_looking_stalled() -> None:
    out = io.StringIO()
    with _heartbeat(EventWriter(out), every_s=0.01):
        assert wait_for(lambda: out.getvalue().count("\n") >= 2, 30)
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert all(e == {"event": "loading", "progress": 0.0} for e in events)
