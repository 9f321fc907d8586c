"""The planner CLI: outputs, files, and one clear line for every kind of bad input."""

import json
import subprocess
import sys

import pytest

from planner.cli import main
from planner.plan import load_plan
from tests.planner.refusals import refused


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def run_argparse(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    return e.value.code, capsys.readouterr().err


TINY = ("--model", "gpt-tiny", "--cluster", "local-cpu", "--gpus-per-node", "2", "--global-batch", "16")


def test_planner_imports_no_torch_even_when_planning():
    code = ("import sys; from planner.cli import main; "
            "main(['plan', '--model', 'gpt3-1.3b', '--cluster', 'dgx-a100-80gb', '--nodes', '2', '--global-batch', '64', '--json']); "
            "assert 'torch' not in sys.modules, 'planner imported torch'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_profile_without_torch_says_in_one_line_what_to_install(capsys, monkeypatch, tmp_path):
    # As after `pip install .` without [runtime]: `import torch` fails inside runtime.profile's own import.
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.delitem(sys.modules, "runtime.profile", raising=False)
    from tests.planner.refusals import refused

    err = refused(capsys, "profile", "--device", "cpu", "--quick", "--out", str(tmp_path / "p.json"))
    assert "needs torch" in err and "pip install 'meshplan[runtime]'" in err
    assert "runtime.profile" not in sys.modules and not any(tmp_path.iterdir())  # the real import failed; nothing written


def test_plan_json_lists_ranked_plans_and_out_writes_a_loadable_plan(tmp_path, capsys):
    out = tmp_path / "plan.json"
    code, stdout, _ = run(capsys, "plan", *TINY, "--json", "--out", str(out))
    assert code == 0
    d = json.loads(stdout)
    assert d["searched"] > 10 and d["search_s"] > 0
    assert d["bounded"] == d["searched"] >= d["split"] >= d["priced"] >= 1 and d["complete"] and d["gap_pct"] == 0
    times = [p["prediction"]["iteration_s"] for p in d["plans"]]
    assert times == sorted(times)
    plan = load_plan(out)
    assert plan.id == d["plans"][0]["id"] and plan.prediction.fits
    assert plan.tp * plan.pp * plan.dp == 2


def test_plan_pins_a_knob_and_searches_the_rest(capsys):
    code, stdout, _ = run(capsys, "plan", *TINY, "--json", "--pp", "2", "--schedule", "gpipe")
    assert code == 0
    assert all(p["pp"] == 2 and p["schedule"] == "gpipe" for p in json.loads(stdout)["plans"])


def test_predict_json_has_the_prediction_fields(capsys):
    code, stdout, _ = run(capsys, "predict", "--model", "gpt3-175b", "--cluster", "dgx-a100-80gb", "--global-batch", "1536",
                          "--tp", "8", "--pp", "8", "--dp", "8", "--micro-batch", "1", "--recompute", "full", "--json")
    assert code == 0
    p = json.loads(stdout)
    for key in ("iteration_s", "tokens_per_s", "tflops_per_gpu", "mfu", "peak_memory_gib", "fits", "breakdown"):
        assert key in p
    assert p["fits"] and 0 < p["mfu"] < 1
    assert sum(p["breakdown"].values()) == pytest.approx(p["iteration_s"], rel=1e-6)


def test_table_output_names_the_best_plan_and_how_to_run_it(tmp_path, capsys):
    out = tmp_path / "p.json"
    code, stdout, _ = run(capsys, "plan", *TINY, "--out", str(out))
    assert code == 0
    assert "Ranked plans" in stdout and f"torchrun --nnodes 1 --nproc-per-node 2 --standalone -m runtime.launch {out}" in stdout
    assert main(["launch", str(out), "--print"]) == 0  # the same command planner launch prints
    assert f"--nnodes 1 --nproc-per-node 2 --standalone -m runtime.launch {out}" in capsys.readouterr().out


def test_a_model_that_fits_nowhere_says_which_stage_and_how_much_over(capsys):
    code, stdout, err = run(capsys, "plan", "--model", "gpt3-175b", "--cluster", "dgx-a100-80gb", "--nodes", "1", "--global-batch", "8")
    assert code == 1
    assert "no plan fits" in err and "GiB over" in err
    # The closest configurations come closest first, each reason says which one it is, and the error names the first.
    reasons = [line.strip() for line in stdout.splitlines() if line.strip().startswith("#") and "GiB over" in line]
    needs = [float(r.split(" needs ")[1].split(" GiB")[0]) for r in reasons]
    assert len(reasons) == 5 and needs == sorted(needs) and all(" recompute " in r for r in reasons)
    assert reasons[0].startswith("#1 ") and reasons[0].split(": ", 1)[1] in err


@pytest.mark.parametrize("argv, field", [
    (("plan", "--model", "no-such-model", "--cluster", "local-cpu", "--global-batch", "8"), "unknown preset 'no-such-model'"),
    (("plan", "--model", "gpt-tiny", "--cluster", "no-such-cluster", "--global-batch", "8"), "unknown preset 'no-such-cluster'"),
    (("plan", *TINY, "--device", "no-such-device"), "unknown device 'no-such-device'"),
    (("predict", *TINY, "--tp", "3", "--pp", "1", "--dp", "1", "--micro-batch", "1"), "tp"),
    (("predict", *TINY, "--tp", "2", "--pp", "1", "--dp", "1", "--micro-batch", "3"), "global_batch"),
    (("predict", *TINY, "--tp", "1", "--pp", "1", "--dp", "1", "--micro-batch", "1"), "tp 1 x pp 1 x dp 1 = 1"),
    (("predict", "--model", "gpt-tiny", "--cluster", "local-cpu", "--gpus-per-node", "16", "--global-batch", "16",
      "--tp", "1", "--pp", "16", "--dp", "1", "--micro-batch", "1"), "fewer than pp"),
])
def test_bad_knobs_give_one_line_naming_the_field(capsys, argv, field):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("error: ") and field in err and err.count("\n") == 1 and "Traceback" not in err


def test_heads_not_divisible_by_tp_says_so(capsys):
    code, _, err = run(capsys, "predict", "--model", "gpt3-1.3b", "--cluster", "dgx-a100-80gb", "--nodes", "1", "--global-batch", "64",
                       "--tp", "3", "--pp", "1", "--dp", "1", "--micro-batch", "1", "--gpus-per-node", "3")
    assert code == 2 and "heads 16 are not divisible by tp 3" in err


@pytest.mark.parametrize("text, field", [
    ("layers: [1, 2\n", "malformed YAML at line"),
    ("layers: 0\nhidden: 64\nheads: 4\nffn_hidden: 256\nseq_len: 32\nvocab: 100\n", "layers: must be positive, got 0"),
    ("layers: -2\nhidden: 64\nheads: 4\nffn_hidden: 256\nseq_len: 32\nvocab: 100\n", "layers: must be positive"),
    ("layers: 2\nhidden: 64\nheads: 5\nffn_hidden: 256\nseq_len: 32\nvocab: 100\n", "heads: hidden 64 is not divisible by heads 5"),
    ("layers: 2\nhidden: 64\nheads: 4\nffn_hidden: 256\nseq_len: 32\n", "vocab: missing"),
    ("layers: 2\nhidden: 64\nheads: 4\nffn_hidden: 256\nseq_len: 32\nvocab: 100\nwidth: 3\n", "width: unknown key"),
    ("layers: two\nhidden: 64\nheads: 4\nffn_hidden: 256\nseq_len: 32\nvocab: 100\n", "layers: expected an integer"),
])
def test_bad_model_yaml_names_the_field(tmp_path, capsys, text, field):
    path = tmp_path / "model.yaml"
    path.write_text(text)
    code, _, err = run(capsys, "plan", "--model", str(path), "--cluster", "local-cpu", "--global-batch", "8")
    assert code == 2 and field in err and str(path) in err and "Traceback" not in err


def test_bad_cluster_yaml_names_the_field(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nnodes: 2\ngpus_per_node: 8\ndevice: a100-sxm4-80gb\nintra_node: {bandwidth_GBps: -1, latency_us: 1}\ninter_node: {bandwidth_GBps: 1, latency_us: 1}\n")
    code, _, err = run(capsys, "plan", "--model", "gpt-tiny", "--cluster", str(path), "--global-batch", "8")
    assert code == 2 and "intra_node.bandwidth_GBps: must be positive" in err


@pytest.mark.parametrize("flag", ["--global-batch", "--nodes"])
def test_zero_or_negative_sizes_are_refused_by_the_parser(capsys, flag):
    argv = ["plan", "--model", "gpt-tiny", "--cluster", "local-cpu", "--global-batch", "8"]
    argv += [flag, "0"] if flag != "--global-batch" else []
    if flag == "--global-batch":
        argv[-1] = "-4"
    code, err = run_argparse(capsys, *argv)
    assert code == 2 and flag in err and "must be positive" in err


def test_plan_file_of_unknown_version_is_refused(tmp_path):
    from planner.errors import SpecError

    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"version": 7}))
    with pytest.raises(SpecError, match="version: plan version 7 is not supported"):
        load_plan(path)


def test_validate_with_a_missing_results_file_says_so(tmp_path, capsys):
    code, _, err = run(capsys, "validate", str(tmp_path / "nope.jsonl"))
    assert code == 1


def test_validate_given_a_plan_file_says_so_in_one_line_and_how_to_get_a_results_file(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert main(["plan", *TINY, "--out", str(plan)]) == 0 and plan.read_text().count("\n") > 10  # multi-line JSON
    capsys.readouterr()
    code, stdout, _ = run(capsys, "validate", str(plan), "--json")
    assert code == 1
    assert json.loads(stdout)["skipped"] == [f"{plan}: a plan file (plan.json), not a results file; run the plan with runtime.launch's "
                                             f"--results FILE (`planner launch {plan} --print -- --results run.jsonl` prints the "
                                             "torchrun command), then validate that file"]


def test_validate_given_a_directory_or_a_binary_file_says_which_in_one_line(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "a.jsonl").write_text("")
    (tmp_path / "empty").mkdir()
    (tmp_path / "blob").write_bytes(b"\xd0\xff\x00\n\xfe\n")
    code, stdout, _ = run(capsys, "validate", str(tmp_path / "runs"), str(tmp_path / "empty"), str(tmp_path / "blob"), "--json")
    runs, empty, blob = json.loads(stdout)["skipped"]
    assert code == 1 and "no such results file" not in runs + empty
    assert runs == f"{tmp_path / 'runs'}: a directory, not a results file; give the results files in it: {tmp_path / 'runs'}/*.jsonl (1 here)"
    assert "a directory" in empty and "it holds no results files (*.jsonl)" in empty
    assert blob.startswith(f"{tmp_path / 'blob'}: not a text file")


def test_validate_given_a_text_file_with_no_json_line_says_so_in_one_line_not_one_per_line(tmp_path, capsys):
    # `planner validate README.md` printed a line for each of its 1,044 lines.
    (notes := tmp_path / "notes.md").write_text("# Notes\n\nsome text\nmore text\n")
    (torn := tmp_path / "torn.jsonl").write_text('{"plan_id": "ab')  # one torn line keeps its own message
    code, stdout, _ = run(capsys, "validate", str(notes), str(torn), "--json")
    skipped = json.loads(stdout)["skipped"]
    assert code == 1 and len(skipped) == 2
    assert skipped[0] == f"{notes}: none of its 3 lines is JSON, so it is not a results file (one JSON line per run, as runtime.launch --results writes them)"
    assert "line 1 is not valid JSON" in skipped[1]


@pytest.mark.parametrize("command", [("export", "--to", "megatron"), ("launch",)])
def test_export_and_launch_given_a_directory_or_a_json_file_that_is_no_plan_say_which(tmp_path, capsys, command):
    from tests.planner.refusals import refused

    assert "is a directory, not a plan file" in refused(capsys, *command, str(tmp_path))
    (tmp_path / "foo.json").write_text('{"foo": 1}')
    err = refused(capsys, *command, str(tmp_path / "foo.json"))
    assert "version: no version field: not a meshplan plan file" in err and "None" not in err


def test_validate_skips_a_torn_line_and_a_plan_that_no_longer_parses_and_reports_the_rest(tmp_path, capsys):
    import dataclasses

    from planner.cost import predict
    from planner.plan import Knobs, plan_to_dict
    from planner.specs import load_cluster, load_device, load_model

    cluster = load_cluster("local-cpu", gpus_per_node=2)
    plan, _ = predict(load_model("gpt-tiny"), cluster, load_device("cpu"), Knobs(1, 1, 2, 4), 16)
    good = {"plan_id": plan.id, "plan": plan_to_dict(plan), "device": "cpu (gloo)", "world_size": 2, "steps": 3,
            "step_s": [2.0, 1.0, 1.1], "tokens_per_s": 16 * 128 / 1.05, "losses": [5.0, 4.9, 4.8],
            "peak_memory_gib": [0.5, 0.5], "predicted": None, "started_at": "2026-11-24T00:00:00+00:00", "meshplan_version": "0.1.0"}
    stale = json.loads(json.dumps(good))
    stale["plan"]["version"] = 0
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(stale) + "\n" + json.dumps(good)[:40])
    code, stdout, _ = run(capsys, "validate", str(path), "--json")
    assert code == 0
    report = json.loads(stdout)
    assert len(report["runs"]) == 1 and report["runs"][0]["repeats"] == 1
    assert report["runs"][0]["measured_step_s"] == pytest.approx(1.05)
    skipped = " | ".join(report["skipped"])
    assert "r.jsonl:2 plan: version" in skipped and "no longer parses" in skipped
    assert "line 3 is not valid JSON (torn last line" in skipped


def test_memory_headroom_decides_what_fits_and_its_default_is_in_the_help(capsys):
    args = ("predict", "--model", "gpt3-175b", "--cluster", "dgx-a100-80gb", "--nodes", "64", "--global-batch", "1536",
            "--tp", "8", "--pp", "8", "--dp", "8", "--micro-batch", "1", "--recompute", "selective", "--sequence-parallel", "--json")
    peak = json.loads(run(capsys, *args)[1])["peak_memory_gib"]
    below, above = 80 - peak - 0.5, 80 - peak + 0.5
    assert json.loads(run(capsys, *args, "--memory-headroom", f"{below:.2f}")[1])["fits"]
    tight = json.loads(run(capsys, *args, "--memory-headroom", f"{above:.2f}")[1])
    assert not tight["fits"] and "headroom" in tight["reason"]
    code, err = run_argparse(capsys, "plan", *TINY, "--memory-headroom", "-1")
    assert code == 2 and "--memory-headroom" in err
    # A headroom of the whole device leaves no usable memory: refused, not priced as '-20 GiB usable'.
    for command in (args[:-1], ("plan", *args[1:9])):
        err = refused(capsys, *command, "--memory-headroom", "100")
        assert "--memory-headroom" in err and "leaves nothing of the 80 GiB" in err
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    assert "default 2 GiB" in capsys.readouterr().out


def test_the_default_headroom_on_a_device_smaller_than_it_is_refused_in_plan_predict_and_compare(tmp_path, capsys):
    from planner.specs import PROFILES_DIR

    small = json.loads((PROFILES_DIR / "devices" / "cpu.json").read_text()) | {"memory_gib": 1.5, "framework_overhead_gib": 0.1}
    path = tmp_path / "small.json"
    path.write_text(json.dumps(small))
    where = ("--model", "gpt-tiny", "--cluster", "local-cpu", "--gpus-per-node", "2", "--device", str(path), "--global-batch", "8")
    for command in (("plan", *where), ("predict", *where, "--tp", "1", "--pp", "1", "--dp", "2", "--micro-batch", "1"),
                    ("compare", *where, "--tokens", "1M")):
        err = refused(capsys, *command)
        assert "--memory-headroom (default): 2 GiB leaves nothing of the 1.5 GiB" in err, command
    assert run(capsys, "plan", *where, "--memory-headroom", "0.5")[0] == 0


def test_a_search_cut_short_says_how_much_faster_the_best_plan_may_be(capsys):
    from planner.report import print_plans
    from planner.search import search
    from planner.specs import load_cluster, load_device, load_model

    r = search(load_model("gpt-tiny"), load_cluster("local-cpu", gpus_per_node=2), load_device("cpu"), 16, top=3)
    import dataclasses

    print_plans(dataclasses.replace(r, complete=False, gap_pct=12.34), out=None)
    assert "may be up to 12.3% faster" in capsys.readouterr().out


def test_a_search_cut_short_with_its_best_plan_proven_says_so_and_not_that_it_may_be_0_percent_faster(capsys):
    from planner.search import search
    from planner.specs import load_cluster, load_device, load_model

    args = (load_model("gpt3-13b"), load_cluster("dgx-a100-80gb", nodes=4), load_device("a100-sxm4-80gb"), 256)
    assert main(["plan", "--model", "gpt3-13b", "--cluster", "dgx-a100-80gb", "--nodes", "4", "--global-batch", "256",
                 "--time-limit", "0"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "The first plan is proven the fastest" in said and "0.0% faster" not in said
    assert "Every configuration is bounded first, whatever the limit" in said and "over the 0 s limit" in said
    assert search(*args, top=1).plans[0].id in said  # the proven best is the one shown


def test_a_device_override_is_the_device_the_plan_records_so_validate_prices_it_on_that_device(tmp_path, capsys):
    from planner.specs import PROFILES_DIR, load_device

    args = ("--model", "gpt3-13b", "--cluster", "dgx-h100-80gb", "--nodes", "1", "--global-batch", "64")
    for device, recorded in (("h200-sxm-141gb", "h200-sxm-141gb"),
                             (str(PROFILES_DIR / "devices" / "h200-sxm-141gb.json"), str(PROFILES_DIR / "devices" / "h200-sxm-141gb.json"))):
        out = tmp_path / "plan.json"
        assert run(capsys, "predict", *args, "--tp", "1", "--pp", "1", "--dp", "8", "--micro-batch", "1", "--device", device,
                   "--out", str(out))[0] == 0
        plan = load_plan(str(out))
        assert plan.cluster.device == recorded and plan.profile.startswith("h200-sxm-141gb")
        assert load_device(plan.cluster.device).memory_gib > 100  # the H200's 141 GB, not the cluster file's H100


def test_every_framework_has_a_label_and_is_a_choice_of_the_framework_flag(capsys):
    from planner.export import EXPORTERS
    from planner.frameworks import EXPORT_TARGETS, FRAMEWORKS, LABELS

    assert list(LABELS) == list(FRAMEWORKS)
    assert set(EXPORT_TARGETS) <= set(FRAMEWORKS) and set(EXPORT_TARGETS.values()) <= set(EXPORTERS)
    code, err = run_argparse(capsys, "plan", *TINY, "--framework", "no-such")
    assert code == 2 and all(name in err for name in FRAMEWORKS)


@pytest.mark.parametrize("pins, said", [
    (("--tp", "3"), "tp 3 does not divide the cluster's 512 devices"),
    (("--tp", "8", "--pp", "128"), "tp 8 x pp 128 = 1024 does not divide the cluster's 512 devices"),
    (("--tp", "2", "--cp", "2", "--pp", "2", "--dp", "2"), "tp 2 x cp 2 x pp 2 x dp 2 = 16 does not equal the cluster's 512"),
    (("--micro-batch", "7"), "micro_batch: global batch 1536 is not divisible by micro_batch 7")])
def test_pins_no_configuration_satisfies_are_named_as_given_without_degrees_the_user_did_not_give(capsys, pins, said):
    err = refused(capsys, "plan", "--model", "gpt3-175b", "--cluster", "dgx-a100-80gb", "--global-batch", "1536", *pins)
    assert said in err and "dp 170" not in err and "dp 512" not in err


def test_seq_len_trains_a_rope_model_on_shorter_sequences_shown_in_the_header_and_is_refused_for_learned_positions(capsys, tmp_path):
    # A Hugging Face config's seq_len is max_position_embeddings (Qwen2-7B's 131,072) and nothing could override it.
    code, out, _ = run(capsys, "plan", "--model", "llama3-8b", "--seq-len", "4096", "--cluster", "dgx-h100-80gb", "--nodes", "1",
                       "--global-batch", "64", "--top", "1", "--out", str(tmp_path / "p.json"))
    assert code == 0 and out.startswith("llama3-8b (seq 4,096) on 8 x h100-sxm5-80gb")
    assert load_plan(str(tmp_path / "p.json")).model.seq_len == 4096
    d = json.loads(run(capsys, "predict", "--model", "llama3-8b", "--seq-len", "4096", "--cluster", "dgx-h100-80gb", "--nodes", "1",
                       "--global-batch", "64", "--tp", "1", "--pp", "1", "--dp", "8", "--micro-batch", "1", "--zero", "3", "--json")[1])
    assert d["tokens_per_s"] * d["iteration_s"] == pytest.approx(64 * 4096)
    err = refused(capsys, "plan", "--model", "gpt3-1.3b", "--seq-len", "4096", "--cluster", "dgx-a100-80gb", "--global-batch", "64")
    assert "--seq-len: gpt3-1.3b has learned positions, a 2,048 x hidden table" in err
    assert "has learned positions" in refused(capsys, "compare", "--model", "gpt3-1.3b", "--seq-len", "1024", "--global-batch", "64",
                                              "--tokens", "1T", "--cluster", "dgx-a100-80gb")


def test_python_dash_m_planner_runs_the_same_cli_and_passes_on_its_exit_code():
    ok = subprocess.run([sys.executable, "-m", "planner", "--version"], capture_output=True, text=True)
    bad = subprocess.run([sys.executable, "-m", "planner", "plan", "--model", "zzz", "--cluster", "local-cpu", "--global-batch", "8"],
                         capture_output=True, text=True)
    assert ok.returncode == 0 and "meshplan" in ok.stdout + ok.stderr
    assert bad.returncode == 2 and bad.stderr.startswith("error: --model: unknown preset 'zzz'")
