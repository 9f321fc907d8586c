"""The dashboard's inputs: specs from the YAML (or pasted config.json) text boxes, the pickers' ranges, the pins they
offer and the URL's parameters, checked as the CLI checks its flags.

No streamlit import here: every function is plain and unit-tested (tests/dashboard/test_data.py)."""

from __future__ import annotations

import json
import os

import yaml

from planner.compare import parse_price, parse_tokens
from planner.errors import SpecError
from planner.frameworks import FRAMEWORKS
from planner.hf import model_from_mapping
from planner.parsing import parse_mapping_text
from planner.plan import MAX_GLOBAL_BATCH
from planner import specs
from planner.specs import ClusterSpec, ModelSpec, cluster_from_dict


def presets(kind: str) -> list[str]:
    """Preset names of 'models' or 'clusters' (profiles/<kind>/*.yaml)."""
    return sorted(p.stem for p in (specs.PROFILES_DIR / kind).glob("*.yaml"))


def device_names() -> list[str]:
    """Device profiles in profiles/devices/ (a measured NAME.measured.json counts as NAME)."""
    return sorted({p.name.removesuffix(".json").removesuffix(".measured") for p in (specs.PROFILES_DIR / "devices").glob("*.json")})


def preset_text(kind: str, name: str) -> str:
    return (specs.PROFILES_DIR / kind / f"{name}.yaml").read_text()


def parse_yaml(text: str, source: str) -> dict:
    """A YAML mapping (or JSON, for text that starts with '{': a pasted config.json, read as the CLI reads a .json
    file), or a SpecError that names the line (the page shows it instead of a traceback)."""
    try:  # a key given twice is an error, as in the CLI; '{layers: 2, ...}' is YAML, not bad JSON
        data = _json_else_yaml(text, source) if text.lstrip().startswith("{") else parse_mapping_text(text, source, is_json=False)
    except yaml.YAMLError as e:
        mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SpecError(source, "(YAML)", f"malformed YAML{where}{f' ({problem})' if problem else ''}; fix the syntax") from None
    except json.JSONDecodeError as e:
        raise SpecError(source, "(JSON)", f"malformed JSON at line {e.lineno} ({e.msg}); fix the syntax") from None
    if not isinstance(data, dict):
        raise SpecError(source, "(top level)", "expected a mapping of field: value, e.g. 'layers: 24'")
    return data


def _json_else_yaml(text: str, source: str):
    try:
        return parse_mapping_text(text, source, is_json=True)
    except json.JSONDecodeError as e:
        try:
            return parse_mapping_text(text, source, is_json=False)
        except yaml.YAMLError:
            raise e from None


def model_from_yaml(text: str, source: str = "model YAML") -> ModelSpec:
    """A meshplan model YAML or a Hugging Face config.json, read as `planner plan --model FILE` reads them."""
    return model_from_mapping(parse_yaml(text, source), source, "custom")


def cluster_from_yaml(text: str, nodes: int, gpus_per_node: int, device: str, source: str = "cluster YAML") -> ClusterSpec:
    """The cluster YAML with nodes, GPUs per node and device taken from the pickers (as the CLI's flags do)."""
    data = parse_yaml(text, source)
    data.setdefault("name", "custom")
    data.update(nodes=nodes, gpus_per_node=gpus_per_node, device=device)
    return cluster_from_dict(data, source)


def default_gpus_per_node(cluster_text: str) -> int:
    """The preset's GPUs per node; local-cpu's 'auto' is this machine's core count."""
    value = yaml.safe_load(cluster_text).get("gpus_per_node", 8)
    return (os.cpu_count() or 1) if value == "auto" else int(value)


def divisors(n: int) -> list[int]:
    """Divisors of n in increasing order (the degrees and micro-batches a pin can take)."""
    small = [d for d in range(1, int(n ** 0.5) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


NODES_RANGE, GPUS_PER_NODE_RANGE, GLOBAL_BATCH_RANGE = (1, 100_000), (1, 1024), (1, MAX_GLOBAL_BATCH)
HEADROOM_RANGE_GIB = (0.0, 1024.0)
"""The memory headroom a link or the sidebar may set, GiB."""


def pin_options(devices: int, global_batch: int) -> dict[str, list[str]]:
    """The values each knob can be pinned to (besides 'auto'), for this many devices and this batch."""
    degrees = [str(d) for d in divisors(devices)]
    return {"tp": degrees, "cp": degrees, "pp": degrees, "dp": degrees,
            "micro_batch": [str(d) for d in divisors(global_batch) if d <= 256],
            "schedule": ["1f1b", "gpipe", "interleaved"], "virtual_stages": ["2", "3", "4", "6", "8"],
            "recompute": ["none", "selective", "full"], "sequence_parallel": ["on", "off"], "zero": ["0", "1", "2", "3"],
            "precision": ["bf16", "fp8"], "compile": ["on", "off"]}


def link_errors(params: dict[str, str], views: list[str], defaults: dict[str, int]) -> list[str]:
    """What a link's query parameters ask for that the pickers cannot show, one line per parameter. (Streamlit
    would silently drop such a value and show the default.) `defaults` fills nodes, gpus_per_node and
    global_batch that the link does not give, to check its pins against."""
    errors, sizes = [], dict(defaults)
    choices = {"model": presets("models"), "cluster": presets("clusters"), "device": device_names(), "view": views,
               "framework": list(FRAMEWORKS)}
    for key, allowed in choices.items():
        if key in params and params[key] not in allowed:
            errors.append(f"{key}={params[key]!r} is not one of {', '.join(allowed)}")
    for key, (low, high) in (("nodes", NODES_RANGE), ("gpus_per_node", GPUS_PER_NODE_RANGE), ("global_batch", GLOBAL_BATCH_RANGE)):
        if key not in params:
            continue
        text = params[key]
        if not text.strip().lstrip("+-").isdigit() or not low <= int(text) <= high:
            errors.append(f"{key}={text!r} is not a whole number from {low:,} to {high:,}")
        else:
            sizes[key] = int(text)
    if "memory_headroom" in params:
        try:
            value = float(params["memory_headroom"])
        except ValueError:
            value = float("nan")
        low, high = HEADROOM_RANGE_GIB
        if not low <= value <= high:
            errors.append(f"memory_headroom={params['memory_headroom']!r} is not a number of GiB from {low:g} to {high:g}")
    for key, parse, what in (("tokens", parse_tokens, "a number of tokens such as 15e12 or 15T"),
                             ("gpu_hour_price", parse_price, "a price in US dollars per GPU-hour above 0")):
        try:
            if params.get(key, "").strip():
                parse(params[key], key)
        except SpecError:
            errors.append(f"{key}={params[key]!r} is not {what}")
    for key, allowed in pin_options(sizes["nodes"] * sizes["gpus_per_node"], sizes["global_batch"]).items():
        if key in params and params[key] not in ["auto", *allowed]:
            errors.append(f"{key}={params[key]!r} cannot be pinned here; expected auto or one of {', '.join(allowed)}")
    return errors


def pins_from_choices(choices: dict[str, str]) -> dict:
    """Sidebar choices ('auto', '8', 'on', ...) to search pins; 'auto' leaves the knob to the search."""
    pins = {}
    for knob, choice in choices.items():
        if choice == "auto":
            continue
        pins[knob] = {"on": True, "off": False}.get(choice, choice)
        if knob in ("tp", "cp", "pp", "dp", "micro_batch", "virtual_stages", "zero"):
            pins[knob] = int(choice)
    return pins
