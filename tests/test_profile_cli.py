"""`peregrine profile`: the contract's JSON, its flags, and one-line errors."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.cli import main as peregrine
from engine.planning.hardware import CPU, GPU, RAM, Hardware
from tests.fake_hub import FakeHub, running_hub
from tests.planner_models import header_bytes, llama8b_like, qwen3moe_like

GiB = 1 << 30
HOSTILE = Path(__file__).parent / "data" / "hostile"


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = peregrine(["profile", *args])
    out, err = capsys.readouterr()
    return code, out, err


def profile_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    code, out, err = run(capsys, "--json", *args)
    assert code == 0, err
    assert out.count("\n") == 1  # one JSON object, one line
    data = json.loads(out)
    assert isinstance(data, dict)
    return data


def write_hardware(path: Path, hw: Hardware) -> Path:
    path.write_text(json.dumps(hw.to_json()))
    return path


def test_profile_json_on_this_machine(capsys: pytest.CaptureFixture[str]) -> None:
    data = profile_json(capsys)
    assert set(data) == {"hardware", "plan", "memory", "method"}
    assert set(data["hardware"]) == {"gpus", "cpu", "ram", "disk_free", "runtimes", "missing"}
    assert set(data["hardware"]["cpu"]) == {"name", "physical_cores", "logical_cores", "flags"}
    assert set(data["plan"]) == {"load", "quant_file", "reasons"}
    load = data["plan"]["load"]
    assert {
        "model",
        "n_ctx",
        "n_gpu_layers",
        "tensor_split",
        "expert_offload",
        "n_cpu_moe",
        "type_k",
        "type_v",
        "flash_attn",
        "n_batch",
        "n_ubatch",
        "threads",
    } <= set(load)
    assert set(data["memory"]) == {"weights", "kv", "compute", "overhead", "total", "devices"}
    assert data["method"] == "measured"
    assert data["plan"]["quant_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not data["hardware"]["gpus"]:
        assert load["n_gpu_layers"] == 0
        assert (load["n_ctx"], load["type_k"], load["flash_attn"]) == (8192, "f16", "on")
        assert load["threads"] == data["hardware"]["cpu"]["physical_cores"]
    mem = data["memory"]
    assert mem["total"] == sum(d["total"] for d in mem["devices"])


def test_hardware_file_round_trips(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    first = profile_json(capsys, "--estimate-only")
    hw_file = tmp_path / "hw.json"
    hw_file.write_text(json.dumps(first["hardware"]))
    second = profile_json(capsys, "--estimate-only", "--hardware", str(hw_file))
    assert second["hardware"] == first["hardware"]
    assert second["plan"] == first["plan"]


def test_estimate_only_skips_the_dry_run(capsys: pytest.CaptureFixture[str]) -> None:
    data = profile_json(capsys, "--estimate-only")
    assert data["method"] == "estimated"


def test_pins_reach_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    data = profile_json(
        capsys,
        "--estimate-only",
        "--ctx",
        "2048",
        "--cache-type-k",
        "q8_0",
        "--cache-type-v",
        "q8_0",
    )
    load = data["plan"]["load"]
    assert (load["n_ctx"], load["type_k"], load["type_v"]) == (2048, "q8_0", "q8_0")


def test_a_synthetic_gpu_machine_from_a_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    hw = Hardware(
        gpus=[GPU("NVIDIA GeForce RTX 3090", "cuda", 24 * GiB, 23 * GiB, "8.6")],
        cpu=CPU("x", 8, 16, []),
        ram=RAM(64 * GiB, 50 * GiB),
        disk_free=GiB,
    )
    model = llama8b_like(tmp_path, "Q4_K_M")
    data = profile_json(
        capsys,
        "--estimate-only",
        "--model",
        str(model),
        "--hardware",
        str(write_hardware(tmp_path / "hw.json", hw)),
    )
    assert data["plan"]["load"]["n_gpu_layers"] == -1
    assert data["hardware"]["gpus"][0]["name"] == "NVIDIA GeForce RTX 3090"
    cuda = next(d for d in data["memory"]["devices"] if d["name"] == "CUDA0")
    assert cuda["total"] <= 22 * GiB


def test_budget_gib_caps_the_plan(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model = qwen3moe_like(tmp_path, "Q4_K_M")
    code, out, err = run(
        capsys, "--json", "--estimate-only", "--model", str(model), "--budget-gib", "4"
    )
    assert code == 1 and out == ""
    assert err.startswith("peregrine profile: error: ") and err.count("\n") == 1
    assert "does not fit" in err


def test_budget_gib_per_device(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """`--budget-gib 6,14`: one figure per device, the GPUs in order and then RAM."""
    hw = Hardware(
        gpus=[GPU("NVIDIA GeForce RTX 3090", "cuda", 24 * GiB, 23 * GiB, "8.6")],
        cpu=CPU("x", 8, 16, []),
        ram=RAM(64 * GiB, 50 * GiB),
        disk_free=GiB,
    )
    hw_file = str(write_hardware(tmp_path / "hw.json", hw))
    model = str(qwen3moe_like(tmp_path, "Q4_K_M"))
    common = ("--estimate-only", "--model", model, "--hardware", hw_file)
    data = profile_json(capsys, *common, "--budget-gib", "6,14")
    devices = {d["name"]: d["total"] for d in data["memory"]["devices"]}
    assert devices["CUDA0"] <= 6 * GiB and devices["CPU"] <= 14 * GiB
    assert data["plan"]["reasons"][0].startswith("budget: CUDA0 6.0 GiB, RAM 14.0 GiB")
    load = data["plan"]["load"]
    # 6 GiB hold every layer with some experts; the rest of the experts go to RAM.
    assert load["n_gpu_layers"] == -1 and (load["n_cpu_moe"] or load["expert_offload"])
    # One figure is the total over all devices.
    total = profile_json(capsys, *common, "--budget-gib", "21")
    assert total["memory"]["total"] <= 21 * GiB
    # A list must name every device: one line, exit 1.
    code, out, err = run(capsys, *common, "--budget-gib", "6,10,4")
    assert code == 1 and out == "" and err.count("\n") == 1
    assert "one budget per device: 1 GPU(s) and then RAM (2 figures), not 3" in err


def test_text_output_explains_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--estimate-only")
    assert code == 0
    assert "plan: ctx 8192" in out and "why:" in out and "memory (estimated)" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/nonexistent/model.gguf"], "no such file"),
        (["--model", str(HOSTILE / "duplicate_key.gguf")], "duplicate"),
        (["--model", str(HOSTILE / "empty.gguf")], "empty.gguf"),
        (["--hardware", "/nonexistent/hw.json"], "hardware file not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, out, err = run(capsys, *args)
    assert code == 1
    assert out == ""
    assert err.count("\n") == 1 and message in err
    assert "Traceback" not in err


def test_bad_hardware_files_are_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    for text, message in (
        ("{not json", "is not JSON"),
        ('{"gpus": []}', "missing the field 'cpu'"),
    ):
        path = tmp_path / "hw.json"
        path.write_text(text)
        code, _, err = run(capsys, "--hardware", str(path))
        assert code == 1 and err.count("\n") == 1 and message in err


@pytest.mark.parametrize(
    "args",
    [
        ["--ctx", "many"],
        ["--cache-type-k", "q3_weird"],
        ["--file", "x.gguf"],
        ["--budget-gib", "-1"],
        ["--budget-gib", "6,x"],
        ["--budget-gib", "6,-1"],
        ["--budget-gib", "6,0"],
        ["--budget-gib", ""],
        ["--bogus"],
    ],
)
def test_bad_usage_exits_2(capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    code, out, err = run(capsys, *args)
    assert code == 2 and out == "" and err.count("\n") == 1


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with running_hub() as h:
        monkeypatch.setenv("HF_ENDPOINT", h.endpoint)
        repo = h.add_repo("acme/Llama-8B-like-GGUF")
        for quant in ("Q8_0", "Q4_K_M", "Q2_K"):
            path = llama8b_like(tmp_path, quant)
            repo.add(path.name, header_bytes(path))
        repo.add("README.md", b"# not a model")
        yield h


def test_repo_picks_a_quant_from_remote_headers(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, hub: FakeHub
) -> None:
    hw = Hardware(
        gpus=[GPU("NVIDIA GeForce RTX 3070", "cuda", 8 * GiB, int(7.6 * GiB), "8.6")],
        cpu=CPU("x", 8, 16, []),
        ram=RAM(32 * GiB, 24 * GiB),
        disk_free=GiB,
    )
    data = profile_json(
        capsys,
        "--repo",
        "acme/Llama-8B-like-GGUF",
        "--hardware",
        str(write_hardware(tmp_path / "hw.json", hw)),
    )
    assert data["method"] == "estimated"
    assert data["plan"]["quant_file"] == "Llama-3.1-8B-like-Q4_K_M.gguf"
    assert data["plan"]["load"]["n_gpu_layers"] == -1
    assert any("remote files" in r for r in data["plan"]["reasons"])

    one = profile_json(
        capsys,
        "--repo",
        "acme/Llama-8B-like-GGUF",
        "--file",
        "Llama-3.1-8B-like-Q8_0.gguf",
        "--hardware",
        str(tmp_path / "hw.json"),
    )
    assert one["plan"]["quant_file"] == "Llama-3.1-8B-like-Q8_0.gguf"


def test_unknown_repo_is_one_line(capsys: pytest.CaptureFixture[str], hub: FakeHub) -> None:
    code, _, err = run(capsys, "--repo", "acme/Nope", "--estimate-only")
    assert code == 1 and err.count("\n") == 1 and "acme/Nope" in err


def test_a_huge_trained_context_is_planned_within_what_a_load_accepts(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from engine.wire.base import MAX_N_CTX
    from tests.gguf_fixtures import tiny_model

    model = tiny_model(tmp_path / "long.gguf", llama__context_length=16_000_000)
    data = profile_json(capsys, "--estimate-only", "--model", str(model))
    assert data["plan"]["load"]["n_ctx"] == MAX_N_CTX


# --- hostile inputs (adversarial pass) -------------------------------------------------------


def _one_line_failure(err: str) -> None:
    assert err.count("\n") == 1 and "Traceback" not in err and "internal error" not in err, err


def _good_hardware() -> dict[str, Any]:
    return Hardware(
        gpus=[], cpu=CPU("x", 4, 8, []), ram=RAM(16 * GiB, 12 * GiB), disk_free=GiB
    ).to_json()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"ram": NaN}', "must be a non-negative number, not nan"),
        ("RAM_AVAILABLE", "ram.available"),
        ("1e999", "ram.available"),
        ("9" * 5000, "not usable JSON"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"gpus": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
        ("GPUS_NONE", "gpus[] must be an object"),
        ("PROFILE", "not the whole profile"),
        ("CORES_2000", ""),  # valid: planned with at most 1024 threads
    ],
)
def test_hostile_hardware_files_are_one_line_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, message: str
) -> None:
    good = _good_hardware()
    if text == "RAM_AVAILABLE":
        text = json.dumps(good).replace(f'"available": {12 * GiB}', '"available": -Infinity')
    elif text == "1e999":
        text = json.dumps(good).replace(f'"available": {12 * GiB}', '"available": 1e999')
    elif text == "GPUS_NONE":
        text = json.dumps({**good, "gpus": [None]})
    elif text == "PROFILE":
        text = json.dumps({"hardware": good})
    elif text == "CORES_2000":
        good["cpu"]["physical_cores"] = good["cpu"]["logical_cores"] = 2000
        text = json.dumps(good)
    elif text.startswith('{"ram": NaN}'):
        text = json.dumps(good).replace(f'"total": {16 * GiB}', '"total": NaN')
        message = "ram.total must be a non-negative number, not nan"
    path = tmp_path / "hw.json"
    path.write_text(text)
    code, out, err = run(capsys, "--json", "--estimate-only", "--hardware", str(path))
    if not message:
        assert code == 0, err
        assert json.loads(out)["plan"]["load"]["threads"] == 1024
        return
    assert code == 1 and out == ""
    _one_line_failure(err)
    assert message in err


def test_hardware_files_that_are_not_files_do_not_block(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    fifo = tmp_path / "hw.fifo"
    os.mkfifo(fifo)  # reading it would wait for a writer forever
    for path in (str(fifo), "/dev/zero", str(tmp_path)):
        code, out, err = run(capsys, "--estimate-only", "--hardware", path)
        assert code == 1 and out == ""
        _one_line_failure(err)
        assert "not a regular file" in err
    big = tmp_path / "big.json"
    with big.open("wb") as f:
        f.truncate(17 << 20)  # sparse: costs no disk
    code, _, err = run(capsys, "--estimate-only", "--hardware", str(big))
    assert code == 1 and "larger than 16 MiB" in err
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    code, _, err = run(capsys, "--estimate-only", "--hardware", str(binary))
    assert code == 1 and "not UTF-8" in err


def test_model_paths_that_are_not_models_are_one_line_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    fifo = tmp_path / "m.gguf"
    os.mkfifo(fifo)
    for path, message in (
        (str(fifo), "not a regular file"),
        ("/dev/zero", "not a regular file"),
        (str(tmp_path), "is a directory"),
        ("acme/NoSuchRepo-GGUF", "no such file; to plan a Hugging Face repo use --repo"),
        (str(tmp_path / "gone.gguf"), "gone.gguf: no such file"),
    ):
        code, out, err = run(capsys, "--estimate-only", "--model", path)
        assert code == 1 and out == ""
        _one_line_failure(err)
        assert message in err


@pytest.mark.parametrize(
    "args",
    [
        ["--budget-gib", "inf"],
        ["--budget-gib", "nan"],
        ["--headroom-gib", "nan"],
        ["--headroom-gib", "inf"],
        ["--threads", "5000"],
        ["--model", ""],
        ["--hardware", " "],
    ],
)
def test_hostile_flag_values_are_usage_errors(
    capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    code, out, err = run(capsys, "--estimate-only", *args)
    assert code == 2 and out == ""
    _one_line_failure(err)


def test_a_repo_id_that_is_not_one_is_one_line(
    capsys: pytest.CaptureFixture[str], hub: FakeHub
) -> None:
    code, _, err = run(capsys, "--repo", "../../etc", "--estimate-only")
    assert code == 1
    _one_line_failure(err)
    assert "not a Hugging Face repo id" in err


def test_a_broken_remote_quant_does_not_hide_the_good_ones(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, hub: FakeHub
) -> None:
    repo = hub.add_repo("acme/Mixed-GGUF")
    good = llama8b_like(tmp_path, "Q4_K_M")
    repo.add(good.name, header_bytes(good))
    repo.add("Broken-Q8_0.gguf", b"GGUF" + b"\xff" * 64)
    hw = write_hardware(
        tmp_path / "hw.json", Hardware([], CPU("x", 8, 16, []), RAM(64 * GiB, 60 * GiB), GiB)
    )
    data = profile_json(capsys, "--repo", "acme/Mixed-GGUF", "--hardware", str(hw))
    assert data["plan"]["quant_file"] == good.name
    # Named explicitly, the broken file is the error.
    code, _, err = run(
        capsys, "--repo", "acme/Mixed-GGUF", "--file", "Broken-Q8_0.gguf", "--hardware", str(hw)
    )
    assert code == 1 and "Broken-Q8_0.gguf" in err
    _one_line_failure(err)


def test_text_output_keeps_hostile_names_off_the_terminal(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, default_model: Path
) -> None:
    hw = _good_hardware()
    hw["cpu"]["name"] = "Evil\x1b]0;pwned\x07CPU\nfake: line"
    hw["missing"] = ["nvml: \x1b[31mred\x1b[0m"]
    path = tmp_path / "hw.json"
    path.write_text(json.dumps(hw))
    model = tmp_path / os.fsdecode(b"caf\xe9.gguf")
    model.symlink_to(default_model)
    code, out, err = run(capsys, "--estimate-only", "--hardware", str(path), "--model", str(model))
    assert code == 0, err
    assert "\x1b" not in out and "\x07" not in out and "fake: line" not in out.splitlines()
    assert "Evil?]0;pwned?CPU?fake: line" in out
    out.encode("utf-8")  # printable on a strict UTF-8 terminal (no lone surrogates)
    assert "caf\ufffd.gguf" in out


def test_a_repo_with_thousands_of_files_reads_a_bounded_number_of_headers(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, hub: FakeHub
) -> None:
    from engine.planning.profile_cli import MAX_REMOTE_FILES

    repo = hub.add_repo("acme/Flood-GGUF")
    header = header_bytes(llama8b_like(tmp_path, "Q4_K_M"))
    for i in range(MAX_REMOTE_FILES + 20):
        repo.add(f"Flood-{i:04d}-Q4_K_M.gguf", header)
    hw = write_hardware(
        tmp_path / "hw.json", Hardware([], CPU("x", 8, 16, []), RAM(64 * GiB, 60 * GiB), GiB)
    )
    data = profile_json(capsys, "--repo", "acme/Flood-GGUF", "--hardware", str(hw))
    assert data["plan"]["quant_file"].startswith("Flood-")
    read = {
        r.path.rsplit("/", 1)[-1]
        for r in hub.requests
        if r.path.startswith("/cdn/acme/Flood-GGUF/")
    }
    assert 0 < len(read) <= MAX_REMOTE_FILES


def test_parallel_slots_reach_the_plan_and_split_caches_are_counted(
    capsys: pytest.CaptureFixture[str],
) -> None:
    auto = profile_json(capsys, "--estimate-only", "--ctx", "2048")
    assert auto["plan"]["load"]["n_parallel"] == 4 and auto["plan"]["load"]["kv_unified"] is True
    split = profile_json(
        capsys, "--estimate-only", "--ctx", "2048", "--parallel", "3", "--no-kv-unified"
    )
    assert split["plan"]["load"]["n_parallel"] == 3
    assert split["plan"]["load"]["kv_unified"] is False
    # Three caches of ctx/3 padded to 256 cells (768 each): 2304 cells against 2048.
    assert split["memory"]["kv"] * 2048 == auto["memory"]["kv"] * 2304
