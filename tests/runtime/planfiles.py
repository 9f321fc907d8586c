"""Hand-written plan.json files for runtime tests (until the planner writes them)."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from planner.specs import load_model

TINY = {"name": "test-tiny", "layers": 4, "hidden": 64, "heads": 4, "ffn_hidden": 256, "seq_len": 32, "vocab": 256}
LLAMA_TINY = dataclasses.asdict(load_model("llama-tiny"))
LLAMA_TEST = {**LLAMA_TINY, "name": "llama-test", "hidden": 128, "ffn_hidden": 352, "seq_len": 64, "vocab": 4096}
"""llama-tiny at half its width, sequence and vocabulary, for the parity tests: the same family (GQA with 8
query heads to 2 K/V heads, SwiGLU at about 8/3 h, RMSNorm, RoPE, no biases), the same 8 layers, and about the same
share of its weights in the embedding (21% against 22%, which decides how ZeRO-1 can split whole tensors over 4
ranks). Its steps have 1/8 of llama-tiny's FLOPs: six two-rank layouts of test_parity ran in 39 s against 67 s.
Its tensor-parallel layouts run test_parity's 3 short steps: over 5 steps, at the rate its loss needs to fall in
5, their gradient norms drifted from one process's by up to 6.2e-5 (llama-tiny's: 7.7e-6), too near the tests'
1e-4 to hold on another CPU; in the 3 short steps, by at most 7e-6."""
MODELS = {"test-tiny": TINY, "llama-test": LLAMA_TEST, "llama-test-tied": {**LLAMA_TEST, "tie_embeddings": True}}
CLUSTER = {"name": "local-cpu", "nodes": 1, "gpus_per_node": 4, "device": "cpu",
           "intra_node": {"bandwidth_GBps": 2.0, "latency_us": 50.0},
           "inter_node": {"bandwidth_GBps": 1.0, "latency_us": 100.0}}


def even_stages(layers: int, n: int) -> list[list[int]]:
    edges = [round(i * layers / n) for i in range(n + 1)]
    return [[edges[i], edges[i + 1]] for i in range(n)]


def plan_dict(*, tp=1, cp=1, pp=1, dp=1, micro_batch=2, num_microbatches=4, schedule="1f1b", virtual_stages=1,
              sequence_parallel=False, zero=0, precision="bf16", compile=False, layers=None, recompute="none",
              recompute_layers=None, model=None) -> dict:
    """A version-1 plan; `layers` gives the [first, last) range of each stage (even split by default)."""
    model = dict(model or TINY)
    n = pp * virtual_stages
    ranges = layers or even_stages(model["layers"], n)
    stages = [{"layers": list(r), "embedding": i == 0, "head": i == n - 1, "recompute": recompute,
               "recompute_layers": recompute_layers, "memory_gib": 0.0} for i, r in enumerate(ranges)]
    return {"version": 1, "id": "", "created_by": "meshplan tests", "model": model,
            "cluster": CLUSTER, "global_batch": micro_batch * num_microbatches * dp, "micro_batch": micro_batch,
            "num_microbatches": num_microbatches, "tp": tp, "cp": cp, "pp": pp, "dp": dp, "schedule": schedule,
            "virtual_stages": virtual_stages, "sequence_parallel": sequence_parallel, "zero": zero,
            "distributed_optimizer": zero >= 1, "precision": precision, "compile": compile, "stages": stages,
            "prediction": None, "profile": "cpu (datasheet)"}


def write_plan(path: Path, **knobs) -> Path:
    path = Path(path)
    path.write_text(json.dumps(plan_dict(**knobs)))
    return path


# ---------------------------------------------------------------- running plans on spawned ranks

PARITY_STEPS = 4
"""Steps each parallel layout of test-tiny runs in the parity tests."""
LLAMA_STEPS = 5
"""Steps each parallel layout of llama-test without tensor parallelism runs."""
REFERENCE_STEPS = 30
"""Steps of the single-process run that shows the loss falling a long way on the synthetic stream."""
SMALL_VOCAB = 64
"""Token ids that the llama-test runs' data uses (of its 4,096)."""
LLAMA_WARMUP = ("--lr-warmup-steps", "2")
"""At the full rate from step 1 (the default for 5 steps), llama-tiny's first Adam step overshot on the 64-token
stream: the loss went up at step 2, then fell. So the llama-test runs warm up over 2 steps."""
DATA_FLAGS = {"llama-test": LLAMA_WARMUP + ("--lr", "4e-3"), "llama-test-tied": LLAMA_WARMUP + ("--lr", "2e-3")}
"""What a model's runs (each layout and its single-process reference) add to launch's defaults: llama-test trains
on small_vocab_tokens(), test-tiny on the synthetic stream with no flags. The peak rates are where the loss falls at
every step. llama-test at 4e-3: 1.6 nats in 5 steps, 0.8 in the 3 of test_parity's short runs; at launch's default
of 1e-3 its loss stalls after 3 steps (8.35, 8.10, 7.84, 7.82, 7.84). Tied, one matrix takes both updates: at
4e-3 its loss rises at step 3 of 5; at 2e-3 it falls by 0.54 nats in the 3 short steps."""


def data_flags(model: str) -> tuple:
    if model not in DATA_FLAGS:
        return ()
    return ("--data", small_vocab_tokens(), *DATA_FLAGS[model])


def launch(*argv) -> int:
    """Runs on each spawned rank: the real front door, runtime.launch.cli, with these arguments."""
    from runtime.launch import cli

    return cli([str(a) for a in argv])


def _layout_port(port_file: Path, timeout_s: float = 600.0) -> int:
    """The port of one layout's process group, picked by rank 0 just before the layout starts (so that nothing
    else on the machine has had minutes to take it) and read by the other ranks from `port_file`."""
    from runtime.machine import free_port

    if os.environ["RANK"] == "0":
        port = free_port()
        tmp = port_file.with_suffix(".tmp")
        tmp.write_text(str(port))
        os.replace(tmp, port_file)
        return port
    end = time.monotonic() + timeout_s
    while not port_file.exists():
        if time.monotonic() > end:
            raise RuntimeError(f"rank 0 wrote no port to {port_file} within {timeout_s:.0f} s")
        time.sleep(0.01)
    return int(port_file.read_text())


def launch_each(runs: list) -> list[dict]:
    """Runs on each spawned rank: runtime.launch.cli once per (port file, argv) of `runs`, one after another in
    this process, each with a process group of its own on a port rank 0 picks as it starts (_layout_port). Per
    run: the exit code, how many gradient reduce-scatters this rank issued and how many graphs torch.compile made."""
    import torch._dynamo.utils
    import torch.distributed as dist

    from runtime.launch import cli

    calls = [0]
    name = "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else "reduce_scatter_tensor"
    original = getattr(dist, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    setattr(dist, name, counted)  # FSDP2 looks the collective up on torch.distributed at each call
    out = []
    try:
        for port_file, argv in runs:
            os.environ["MASTER_PORT"] = str(_layout_port(Path(port_file)))
            calls[0], graphs = 0, torch._dynamo.utils.counters["stats"]["unique_graphs"]
            code = cli([str(a) for a in argv])
            out.append({"code": code, "reduce_scatters": calls[0],
                        "compiled_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs})
    finally:
        setattr(dist, name, original)
    return out


def run_layouts(tmp: Path, layouts: dict[str, dict], steps: int, extra: tuple = ()) -> dict[str, dict]:
    """Several layouts of the same world size, in one spawn of its ranks (launch_each): {name: its results line, plus
    'reduce_scatters' and 'compiled_graphs', rank by rank}. Each layout's knobs may name its `model` (run_layout's) and
    its own `steps` and runtime.launch `flags` (instead of `extra`)."""
    from tests.conftest import run_on_ranks

    tmp = Path(tmp)
    worlds = {k.get("tp", 1) * k.get("cp", 1) * k.get("pp", 1) * k.get("dp", 1) for k in layouts.values()}
    assert len(worlds) == 1, f"one world size per spawn, got {worlds}"
    runs = []
    for name, knobs in layouts.items():
        knobs = dict(knobs)
        model = knobs.pop("model", "test-tiny")
        layout_steps, flags = knobs.pop("steps", steps), knobs.pop("flags", extra)
        plan = write_plan(tmp / f"{name}.json", model=MODELS[model], **knobs)
        data = data_flags(model)
        (tmp / f"{name}.port").unlink(missing_ok=True)  # a port file is rank 0's word that this layout starts
        runs.append((tmp / f"{name}.port", [plan, "--steps", layout_steps, "--results", tmp / f"{name}.jsonl", *data, *flags]))
    world = worlds.pop()
    per_rank = run_on_ranks(launch_each, world, runs, timeout_s=900)
    out = {}
    for i, name in enumerate(layouts):
        assert [r[i]["code"] for r in per_rank] == [0] * world, (name, per_rank)
        out[name] = {**last_result(tmp / f"{name}.jsonl"), "reduce_scatters": [r[i]["reduce_scatters"] for r in per_rank],
                     "compiled_graphs": [r[i]["compiled_graphs"] for r in per_rank]}
    return out


def last_result(path: Path) -> dict:
    return json.loads(Path(path).read_text().splitlines()[-1])


@functools.lru_cache(maxsize=None)
def _scratch() -> tempfile.TemporaryDirectory:
    """Where the session-cached files (token stream, reference runs) live; removed when the test session ends.
    Made on first use: spawned ranks import this module too, and leave through os._exit, which skips cleanup."""
    return tempfile.TemporaryDirectory(prefix="meshplan-tests-")


@functools.lru_cache(maxsize=None)
def small_vocab_tokens() -> Path:
    """A uint16 token file (runtime.launch --data) of a fixed random bigram chain over SMALL_VOCAB ids, written once
    per session. A Llama-family model (no biases) needs many sightings of a token to learn from it: on the synthetic
    stream over all 8,192 ids of llama-tiny a batch of 8 showed each id twice, and 5 steps moved the loss less than the
    batches differ; over 64 ids the loss falls by over a nat in 5 steps, far beyond that noise."""
    rng = np.random.default_rng(0)
    successors = rng.integers(0, SMALL_VOCAB, (SMALL_VOCAB, 4))
    choice = rng.integers(0, 4, 200_000)
    tokens = np.empty(len(choice), dtype=np.uint16)
    t = 0
    for i, c in enumerate(choice):
        tokens[i], t = t, successors[t, c]
    path = Path(tempfile.mkdtemp(prefix="tokens-", dir=_scratch().name)) / "tokens.bin"
    tokens.tofile(path)
    return path


def run_layout(tmp: Path, steps: int | None = None, extra: tuple = (), model: str = "test-tiny", **knobs) -> dict:
    """Write a plan of this model with these knobs, run it on tp*cp*pp*dp spawned ranks, return its results line.
    With the model's DATA_FLAGS."""
    from tests.conftest import run_on_ranks

    tmp = Path(tmp)
    plan = write_plan(tmp / "plan.json", model=MODELS[model], **knobs)
    results = tmp / "results.jsonl"
    world = knobs.get("tp", 1) * knobs.get("cp", 1) * knobs.get("pp", 1) * knobs.get("dp", 1)
    steps = steps or (LLAMA_STEPS if model.startswith("llama") else PARITY_STEPS)
    data = data_flags(model)
    codes = run_on_ranks(launch, world, plan, "--steps", steps, "--results", results, *data, *extra)
    assert codes == [0] * world, codes
    return last_result(results)


@functools.lru_cache(maxsize=None)
def reference(model: str = "test-tiny", steps: int | None = None) -> dict:
    """The single-process run of a test model (global batch 8), computed once per test session: its results line."""
    return run_layout(Path(tempfile.mkdtemp(prefix="ref-", dir=_scratch().name)), steps=steps, model=model)


def reference_losses() -> tuple[float, ...]:
    """The long single-process run of test-tiny on the synthetic stream."""
    return tuple(reference("test-tiny", REFERENCE_STEPS)["losses"])


def max_relative_difference(a, b) -> float:
    assert len(a) == len(b), (a, b)
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))
