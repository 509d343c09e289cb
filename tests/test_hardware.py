"""Hardware detection: real probes on this machine, fake NVML and a fake sysfs tree."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from engine.errors import PeregrineError
from engine.planning.hardware import GPU, RAM, Hardware, HardwareProbes, detect_hardware, merge_gpus

GiB = 1 << 30


class FakeNVML(ModuleType):
    """The slice of pynvml that detection uses, with two GPUs."""

    def __init__(self, fail_init: bool = False):
        super().__init__("pynvml")
        self.fail_init = fail_init
        self.shutdown_calls = 0
        self.gpus = [
            ("NVIDIA GeForce RTX 3090", 24 * GiB, 20 * GiB, (8, 6)),
            (b"NVIDIA GeForce RTX 3060", 12 * GiB, 11 * GiB, (8, 6)),
        ]

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> Any:
        return self.gpus[h][0]

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return SimpleNamespace(total=self.gpus[h][1], free=self.gpus[h][2], used=0)

    def nvmlDeviceGetCudaComputeCapability(self, h: int) -> tuple[int, int]:
        return self.gpus[h][3]


def _no_sysfs(tmp_path: Path) -> Path:
    return tmp_path / "no-sysfs"


def _probes(tmp_path: Path, **kw: Any) -> HardwareProbes:
    base: dict[str, Any] = {
        "nvml_module": lambda: FakeNVML(fail_init=True),
        "sysfs_root": _no_sysfs(tmp_path),
        "probe_ggml": False,
        "runtimes_dir": tmp_path / "runtimes",
    }
    base.update(kw)
    return HardwareProbes(**base)


def test_real_machine_detects_cpu_ram_disk_and_records_what_is_missing(tmp_path: Path) -> None:
    hw = detect_hardware(models_dir=tmp_path / "models")
    assert hw.cpu.physical_cores >= 1
    assert hw.cpu.logical_cores >= hw.cpu.physical_cores
    assert 0 < hw.ram.available <= hw.ram.total
    assert hw.disk_free > 0
    if not any(g.backend == "cuda" for g in hw.gpus):
        assert any(m.startswith("nvml:") for m in hw.missing), hw.missing
    # The JSON form is plain data and survives a round trip.
    data = json.loads(json.dumps(hw.to_json()))
    assert set(data) == {"gpus", "cpu", "ram", "disk_free", "runtimes", "missing"}
    assert Hardware.from_json(data) == hw


def test_fake_nvml_gpus_are_listed_with_memory_and_compute_capability(tmp_path: Path) -> None:
    nvml = FakeNVML()
    hw = detect_hardware(_probes(tmp_path, nvml_module=lambda: nvml), models_dir=tmp_path)
    assert [g.name for g in hw.gpus] == ["NVIDIA GeForce RTX 3090", "NVIDIA GeForce RTX 3060"]
    assert hw.gpus[0].total == 24 * GiB and hw.gpus[0].free == 20 * GiB
    assert hw.gpus[0].backend == "cuda" and hw.gpus[0].compute_capability == "8.6"
    assert nvml.shutdown_calls == 1
    assert not any(m.startswith("nvml") for m in hw.missing)


def test_nvml_failures_are_recorded_not_raised(tmp_path: Path) -> None:
    def not_installed() -> ModuleType:
        raise ImportError("No module named 'pynvml'")

    hw = detect_hardware(_probes(tmp_path, nvml_module=not_installed), models_dir=tmp_path)
    assert hw.gpus == []
    assert any("pynvml is not installed" in m for m in hw.missing)

    hw = detect_hardware(_probes(tmp_path), models_dir=tmp_path)
    assert any("no NVIDIA driver" in m for m in hw.missing)


def _amd_card(root: Path, card: str, vendor: str, total: int | None, used: int, name: str) -> None:
    dev = root / "class" / "drm" / card / "device"
    dev.mkdir(parents=True)
    (dev / "vendor").write_text(vendor + "\n")
    if total is not None:
        (dev / "mem_info_vram_total").write_text(f"{total}\n")
    (dev / "mem_info_vram_used").write_text(f"{used}\n")
    (dev / "product_name").write_text(name + "\n")
    (dev / "gfx_target_version").write_text("gfx1100\n")


def test_amd_gpus_come_from_sysfs_vram_counters(tmp_path: Path) -> None:
    root = tmp_path / "sys"
    _amd_card(root, "card0", "0x1002", 24 * GiB, 2 * GiB, "Radeon RX 7900 XTX")
    _amd_card(root, "card1", "0x8086", 8 * GiB, 0, "Intel Arc")  # not AMD: ignored
    (root / "class" / "drm" / "card0-DP-1").mkdir()  # a connector, not a card
    hw = detect_hardware(_probes(tmp_path, sysfs_root=root), models_dir=tmp_path)
    assert len(hw.gpus) == 1
    gpu = hw.gpus[0]
    assert (gpu.name, gpu.backend, gpu.total, gpu.free) == (
        "Radeon RX 7900 XTX",
        "hip",
        24 * GiB,
        22 * GiB,
    )
    assert gpu.compute_capability == "gfx1100"
    assert not any(m.startswith("amd") for m in hw.missing)


def test_amd_card_without_vram_counters_is_recorded(tmp_path: Path) -> None:
    root = tmp_path / "sys"
    _amd_card(root, "card0", "0x1002", None, 0, "Radeon")
    hw = detect_hardware(_probes(tmp_path, sysfs_root=root), models_dir=tmp_path)
    assert hw.gpus == []
    assert any("card0: cannot read VRAM counters" in m for m in hw.missing)


def test_missing_sysfs_and_ggml_library_are_recorded(tmp_path: Path) -> None:
    empty = tmp_path / "lib"
    empty.mkdir()
    hw = detect_hardware(
        _probes(tmp_path, probe_ggml=True, ggml_lib_dir=empty), models_dir=tmp_path
    )
    assert any(m.startswith("amd sysfs:") for m in hw.missing)
    assert any(m.startswith("ggml devices:") and "no libggml" in m for m in hw.missing)


@pytest.mark.parametrize("in_child", [True, False])
def test_real_ggml_build_lists_its_gpus_or_none(tmp_path: Path, in_child: bool) -> None:
    probes = _probes(tmp_path, probe_ggml=True, ggml_in_child=in_child)
    hw = detect_hardware(probes, models_dir=tmp_path)
    assert not any(m.startswith("ggml devices") for m in hw.missing), hw.missing
    assert all(g.total >= g.free >= 0 for g in hw.gpus)


def test_a_crashing_probe_is_recorded_and_detection_goes_on(tmp_path: Path) -> None:
    def broken() -> Any:
        raise OSError("psutil exploded")

    hw = detect_hardware(_probes(tmp_path, virtual_memory=broken), models_dir=tmp_path)
    assert hw.ram.total == 0
    assert any("ram: OSError: psutil exploded" in m for m in hw.missing)
    assert hw.cpu.logical_cores >= 1


def test_cpu_flags_and_name_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse3 avx avx2 fma avx512f junk\n"
        "processor\t: 1\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse3 avx avx2 fma avx512f junk\n"
    )
    hw = detect_hardware(
        _probes(tmp_path, proc_cpuinfo=cpuinfo, cpu_count=lambda logical: 16 if logical else 8),
        models_dir=tmp_path,
    )
    assert hw.cpu.name == "Test CPU 9000"
    assert hw.cpu.flags == ["sse3", "avx", "avx2", "fma", "avx512f"]
    assert (hw.cpu.physical_cores, hw.cpu.logical_cores) == (8, 16)


def test_runtimes_are_read_and_a_broken_manifest_is_recorded(tmp_path: Path) -> None:
    rt = tmp_path / "runtimes"
    (rt / "cuda12").mkdir(parents=True)
    (rt / "cuda12" / "runtime.json").write_text(
        json.dumps({"backend": "cuda", "fa_all_pairs": True, "llama_cpp_commit": "0c1e570"})
    )
    (rt / "broken").mkdir()
    (rt / "broken" / "runtime.json").write_text("{not json")
    hw = detect_hardware(_probes(tmp_path), models_dir=tmp_path)
    # An old manifest's `fa_all_pairs: true` reads as every CUDA pair.
    assert [(r.name, r.backend, len(r.fa_type_pairs)) for r in hw.runtimes] == [
        ("cuda12", "cuda", 49)
    ]
    assert ["q8_0", "f16"] in hw.runtimes[0].fa_type_pairs
    assert any(m.startswith("runtime broken:") for m in hw.missing)


def test_vendor_and_ggml_views_of_one_gpu_are_merged() -> None:
    vendor = [GPU("NVIDIA GeForce RTX 3090", "cuda", 24 * GiB, 20 * GiB, "8.6")]
    ggml = [
        GPU("NVIDIA GeForce RTX 3090", "cuda", 24 * GiB, 21 * GiB),
        GPU("Intel(R) Arc(TM) A770", "vulkan", 16 * GiB, 16 * GiB),
    ]
    merged = merge_gpus(vendor, ggml)
    assert [g.name for g in merged] == ["NVIDIA GeForce RTX 3090", "Intel(R) Arc(TM) A770"]
    assert merged[0].compute_capability == "8.6"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "must be a JSON object"),
        ({"gpus": [], "ram": {"total": 1, "available": 1}}, "'cpu'"),
        (
            {
                "cpu": {"physical_cores": 2, "logical_cores": 2},
                "ram": {"total": -1, "available": 1},
            },
            "ram.total",
        ),
        (
            {
                "cpu": {"physical_cores": 2, "logical_cores": 2},
                "ram": {"total": 1, "available": 1},
                "gpus": [{"name": "x", "total": "lots", "free": 1}],
            },
            "gpus[].total",
        ),
        (
            {
                "cpu": {"physical_cores": 2, "logical_cores": 2},
                "ram": {"total": 1, "available": 1},
                "gpus": {},
            },
            "gpus must be a list",
        ),
    ],
)
def test_bad_hardware_json_is_a_clear_error(data: Any, message: str) -> None:
    with pytest.raises(PeregrineError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Hardware.from_json(data)


# --- probes failing in odd ways, hostile hardware objects (adversarial pass) ----------------


class OddNVML(FakeNVML):
    """NVML whose second GPU fails with an exception NVML's own docs never mention."""

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        if h == 1:
            raise ZeroDivisionError("driver bug")
        return super().nvmlDeviceGetMemoryInfo(h)


def test_one_failing_nvml_gpu_does_not_hide_the_others(tmp_path: Path) -> None:
    hw = detect_hardware(_probes(tmp_path, nvml_module=lambda: OddNVML()), models_dir=tmp_path)
    assert [g.name for g in hw.gpus] == ["NVIDIA GeForce RTX 3090"]
    assert any("nvml GPU 1: ZeroDivisionError: driver bug" in m for m in hw.missing)


@pytest.mark.parametrize("count", [None, "two", -1, 10**9])
def test_an_absurd_nvml_device_count_is_recorded(tmp_path: Path, count: Any) -> None:
    nvml = FakeNVML()
    nvml.nvmlDeviceGetCount = lambda: count  # type: ignore[method-assign]
    hw = detect_hardware(_probes(tmp_path, nvml_module=lambda: nvml), models_dir=tmp_path)
    assert hw.gpus == []
    assert any(m.startswith("nvml:") for m in hw.missing)
    assert nvml.shutdown_calls == 1


def test_nvml_memory_figures_that_make_no_sense_are_recorded(tmp_path: Path) -> None:
    nvml = FakeNVML()
    nvml.gpus[0] = ("Liar", 8 * GiB, 9 * GiB, (8, 6))  # more free than total: clamped
    nvml.gpus[1] = ("Negative", -1, 0, (8, 6))
    hw = detect_hardware(_probes(tmp_path, nvml_module=lambda: nvml), models_dir=tmp_path)
    assert [(g.name, g.total, g.free) for g in hw.gpus] == [("Liar", 8 * GiB, 8 * GiB)]
    assert any(m.startswith("nvml GPU 1:") and "out of range" in m for m in hw.missing)
    assert Hardware.from_json(json.loads(json.dumps(hw.to_json()))) == hw


def test_nvml_loader_raising_anything_is_recorded(tmp_path: Path) -> None:
    def broken() -> ModuleType:
        raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    hw = detect_hardware(_probes(tmp_path, nvml_module=broken), models_dir=tmp_path)
    assert any("nvml: OSError" in m for m in hw.missing)


def test_psutil_and_disk_answers_of_the_wrong_kind_are_recorded(tmp_path: Path) -> None:
    hw = detect_hardware(
        _probes(
            tmp_path,
            virtual_memory=lambda: SimpleNamespace(total=None, available=1),
            disk_usage=lambda _p: SimpleNamespace(free=-5),
            cpu_count=lambda _logical: -3,
        ),
        models_dir=tmp_path,
    )
    assert hw.ram == RAM(0, 0) and hw.disk_free == 0
    assert hw.cpu.physical_cores == 1 and hw.cpu.logical_cores == 1
    assert any(m.startswith("ram:") and "total" in m for m in hw.missing)
    assert any(m.startswith("disk:") and "out of range" in m for m in hw.missing)


def test_one_odd_amd_card_does_not_hide_the_good_one(tmp_path: Path) -> None:
    root = tmp_path / "sys"
    _amd_card(root, "card0", "0x1002", None, 0, "Radeon without counters")
    _amd_card(root, "card1", "0x1002", 16 * GiB, GiB, "Radeon")
    (root / "class" / "drm" / "card1" / "device" / "product_name").write_bytes(b"Rade\xffon\n")
    _amd_card(root, "card2", "0x1002", 8 * GiB, 0, "x")
    (root / "class" / "drm" / "card2" / "device" / "mem_info_vram_total").write_bytes(b"\xff\xfe")
    hw = detect_hardware(_probes(tmp_path, sysfs_root=root), models_dir=tmp_path)
    assert [(g.name, g.total, g.free) for g in hw.gpus] == [("Rade\ufffdon", 16 * GiB, 15 * GiB)]
    assert any("card0: cannot read VRAM counters" in m for m in hw.missing)
    assert any("card2: cannot read VRAM counters" in m for m in hw.missing)


def test_a_deeply_nested_runtime_manifest_is_recorded(tmp_path: Path) -> None:
    runtimes = tmp_path / "runtimes"
    (runtimes / "deep").mkdir(parents=True)
    (runtimes / "deep" / "runtime.json").write_text("[" * 100_000 + "]" * 100_000)
    (runtimes / "cpu").mkdir()
    (runtimes / "cpu" / "runtime.json").write_text('{"backend": "cpu"}')
    hw = detect_hardware(_probes(tmp_path, runtimes_dir=runtimes), models_dir=tmp_path)
    assert [r.name for r in hw.runtimes] == ["cpu"]
    assert any(m.startswith("runtime deep:") for m in hw.missing)


def _hw(**over: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "gpus": [],
        "cpu": {"name": "x", "physical_cores": 2, "logical_cores": 4, "flags": []},
        "ram": {"total": 8 * GiB, "available": 4 * GiB},
        "disk_free": GiB,
    }
    data.update(over)
    return data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_hw(ram={"total": 8 * GiB, "available": float("nan")}), "ram.available"),
        (_hw(ram={"total": float("inf"), "available": 1}), "ram.total"),
        (_hw(ram={"total": 1 << 200, "available": 1}), "implausibly large (a 201-bit number"),
        (_hw(ram={"total": 1, "available": 2}), "more than ram.total"),
        (_hw(gpus=[None]), "gpus[] must be an object"),
        (_hw(gpus=["RTX"]), "gpus[] must be an object"),
        (_hw(gpus=[{"name": "g", "total": 1, "free": 2}]), "more free memory"),
        (_hw(gpus=[{"name": ["deep"], "total": 1, "free": 1}]), "gpus[].name must be text"),
        (_hw(gpus=[{"name": "g", "total": 1, "free": 1}] * 300), "at most 256"),
        (_hw(cpu={"physical_cores": 1e300, "logical_cores": 1}), "cpu.physical_cores"),
        (_hw(cpu={"physical_cores": 2, "logical_cores": 2, "flags": [{}]}), "cpu.flags[]"),
        (_hw(runtimes=[1]), "runtimes[] must be an object"),
        (_hw(disk_free=-1), "disk_free"),
        ({"hardware": _hw()}, "not the whole profile"),
    ],
)
def test_hostile_hardware_objects_are_clear_errors(data: Any, message: str) -> None:
    with pytest.raises(PeregrineError, match=re.escape(message)):
        Hardware.from_json(data)


def test_a_runtime_json_that_is_a_fifo_does_not_block(tmp_path: Path) -> None:
    runtimes = tmp_path / "runtimes"
    (runtimes / "fifo").mkdir(parents=True)
    os.mkfifo(runtimes / "fifo" / "runtime.json")
    (runtimes / "huge").mkdir()
    with (runtimes / "huge" / "runtime.json").open("wb") as f:
        f.truncate(2 << 20)
    hw = detect_hardware(_probes(tmp_path, runtimes_dir=runtimes), models_dir=tmp_path)
    assert hw.runtimes == []
    assert any(m.startswith("runtime fifo:") and "not a regular file" in m for m in hw.missing)
    assert any(m.startswith("runtime huge:") and "larger than" in m for m in hw.missing)
