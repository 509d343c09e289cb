"""Hardware detection: real probes on this machine, fake NVML and a fake sysfs tree."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from engine.errors import PeregrineError
from engine.hardware import GPU, Hardware, HardwareProbes, detect_hardware, merge_gpus

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
    assert [(r.name, r.backend, r.fa_all_pairs) for r in hw.runtimes] == [("cuda12", "cuda", True)]
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
