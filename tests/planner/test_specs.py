"""Model and cluster files are never misread: each of these once parsed into something else without a word."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.planner.refusals import refused

MODEL = "layers: 2\nhidden: 64\nheads: 4\nffn_hidden: 256\nseq_len: 32\nvocab: 100\n"
CLUSTER = ("name: c\nnodes: 1\ngpus_per_node: 8\ndevice: a100-sxm4-80gb\n"
           "intra_node: {bandwidth_GBps: 300, latency_us: 5}\ninter_node: {bandwidth_GBps: 25, latency_us: 10}\n")


def plan_with(capsys, model: str = "gpt-tiny", cluster: str = "dgx-a100-80gb", *extra: str) -> str:
    return refused(capsys, "plan", "--model", model, "--cluster", cluster, "--global-batch", "8", *extra)


def test_a_yaml_key_given_twice_is_refused_naming_the_key_and_line(tmp_path, capsys):
    path = tmp_path / "m.yaml"
    path.write_text(MODEL + "layers: 4\n")  # YAML itself lets the last 'layers' win
    err = plan_with(capsys, str(path))
    assert f"{path}: layers: given twice (line 7)" in err


def test_a_key_given_twice_in_a_nested_cluster_mapping_is_refused(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(CLUSTER.replace("latency_us: 10}", "latency_us: 10, bandwidth_GBps: 1}"))
    assert "bandwidth_GBps: given twice" in plan_with(capsys, "gpt-tiny", str(path))


def test_a_json_key_given_twice_is_refused(tmp_path, capsys):
    path = tmp_path / "m.json"
    path.write_text('{"layers": 2, "hidden": 64, "heads": 4, "ffn_hidden": 256, "seq_len": 32, "vocab": 100, "heads": 8}')
    assert "heads: given twice" in plan_with(capsys, str(path))


def test_a_file_that_is_not_utf8_is_refused_naming_the_file(tmp_path, capsys):
    path = tmp_path / "m.yaml"
    path.write_bytes(MODEL.replace("layers", "l\xe4yers").encode("latin-1"))
    err = plan_with(capsys, str(path))
    assert f"{path}: not UTF-8 text (byte 0xe4 at offset 1)" in err  # the file as a whole: no field named


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", ".NaN"])
def test_nan_or_infinite_bandwidths_are_refused_not_made_free(tmp_path, capsys, value):
    path = tmp_path / "c.yaml"
    path.write_text(CLUSTER.replace("bandwidth_GBps: 25", f"bandwidth_GBps: {value}"))
    assert f"inter_node.bandwidth_GBps: expected a finite number" in plan_with(capsys, "gpt-tiny", str(path))


def test_gpus_per_node_auto_is_refused_on_a_gpu_cluster(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(CLUSTER.replace("gpus_per_node: 8", "gpus_per_node: auto"))
    err = plan_with(capsys, "gpt-tiny", str(path))
    assert "gpus_per_node: 'auto' means this machine's CPU count" in err and "'a100-sxm4-80gb'" in err


def test_gpus_per_node_auto_still_means_the_core_count_on_local_cpu():
    import os

    from planner.specs import load_cluster

    assert load_cluster("local-cpu").gpus_per_node == (os.cpu_count() or 1)
    assert load_cluster("local-cpu", gpus_per_node=2).gpus_per_node == 2


@pytest.mark.parametrize("value", ["NaN", "Infinity"])
def test_a_nan_peak_tflops_is_refused_before_the_solver_sees_it(tmp_path, capsys, value):
    from planner.specs import PROFILES_DIR

    text = (PROFILES_DIR / "devices" / "a100-sxm4-80gb.json").read_text()
    d = json.loads(text)
    path = tmp_path / "dev.json"
    path.write_text(text.replace(f'"peak_tflops": {json.dumps(d["peak_tflops"])}', f'"peak_tflops": {value}'))
    assert json.loads(path.read_text())["peak_tflops"] != d["peak_tflops"]  # the replacement happened
    err = plan_with(capsys, "gpt-tiny", "dgx-a100-80gb", "--nodes", "1", "--device", str(path))
    assert "peak_tflops: expected a finite number" in err


@pytest.mark.parametrize("gpu, gib, name", [
    ("NVIDIA H200", 140.4, "h200-sxm-141gb"),
    ("NVIDIA H100 80GB HBM3", 79.6, "h100-sxm5-80gb"),
    ("NVIDIA A100-SXM4-80GB", 80.0, "a100-sxm4-80gb"),
    ("NVIDIA B200", 179.1, "b200-sxm-180gb"),
    ("NVIDIA L40S", 45.0, "l40s-pcie-48gb"),
    ("NVIDIA GeForce RTX 4090", 23.6, "rtx4090-pcie-24gb"),
    ("NVIDIA A100-SXM4-40GB", 39.4, None),  # another memory
    ("NVIDIA H100 PCIe", 79.6, None),  # another form factor: other clocks and links
    ("NVIDIA H200 NVL", 139.8, None),
    ("NVIDIA GH200 480GB", 139.8, None),  # another chip whose name contains h200
    ("NVIDIA GeForce RTX 4090 D", 23.6, None),  # a slower variant of the chip
])
def test_a_gpu_is_named_after_its_datasheet_so_the_presets_use_its_measured_profile(gpu, gib, name):
    from planner.datasheets import datasheet_for

    assert datasheet_for(gpu, gib) == name


def _device_file(tmp_path, **changes) -> str:
    """The H100 datasheet with `changes`, as a device file."""
    from planner.specs import PROFILES_DIR

    data = {**json.loads((PROFILES_DIR / "devices" / "h100-sxm5-80gb.json").read_text()), **changes}
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("changes, field", [
    ({"memory_efficiency": 0}, "memory_efficiency"),  # was a ZeroDivisionError in compute.memory_s
    ({"memory_efficiency": 3.0}, "memory_efficiency"),
    ({"framework_overhead_gib": -5}, "framework_overhead_gib"),
    ({"framework_overhead_gib": 500}, "framework_overhead_gib"),  # more than the device's 79.6 GiB
    ({"dtype": "fp16x"}, "dtype"),  # was priced as 2 bytes
    ({"gemm_efficiency": [{"gflop": 1000, "efficiency": 0.5}, {"gflop": 0.1, "efficiency": 0.1}]}, "gemm_efficiency[1].gflop"),
    ({"fp8_gemm_efficiency": [{"gflop": 1, "efficiency": 0.5}, {"gflop": 1, "efficiency": 0.6}]}, "fp8_gemm_efficiency[1].gflop"),
    ({"fp8_peak_tflops": 0}, "fp8_gemm_efficiency"),  # the H100's fp8 curve, a fraction of no peak: was kept unread
    ({"measured": {"optimizer_s_per_param": 1e-9}}, "measured"),  # a datasheet's optimizer step was read from it
])
def test_a_device_file_with_memory_efficiency_0_or_another_field_out_of_range_is_refused_naming_the_field(tmp_path, capsys, changes, field):
    path = _device_file(tmp_path, **changes)
    err = refused(capsys, "predict", "--model", "gpt-tiny", "--cluster", "dgx-h100-80gb", "--nodes", "1", "--device", path,
                  "--global-batch", "8", "--tp", "1", "--pp", "1", "--dp", "8", "--micro-batch", "1")
    assert f"{path}: {field}: " in err


def test_every_committed_device_profile_passes_the_checks_at_load():
    from planner.specs import PROFILES_DIR, load_device

    paths = sorted((PROFILES_DIR / "devices").glob("*.json"))
    assert len(paths) >= 7
    for path in paths:
        assert load_device(str(path)).name == path.name.removesuffix(".json").removesuffix(".measured")


def test_a_cluster_files_relative_device_file_is_read_from_the_cluster_files_folder(tmp_path, monkeypatch, capsys):
    from planner.cli import main

    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "c.yaml").write_text(CLUSTER.replace("device: a100-sxm4-80gb", "device: mine.json"))
    (folder / "mine.json").write_text(Path(_device_file(tmp_path, name="mine")).read_text())
    monkeypatch.chdir(tmp_path)  # not the cluster file's folder
    assert main(["plan", "--model", "gpt-tiny", "--cluster", "site/c.yaml", "--global-batch", "8", "--top", "1"]) == 0
    assert capsys.readouterr().out.startswith("gpt-tiny (seq 128) on 8 x mine (")  # the device's name, not its path


def test_a_cluster_files_missing_device_file_is_refused_naming_the_path_tried(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(CLUSTER.replace("device: a100-sxm4-80gb", "device: gone.json"))
    err = plan_with(capsys, "gpt-tiny", str(path))
    assert f"{path}: device: no device profile file {tmp_path.resolve() / 'gone.json'} (a relative path is read from the cluster file's folder)" in err


@pytest.mark.parametrize("extra, said", [
    (("--model", "no-such-model"), "error: --model: unknown preset 'no-such-model'"),
    (("--seq-len", "64"), "error: --seq-len: gpt-tiny has learned positions"),
    (("--global-batch", "100000"), "error: --global-batch: 100,000 sequences is above"),
    (("--memory-headroom", "100"), "error: --memory-headroom: 100 GiB leaves nothing"),
])
def test_a_flags_error_names_the_flag_once_not_again_as_its_field(capsys, extra, said):
    # Was `--model: model: unknown preset ...`: the flag is the field's name already.
    err = plan_with(capsys, "gpt-tiny", "dgx-a100-80gb", *extra)
    assert err.startswith(said), err


def test_an_error_in_a_file_still_names_the_file_and_then_the_field(tmp_path, capsys):
    path = tmp_path / "heads.yaml"  # a file named like a field is still a file
    path.write_text(MODEL.replace("heads: 4", "heads: 5"))
    assert f"{path}: heads: hidden 64 is not divisible by heads 5" in plan_with(capsys, str(path))


@pytest.mark.parametrize("flag, typed, meant", [("--model", "gpt3-175bb", "gpt3-175b"), ("--model", "GPT3-175B", "gpt3-175b"),
                                                ("--cluster", "dgx-a100-80g", "dgx-a100-80gb"),
                                                ("--device", "h100", "h100-sxm5-80gb")])
def test_a_misspelled_model_cluster_or_device_suggests_the_nearest_preset(capsys, flag, typed, meant):
    err = plan_with(capsys, "gpt-tiny", "dgx-a100-80gb", flag, typed)
    assert f"{flag}: unknown {'device' if flag == '--device' else 'preset'} {typed!r} (did you mean {meant!r}?); expected one of " in err


def test_an_unknown_device_flag_is_the_flags_error_even_on_a_cluster_that_counts_this_machines_cores(capsys):
    # local-cpu's gpus_per_node 'auto' is for device cpu only: that refusal said nothing of the name being unknown.
    assert "--device: unknown device 'h100-sxm' (did you mean 'h100-sxm5-80gb'?)" in plan_with(capsys, "gpt-tiny", "local-cpu", "--device", "h100-sxm")


def test_a_name_like_no_preset_gets_no_suggestion(capsys):
    assert "unknown preset 'zzz'; expected one of gpt-1.7b," in plan_with(capsys, "zzz")
