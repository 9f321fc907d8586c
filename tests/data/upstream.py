"""Hold meshplan's exports against Megatron-LM and torchtitan themselves, at the pinned commits.

    python tests/data/upstream.py names MEGATRON_DIR TORCHTITAN_DIR   # (re)write the name lists beside this file
    python tests/data/upstream.py check MEGATRON_DIR TORCHTITAN_DIR   # their own parsers on meshplan's exports

MEGATRON_DIR / TORCHTITAN_DIR are source trees at planner.export's MEGATRON_LM_COMMIT / TORCHTITAN_COMMIT (e.g.
`git archive` of those commits). Run it with a Python that has torch plus what their imports need (Megatron-LM
core_v0.16.1: triton, six, regex, pydantic; torchtitan: tyro, tokenizers, torchdata, datasets, einops). The
lists it writes are what tests/planner/test_export.py checks every export against, with no upstream code."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

from planner import export  # noqa: E402

MEGATRON_LIST = HERE / f"megatron_args_{export.MEGATRON_LM_COMMIT[:7]}.txt"
TORCHTITAN_LIST = HERE / f"torchtitan_keys_{export.TORCHTITAN_COMMIT[:7]}.txt"


def megatron_parser(megatron_dir: str) -> argparse.ArgumentParser:
    sys.path.insert(0, megatron_dir)
    from megatron.training.arguments import add_megatron_arguments

    return add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))


def write_megatron_names(parser: argparse.ArgumentParser) -> None:
    """One flag a line; a flag that takes only certain values lists them after it."""
    lines = set()
    for action in parser._actions:
        for flag in action.option_strings:
            if flag.startswith("--"):
                choices = " ".join(sorted(map(str, action.choices))) if action.choices else ""
                lines.add(f"{flag} {choices}".rstrip())
    header = f"# Megatron-LM {export.MEGATRON_LM_COMMIT} ({export.MEGATRON_LM_RELEASE}): every --flag of its parser\n"
    MEGATRON_LIST.write_text(header + "\n".join(sorted(lines)) + "\n")


def torchtitan_fields(cls, prefix: str = ""):
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            yield from torchtitan_fields(tp, f"{prefix}{f.name}.")
            continue
        literal = [a for a in typing.get_args(tp) if typing.get_origin(a) is typing.Literal] or \
                  ([tp] if typing.get_origin(tp) is typing.Literal else [])
        values = " ".join(sorted(str(v) for lit in literal for v in typing.get_args(lit)))
        yield f"{prefix}{f.name} {values}".rstrip()


def write_torchtitan_names(torchtitan_dir: str) -> None:
    sys.path.insert(0, torchtitan_dir)
    from torchtitan.config import JobConfig

    header = f"# torchtitan {export.TORCHTITAN_COMMIT}: every TOML key (section.key) of JobConfig, with a Literal's values\n"
    TORCHTITAN_LIST.write_text(header + "\n".join(sorted(torchtitan_fields(JobConfig))) + "\n")


def plans():
    """The exports checked: tests/planner/export_plans.py's (the README's gpt3-175b plan, a tp2 x pp2 interleaved
    plan, uneven-stage plans, a Llama-family plan with context parallelism and FP8, a Mistral plan), then the
    README's two export examples, searched as the README's commands search them."""
    from planner.search import search
    from planner.specs import load_cluster, load_device, load_model
    from tests.planner.export_plans import example_plans

    yield from example_plans().items()
    for model, cluster, nodes, batch, pins in (("llama3-70b", "dgx-h100-80gb", 64, 1024, {}), ("gpt3-175b", "dgx-a100-80gb", 64, 1536, {"pp": 8})):
        c = load_cluster(cluster, nodes)
        plan = search(load_model(model), c, load_device(c.device), batch, pins, top=1).plans[0]
        yield f"README {model}{' --pp 8' if pins else ''} plan {plan.id}", plan


def check_megatron(megatron_dir: str) -> None:
    parser = megatron_parser(megatron_dir)
    from megatron.training import arguments

    # validate_args asks the GPU's architecture (for the CUDA_DEVICE_MAX_CONNECTIONS rule with tp or cp > 1); with no GPU
    # here, answer as an H100 (sm_90) would.
    arguments.get_device_arch_version = lambda: 9
    # TransformerConfig refuses RoPE fusion (on by default with --position-embedding-type rope, as the Llama-family
    # exports leave it: Megatron-Core as priced fuses its elementwise kernels) where Transformer Engine >= 1.4, which
    # provides the fused kernel, is not installed, as here; answer as a machine with it would.
    from megatron.core.models.common.embeddings import rope_utils

    rope_utils.fused_apply_rotary_pos_emb = rope_utils.fused_apply_rotary_pos_emb or (lambda *a, **k: None)

    for name, plan in plans():
        argv = export.megatron_argv(plan)
        args = parser.parse_args(argv)  # exits on an unknown flag or a value outside its choices
        args.rank, args.world_size = 0, plan.world_size
        os.environ["WORLD_SIZE"] = str(plan.world_size)
        for key, value in export.megatron_environment(plan)[0].items():  # as the export's comment line says
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        try:
            arguments.validate_args(args)
            config = arguments.core_transformer_config_from_args(args)  # TransformerConfig checks the stage split
            verdict = f"validate_args and TransformerConfig passed (first/last stage layers {config.num_layers_in_first_pipeline_stage}/" \
                      f"{config.num_layers_in_last_pipeline_stage}, layout {config.pipeline_model_parallel_layout})"
        except Exception as e:  # noqa: BLE001 (report what their validation says, whatever it raises)
            verdict = f"validate_args/TransformerConfig: {type(e).__name__}: {e}"
        print(f"megatron {name}: parsed {len(argv)} arguments; {verdict}")
        assert args.tensor_model_parallel_size == plan.tp and args.pipeline_model_parallel_size == plan.pp
        assert args.micro_batch_size == plan.micro_batch and args.global_batch_size == plan.global_batch


def check_torchtitan(torchtitan_dir: str, tmp: Path) -> None:
    sys.path.insert(0, torchtitan_dir)
    from torchtitan.config import ConfigManager

    for name, plan in plans():
        path = tmp / f"{name}.toml"
        path.write_text(export.torchtitan_toml(plan))
        config = ConfigManager().parse_args(["--job.config_file", str(path)])
        p = config.parallelism
        assert (p.tensor_parallel_degree, p.pipeline_parallel_degree) == (plan.tp, plan.pp)
        assert config.training.global_batch_size == plan.global_batch and config.training.seq_len == plan.model.seq_len
        print(f"torchtitan {name}: ConfigManager loaded it (tp {p.tensor_parallel_degree}, pp {p.pipeline_parallel_degree}, "
              f"schedule {p.pipeline_parallel_schedule}, {len(p.module_fqns_per_model_part or [])} model parts, "
              f"AC {config.activation_checkpoint.mode})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("names", "check"))
    ap.add_argument("megatron_dir")
    ap.add_argument("torchtitan_dir")
    args = ap.parse_args()
    if args.what == "names":
        write_megatron_names(megatron_parser(args.megatron_dir))
        write_torchtitan_names(args.torchtitan_dir)
        print(f"wrote {MEGATRON_LIST.name} and {TORCHTITAN_LIST.name}")
    else:
        import tempfile

        check_megatron(args.megatron_dir)
        with tempfile.TemporaryDirectory() as tmp:
            check_torchtitan(args.torchtitan_dir, Path(tmp))


if __name__ == "__main__":
    main()
